"""Benchmark: the cost of an ACID (H-ACID) step relative to an IID step of the same student (SPEC.md
"Cost model", paper Appendix J), with the scoring forward in float32 and in bfloat16, and how much bf16
scoring changes the embeddings and the selected sub-batches.

The paper counts FLOPs: an IID step is 3 (F_I + F_T) per b pairs (forward + backward), and scoring the
super-batch adds 4 (F_I + F_T) at f = 0.8, hence 7/3 of IID (counting a full forward over all B = 5b
candidates, as this trainer does, it is 8/3). Issue 10's targets: ratio <= 2.0 at full scoring
resolution, <= 1.5 with 32 px scoring.

1. Trainer runs. The real trainer (`pipeline.trainer.train`) runs IID and H-ACID (n = 16 chunks) at
   b = 64 (B = 320) on synthetic pairs, H-ACID at full resolution and at each `--score-resolutions`,
   each with every `--score-dtypes` (TrainConfig.score_dtype). The per-step timings the trainer records
   in its metrics Parquet are read back (`pipeline.report.read_metrics`):

       data_wait_s  waiting for the DataLoader worker (decode B pairs, tokenise, cached rows)
       score_s      score_superbatch: the student's no-grad forward over the super-batch (ACID only)
       select_s     select_subbatch: self scores + n-1 conditional-score calls + Gumbel top-k (ACID only)
       train_s      cutting the sub-batch, selection metrics/records, train_step (forward + backward + AdamW)
       step_s       their sum

   Runs are interleaved in a rotating order, `--repeats` times, so a change in the machine's load hits
   every configuration alike; the ratio is taken within each repeat (median ACID step / median IID step)
   and its median and range over repeats are reported, beside step_s / own train_s per step (the same
   train_step on b pairs that an IID step runs, seconds apart: load changes cancel). The first
   `--discard` steps of every run are dropped. The load average is recorded before every run.

2. Anatomy, in this process (interleaved, after a warm-up round): `score_superbatch` at 64 px and at the
   lower resolutions, fp32 and bf16, chunked as the trainer does on the CPU, beside the previous scoring
   path (bf16 by autocast, captions at the batch's longest); the levers one at a time: each tower alone
   in fp32, under bf16 autocast and as the bf16 copy (`scoring_model`), larger image chunks, captions at
   the batch's length vs grouped by length (`encode_text_by_length`), and with `--compile` the image
   tower under torch.compile (compile time reported); the data work for B and for b pairs
   (`SuperBatches[step]`); and one IID `train_step` (on a hand-built `Run`) as the unit.

3. bf16 against fp32 scoring on the same super-batches (synthetic pairs, with the reference cache):
   for a freshly initialised student and one trained IID for `--agree-train-steps` steps, at full
   resolution and at each lower resolution, the max and mean absolute difference of the L2-normalised
   embeddings, and, with the same selection noise (`select_subbatch` seeds it from (seed, step)), the
   fraction of steps whose selected index set is identical and the mean overlap |S_bf16 & S_fp32| / b;
   for the trainer's bf16 path (the bf16 copy) and for the previous one (autocast), side by side.

Needs a reference cache: a randomly initialised aced-vit-s (seed 1) saved as <root>/models/reference and
cached over the training pairs with `pipeline.ray_embed.embed_shards_plain` (its quality does not matter
for timing; for the agreement it gives the reference half of the learnability scores).

Run:  .venv/bin/python benchmarks/step_cost.py [--compile]   (writes benchmarks/results/step_cost.{json,md}; ~12-15 min
      on the quiet shared 2 cores, an hour and more at load 10)
      .venv/bin/python benchmarks/step_cost.py --steps 4 --discard 1 --repeats 1 --whatif-repeats 1 \
          --agree-steps 2 --agree-train-steps 2 --pairs 400 --name /tmp/x/step_cost   (quick, ~2 min)
"""
from __future__ import annotations

import _common  # noqa: F401  (puts the repo on sys.path; must come first)

import argparse
import os
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

from _common import fmt_range, hand_run, machine_name, markdown_table, summarise, write_report

