"""The workspace layout, names inside it, dataset identity, and the lock that makes one process the
owner of a folder.

A workspace `<root>` holds `datasets/<name>/`, `cache/<model_id>/<dataset name>/`, `models/<model_id>/`,
`runs/<run>/`, `evals/<name>/` (evaluations of models that no run of this workspace trained) and `state/` (Prefect's database, child-process records). `Workspace` is the only code
that spells that layout out; everything else asks it for paths.

Every name a user gives (dataset, run, model id) becomes a path below one of the areas, so every name
goes through `check_name`: relative, '/'-separated parts, none empty, '.', '..' or hidden (a leading
dot: our temporary folders start with one), without control characters (a newline or an escape in a
name would garble every listing and log line). `aced train ../../x` or `--name /abs/path` is refused
here, once, for all commands; `_dataset.json` names are held to the same rule when read.

A dataset's identity is its path below `datasets/` (e.g. "flickr8k/train"): the name caches are filed
under. `_dataset.json` records it when the dataset is written; `dataset_identity` checks the two agree
whenever a dataset is read for training or caching, so a folder copied or moved under another name is
refused by both stages with the same message instead of being filed under one name and looked up
under another.

`FolderLock` is an advisory `flock` on `<folder>/.lock`: the kernel releases it when its holder dies
(SIGKILL included), so a stale lock of a dead process is taken over without any clean-up, and a
live holder is named (pid, host, command, since when) in the error of the second process.

A root (or any folder here) may be an object-store URL (`s3://bucket/prefix`, storage/fs.py): the
layout is the same, `state/` excepted (Prefect's SQLite database and process records need a POSIX
folder: `Workspace.state` is then local), and `FolderLock` is a conditionally created lock object
(storage/fs.py says what that guarantees).
"""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from storage import fs

AREAS = ("datasets", "cache", "models", "runs", "evals", "state")
LOCK_NAME = ".lock"
MAX_NAME_PART_BYTES = 200  # file systems allow 255 per part; temporary siblings add `.<name>.<12 hex>.old.tmp`
MAX_NAME_BYTES = 1000  # whole names stay far below PATH_MAX (4096) under any reasonable root


