"""Benchmark: training throughput (pairs/s) of the tiny student and of a reference-size model, and
evaluation throughput (images/s, texts/s), on this machine.

Training: short runs of the real trainer (`pipeline.trainer.train`, IID, b = 64) on synthetic pairs
(`pipeline.workspace.prepare_synthetic` into a temporary workspace) for aced-vit-t (the student) and
aced-vit-s (reference size), interleaved over `--repeats` rounds. The per-step timings the trainer
records in its metrics Parquet are read back (`pipeline.report.read_metrics`); the first `--warmup`
steps of each run are dropped. Reported per model: pairs/s end to end (b / step_s, which includes
waiting for the DataLoader worker) and compute-only (b / train_s), median [min-max] over the kept steps.

Step anatomy: in this process, the parts of one training step of each model (forward, backward,
gradient clipping, the trainer's AdamW step, and the same update with the other AdamW implementation,
fused or torch's per-parameter loop, for comparison), interleaved, after one warm-up round; and one
tiny-student train_step at 1 vs 2 torch threads, since the machine is shared.

Evaluation: `pipeline.evaluate.evaluate` on a synthetic retrieval set (one caption per image) and a
synthetic zero-shot class set, for both models (random weights: speed does not depend on them),
interleaved, after a warm-up call. The bundle's encode_image / encode_text are wrapped with timers, so
besides the wall time of each evaluation (decoding, the towers, faiss) the rates of the image tower
(images/s) and the text tower (texts/s; the zero-shot texts are class prompts) are reported.

Run:  .venv/bin/python benchmarks/train.py        (writes benchmarks/results/train.{json,md}; 7-9 min on the shared 2 cores)
      .venv/bin/python benchmarks/train.py --steps 8 --warmup 2 --repeats 1 --eval-repeats 1 --name /tmp/x/train
"""
from __future__ import annotations

import _common  # noqa: F401  (puts the repo on sys.path; must come first)

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import fmt_range, hand_run, machine_name, markdown_table, rate, summarise, synthetic_superbatch, write_report

