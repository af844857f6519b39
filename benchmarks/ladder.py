"""Reference vs smaller model on real data (issue 3's check): the same recipe, two ladder sizes.

Both models train IID with the `reference` recipe on the Flickr8k train split (human captions, i.e.
clean), then are evaluated on Flickr8k test retrieval (mean of the six recalls) and CIFAR-10 zero-shot.
Resumable (runs resume from checkpoints; finished evaluations are kept), so the models can train in
parallel processes (one torch thread each) and a last call with all of them writes the report:
    python benchmarks/ladder.py --root /tmp/aced-ladder --steps 1000 --models aced-vit-s &
    python benchmarks/ladder.py --root /tmp/aced-ladder --steps 1000 --models aced-vit-t; wait
    python benchmarks/ladder.py --root /tmp/aced-ladder --steps 1000
"""
from __future__ import annotations

import _common  # noqa: F401  (puts the repo on sys.path; must come first)

import argparse
import json
import time
from pathlib import Path

from _common import machine, machine_name, write_report

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("aced-bench-ladder"))
    p.add_argument("--data", type=Path, default=SHARED / "flickr8k")
    p.add_argument("--models", nargs="+", default=["aced-vit-s", "aced-vit-t"])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    p.add_argument("--note", default="", help="a sentence added to the report (e.g. how the runs were trained)")
    p.add_argument("--tag", default="", help="suffix of the run folders and of the report name, to keep variants apart")
    args = p.parse_args()

    from pipeline.evaluate import evaluate, write_results
    from pipeline.models import count_flops, load_model
    from pipeline.recipes import recipe
    from pipeline.report import summary_metrics
    from pipeline.trainer import train
    from pipeline.workspace import eval_specs, prepare_real

    root = args.root.resolve()
    sets = prepare_real(root, args.data)
    evals = eval_specs(sets)
    rows = {}
    for model in args.models:
        run_dir = root / "runs" / f"{model}{args.tag}"
        extra = {} if args.lr is None else {"lr": args.lr}
        cfg = recipe("reference", model=model, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                     train_data=tuple(sets["clean"]), checkpoint_every=max(1, args.steps // 5), **extra)
        t0 = time.perf_counter()
        result = train(cfg, run_dir, progress=False)
        train_s = time.perf_counter() - t0
        res_file = run_dir / "eval" / "results.json"
        if res_file.exists():
            res = json.loads(res_file.read_text())
        else:
            bundle = load_model(result.model_dir)
            res = evaluate(bundle, {k: tuple(v) for k, v in evals.items()})
            if train_s < 60:  # trained elsewhere (e.g. `aced train --nproc 2`): the trainer's own step times
                from pipeline.report import read_metrics
                train_s = float(sum(read_metrics(run_dir).column("step_s").to_pylist()))
            res["train_seconds"] = train_s
            write_results(res, run_dir / "eval")
        flops = count_flops(load_model(result.model_dir))
        rows[model] = {**summary_metrics(res), "lr": cfg.lr, "params": flops["params"], "gflops_pair": flops["gflops_pair"],
                       "train_seconds": res.get("train_seconds")}
        print(model, json.dumps(rows[model]), flush=True)

    keys = sorted({k for r in rows.values() for k in r})
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for model, r in rows.items():
        lines.append(f"| {model} | " + " | ".join(
            f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")
    md = (f"# Reference vs smaller model on Flickr8k ({machine_name()})\n\n"
          f"Recipe `reference` (IID, sigmoid loss, b={args.batch_size}, {args.steps} steps, seed {args.seed}, "
          f"peak lr {cfg.lr:g}, cosine) on "
          "flickr8k/train (30,000 pairs); retrieval on flickr8k/test (1,000 images, 5,000 captions; chance R@1 = 0.1%), "
          "zero-shot on CIFAR-10 test (chance 10%). Metric values are fractions.\n\n"
          + (args.note + "\n\n" if args.note else "") + "\n".join(lines) + "\n")
    write_report(f"ladder{args.tag}", {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "rows": rows}, md)


if __name__ == "__main__":
    main()
