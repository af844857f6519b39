"""`aced cache`, `aced serve`, `aced deployments`: run and schedule the Prefect flows.

- `aced cache [run]` runs `cache_flow` once in this process (Prefect's temporary server records
  it, or the workspace's `aced serve` server when one is up; no server to start by hand).
  `aced cache verify` checks the caches against their pair shards (`storage.cache.verify_cache`).
- `aced serve` registers deployments (cache on a cron or interval schedule, eval on demand) and
  serves them, supervising a local `prefect server start` unless PREFECT_API_URL names one;
  `--work-pool` registers them in a process work pool instead; `--list` = `aced deployments`.

Prefect reads its settings when first imported, so every command here points it at the workspace
(`flows._prefect_env.use_workspace_state`) before importing a flow. `aced cache` and `aced serve`
reap what a killed predecessor left running and make their own children (Prefect servers, Ray)
die with them (`pipeline.children`); a full disk under the Prefect state or a server that cannot
start is one line on stderr and exit code 1.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from storage import fs
from flows.cli import expected_errors, positive_float, positive_int

log = logging.getLogger(__name__)


def add_commands(subparsers) -> None:
    c = subparsers.add_parser(
        "cache", help="embed pair shards with reference/teacher models into the cache (Prefect flow, Ray Data)",
        description="run: embed every shard of DATASETS missing from the cache of each MODEL (one Prefect flow run; "
                    "reruns do only what is missing). verify: check caches against their pair shards.")
    c.add_argument("action", nargs="?", choices=("run", "verify"), default="run")
    _cache_args(c)
    c.add_argument("--model", dest="verify_model", default=None, help="verify: only this model id")
    c.set_defaults(func=_cmd_cache)

    s = subparsers.add_parser(
        "serve", help="register the flows' deployments (cache on a schedule) and serve them",
        description="Starts a local Prefect server over <root>/state/prefect (unless PREFECT_API_URL is set), "
                    "registers the deployments cache/cache (scheduled) and eval/eval (on demand), and runs due "
                    "flow runs until interrupted.")
    when = s.add_mutually_exclusive_group()
    when.add_argument("--cache-cron", metavar="CRON", help='cache schedule, e.g. "0 2 * * *" (nightly at 02:00)')
    when.add_argument("--cache-interval", metavar="SECONDS", type=positive_float, help="cache schedule: every SECONDS")
    s.add_argument("--timezone", default="UTC", help="time zone of --cache-cron (default UTC)")
    _cache_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address of the local Prefect server (default 127.0.0.1)")
    s.add_argument("--port", type=_port, default=4200, help="port of the local Prefect server (default 4200)")
    s.add_argument("--no-ui", action="store_true", help="start the local server without its web UI")
    s.add_argument("--work-pool", metavar="POOL", default=None,
                   help="register the deployments in this process work pool and exit (a `prefect worker` runs them)")
    s.add_argument("--list", action="store_true", help="only show the registered deployments (= aced deployments)")
    s.set_defaults(func=_cmd_serve)

    d = subparsers.add_parser("deployments", help="show the registered deployments and their schedules")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=_cmd_deployments)


def _port(text: str) -> int:
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {text}")
    return port


def _cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datasets", nargs="+", metavar="DATASET", default=None,
                   help="dataset names under <root>/datasets (default: all)")
    p.add_argument("--models", nargs="+", metavar="MODEL", default=None,
                   help="model ids under <root>/models, or model folders (reference, teacher, ...)")
    p.add_argument("--engine", choices=("ray", "plain"), default="ray",
                   help="ray: one Ray Data pipeline (default); plain: a single-process loop")
    p.add_argument("--chunk-size", type=positive_int, default=64, help="samples per model forward (default 64)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored embedding dtype")
    p.add_argument("--actors", type=positive_int, default=None, help="model actors (default: one per GPU, else 1)")
    p.add_argument("--actor-cpus", type=positive_float, default=None, help="CPUs reserved per actor (fractions allowed)")
    p.add_argument("--torch-threads", type=positive_int, default=None, help="torch threads per actor/process")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="join this running Ray cluster (the head's address from `ray start --head`; left running "
                        "afterwards; default: $RAY_ADDRESS, else a local Ray started and stopped by this command). "
                        "Every node must see the workspace and the model folders at the same paths")
    p.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs of a local Ray instance (default: all)")
    p.add_argument("--object-store-mb", type=positive_int, default=None, help="object store of a local Ray instance")


def _cache_params(args: argparse.Namespace) -> dict:
    if not args.models:
        raise SystemExit(f"aced {args.command}: give --models (model ids under {args.root}/models or model folders)")
    if args.chunk_size < 1:
        raise SystemExit(f"aced {args.command}: --chunk-size must be >= 1")
    if args.ray_address and args.engine != "ray":
        raise SystemExit(f"aced {args.command}: --ray-address needs --engine ray")
    if args.ray_address and (args.num_cpus is not None or args.object_store_mb is not None):
        raise SystemExit(f"aced {args.command}: --num-cpus/--object-store-mb size a local Ray; "
                         "a cluster joined with --ray-address keeps its own")
    return {"root": str(fs.resolve(args.root)), "datasets": args.datasets, "models": args.models,
            "engine": args.engine, "chunk_size": args.chunk_size, "dtype": args.dtype, "actors": args.actors,
            "actor_cpus": args.actor_cpus, "torch_threads": args.torch_threads, "ray_address": args.ray_address,
            "num_cpus": args.num_cpus, "object_store_mb": args.object_store_mb}


def _cmd_cache(args: argparse.Namespace) -> int:
    if args.action == "verify":
        from storage.cache import verify_cache

        rep = verify_cache(args.root, args.verify_model)
        print(rep.format())
        return 0 if rep.ok else 1
    from flows._prefect_env import StateDiskFull, check_state_space

    params = _cache_params(args)
    try:
        if not os.environ.get("PREFECT_API_URL"):  # the workspace's own Prefect state: is there room for it?
            check_state_space(args.root)  # before planning, which creates the cache folders
    except StateDiskFull as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _plan_before_the_flow(params)
    return _run(args.root, lambda: _cache_run(args, params))


def _plan_before_the_flow(params: dict) -> None:
    """Plan the run here first (models loaded and fingerprinted, datasets and manifests read): an unknown
    model or dataset, a hand-edited model folder or a damaged dataset is then one line and exit 1 in
    seconds, before Prefect's server and Ray start (inside the flow the same error would also be logged
    by Prefect, traceback and all). The flow plans again: that plan is the one it acts on."""
    from pipeline.ray_embed import plan_cache

    plan_cache(params["root"], params["datasets"], params["models"], dtype=params["dtype"])


def _run(root: Path, fn) -> int:
    """Run a Prefect-backed command; the expected failures become one line on stderr and exit code 1."""
    from flows._prefect_env import StateDiskFull, state_errors
    from flows.serve import PrefectServerError

    try:
        with state_errors(root):
            return fn()
    except (StateDiskFull, PrefectServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _cache_run(args: argparse.Namespace, params: dict) -> int:
    from flows._prefect_env import use_workspace_state

    mode = use_workspace_state(args.root)
    _quiet_libraries(args.verbose)
    log.info("prefect: %s", {"api-url": f"server {os.environ.get('PREFECT_API_URL')}",
                             "serve": f"the workspace's aced serve server {os.environ.get('PREFECT_API_URL')}",
                             "ephemeral": "temporary local server"}[mode])
    from flows.cache_flow import cache_flow

    summary = cache_flow(**params)
    print(json.dumps(summary, indent=2))
    return 0


def _quiet_libraries(verbose: bool = False) -> None:
    """The CLI logs at INFO; these would add a line per Prefect API request / per import. Unless
    `verbose`, Prefect's console copies of an expected error are dropped (`ExpectedErrorFilter`)."""
    for name in ("httpx", "faiss.loader"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not verbose:
        for handler in logging.getLogger().handlers:  # the console; Prefect's API log handlers keep everything
            if not any(isinstance(f, ExpectedErrorFilter) for f in handler.filters):
                handler.addFilter(ExpectedErrorFilter())


class ExpectedErrorFilter(logging.Filter):
    """Prefect logs a failing task run's and flow run's exception with its full traceback, then each
    Failed state with the message again; for an error `aced` reports itself as one line (bad input:
    `flows.cli.expected_errors`) those console records are noise, so they are dropped: records of
    Prefect's loggers carrying such an exception, and later ones repeating its message. Any other
    exception keeps its tracebacks; `-v` keeps everything."""

    def __init__(self) -> None:
        super().__init__()
        self.types = expected_errors()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            if isinstance(exc, self.types) and str(exc):
                self.messages.append(str(exc))
                return False
            return True
        if self.messages:  # the Failed states quote the message (repr: quotes escaped), so compare without quotes
            text = _unquoted(record.getMessage())
            return not any(_unquoted(m) in text for m in self.messages)
        return True


def _unquoted(text: str) -> str:
    return text.replace("\\", "").replace("'", "").replace('"', "")


def _sigterm_as_interrupt() -> None:
    """`docker stop`/systemd send SIGTERM: shut down like Ctrl-C (server stopped, state kept)."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.list:
        return _cmd_deployments(argparse.Namespace(**{**vars(args), "json": False}))
    if not (args.cache_cron or args.cache_interval):
        raise SystemExit("aced serve: give --cache-cron CRON or --cache-interval SECONDS")
    if args.work_pool and not os.environ.get("PREFECT_API_URL"):
        raise SystemExit("aced serve --work-pool: set PREFECT_API_URL to the server the pool's worker polls")
    params = _cache_params(args)
    return _run(args.root, lambda: _serve(args, params))


def _serve(args: argparse.Namespace, params: dict) -> int:
    from flows._prefect_env import running_server, server_env
    from flows.serve import LocalPrefectServer
    from pipeline.children import supervise

    # before looking for a running server: a killed `aced serve` may have left its server answering
    supervise(args.root)
    _sigterm_as_interrupt()
    _quiet_libraries(args.verbose)
    with contextlib.ExitStack() as stack:
        if os.environ.get("PREFECT_API_URL"):
            log.info("using the Prefect server at %s", os.environ["PREFECT_API_URL"])
        else:
            os.environ.update(server_env(args.root))
            other = running_server(args.root)
            if other:
                raise SystemExit(f"aced serve: this workspace is already served by the server at {other} "
                                 f"(stop that `aced serve`, or set PREFECT_API_URL={other} to register elsewhere)")
            try:
                server = stack.enter_context(
                    LocalPrefectServer(args.root, host=args.host, port=args.port, ui=not args.no_ui))
            except KeyboardInterrupt:
                return 130
            os.environ["PREFECT_API_URL"] = server.api_url  # before prefect is imported below
            print(f"prefect server: {server.api_url} (state in {server.home})", flush=True)
        from flows.serve import build_deployments, format_deployments, list_deployments, register_in_pool, serve_deployments

        deployments = build_deployments(params, cache_cron=args.cache_cron, cache_interval=args.cache_interval,
                                        timezone=args.timezone)
        if args.work_pool:
            ids = register_in_pool(deployments, args.work_pool)
            print(f"registered {len(ids)} deployments in work pool {args.work_pool!r}:")
            print(format_deployments(list_deployments()))
            return 0
        print("serving cache/cache ("
              + (f"cron {args.cache_cron!r} {args.timezone}" if args.cache_cron else f"every {args.cache_interval:g} s")
              + ") and eval/eval (on demand); Ctrl-C stops", flush=True)
        try:
            serve_deployments(deployments)
        except KeyboardInterrupt:
            pass
        return 0  # leaving the `with` stops the server


def _cmd_deployments(args: argparse.Namespace) -> int:
    from flows._prefect_env import use_workspace_state

    use_workspace_state(args.root)  # no server running: Prefect's temporary one reads the workspace state
    from flows.serve import format_deployments, list_deployments

    rows = list_deployments()
    print(json.dumps(rows, indent=2, default=str) if args.json else format_deployments(rows))
    return 0