COMPONENTS = ("data_wait_s", "score_s", "select_s", "train_s")
LABELS = {"data_wait_s": "data wait", "score_s": "scoring forward", "select_s": "selection",
          "train_s": "train step"}
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
TARGETS = {"full": 2.0, "low": 1.5}  # issue 10: full scoring resolution, 32 px scoring
BF16_PATHS = ("bf16 copy (trainer)", "autocast (previous)")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=None,
                   help="workspace to build/reuse (default: a temporary folder, removed at the end)")
    p.add_argument("--pairs", type=int, default=2000, help="synthetic training pairs")
    p.add_argument("--steps", type=int, default=10, help="steps per run (the first --discard are dropped)")
    p.add_argument("--discard", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--filter-ratio", type=float, default=0.8)
    p.add_argument("--chunks", type=int, default=16, help="n_chunks of H-ACID")
    p.add_argument("--score-resolutions", type=int, nargs="*", default=[32],
                   help="TrainConfig.score_resolution values run besides full resolution")
    p.add_argument("--score-dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(SHORT),
                   help="TrainConfig.score_dtype values of the H-ACID runs")
    p.add_argument("--whatif-resolutions", type=int, nargs="*", default=[48, 32],
                   help="image sizes of the anatomy's scoring rows (besides the model's own)")
    p.add_argument("--whatif-repeats", type=int, default=4)
    p.add_argument("--compile", action="store_true",
                   help="also time the bf16 image tower under torch.compile (its compile time is reported)")
    p.add_argument("--agree-steps", type=int, default=12, help="super-batches compared for bf16 vs fp32 scoring")
    p.add_argument("--agree-train-steps", type=int, default=40,
                   help="IID steps of the trained student of the agreement section (0 = init student only)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the training process (DataLoader workers always use 1)")
    p.add_argument("--num-workers", type=int, default=1, help="TrainConfig.num_workers")
    p.add_argument("--name", default="step_cost",
                   help="results file stem in benchmarks/results/, or a path ending in the stem")
    return p.parse_args(argv)


def superbatch_size(args: argparse.Namespace) -> int:
    return int(round(args.batch_size / (1 - args.filter_ratio)))


def load() -> list[float]:
    """The 1/5/15-minute load averages: other engineers share these 2 cores."""
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------
# workspace


def prepare(root: Path, args: argparse.Namespace) -> list[str]:
    """Synthetic pairs (the training set only matters), a reference model and its cache."""
    from pipeline.models import create_model, save_model
    from pipeline.ray_embed import embed_shards_plain, plan_cache
    from pipeline.workspace import prepare_synthetic

    sets = prepare_synthetic(root, train_pairs=args.pairs, clean_pairs=64, test_pairs=64, per_class=1,
                             noise_frac=0.5, seed=2024)
    ref_dir = root / "models" / "reference"
    if not ref_dir.exists():
        save_model(create_model("aced-vit-s", seed=1), ref_dir)
    dataset = Path(sets["student"][0]).relative_to(root / "datasets").as_posix()
    t0 = time.perf_counter()
    res = embed_shards_plain(plan_cache(root, [dataset], ["reference"]), chunk_size=256, torch_threads=args.threads)
    print(f"reference cache: {res.to_dict().get('pairs', '?')} pairs in {time.perf_counter() - t0:.1f} s", flush=True)
    return sets["student"]


def base_fields(args: argparse.Namespace, root: Path, train_data: list[str]) -> dict:
    return dict(model="aced-vit-t", steps=args.steps, batch_size=args.batch_size, filter_ratio=args.filter_ratio,
                seed=0, train_data=tuple(train_data), cache_root=str(root / "cache"), reference="reference",
                checkpoint_every=args.steps, num_workers=args.num_workers, n_chunks=args.chunks)


def acid_name(dtype: str, resolution: int | None) -> str:
    return f"h-acid {SHORT[dtype]}" + (f" score@{resolution}px" if resolution else "")


def configs(args: argparse.Namespace, root: Path, train_data: list[str]) -> dict[str, object]:
    from pipeline.recipes import recipe

    base = base_fields(args, root, train_data)
    out = {"iid": recipe("student", method="iid", **base)}
    for r in [None, *args.score_resolutions]:
        for dt in args.score_dtypes:
            out[acid_name(dt, r)] = recipe("student", method="h-acid", score_resolution=r, score_dtype=dt, **base)
    return out


# ---------------------------------------------------------------------------------------------
# 1. the interleaved trainer runs


def run_once(cfg, run_dir: Path, discard: int, keep_model: Path | None = None) -> dict[str, list[float]]:
    """One short training run; the kept steps' recorded timings (the exported model is moved to
    `keep_model` when given)."""
    from pipeline.report import read_metrics
    from pipeline.trainer import train

    if run_dir.exists():
        shutil.rmtree(run_dir)  # our own scratch run: a leftover would be resumed, not re-measured
    t0 = time.perf_counter()
    train(cfg, run_dir, progress=False)
    wall = time.perf_counter() - t0
    m = read_metrics(run_dir).to_pydict()
    keep = [i for i, s in enumerate(m["step"]) if s >= discard]
    out = {k: [float(m[k][i]) if m.get(k) and m[k][i] is not None else 0.0 for i in keep]
           for k in COMPONENTS + ("step_s",)}
    out["wall_s"] = [wall]
    if keep_model is not None:
        shutil.rmtree(keep_model, ignore_errors=True)
        shutil.move(str(run_dir / "model"), str(keep_model))
    shutil.rmtree(run_dir)
    return out


def run_all(args: argparse.Namespace, root: Path, cfgs: dict) -> tuple[dict, dict, list]:
    runs: dict[str, list[dict]] = {name: [] for name in cfgs}
    failed: dict[str, str] = {}
    loads: list[dict] = []
    names = list(cfgs)
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: no config always runs first
        for name in order:
            if name in failed:
                continue
            slug = name.replace(" ", "_").replace("@", "-")
            loads.append({"repeat": rep, "config": name, "loadavg": load()})
            try:
                r = run_once(cfgs[name], root / "runs" / f"{slug}-r{rep}", args.discard)
            except Exception:  # reported, not hidden: the lead fixes the trainer, this only measures it
                failed[name] = traceback.format_exc()
                print(f"{name}: FAILED\n{failed[name]}", flush=True)
                continue
            runs[name].append(r)
            print(f"repeat {rep} {name}: step {statistics.median(r['step_s']):.3f} s "
                  f"(wall {r['wall_s'][0]:.1f} s, load {loads[-1]['loadavg'][0]})", flush=True)
    return {k: v for k, v in runs.items() if v}, failed, loads


def summarise_runs(runs: dict[str, list[dict]]) -> dict[str, dict]:
    iid = runs["iid"]
    out = {}
    for name, reps in runs.items():
        pooled = {k: [x for r in reps for x in r[k]] for k in COMPONENTS + ("step_s",)}
        row = {k: summarise(v) for k, v in pooled.items()}
        row["steps_measured"] = len(pooled["step_s"])
        row["repeat_medians"] = {k: [statistics.median(r[k]) for r in reps] for k in COMPONENTS + ("step_s",)}
        # within-step ratio: the step over its own train step, the same train_step on b pairs an IID step runs
        row["step_over_own_train"] = summarise([a / t for a, t in zip(pooled["step_s"], pooled["train_s"]) if t > 0])
        # within-repeat ratio: each ACID run against the IID run of the same repeat
        ratios = [statistics.median(r["step_s"]) / statistics.median(i["step_s"]) for r, i in zip(reps, iid)]
        row["ratio_vs_iid"] = summarise(ratios)
        row["ratio_per_repeat"] = ratios
        out[name] = row
    return out


# ---------------------------------------------------------------------------------------------
# 2. anatomy: the parts of the scoring forward, by resolution and precision


def previous_scoring(bundle, sb, *, resolution: int | None, chunk: int, dtype):
    """The scoring forward before issue 10's last levers (commit 54b9694), for the side-by-side rows:
    bf16 by autocast over the float32 student, each chunk's captions at the super-batch's longest."""
    import contextlib

    import torch

    from pipeline.flexi import at_resolution
    from pipeline.trainer import embed

    model = bundle.model
    images = bundle.normalize(sb.images)
    lowres = resolution is not None and resolution != images.shape[-1]
    if lowres:
        images = torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear",
                                                 antialias=True, align_corners=False)
    precision = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    was = model.training
    model.eval()
    try:
        with torch.inference_mode(), precision, (at_resolution(model, resolution) if lowres
                                                 else contextlib.nullcontext()):
            out = [embed(model, images[i:i + chunk], sb.tokens[i:i + chunk]) for i in range(0, len(images), chunk)]
    finally:
        model.train(was)
    return torch.cat([i for i, _ in out]), torch.cat([t for _, t in out])


