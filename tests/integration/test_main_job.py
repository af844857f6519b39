"""The main job (flows/main_job.py, `aced run`): every stage end to end, and a second run that
finds everything done (no retraining, no re-embedding).

Fast check: the flow in-process under Prefect's test harness with a micro size (one step per
training run, one student method) - every stage still runs: data, reference and teacher training,
the cache flow (plain engine), a selecting + distilling student, evaluation, the comparison.
Slow check: `aced run --size tiny --engine plain` twice in a subprocess, as a user runs it
(its own temporary Prefect server over <root>/state/prefect).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, aced_env

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def checkpoint_files(root: Path) -> dict[str, tuple[int, int]]:
    """{path: (size, mtime_ns)} of every checkpoint file of every run (a rewrite changes mtime)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted((root / "runs").glob("*/checkpoints/**/*")) if p.is_file()}


def cache_files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted((root / "cache").rglob("*"))
            if p.is_file()}


def table_rows(text: str) -> list[str]:
    """Row names of the Markdown comparison table in `text`."""
    return [m.group(1) for m in re.finditer(r"^\| ([^|]+?) \|", text, re.M) if m.group(1) not in ("run", "---")]


# ---------------------------------------------------------------------------- in-process (fast)


MICRO_RUNS = ["reference", "teacher", "student-aced-acidistill"]


@pytest.fixture(scope="module")
def micro_job(tmp_path_factory, prefect_harness) -> dict:
    """The main job once, in-process, at a micro size (one step per run, one student method)."""
    from flows import main_job as mj

    size = mj.JobSize(train_pairs=80, clean_pairs=32, test_pairs=16, per_class=1, noise_frac=0.5,
                      reference_steps=1, teacher_steps=1, student_steps=1, batch_size=16, reference_batch_size=16,
                      reference_model="aced-vit-t", teacher_model="aced-vit-t", methods=("aced-acidistill",),
                      num_workers=0)
    mj.SIZES["micro"] = size
    root = tmp_path_factory.mktemp("mainjob") / "ws"
    try:
        t0 = time.monotonic()
        rows = mj.main_job(str(root), size="micro", engine="plain")
        seconds = time.monotonic() - t0
        yield {"root": root, "rows": rows, "seconds": seconds, "ckpts": checkpoint_files(root),
               "cache": cache_files(root)}
    finally:
        del mj.SIZES["micro"]


def test_main_job_runs_every_stage(micro_job):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from storage.cache import verify_cache

    root, rows = micro_job["root"], micro_job["rows"]
    assert list(rows) == MICRO_RUNS
    for name in MICRO_RUNS:
        assert 0.0 <= rows[name]["test-retrieval:mean_recall"] <= 1.0
        assert 0.0 <= rows[name]["classes-zeroshot:top1"] <= 1.0
        assert 0.0 <= rows[name]["colours-zeroshot:top1"] <= 1.0
        assert (root / "runs" / name / "report.md").is_file()
        assert (root / "runs" / name / "checkpoints" / "latest").read_text() == "step-00000001"
    assert rows["reference"]["noisy_frac_trained"] == 0.0  # clean pairs only
    assert 0.0 <= rows["student-aced-acidistill"]["noisy_frac_trained"] <= 1.0
    assert (root / "models" / "reference").is_dir() and (root / "models" / "teacher").is_dir()
    rep = verify_cache(root)
    assert rep.ok and rep.shards == 2, rep.format()  # reference + teacher over the one shard of student pairs
    report = (root / "report.md").read_text()
    assert table_rows(report) == MICRO_RUNS
    assert (root / "curves.png").read_bytes()[:8] == PNG_MAGIC
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["main-job"])))
    assert arts and arts[0].data == report
    print(f"main job (micro, in-process): {micro_job['seconds']:.1f} s")


@pytest.mark.slow  # ~30 s more under load; `aced run` twice below checks the same at the tiny size
def test_main_job_rerun_changes_nothing(micro_job):
    from flows.main_job import main_job

    root = micro_job["root"]
    t0 = time.monotonic()
    again = main_job(str(root), size="micro", engine="plain")
    seconds = time.monotonic() - t0
    assert checkpoint_files(root) == micro_job["ckpts"]  # nothing retrained
    assert cache_files(root) == micro_job["cache"]  # nothing re-embedded
    assert again == micro_job["rows"]  # same models, same held-out sets: same numbers
    print(f"main job (micro, in-process) rerun: {seconds:.1f} s (first {micro_job['seconds']:.1f} s)")


# ---------------------------------------------------------------------------- `aced run` (slow)


def _aced_run(root: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = aced_env()
    env.pop("PREFECT_HOME", None)  # the command points Prefect at <root>/state/prefect itself
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "flows.cli", "--root", str(root), "run", "--size", "tiny",
                        "--engine", "plain"], env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    return p, time.monotonic() - t0


@pytest.mark.slow
def test_aced_run_tiny_prints_the_comparison_and_reruns_idempotently(tmp_path):
    root = tmp_path / "ws"
    first, t_first = _aced_run(root)
    assert first.returncode == 0, first.stderr[-6000:]
    names = ["reference", "teacher", "student-iid", "student-h-acid", "student-aced-acidistill"]
    assert table_rows(first.stdout) == names, first.stdout
    assert first.stdout == (root / "report.md").read_text()
    assert "test: retrieval mean R@1/5/10" in first.stdout and "noisy in trained batch" in first.stdout
    assert (root / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert (root / "state" / "prefect" / "prefect.db").is_file()  # the workspace's own Prefect state
    for name in names:
        assert (root / "runs" / name / "checkpoints" / "latest").read_text() == "step-00000004"
    ckpts, cache = checkpoint_files(root), cache_files(root)

    second, t_second = _aced_run(root)
    assert second.returncode == 0, second.stderr[-6000:]
    assert second.stdout == first.stdout  # same table, same numbers
    assert checkpoint_files(root) == ckpts and cache_files(root) == cache
    for name in names:  # every run found finished: resumed at its last step, no step trained
        assert f"resuming {root / 'runs' / name} from step-00000004" in second.stderr
    assert "step 4/4" in first.stderr and "step 4/4" not in second.stderr
    assert "pending: 0 shards" in second.stderr
    assert t_second < 0.8 * t_first, (t_first, t_second)
    print(f"aced run --size tiny: first {t_first:.0f} s, second {t_second:.0f} s")
