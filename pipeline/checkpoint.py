"""Atomic training checkpoints (ARCHITECTURE.md "Checkpoints").

A checkpoint is a folder `checkpoints/step-XXXXXXXX/` with named parts:
  model.safetensors   student weights
  optimizer.pt        optimizer + scheduler state (nested dicts: torch's own format)
  rng.pt              torch RNG states (CPU and CUDA)
  state.json          step, config, data position, metric/selection log positions
It is written into a hidden temporary folder, fsynced, renamed into place, and only then published by an
atomic rewrite of the `latest` pointer file. A crash at any moment leaves either the old or the new
checkpoint as `latest`, never a partial one. The last `keep` checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from storage.atomic import atomic_write_bytes, fsync_dir

LATEST = "latest"



def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(folder: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune older ones beyond `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = folder / name
    tmp = folder / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # safetensors refuses shared storage; contiguous clones keep it simple and exact.
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, sort_keys=True))
    for part in tmp.iterdir():
        _fsync_file(part)
    fsync_dir(tmp)
    if final.exists():  # a re-run of the same step after a crash between rename and pointer update
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(folder)
    atomic_write_bytes(folder / LATEST, name.encode())
    _prune(folder, keep)
    return final


def _prune(folder: Path, keep: int) -> None:
    current = (folder / LATEST).read_text().strip()
    done = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        if old.name != current:
            shutil.rmtree(old)
    for stale in folder.glob(".tmp-step-*"):  # left by a crashed writer
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    """The published checkpoint, or None. A pointer to a missing folder is an error, not a silent restart."""
    pointer = folder / LATEST
    if not pointer.exists():
        return None
    path = folder / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{pointer} points at {path}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None) -> dict[str, Any]:
    """Restore the parts into the given objects; returns state.json."""
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    if optimizer is not None:
        opt = torch.load(path / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(opt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