MODELS = ("aced-vit-t", "aced-vit-s")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=None,
                   help="workspace to build/reuse (default: a temporary folder, removed at the end)")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--pairs", type=int, default=2000, help="synthetic training pairs")
    p.add_argument("--eval-pairs", type=int, default=1000, help="synthetic retrieval pairs")
    p.add_argument("--per-class", type=int, default=30, help="zero-shot images per class (10 classes)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="steps per training run")
    p.add_argument("--warmup", type=int, default=5, help="first steps of each run left out")
    p.add_argument("--repeats", type=int, default=2, help="interleaved training runs per model")
    p.add_argument("--anatomy-repeats", type=int, default=4)
    p.add_argument("--eval-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch (and faiss) threads of this process; DataLoader workers always use 1")
    p.add_argument("--num-workers", type=int, default=1, help="TrainConfig.num_workers")
    p.add_argument("--name", default="train", help="results file stem in benchmarks/results/, or a path ending in the stem")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------
# training runs


def train_runs(args: argparse.Namespace, root: Path, train_data: list[str]) -> dict[str, list[dict]]:
    from pipeline.recipes import recipe
    from pipeline.report import read_metrics
    from pipeline.trainer import train

    runs: dict[str, list[dict]] = {m: [] for m in args.models}
    for rep in range(args.repeats):
        order = args.models[rep % len(args.models):] + args.models[:rep % len(args.models)]
        for model in order:
            cfg = recipe("student", method="iid", model=model, steps=args.steps, batch_size=args.batch_size,
                         train_data=tuple(train_data), checkpoint_every=args.steps, num_workers=args.num_workers,
                         seed=rep)
            run_dir = root / "runs" / f"{model}-r{rep}"
            if run_dir.exists():
                shutil.rmtree(run_dir)  # our own scratch run: a leftover would be resumed, not re-measured
            t0 = time.perf_counter()
            train(cfg, run_dir, progress=False)
            wall = time.perf_counter() - t0
            m = read_metrics(run_dir).to_pydict()
            keep = [i for i, s in enumerate(m["step"]) if s >= args.warmup]
            r = {k: [float(m[k][i]) for i in keep] for k in ("step_s", "train_s", "data_wait_s")}
            r["wall_s"] = wall
            runs[model].append(r)
            shutil.rmtree(run_dir)
            print(f"repeat {rep} {model}: {args.batch_size / statistics.median(r['step_s']):.1f} pairs/s "
                  f"(run wall {wall:.1f} s)", flush=True)
    return runs


def summarise_train(args: argparse.Namespace, runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    first = args.models[0]
    for model, reps in runs.items():
        pooled = {k: [x for r in reps for x in r[k]] for k in ("step_s", "train_s", "data_wait_s")}
        s = {k: summarise(v) for k, v in pooled.items()}
        ratios = [statistics.median(r["step_s"]) / statistics.median(f["step_s"]) for r, f in zip(reps, runs[first])]
        out[model] = {**s, "pairs_per_s": rate(args.batch_size, s["step_s"]),
                      "compute_pairs_per_s": rate(args.batch_size, s["train_s"]),
                      "steps_measured": len(pooled["step_s"]), "run_wall_s": [r["wall_s"] for r in reps],
                      f"step_ratio_vs_{first}": summarise(ratios)}
    return out


# ---------------------------------------------------------------------------------------------
# step anatomy


def anatomy(args: argparse.Namespace, train_data: list[str]) -> tuple[dict, dict]:
    import torch

    from pipeline.models import count_params, create_model
    from pipeline.recipes import recipe
    from pipeline.trainer import contrastive_loss, embed, train_step

    batches, states = {}, {}
    for model in args.models:
        cfg = recipe("student", method="iid", model=model, batch_size=args.batch_size, train_data=tuple(train_data))
        bundle = create_model(model, seed=0)
        run = hand_run(cfg, bundle)
        m, opt = run.model, run.opt
        # the same parameter groups, updated by the other AdamW implementation (fused single kernel vs
        # torch's per-parameter loop, its CPU default), for comparison with the trainer's choice
        trainer_fused = bool(opt.defaults.get("fused"))
        other = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=not trainer_fused)
        batches[model] = synthetic_superbatch(bundle, args.batch_size, seed=0)
        params = count_params(bundle)
        states[model] = dict(run=run, other=other, params=params, trainer_fused=trainer_fused,
                             embedding=int(m.token_embedding.weight.numel()) if hasattr(m, "token_embedding") else None)

    times: dict[str, dict[str, list[float]]] = {m: {} for m in args.models}
    for rep in range(args.anatomy_repeats + 1):
        for model in args.models:
            st, batch = states[model], batches[model]
            run = st["run"]
            m, cfg = run.model, run.cfg
            m.train()
            run.opt.zero_grad(set_to_none=True)
            t = [time.perf_counter()]
            img, txt = embed(m, run.bundle.normalize(batch.images), batch.tokens)
            loss = contrastive_loss(cfg, m, img.float(), txt.float())
            t.append(time.perf_counter())
            loss.backward()
            t.append(time.perf_counter())
            torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], cfg.grad_clip)
            t.append(time.perf_counter())
            run.opt.step()
            t.append(time.perf_counter())
            st["other"].step()  # a second update from the same gradients: only its time matters
            t.append(time.perf_counter())
            train_step(run, batch, None)
            t.append(time.perf_counter())
            if rep:
                other_name = ("AdamW step (fused=False, for comparison)" if st["trainer_fused"]
                              else "AdamW step (fused=True, what-if)")
                for name, (a, b) in zip(("forward + loss", "backward", "clip_grad_norm",
                                         f"AdamW step (trainer, fused={st['trainer_fused']})", other_name,
                                         "whole train_step"),
                                        zip(t, t[1:])):
                    times[model].setdefault(name, []).append(b - a)

    # 1 vs 2 torch threads on the tiny student's train_step (the machine is shared)
    threads: dict[int, list[float]] = {1: [], 2: []}
    before = torch.get_num_threads()
    st, batch = states[args.models[0]], batches[args.models[0]]
    try:
        for rep in range(4):
            for n in (1, 2):
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                train_step(st["run"], batch, None)
                if rep:
                    threads[n].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    out = {model: {"parts": {k: summarise(v) for k, v in parts.items()}, "params": states[model]["params"],
                   "token_embedding_params": states[model]["embedding"]} for model, parts in times.items()}
    return out, {f"{n} threads": summarise(v) for n, v in threads.items()}


# ---------------------------------------------------------------------------------------------
# evaluation


class TowerTimer:
    """Wraps a bundle's encode_image / encode_text (instance attributes) to add up their time and rows."""

    def __init__(self, bundle):
        self.reset()
        image, text = bundle.encode_image, bundle.encode_text

        def encode_image(x):
            t0 = time.perf_counter()
            out = image(x)
            self.image_s += time.perf_counter() - t0
            self.images += x.shape[0]
            return out

        def encode_text(tokens):
            t0 = time.perf_counter()
            out = text(tokens)
            self.text_s += time.perf_counter() - t0
            self.texts += tokens.shape[0]
            return out

        bundle.encode_image, bundle.encode_text = encode_image, encode_text

    def reset(self) -> None:
        self.image_s = self.text_s = 0.0
        self.images = self.texts = 0


