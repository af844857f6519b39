"""Scheduling: deployments of the aced flows, served by Prefect, plus a supervised local server.

Prefect's temporary in-process server never fires schedules (STACK.md), so `aced serve` by default
starts `prefect server start` as a child process over the workspace's SQLite state
(`<root>/state/prefect`, see flows/_prefect_env.py), waits for its health endpoint, serves the
deployments with `prefect.serve(...)` (a Runner that polls the server for due runs and executes
each in a subprocess), and stops the server when it exits. The server dies with `aced serve` even
after a SIGKILL (PR_SET_PDEATHSIG, and the watchdog of `pipeline.children.supervise`). With PREFECT_API_URL set it uses that
server instead and starts none. With a work pool it only registers the deployments there (a
`prefect worker` of a process pool runs them: docker/compose.yaml).

Deployments (entrypoints by module path, so any process with `aced` installed can run them):
- `cache/cache`: `cache_flow` with the given parameters on a cron or interval schedule
  ("cache newly arrived shards nightly": a run only embeds shards missing from the manifests);
  at most one run at a time (runs of one workspace would contend for its cache lock).
- `eval/eval`: `eval_flow`, unscheduled; started on demand with parameters
  (`prefect deployment run eval/eval -p model_dir=... -p evals=...`).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from flows._prefect_env import SERVER_FILE, check_state_space, healthy, prefect_home, server_env
from pipeline.children import parent_death_signal
from storage.atomic import atomic_write_json

log = logging.getLogger(__name__)

CACHE_DEPLOYMENT = "cache"
EVAL_DEPLOYMENT = "eval"


class PrefectServerError(OSError):
    """The local Prefect server could not start (port taken, or it exited during start-up)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalPrefectServer:
    """`prefect server start` as a supervised child process over the workspace state.

    Use as a context manager: on enter it checks the state's free space (`StateDiskFull`), starts
    the server (log: `<home>/server.log`), waits until `GET /api/health` answers (or the process
    dies: the error quotes the log), and records the URL in `<home>/server.json` for other `aced`
    commands; on exit it stops the server (SIGTERM, then SIGKILL after `stop_timeout`) and removes
    the record. If this process dies without exiting the block, the kernel sends the server SIGTERM.
    """

    def __init__(self, root: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 4200,
                 startup_timeout: float = 180.0, stop_timeout: float = 20.0, ui: bool = True,
                 extra_env: dict[str, str] | None = None):
        self.root, self.host, self.port = Path(root), host, port
        self.startup_timeout, self.stop_timeout, self.ui = startup_timeout, stop_timeout, ui
        self.extra_env = dict(extra_env or {})
        self.home = prefect_home(root)
        self.proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    def __enter__(self) -> "LocalPrefectServer":
        check_state_space(self.root)
        with socket.socket() as s:
            if s.connect_ex((self.host, self.port)) == 0:
                raise PrefectServerError(f"port {self.host}:{self.port} is taken; choose another with --port "
                                   f"(or point PREFECT_API_URL at a running server)")
        env = {**os.environ, **server_env(self.root), **self.extra_env}
        env.pop("PREFECT_API_URL", None)  # the server itself must not talk to another API
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", self.host, "--port", str(self.port)]
        if not self.ui:
            env["PREFECT_SERVER_UI_ENABLED"] = "false"
        self.log_path = self.home / "server.log"
        logf = open(self.log_path, "ab")
        # own process group: a Ctrl-C in the terminal reaches us, and we stop the server in order;
        # SIGTERM from the kernel if we die first (a SIGKILL runs none of our cleanup)
        self.proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=parent_death_signal(signal.SIGTERM))
        logf.close()
        t0 = time.monotonic()
        try:
            while not healthy(self.api_url, timeout=1.0):
                if self.proc.poll() is not None:
                    raise PrefectServerError(f"prefect server exited with {self.proc.returncode} during start-up; "
                                       f"end of {self.log_path}:\n{self._log_tail()}")
                if time.monotonic() - t0 > self.startup_timeout:
                    raise TimeoutError(f"prefect server not healthy after {self.startup_timeout:.0f} s; "
                                       f"end of {self.log_path}:\n{self._log_tail()}")
                time.sleep(0.5)
        except BaseException:
            self._stop()
            raise
        log.info("prefect server up at %s after %.1f s (pid %d, state %s)", self.api_url,
                 time.monotonic() - t0, self.proc.pid, self.home)
        atomic_write_json(self.home / SERVER_FILE, {"api_url": self.api_url, "pid": self.proc.pid})
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        try:
            (self.home / SERVER_FILE).unlink()
        except FileNotFoundError:
            pass
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("prefect server (pid %d) ignored SIGTERM for %.0f s; killing it", self.proc.pid,
                        self.stop_timeout)
            self.proc.kill()
            self.proc.wait()
        log.info("prefect server stopped")

    def _log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return "(no log)"