def check_name(name: str, what: str = "name") -> str:
    """`name` if it is a safe relative name below a workspace area; ValueError naming it otherwise."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"bad {what} {name!r}: empty")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):  # NUL, newline, tab, ESC...: every listing would lie
        raise ValueError(f"bad {what} {name!r}: control characters are not allowed")
    if "\\" in name or name.startswith("/"):
        raise ValueError(f"bad {what} {name!r}: must be a relative name like 'flickr8k/train' (no absolute path)")
    for part in name.split("/"):
        if part in ("", ".", "..") or part.startswith("."):
            raise ValueError(f"bad {what} {name!r}: parts may not be empty, '.', '..' or start with '.'")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_PART_BYTES:  # not a raw [Errno 36] later
            raise ValueError(f"bad {what} {name[:40]!r}...: a part longer than {MAX_NAME_PART_BYTES} bytes")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise ValueError(f"bad {what} {name[:40]!r}...: longer than {MAX_NAME_BYTES} bytes")
    return name


def area_path(root: str | os.PathLike, area: str, name: str, what: str | None = None) -> Path:
    """`<root>/<area>/<name>` for a checked `name`."""
    if area not in AREAS:
        raise ValueError(f"unknown workspace area {area!r}; one of {AREAS}")
    return fs.as_path(root) / area / check_name(name, what or area.rstrip("s") + " name")


class DatasetIdentityError(ValueError):
    """A dataset folder whose place in the workspace and recorded name disagree (copied or moved)."""


def placed_name(folder: str | os.PathLike) -> str | None:
    """The path of `folder` below the nearest `datasets/` folder above it, or None if there is none."""
    resolved = fs.posix_parts(folder)  # a URL: its bucket/key parts
    for parent in resolved.parents:
        if parent.name == "datasets":
            return resolved.relative_to(parent).as_posix()
    return None


def check_placement(folder: str | os.PathLike, recorded: str) -> str:
    """`recorded` (the name in `_dataset.json`) if it agrees with where `folder` lives; the dataset's
    identity either way. Called when a dataset is written (storage.shards.write_shards) and read."""
    placed = placed_name(folder)
    if placed is not None and placed != recorded:
        raise DatasetIdentityError(
            f"{folder}: its _dataset.json names dataset {recorded!r} but it lives at datasets/{placed} "
            f"(copied or moved?): caches are filed by that name, so it is refused; move it back, or "
            f"re-import it under the new name")
    return recorded


def dataset_identity(folder: str | os.PathLike) -> str:
    """The dataset's name: its path below the `datasets/` folder it lives in, which must equal the name
    in its `_dataset.json`; a folder outside any `datasets/` folder is known by its recorded name."""
    from storage.shards import load_dataset

    return check_placement(folder, load_dataset(folder, check_files=False).name)


@dataclass(frozen=True)
class Workspace:
    """The layout of one workspace root (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", fs.as_path(self.root))

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def state(self) -> Path:
        """`<root>/state`; for a URL root a local folder: $ACED_STATE_DIR, else
        ~/.cache/aced/state/<16 hex of the root URL> (module docstring)."""
        if not fs.is_url(self.root):
            return self.root / "state"
        import hashlib

        base = os.environ.get("ACED_STATE_DIR")
        if base:
            return Path(base)
        return Path.home() / ".cache" / "aced" / "state" / hashlib.sha256(str(self.root).encode()).hexdigest()[:16]

    def dataset(self, name: str) -> Path:
        return area_path(self.root, "datasets", name, "dataset name")

    def model(self, model_id: str) -> Path:
        return area_path(self.root, "models", model_id, "model name")

    def run(self, name: str) -> Path:
        return area_path(self.root, "runs", name, "run name")

    def evals(self, name: str) -> Path:
        """Evaluation results of a model given to a job (a run's own evaluations live in its folder)."""
        return area_path(self.root, "evals", name, "evaluation name")

    def cache_folder(self, model_id: str, dataset: str) -> Path:
        """`cache/<model_id>/<dataset name>`: one model's embeddings of one dataset."""
        return area_path(self.root, "cache", f"{check_name(model_id, 'model id')}/{check_name(dataset, 'dataset name')}")

    def resolve_dataset(self, arg: str | os.PathLike) -> Path:
        """A dataset by folder path (it holds a `_dataset.json`) or by name below `datasets/`."""
        return self._resolve(arg, self.dataset, lambda p: (p / "_dataset.json").is_file(), "dataset",
                             ("holds a _dataset.json", "holds no _dataset.json"))

    def resolve_model(self, arg: str | os.PathLike) -> Path:
        """A model folder by path or by id below `models/`; in an object store (a URL root, or an
        `s3://.../models/ID` argument) its URL: `pipeline.models.local_model_dir` / `load_model` make
        the verified local copy that open_clip loads from."""
        return self._resolve(arg, self.model, lambda p: p.is_dir(), "model", ("is a folder", "is not a folder"))

    @staticmethod
    def _resolve(arg, by_name, found, what: str, test: tuple[str, str]) -> Path:
        """`arg` as a path if `found(path)`, else (a relative `arg`) `by_name(arg)` if found; otherwise an
        error naming every place tried."""
        path = fs.as_path(arg)
        if found(path):
            return path
        if fs.is_absolute(arg):
            raise FileNotFoundError(f"{what} {str(arg)!r}: {path} {test[1]}")
        candidate = by_name(str(arg))
        if found(candidate):
            return candidate
        raise FileNotFoundError(f"{what} {str(arg)!r}: neither {path} nor {candidate} {test[0]}")

    def run_logs(self, kind: str) -> dict[str, list[Path]]:
        """{run name: its log parts, sorted} for `kind` "metrics" or "selections": the
        `runs/<run>/<kind>/*.parquet` files of every run folder directly below `runs/` (hidden names,
        i.e. temporary files of interrupted writes, left out); runs without such parts are absent."""
        if kind not in ("metrics", "selections"):
            raise ValueError(f"unknown run log {kind!r}: metrics or selections")
        try:
            _, runs, _ = next(fs.walk(self.runs))
        except (StopIteration, FileNotFoundError, NotADirectoryError):
            return {}
        out = {}
        for run in sorted(r for r in runs if not r.startswith(".")):
            folder = self.runs / run / kind
            try:
                names = fs.list_files(folder)
            except (FileNotFoundError, NotADirectoryError):
                continue
            parts = [folder / n for n in sorted(names) if n.endswith(".parquet") and not n.startswith(".")]
            if parts:
                out[run] = parts
        return out

    def find_datasets(self) -> dict[str, Path]:
        """Every dataset below `datasets/` ({name: folder})."""
        from storage.shards import find_datasets

        return find_datasets(self.datasets)


class LockedError(RuntimeError):
    """Another live process owns the folder."""


class FolderLock:
    """Exclusive, non-blocking ownership of a folder for the life of this object (a context manager).

    The holder's identity is written into the lock file after the lock is taken, so a refused
    process can say who holds it. The lock file itself is left in place (removing it would let two
    processes lock two different inodes); it is empty of meaning once no process holds the flock.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "folder"):
        self.folder = fs.as_path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._object: dict | None = None  # this process's holder record, while it holds an object-store lock

    def acquire(self) -> "FolderLock":
        if fs.is_url(self.folder):
            taken, holder = fs.acquire_object_lock(self.path)
            if not taken:
                raise LockedError(f"{self.what} {self.folder} is in use by {_describe(holder)}; wait for it to finish "
                                  f"or stop it (in an object store a killed holder on another host leaves its lock: "
                                  f"delete {self.path} once you know it is gone)")
            self._object = holder
            return self
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
        os.pwrite(fd, json.dumps(fs.holder_info()).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._object is not None:
            fs.release_object_lock(self.path, self._object)
            self._object = None
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
    if fs.is_url(folder):
        info = fs.read_lock(fs.as_path(folder) / LOCK_NAME)
        return None if info is None else info.get("pid")
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


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        info = {}
    return _describe(info)


def _describe(info: dict) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} ({info.get('command', '?')})"
