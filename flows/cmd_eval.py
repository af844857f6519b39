"""`aced eval` and `aced stable-eval`: evaluate a saved model; pick the StableEval subset from seeds.

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
        "eval", help="zero-shot classification and image-text retrieval of a saved model",
        description="Evaluate MODEL_DIR (a folder written by save_model, or a model id under <root>/models). "
                    "DATASET arguments are pair-shard folders, or dataset names under <root>/datasets.")
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("--zeroshot", metavar="DATASET", nargs="+", action="extend", default=[],
                   help="class-folder datasets (labels + classnames) for zero-shot top-1/top-5")
    p.add_argument("--retrieval", metavar="DATASET", nargs="+", action="extend", default=[],
                   help="caption datasets (captions grouped by image_id) for recall@1/5/10 both ways")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json + results.md")
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
    from pipeline.evaluate import evaluate, format_markdown, write_results
    from pipeline.models import load_model, resolve_device
    from storage.shards import ShardError, load_dataset
    from storage.workspace import Workspace

    ws = Workspace(args.root)

    if not args.zeroshot and not args.retrieval:
        raise SystemExit("aced eval: give at least one --zeroshot or --retrieval dataset")
    if args.batch_size < 1:
        raise SystemExit(f"aced eval: --batch-size must be >= 1, got {args.batch_size}")
    evals: dict[str, tuple[str, Path]] = {}
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
            evals[label] = (kind, path)

    device = resolve_device(args.device)
    model_dir = ws.resolve_model(args.model)
    bundle = load_model(model_dir)
    bundle.model.to(device)
    log.info("eval: model %s from %s on %s", bundle.name, model_dir, device)

    results = evaluate(bundle, evals, batch_size=args.batch_size, faiss_device=args.faiss)
    results["model_dir"] = str(model_dir)
    print(format_markdown(results))
    if args.out is not None:
        json_path, md_path = write_results(results, args.out)
        print(f"wrote {json_path} and {md_path}")
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
