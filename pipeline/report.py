"""Run reports: training curves as a PNG and comparison tables as Markdown (no Prefect here)."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import atomic_write_bytes


def read_metrics(run_dir: Path) -> pa.Table:
    """All flushed per-step metrics of a run, sorted by step."""
    files = sorted((Path(run_dir) / "metrics").glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no metrics written yet")
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
    return table.sort_by("step")


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_runs(runs: Mapping[str, Path], out_png: Path, *, evals: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Training curves of several runs side by side: loss terms, selected noisy fraction, eval metrics."""
    import matplotlib

    matplotlib.use("Agg")  # headless; never needs a display
    import matplotlib.pyplot as plt

    panels = ["contrastive", "kd", "noisy_frac_selected"]
    n = len(panels) + (1 if evals else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4))
    for name, run_dir in runs.items():
        table = read_metrics(run_dir).to_pydict()
        steps = table["step"]
        window = max(1, len(steps) // 25)
        for ax, key in zip(axes, panels):
            if key in table and any(v is not None for v in table[key]):
                vals = [float("nan") if v is None else v for v in table[key]]
                ax.plot(steps, _smooth(vals, window), label=name)
    for ax, key in zip(axes, panels):
        ax.set_title({"contrastive": "contrastive loss (B_CE)", "kd": "distillation loss (B_KD)",
                      "noisy_frac_selected": "noisy fraction of trained batch"}[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if evals:
        ax = axes[-1]
        names = list(evals)
        metrics = sorted({k for v in evals.values() for k in v})
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            ax.bar([j + i * width for j in range(len(metrics))],
                   [evals[name].get(m, math.nan) for m in metrics], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics, rotation=30, ha="right")
        ax.set_title("held-out evaluation")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return Path(out_png)


def summary_metrics(results: Mapping) -> dict[str, float]:
    """The numbers a comparison table shows per evaluation of `pipeline.evaluate.evaluate` results:
    zero-shot top-1, and for retrieval the mean of the six recalls (R@1/5/10 both ways) plus both R@1."""
    out: dict[str, float] = {}
    for name, ev in results.get("evals", {}).items():
        m = ev["metrics"]
        if ev["kind"] == "zeroshot":
            out[f"{name}:top1"] = float(m["top1"])
        else:
            out[f"{name}:mean_recall"] = float(m["mean_recall"])
            out[f"{name}:i2t_r1"] = float(m["i2t_r1"])
            out[f"{name}:t2i_r1"] = float(m["t2i_r1"])
    return out


def markdown_table(rows: Mapping[str, Mapping[str, float | str]], *, columns: Sequence[str] | None = None,
                   digits: int = 4) -> str:
    """{row name: {column: value}} as a Markdown table (missing cells blank)."""
    cols = list(columns) if columns else sorted({c for r in rows.values() for c in r})
    lines = ["| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in rows.items():
        cells = []
        for c in cols:
            v = row.get(c, "")
            cells.append(f"{v:.{digits}g}" if isinstance(v, float) else str(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