def whatif(args: argparse.Namespace, root: Path, train_data: list[str]) -> list[dict]:
    import torch

    from pipeline.data import PairIndex, SuperBatches
    from pipeline.models import create_model
    from pipeline.recipes import recipe
    import contextlib

    from pipeline.models import encode_text_by_length
    from pipeline.trainer import score_superbatch, scoring_model, train_step

    B, b = superbatch_size(args), args.batch_size
    student = create_model("aced-vit-t", seed=0)
    model = student.model
    # real super-batches (decoded uint8 images, tokens cut to the batch's longest caption) built by the
    # trainer's own dataset class: what the DataLoader worker does per step
    index = PairIndex(train_data)
    datasets = {n: SuperBatches(index, size=n, seed=0, window=8, preprocess=student.pixels,
                                tokenizer=student.tokenizer) for n in (B, b)}
    for d in datasets.values():
        d[0]  # opens (reads) the shards once: a worker keeps them in its LRU too
    sb = datasets[B][1]
    sub = sb.subset(torch.arange(b))
    run = hand_run(recipe("student", method="iid", **{**base_fields(args, root, train_data), "cache_root": None}),
                   student)
    full = student.image_size

    def towers(which: str, scorer, chunk: int = b, precision=None, by_length: bool = False):
        """One tower alone over the super-batch in chunks of `chunk` (b: as the trainer's CPU scoring path)."""
        def go():
            dtype = next(scorer.parameters()).dtype
            images = student.normalize(sb.images).to(dtype)
            with torch.inference_mode(), (precision() if precision else contextlib.nullcontext()):
                if which == "text" and by_length:
                    encode_text_by_length(scorer, sb.tokens, rows=chunk)
                    return
                for i in range(0, B, chunk):
                    if which == "image":
                        scorer.encode_image(images[i:i + chunk], normalize=True)
                    else:
                        scorer.encode_text(sb.tokens[i:i + chunk], normalize=True)
        return go

    bf16 = torch.bfloat16
    autocast = lambda: torch.autocast("cpu", dtype=bf16)  # noqa: E731
    copy16 = scoring_model(model, bf16)  # the trainer's bf16 scorer; refreshed below like every step
    unit_name = f"IID train_step, b={b} (the unit)"
    cases = {}
    for r in [full, *args.whatif_resolutions]:
        for dt in args.score_dtypes:
            dtype = getattr(torch, dt)
            cases[f"score_superbatch, B={B}, {r} px, {SHORT[dt]}, chunk={b}"] = (
                lambda r=r, dtype=dtype: score_superbatch(student, sb, resolution=r, chunk=b, dtype=dtype))
            if r == full or r == min(args.whatif_resolutions, default=full):
                cases[f"previous scoring (autocast, text at batch length), B={B}, {r} px, {SHORT[dt]}, chunk={b}"] = (
                    lambda r=r, dtype=dtype: previous_scoring(student, sb, resolution=r, chunk=b, dtype=dtype))
    cases.update({
        f"image tower only, B={B}, {full} px, fp32, chunks of {b}": towers("image", model),
        f"image tower only, B={B}, {full} px, bf16 autocast, chunks of {b}": towers("image", model, precision=autocast),
        f"image tower only, B={B}, {full} px, bf16 copy, chunks of {b}": towers("image", copy16),
        f"image tower only, B={B}, {full} px, bf16 copy, chunks of {2 * b}": towers("image", copy16, 2 * b),
        f"image tower only, B={B}, {full} px, bf16 copy, one chunk of {B}": towers("image", copy16, B),
        f"text tower only, B={B}, at the batch length ({sb.tokens.shape[1]} tokens), fp32, chunks of {b}":
            towers("text", model),
        f"text tower only, B={B}, grouped by length, fp32, chunks of {b}": towers("text", model, by_length=True),
        f"text tower only, B={B}, at the batch length, bf16 copy, chunks of {b}": towers("text", copy16),
        f"text tower only, B={B}, grouped by length, bf16 copy, chunks of {b}": towers("text", copy16, by_length=True),
        f"refresh of the bf16 copy (scoring_model)": lambda: scoring_model(model, bf16),
        f"data: decode + tokenise {B} pairs": lambda: datasets[B][2],
        f"data: decode + tokenise {b} pairs": lambda: datasets[b][2],
        unit_name: lambda: train_step(run, sub, None),
    })
    compile_s = None
    if args.compile:
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(copy16.encode_image, dynamic=False)
            with torch.inference_mode():
                compiled(student.normalize(sb.images[:b]).to(bf16), normalize=True)  # compiles
            compile_s = time.perf_counter() - t0
        except Exception as e:  # a lever that does not build is reported, not fatal
            compile_s = f"failed after {time.perf_counter() - t0:.0f} s: {type(e).__name__}: {str(e)[:200]}"

        def compiled_tower():
            images = student.normalize(sb.images).to(bf16)
            with torch.inference_mode():
                for i in range(0, B, b):
                    compiled(images[i:i + b], normalize=True)
        if not isinstance(compile_s, str):
            cases[f"image tower only, B={B}, {full} px, bf16 copy under torch.compile, chunks of {b}"] = compiled_tower
    times: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(args.whatif_repeats + 1):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    unit = statistics.median(times[unit_name])
    rows = [{"case": name, "seconds": summarise(ts), "in_train_steps": statistics.median(ts) / unit}
            for name, ts in times.items()]
    lengths = (sb.tokens != 0).sum(dim=1)
    rows.append({"case": "caption tokens", "mean_tokens": float(lengths.float().mean()),
                 "max_tokens": int(lengths.max()), "tokens_run": int(sb.tokens.shape[1]),
                 "tokens_run_by_length": by_length_positions(sb.tokens, b),
                 "context": int(student.context_length), "compile_s": compile_s})
    return rows


