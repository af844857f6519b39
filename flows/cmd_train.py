"""`aced train` and `aced export`: run a recipe in <root>/runs/<name>, resumable; export its model."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from storage.workspace import Workspace


def _parse_value(field: dataclasses.Field, text: str) -> Any:
    """The text of `--set FIELD=TEXT` as the field's type; ValueError naming the field when it is not one.
    (Ranges are TrainConfig's / SelectionConfig's to check.)"""
    kind = str(field.type)
    if "tuple" in kind:
        return tuple(x for x in text.split(",") if x)
    if "bool" in kind:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--set {field.name}={text}: expected true or false")
        return text.lower() in ("true", "1")
    if text.lower() == "none" and "None" in kind:
        return None
    try:
        if "int" in kind and "float" not in kind:
            return int(text)
        if "float" in kind:
            return float(text)
    except ValueError:
        want = "an integer" if "float" not in kind else "a number"
        raise ValueError(f"--set {field.name}={text}: expected {want}"
                         + (" or none" if "None" in kind else "")) from None
    return text


def config_from_args(args: argparse.Namespace):
    from pipeline.recipes import TrainConfig, read_config_file, recipe
    from pipeline.selection import SelectionConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    overrides: dict[str, Any] = {}
    if args.config:
        overrides.update(read_config_file(args.config))
    root: Path = args.root
    for name in ("method", "model", "steps", "batch_size", "seed", "reference", "init_from"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if args.data:
        overrides["train_data"] = tuple(str(_dataset_dir(root, d)) for d in args.data)
    if args.teacher:
        overrides["teacher"] = tuple(args.teacher)
    if args.zeroshot:
        overrides["eval_zeroshot"] = tuple(str(_dataset_dir(root, d)) for d in args.zeroshot)
    if args.retrieval:
        overrides["eval_retrieval"] = tuple(str(_dataset_dir(root, d)) for d in args.retrieval)
    selection = {f.name: f for f in dataclasses.fields(SelectionConfig)}
    flat = {"n_chunks": "n_chunks", "tau": "tau", "topk": "topk", "kernel_backend": "backend"}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        sel = flat.get(key) or (key.removeprefix("selection.") if key.startswith("selection.") else None)
        if sep and key in fields and key != "selection":
            overrides[key] = _parse_value(fields[key], value)
        elif sep and sel in selection and sel != "rule":
            overrides[f"selection.{sel}"] = _parse_value(selection[sel], value)
        else:
            names = [f for f in fields if f != "selection"] + [f"selection.{f}" for f in selection if f != "rule"]
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(names)}")
    if (overrides.get("reference") or overrides.get("teacher")) and "cache_root" not in overrides:
        overrides["cache_root"] = str(Workspace(root).cache)
    return recipe(args.recipe, **overrides)


def _dataset_dir(root: Path, name: str) -> Path:
    """A dataset folder by path, or by name below <root>/datasets."""
    try:
        return Workspace(root).resolve_dataset(name)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None


def _train_distributed(cfg, run_dir: Path, nproc: int) -> dict[str, float]:
    """`--nproc N`: the same run as N data-parallel ranks under torchrun; returns the last step's metrics.
    This process owns the run folder while the ranks run (rank 0 checks it is the recorded holder)."""
    import os
    import subprocess

    from pipeline.report import read_metrics
    from pipeline.trainer import RUN_LOCK_ENV, check_or_write_config, launch_command, validate_run
    from storage.workspace import FolderLock

    with FolderLock(run_dir, "run"):
        validate_run(cfg)  # a config that cannot start is never written
        check_or_write_config(cfg, run_dir)  # the ranks read it; another run's config is refused before launch
        cmd = launch_command(run_dir, nproc)
        print("launching: " + " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, env={**os.environ, RUN_LOCK_ENV: str(os.getpid())}).returncode
    if rc != 0:
        raise SystemExit(f"data-parallel training of {run_dir} failed (torchrun exit code {rc}); re-run to resume")
    rows = read_metrics(run_dir).to_pylist()
    return rows[-1] if rows else {}


def _run_dir(args: argparse.Namespace) -> Path:
    return Workspace(args.root).run(args.run)


def _train(args: argparse.Namespace) -> int:
    from pipeline.trainer import train

    cfg = config_from_args(args)
    run_dir = _run_dir(args)
    if args.nproc > 1:
        last = _train_distributed(cfg, run_dir, args.nproc)
        model_dir = run_dir / "model"
        print(f"run {run_dir}: {cfg.steps} steps on {args.nproc} data-parallel ranks, model at {model_dir}")
    else:
        result = train(cfg, run_dir, progress=None)
        last, model_dir = result.metrics, result.model_dir
        print(f"run {run_dir}: {result.step} steps, model at {result.model_dir}")
    keys = ("total", "contrastive", "kd", "noisy_frac_selected", "noisy_frac_superbatch", "pairs_per_s")
    print("last step: " + ", ".join(f"{k}=" + ("n/a" if last[k] is None else f"{last[k]:.4g}")  # None: noise unknown
                                    for k in keys if k in last))
    if cfg.eval_zeroshot or cfg.eval_retrieval:
        from pipeline.evaluate import evaluate, write_results
        from pipeline.models import load_model

        evals = {Path(d).name + ":zeroshot": ("zeroshot", d) for d in cfg.eval_zeroshot}
        evals.update({Path(d).name + ":retrieval": ("retrieval", d) for d in cfg.eval_retrieval})
        results = evaluate(load_model(model_dir), evals)
        write_results(results, run_dir / "eval")
        print(json.dumps(results, indent=2))
    return 0


def _train_flow(args: argparse.Namespace) -> int:
    """`aced train --flow`: the same run through the Prefect train flow (evaluation + artifacts)."""
    from flows._prefect_env import use_workspace_state
    from flows.cmd_flows import _quiet_libraries

    from pipeline.trainer import validate_run

    cfg = config_from_args(args)
    # Here, not only inside the flow: a missing cache, model or dataset is one line in seconds, before
    # Prefect starts (inside the flow Prefect would also log it, traceback and all).
    validate_run(cfg)
    use_workspace_state(args.root)
    _quiet_libraries(args.verbose)
    from flows.train_flow import train_flow

    evals = {f"{Path(d).name}-zeroshot": ["zeroshot", d] for d in cfg.eval_zeroshot}
    evals.update({f"{Path(d).name}-retrieval": ["retrieval", d] for d in cfg.eval_retrieval})
    out = train_flow(json.loads(cfg.to_json()), str(_run_dir(args)), evals or None)
    print(json.dumps(out, indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    """The main job (README's first command)."""
    from flows._prefect_env import use_workspace_state
    from flows.cmd_flows import _quiet_libraries

    use_workspace_state(args.root)
    _quiet_libraries(args.verbose)
    from flows.main_job import main_job

    root = args.root.resolve()
    if args.reference or args.teacher:  # a bad model id is one line before Prefect starts
        from flows.main_job import given_models

        given_models(str(root), args.reference, args.teacher)
    main_job(str(root), size=args.size, seed=args.seed, data=args.data, engine=args.engine,
             reference=args.reference, teacher=args.teacher)
    # The flow's own prints go to the run log (stderr, the UI); the comparison goes to stdout.
    print((root / "report.md").read_text(), end="", flush=True)
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.trainer import export_model

    run_dir = _run_dir(args)
    out = args.out or Workspace(args.root).model(args.name or args.run)  # names checked first
    if not (run_dir / "config.json").is_file():  # named here, not as a raw [Errno 2] about config.json
        raise FileNotFoundError(f"no run {args.run!r}: {run_dir} holds no config.json" if run_dir.is_dir()
                                else f"no run {args.run!r} ({run_dir} does not exist)")
    export_model(run_dir, out, overwrite=args.overwrite)
    print(f"exported {run_dir} -> {out}")
    return 0


def _dispatch_train(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise SystemExit(f"--nproc must be >= 1, got {args.nproc}")
    if args.flow and args.nproc > 1:
        raise SystemExit("--flow runs the trainer inside the flow's process; for data-parallel training use "
                         "--nproc without --flow")
    return _train_flow(args) if args.flow else _train(args)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a student/reference/teacher (resumes the run if it exists)",
                       description="Train with a recipe in <root>/runs/RUN; re-running resumes from its latest checkpoint.")
    p.add_argument("run", help="run name (folder below <root>/runs)")
    p.add_argument("--recipe", default="student", help="student | reference | tiny (default: student)")
    p.add_argument("--config", help="JSON file of TrainConfig fields")
    p.add_argument("--method", help="iid, softmax-kd, i-acid, h-acid, aced-acidistill, aced-iidistill, rho-topk, student-loss")
    p.add_argument("--model", help="architecture (ladder name, open_clip name or JSON config)")
    p.add_argument("--data", action="append", help="training dataset (path or name below <root>/datasets); repeatable")
    p.add_argument("--reference", help="reference model id in <root>/cache")
    p.add_argument("--teacher", action="append", help="teacher model id in <root>/cache; repeat for an ensemble")
    p.add_argument("--init-from", dest="init_from", help="model folder whose weights initialise the student")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--zeroshot", action="append", help="class dataset evaluated at the end; repeatable")
    p.add_argument("--retrieval", action="append", help="pair dataset evaluated at the end; repeatable")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="any other TrainConfig field; repeatable")
    p.add_argument("--flow", action="store_true", help="run through the Prefect train flow (evaluation, artifacts)")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel ranks under torchrun (gloo on CPU, one GPU each on CUDA); batch size and "
                        "super-batch must divide by it (default 1: one process)")
    p.set_defaults(func=_dispatch_train)

    r = sub.add_parser("run", help="the main job: data -> reference/teacher -> cache -> students -> eval -> table",
                       description="Runs the whole pipeline as one Prefect flow in the workspace; re-running skips "
                                   "finished stages and resumes unfinished training runs.")
    r.add_argument("--size", default="default", choices=("default", "tiny"), help="built-in job size")
    r.add_argument("--data", help="a real folder of images + captions (e.g. ../shared/data/flickr8k) instead of synthetic data")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--engine", default="ray", choices=("ray", "plain"), help="cache engine (default ray)")
    r.add_argument("--reference", metavar="MODEL", default=None,
                   help="use this model (workspace id, e.g. from `aced model import`, or model folder) as the "
                        "reference instead of training one")
    r.add_argument("--teacher", metavar="MODEL", default=None,
                   help="use this model (workspace id or model folder) as the teacher instead of training one")
    r.set_defaults(func=_run)

    e = sub.add_parser("export", help="export a run's latest weights as a model folder")
    e.add_argument("run")
    e.add_argument("--name", help="model id (default: the run name)")
    e.add_argument("--out", type=Path, help="output folder (default: <root>/models/<name>)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing model folder (only ever one this project wrote)")
    e.set_defaults(func=_export)
