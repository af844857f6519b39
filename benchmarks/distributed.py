"""Benchmark: data-parallel training (torchrun ranks) against one process, on this machine's cores.

The same H-ACID run (aced-vit-t student, b=64, f=0.8, B=320, reference cache of a random aced-vit-t)
is trained through `aced train` as
    1 process x 1 torch thread, 1 process x W threads, W ranks x 1 thread (`--nproc W`, gloo),
interleaved over `--repeats` rounds in a rotating order so load changes hit every layout alike.
Per layout: the median trainer step time (metrics `step_s`, first `--discard` steps dropped), pairs
per second (b / step), and the wall time of the whole command (process, torchrun and worker start-up
included). Ratios are taken against 1 x 1 within each round.

Run:  .venv/bin/python benchmarks/distributed.py            (writes benchmarks/results/distributed.{json,md})
      .venv/bin/python benchmarks/distributed.py --steps 6 --discard 2 --repeats 1 --name /tmp/x/distributed
"""
from __future__ import annotations

import _common  # noqa: F401  (puts the repo on sys.path; must come first)

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, fmt_range, machine_name, markdown_table, summarise, write_report


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=None, help="workspace (default: a temporary folder)")
    p.add_argument("--pairs", type=int, default=3200)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--discard", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--world", type=int, default=os.cpu_count() or 2, help="ranks / threads (default: the cores)")
    p.add_argument("--method", default="h-acid")
    p.add_argument("--name", default="distributed", help="report name, or a path for a scratch report")
    return p.parse_args()


def prepare(root: Path, pairs: int) -> None:
    from pipeline.models import create_model, save_model
    from pipeline.ray_embed import embed_shards_plain, plan_cache
    from pipeline.synthetic import generate_pairs
    from storage.shards import write_shards

    data = root / "datasets" / "synth"
    if not (data / "_dataset.json").exists():
        write_shards(generate_pairs(pairs, seed=0, noise_frac=0.5), data, name="synth", source="synthetic",
                     samples_per_shard=400)
    if not (root / "models" / "reference").exists():
        save_model(create_model("aced-vit-t", seed=1), root / "models" / "reference")
    embed_shards_plain(plan_cache(root, ["synth"], ["reference"]), chunk_size=256, torch_threads=1)


def run_layout(root: Path, run: str, args, *, nproc: int, threads: int) -> dict:
    from pipeline.report import read_metrics

    cmd = [sys.executable, "-m", "flows.cli", "--root", str(root), "train", run, "--data", "synth",
           "--method", args.method, "--reference", "reference", "--steps", str(args.steps), "--batch-size", "64",
           "--set", f"checkpoint_every={args.steps}", "--set", "num_workers=1", "--nproc", str(nproc)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    steps = read_metrics(root / "runs" / run).to_pydict()["step_s"][args.discard:]
    return {"step_s": statistics.median(steps), "wall_s": wall}


def main() -> None:
    args = parse()
    tmp = None
    root = args.root
    if root is None:
        tmp = Path(tempfile.mkdtemp(prefix="aced-bench-dist-"))
        root = tmp
    try:
        prepare(root, args.pairs)
        w = args.world
        layouts = [("1 process x 1 thread", 1, 1), (f"1 process x {w} threads", 1, w),
                   (f"{w} ranks x 1 thread (--nproc {w})", w, 1)]
        results: dict[str, list[dict]] = {name: [] for name, _, _ in layouts}
        for r in range(args.repeats):
            order = layouts[r % len(layouts):] + layouts[:r % len(layouts)]
            for name, nproc, threads in order:
                run = f"r{r}-p{nproc}-t{threads}"
                shutil.rmtree(root / "runs" / run, ignore_errors=True)
                results[name].append(run_layout(root, run, args, nproc=nproc, threads=threads))
                print(name, results[name][-1], flush=True)
        base = layouts[0][0]
        rows, table = [], []
        for name, nproc, threads in layouts:
            step = summarise([x["step_s"] for x in results[name]])
            wall = summarise([x["wall_s"] for x in results[name]])
            speedup = summarise([b["step_s"] / x["step_s"] for b, x in zip(results[base], results[name])])
            rows.append({"layout": name, "nproc": nproc, "threads": threads, "step_s": step, "wall_s": wall,
                         "speedup_vs_1x1": speedup, "pairs_per_s": 64 / step["median"]})
            table.append({"layout": name, "step": fmt_range(step, 3), "pairs": f"{64 / step['median']:.1f}",
                          "speedup": fmt_range(speedup, 2), "wall": fmt_range(wall, 1)})
        md = (f"# Data-parallel training vs one process ({machine_name()})\n\n"
              f"{args.method}, aced-vit-t student, b=64, f=0.8 (B=320), {args.steps} steps ({args.discard} dropped), "
              f"{args.repeats} interleaved rounds; median [min-max].\n\n"
              + markdown_table([("layout", "layout"), ("step", "s / step"), ("pairs", "pairs / s"),
                                ("speedup", "step speed-up vs 1x1"), ("wall", "command wall s")], table) + "\n")
        name = Path(args.name)
        out = name.parent if name.parent != Path(".") else None
        kwargs = {"out": out} if out else {}
        write_report(name.name, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, md, **kwargs)
        print(md)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