def eval_runs(args: argparse.Namespace, sets: dict[str, list[str]]) -> dict[str, dict]:
    from pipeline.evaluate import evaluate
    from pipeline.models import create_model

    evals = {"retrieval": ("retrieval", sets["retrieval"][0]), "zeroshot": ("zeroshot", sets["zeroshot"][0])}
    bundles = {m: create_model(m, seed=0) for m in args.models}
    timers = {m: TowerTimer(b) for m, b in bundles.items()}
    for m, b in bundles.items():  # warm-up: faiss, thread pools, allocator
        evaluate(b, {"zeroshot": evals["zeroshot"]})
    records: dict[str, dict[str, list[dict]]] = {m: {e: [] for e in evals} for m in args.models}
    for rep in range(args.eval_repeats):
        order = args.models[rep % len(args.models):] + args.models[:rep % len(args.models)]
        for m in order:
            for name, spec in evals.items():
                timers[m].reset()
                t0 = time.perf_counter()
                res = evaluate(bundles[m], {name: spec})
                wall = time.perf_counter() - t0
                t = timers[m]
                records[m][name].append({"wall_s": wall, "image_s": t.image_s, "text_s": t.text_s,
                                         "images": t.images, "texts": t.texts,
                                         "metrics": res["evals"][name]["metrics"]})
            print(f"eval repeat {rep} {m}: " + ", ".join(f"{n} {r[-1]['wall_s']:.1f} s"
                                                          for n, r in records[m].items()), flush=True)
    out: dict[str, dict] = {}
    for m, per in records.items():
        for name, recs in per.items():
            images, texts = recs[0]["images"], recs[0]["texts"]
            wall = summarise([r["wall_s"] for r in recs])
            img_s = summarise([r["image_s"] for r in recs])
            txt_s = summarise([r["text_s"] for r in recs])
            out[f"{m}/{name}"] = {"model": m, "eval": name, "images": images, "texts": texts, "wall_s": wall,
                                  "image_tower_s": img_s, "text_tower_s": txt_s,
                                  "images_per_s_tower": rate(images, img_s), "texts_per_s_tower": rate(texts, txt_s),
                                  "images_per_s_wall": rate(images, wall), "texts_per_s_wall": rate(texts, wall),
                                  "repeats": len(recs)}
    return out


# ---------------------------------------------------------------------------------------------
# report


