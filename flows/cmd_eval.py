"""`aced eval`, `aced eval compare` and `aced stable-eval`: evaluate a saved model (datasets given one by one
or in a suite file), put several models' results side by side, pick the StableEval subset from seeds.

Thin layer over `pipeline.evaluate` (paper section 4.1 and Appendix A).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="zero-shot classification and image-text retrieval of a saved model; `eval compare` tables",
        description="Evaluate MODEL_DIR (a folder written by save_model, or a model id under <root>/models). "
                    "DATASET arguments are pair-shard folders, or dataset names under <root>/datasets. "
                    "`aced eval compare RESULTS...` instead puts results (results.json, CLIP_benchmark JSON files, "
                    "or folders of them) of several models side by side.")
    p.add_argument("model", metavar="MODEL_DIR", help="model folder or id (or `compare`, then RESULTS...)")
    p.add_argument("results", metavar="RESULTS", nargs="*", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--suite", type=Path, default=None,
                   help="JSON list of {\"dataset\", \"task\": \"zeroshot_classification\"|\"zeroshot_retrieval\", "
                        "\"classnames\"?, \"templates\"?, \"name\"?} (standard sets such as cifar10, imagenet1k)")
    p.add_argument("--classnames", default=None, metavar="SET",
                   help="standard class-name set for every --zeroshot dataset (e.g. cifar10, imagenet1k)")
    p.add_argument("--templates", default=None, metavar="SET",
                   help="standard template set for every --zeroshot dataset (default: the --classnames set's, else "
                        "the dataset's own, else CLIP's 80 ImageNet templates)")
    p.add_argument("--pretrained", default=None,
                   help="the \"pretrained\" field of the CLIP_benchmark results (default: the model id as given)")
    p.add_argument("--zeroshot", metavar="DATASET", nargs="+", action="extend", default=[],
                   help="class-folder datasets (labels + classnames) for zero-shot top-1/top-5")
    p.add_argument("--retrieval", metavar="DATASET", nargs="+", action="extend", default=[],
                   help="caption datasets (captions grouped by image_id) for recall@1/5/10 both ways")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for results.json + results.md + clip_benchmark/*.json (CLIP_benchmark's schema)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs (auto: cuda when available)")
    p.add_argument("--faiss", choices=("auto", "cpu", "gpu"), default="auto",
                   help="faiss index for retrieval (auto: GPU index when faiss and torch see a GPU)")
    p.set_defaults(func=_cmd_eval)

    s = subparsers.add_parser(
        "stable-eval", help="StableEval subset from results of runs that differ only in the seed",
        description="Reads results.json files written by `aced eval` (one per seed) and prints, per evaluation, "
                    "the std across seeds, the std of the running average and whether it is kept (Appendix A).")
    s.add_argument("results", metavar="RESULTS.json", nargs="+", type=Path)
    s.add_argument("--json", action="store_true", help="print the table as JSON instead of text")
    s.set_defaults(func=_cmd_stable_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluate import (evaluate, format_markdown, load_suite, suite_evals, write_clip_benchmark,
                                   write_results)
    from pipeline.models import load_model, resolve_device
    from storage.shards import ShardError, load_dataset
    from storage.workspace import Workspace

    if args.model == "compare":
        return _cmd_compare(args)
    if args.results:
        raise SystemExit(f"aced eval: unexpected argument(s) {[str(r) for r in args.results]} (one MODEL_DIR; "
                         f"`aced eval compare RESULTS...` compares results)")
    ws = Workspace(args.root)

    if not args.zeroshot and not args.retrieval and args.suite is None:
        raise SystemExit("aced eval: give --suite FILE or at least one --zeroshot or --retrieval dataset")
    if args.batch_size < 1:
        raise SystemExit(f"aced eval: --batch-size must be >= 1, got {args.batch_size}")
    options = {k: v for k, v in (("classnames", args.classnames), ("templates", args.templates)) if v is not None}
    if options and not args.zeroshot:
        raise SystemExit("aced eval: --classnames/--templates apply to --zeroshot datasets (a suite names its own)")
    evals: dict[str, tuple] = {}
    if args.suite is not None:
        try:
            evals.update(suite_evals(load_suite(args.suite), ws.resolve_dataset))
        except (ValueError, ShardError, FileNotFoundError) as e:
            raise SystemExit(f"aced eval: {e}") from None
    for kind, names in (("zeroshot", args.zeroshot), ("retrieval", args.retrieval)):
        for name in names:
            path = ws.resolve_dataset(name)
            try:
                label = load_dataset(path).name
            except ShardError as e:
                raise SystemExit(f"aced eval: {e}") from None
            if label in evals:
                label = f"{label} ({kind})"
            if label in evals:
                raise SystemExit(f"aced eval: dataset {name!r} given twice")
            evals[label] = (kind, path, options) if kind == "zeroshot" and options else (kind, path)

    device = resolve_device(args.device)
    model_dir = ws.resolve_model(args.model)
    bundle = load_model(model_dir)
    bundle.model.to(device)
    log.info("eval: model %s from %s on %s", bundle.name, model_dir, device)

    try:
        results = evaluate(bundle, evals, batch_size=args.batch_size, faiss_device=args.faiss)
    except ValueError as e:  # a class-name set that does not fit a dataset, a bad sample: one line
        raise SystemExit(f"aced eval: {e}") from None
    results["model_dir"] = str(model_dir)
    results["pretrained"] = args.pretrained or str(args.model)
    print(format_markdown(results))
    if args.out is not None:
        json_path, md_path = write_results(results, args.out)
        bench = write_clip_benchmark(results, args.out / "clip_benchmark", model=bundle.name,
                                     pretrained=results["pretrained"])
        print(f"wrote {json_path}, {md_path} and {len(bench)} CLIP_benchmark result(s) in {args.out / 'clip_benchmark'}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.evaluate import compare_markdown, load_comparable

    if not args.results:
        raise SystemExit("aced eval compare: give result files or folders (results.json, CLIP_benchmark JSON)")
    try:
        print(compare_markdown(load_comparable(args.results)), end="")
    except ValueError as e:
        raise SystemExit(f"aced eval compare: {e}") from None
    return 0


def _cmd_stable_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluate import collect_seeds, stable_eval_table

    loaded = []
    for path in args.results:
        try:
            loaded.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"aced stable-eval: cannot read {path}: {e}") from None
    try:
        per_seed = collect_seeds(loaded, [str(p) for p in args.results])
        rows = stable_eval_table(per_seed)
    except ValueError as e:
        raise SystemExit(f"aced stable-eval: {e}") from None
    if args.json:
        print(json.dumps({"seeds": len(loaded), "table": rows,
                          "kept": [r["name"] for r in rows if r["kept"]]}, indent=2))
        return 0
    # Metrics are fractions; print percentage points as the paper does (0.15% for Country211).
    width = max(len(r["name"]) for r in rows)
    print(f"StableEval over {len(loaded)} seeds (std in percentage points)")
    print(f"{'eval':<{width}}  {'std':>8}  {'avg std':>8}  kept")
    for r in rows:
        print(f"{r['name']:<{width}}  {100 * r['std']:8.3f}  {100 * r['avg_std']:8.3f}  {'yes' if r['kept'] else 'no'}")
    kept = [r["name"] for r in rows if r["kept"]]
    print(f"kept {len(kept)} of {len(rows)}: {', '.join(kept)}")
    return 0
