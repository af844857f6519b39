"""Run reports: training curves as a PNG and comparison tables as Markdown (no Prefect here).

One language for every table and plot of a run or a comparison: fractions (accuracies, recalls, noisy
fractions) are shown as percentages, metric keys under readable names (`metric_label`), a value that is
unknown (a dataset whose noise was never recorded) as "n/a", and every run in one colour in every panel
(`run_colours`), so a run is the same line in the loss, distillation, noise and evaluation panels.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import atomic_write_bytes

NA = "n/a"
"""How a table shows a value that is unknown (None), e.g. the noisy fraction of a dataset without noise flags."""

_LABELS = {
    "contrastive": "contrastive loss",
    "kd": "distillation loss",
    "total": "total loss",
    "noisy_frac_selected": "noisy in trained batch",
    "noisy_frac_superbatch": "noisy in super-batch",
    "noisy_frac_trained": "noisy in trained batch (last 20% of steps)",
    "score_mean_all": "mean score, all candidates",
    "score_mean_selected": "mean score, selected",
    "pairs_per_s": "pairs/s",
    "lr": "learning rate",
}
# The per-evaluation keys of `summary_metrics` ("<eval>:<metric>").
_EVAL_LABELS = {
    "top1": "zero-shot top-1",
    "top5": "zero-shot top-5",
    "mean_recall": "retrieval mean R@1/5/10",
    "i2t_r1": "image→text R@1",
    "t2i_r1": "text→image R@1",
}
_FRACTION_KEYS = {"noisy_frac_selected", "noisy_frac_superbatch", "noisy_frac_trained"}


def metric_label(key: str) -> str:
    """The readable name of a metric key: `test-retrieval:mean_recall` -> `test: retrieval mean R@1/5/10`,
    `noisy_frac_trained` -> `noisy in trained batch (last 20% of steps)`; unknown keys are returned as they are."""
    if key in _LABELS:
        return _LABELS[key]
    name, sep, metric = key.rpartition(":")
    if sep and metric in _EVAL_LABELS:
        for suffix in ("-zeroshot", "-retrieval", ":zeroshot", ":retrieval"):
            name = name.removesuffix(suffix)
        return f"{name}: {_EVAL_LABELS[metric]}"
    return key


def is_fraction(key: str) -> bool:
    """Whether `key` holds a fraction in [0, 1] (shown as a percentage)."""
    return key in _FRACTION_KEYS or key.rpartition(":")[2] in _EVAL_LABELS


def format_value(key: str, value: float | str | None, *, digits: int = 4) -> str:
    """One table cell: fractions as percentages with one decimal, other numbers with `digits` significant
    digits, None as "n/a"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{100 * value:.1f}%" if is_fraction(key) else f"{value:.{digits}g}"
    return str(value)


def run_colours(names: Sequence[str]) -> dict[str, str]:
    """One colour per run, fixed by its position in `names`, used in every panel (matplotlib's own colour
    cycle restarts per axes, so a run missing from one panel would shift every later run's colour there)."""
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


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


def _series(table: dict, key: str) -> list[float] | None:
    """The column `key` with None as NaN, or None when the run has no value of it at all (no KD term,
    unknown noise)."""
    if key not in table or all(v is None for v in table[key]):
        return None
    return [math.nan if v is None else float(v) for v in table[key]]


_PANELS = {"contrastive": "contrastive loss (B_CE)", "kd": "distillation loss (B_KD)",
           "noisy_frac_selected": "noisy pairs (solid: trained batch, dashed: super-batch)"}


def runs_figure(runs: Mapping[str, Path], *, evals: Mapping[str, Mapping[str, float]] | None = None,
                ncols: int | None = None):
    """The matplotlib Figure of `plot_runs` (each line and bar labelled with its run's name); the panels
    in one row, or in rows of `ncols`."""
    import matplotlib

    matplotlib.use("Agg")  # headless; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    names = list(runs)
    colours = run_colours(names)
    n = len(_PANELS) + (1 if evals else 0)
    cols = min(n, ncols or n)
    rows = math.ceil(n / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows + 0.4), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.remove()
    axes = axes[:n]
    missing: dict[str, list[str]] = {key: [] for key in _PANELS}
    for name, run_dir in runs.items():
        table = read_metrics(run_dir).to_pydict()
        steps = table["step"]
        window = max(1, len(steps) // 25)
        for ax, key in zip(axes, _PANELS):
            vals = _series(table, key)
            if vals is None:
                missing[key].append(name)
                continue
            ax.plot(steps, _smooth(vals, window), label=name, color=colours[name])
            sb = _series(table, "noisy_frac_superbatch") if key == "noisy_frac_selected" else None
            if sb is not None and sb != vals:  # (IID: the trained batch is the super-batch; one line)
                ax.plot(steps, _smooth(sb, window), label=name, color=colours[name], linestyle="--", linewidth=0.9)
    for ax, (key, title) in zip(axes, _PANELS.items()):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if key.startswith("noisy"):
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if missing[key]:
            why = "no distillation term" if key == "kd" else "noise unknown" if key.startswith("noisy") else "no values"
            ax.text(0.02, 0.02, f"{NA} ({why}): " + ", ".join(missing[key]), transform=ax.transAxes, fontsize=7,
                    color="0.4", va="bottom", wrap=True)
    if evals:
        ax = axes[-1]
        metrics = list(dict.fromkeys(k for v in evals.values() for k in v))
        width = 0.8 / max(1, len(evals))
        for i, name in enumerate(evals):
            vals = [evals[name].get(m) for m in metrics]
            ax.bar([j + i * width for j in range(len(metrics))],
                   [math.nan if v is None else 100 * v if is_fraction(m) else v for m, v in zip(metrics, vals)],
                   width, label=name, color=colours.get(name, "0.5"))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], [metric_label(m) for m in metrics],
                      rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("%")
        ax.set_title("held-out evaluation", fontsize=9)
    # One legend for the figure: every run once, in its colour (a run absent from the first panel is still named).
    handles = [matplotlib.lines.Line2D([], [], color=colours[name], label=name) for name in names]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(names), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (3.6 * rows + 0.4)))
    return fig


def plot_runs(runs: Mapping[str, Path], out_png: Path, *, evals: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Training curves of several runs side by side: loss terms, noisy fractions, eval metrics; one colour per run."""
    import matplotlib.pyplot as plt

    fig = runs_figure(runs, evals=evals)
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


def markdown_table(rows: Mapping[str, Mapping[str, float | str | None]], *, columns: Sequence[str] | None = None,
                   digits: int = 4) -> str:
    """{row name: {metric key: value}} as a Markdown table: readable column names (`metric_label`),
    fractions as percentages, None as "n/a", missing cells blank. Columns default to the keys in the
    order they first appear."""
    cols = list(columns) if columns else list(dict.fromkeys(c for r in rows.values() for c in r))
    lines = ["| run | " + " | ".join(metric_label(c) for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in rows.items():
        cells = [format_value(c, row[c], digits=digits) if c in row else "" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