def by_length_positions(tokens, rows: int) -> float:
    """Mean positions per caption that `encode_text_by_length` runs (chunks of `rows`, multiple 1)."""
    from pipeline.models import caption_lengths

    lengths = sorted(caption_lengths(tokens).tolist())
    return sum(max(lengths[i:i + rows]) * len(lengths[i:i + rows]) for i in range(0, len(lengths), rows)) / len(lengths)


# ---------------------------------------------------------------------------------------------
# 3. bf16 vs fp32 scoring: embedding error and identical selections


def agreement(args: argparse.Namespace, root: Path, train_data: list[str]) -> list[dict]:
    import torch

    from pipeline.data import PairIndex, SuperBatches
    from pipeline.models import create_model, load_model
    from pipeline.recipes import recipe
    from pipeline.trainer import cache_specs, score_superbatch, select_subbatch

    base = base_fields(args, root, train_data)
    cfg = recipe("student", method="h-acid", **base)
    reference, _ = cache_specs(cfg)
    students = {"init (seed 0)": create_model("aced-vit-t", seed=0)}
    if args.agree_train_steps:
        trained = root / "models" / "agree-student"
        t0 = time.perf_counter()
        run_once(recipe("student", method="iid", **{**base, "steps": args.agree_train_steps,
                                                      "checkpoint_every": args.agree_train_steps}),
                 root / "runs" / "agree-student", 0, keep_model=trained)
        print(f"agreement student: {args.agree_train_steps} IID steps in {time.perf_counter() - t0:.0f} s", flush=True)
        students[f"trained ({args.agree_train_steps} IID steps)"] = load_model(trained)
    any_bundle = next(iter(students.values()))
    # super-batches the runs above did not train on (another seed's order)
    data = SuperBatches(PairIndex(cfg.train_data), size=cfg.superbatch_size, seed=cfg.seed + 7,
                        window=cfg.shuffle_window, preprocess=any_bundle.pixels, tokenizer=any_bundle.tokenizer,
                        reference=reference)
    b = cfg.batch_size
    rows = []
    acc: dict[tuple[str, int], dict[str, list]] = {}
    for step in range(args.agree_steps):
        sb = data[step]
        for sname, bundle in students.items():
            run = hand_run(cfg, bundle, reference=reference)
            for r in [bundle.image_size, *args.score_resolutions]:
                emb = {path: score_superbatch(bundle, sb, resolution=r, chunk=b, dtype=dt)
                       for path, dt in (("fp32", torch.float32), (BF16_PATHS[0], torch.bfloat16))}
                emb[BF16_PATHS[1]] = previous_scoring(bundle, sb, resolution=r, chunk=b, dtype=torch.bfloat16)
                sel = {path: select_subbatch(run, e, sb) for path, e in emb.items()}
                s32 = set(sel["fp32"].indices.tolist())
                for path in BF16_PATHS:
                    diff = torch.cat([(emb[path][i].float() - emb["fp32"][i]).abs().flatten() for i in (0, 1)])
                    s16 = set(sel[path].indices.tolist())
                    a = acc.setdefault((sname, r, path), {"max": [], "mean": [], "same": [], "overlap": [],
                                                          "score_diff": []})
                    a["max"].append(float(diff.max()))
                    a["mean"].append(float(diff.mean()))
                    a["same"].append(s32 == s16)
                    a["overlap"].append(len(s32 & s16) / b)
                    a["score_diff"].append(float((sel[path].self_scores - sel["fp32"].self_scores).abs().max()))
    for (sname, r, path), a in acc.items():
        rows.append({"student": sname, "resolution": r, "bf16_path": path, "steps": len(a["same"]),
                     "emb_max_abs_diff": max(a["max"]), "emb_mean_abs_diff": statistics.mean(a["mean"]),
                     "self_score_max_abs_diff": max(a["score_diff"]),
                     "identical_set_frac": sum(a["same"]) / len(a["same"]),
                     "mean_overlap": statistics.mean(a["overlap"]), "min_overlap": min(a["overlap"])})
    return rows


