"""Reference vs smaller model on real data (issue 3's check): the same recipe, two ladder sizes.

Both models train IID with the `reference` recipe on the Flickr8k train split (human captions, i.e.
clean), then are evaluated on Flickr8k test retrieval (mean of the six recalls) and CIFAR-10 zero-shot.
Resumable (runs resume from checkpoints; finished evaluations are kept), so the models can train in
parallel processes (one torch thread each) and a last call with all of them writes the report:
    python benchmarks/ladder.py --root /tmp/aced-ladder --models aced-vit-s128 --seeds 0 1 &
    python benchmarks/ladder.py --root /tmp/aced-ladder --models aced-vit-t --seeds 0 1; wait
    python benchmarks/ladder.py --root /tmp/aced-ladder --seeds 0 1
"""
from __future__ import annotations

import _common  # noqa: F401  (puts the repo on sys.path; must come first)

import argparse
import json
from pathlib import Path

from _common import machine, machine_name, write_report

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


METRICS = ("test-retrieval:mean_recall", "test-retrieval:i2t_r1", "test-retrieval:t2i_r1", "cifar10-zeroshot:top1")


def run_dir_name(model: str, tag: str, seed: int) -> str:
    """runs/<model><tag> for seed 0 (the folders of earlier single-seed reports), <model><tag>-s<seed> else."""
    return f"{model}{tag}" + (f"-s{seed}" if seed else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("aced-bench-ladder"))
    p.add_argument("--data", type=Path, default=SHARED / "flickr8k")
    p.add_argument("--models", nargs="+", default=["aced-vit-s128", "aced-vit-t"])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; the table gives mean +/- std")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    p.add_argument("--note", default="", help="a sentence added to the report (e.g. how the runs were trained)")
    p.add_argument("--tag", default="", help="suffix of the run folders and of the report name, to keep variants apart")
    p.add_argument("--report", default=None, help="report name in benchmarks/results (default: ladder<tag>)")
    args = p.parse_args()

    import numpy as np

    from pipeline.evaluate import evaluate, write_results
    from pipeline.models import count_flops, load_model
    from pipeline.recipes import recipe
    from pipeline.report import read_metrics, summary_metrics
    from pipeline.trainer import train
    from pipeline.workspace import eval_specs, prepare_real

    root = args.root.resolve()
    sets = prepare_real(root, args.data)
    evals = eval_specs(sets)
    runs: dict[str, dict[int, dict]] = {}
    info: dict[str, dict] = {}
    for model in args.models:
        for seed in args.seeds:
            run_dir = root / "runs" / run_dir_name(model, args.tag, seed)
            extra = {} if args.lr is None else {"lr": args.lr}
            cfg = recipe("reference", model=model, steps=args.steps, batch_size=args.batch_size, seed=seed,
                         train_data=tuple(sets["clean"]), checkpoint_every=max(1, args.steps // 5), **extra)
            result = train(cfg, run_dir, progress=False)
            res_file = run_dir / "eval" / "results.json"
            if res_file.exists():
                res = json.loads(res_file.read_text())
            else:
                res = evaluate(load_model(result.model_dir), {k: tuple(v) for k, v in evals.items()})
                # the trainer's own step times: right whether the run trained here, resumed, or ran elsewhere
                # (e.g. `aced train --nproc 2`)
                res["train_seconds"] = float(sum(read_metrics(run_dir).column("step_s").to_pylist()))
                write_results(res, run_dir / "eval")
            runs.setdefault(model, {})[seed] = {**summary_metrics(res), "train_seconds": res.get("train_seconds")}
            print(model, seed, json.dumps(runs[model][seed]), flush=True)
        flops = count_flops(load_model(result.model_dir))
        info[model] = {"lr": cfg.lr, "params": flops["params"], "gflops_pair": flops["gflops_pair"]}

    rows = {}
    for model, by_seed in runs.items():
        rows[model] = dict(info[model])
        for key in (*METRICS, "train_seconds"):
            vals = np.array([r[key] for r in by_seed.values() if r.get(key) is not None], dtype=float)
            rows[model][key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                                "per_seed": {str(s): r.get(key) for s, r in by_seed.items()}}

    def pct(v: dict) -> str:
        per = " / ".join(f"{100 * x:.2f}" for x in v["per_seed"].values())
        return f"{100 * v['mean']:.2f} +/- {100 * v['std']:.2f} ({per})" if len(v["per_seed"]) > 1 else f"{100 * v['mean']:.2f}"

    head = ["model", "params", "GFLOPs/pair", *[f"{k} %" for k in METRICS], "train s/run"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for model, r in rows.items():
        lines.append(f"| {model} | {r['params']:,} | {r['gflops_pair']:.3f} | "
                     + " | ".join(pct(r[k]) for k in METRICS) + f" | {r['train_seconds']['mean']:.0f} |")
    seeds = ", ".join(map(str, args.seeds))
    md = (f"# Reference vs smaller model on Flickr8k ({machine_name()})\n\n"
          f"Recipe `reference` (IID, sigmoid loss, b={args.batch_size}, {args.steps} steps, peak lr {cfg.lr:g}, cosine) "
          f"on flickr8k/train (30,000 pairs), seeds {seeds}; retrieval on flickr8k/test (1,000 images, 5,000 captions; "
          "chance mean recall 0.5%), zero-shot on CIFAR-10 test (chance 10%). Percent, mean +/- std over seeds "
          "(per seed in brackets).\n\n"
          + (args.note + "\n\n" if args.note else "") + "\n".join(lines) + "\n")
    write_report(args.report or f"ladder{args.tag}", {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(),
                                       "rows": rows}, md)


if __name__ == "__main__":
    main()