# --------------------------------------------------------------------------------------------
# deployments


def build_deployments(cache_params: dict, *, cache_cron: str | None = None,
                      cache_interval: float | None = None, timezone: str | None = None) -> list:
    """RunnerDeployments for the aced flows (see module docstring). Needs `prefect` importable."""
    from prefect.schedules import Cron, Interval
    from prefect.types.entrypoint import EntrypointType

    from flows.cache_flow import cache_flow
    from flows.eval_flow import eval_flow

    if cache_cron and cache_interval:
        raise ValueError("give a cron schedule or an interval, not both")
    if cache_interval is not None and cache_interval <= 0:
        raise ValueError(f"cache interval must be > 0 seconds, got {cache_interval}")
    schedules = []
    if cache_cron:
        schedules.append(Cron(cache_cron, timezone=timezone or "UTC"))
    elif cache_interval:
        schedules.append(Interval(dt.timedelta(seconds=cache_interval)))
    cache = cache_flow.to_deployment(
        name=CACHE_DEPLOYMENT, schedules=schedules, parameters=cache_params, concurrency_limit=1,
        description="embed pair shards missing from the reference/teacher caches",
        entrypoint_type=EntrypointType.MODULE_PATH)
    ev = eval_flow.to_deployment(name=EVAL_DEPLOYMENT, description="evaluate a saved model (on demand)",
                                 entrypoint_type=EntrypointType.MODULE_PATH)
    return [cache, ev]


def serve_deployments(deployments: list, *, limit: int = 1) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM): Prefect's Runner executes due runs, `limit` at a time.

    Schedules stay active on shutdown (`pause_on_shutdown=False`): the next `aced serve` picks
    them up again, and `aced deployments` shows them as configured.
    """
    import prefect

    prefect.serve(*deployments, limit=limit, pause_on_shutdown=False, print_starting_message=False)


def register_in_pool(deployments: list, work_pool: str) -> list[str]:
    """Register the deployments in a process work pool (created if missing) for `prefect worker`."""
    import prefect
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(work_pool)
            if pool.type != "process":
                raise ValueError(f"work pool {work_pool!r} has type {pool.type!r}; aced deployments need a "
                                 f"'process' pool (the image already holds the code)")
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=work_pool, type="process"))
            log.info("created process work pool %r", work_pool)
    ids = prefect.deploy(*deployments, work_pool_name=work_pool, build=False, push=False,
                         print_next_steps_message=False, ignore_warnings=True)
    return [str(i) for i in ids]


def describe_schedule(schedule) -> str:
    if getattr(schedule, "cron", None):
        return f"cron {schedule.cron!r} ({schedule.timezone or 'UTC'})"
    if getattr(schedule, "interval", None) is not None:
        return f"every {schedule.interval.total_seconds():g} s"
    if getattr(schedule, "rrule", None):
        return f"rrule {schedule.rrule!r}"
    return repr(schedule)


def list_deployments() -> list[dict]:
    """Every deployment on the current Prefect API with its schedules and next scheduled run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName
    from prefect.client.schemas.sorting import FlowRunSort

    out = []
    with get_client(sync_client=True) as client:
        for d in client.read_deployments():
            flow = client.read_flow(d.flow_id)
            upcoming = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Scheduled"]))),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1)
            out.append({
                "name": f"{flow.name}/{d.name}",
                "schedules": [describe_schedule(s.schedule) + ("" if s.active else " (inactive)") for s in d.schedules],
                "paused": bool(d.paused),
                "work_pool": d.work_pool_name,
                "entrypoint": d.entrypoint,
                "next_run": upcoming[0].expected_start_time.isoformat() if upcoming else None,
                "parameters": d.parameters,
            })
    return sorted(out, key=lambda r: r["name"])


def format_deployments(rows: list[dict]) -> str:
    if not rows:
        return "no deployments registered"
    lines = []
    for r in rows:
        sched = "; ".join(r["schedules"]) or "no schedule (run on demand)"
        state = " [paused]" if r["paused"] else ""
        where = f" pool={r['work_pool']}" if r["work_pool"] else " served"
        lines.append(f"{r['name']}{state}: {sched};{where}; next run: {r['next_run'] or '-'}")
        if r["parameters"]:
            lines.append(f"    parameters: {json.dumps(r['parameters'], sort_keys=True)}")
    return "\n".join(lines)
