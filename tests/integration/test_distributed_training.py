"""Data-parallel training under torchrun on the CPU (gloo): the scale-out path of ARCHITECTURE.md.

Two ranks must train the same model as one process on the same global batches (IID: the gathered loss
and averaged gradients are the single-process ones); with selection every rank selects its share while
the super-batch and sub-batch sizes stay global; a data-parallel run killed with SIGKILL resumes exactly.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.recipes import recipe
from pipeline.trainer import train
from tests.integration.conftest import REPO, descendants

STEPS = 4


def _metrics(run_dir: Path) -> dict:
    files = sorted((run_dir / "metrics").glob("part-*.parquet"))
    return pq.ParquetDataset(files).read().to_pydict()


def _aced_train(root: Path, run: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "--root", str(root), "train", run, "--recipe", "tiny",
            "--steps", str(STEPS), "--set", "num_workers=0", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "open_clip_model.safetensors"))


def test_two_ranks_train_the_single_process_model(synthetic_dataset, tmp_path):
    root = synthetic_dataset.parent.parent
    cfg = recipe("tiny", method="iid", train_data=(str(synthetic_dataset),), steps=STEPS, num_workers=0)
    torch.set_num_threads(1)
    one = train(cfg, tmp_path / "one", progress=False)
    out = subprocess.run(_aced_train(tmp_path / "w", "two", "--data", str(synthetic_dataset), "--method", "iid",
                                     "--nproc", "2"), env=_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 data-parallel ranks" in out.stdout
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "w" / "runs" / "two")
    assert a["step"] == b["step"] == list(range(STEPS))
    for key in ("total", "grad_norm", "logit_scale", "lr", "noisy_frac_selected"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    wa, wb = _weights(one.model_dir), _weights(tmp_path / "w" / "runs" / "two" / "model")
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < 1e-4, worst  # same updates up to float32 summation order
    assert root  # the module's dataset fixture is shared with test_train.py


def test_two_ranks_select_globally_and_resume_exactly_after_sigkill(cached_workspace, synthetic_dataset, tmp_path):
    """aced-acidistill on two ranks: every step logs the whole super-batch with exactly b selected, and a
    torchrun job killed (SIGKILL to every process) after its first checkpoint re-runs to the identical result."""
    common = ["--data", str(synthetic_dataset), "--method", "aced-acidistill", "--reference", "reference",
              "--teacher", "teacher", "--set", f"cache_root={cached_workspace / 'cache'}",
              "--set", "checkpoint_every=2", "--nproc", "2"]
    root = tmp_path / "w"
    straight = subprocess.run(_aced_train(root, "straight", *common), env=_env(), cwd=REPO, capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = root / "runs" / "killed"
    proc = subprocess.Popen(_aced_train(root, "killed", *common), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    for pid in [proc.pid] + descendants(proc.pid):  # the CLI, torchrun and both ranks
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert latest.read_text() != f"step-{STEPS:08d}"
    again = subprocess.run(_aced_train(root, "killed", *common), env=_env(), cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]

    a, b = _metrics(root / "runs" / "straight"), _metrics(run)
    assert a["step"] == b["step"] == list(range(STEPS))
    for key in ("total", "contrastive", "kd", "grad_norm", "noisy_frac_selected"):
        assert a[key] == b[key], key  # bit-identical
    cfg = recipe("tiny", method="aced-acidistill", train_data=(str(synthetic_dataset),), reference="reference",
                 teacher=("teacher",), cache_root=str(cached_workspace / "cache"))
    for run_dir in (root / "runs" / "straight", run):
        sel = pq.ParquetDataset(sorted((run_dir / "selections").glob("part-*.parquet"))).read().to_pydict()
        for step in range(STEPS):
            rows = [(u, k) for s, u, k in zip(sel["step"], sel["uid"], sel["selected"]) if s == step]
            assert len(rows) == cfg.superbatch_size and len({u for u, _ in rows}) == cfg.superbatch_size
            assert sum(k for _, k in rows) == cfg.batch_size
