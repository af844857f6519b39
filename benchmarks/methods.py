"""The methods table (SPEC.md "Methods"; paper Table 1 / Fig. 6) on built-in noisy synthetic data.

A reference and a teacher are trained IID on clean pairs and cached once; then every method trains
the same tiny student for the same number of steps on noisy pairs, for several seeds, and is
evaluated on held-out data (retrieval on unseen pairs, zero-shot on an unseen class set). Reported:
mean +/- std over seeds of each evaluation, and the noisy fraction of the batches each method trained
on vs that of the super-batches they were drawn from.

With `--data DIR` (real images + captions with split lists, e.g. ../shared/data/flickr8k) it runs the
real-data study instead (benchmarks/real_study.py: injected caption noise, step- and compute-matched
tables, the reference strength curve, dev-split diagnostics).

Resumable: finished runs (eval results present) are skipped, unfinished ones resume from checkpoints,
so the benchmark can run in the background across interruptions:
    python benchmarks/methods.py --root /tmp/aced-methods --seeds 0 1 2
"""
from __future__ import annotations

import _common  # noqa: F401  (puts the repo on sys.path; must come first)

import argparse
import json
import statistics
import time
from pathlib import Path

import real_study
from _common import RESULTS, machine, machine_name, write_report

# Defaults that differ between the synthetic table and the real-data study (--data).
DEFAULTS = {"synthetic": dict(methods=["iid", "softmax-kd", "i-acid", "h-acid", "aced-acidistill"], steps=300,
                              batch_size=32, reference_model="aced-vit-s", teacher_model="aced-vit-s",
                              reference_steps=500, name="methods"),
            "real": dict(methods=list(real_study.METHODS), steps=600, batch_size=64, reference_model="aced-vit-t",
                         teacher_model="reference", reference_steps=1200, name="methods-real")}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("aced-bench-methods"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--filter-ratio", type=float, default=0.8)
    p.add_argument("--student-model", default="aced-vit-t")
    p.add_argument("--reference-model", default=None)
    p.add_argument("--teacher-model", default=None,
                   help="teacher architecture, or 'reference' to distill from the reference model itself "
                        "(the real-data study always distills from its 1x reference)")
    p.add_argument("--reference-steps", type=int, default=None)
    p.add_argument("--train-pairs", type=int, default=8000)
    p.add_argument("--clean-pairs", type=int, default=8000)
    p.add_argument("--test-pairs", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--noise-frac", type=float, default=0.5)
    p.add_argument("--name", default=None, help="results file stem in --results")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the results JSON + Markdown")
    real_study.add_arguments(p)
    args = p.parse_args()
    for k, v in DEFAULTS["real" if args.data else "synthetic"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def train_and_eval(cfg, run_dir: Path, evals: dict, eval_dir: str = "eval") -> dict:
    """Train (or resume) the run, evaluate its model on `evals` into `run_dir/eval_dir`; a finished run is
    only evaluated, so one run can be scored on another split (e.g. dev) without training it again."""
    from pipeline.evaluate import evaluate, write_results
    from pipeline.models import load_model
    from pipeline.trainer import train

    res_file = run_dir / eval_dir / "results.json"
    if res_file.exists():
        return json.loads(res_file.read_text())
    t0 = time.perf_counter()
    result = train(cfg, run_dir, progress=False)
    seconds = time.perf_counter() - t0
    first = run_dir / "eval" / "results.json"  # the training time is the first evaluation's to record
    if eval_dir != "eval" and first.exists():
        seconds = json.loads(first.read_text()).get("train_seconds", seconds)
    results = evaluate(load_model(result.model_dir), {k: tuple(v) for k, v in evals.items()})
    results["train_seconds"] = seconds
    write_results(results, run_dir / eval_dir)
    return results


def noisy_fractions(run_dir: Path) -> dict[str, float]:
    from pipeline.report import read_metrics

    m = read_metrics(run_dir).to_pydict()

    def mean(key: str) -> float | None:  # None where the data's noise is unknown (null per step)
        vals = [v for v in m.get(key, []) if v is not None]
        return statistics.fmean(vals) if vals else None

    return {"noisy_frac_trained": mean("noisy_frac_selected"), "noisy_frac_superbatch": mean("noisy_frac_superbatch")}


def main() -> None:
    args = parse()
    if args.data:
        real_study.run_study(args)
        return
    from pipeline.ray_embed import embed_shards_plain, plan_cache
    from pipeline.recipes import recipe
    from pipeline.report import summary_metrics
    from pipeline.trainer import export_model
    from pipeline.workspace import eval_specs, prepare_synthetic

    root = args.root.resolve()
    sets = prepare_synthetic(root, train_pairs=args.train_pairs, clean_pairs=args.clean_pairs,
                             test_pairs=args.test_pairs, per_class=args.per_class, noise_frac=args.noise_frac, seed=1000)
    evals = eval_specs(sets)
    rows: dict[str, dict] = {}

    # Reference and teacher: larger models, IID on clean pairs (the paper trains its own).
    roles = [("reference", args.reference_model, 100)]
    if args.teacher_model != "reference":
        roles.append(("teacher", args.teacher_model, 200))
    teacher_id = "teacher" if args.teacher_model != "reference" else "reference"
    for role, model, seed in roles:
        cfg = recipe("reference", model=model, steps=args.reference_steps, batch_size=64, seed=seed,
                     train_data=tuple(sets["clean"]), checkpoint_every=max(1, args.reference_steps // 4))
        res = train_and_eval(cfg, root / "runs" / role, evals)
        if not (root / "models" / role).exists():
            export_model(root / "runs" / role, root / "models" / role)
        rows[role] = {"seeds": {"-": summary_metrics(res)}}
        print(role, json.dumps(summary_metrics(res)), flush=True)
    embed_shards_plain(plan_cache(root, [Path(d).relative_to(root / "datasets").as_posix() for d in sets["student"]],
                                  sorted({"reference", teacher_id})), chunk_size=256)

    for seed in args.seeds:
        for method in args.methods:
            cfg = recipe("student", method=method, model=args.student_model, steps=args.steps,
                         batch_size=args.batch_size, filter_ratio=args.filter_ratio, seed=seed,
                         train_data=tuple(sets["student"]), cache_root=str(root / "cache"),
                         reference="reference", teacher=(teacher_id,), checkpoint_every=max(1, args.steps // 3),
                         n_chunks=min(16, args.batch_size // 2))
            run_dir = root / "runs" / f"{method}-seed{seed}"
            res = train_and_eval(cfg, run_dir, evals)
            metrics = {**summary_metrics(res), **noisy_fractions(run_dir), "train_seconds": res.get("train_seconds")}
            rows.setdefault(method, {"seeds": {}})["seeds"][str(seed)] = metrics
            print(method, seed, json.dumps(metrics), flush=True)
            report(args, rows)
    report(args, rows)


def report(args: argparse.Namespace, rows: dict[str, dict]) -> None:
    keys = sorted({k for r in rows.values() for s in r["seeds"].values() for k in s if k != "train_seconds"})
    lines = ["| method | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for method, row in rows.items():
        per = row["seeds"].values()
        cells = []
        for k in keys:
            vals = [s[k] for s in per if s.get(k) is not None]
            if not vals:
                cells.append("")
                continue
            mean = statistics.fmean(vals)
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row.setdefault("mean", {})[k] = mean
            row.setdefault("std", {})[k] = std
            cells.append(f"{100 * mean:.2f} ± {100 * std:.2f}")
        lines.append(f"| {method} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    md = (f"# Methods on noisy synthetic data ({machine_name()})\n\n"
          f"Student {args.student_model}, {args.steps} steps, b={args.batch_size}, f={args.filter_ratio}; "
          f"reference {args.reference_model} / teacher {args.teacher_model} ({args.reference_steps} steps on clean pairs); "
          f"{args.noise_frac:.0%} of training captions mismatched. Values in % (mean ± std over seeds, held-out data; "
          "retrieval: mean of R@1/5/10 both ways and R@1; zero-shot: top-1).\n\n" + "\n".join(lines) + "\n")
    write_report(args.name, {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                             "machine": machine(), "rows": rows}, md, out=args.results)


if __name__ == "__main__":
    main()