# ---------------------------------------------------------------------------------------------
# report


def verdicts(args: argparse.Namespace, summary: dict) -> list[dict]:
    """Each H-ACID configuration's median ratio against the issue's target for its resolution."""
    out = []
    for name, s in summary.items():
        if name == "iid":
            continue
        target = TARGETS["low"] if "score@" in name else TARGETS["full"]
        r = s["ratio_vs_iid"]
        out.append({"config": name, "target": target, "ratio_median": r["median"], "ratio_max": r["max"],
                    "own_median": s["step_over_own_train"]["median"],
                    "meets": r["median"] <= target and s["step_over_own_train"]["median"] <= target})
    return out


def report(args: argparse.Namespace, summary: dict, failed: dict, loads: list, whatif_rows: list[dict],
           agree_rows: list[dict], threads: int, prep_s: float, total_s: float, load_start: list, load_end: list) -> None:
    B = superbatch_size(args)
    iid_step = summary["iid"]["step_s"]["median"]
    rows = []
    for name, s in summary.items():
        rows.append({"config": name, "steps": s["steps_measured"], "step": fmt_range(s["step_s"], 3),
                     **{k: fmt_range(s[k], 3) if s[k]["max"] > 0 else "-" for k in COMPONENTS},
                     "ratio": fmt_range(s["ratio_vs_iid"], 2), "own": fmt_range(s["step_over_own_train"], 2)})
    cols = [("config", "config"), ("steps", "steps kept"), ("step", "step_s"),
            *[(k, f"{LABELS[k]} ({k})") for k in COMPONENTS], ("ratio", "step / IID step (per repeat)"),
            ("own", "step_s / own train_s (per step)")]
    units = []
    for name, s in summary.items():
        parts = {k: s[k]["median"] / iid_step for k in COMPONENTS}
        units.append({"config": name, **{k: f"{v:.2f}" for k, v in parts.items()},
                      "sum": f"{sum(parts.values()):.2f}", "ratio": f"{s['ratio_vs_iid']['median']:.2f}"})
    ucols = [("config", "config"), *[(k, LABELS[k]) for k in COMPONENTS], ("sum", "sum of medians"),
             ("ratio", "median ratio")]
    ver = verdicts(args, summary)
    vrows = [{"config": v["config"], "target": f"<= {v['target']}", "r": f"{v['ratio_median']:.2f}",
              "o": f"{v['own_median']:.2f}", "m": "yes" if v["meets"] else "no"} for v in ver]
    wrows = [{"case": r["case"], "t": fmt_range(r["seconds"], 3), "u": f"{r['in_train_steps']:.2f}"}
             for r in whatif_rows if "seconds" in r]
    tok = next(r for r in whatif_rows if "mean_tokens" in r)
    arows = [{"student": a["student"], "res": f"{a['resolution']} px", "path": a["bf16_path"], "n": a["steps"],
              "max": f"{a['emb_max_abs_diff']:.2e}", "mean": f"{a['emb_mean_abs_diff']:.2e}",
              "ss": f"{a['self_score_max_abs_diff']:.2e}", "same": f"{100 * a['identical_set_frac']:.0f}%",
              "ov": f"{100 * a['mean_overlap']:.1f}% (min {100 * a['min_overlap']:.1f}%)"} for a in agree_rows]
    acols = [("student", "student"), ("res", "scoring resolution"), ("path", "bf16 path"), ("n", "super-batches"),
             ("max", "max abs emb diff"), ("mean", "mean abs emb diff"), ("ss", "max abs self-score diff"),
             ("same", "identical selected set"), ("ov", "mean overlap / b")]
    run_loads = [x["loadavg"][0] for x in loads]
    text = [f"# ACID step cost vs IID, fp32 and bf16 scoring ({machine_name()})", "",
            f"Student aced-vit-t, b = {args.batch_size}, f = {args.filter_ratio} (B = {B}), H-ACID (learnability, "
            f"{args.chunks} chunks), reference aced-vit-s (cached). {args.steps} steps per run, first {args.discard} "
            f"dropped, {args.repeats} interleaved repeats; torch threads {threads} in the training process, "
            f"{args.num_workers} DataLoader worker(s) with 1 thread. The 2 cores were shared with other engineers' "
            f"jobs: load average (1 min) {load_start[0]} at the start, {min(run_loads):.1f}-{max(run_loads):.1f} "
            f"before the runs, {load_end[0]} at the end; absolute times are inflated and noisy, the ratios (taken "
            "within a repeat, or within a step) are the result.", "",
            "## Trainer runs", "",
            "Seconds per step, median [min-max] over all kept steps of all repeats (the trainer's metrics); "
            "ratios: median ACID step over the median IID step of the same repeat (median [min-max] over repeats) "
            "and step_s over the step's own train_s (per step):", "",
            markdown_table(cols, rows), "",
            "The same medians in units of the median IID step:", "", markdown_table(ucols, units), "",
            "Targets of issue 10 (both ratios' medians must meet them):", "",
            markdown_table([("config", "config"), ("target", "target"), ("r", "step / IID step"),
                            ("o", "step / own train step"), ("m", "met")], vrows), ""]
    if failed:
        text += ["Configurations the trainer could not run (traceback below, first failure each):", ""]
        for name, tb in failed.items():
            text += [f"- `{name}`:", "", "```", tb.strip()[-3000:], "```", ""]
    text += [f"## Anatomy (this process, {args.whatif_repeats} interleaved repeats after a warm-up round)", "",
             "Seconds median [min-max]; last column in units of one IID train_step measured alongside; the data "
             "rows are the DataLoader worker's work, done in parallel with training:", "",
             markdown_table([("case", "case"), ("t", "seconds"), ("u", "IID train steps")], wrows), "",
             f"Captions use {tok['mean_tokens']:.1f} tokens on average (max {tok['max_tokens']}); the text tower runs "
             f"{tok['tokens_run']} positions of its context of {tok['context']} at the batch's length (its longest "
             f"caption, rounded up to 8), {tok['tokens_run_by_length']:.1f} per caption grouped by length "
             "(`encode_text_by_length`, chunks of b)."
             + (f" torch.compile of the bf16 image tower: {tok['compile_s']}." if isinstance(tok.get("compile_s"), str)
                else f" torch.compile of the bf16 image tower took {tok['compile_s']:.0f} s to compile (first call)."
                if tok.get("compile_s") is not None else ""), "",
             "## bf16 vs fp32 scoring: embeddings and selections", "",
             f"The same super-batches scored with `score_superbatch(dtype=float32)` and in bf16 by the trainer's "
             "path (`score_superbatch(dtype=bfloat16)`: the bf16 copy of the student) and by the previous one "
             "(autocast over the float32 student), then "
             f"`select_subbatch` with the same noise (seeded from (seed, step)); tau = 10, {args.chunks} chunks, "
             f"b = {args.batch_size} of B = {B}. Embeddings are L2-normalised (entries of size ~0.1):", "",
             markdown_table(acols, arows), "",
             "## Reading", "", explanation(args, summary, whatif_rows, agree_rows), ""]
    text += [f"Preparation (data, reference model, cache) {prep_s:.0f} s; whole benchmark {total_s:.0f} s."]
    md = "\n".join(text) + "\n"
    payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "torch_threads": threads, "superbatch": B, "configs": summary, "failed": failed,
               "verdicts": ver, "whatif": whatif_rows, "bf16_agreement": agree_rows,
               "loadavg": {"start": load_start, "end": load_end, "before_runs": loads},
               "prep_seconds": prep_s, "total_seconds": total_s,
               "paper_cost_model": {"acid_over_iid": 7 / 3, "full_superbatch_forward": 8 / 3}, "targets": TARGETS}
    name = Path(args.name)
    if name.parent != Path("."):
        write_report(name.name, payload, md, out=name.parent)
    else:
        write_report(args.name, payload, md)
    for v in ver:
        print(f"ratio {v['config']}/iid: {v['ratio_median']:.2f} (target {v['target']})", flush=True)


