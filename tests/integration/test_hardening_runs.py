"""Issue 9 (hardening), the run side: no code from files, names that stay in the workspace, folders
never replaced without consent, one owner per run, run identity vs execution settings.

Each test reproduces a failure found against the previous version (named in its docstring)."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.checkpoint import CheckpointError, latest_checkpoint
from pipeline.models import create_model, load_model, save_model
from pipeline.recipes import recipe
from pipeline.trainer import export_model, train
from storage.workspace import FolderLock, LockedError

from tests.integration.conftest import aced_env

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """A pickle that, when loaded by an unpickler allowed to call functions, writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _evil(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker), protocol=2)


def _cfg(data: Path, **kw):
    return recipe("tiny", method="iid", train_data=(str(data),), **{"steps": 3, "checkpoint_every": 3, **kw})


@pytest.fixture(scope="module")
def finished_run(synthetic_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    train(_cfg(synthetic_dataset), run, progress=False)
    return run


def _copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# --------------------------------------------------------------------------- 1. no code from files

@pytest.mark.parametrize("part", ["optimizer.pt", "rng.pt", "model.safetensors", "optimizer.safetensors",
                                  "rng.safetensors", "optimizer.json", "state.json"])
def test_a_planted_pickle_in_any_checkpoint_part_never_runs(finished_run, synthetic_dataset, tmp_path, part):
    """Was: optimizer.pt and rng.pt were loaded with weights_only=False, so a pickle dropped into the
    checkpoint ran its code on resume and on export."""
    run = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    ckpt = latest_checkpoint(run / "checkpoints")
    (ckpt / part).write_bytes(_evil(marker))
    cfg = _cfg(synthetic_dataset)  # a rerun of the finished run restores every part first
    with pytest.raises((CheckpointError, ValueError)) as err:
        train(cfg, run, progress=False)
    assert str(ckpt) in str(err.value)
    if part in ("optimizer.safetensors", "rng.safetensors", "optimizer.json"):
        export_model(run, tmp_path / "exported")  # an export never reads optimizer or RNG state
    else:
        with pytest.raises((CheckpointError, ValueError)):
            export_model(run, tmp_path / "exported")
    assert not marker.exists()


def test_export_reads_only_the_weights(finished_run, tmp_path):
    """Was: export restored optimizer and RNG state too (loading the pickles)."""
    run = _copy_run(finished_run, tmp_path)
    ckpt = latest_checkpoint(run / "checkpoints")
    (ckpt / "rng.safetensors").write_bytes(b"not read by an export")
    (ckpt / "optimizer.safetensors").write_bytes(b"not read by an export")
    out = export_model(run, tmp_path / "model")
    assert (out / "open_clip_model.safetensors").exists()


@pytest.mark.parametrize("planted", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_a_planted_pickle_in_a_model_folder_never_runs(tmp_path, planted):
    folder = save_model(create_model("aced-vit-t"), tmp_path / "m")
    marker = tmp_path / "pwned"
    if planted.endswith(".bin"):  # the .bin fallback is read only when there is no safetensors file
        (folder / "open_clip_model.safetensors").unlink()
    (folder / planted).write_bytes(_evil(marker))
    with pytest.raises(ValueError, match=planted.replace(".", r"\.")):
        load_model(folder)
    assert not marker.exists()


def test_a_planted_pickle_in_a_cache_file_never_runs(cached_workspace, synthetic_dataset, tmp_path):
    import shutil

    from storage.cache import read_cache_shard
    from storage.shards import list_shards

    root = tmp_path / "ws"
    shutil.copytree(cached_workspace / "cache", root / "cache")
    shard = list_shards(synthetic_dataset)[0]
    folder = root / "cache" / "reference" / "synthetic"
    marker = tmp_path / "pwned"
    (folder / f"{shard.name}.parquet").write_bytes(_evil(marker))
    with pytest.raises(Exception) as err:
        read_cache_shard(folder, shard)
    assert shard.name in str(err.value)
    assert not marker.exists()


def test_a_truncated_safetensors_file_is_a_named_error(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    weights = latest_checkpoint(run / "checkpoints") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1000])
    with pytest.raises(CheckpointError, match="model.safetensors: not a complete safetensors file"):
        export_model(run, tmp_path / "out")
    folder = save_model(create_model("aced-vit-t"), tmp_path / "m")
    data = (folder / "open_clip_model.safetensors").read_bytes()
    (folder / "open_clip_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="open_clip_model.safetensors: not a loadable weights file"):
        load_model(folder)


# --------------------------------------------------------------------------- 2. nothing outside, nothing replaced

def _aced(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "--root", str(root), *args], cwd=REPO,
                          env=aced_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv", [
    ["train", "../../escape", "--recipe", "tiny", "--data", "{data}"],
    ["train", "/tmp/aced-abs-escape", "--recipe", "tiny", "--data", "{data}"],
    ["train", "a/../../escape", "--recipe", "tiny", "--data", "{data}"],
    ["export", "run", "--name", "../../escape"],
])
def test_names_never_leave_the_workspace(synthetic_dataset, tmp_path, argv):
    """Was: `aced train ../../x`, `aced train /abs/path` and `aced export R --name ../../x` wrote outside the root."""
    root = tmp_path / "a" / "b" / "ws"
    root.mkdir(parents=True)
    before = set((tmp_path).rglob("*"))
    r = _aced(root, *[a.replace("{data}", str(synthetic_dataset)) for a in argv])
    after = set((tmp_path).rglob("*"))
    new_outside = [p for p in after - before if root not in p.parents and p != root]
    assert r.returncode == 1, r.stderr
    assert "bad run name" in r.stderr or "bad model name" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not new_outside, new_outside
    assert not Path("/tmp/aced-abs-escape").exists()


