"""Helpers shared by the benchmarks: the machine's description, repeat-timing with median and spread,
and a writer for `benchmarks/results/<name>.json` + `<name>.md` (written atomically).

Typical use:
    times = repeat(lambda: work(), repeats=5, warmup=1)
    row = {"case": "x", "time": summarise(times)}
    write_report("storage", title="...", rows=rows, columns=[("case", "case"), ...], meta={...})
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
# `python benchmarks/x.py` puts benchmarks/ first, whose storage.py would shadow the `storage` package: the
# repo goes in front of it even when PYTHONPATH already lists it further back (torchrun children do).
if str(REPO) in sys.path:
    sys.path.remove(str(REPO))
sys.path.insert(0, str(REPO))

from storage.atomic import atomic_write_bytes, atomic_write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Host, CPU model, cores, memory, Python, and torch/GPU only if torch is already imported
    (so a benchmark that does not need torch does not pay for importing it)."""
    cpu = "unknown"
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    info: dict[str, Any] = {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
                            "python": platform.python_version(), "platform": platform.platform()}
    try:
        kib = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1))
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, AttributeError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_name(info: dict[str, Any] | None = None) -> str:
    """One line: "<cpu> (<cores> cores, <mem> GiB[, GPU <name>])"."""
    m = info or machine()
    s = f"{m['cpu']} ({m['cores']} cores"
    if "memory_gib" in m:
        s += f", {m['memory_gib']} GiB"
    if "gpu" in m:
        s += f", GPU {m['gpu']}"
    return s + ")"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def repeat(fn: Callable[[], Any], *, repeats: int, warmup: int = 0, setup: Callable[[], Any] | None = None) -> list[float]:
    """Wall-clock seconds of `fn()` over `repeats` runs after `warmup` unmeasured ones;
    `setup()` (unmeasured) runs before each call."""
    out = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        if i >= warmup:
            out.append(t)
    return out


def summarise(xs: Sequence[float]) -> dict[str, float]:
    """median, min, max, and spread = (max - min) / median (0 for a single value)."""
    if not xs:
        raise ValueError("no measurements")
    med = statistics.median(xs)
    return {"median": med, "min": min(xs), "max": max(xs), "n": len(xs),
            "spread": (max(xs) - min(xs)) / med if med else 0.0}


def rate(amount: float, seconds: dict[str, float]) -> dict[str, float]:
    """A throughput (amount per second) from a time summary: median, and the range [min, max]."""
    return {"median": amount / seconds["median"], "min": amount / seconds["max"], "max": amount / seconds["min"]}


def fmt_range(s: dict[str, float], digits: int = 0) -> str:
    """"median [min-max]" of a summary."""
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'])} [{f.format(s['min'])}-{f.format(s['max'])}]"


def markdown_table(columns: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table; `columns` = [(key, header)], cells already formatted (str) or plain values."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines)


def write_report(name: str, report: dict[str, Any], markdown: str, *, out: Path = RESULTS) -> tuple[Path, Path]:
    """Write `<out>/<name>.json` (report + date, command, machine, commit) and `<out>/<name>.md`."""
    out.mkdir(parents=True, exist_ok=True)
    full = {"benchmark": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "commit": git_commit(), "machine": machine(), **report}
    header = (f"Machine: {machine_name(full['machine'])}. Date: {full['date']}. Commit: {full['commit']}. "
              f"Command: `{full['command']}`.\n\n")
    jp, mp = out / f"{name}.json", out / f"{name}.md"
    atomic_write_json(jp, full)
    text = markdown.split("\n", 1)
    md = text[0] + "\n\n" + header + (text[1].lstrip("\n") if len(text) > 1 else "")
    atomic_write_bytes(mp, md.encode())
    return jp, mp


# ---------------------------------------------------------------------------------------------
# the training step's inputs without a run folder (micro-benchmarks and scripts/gpu_check.sh)


def hand_run(cfg, bundle, device=None, reference=None):
    """A `pipeline.trainer.Run` built by hand (no run folder, no logs, one process): what the step
    functions (score_superbatch, select_subbatch, train_step) need. The model is moved to `device`."""
    import torch

    from pipeline.trainer import Run, build_optimizer

    device = torch.device(device or "cpu")
    bundle.model.to(device)
    opt, sched = build_optimizer(cfg, bundle.model)
    return Run(cfg=cfg, device=device, bundle=bundle, opt=opt, sched=sched, reference=reference)


def synthetic_superbatch(bundle, n: int, *, seed: int = 0, ref_dim: int | None = None, step: int = 0):
    """A `pipeline.data.SuperBatch` of n made-up candidates for `bundle`: random uint8 pixels at the
    model's size, captions of 6-20 words (tokenised by the bundle, so text runs at the batch's length as
    in training), and, with `ref_dim`, random L2-normalised reference rows (float16, as caches store them).
    Timing does not depend on the values; selection costs the same whatever the scores are."""
    import numpy as np
    import torch

    from pipeline.data import SuperBatch

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "circle", "star", "ring", "above", "below", "small", "large", "three", "a"]
    captions = [" ".join(rng.choice(words, size=int(rng.integers(6, 21)))) for _ in range(n)]
    size = bundle.image_size
    reference = None
    if ref_dim:
        rows = [torch.nn.functional.normalize(torch.randn(n, ref_dim, generator=g), dim=1).half() for _ in range(2)]
        reference = (rows[0], rows[1])
    return SuperBatch(step=step, images=torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                      tokens=bundle.tokenizer(captions), uids=np.asarray([f"{i:032x}" for i in range(n)], dtype=object),
                      noisy=torch.zeros(n, dtype=torch.bool), reference=reference, teachers=[])