def explanation(args: argparse.Namespace, summary: dict, whatif_rows: list[dict], agree_rows: list[dict]) -> str:
    """The paragraph of the report, written from the measured numbers."""
    parts = []
    unit = summary["iid"]["step_s"]["median"]
    for name, s in summary.items():
        if name == "iid":
            continue
        parts.append(f"`{name}`: {s['ratio_vs_iid']['median']:.2f}x IID (scoring forward "
                     f"{s['score_s']['median'] / unit:.2f}, selection {s['select_s']['median'] / unit:.2f}, "
                     f"train step {s['train_s']['median'] / unit:.2f} IID steps)")
    text = "Per configuration: " + "; ".join(parts) + "."
    w = {r["case"]: r for r in whatif_rows if "seconds" in r}
    pairs = []
    for case, row in w.items():
        if case.startswith("score_superbatch") and ", fp32," in case:
            other = w.get(case.replace(", fp32,", ", bf16,"))
            if other:
                res = case.split(", ")[2]
                pairs.append(f"{res} {row['seconds']['median']:.3f} s fp32 vs {other['seconds']['median']:.3f} s bf16 "
                             f"({other['seconds']['median'] / row['seconds']['median']:.2f}x)")
    if pairs:
        text += " Scoring forward alone, fp32 vs bf16 (the bf16 copy) on this CPU: " + "; ".join(pairs) + "."
    text += levers(w)
    for path in BF16_PATHS:
        rows = [a for a in agree_rows if a.get("bf16_path") == path]
        if not rows:
            continue
        worst = min(rows, key=lambda a: a["mean_overlap"])
        text += (f" bf16 scoring by {path} changes the embeddings by at most {max(a['emb_max_abs_diff'] for a in rows):.1e} "
                 f"(mean {max(a['emb_mean_abs_diff'] for a in rows):.1e}); the selected set is identical in "
                 f"{100 * min(a['identical_set_frac'] for a in rows):.0f}-"
                 f"{100 * max(a['identical_set_frac'] for a in rows):.0f}% of the steps, and the lowest mean "
                 f"overlap is {100 * worst['mean_overlap']:.1f}% ({worst['student']}, {worst['resolution']} px).")
    return text + arithmetic(args, summary)