def test_model_create_name_from_a_config_file_stays_in_models(tmp_path):
    root = tmp_path / "ws"
    cfg = json.loads((REPO / "pipeline" / "model_configs" / "aced-vit-t.json").read_text())
    (tmp_path / ".hidden.json").write_text(json.dumps(cfg))
    r = _aced(root, "model", "create", str(tmp_path / ".hidden.json"))
    assert r.returncode == 1 and "bad model name" in r.stderr, r.stderr


def test_export_and_model_create_refuse_a_non_empty_folder(finished_run, tmp_path):
    """Was: `--out DIR` silently deleted every other file in DIR."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    root = tmp_path / "ws"
    (root / "runs").mkdir(parents=True)
    os.symlink(finished_run, root / "runs" / "r")
    for argv in (["export", "r", "--out", str(out)], ["export", "r", "--out", str(out), "--overwrite"],
                 ["model", "create", "aced-vit-t", "--out", str(out)],
                 ["model", "create", "aced-vit-t", "--out", str(out), "--overwrite"]):
        r = _aced(root, *argv)
        assert r.returncode == 1 and "did not write" in r.stderr, (argv, r.stderr)
        assert (out / "notes.txt").read_text() == "mine"
    model = tmp_path / "model"
    assert _aced(root, "model", "create", "aced-vit-t", "--out", str(model)).returncode == 0
    r = _aced(root, "model", "create", "aced-vit-t", "--out", str(model), "--seed", "3")
    assert r.returncode == 1 and "--overwrite" in r.stderr
    before = load_model(model)
    r = _aced(root, "model", "create", "aced-vit-t", "--out", str(model), "--seed", "3", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not all((a == b).all() for a, b in zip(before.model.state_dict().values(),
                                                   load_model(model).model.state_dict().values()))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders left


# --------------------------------------------------------------------------- 3. one owner per run

def test_a_second_trainer_on_a_running_run_is_refused_and_a_dead_owner_is_taken_over(synthetic_dataset, tmp_path):
    """Was: two `aced train` on one run raced (a safetensors I/O error; a 'resume' of a running run)."""
    root = tmp_path / "ws"
    args = ["train", "busy", "--recipe", "tiny", "--data", str(synthetic_dataset), "--steps", "400",
            "--set", "checkpoint_every=2"]
    first = subprocess.Popen([sys.executable, "-m", "flows.cli", "--root", str(root), *args], cwd=REPO,
                             env=aced_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        lock = root / "runs" / "busy" / ".lock"
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text()):
            assert time.time() < deadline and first.poll() is None, "first trainer never took the lock"
            time.sleep(0.2)
        second = _aced(root, *args)
        assert second.returncode == 1, second.stderr
        assert f"in use by pid {first.pid}" in second.stderr, second.stderr
        while latest_checkpoint(root / "runs" / "busy" / "checkpoints") is None:
            assert time.time() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the dead owner's lock is taken over; the run resumes from its checkpoint
    with FolderLock(root / "runs" / "busy", "run"):
        pass
    done = _aced(root, *args[:6], "--steps", "4", "--set", "checkpoint_every=2")  # different identity: refused
    assert done.returncode == 1 and "differs in steps" in done.stderr


def test_lock_is_released_on_error_and_names_the_holder(synthetic_dataset, tmp_path):
    run = tmp_path / "run"
    with FolderLock(run, "run"):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            train(_cfg(synthetic_dataset), run, progress=False)
    bad = _cfg(synthetic_dataset, model="aced-vit-t", steps=3)
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid run config"):
        train(bad, run, progress=False)
    with FolderLock(run, "run"):  # released after the error
        pass


# --------------------------------------------------------------------------- 9. identity vs execution settings

def test_execution_settings_may_change_on_resume(synthetic_dataset, tmp_path):
    """Was: a resume was refused when only num_workers, device, log_selections or an eval set changed."""
    run = tmp_path / "run"
    train(_cfg(synthetic_dataset, steps=3), run, progress=False)
    changed = _cfg(synthetic_dataset, steps=3, num_workers=0, device="cpu", log_selections=False,
                   eval_retrieval=(str(synthetic_dataset),), keep_checkpoints=5)
    assert train(changed, run, progress=False).step == 3
    assert json.loads((run / "config.json").read_text())["num_workers"] == 0  # ranks read the current settings
    with pytest.raises(ValueError, match="differs in lr"):
        train(_cfg(synthetic_dataset, steps=3, lr=5e-4), run, progress=False)


def test_a_config_that_fails_to_start_writes_nothing(synthetic_dataset, tmp_path):
    """Was: a run whose start failed still wrote config.json, which then blocked the corrected rerun."""
    run = tmp_path / "run"
    bad = recipe("tiny", method="h-acid", train_data=(str(synthetic_dataset),), steps=3,
                 reference="missing", cache_root=str(tmp_path / "cache"))
    with pytest.raises((FileNotFoundError, ValueError)):
        train(bad, run, progress=False)
    assert not (run / "config.json").exists()
    assert train(_cfg(synthetic_dataset), run, progress=False).step == 3


def test_init_from_is_read_only_when_the_run_has_no_checkpoint(synthetic_dataset, tmp_path):
    """Was: a resume failed once the init_from folder was gone (its weights are replaced anyway)."""
    import shutil

    init = save_model(create_model("aced-vit-t", seed=5), tmp_path / "init")
    run = tmp_path / "run"
    cfg = _cfg(synthetic_dataset, steps=6, checkpoint_every=3, keep_checkpoints=2, init_from=str(init))
    train(cfg, run, progress=False)
    # back to the state of a run interrupted after its step-3 checkpoint, with the init folder gone
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    (run / "checkpoints" / "latest").write_text("step-00000003")
    shutil.rmtree(init)
    assert train(cfg, run, progress=False).step == 6
    assert latest_checkpoint(run / "checkpoints").name == "step-00000006"


# --------------------------------------------------------------------------- 8. model configs validated at creation

@pytest.mark.parametrize("edit,field", [
    (lambda c: c["vision_cfg"].update(layers=-1), "vision_cfg.layers"),
    (lambda c: c["text_cfg"].update(layers=0), "text_cfg.layers"),
    (lambda c: c.update(embed_dim=0), "embed_dim"),
    (lambda c: c["vision_cfg"].update(width=0), "vision_cfg.width"),
    (lambda c: c["text_cfg"].update(heads=-2), "text_cfg.heads"),
])
def test_a_model_config_with_non_positive_sizes_is_refused_at_creation(tmp_path, edit, field):
    """Was: negative layers or a zero embedding width were accepted and failed later."""
    cfg = json.loads((REPO / "pipeline" / "model_configs" / "aced-vit-t.json").read_text())
    edit(cfg)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        create_model(str(path))


# --------------------------------------------------------------------------- 1. every file the project reads

def _read_everything(root: Path, data: Path, run: Path, model: Path, tmp: Path) -> None:
    """Every reader of the project over the workspace, each allowed to fail (with any error)."""
    from pipeline.data import PairIndex
    from pipeline.report import read_metrics
    from storage.cache import read_cache_shard, verify_cache
    from storage.inspect import inspect_path
    from storage.shards import iter_samples, list_shards
    from storage.sql import run_query

    def attempt(fn):
        try:
            fn()
        except Exception:  # noqa: BLE001 - a refusal is fine; only code execution is not
            pass

    attempt(lambda: [list(iter_samples(s)) for s in list_shards(data)])
    attempt(lambda: PairIndex([data]))
    attempt(lambda: [read_cache_shard(root / "cache" / "reference" / "synthetic", s) for s in list_shards(data)])
    attempt(lambda: verify_cache(root / "cache"))
    attempt(lambda: inspect_path(root, verify=True))
    attempt(lambda: run_query(root, "select count(*) from pairs, cache, metrics, selections"))
    attempt(lambda: load_model(model))
    attempt(lambda: read_metrics(run))
    attempt(lambda: export_model(run, tmp / "exported"))
    attempt(lambda: train(_cfg(data), run, progress=False))


def test_a_planted_pickle_in_any_file_of_a_workspace_never_runs(cached_workspace, synthetic_dataset, finished_run,
                                                               tmp_path):
    """Every kind of file a workspace holds (dataset tar/Parquet/_dataset.json, cache Parquet and manifest,
    model weights and configs, checkpoint parts, run logs and config) replaced by a pickle that would
    write a marker when unpickled: every reader refuses or ignores it, none runs it."""
    import shutil

    src = {"data": synthetic_dataset, "cache": cached_workspace / "cache" / "reference",
           "model": cached_workspace / "models" / "reference", "run": finished_run}
    kinds: dict[tuple[str, str], Path] = {}
    for area, folder in src.items():
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                kinds.setdefault((area, "".join(p.suffixes) or p.name), p)
    assert len(kinds) >= 10, kinds
    marker = tmp_path / "pwned"
    for (area, _), victim in kinds.items():
        ws = tmp_path / "ws"
        shutil.rmtree(ws, ignore_errors=True)
        data = ws / "datasets" / "synthetic"
        shutil.copytree(synthetic_dataset, data)
        shutil.copytree(src["cache"], ws / "cache" / "reference")
        shutil.copytree(src["model"], ws / "models" / "reference")
        shutil.copytree(finished_run, ws / "runs" / "run")
        copies = {"data": data, "cache": ws / "cache" / "reference", "model": ws / "models" / "reference",
                  "run": ws / "runs" / "run"}
        (copies[area] / victim.relative_to(src[area])).write_bytes(_evil(marker))
        _read_everything(ws, data, ws / "runs" / "run", ws / "models" / "reference", tmp_path)
        assert not marker.exists(), f"code ran from a pickle planted as {victim}"
