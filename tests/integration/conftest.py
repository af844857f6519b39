"""Shared fixtures of the integration tests: isolated Prefect/Ray state, a tiny workspace.

Environment first (STACK.md): Prefect reads its settings when first imported, so PREFECT_HOME must
point at a temporary folder before any test module imports prefect, or flow-run results and the
SQLite database leak into ~/.prefect between sessions. Ray gets token auth off and a short
RAY_TMPDIR (its Unix socket paths are limited to 107 bytes; pytest's tmp paths are long).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

_STATE = Path(tempfile.mkdtemp(prefix="aced-it-"))
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ.pop("PREFECT_API_URL", None)  # never talk to a developer's server from a test
os.environ.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_TMPDIR"] = str(_STATE / "ray")
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
(_STATE / "ray").mkdir(parents=True, exist_ok=True)
if "prefect" in sys.modules:  # pragma: no cover - would make the settings above silently not apply
    raise RuntimeError("prefect was imported before tests/integration/conftest.py set PREFECT_HOME")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARD_ROWS = 16
REFERENCE, TEACHER = "ref-t", "teacher-t"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_STATE, ignore_errors=True)


def write_synthetic(root: Path, name: str, n: int, *, seed: int = 0, start: int = 0,
                    rows_per_shard: int = SHARD_ROWS) -> Path:
    """A pair dataset `<root>/datasets/<name>` of `n` synthetic pairs (storage.shards format)."""
    from pipeline.synthetic import generate_pairs
    from storage.shards import write_shards

    out = root / "datasets" / name
    write_shards(generate_pairs(n, seed=seed, noise_frac=0.2, start=start), out, name=name, source="synthetic",
                 samples_per_shard=rows_per_shard)
    return out


@pytest.fixture(scope="session")
def workspace_template(tmp_path_factory) -> Path:
    """A workspace with dataset `synth` (4 shards x 16 pairs) and two tiny models (reference and
    teacher: `aced-vit-t` with different seeds, so their embeddings differ). Copy it before writing."""
    from pipeline.models import create_model, save_model

    root = tmp_path_factory.mktemp("workspace")
    write_synthetic(root, "synth", 4 * SHARD_ROWS)
    for model_id, seed in ((REFERENCE, 0), (TEACHER, 1)):
        save_model(create_model("aced-vit-t", seed=seed), root / "models" / model_id)
    return root


@pytest.fixture
def workspace(workspace_template, tmp_path) -> Path:
    """A private copy of the template workspace (tests write caches into it)."""
    root = tmp_path / "ws"
    shutil.copytree(workspace_template, root)
    return root


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary server + SQLite), once per session: ~10 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def ray_local():
    """One small local Ray instance per test module (STACK.md sizes), shut down afterwards."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def aced_env(**extra: str) -> dict[str, str]:
    """Environment for an `aced` subprocess: this test session's isolated state plus `extra`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (pipeline.children reads them from /proc)."""
    from pipeline.children import descendants as procs

    return [p.pid for p in procs(pid)]


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory) -> Path:
    """300 synthetic pairs (20% noisy captions) in 3 shards."""
    from pipeline.synthetic import generate_pairs
    from storage.shards import write_shards

    out = tmp_path_factory.mktemp("data") / "datasets" / "synthetic"
    write_shards(generate_pairs(300, seed=0, noise_frac=0.2), out, name="synthetic", source="synthetic",
                 samples_per_shard=100)
    return out


@pytest.fixture(scope="module")
def cached_workspace(synthetic_dataset) -> Path:
    """The synthetic dataset cached by a tiny 'reference' and a tiny 'teacher' (plain single-process engine)."""
    from pipeline.models import create_model, save_model
    from pipeline.ray_embed import embed_shards_plain, plan_cache

    root = synthetic_dataset.parent.parent
    for seed, model_id in ((1, "reference"), (2, "teacher")):
        if not (root / "models" / model_id).exists():
            save_model(create_model("aced-vit-t", seed=seed), root / "models" / model_id)
    embed_shards_plain(plan_cache(root, ["synthetic"], ["reference", "teacher"]), chunk_size=50)
    return root
