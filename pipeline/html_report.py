"""What the curation did, as one self-contained HTML page of one or more runs (`aced report`).

For each run it shows, from the run folder alone (config.json, the metrics and selections logs of
storage/runlog.py, eval/results.json) and the run's training datasets (images looked up by uid through
storage/shards.py's readers):
  - the evaluation table of the runs side by side (percentages, readable names, n/a where unknown);
  - the noisy-fraction curves: super-batch vs the selected (trained) batch, per run, "n/a" where the
    training data records no noise;
  - the score distributions of the selected vs all candidates over training (median and 10-90% band
    per logged step; histograms at the last logged step);
  - thumbnails and captions of the highest- and lowest-scored candidates at a few logged steps
    (section 3.2's per-candidate records: self_score = s(x, x), selected, noisy);
  - the training curves of `pipeline.report.runs_figure` (one colour per run in every panel).

Everything is inline: images and plots as data: URIs, CSS in the page, no script and no external
fetch, so the file can be mailed, archived or opened from a Prefect artifact link as it is.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.recipes import TrainConfig
from pipeline.report import NA, format_value, metric_label, read_metrics, run_colours, runs_figure, summary_metrics
from storage.atomic import atomic_write_bytes
from storage.runlog import SELECTIONS_SCHEMA
from storage.shards import ShardError, decode_image, iter_samples, load_dataset, read_metadata


THUMB_PX = 112
"""Longest side of a thumbnail, in CSS pixels (the image is scaled to fit a THUMB_PX square)."""
SCORE = "self_score"
"""The logged score the page ranks and plots: s(x, x), the rule's score of each candidate on its own
(learnability for h-acid). It is on one scale for every candidate, unlike the score each was sampled with
(a selected candidate's from the round that picked it, the others' from the last round)."""
BAND_STEPS = 120
"""At most this many logged steps are read for the score bands (evenly spaced): a long run's log
may hold every candidate of every step."""


@dataclass
class RunView:
    """What the page shows of one run, read once."""

    name: str
    run_dir: Path
    config: TrainConfig
    metrics: dict[str, list] | None
    """Per-step metrics (columns), None before the first flush."""
    evals: dict[str, float]
    """`pipeline.report.summary_metrics` of eval/results.json ({} when not evaluated)."""
    selections: pads.Dataset | None
    """The per-candidate selection log, None for a run that selects nothing (or has logged nothing yet)."""
    logged_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def steps_done(self) -> int:
        return int(self.metrics["step"][-1]) + 1 if self.metrics and self.metrics["step"] else 0

    def noise_known(self) -> bool:
        return self.metrics is not None and any(v is not None for v in self.metrics.get("noisy_frac_superbatch", []))

    def tail_mean(self, key: str, frac: float = 0.2) -> float | None:
        """Mean of metric `key` over the last `frac` of the logged steps (None: unknown or absent)."""
        if not self.metrics or key not in self.metrics:
            return None
        vals = self.metrics[key][-max(1, int(len(self.metrics[key]) * frac)):]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None


def load_run(run_dir: Path, name: str | None = None) -> RunView:
    """A run folder as the page sees it; FileNotFoundError when it is not a run folder (no config.json),
    ValueError naming the file when its config is not a valid one."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.json)")
    try:
        config = TrainConfig.from_json(cfg_file)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_file}: not a valid run config ({e})") from None
    try:
        metrics = read_metrics(run_dir).to_pydict()
    except FileNotFoundError:
        metrics = None
    res_file = run_dir / "eval" / "results.json"
    evals = {}
    if res_file.is_file():
        try:
            evals = summary_metrics(json.loads(res_file.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{res_file}: not an evaluation results file ({type(e).__name__}: {e})") from None
    parts = sorted((run_dir / "selections").glob("part-*.parquet"))
    selections, logged = None, np.zeros(0, dtype=np.int64)
    if parts:
        selections = pads.dataset([str(p) for p in parts], schema=SELECTIONS_SCHEMA, format="parquet")
        logged = np.unique(selections.to_table(columns=["step"]).column("step").to_numpy())
        if not len(logged):
            selections = None
    return RunView(name=name or run_dir.name, run_dir=run_dir, config=config, metrics=metrics, evals=evals,
                   selections=selections, logged_steps=logged)


# ---------------------------------------------------------------------------------------------
# reading the selection log


def _spread(steps: np.ndarray, n: int) -> np.ndarray:
    """At most `n` of the sorted `steps`, evenly spaced, first and last included."""
    if len(steps) <= n:
        return steps
    return steps[np.unique(np.linspace(0, len(steps) - 1, n).round().astype(int))]


def _rows_at(run: RunView, steps: np.ndarray, columns: list[str]) -> pa.Table:
    """The logged rows of `steps` (columns `step` + `columns`), sorted by step."""
    columns = ["step", *(c for c in columns if c != "step")]
    table = run.selections.to_table(columns=columns, filter=pc.field("step").isin(pa.array(steps, pa.int64())))
    return table.sort_by("step")


def score_bands(run: RunView) -> dict[str, np.ndarray]:
    """Per logged step (at most BAND_STEPS of them): 10/50/90% quantiles of the score of all candidates
    and of the selected ones. Non-finite scores are left out."""
    steps = _spread(run.logged_steps, BAND_STEPS)
    t = _rows_at(run, steps, ["step", SCORE, "selected"])
    step = t.column("step").to_numpy()
    score = t.column(SCORE).to_numpy(zero_copy_only=False).astype(np.float64)
    selected = t.column("selected").to_numpy(zero_copy_only=False)
    out = {"step": steps, "all": np.full((len(steps), 3), np.nan), "selected": np.full((len(steps), 3), np.nan)}
    bounds = np.searchsorted(step, steps, side="left").tolist() + [len(step)]
    for i in range(len(steps)):
        s, sel = score[bounds[i]:bounds[i + 1]], selected[bounds[i]:bounds[i + 1]]
        ok = np.isfinite(s)
        for key, mask in (("all", ok), ("selected", ok & sel)):
            if mask.any():
                out[key][i] = np.quantile(s[mask], [0.1, 0.5, 0.9])
    return out


def extremes(run: RunView, steps: np.ndarray, k: int) -> dict[int, dict[str, list[dict]]]:
    """{step: {"highest": rows, "lowest": rows}}: the k highest- and lowest-scored logged candidates."""
    t = _rows_at(run, steps, ["step", "uid", SCORE, "selected", "noisy"]).to_pylist()
    out: dict[int, dict[str, list[dict]]] = {}
    for step in steps.tolist():
        rows = [r for r in t if r["step"] == step and r[SCORE] is not None and math.isfinite(r[SCORE])]
        rows.sort(key=lambda r: r[SCORE], reverse=True)
        out[step] = {"highest": rows[:k], "lowest": rows[::-1][:k]}
    return out


def find_pairs(dataset_dirs: Sequence[str | Path], uids: set[str]) -> tuple[dict[str, tuple[bytes, str]], list[str]]:
    """({uid: (image bytes, caption)}, problems) for the `uids` found in the datasets, read through
    storage.shards (checksums and all): only shards whose metadata lists a wanted uid are opened.
    A dataset that cannot be read is a problem line for the page, not a failed report."""
    found: dict[str, tuple[bytes, str]] = {}
    problems: list[str] = []
    remaining = set(uids)
    for d in dataset_dirs:
        if not remaining:
            break
        try:
            shards = load_dataset(d).shards
        except (ShardError, OSError) as e:
            problems.append(f"dataset {d}: {e}")
            continue
        for shard in shards:
            if not remaining:
                break
            try:
                hit = pc.is_in(read_metadata(shard).column("uid"), value_set=pa.array(sorted(remaining), pa.string()))
                if not pc.any(hit).as_py():
                    continue
                for sample in iter_samples(shard, on_error="skip"):
                    if sample.uid in remaining:
                        found[sample.uid] = (sample.image_bytes, sample.caption)
                        remaining.discard(sample.uid)
            except (ShardError, OSError) as e:
                problems.append(f"shard {shard.tar_path}: {e}")
    if remaining:
        problems.append(f"{len(remaining)} logged candidate(s) not found in the run's training data "
                        f"({', '.join(str(d) for d in dataset_dirs)})")
    return found, problems


# ---------------------------------------------------------------------------------------------
# images as data: URIs


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail(image_bytes: bytes, where: str = "") -> tuple[str, int, int]:
    """(JPEG data: URI, width, height) of the image scaled to fit a THUMB_PX square (small images are
    scaled up, so a 32-pixel synthetic image is still visible)."""
    from PIL import Image

    im = decode_image(image_bytes, where=where)
    scale = THUMB_PX / max(im.size)
    w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return _data_uri(buf.getvalue(), "image/jpeg"), w, h


PAGE_PX = 1180
"""Widest image on the page, in CSS pixels: a wider plot is shown scaled down to it."""


def _figure_uri(fig) -> tuple[str, int, int]:
    """(PNG data: URI, display width, height) of a matplotlib figure, which is closed."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)  # one figure inch = 96 CSS pixels: most plots show at their own size
    plt.close(fig)
    w, h = Image.open(io.BytesIO(buf.getvalue())).size
    if w > PAGE_PX:
        w, h = PAGE_PX, round(h * PAGE_PX / w)
    return _data_uri(buf.getvalue(), "image/png"), w, h


# ---------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def noise_figure(runs: list[RunView], colours: dict[str, str]):
    """Noisy fraction of the super-batch (dashed) and of the selected batch (solid), one colour per run."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    plt = _plt()
    fig, ax = plt.subplots(figsize=(11.5, 3.4))
    unknown = []
    for run in runs:
        m = run.metrics
        if not run.noise_known():
            unknown.append(run.name)
            continue
        sb, sel = ([math.nan if v is None else v for v in m.get(k, [])] for k in ("noisy_frac_superbatch",
                                                                                 "noisy_frac_selected"))
        if sb == sel:  # IID: the trained batch is the super-batch
            ax.plot(m["step"], sel, color=colours[run.name], label=f"{run.name}: trained batch (no selection)")
            continue
        ax.plot(m["step"], sb, "--", color=colours[run.name], label=f"{run.name}: super-batch", linewidth=1.0)
        ax.plot(m["step"], sel, color=colours[run.name], label=f"{run.name}: selected", linewidth=1.6)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("noisy pairs")
    ax.grid(alpha=0.3)
    if unknown:
        ax.text(0.01, 0.97, f"{NA} (noise unknown): " + ", ".join(unknown), transform=ax.transAxes, va="top",
                fontsize=9, color="0.35")
    if ax.lines:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def score_figure(runs: list[RunView], colours: dict[str, str]):
    """One row per selecting run: score quantiles over training (all candidates grey, selected in the
    run's colour; line = median, band = 10-90%), and histograms at the last logged step."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, axes = plt.subplots(len(runs), 2, figsize=(11.5, 2.9 * len(runs)), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1]})
    for run, (ax, hx) in zip(runs, axes):
        bands = score_bands(run)
        for key, colour in (("all", "0.55"), ("selected", colours[run.name])):
            q = bands[key]
            ax.fill_between(bands["step"], q[:, 0], q[:, 2], color=colour, alpha=0.25, linewidth=0)
            ax.plot(bands["step"], q[:, 1], color=colour, label=f"{key} candidates" if key == "all" else "selected")
        ax.set_title(f"{run.name}: own score s(x, x) over training (median, 10-90%)", fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        last = int(run.logged_steps[-1])
        t = _rows_at(run, np.array([last]), [SCORE, "selected"])
        score = t.column(SCORE).to_numpy(zero_copy_only=False).astype(np.float64)
        sel = t.column("selected").to_numpy(zero_copy_only=False)
        ok = np.isfinite(score)
        bins = np.histogram_bin_edges(score[ok], bins=24) if ok.any() else 10
        hx.hist(score[ok], bins=bins, color="0.55", alpha=0.6, label="all")
        hx.hist(score[ok & sel], bins=bins, color=colours[run.name], alpha=0.8, label="selected")
        hx.set_title(f"step {last}", fontsize=9)
        hx.set_xlabel("own score s(x, x)")
        hx.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# the page

_CSS = """
body { font-family: system-ui, -apple-system, 'DejaVu Sans', sans-serif; margin: 24px; color: #222; max-width: 1240px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 6px; } h4 { font-size: 13px; margin: 10px 0 4px; color: #444; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 5px; vertical-align: -1px; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; margin-bottom: 6px; }
.card { width: 150px; border: 1px solid #ddd; border-radius: 4px; padding: 4px; font-size: 11px; background: #fafafa; }
.card .img { width: 150px; height: 112px; display: flex; align-items: center; justify-content: center; background: #eee; }
img { display: block; }  /* block boxes: an image's place is its own size, nothing from the line box */
.cap { margin-top: 3px; line-height: 1.25; max-height: 5em; overflow: hidden; }
.badge { display: inline-block; padding: 0 4px; border-radius: 3px; margin: 2px 2px 0 0; font-size: 10px; }
.sel { background: #d4edda; } .unsel { background: #eee; } .noisy { background: #f8d7da; } .clean { background: #e2ecf7; }
.unknown { background: #fff3cd; } .note { color: #666; font-size: 12px; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _img(uri: str, w: int, h: int, alt: str) -> str:
    return f'<img src="{uri}" width="{w}" height="{h}" alt="{_esc(alt)}">'


def _eval_table(runs: list[RunView], colours: dict[str, str]) -> str:
    keys = list(dict.fromkeys(k for r in runs for k in r.evals))
    rows: list[tuple[str, list[str]]] = []
    rows.append(("method", [_esc(r.config.method) for r in runs]))
    rows.append(("model", [_esc(r.config.model) for r in runs]))
    rows.append(("steps trained", [f"{r.steps_done} / {r.config.steps}" for r in runs]))
    rows.append(("batch (selected of super-batch)", [
        f"{r.config.batch_size}" + (f" of {r.config.superbatch_size}" if r.config.spec.selection else "")
        for r in runs]))
    for k in keys:
        rows.append((_esc(metric_label(k)), [format_value(k, r.evals[k]) if k in r.evals else "not evaluated"
                                             for r in runs]))
    for key in ("noisy_frac_superbatch", "noisy_frac_selected"):
        label = metric_label(key) + " (last 20% of steps)"
        rows.append((_esc(label), [format_value(key, r.tail_mean(key) if r.noise_known() else None) for r in runs]))
    head = "".join(f'<th><span class="swatch" style="background:{colours[r.name]}"></span>{_esc(r.name)}</th>'
                   for r in runs)
    body = "".join(f"<tr><th>{name}</th>" + "".join(f'<td class="num">{c}</td>' for c in cells) + "</tr>"
                   for name, cells in rows)
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _card(row: dict, pairs: dict[str, tuple[bytes, str]], problems: list[str]) -> str:
    uid = row["uid"]
    badges = ['<span class="badge sel">selected</span>' if row["selected"] else
              '<span class="badge unsel">not selected</span>']
    badges.append({True: '<span class="badge noisy">swapped caption</span>',
                   False: '<span class="badge clean">clean</span>'}.get(row["noisy"],
                  '<span class="badge unknown">noise unknown</span>'))
    if uid in pairs:
        image, caption = pairs[uid]
        try:
            uri, w, h = thumbnail(image, where=f"uid={uid}")
            picture = _img(uri, w, h, caption)
        except ValueError as e:
            problems.append(str(e))
            picture = "image not decodable"
    else:
        caption, picture = "(not found in the training data)", "image not found"
    short = caption if len(caption) <= 140 else caption[:137] + "..."
    return (f'<div class="card"><div class="img">{picture}</div><div>score {row[SCORE]:.4g}</div>'
            f'<div>{"".join(badges)}</div><div class="cap" title="{_esc(caption)}">{_esc(short)}</div>'
            f'<div class="note">uid {_esc(uid[:12])}…</div></div>')


def _candidates_section(run: RunView, steps: int, per_step: int) -> str:
    chosen = _spread(run.logged_steps, steps)
    ext = extremes(run, chosen, per_step)
    uids = {r["uid"] for e in ext.values() for rows in e.values() for r in rows}
    pairs, problems = find_pairs(run.config.train_data, uids)
    parts = [f"<h3>{_esc(run.name)}</h3>"]
    for step, e in ext.items():
        for which in ("highest", "lowest"):
            parts.append(f"<h4>step {step}: {which}-scored candidates</h4>")
            parts.append('<div class="cards">' + "".join(_card(r, pairs, problems) for r in e[which]) + "</div>")
    if problems:
        parts.append('<p class="note">' + "<br>".join(_esc(p) for p in dict.fromkeys(problems)) + "</p>")
    return "\n".join(parts)


def render_html(runs: list[RunView], *, steps: int = 3, per_step: int = 6) -> str:
    """The page (a str) for `runs`, in that order and colour order."""
    colours = run_colours([r.name for r in runs])
    title = "aced report: " + ", ".join(r.name for r in runs)
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{_esc(title)}</h1>",
           '<p class="note">Runs: ' + "; ".join(f'<span class="swatch" style="background:{colours[r.name]}"></span>'
                                               f"{_esc(r.name)} ({_esc(r.run_dir)})" for r in runs) + "</p>",
           "<h2>Evaluation</h2>", _eval_table(runs, colours)]
    with_metrics = [r for r in runs if r.metrics]
    out.append("<h2>Noisy pairs: super-batch vs selected batch</h2>")
    if with_metrics:
        out.append(_img(*_figure_uri(noise_figure(with_metrics, colours)), "noisy fraction curves"))
    missing = [r.name for r in runs if not r.metrics]
    if missing:
        out.append(f'<p class="note">no metrics flushed yet: {_esc(", ".join(missing))}</p>')
    selecting = [r for r in runs if r.selections is not None]
    out.append("<h2>Selection scores: selected vs all candidates</h2>")
    if selecting:
        out.append(_img(*_figure_uri(score_figure(selecting, colours)), "score distributions"))
    silent = [r.name for r in runs if r.selections is None]
    if silent:
        out.append(f'<p class="note">no selection log (the method selects nothing, logging is off, or nothing is '
                   f'flushed yet): {_esc(", ".join(silent))}</p>')
    out.append("<h2>Highest- and lowest-scored candidates</h2>")
    out.append('<p class="note">The score is each candidate\'s own score s(x, x) under the method\'s rule (for '
               'h-acid its learnability: student loss minus reference loss; higher: preferred). Selection itself '
               'samples with conditional scores that also see the pairs already chosen. From the run\'s selection '
               'log, which may hold a sample of each super-batch.</p>')
    out += [_candidates_section(r, steps, per_step) for r in selecting]
    if with_metrics:
        out.append("<h2>Training curves</h2>")
        evals = {r.name: r.evals for r in with_metrics if r.evals} or None
        out.append(_img(*_figure_uri(runs_figure({r.name: r.run_dir for r in with_metrics}, evals=evals, ncols=2)),
                        "training curves"))
    out.append("</body></html>")
    return "\n".join(out)


def write_html_report(run_dirs: Sequence[str | Path], out: str | Path, *, names: Sequence[str] | None = None,
                      overwrite: bool = False, steps: int = 3, per_step: int = 6) -> Path:
    """Write the page of the runs in `run_dirs` to `out` (atomically). An existing `out` is replaced only
    with `overwrite` (FileExistsError otherwise). `names` label the runs (default: folder names; repeated
    names get the parent folder's name added)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    if not run_dirs:
        raise ValueError("no runs given")
    dirs = [Path(d) for d in run_dirs]
    labels = list(names) if names else [d.name for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [f"{d.parent.parent.name}/{d.name}" for d in dirs]  # <root>/runs/<name>: the workspace's name
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    runs = [load_run(d, label) for d, label in zip(dirs, labels)]
    page = render_html(runs, steps=steps, per_step=per_step)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, page.encode("utf-8"))
    return out
