"""GPU check (issue 10 item 5): what a CPU machine cannot show, in one command on one or more GPUs.

Run through `scripts/gpu_check.sh` (it picks the Python and passes its arguments on). Sections, each
printed as a table row and collected into one Markdown table (and JSON with `--out`):

kernel  The compiled Triton conditional-score kernel (kernels.cond_scores, backend="triton") against the
        PyTorch reference (backend="torch") on the same inputs: B candidates up to 163,840, widths
        d in {256, 768}, float32 and bfloat16 embeddings, k = 2048 picked rows (the paper's chunk:
        b / n = 32,768 / 16). Error = max |triton - torch|, relative error = that / max |torch|; pass
        when the relative error is below TOL[dtype] (both accumulate in float32 from the same inputs, so
        only the summation order differs). Time of one call of each (CUDA events, median of --repeats after
        a warm-up that includes the autotuner), and one whole `pipeline.selection.select` at the paper's
        B = 163,840, b = 32,768, 16 chunks with each backend (time and peak memory).
step    An ACID step against an IID step with the trainer's own step functions (score_superbatch ->
        select_subbatch -> SuperBatch.subset -> train_step; IID: train_step alone) on a hand-built Run,
        bf16 scoring, for aced-vit-t (64 px) and aced-vit-b16-224 (a ViT-B/16 image tower at 224 px, a
        12-layer 512-wide text tower; open_clip's own "ViT-B-16" has no logit bias, which the sigmoid
        loss needs). Random uint8 pixels and captions, random reference rows: timing does not depend on
        the values. Median seconds per part over --repeats interleaved steps after warm-up steps.
ddp     torchrun on every visible GPU: an NCCL probe (all_reduce + all_gather of known values on W ranks),
        then the real trainer (`python -m pipeline.trainer`) trains the same IID run once as one process on
        one GPU and once under torchrun on W GPUs (W = 1 on a one-GPU machine: torchrun's single rank),
        on synthetic pairs written to a temporary folder. Pass when every step's loss agrees within
        LOSS_RTOL and the final weights differ by less than WEIGHT_RTOL of the update the run made
        (||w_W - w_1|| / ||w_1 - w_init||): bf16 autocast and atomics make GPU runs not bit-identical.

--cpu-smoke runs the same code at tiny sizes on the CPU: the kernel under the Triton interpreter
(TRITON_INTERPRET=1, which computes bf16 wrongly without error, so float16 stands in for bf16 and B stays
<= 256), the step with aced-vit-t only (the ViT-B/16 config is checked, not built), and the ddp section
with 2 gloo ranks on the CPU. tests/unit/test_gpu_check.py runs it.

Without --cpu-smoke the script refuses to run unless CUDA is available (exit 2), and a section whose
Python packages are missing is reported as such (the kernel section needs only torch and triton).
Exit status: 0 when every check passed, 1 when one failed or raised, 2 when nothing could run.
"""
from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # must precede the first import of kernels.cond_scores (triton.jit decides then)
    os.environ["TRITON_INTERPRET"] = "1"

import _common  # noqa: E402,F401  (puts the repo on sys.path)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from _common import REPO, hand_run, markdown_table, machine_name, synthetic_superbatch, write_report  # noqa: E402

# Relative error tolerances of the kernel against the reference (see the module docstring).
TOL = {"float32": 1e-4, "bfloat16": 1e-3, "float16": 1e-3}
LOSS_RTOL = {"cuda": 1e-2, "cpu": 1e-4}
WEIGHT_RTOL = {"cuda": 5e-2, "cpu": 1e-3}
SECTIONS = ("kernel", "step", "ddp")
NEEDS = {"kernel": ("torch", "triton"),
         "step": ("torch", "triton", "open_clip", "numpy", "pyarrow", "safetensors", "PIL"),
         "ddp": ("torch", "triton", "open_clip", "numpy", "pyarrow", "safetensors", "PIL")}
VIT_B16 = "aced-vit-b16-224"


