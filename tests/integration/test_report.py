"""Run reports on tiny real runs: the HTML page of `aced report` (self-contained, rendered by headless
Chromium as a person would open it), its link artifact in the train flow, and the main job's table and
plot (percentages, readable names, one colour per run in every panel, n/a for unknown noise).

The runs: the train flow (train -> evaluate -> publish -> html report) under Prefect's test harness, for
an IID run (no selection, no distillation) and an ACED run (selection + distillation) on the synthetic
pairs cached by a tiny reference and teacher; plus an H-ACID run (the trainer alone, not evaluated) on
the same pairs with their noise flags left out (what a plain import of real pairs records: noise unknown).
"""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import write_synthetic

CHROMIUM = Path("/usr/bin/chromium")
STEPS = 4
METHODS = ("iid", "aced-acidistill")


@pytest.fixture(scope="module")
def runs(cached_workspace, prefect_harness) -> dict:
    """{"root", "iid", "aced-acidistill", "unknown-noise": run folders, "heldout": dataset}: two runs
    through the train flow (4 steps, evaluated on 32 held-out pairs) and a 2-step H-ACID run on pairs
    whose noise is unknown."""
    import dataclasses

    import torch

    from flows.train_flow import train_flow
    from pipeline.ray_embed import embed_shards_plain, plan_cache
    from pipeline.recipes import recipe
    from pipeline.synthetic import generate_pairs
    from pipeline.trainer import train
    from storage.shards import write_shards

    root = cached_workspace
    heldout = write_synthetic(root, "heldout", 32, seed=5, start=50_000)
    out = {"root": root, "heldout": heldout}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in METHODS:
            cfg = recipe("tiny", method=method, train_data=(str(root / "datasets" / "synthetic"),), steps=STEPS,
                         checkpoint_every=2, cache_root=str(root / "cache"), reference="reference",
                         teacher=("teacher",))
            run_dir = root / "runs" / f"report-{method}"
            train_flow(json.loads(cfg.to_json()), str(run_dir), {"heldout-retrieval": ["retrieval", str(heldout)]})
            out[method] = run_dir
        # Pairs without noise flags: the trainer logs the noisy fractions (and the selections' flags) as null.
        pairs = [dataclasses.replace(s, noisy=None) for s in generate_pairs(96, seed=3, noise_frac=0.2, start=90_000)]
        write_shards(pairs, root / "datasets" / "unflagged", name="unflagged", source="synthetic",
                     samples_per_shard=48)
        embed_shards_plain(plan_cache(root, ["unflagged"], ["reference"]), chunk_size=48)
        cfg = recipe("tiny", method="h-acid", train_data=(str(root / "datasets" / "unflagged"),), steps=2,
                     checkpoint_every=2, cache_root=str(root / "cache"), reference="reference")
        out["unknown-noise"] = root / "runs" / "report-unknown-noise"
        train(cfg, out["unknown-noise"], progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


# ---------------------------------------------------------------------------------------------
# the HTML page


class _Page(HTMLParser):
    """Every <img> (attributes), tag names and the text of the page."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs: list[dict] = []
        self.tags: set[str] = set()
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def _aced(root: Path, *argv: str) -> int:
    from flows.cli import main

    return main(["--root", str(root), *argv])


def _dataset_captions(folder: Path) -> set[str]:
    from storage.shards import load_dataset, read_metadata

    return {c for s in load_dataset(folder).shards for c in read_metadata(s).column("caption").to_pylist()}


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory) -> dict:
    """`aced report` over the three runs."""
    out = tmp_path_factory.mktemp("report") / "report.html"
    names = ["report-iid", "report-aced-acidistill", "report-unknown-noise"]
    assert _aced(runs["root"], "report", *names, "--out", str(out)) == 0
    text = out.read_text()
    return {"path": out, "text": text, "parsed": _Page(text)}


def test_report_is_self_contained(page):
    text, parsed = page["text"], page["parsed"]
    assert parsed.imgs and all(i["src"].startswith("data:image/") for i in parsed.imgs)
    assert not parsed.tags & {"script", "link", "iframe", "object", "embed"}
    # nothing that a browser would fetch: no URL scheme other than data:, no CSS url()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", text), "a non-data: reference"
    assert "url(" not in text and "@import" not in text
    for img in parsed.imgs:  # every inline image decodes
        from PIL import Image

        head, _, payload = img["src"].partition(",")
        im = Image.open(io.BytesIO(base64.b64decode(payload)))
        im.load()
        w, h = int(img["width"]), int(img["height"])
        assert head in ("data:image/png;base64", "data:image/jpeg;base64")
        # shown at its own size, or (a wide plot) scaled down to the page's width keeping its shape
        assert (im.width, im.height) == (w, h) or (im.width > w and abs(im.height * w / im.width - h) <= 1)


def test_report_shows_candidates_of_the_selecting_run_with_their_captions(page, runs):
    parsed = page["parsed"]
    thumbs = [i for i in parsed.imgs if i["src"].startswith("data:image/jpeg")]
    # ACED: 3 of its 4 logged steps, H-ACID: its 2 logged steps; each 6 highest + 6 lowest
    assert len(thumbs) == (3 + 2) * 2 * 6
    synthetic = _dataset_captions(runs["root"] / "datasets" / "synthetic")
    unflagged = _dataset_captions(runs["root"] / "datasets" / "unflagged")
    # looked up by uid: each image carries its own pair's caption, from its run's own training data
    assert {t["alt"] for t in thumbs[:36]} <= synthetic and {t["alt"] for t in thumbs[36:]} <= unflagged
    body = " ".join(parsed.text)
    for step in (0, 2, 3):  # first, middle and last logged step (evenly spaced)
        assert f"step {step}: highest-scored candidates" in body and f"step {step}: lowest-scored candidates" in body
    assert "swapped caption" in body and "clean" in body and "selected" in body
    assert body.count("noise unknown") == 24  # the H-ACID run's cards: its data records no noise
    plots = [i for i in parsed.imgs if i["src"].startswith("data:image/png")]
    assert [p["alt"] for p in plots] == ["noisy fraction curves", "score distributions", "training curves"]


def test_report_tables_in_percent_with_na_for_unknown_noise(page):
    text = page["text"]
    table = text[text.index("<table>"):text.index("</table>")]
    rows = dict(re.findall(r"<tr><th>([^<]+)</th>(.*?)</tr>", table))
    cells = {name: re.findall(r'<td class="num">([^<]*)</td>', row) for name, row in rows.items()}
    recall = cells["heldout: retrieval mean R@1/5/10"]
    assert all(re.fullmatch(r"\d+\.\d%", c) for c in recall[:2]) and recall[2] == "not evaluated", recall
    for name in ("noisy in super-batch (last 20% of steps)", "noisy in trained batch (last 20% of steps)"):
        iid, aced, unknown = cells[name]
        assert re.fullmatch(r"\d+\.\d%", iid) and re.fullmatch(r"\d+\.\d%", aced) and unknown == "n/a", cells[name]
    assert cells["steps trained"] == [f"{STEPS} / {STEPS}"] * 2 + ["2 / 2"]
    assert cells["method"] == ["iid", "aced-acidistill", "h-acid"]
    assert "n/a (noise unknown)" not in text  # that note is drawn inside the plot, not written in the page
    assert re.search(r"no selection log \([^)]*\): report-iid<", text)


def test_report_numbers_match_the_runs(page, runs):
    """The trained-batch noise shown is the mean of the run's own last 20% of steps."""
    from pipeline.report import read_metrics

    m = read_metrics(runs["aced-acidistill"]).to_pydict()["noisy_frac_selected"]
    want = f"{100 * np.mean(m[-max(1, int(len(m) * 0.2)):]):.1f}%"
    row = re.search(r"<tr><th>noisy in trained batch \(last 20% of steps\)</th>(.*?)</tr>", page["text"]).group(1)
    assert re.findall(r'<td class="num">([^<]*)</td>', row)[1] == want


def test_report_cli_refuses_bad_input_and_to_replace_without_overwrite(runs, page, capsys, tmp_path):
    before = page["path"].read_bytes()
    assert _aced(runs["root"], "report", "report-iid", "--out", str(page["path"])) == 1
    assert "exists (pass --overwrite" in capsys.readouterr().err
    assert page["path"].read_bytes() == before
    one = tmp_path / "one.html"
    assert _aced(runs["root"], "report", "report-iid", "--out", str(one), "--overwrite") == 0  # nothing to replace
    first = one.read_bytes()
    assert _aced(runs["root"], "report", str(runs["iid"]), "--out", str(one), "--overwrite") == 0  # by folder path
    assert one.read_bytes() == first  # same run, same page
    assert _aced(runs["root"], "report", "no-such-run") == 1
    assert "run 'no-such-run'" in capsys.readouterr().err
    broken = tmp_path / "broken-run"
    broken.mkdir()
    (broken / "config.json").write_text('{"method": "no-such-method"}')
    assert _aced(runs["root"], "report", str(broken), "--out", str(tmp_path / "x.html")) == 1
    err = capsys.readouterr().err
    assert f"{broken / 'config.json'}: not a valid run config" in err and "no-such-method" in err
    assert not (tmp_path / "x.html").exists()


def test_report_of_a_running_run_before_its_first_checkpoint(runs, tmp_path):
    """`aced train` in a subprocess (200 steps, one checkpoint at the end): once its first metrics part is
    flushed, `aced report` shows the steps so far, its noise curve and candidates; then the run is killed."""
    import sys
    import time

    from tests.integration.conftest import REPO, aced_env

    root = runs["root"]
    run_dir = root / "runs" / "report-live"
    cmd = [sys.executable, "-m", "flows.cli", "--root", str(root), "train", "report-live", "--recipe", "tiny",
           "--method", "h-acid", "--data", "synthetic", "--reference", "reference", "--steps", "200",
           "--set", "checkpoint_every=200"]
    proc = subprocess.Popen(cmd, env=aced_env(OMP_NUM_THREADS="1"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not list((run_dir / "selections").glob("part-*.parquet")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        out = tmp_path / "live.html"
        assert _aced(root, "report", "report-live", "--out", str(out)) == 0
        assert proc.poll() is None and not (run_dir / "checkpoints" / "latest").exists()  # still before it
        text = out.read_text()
        done = int(re.search(r"<tr><th>steps trained</th><td class=\"num\">(\d+) / 200</td>", text).group(1))
        assert done >= 1
        alts = [i["alt"] for i in _Page(text).imgs]
        assert "noisy fraction curves" in alts and "score distributions" in alts
        assert sum(a in _dataset_captions(root / "datasets" / "synthetic") for a in alts) >= 12  # step 0's cards
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()


def test_train_flow_attaches_the_report_as_a_link_artifact(runs):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    for method in METHODS:
        report = runs[method] / "report.html"
        assert report.is_file() and _Page(report.read_text()).imgs
        key = f"report-report-{method}"
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        # Prefect stores a link artifact as Markdown: [text](link)
        assert arts and arts[0].data == f"[report-{method}: report.html]({report.resolve().as_uri()})", key


# ---------------------------------------------------------------------------------------------
# rendered, as a person opens it


def _screenshot(html: Path, png: Path, profile: Path, height: int) -> np.ndarray:
    from PIL import Image

    profile.mkdir(parents=True, exist_ok=True)
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           "--force-device-scale-factor=1", f"--user-data-dir={profile}", f"--screenshot={png}",
           f"--window-size=1280,{height}", html.resolve().as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and png.is_file(), p.stderr[-3000:]
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


def _rectangles(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of each filled axis-aligned rectangle in `mask` (disjoint, not touching)."""
    mask = mask.copy()
    found = []
    while mask.any():
        top = int(np.argmax(mask.any(axis=1)))
        left = int(np.argmax(mask[top]))
        right = left + int(np.argmin(np.append(mask[top, left:], False)))
        bottom = top + int(np.argmin(np.append(mask[top:, left], False)))
        found.append((top, left, bottom, right))
        mask[top:bottom, left:right] = False
    return found


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="headless Chromium (/usr/bin/chromium, Debian package chromium) "
                                                   "is not installed; scripts/env.sh installs it as root")
def test_chromium_renders_the_thumbnails_and_plots(page, tmp_path):
    """Screenshot of the page, and of the same page with every image swapped for a magenta block of its
    size (same layout: images are block boxes): the blocks say where each image is; there the real
    page must show a picture, not a blank box or a broken-image icon."""
    height = 9000
    shot = _screenshot(page["path"], tmp_path / "page.png", tmp_path / "profile-a", height)
    probe_html = tmp_path / "probe.html"
    probe_html.write_text(re.sub(r'<img src="data:[^"]*" width="(\d+)" height="(\d+)" alt="[^"]*">',
                                 r'<div style="width:\1px;height:\2px;background:#ff00ff"></div>', page["text"]))
    probe = _screenshot(probe_html, tmp_path / "probe.png", tmp_path / "profile-b", height)
    magenta = (probe[..., 0] == 255) & (probe[..., 1] == 0) & (probe[..., 2] == 255)
    boxes = _rectangles(magenta)
    imgs = page["parsed"].imgs
    assert len(boxes) == len(imgs), "every image is on the screenshot (the window is tall enough)"
    assert sorted((b - t, r - l) for t, l, b, r in boxes) == sorted((int(i["height"]), int(i["width"])) for i in imgs)
    last_content = int(np.nonzero((shot < 245).any(axis=(1, 2)))[0].max())
    assert last_content < height - 50, "the page fits the window"
    thumbs = plots = 0
    for top, left, bottom, right in boxes:
        region = shot[top:bottom, left:right]
        grey = region.mean(axis=2)
        if (bottom - top) <= 120:  # a thumbnail: a picture fills it (synthetic shapes on textured backgrounds)
            assert region.std() > 8 and (np.abs(region - np.array([238, 238, 238])).max(axis=2) > 20).mean() > 0.5, \
                (top, left)
            thumbs += 1
        else:  # a plot: white paper with dark axes/text and coloured lines
            dark = (grey < 100).mean()
            colourful = ((region.max(axis=2) - region.min(axis=2)) > 60).mean()
            assert 0.003 < dark < 0.3 and colourful > 0.002, ((top, left), dark, colourful)
            plots += 1
    assert thumbs == 60 and plots == 3


# ---------------------------------------------------------------------------------------------
# the main job's table and plot


def test_main_job_plot_one_colour_per_run_in_every_panel(runs):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from pipeline.report import runs_figure

    names = {"student-iid": runs["iid"], "student-aced-acidistill": runs["aced-acidistill"],
             "student-unknown": runs["unknown-noise"]}
    evals = {"student-iid": {"heldout-retrieval:mean_recall": 0.1}, "student-aced-acidistill":
             {"heldout-retrieval:mean_recall": 0.2}, "student-unknown": {"heldout-retrieval:mean_recall": 0.15}}
    fig = runs_figure(names, evals=evals)
    try:
        seen: dict[str, set[str]] = {}
        panels_with: dict[str, int] = {}
        for ax in fig.axes:
            for line in ax.get_lines():
                seen.setdefault(line.get_label(), set()).add(to_hex(line.get_color()))
                panels_with[line.get_label()] = panels_with.get(line.get_label(), 0) + 1
            for bars in ax.containers:
                seen.setdefault(bars.get_label(), set()).update(to_hex(p.get_facecolor()) for p in bars.patches)
        for leg in fig.legends:
            for handle, text in zip(leg.legend_handles, leg.get_texts()):
                seen.setdefault(text.get_text(), set()).add(to_hex(handle.get_color()))
        assert set(seen) == set(names)
        assert all(len(c) == 1 for c in seen.values()), seen  # one colour per run in every panel
        assert len({next(iter(c)) for c in seen.values()}) == len(names)  # and different runs differ
        kd_axis = next(ax for ax in fig.axes if "distillation" in ax.get_title())
        assert [ln.get_label() for ln in kd_axis.get_lines()] == ["student-aced-acidistill"]
        assert to_hex(kd_axis.get_lines()[0].get_color()) in seen["student-aced-acidistill"]
        noisy_axis = next(ax for ax in fig.axes if "noisy" in ax.get_title())
        assert "student-unknown" not in {ln.get_label() for ln in noisy_axis.get_lines()}
        assert any("n/a" in t.get_text() and "student-unknown" in t.get_text() for t in noisy_axis.texts)
        assert any(t.get_text().endswith("%") for t in noisy_axis.get_yticklabels() if t.get_text())
    finally:
        plt.close(fig)


def test_main_job_table_in_percent_with_readable_names(runs, prefect_harness):
    from prefect import flow

    from flows.main_job import summarize

    root = runs["root"]

    @flow(name="summarize-test")
    def summary():
        return summarize(root, {"iid": runs["iid"], "aced-acidistill": runs["aced-acidistill"]},
                         {"unknown-noise": runs["unknown-noise"]})

    rows = summary()
    text = (root / "report.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["run", "heldout: retrieval mean R@1/5/10", "heldout: image→text R@1", "heldout: text→image R@1",
                      "noisy in trained batch (last 20% of steps)"]
    assert ":" not in "".join(header[1:]).replace("heldout:", "") and "noisy_frac" not in text
    body = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")[1:]] for ln in lines[2:]}
    assert list(body) == ["unknown-noise", "student-iid", "student-aced-acidistill"]
    for name in ("student-iid", "student-aced-acidistill"):
        assert all(re.fullmatch(r"\d+\.\d%", c) for c in body[name]), (name, body[name])
    assert body["unknown-noise"] == ["", "", "", "n/a"]  # not evaluated; noise unknown
    assert rows["unknown-noise"]["noisy_frac_trained"] is None
    got = float(body["student-aced-acidistill"][0].rstrip("%"))
    assert got == round(100 * rows["student-aced-acidistill"]["heldout-retrieval:mean_recall"], 1)
