"""Names inside a workspace, and the exclusive lock that makes one process the owner of a folder.

A workspace `<root>` holds `datasets/`, `cache/`, `models/` and `runs/`. Every name a user gives
(dataset, run, model id) becomes a path below one of them, so every name goes through `check_name`:
relative, '/'-separated parts, none empty, '.', '..' or hidden (a leading dot: our temporary
folders start with one). `aced train ../../x` or `--name /abs/path` is refused here, once, for all
commands.

`FolderLock` is an advisory `flock` on `<folder>/.lock`: the kernel releases it when its holder dies
(SIGKILL included), so a stale lock of a dead process is taken over without any clean-up, and a
live holder is named (pid, host, command, since when) in the error of the second process.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

AREAS = ("datasets", "cache", "models", "runs")
LOCK_NAME = ".lock"


def check_name(name: str, what: str = "name") -> str:
    """`name` if it is a safe relative name below a workspace area; ValueError naming it otherwise."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"bad {what} {name!r}: empty")
    if "\\" in name or "\x00" in name or name.startswith("/"):
        raise ValueError(f"bad {what} {name!r}: must be a relative name like 'flickr8k/train' (no absolute path)")
    for part in name.split("/"):
        if part in ("", ".", "..") or part.startswith("."):
            raise ValueError(f"bad {what} {name!r}: parts may not be empty, '.', '..' or start with '.'")
    return name


def area_path(root: str | os.PathLike, area: str, name: str, what: str | None = None) -> Path:
    """`<root>/<area>/<name>` for a checked `name`."""
    if area not in AREAS:
        raise ValueError(f"unknown workspace area {area!r}; one of {AREAS}")
    return Path(root) / area / check_name(name, what or area.rstrip("s") + " name")


class LockedError(RuntimeError):
    """Another live process owns the folder."""


class FolderLock:
    """Exclusive, non-blocking ownership of a folder for the life of this object (a context manager).

    The holder's identity is written into the lock file after the lock is taken, so a refused
    process can say who holds it. The lock file itself is left in place (removing it would let two
    processes lock two different inodes); it is empty of meaning once no process holds the flock.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "folder"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockedError(f"{self.what} {self.folder} is in use by {holder}; wait for it to finish or stop "
                              "it (the lock is released when that process exits)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held_by(folder: str | os.PathLike) -> int | None:
    """pid recorded by the live holder of `folder`'s lock, or None when nobody holds it."""
    path = Path(folder) / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held exclusively: by whom?
            try:
                return int(json.loads(os.pread(fd, 4096, 0).decode() or "{}").get("pid"))
            except (ValueError, TypeError):
                return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv)[:300]}


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        info = {}
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} ({info.get('command', '?')})"
