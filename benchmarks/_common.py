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
if str(REPO) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the repo
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