class Sizes:
    """Problem sizes: the GPU's, or tiny ones for --cpu-smoke."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        if smoke:
            self.kernel_B, self.kernel_d, self.kernel_k = [200], [256, 768], 48
            self.kernel_dtypes = ["float32", "float16"]   # the interpreter computes bf16 wrongly
            self.select = dict(B=128, b=32, n_chunks=4, d=256)
            self.step_models = {"aced-vit-t": 8}          # model -> b
            self.ddp = dict(world=2, steps=3, batch=8, pairs=120, device="cpu")
        else:
            self.kernel_B, self.kernel_d, self.kernel_k = [16_384, 163_840], [256, 768], 2048
            self.kernel_dtypes = ["float32", "bfloat16"]
            self.select = dict(B=163_840, b=32_768, n_chunks=16, d=768)
            self.step_models = {"aced-vit-t": 1024, VIT_B16: 256}
            self.ddp = dict(world=None, steps=6, batch=128, pairs=3000, device="cuda")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes on the CPU (Triton interpreter, gloo ranks): checks the script, not the GPU")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10 on GPU, 1 with --cpu-smoke)")
    p.add_argument("--out", type=Path, default=None, help="write gpu_check.json/.md into this folder")
    p.add_argument("--nccl-probe", action="store_true", help=argparse.SUPPRESS)  # one torchrun rank of the probe
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.cpu_smoke else 10
    return args


def missing_modules(section: str) -> list[str]:
    return [m for m in NEEDS[section] if importlib.util.find_spec(m) is None]


# ---------------------------------------------------------------------------------------------
# timing


def timed(fn, device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call: CUDA events on a GPU (no host round trip inside the measured span), the wall
    clock on the CPU. The warm-up calls include Triton's compilation and autotuning."""
    import torch

    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            out.append(start.elapsed_time(stop) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ms(xs: list[float]) -> str:
    return f"{1000 * statistics.median(xs):.2f} ms"


# ---------------------------------------------------------------------------------------------
# kernel


def unit_rows(n: int, d: int, dtype, device, g):
    """n random L2-normalised rows, drawn on `device` (a 163,840 x 768 draw on the host costs seconds)."""
    import torch

    x = torch.randn(n, d, generator=g, device=device)
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def kernel_section(args, sizes: Sizes, device) -> list[dict]:
    import torch

    from kernels.cond_scores import conditional_scores, cross_scores, prepare_scores, take_rows, Embeddings
    from pipeline.selection import SelectionConfig, select

    rows = []
    scalars = dict(stu_scale=10.0, stu_bias=-10.0, ref_scale=12.0, ref_bias=-8.0)
    for B in sizes.kernel_B:
        for d in sizes.kernel_d:
            for dt in sizes.kernel_dtypes:
                dtype = getattr(torch, dt)
                g = torch.Generator(device=device).manual_seed(B + d)
                emb = [unit_rows(B, d, dtype, device, g) for _ in range(4)]
                chunk = torch.randperm(B, generator=g, device=device)[:sizes.kernel_k]
                out = {be: conditional_scores(*emb, chunk, rule="learnability", backend=be, **scalars)
                       for be in ("triton", "torch")}
                err = float((out["triton"] - out["torch"]).abs().max())
                rel = err / max(float(out["torch"].abs().max()), 1e-30)
                finite = bool(torch.isfinite(out["triton"]).all())
                times = {}
                for be in ("triton", "torch"):
                    setup = prepare_scores(*emb, rule="learnability", backend=be, **scalars)
                    cand = Embeddings(*emb)
                    picked = take_rows(cand, chunk)
                    times[be] = timed(lambda: cross_scores(setup, cand, picked, chunk), device, args.repeats)
                ok = finite and rel <= TOL[dt]
                rows.append({"section": "kernel", "check": f"cond scores B={B:,} d={d} k={sizes.kernel_k} {dt}",
                             "result": f"max abs err {err:.2e}, rel {rel:.2e} (tol {TOL[dt]:.0e}); triton "
                                       f"{ms(times['triton'])} vs torch {ms(times['torch'])} "
                                       f"(torch / triton {statistics.median(times['torch']) / statistics.median(times['triton']):.2f})",
                             "ok": ok, "max_abs_err": err, "rel_err": rel, "tol": TOL[dt],
                             "triton_s": times["triton"], "torch_s": times["torch"]})
                print(rows[-1]["check"], "->", rows[-1]["result"], flush=True)
                del emb, out
    # one whole selection at the paper's scale, per backend
    s = sizes.select
    sel_dtype = torch.float32 if sizes.smoke else torch.bfloat16   # embeddings as the scoring forward makes them
    g = torch.Generator(device=device).manual_seed(7)
    emb = [unit_rows(s["B"], s["d"], sel_dtype, device, g) for _ in range(4)]
    picks = {}
    for be in ("triton", "torch"):
        cfg = SelectionConfig(rule="learnability", n_chunks=s["n_chunks"], backend=be)

        def run_select(cfg=cfg):
            gen = torch.Generator(device=device).manual_seed(0)
            return select(cfg, s["b"], stu_img=emb[0], stu_txt=emb[1], ref_img=emb[2], ref_txt=emb[3],
                          generator=gen, **scalars)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = timed(run_select, device, max(1, args.repeats // 3))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        picks[be] = set(run_select().indices.tolist())
        rows.append({"section": "kernel", "check": f"select B={s['B']:,} b={s['b']:,} n={s['n_chunks']} d={s['d']} "
                                                   f"{str(sel_dtype).replace('torch.', '')} backend={be}",
                     "result": f"{ms(times)}" + (f", peak {peak:.2f} GiB" if device.type == "cuda" else ""),
                     "ok": True, "seconds": times, "peak_gib": peak})
        print(rows[-1]["check"], "->", rows[-1]["result"], flush=True)
    overlap = len(picks["triton"] & picks["torch"]) / s["b"]
    # same noise, scores equal up to summation order: the sets may differ only where two keys nearly tie
    rows.append({"section": "kernel", "check": "select: triton vs torch picks, same noise",
                 "result": f"overlap {100 * overlap:.2f}% of b (pass >= 99%)", "ok": overlap >= 0.99,
                 "overlap": overlap})
    print(rows[-1]["check"], "->", rows[-1]["result"], flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# step


def step_section(args, sizes: Sizes, device) -> list[dict]:
    import torch

    from pipeline.data import CacheSpec
    from pipeline.models import create_model
    from pipeline.recipes import recipe
    from pipeline.trainer import score_superbatch, select_subbatch, train_step
    from storage.cache import ModelMeta

    rows = []
    if sizes.smoke:  # the ViT-B/16 student is too slow for a CPU; check its config is what the GPU will build
        import open_clip

        import pipeline.models  # noqa: F401  (registers pipeline/model_configs)
        ours, theirs = open_clip.get_model_config(VIT_B16), open_clip.get_model_config("ViT-B-16")
        same = all(ours["vision_cfg"][k] == theirs["vision_cfg"][k] for k in theirs["vision_cfg"])
        text = (ours["text_cfg"]["layers"], ours["text_cfg"]["width"]) == (12, 512)
        rows.append({"section": "step", "check": f"{VIT_B16} config", "ok": same and text and "init_logit_bias" in ours,
                     "result": f"image tower = open_clip ViT-B-16's: {same}; text 12 x 512: {text}; logit bias: "
                               f"{'init_logit_bias' in ours}"})
    for name, b in sizes.step_models.items():
        t0 = time.perf_counter()
        bundle = create_model(name, seed=0)
        # train_data/cache_root are names only: the hand-built Run never reads data or caches
        cfg = recipe("student", method="h-acid", model=name, batch_size=b, train_data=("synthetic",),
                     cache_root="unused", reference="reference", device=device.type, score_dtype="bfloat16",
                     selection_log_every=0, n_chunks=min(16, b))
        ref_dim = 384
        reference = CacheSpec(model_id="reference", cache_root=Path("unused"),
                              meta=ModelMeta("reference", "synthetic", ref_dim, 10.0, -10.0))
        run = hand_run(cfg, bundle, device, reference=reference)
        bundle.model.train()
        B = cfg.superbatch_size
        chunk = B if device.type == "cuda" else b  # as the trainer does
        sbs = [synthetic_superbatch(bundle, B, seed=i, ref_dim=ref_dim, step=i) for i in range(2)]
        if device.type == "cuda":
            sbs = [sb.pin_memory() for sb in sbs]
        parts: dict[str, list[float]] = {k: [] for k in ("acid score", "acid select", "acid train", "acid step",
                                                         "iid step")}
        warm = 1 if sizes.smoke else 3
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(warm + args.repeats):
            sb_host = sbs[i % 2]
            # ACID: score -> select -> subset -> train_step (as pipeline.trainer._steps)
            sync(device)
            t = [time.perf_counter()]
            sb = sb_host.to(device)
            stu = score_superbatch(bundle, sb, resolution=None, chunk=chunk, dtype=torch.bfloat16)
            sync(device)
            t.append(time.perf_counter())
            result = select_subbatch(run, stu, sb)
            sync(device)
            t.append(time.perf_counter())
            train_step(run, sb.subset(result.indices), None)
            sync(device)
            t.append(time.perf_counter())
            # IID: b pairs straight to train_step
            iid = sb_host.subset(torch.arange(b)).to(device)
            train_step(run, iid, None)
            sync(device)
            t.append(time.perf_counter())
            if i >= warm:
                for k, (a, z) in zip(("acid score", "acid select", "acid train", "iid step"), zip(t, t[1:])):
                    parts[k].append(z - a)
                parts["acid step"].append(t[3] - t[0])
        med = {k: statistics.median(v) for k, v in parts.items()}
        ratio = med["acid step"] / med["iid step"]
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows.append({"section": "step", "check": f"{name} {bundle.image_size} px, b={b}, B={B}, bf16 scoring",
                     "result": f"ACID/IID {ratio:.2f} (score {med['acid score'] / med['iid step']:.2f}, select "
                               f"{med['acid select'] / med['iid step']:.2f}, train {med['acid train'] / med['iid step']:.2f}"
                               f" IID steps; IID step {1000 * med['iid step']:.1f} ms"
                               + (f", peak {peak:.1f} GiB" if device.type == "cuda" else "") + ")",
                     "ok": math.isfinite(ratio), "ratio": ratio, "seconds": parts, "peak_gib": peak,
                     "setup_s": time.perf_counter() - t0})
        print(rows[-1]["check"], "->", rows[-1]["result"], flush=True)
        del run, bundle, sbs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# ddp


def nccl_probe() -> int:
    """One torchrun rank: all_reduce and all_gather of known values (NCCL on CUDA, gloo on the CPU)."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and os.environ.get("GPU_CHECK_DEVICE", "cuda") == "cuda"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    x = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(x)
    rows = [torch.full((4, 8), float(rank), device=device, dtype=torch.bfloat16) for _ in range(world)]
    dist.all_gather(rows, rows[rank].clone())
    ok = bool((x == world * (world + 1) / 2).all()) and all(bool((r == i).all()) for i, r in enumerate(rows))
    backend = dist.get_backend()
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"nccl_probe": {"backend": backend, "world": world, "ok": ok}}), flush=True)
    return 0 if ok else 1


def _env(device: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "GPU_CHECK_DEVICE": device}
    env.pop("TRITON_INTERPRET", None)  # the trainer on the CPU runs the torch path; on CUDA the compiled kernel
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    return env


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "open_clip_model.safetensors"))


def ddp_section(args, sizes: Sizes, device) -> list[dict]:
    import pyarrow.parquet as pq
    import torch

    from pipeline.models import create_model
    from pipeline.recipes import recipe
    from pipeline.trainer import launch_command
    from pipeline.workspace import prepare_synthetic

    c = sizes.ddp
    world = c["world"] or torch.cuda.device_count()
    env = _env(c["device"])
    rows = []
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    probe = subprocess.run(torchrun + [str(Path(__file__).resolve()), "--nccl-probe"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    found = [json.loads(line)["nccl_probe"] for line in probe.stdout.splitlines() if line.startswith('{"nccl_probe"')]
    ok = probe.returncode == 0 and bool(found) and found[0]["ok"]
    rows.append({"section": "ddp", "check": f"torchrun collectives, W={world}",
                 "result": (f"{found[0]['backend']}: all_reduce + all_gather correct" if ok else
                            "FAILED: " + (probe.stderr or probe.stdout)[-1500:]), "ok": ok})
    print(rows[-1]["check"], "->", rows[-1]["result"], flush=True)

    with tempfile.TemporaryDirectory(prefix="aced-gpu-check-") as tmp:
        root = Path(tmp)
        sets = prepare_synthetic(root, train_pairs=c["pairs"], clean_pairs=16, test_pairs=16, per_class=1,
                                 noise_frac=0.2, seed=3)
        cfg = recipe("student", method="iid", train_data=tuple(sets["student"]), steps=c["steps"],
                     batch_size=c["batch"] * world, checkpoint_every=c["steps"], num_workers=0 if sizes.smoke else 2,
                     device=c["device"], seed=0)
        cfg_file = root / "config.json"
        cfg_file.write_text(cfg.to_json())
        runs = {"1 process": [sys.executable, "-m", "pipeline.trainer", str(root / "one"), "--config", str(cfg_file)],
                f"torchrun W={world}": launch_command(root / "many", world) + ["--config", str(cfg_file)]}
        dirs = {"1 process": root / "one", f"torchrun W={world}": root / "many"}
        walls = {}
        for name, cmd in runs.items():
            t0 = time.perf_counter()
            out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
            walls[name] = time.perf_counter() - t0
            if out.returncode != 0:
                rows.append({"section": "ddp", "check": f"trainer {name}", "ok": False,
                             "result": f"FAILED (exit {out.returncode}): {out.stderr[-1500:]}"})
                print(rows[-1]["check"], "->", rows[-1]["result"], flush=True)
                return rows
        metrics = {n: pq.ParquetDataset(sorted((d / "metrics").glob("part-*.parquet"))).read().to_pydict()
                   for n, d in dirs.items()}
        a, b = metrics.values()
        loss_err = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a["total"], b["total"]))
        w0 = create_model(cfg.model, seed=cfg.seed).model.state_dict()
        w1, wW = (_weights(d / "model") for d in dirs.values())
        diff = math.sqrt(sum(float((w1[k].float() - wW[k].float()).pow(2).sum()) for k in w1))
        moved = math.sqrt(sum(float((w1[k].float() - w0[k].float()).pow(2).sum()) for k in w1))
        rel = diff / max(moved, 1e-30)
        kind = c["device"]
        ok = (a["step"] == b["step"] and len(a["step"]) == c["steps"] and loss_err <= LOSS_RTOL[kind]
              and rel <= WEIGHT_RTOL[kind])
        rows.append({"section": "ddp", "check": f"IID b={cfg.batch_size}, {c['steps']} steps: torchrun W={world} "
                                                f"vs 1 process ({kind})",
                     "result": f"loss rel err {loss_err:.1e} (tol {LOSS_RTOL[kind]:.0e}), ||w_W - w_1|| / "
                               f"||w_1 - w_0|| = {rel:.1e} (tol {WEIGHT_RTOL[kind]:.0e}); wall "
                               + ", ".join(f"{n} {s:.0f} s" for n, s in walls.items()),
                     "ok": ok, "loss_rel_err": loss_err, "weight_rel_diff": rel, "losses": {n: m["total"] for n, m in
                                                                                           metrics.items()}})
        print(rows[-1]["check"], "->", rows[-1]["result"], flush=True)
    return rows


# ---------------------------------------------------------------------------------------------


def environment(device) -> list[dict]:
    import torch

    info = {"torch": torch.__version__}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "missing"
    if device.type == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        cap = torch.cuda.get_device_capability(0)
        info.update(gpus=names, capability=f"{cap[0]}.{cap[1]}", cuda=torch.version.cuda)
    try:
        from kernels.cond_scores import triton_interpreting
        info["triton_interpreter"] = triton_interpreting()
    except ImportError as e:  # reported; the sections that need it say NOT RUN
        info["kernels"] = f"not importable ({e})"
    return [{"section": "env", "check": "environment", "ok": True,
             "result": ", ".join(f"{k} {v}" for k, v in info.items()), **info}]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.nccl_probe:
        return nccl_probe()
    import torch

    if args.cpu_smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print("gpu_check: CUDA is not available to this Python (torch "
                  f"{torch.__version__}, built for CUDA {torch.version.cuda}); run it on a machine with an NVIDIA GPU "
                  "and a CUDA build of torch, or use --cpu-smoke to check the script itself on the CPU.",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    sizes = Sizes(args.cpu_smoke)
    t_start = time.perf_counter()
    rows = environment(device)
    print(rows[0]["result"], flush=True)
    runners = {"kernel": kernel_section, "step": step_section, "ddp": ddp_section}
    for section in args.sections:
        missing = missing_modules(section)
        if missing:
            rows.append({"section": section, "check": "-", "ok": False,
                         "result": f"NOT RUN: missing Python packages {', '.join(missing)} (install the project: "
                                   "pip install -e . , or carry wheels)"})
            continue
        t0 = time.perf_counter()
        try:
            rows += runners[section](args, sizes, device)
        except Exception as e:  # reported in the table, and the exit status says so
            traceback.print_exc()
            rows.append({"section": section, "check": "-", "ok": False, "result": f"ERROR {type(e).__name__}: {e}"})
        print(f"[{section}] {time.perf_counter() - t0:.0f} s", flush=True)
    table = markdown_table([("section", "section"), ("check", "check"), ("result", "result"), ("ok", "pass")],
                           [{**r, "ok": "PASS" if r["ok"] else "FAIL"} for r in rows])
    title = f"# GPU check{' (--cpu-smoke: tiny sizes on the CPU)' if args.cpu_smoke else ''} ({machine_name()})"
    print("\n" + title + "\n\n" + table + f"\n\nwhole check {time.perf_counter() - t_start:.0f} s", flush=True)
    if args.out is not None:
        write_report("gpu_check", {"cpu_smoke": args.cpu_smoke, "rows": rows, "tolerances":
                                   {"kernel_rel": TOL, "loss_rtol": LOSS_RTOL, "weight_rtol": WEIGHT_RTOL},
                                   "seconds": time.perf_counter() - t_start}, title + "\n\n" + table + "\n", out=args.out)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
