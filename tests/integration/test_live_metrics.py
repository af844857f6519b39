"""A running run's metrics are visible in `aced sql` before its first checkpoint (pipeline.trainer flushes
the logs after the first step and then every LOG_FLUSH_S seconds, independently of checkpoints), and the
finished run still holds every step exactly once."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from storage.sql import run_query

REPO = Path(__file__).resolve().parents[2]


def test_sql_sees_a_running_runs_metrics_before_its_first_checkpoint(synthetic_dataset, tmp_path):
    steps = 40
    root = tmp_path / "w"
    cmd = [sys.executable, "-m", "flows.cli", "--root", str(root), "train", "live", "--recipe", "tiny",
           "--data", str(synthetic_dataset), "--steps", str(steps), "--set", f"checkpoint_every={steps}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "train.log", "wb")  # a file, not a pipe nobody reads while the run goes on
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    latest = root / "runs" / "live" / "checkpoints" / "latest"
    seen = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (root / "runs" / "live" / "metrics").is_dir():
                rows = run_query(root, "SELECT count(*) AS n, max(step) AS last FROM metrics WHERE run = 'live'")
                row = rows.to_pylist()[0]
                if row["n"]:
                    seen = (row, latest.exists(), proc.poll() is None)
                    break
            time.sleep(0.2)
        assert seen is not None, f"no metrics while the run ran: {(tmp_path / 'train.log').read_text()[-2000:]}"
        row, had_checkpoint, running = seen
        assert running and not had_checkpoint and row["last"] < steps - 1
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    t = run_query(root, "SELECT step FROM metrics WHERE run = 'live' ORDER BY step")
    assert t.column("step").to_pylist() == list(range(steps))  # every step once: no part written twice


def test_parts_flushed_between_checkpoints_are_dropped_at_resume(synthetic_dataset, tmp_path, monkeypatch):
    """Every step flushed (LOG_FLUSH_S = 0); the run is then put back to its checkpoint at step 3, as a run
    killed after step 5's flush would be: the resume drops the parts past the checkpoint and replays the
    steps, which are logged once each with the losses of the uninterrupted run."""
    import pyarrow.parquet as pq

    import pipeline.trainer as trainer
    from pipeline.recipes import recipe

    monkeypatch.setattr(trainer, "LOG_FLUSH_S", 0.0)
    run = tmp_path / "run"
    cfg = recipe("tiny", method="iid", train_data=(str(synthetic_dataset),), steps=6, checkpoint_every=3)
    trainer.train(cfg, run, progress=False)
    parts = sorted(p.name for p in (run / "metrics").glob("part-*.parquet"))
    assert parts == [f"part-{i:08d}.parquet" for i in range(1, 7)]  # one part per step, not per checkpoint
    first = pq.ParquetDataset(sorted((run / "metrics").glob("part-*.parquet"))).read().sort_by("step").to_pydict()
    (run / "checkpoints" / "latest").write_text("step-00000003")
    monkeypatch.setattr(trainer, "LOG_FLUSH_S", 3600.0)  # the resumed process: first step, then checkpoints only
    trainer.train(cfg, run, progress=False)
    parts = sorted(p.name for p in (run / "metrics").glob("part-*.parquet"))
    assert parts == ["part-00000001.parquet", "part-00000002.parquet", "part-00000003.parquet",
                     "part-00000004.parquet", "part-00000006.parquet"]
    again = pq.ParquetDataset(sorted((run / "metrics").glob("part-*.parquet"))).read().sort_by("step").to_pydict()
    assert again["step"] == list(range(6))
    assert again["total"] == first["total"]