def report(args, threads: int, train_sum: dict, anat: dict, thread_cmp: dict, ev: dict, prep_s: float,
           total_s: float) -> None:
    first = args.models[0]
    trows = []
    for model, s in train_sum.items():
        trows.append({"model": model, "steps": s["steps_measured"], "step": fmt_range(s["step_s"], 3),
                      "train": fmt_range(s["train_s"], 3), "wait": fmt_range(s["data_wait_s"], 3),
                      "pps": fmt_range(s["pairs_per_s"], 1), "cpps": fmt_range(s["compute_pairs_per_s"], 1),
                      "ratio": fmt_range(s[f"step_ratio_vs_{first}"], 2)})
    tcols = [("model", "model"), ("steps", "steps kept"), ("step", "step_s"), ("train", "train_s"),
             ("wait", "data_wait_s"), ("pps", "pairs/s (end to end)"), ("cpps", "pairs/s (train_s only)"),
             ("ratio", f"step time / {first} (per repeat)")]
    parts = list(next(iter(anat.values()))["parts"])
    arows = []
    for model, a in anat.items():
        whole = a["parts"]["whole train_step"]["median"]
        arows.append({"model": model, "params": f"{a['params']['params'] / 1e6:.2f} M"
                      + (f" ({a['token_embedding_params'] / 1e6:.2f} M token embedding)"
                         if a["token_embedding_params"] else ""),
                      **{p: f"{a['parts'][p]['median']:.3f} ({100 * a['parts'][p]['median'] / whole:.0f}%)"
                         if p != "whole train_step" else fmt_range(a["parts"][p], 3) for p in parts}})
    acols = [("model", "model"), ("params", "parameters")] + [(p, p) for p in parts]
    erows = []
    for key, e in ev.items():
        erows.append({"model": e["model"], "eval": e["eval"], "n": f"{e['images']} / {e['texts']}",
                      "wall": fmt_range(e["wall_s"], 2), "ips": fmt_range(e["images_per_s_tower"], 0),
                      "tps": fmt_range(e["texts_per_s_tower"], 0), "iw": fmt_range(e["images_per_s_wall"], 0),
                      "tw": fmt_range(e["texts_per_s_wall"], 0)})
    ecols = [("model", "model"), ("eval", "evaluation"), ("n", "images / texts"), ("wall", "wall s"),
             ("ips", "images/s (image tower)"), ("tps", "texts/s (text tower)"),
             ("iw", "images/s (wall)"), ("tw", "texts/s (wall)")]
    tc = ", ".join(f"{k}: {fmt_range(v, 3)} s" for k, v in thread_cmp.items()).replace("1 threads", "1 thread")
    t_small = anat[first]["parts"]
    trainer_key = next(k for k in t_small if k.startswith("AdamW step (trainer"))
    other_key = next(k for k in t_small if k.startswith("AdamW step (fused") and k != trainer_key)
    whole = t_small["whole train_step"]["median"]
    diff = t_small[other_key]["median"] - t_small[trainer_key]["median"]
    if "fused=True" in trainer_key:
        opt_text = (f"The trainer's AdamW is the fused implementation (one kernel over all parameters); torch's CPU "
                    f"default, a per-parameter loop, would cost {diff:.3f} s more per {first} step "
                    f"({100 * diff / whole:.0f}% of it). Most parameters are the 49,408 x width token embedding, "
                    "whose dense gradient is updated every step.")
    else:
        opt_text = (f"The trainer's AdamW (torch's default on CPU tensors: a per-parameter loop) is a visible part of "
                    f"the {first} step; `fused=True` would save about {-diff:.3f} s per step "
                    f"({100 * -diff / whole:.0f}% of it): most parameters are the 49,408 x width token embedding, "
                    "whose dense gradient is updated every step.")
    lines = [
        f"# Training and evaluation throughput ({machine_name()})", "",
        f"torch threads {threads} in the training/evaluating process (faiss the same), {args.num_workers} DataLoader "
        f"worker(s) with 1 thread; IID, b = {args.batch_size}, float32 on the CPU; synthetic 64x64 pairs. Other "
        "long jobs shared the 2 cores during the measurement, so absolute numbers are lower and noisier than on "
        "an idle machine; rows were interleaved so the comparisons hold.", "",
        f"## Training (pipeline.trainer.train, {args.steps} steps per run, first {args.warmup} dropped, "
        f"{args.repeats} interleaved runs per model)", "",
        "Seconds and pairs/s as median [min-max] over the kept steps (the trainer's own per-step metrics):", "",
        markdown_table(tcols, trows), "",
        f"## Step anatomy (this process, {args.anatomy_repeats} interleaved repeats after a warm-up; median seconds "
        "and share of the whole train_step)", "",
        markdown_table(acols, arows), "",
        opt_text, "",
        f"One {first} train_step at 1 vs 2 torch threads on this shared machine (3 interleaved repeats): {tc}.", "",
        f"## Evaluation (pipeline.evaluate.evaluate, {args.eval_repeats} interleaved repeats after a warm-up)", "",
        "Retrieval: one caption per image; zero-shot: 10 classes x 10 prompt templates = 100 texts. Tower rates count "
        "only the encode calls; wall rates divide the whole evaluation (reading, decoding in a prefetch thread, both "
        "towers, faiss) by the number of images or of texts.", "",
        markdown_table(ecols, erows), "",
        f"Preparation (synthetic data) {prep_s:.0f} s; whole benchmark {total_s:.0f} s.",
    ]
    payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "torch_threads": threads, "training": train_sum, "anatomy": anat, "threads_train_step": thread_cmp,
               "evaluation": ev, "prep_seconds": prep_s, "total_seconds": total_s}
    name = Path(args.name)
    if name.parent != Path("."):
        write_report(name.name, payload, "\n".join(lines) + "\n", out=name.parent)
    else:
        write_report(args.name, payload, "\n".join(lines) + "\n")


def main() -> None:
    args = parse()
    import faiss
    import torch

    from pipeline.workspace import prepare_synthetic

    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup {args.warmup} must be below --steps {args.steps}")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    threads = torch.get_num_threads()
    t_start = time.perf_counter()
    own = args.root is None
    root = Path(tempfile.mkdtemp(prefix="aced-bench-train-")) if own else args.root.resolve()
    try:
        sets = prepare_synthetic(root, train_pairs=args.pairs, clean_pairs=64, test_pairs=args.eval_pairs,
                                 per_class=args.per_class, noise_frac=0.5, seed=2025)
        prep_s = time.perf_counter() - t_start
        runs = train_runs(args, root, sets["student"])
        train_sum = summarise_train(args, runs)
        anat, thread_cmp = anatomy(args, sets["student"])
        ev = eval_runs(args, sets)
        report(args, threads, train_sum, anat, thread_cmp, ev, prep_s, time.perf_counter() - t_start)
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
