"""Trainer end to end on tiny synthetic shards: IID run, exact resume after SIGKILL, selection methods."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.recipes import recipe
from pipeline.trainer import train

REPO = Path(__file__).resolve().parents[2]


def _metrics(run_dir: Path):
    files = sorted((run_dir / "metrics").glob("part-*.parquet"))
    table = pq.ParquetDataset(files).read().to_pydict() if files else {"step": []}
    return table


def test_iid_tiny_run_writes_metrics_checkpoints_and_model(synthetic_dataset, tmp_path):
    cfg = recipe("tiny", method="iid", train_data=(str(synthetic_dataset),), steps=7, checkpoint_every=3)
    result = train(cfg, tmp_path / "run", progress=False)
    m = _metrics(tmp_path / "run")
    assert m["step"] == list(range(7))
    assert all(v == v and v > 0 for v in m["total"])  # finite, positive sigmoid loss
    assert (result.model_dir / "open_clip_model.safetensors").exists()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000006", "step-00000007"]  # keep_checkpoints=2
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000007"


def test_rerun_of_a_finished_run_is_a_no_op_and_other_config_is_refused(synthetic_dataset, tmp_path):
    cfg = recipe("tiny", method="iid", train_data=(str(synthetic_dataset),), steps=3, checkpoint_every=3)
    train(cfg, tmp_path / "run", progress=False)
    before = _metrics(tmp_path / "run")
    train(cfg, tmp_path / "run", progress=False)
    assert _metrics(tmp_path / "run") == before
    with pytest.raises(ValueError, match="another run"):
        train(recipe("tiny", method="iid", train_data=(str(synthetic_dataset),), steps=4), tmp_path / "run")


def _aced(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "--root", str(root), *args]


def test_sigkill_and_rerun_reproduces_the_uninterrupted_losses_exactly(synthetic_dataset, tmp_path):
    """A real process is killed with SIGKILL after its first checkpoint; the re-run must continue
    with per-step losses identical to a run that was never interrupted (CPU, float32)."""
    steps = 12
    common = ["--recipe", "tiny", "--data", str(synthetic_dataset), "--steps", str(steps),
              "--set", "checkpoint_every=4", "--set", "num_workers=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    root = tmp_path / "w"
    subprocess.run(_aced(root, "train", "straight", *common), check=True, env=env, cwd=REPO,
                   capture_output=True, timeout=600)

    proc = subprocess.Popen(_aced(root, "train", "killed", *common), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = root / "runs" / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest.read_text()
    assert killed_at != f"step-{steps:08d}"
    subprocess.run(_aced(root, "train", "killed", *common), check=True, env=env, cwd=REPO,
                   capture_output=True, timeout=600)

    a = _metrics(root / "runs" / "straight")
    b = _metrics(root / "runs" / "killed")
    assert a["step"] == b["step"] == list(range(steps))
    for key in ("total", "contrastive", "lr", "grad_norm", "logit_scale"):
        assert a[key] == b[key], key  # bit-identical, not approximately equal


@pytest.mark.parametrize("method", ["h-acid", "aced-acidistill", "softmax-kd",
                                    pytest.param("i-acid", marks=pytest.mark.slow),
                                    pytest.param("aced-iidistill", marks=pytest.mark.slow),
                                    pytest.param("rho-topk", marks=pytest.mark.slow),
                                    pytest.param("student-loss", marks=pytest.mark.slow)])
def test_every_method_trains_and_logs_its_selection(cached_workspace, synthetic_dataset, tmp_path, method):
    cfg = recipe("tiny", method=method, train_data=(str(synthetic_dataset),), steps=3, checkpoint_every=3,
                 cache_root=str(cached_workspace / "cache"), reference="reference", teacher=("teacher",))
    train(cfg, tmp_path / "run", progress=False)
    m = _metrics(tmp_path / "run")
    assert m["step"] == [0, 1, 2]
    if cfg.spec.kd:
        assert all(v > 0 for v in m["kd"])
    else:
        assert "kd" not in m
    sel_files = sorted((tmp_path / "run" / "selections").glob("part-*.parquet"))
    if cfg.spec.selection is None:
        assert not sel_files
        return
    sel = pq.ParquetDataset(sel_files).read().to_pydict()
    B, b = cfg.superbatch_size, cfg.batch_size
    assert len(sel["uid"]) == 3 * B
    for step in range(3):
        chosen = [k for s, k in zip(sel["step"], sel["selected"]) if s == step]
        assert len(chosen) == B and sum(chosen) == b
    assert 0.0 <= m["noisy_frac_selected"][0] <= 1.0


def test_a_cache_of_another_dataset_version_fails_loudly(cached_workspace, synthetic_dataset, tmp_path):
    """The trainer zips by uid and refuses a cache whose rows do not match the pair shard."""
    import shutil

    from storage.cache import CacheError

    data2 = tmp_path / "datasets" / "synthetic"
    from pipeline.synthetic import generate_pairs
    from storage.shards import write_shards

    write_shards(generate_pairs(300, seed=99, noise_frac=0.2), data2, name="synthetic", source="synthetic",
                 samples_per_shard=100)
    shutil.copytree(cached_workspace / "cache", tmp_path / "cache")
    cfg = recipe("tiny", method="h-acid", train_data=(str(data2),), steps=2, cache_root=str(tmp_path / "cache"),
                 reference="reference")
    with pytest.raises((CacheError, ValueError), match="uid|stale|checksum|sha"):
        train(cfg, tmp_path / "run", progress=False)


def test_h_acid_scores_at_lower_resolution(cached_workspace, synthetic_dataset, tmp_path):
    cfg = recipe("tiny", method="h-acid", train_data=(str(synthetic_dataset),), steps=2, checkpoint_every=2,
                 cache_root=str(cached_workspace / "cache"), reference="reference", score_resolution=32)
    train(cfg, tmp_path / "run", progress=False)
    assert _metrics(tmp_path / "run")["step"] == [0, 1]


def test_selection_records_every_k_steps_and_sampled(cached_workspace, synthetic_dataset, tmp_path):
    """At B = 160k a record per candidate per step adds up: log every k-th step, a seeded sample of rows."""
    cfg = recipe("tiny", method="h-acid", train_data=(str(synthetic_dataset),), steps=4, checkpoint_every=4,
                 cache_root=str(cached_workspace / "cache"), reference="reference",
                 selection_log_every=2, selection_log_rows=7)
    train(cfg, tmp_path / "run", progress=False)
    files = sorted((tmp_path / "run" / "selections").glob("part-*.parquet"))
    sel = pq.ParquetDataset(files).read().to_pydict()
    assert sorted(set(sel["step"])) == [0, 2]
    assert [sel["step"].count(s) for s in (0, 2)] == [7, 7]
    assert all(isinstance(u, str) and len(u) == 32 for u in sel["uid"])
    m = _metrics(tmp_path / "run")
    assert m["step"] == [0, 1, 2, 3] and all(0.0 <= v <= 1.0 for v in m["noisy_frac_selected"])
