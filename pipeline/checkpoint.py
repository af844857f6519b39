"""Atomic training checkpoints (ARCHITECTURE.md "Checkpoints"), in formats that cannot carry code.

A checkpoint is a folder `checkpoints/step-XXXXXXXX/` with named parts:
  model.safetensors      student weights
  optimizer.safetensors  every tensor of the optimizer state (Adam moments, step counts)
  optimizer.json         the rest of optimizer + scheduler state (param groups, lr schedule position),
                         with each tensor replaced by a reference into optimizer.safetensors
  rng.safetensors        torch RNG states (CPU, and one per CUDA device)
  state.json             step and the run's config
Data and log positions are not stored: every random draw is derived from (seed, step), and the
metric/selection logs are truncated to the checkpoint's step on resume (pipeline.trainer).

Nothing here unpickles: safetensors holds raw tensors, JSON holds plain values. A folder with any
other part (e.g. the `optimizer.pt` / `rng.pt` pickles of earlier versions, or one planted there) is
refused with CheckpointError before anything in it is read.

A checkpoint is written into a hidden temporary folder, fsynced, renamed into place, and only then
published by an atomic rewrite of the `latest` pointer file. A crash at any moment leaves either the
old or the new checkpoint as `latest`, never a partial one. The last `keep` checkpoints are kept.
In an object store (a run folder `s3://...`, storage/fs.py) the folder is uploaded file by file (not
atomic: there is no rename), then `latest` is rewritten in one atomic object write: resume follows
`latest`, so it still never sees a partial checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from storage import fs
from storage.atomic import atomic_write_bytes, fsync_dir, is_temp_name, replace_dir, temp_sibling

LATEST = "latest"
PARTS = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json")


class CheckpointError(ValueError):
    """A checkpoint folder or part that is not what this version writes (names the file)."""


# --------------------------------------------------------------------------- tensors and trees

def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as {name: tensor}; a truncated or foreign file is a CheckpointError naming it."""
    try:
        if fs.is_url(path):
            from safetensors.torch import load

            return load(fs.read_bytes(path))
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a complete safetensors file ({str(e)[:200]}); the file is truncated "
                              "or was not written by this project") from e


def _to_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of a state dict: tensors moved into `tensors` and replaced by {"tensor": key};
    dicts become lists of [key, value] pairs (torch uses int keys, JSON would turn them into strings)."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if isinstance(obj, dict):
        return {"dict": [[k, _to_tree(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [_to_tree(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_to_tree(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (only tensors and plain values)")


def _from_tree(obj: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(obj, list):
        return [_from_tree(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"tensor"}:
            if obj["tensor"] not in tensors:
                raise CheckpointError(f"{where}: refers to tensor {obj['tensor']!r}, which is not in its safetensors file")
            return tensors[obj["tensor"]]
        if set(obj) == {"tuple"}:
            return tuple(_from_tree(v, tensors, where) for v in obj["tuple"])
        if set(obj) == {"dict"}:
            return {k: _from_tree(v, tensors, where) for k, v in obj["dict"]}
        raise CheckpointError(f"{where}: unexpected entry {sorted(obj)!r}")
    return obj


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def check_parts(path: Path) -> None:
    """Refuse a checkpoint folder holding anything but the parts this version writes."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    names = {p.name for p in path.iterdir()}
    foreign = sorted(names - set(PARTS))
    if foreign:
        raise CheckpointError(f"{path}: unexpected files {foreign}; a checkpoint holds only {list(PARTS)} "
                              "(pickled .pt parts of older versions are never loaded: they can run code)")
    missing = sorted(set(PARTS) - names)
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {missing}")


# --------------------------------------------------------------------------- write

def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(folder: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune older ones beyond `keep`."""
    folder = fs.as_path(folder)
    if not fs.is_url(folder):
        folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = folder / name
    tmp = temp_sibling(final, mkdir=True)
    try:
        # safetensors refuses shared storage; contiguous clones keep it simple and exact.
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        opt_tensors: dict[str, torch.Tensor] = {}
        tree = _to_tree({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, opt_tensors)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(tree))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, sort_keys=True))
        for part in tmp.iterdir():
            _fsync_file(part)
        # replace: a re-run of the same step after a crash between rename and pointer update
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(folder / LATEST, name.encode())
    _prune(folder, keep)
    return final


def _prune(folder: Path, keep: int) -> None:
    current = (folder / LATEST).read_text().strip()
    done = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        if old.name != current:
            fs.remove_tree(old)
    for stale in folder.iterdir():  # left by a crashed writer (this run's folder is locked: nobody else writes)
        if is_temp_name(stale.name) and stale.name.startswith(".step-"):
            fs.remove_tree(stale)


# --------------------------------------------------------------------------- read

def latest_checkpoint(folder: Path) -> Path | None:
    """The published checkpoint, or None. A pointer to a missing folder is an error, not a silent restart."""
    folder = fs.as_path(folder)
    pointer = folder / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not name.startswith("step-") or "/" in name:
        raise CheckpointError(f"{pointer}: names {name!r}, not a checkpoint folder of this run")
    path = folder / name
    if not (path / "state.json").exists():
        raise CheckpointError(f"{pointer} points at {path}, which is not a complete checkpoint")
    return path


def load_weights(path: Path, *, model: torch.nn.Module, drop_prefix: str | None = None) -> dict[str, Any]:
    """Restore only the model weights (what an export needs; `drop_prefix` leaves out training-only
    parts such as a distillation projection head); returns state.json."""
    check_parts(path)
    state = _read_json(path / "state.json")
    weights = load_tensors(path / "model.safetensors")
    if drop_prefix:
        weights = {k: v for k, v in weights.items() if not k.startswith(drop_prefix)}
    model.load_state_dict(weights)
    return state


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states (a resume); returns state.json."""
    state = load_weights(path, model=model)
    opt = _from_tree(_read_json(path / "optimizer.json"), load_tensors(path / "optimizer.safetensors"),
                     path / "optimizer.json")
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = load_tensors(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[f"cuda.{i}"] for i in range(len(rng) - 1) if f"cuda.{i}" in rng]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state
