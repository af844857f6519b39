"""The real-data study command (`benchmarks/methods.py --data DIR`, issue 13) end to end at toy size.

A tiny Flickr8k-layout folder (40 real photos and their captions of ../shared/data, copied to the test's
temporary folder: the importer refuses links that lead outside the image folder) and a CIFAR-10 folder
(2 images of each of its 10 classes: the standard set needs them all) beside it; every stage runs with a few
steps. Checks the results hold every table the note reports, and that a second invocation resumes: it trains nothing and keeps every row.
"""
from __future__ import annotations

import csv
import fcntl
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import aced_env

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
FLICKR, CIFAR = DATA / "flickr8k", DATA / "cifar10" / "test"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (FLICKR / "captions.csv").is_file() or not CIFAR.is_dir(),
                                 reason=f"needs {FLICKR} and {CIFAR}")]


def tiny_copy(dst: Path, per_split: dict[str, int]) -> Path:
    """dst/tinyflickr (captions.csv, images/, splits/) and dst/cifar10/test (10 classes x 2 images)."""
    folder = dst / "tinyflickr"
    (folder / "images").mkdir(parents=True)
    (folder / "splits").mkdir()
    chosen = {}
    for split, n in per_split.items():
        names = [ln.strip() for ln in (FLICKR / "splits" / f"{split}.txt").read_text().splitlines() if ln.strip()][:n]
        (folder / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
        chosen.update(dict.fromkeys(names))
    for name in chosen:
        shutil.copyfile(FLICKR / "images" / name, folder / "images" / name)
    with open(FLICKR / "captions.csv", newline="", encoding="utf-8") as f, \
            open(folder / "captions.csv", "w", newline="", encoding="utf-8") as out:
        rows = csv.reader(f)
        w = csv.writer(out)
        w.writerow(next(rows))
        w.writerows(r for r in rows if r[0] in chosen)
    for cls in sorted(p.name for p in CIFAR.iterdir()):
        (dst / "cifar10" / "test" / cls).mkdir(parents=True)
        for img in sorted((CIFAR / cls).iterdir())[:2]:
            shutil.copyfile(img, dst / "cifar10" / "test" / cls / img.name)
    return folder


def study(folder: Path, root: Path, results: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "benchmarks" / "methods.py"), "--data", str(folder), "--root", str(root),
           "--results", str(results), "--stages", "all", "--seeds", "0", "--steps", "3", "--reference-steps", "8",
           "--batch-size", "8", "--dev-variants", "h-acid", "iid", "h-acid-tau1", "h-acid-f0.5",
           "--tuned", "h-acid-f0.5", *extra]
    return subprocess.run(cmd, env=aced_env(), capture_output=True, text=True, timeout=1500)


def test_study_runs_every_stage_and_resumes(tmp_path):
    folder = tiny_copy(tmp_path / "data", {"train": 24, "dev": 8, "test": 8})
    root, results = tmp_path / "ws", tmp_path / "results"
    proc = study(folder, root, results)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((results / "methods-real.json").read_text())
    ret = "tinyflickr-test-retrieval:mean_recall"
    assert set(res["rows"]) == {"iid", "softmax-kd", "h-acid", "aced-acidistill"}
    for method, seeds in res["rows"].items():
        row = seeds["0"]
        assert 0 <= row[ret] <= 1 and 0 <= row["cifar10-zeroshot:top1"] <= 1 and row["steps"] == 3
        assert 0 < row["noisy_frac_superbatch"] < 1  # the corrupted split's swapped flags reach the metrics
    assert res["compute_ratio"] > 0 and len(res["compute"]) == 2
    # the curve's ref-1x point is the step-matched h-acid run: stored once, in rows, read by the curve table
    assert set(res["curve"]) == {"ref-0.25x", "ref-0.5x", "ref-2x", "ref-noisy"}
    assert set(res["dev"]) == {"h-acid", "iid", "h-acid-tau1", "h-acid-f0.5"}
    assert res["tuned_variant"] == "h-acid-f0.5" and set(res["tuned"]) == {"h-acid-f0.5", "aced-acidistill-f0.5"}
    assert res["tuned"]["h-acid-f0.5"]["0"]["noisy_frac_superbatch"] is not None and ret in res["tuned"]["h-acid-f0.5"]["0"]
    assert "tinyflickr-dev-retrieval:mean_recall" in res["dev"]["h-acid"]["0"]
    assert ret not in res["dev"]["h-acid-tau1"]["0"]  # dev runs never see the test split
    assert res["rows"]["h-acid"]["0"]["separation"], "the selection logs give the clean-vs-swapped AUC"
    for rid in (*res["curve"], "ref-1x"):
        assert 0 <= res["references"][rid]["auc_clean_vs_swapped"] <= 1
    md = (results / "methods-real.md").read_text()
    curve_md = md.split("## Reference strength curve")[1].split("\n## ")[0]
    ref1x = [ln for ln in curve_md.splitlines() if ln.startswith("| ref-1x |")]
    assert len(ref1x) == 1  # cells: reference, budget, captions, its test, its AUC, seeds, student test, ...
    assert ref1x[0].split("|")[7].strip() == f"{100 * res['rows']['h-acid']['0'][ret]:.2f}"
    for heading in ("## Step-matched", "## Step-matched, the sampler tuned on dev", "## Compute-matched", "## Reference strength curve", "## Dev-split",
                    "## Does the selection"):
        assert heading in md
    for run in ("dev-h-acid-f0.5-seed0", "h-acid-f0.5-seed0", "aced-acidistill-f0.5-seed0"):  # the variant reached the run
        assert json.loads((root / "runs" / run / "config.json").read_text())["filter_ratio"] == 0.5
    runs = sorted(p.name for p in (root / "runs").iterdir())
    assert "h-acid-ref-1x-seed0" not in runs and "dev-h-acid-seed0" not in runs and "dev-iid-seed0" not in runs

    # resume: nothing is trained again, every row is kept, the numbers are the same; a run another
    # invocation holds (here: this test) is left to it
    stamps = {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/eval*/results.json")}
    with open(root / ".locks" / "softmax-kd-seed0.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        again = study(folder, root, results)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "softmax-kd-seed0: another invocation is training it" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/eval*/results.json")} == stamps
    res2 = json.loads((results / "methods-real.json").read_text())
    for table in ("rows", "compute", "curve", "dev", "tuned", "references"):
        assert res2[table] == res[table], table

    # another machine: run folders are gone; --keep-recorded keeps their recorded rows instead of training them
    # (h-acid-seed0 also stands for the curve's ref-1x point: not trained again for the curve either)
    shutil.rmtree(root / "runs" / "iid-seed0")
    shutil.rmtree(root / "runs" / "h-acid-seed0")
    kept = study(folder, root, results, "--keep-recorded")
    assert kept.returncode == 0, kept.stderr[-4000:]
    assert "iid-seed0: kept the row recorded" in kept.stdout and not (root / "runs" / "iid-seed0").exists()
    assert not (root / "runs" / "h-acid-seed0").exists()
    res3 = json.loads((results / "methods-real.json").read_text())
    assert res3["rows"] == res["rows"] and res3["curve"] == res["curve"]