def levers(w: dict[str, dict]) -> str:
    """One sentence per lever of the anatomy, from its side-by-side rows (median seconds)."""
    out = []
    img = {k: next((r["seconds"]["median"] for c, r in w.items()
                    if c.startswith("image tower only") and f", {k}, chunks of" in c), None)
           for k in ("fp32", "bf16 autocast", "bf16 copy", "bf16 copy under torch.compile")}
    if img["fp32"] and img["bf16 autocast"] and img["bf16 copy"]:
        out.append(f"image tower fp32 {img['fp32']:.3f} s, bf16 autocast {img['bf16 autocast']:.3f} s, bf16 copy "
                   f"{img['bf16 copy']:.3f} s ({img['bf16 copy'] / img['fp32']:.2f}x fp32)")
    if img.get("bf16 copy under torch.compile"):
        out.append(f"torch.compile of the bf16 copy {img['bf16 copy under torch.compile']:.3f} s vs "
                   f"{img['bf16 copy']:.3f} s eager (not kept unless faster)")
    chunks = sorted((int(c.split()[-1]), r["seconds"]["median"]) for c, r in w.items()
                    if c.startswith("image tower only") and "bf16 copy, " in c and "compile" not in c)
    if len(chunks) > 1:
        out.append("bf16 image chunks " + ", ".join(f"{n} rows {v:.3f} s" for n, v in chunks))
    for dt in ("fp32", "bf16 copy"):
        a = next((r["seconds"]["median"] for c, r in w.items() if c.startswith("text tower only") and "at the batch length" in c
                  and f", {dt}, " in c), None)
        g = next((r["seconds"]["median"] for c, r in w.items() if c.startswith("text tower only") and "grouped by length" in c
                  and f", {dt}, " in c), None)
        if a and g:
            out.append(f"text tower {dt}: at the batch length {a:.3f} s, grouped by length {g:.3f} s ({g / a:.2f}x)")
    for res_row in [c for c in w if c.startswith("previous scoring")]:
        new = w.get(res_row.replace("previous scoring (autocast, text at batch length)", "score_superbatch"))
        if new:
            res, dt = res_row.split(", ")[3], res_row.split(", ")[4]
            out.append(f"whole scoring forward {res} {dt}: previous {w[res_row]['seconds']['median']:.3f} s, "
                       f"now {new['seconds']['median']:.3f} s")
    return (" Levers, side by side: " + "; ".join(out) + ".") if out else ""


