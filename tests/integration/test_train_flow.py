"""The Prefect train flow (flows/train_flow.py) on tiny synthetic data: train -> evaluate -> publish
under Prefect's test harness, and `aced train --flow` killed with SIGKILL after its first
checkpoint, re-run, resuming to exactly the uninterrupted run's losses.

Exact equality across processes needs the same float32 arithmetic: one torch thread everywhere
(OMP_NUM_THREADS=1 in the subprocess, torch.set_num_threads(1) around the in-process runs).
The subprocess talks to the harness's server (PREFECT_API_URL) instead of starting its own.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.integration.conftest import REPO, aced_env, descendants

STEPS, EVERY = 6, 2
LOSS_KEYS = ("total", "contrastive", "lr", "grad_norm", "logit_scale")


def metrics(run_dir: Path) -> dict:
    files = sorted((run_dir / "metrics").glob("part-*.parquet"))
    return pq.ParquetDataset(files).read().sort_by("step").to_pydict() if files else {"step": []}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict:
    """pipeline.workspace's synthetic roles at toy sizes: 96 noisy training pairs, 32 held-out
    pairs (retrieval), 2 images per class (zero-shot)."""
    from pipeline.workspace import prepare_synthetic

    root = tmp_path_factory.mktemp("trainflow")
    sets = prepare_synthetic(root, train_pairs=96, clean_pairs=16, test_pairs=32, per_class=2, noise_frac=0.25,
                             seed=7)
    return {"root": root, **sets}


def tiny_config(train_dir: str):
    """The config `aced train RUN --recipe tiny --data DIR --steps 6 --set checkpoint_every=2` builds."""
    from pipeline.recipes import recipe

    return recipe("tiny", method="iid", train_data=(train_dir,), steps=STEPS, checkpoint_every=EVERY)


@pytest.fixture(scope="module")
def flow_run(datasets, prefect_harness) -> dict:
    """One in-process train flow run (the uninterrupted reference of the resume test too)."""
    import torch

    from flows.train_flow import train_flow
    from pipeline.workspace import eval_specs

    run_dir = datasets["root"] / "runs" / "straight"
    evals = eval_specs(datasets)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.monotonic()
        out = train_flow(json.loads(tiny_config(datasets["student"][0]).to_json()), str(run_dir), evals)
        seconds = time.monotonic() - t0
    finally:
        torch.set_num_threads(threads)
    print(f"in-process train flow: {seconds:.1f} s")
    return {"run_dir": run_dir, "out": out, "evals": evals, "seconds": seconds}


def test_flow_trains_evaluates_and_publishes(flow_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    run_dir, out = flow_run["run_dir"], flow_run["out"]
    m = metrics(run_dir)
    assert m["step"] == list(range(STEPS))
    assert all(v == v and v > 0 for v in m["total"])
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step-{STEPS:08d}"
    assert out["model_dir"] == str(run_dir / "model")
    assert (run_dir / "model" / "open_clip_model.safetensors").is_file()

    # evaluation: every requested set, results returned and written
    assert set(out["eval"]["evals"]) == set(flow_run["evals"]) == {"test-retrieval", "classes-zeroshot",
                                                                       "colours-zeroshot"}
    ret = out["eval"]["evals"]["test-retrieval"]["metrics"]
    assert 0.0 <= ret["i2t_r1"] <= ret["i2t_r5"] <= ret["i2t_r10"] <= 1.0
    for name, n_classes in (("classes-zeroshot", 10), ("colours-zeroshot", 8)):
        zs = out["eval"]["evals"][name]["metrics"]
        assert 0.0 <= zs["top1"] <= 1.0 and zs["n_classes"] == n_classes
        assert zs["templates"] == len(json.loads((Path(out["eval"]["evals"][name]["dataset"]) / "_dataset.json")
                                                 .read_text())["templates"])  # the set's own prompts
    assert json.loads((run_dir / "eval" / "results.json").read_text())["evals"] == out["eval"]["evals"]

    # publish: report + curves in the run folder and the same Markdown as a Prefect artifact
    report = (run_dir / "report.md").read_text()
    assert report.startswith("## straight")
    assert "| straight |" in report and "test: retrieval mean R@1/5/10" in report and "classes: zero-shot top-1" in report
    assert f"{m['total'][-1]:.4g}" in report  # the final step's loss, as the table formats it
    png = (run_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-straight"])))
    assert arts and arts[0].type == "markdown" and arts[0].data == report


def test_rerun_of_a_finished_flow_keeps_the_run(flow_run, datasets):
    """Same run folder again: nothing is retrained (checkpoints and metrics unchanged)."""
    from flows.train_flow import train_flow

    run_dir = flow_run["run_dir"]
    ckpt = run_dir / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"
    before = (ckpt.stat().st_mtime_ns, metrics(run_dir))
    out = train_flow(json.loads(tiny_config(datasets["student"][0]).to_json()), str(run_dir), None)
    assert out["eval"] == {}
    assert (ckpt.stat().st_mtime_ns, metrics(run_dir)) == before
    with pytest.raises(ValueError, match="another run"):
        other = dataclasses.replace(tiny_config(datasets["student"][0]), steps=STEPS + 1)
        train_flow(json.loads(other.to_json()), str(run_dir), None)


def _aced_train_flow(root: Path, run: str, data: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "--root", str(root), "train", run, "--flow", "--recipe", "tiny",
            "--data", data, "--steps", str(STEPS), "--set", f"checkpoint_every={EVERY}"]


def test_sigkilled_flow_run_resumes_to_the_uninterrupted_losses(flow_run, datasets, tmp_path, caplog):
    """`aced train --flow` SIGKILLed after its first checkpoint; the same flow run again (in-process:
    a second interpreter would add ~20 s of imports on this machine) resumes from that checkpoint."""
    import prefect.settings
    import torch

    from flows.train_flow import train_flow

    env = aced_env(PREFECT_API_URL=prefect.settings.PREFECT_API_URL.value(), OMP_NUM_THREADS="1")
    root = tmp_path / "ws"
    cmd = _aced_train_flow(root, "killed", datasets["student"][0])
    latest = root / "runs" / "killed" / "checkpoints" / "latest"
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before its first checkpoint:\n" + proc.stdout.read().decode()[-4000:]
        assert latest.exists(), "no checkpoint within 300 s"
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)
        proc.stdout.close()
    killed_at = latest.read_text()
    assert killed_at != f"step-{STEPS:08d}", "killed after the last checkpoint: nothing left to resume"
    assert not (root / "runs" / "killed" / "report.md").exists()

    t_kill = time.monotonic() - t0
    run_dir = root / "runs" / "killed"
    config = json.loads((run_dir / "config.json").read_text())  # what the command line made of its flags
    assert config == json.loads(tiny_config(datasets["student"][0]).to_json())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    caplog.set_level("INFO", logger="pipeline.trainer")
    try:
        out = train_flow(config, str(run_dir), None)
    finally:
        torch.set_num_threads(threads)
    print(f"killed at {killed_at} after {t_kill:.1f} s; re-run {time.monotonic() - t0 - t_kill:.1f} s")
    k = int(killed_at.removeprefix("step-"))
    assert f"resuming {run_dir} from {killed_at} (step {k})" in caplog.messages, caplog.messages

    got, want = metrics(run_dir), metrics(flow_run["run_dir"])
    assert got["step"] == list(range(STEPS))  # every step exactly once
    for key in LOSS_KEYS:
        assert got[key] == want[key], key  # bit-identical, not approximately equal
    assert (run_dir / "report.md").read_text().startswith("## killed")
    assert out["model_dir"] == str(run_dir / "model")