def arithmetic(args: argparse.Namespace, summary: dict) -> str:
    """What a missed target needs of the scoring forward, in units of the configuration's own train
    step (the same train_step on b pairs an IID step runs, in the same step: load cancels)."""
    out = []
    for v in verdicts(args, summary):
        if v["meets"]:
            continue
        s = summary[v["config"]]
        unit = s["train_s"]["median"]
        rest = sum(s[k]["median"] for k in COMPONENTS if k != "score_s") / unit
        score = s["score_s"]["median"] / unit
        need = v["target"] - rest
        out.append(f"`{v['config']}` misses {v['target']} (step / IID step {v['ratio_median']:.2f}, step / own train "
                   f"step {v['own_median']:.2f}): in units of its own train step the rest of the step is {rest:.2f}, so "
                   f"the scoring forward would have to take <= {need:.2f}; it takes {score:.2f}. By FLOPs a train step "
                   "is ~3 forward passes of b pairs and scoring is B = 5b inference forwards, 5/3 = 1.67 train steps "
                   f"at equal speed per FLOP; {need:.2f} needs the scoring forward "
                   f"{5 / 3 / max(1e-9, need):.1f}x cheaper per pair than the training forward + backward")
    return (" " + " ".join(o + "." for o in out)) if out else ""


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    import torch

    if args.discard >= args.steps:
        raise SystemExit(f"--discard {args.discard} must be below --steps {args.steps}")
    load_start = load()
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    t_start = time.perf_counter()
    own = args.root is None
    root = Path(tempfile.mkdtemp(prefix="aced-step-cost-")) if own else args.root.resolve()
    try:
        train_data = prepare(root, args)
        torch.set_num_threads(args.threads)  # embed_shards_plain restores it, but be explicit
        prep_s = time.perf_counter() - t_start
        cfgs = configs(args, root, train_data)
        runs, failed, loads = run_all(args, root, cfgs)
        if "iid" not in runs:
            raise SystemExit("the IID runs failed: nothing to compare with\n" + failed.get("iid", ""))
        summary = summarise_runs(runs)
        whatif_rows = whatif(args, root, train_data)
        agree_rows = agreement(args, root, train_data)
        report(args, summary, failed, loads, whatif_rows, agree_rows, threads, prep_s,
               time.perf_counter() - t_start, load_start, load())
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
