"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one.

Every file of the on-disk contracts (pair shards, `_dataset.json`, cache Parquet files, manifests,
run logs) is written through here (ARCHITECTURE.md "Formats": "a file becomes visible only by an
atomic rename"). The recipe: write a temporary file *in the same folder* (so `os.replace` is a
rename within one filesystem, which POSIX makes atomic), fsync it, rename it over the target,
then fsync the folder so the rename itself survives a power loss.

Temporary names start with a dot and end in `.tmp` (`.<name>.<random>.tmp`), so readers that list
`*.tar` / `*.parquet` or `[0-9]*` never pick one up, even one left behind by a killed process.

A target in an object store (`s3://...`, storage/fs.py) has no rename: the temporary file is local,
and the exit uploads it in one object write, which is atomic (the reader sees the old object or the
new one); a folder swap there is write-all-then-commit (`replace_dir`, storage/fs.py says what that
does and does not guarantee).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

from storage import fs

TMP_SUFFIX = ".tmp"


def is_temp_name(name: str) -> bool:
    """True for a name made by `atomic_path` (a leftover of an interrupted write)."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename is durable only after this)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it replaces `path` atomically.

    The caller writes the temporary file completely (and closes it). On exit it is fsynced and
    renamed over `path`, and the folder is fsynced. On an exception the temporary file is
    removed and `path` is left untouched. For an object-store `path` the temporary file is local and
    is uploaded in one atomic object write.
    """
    if fs.is_url(path):
        staging = fs.local_temp_dir()
        try:
            tmp = staging / f".{fs.as_path(path).name}{TMP_SUFFIX}"
            yield tmp
            if not tmp.exists():
                raise FileNotFoundError(f"atomic write of {path}: nothing was written")
            fs.put_file(tmp, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic write of {path}: nothing was written to {tmp}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see module docstring)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON (keys in insertion order, trailing newline) atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (the checksum used in `_dataset.json` and manifests)."""
    if fs.is_url(path):
        return fs.sha256(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def temp_sibling(path: str | os.PathLike, *, mkdir: bool = False) -> Path:
    """A hidden temporary name beside `path` (`.<name>.<random>.tmp`, see `is_temp_name`); for an
    object-store `path`, a fresh local folder's path instead (staging for `replace_dir`)."""
    if fs.is_url(path):
        staging = fs.local_temp_dir()
        if not mkdir:
            staging.rmdir()
        return staging
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    if mkdir:
        tmp.mkdir(parents=True)
    return tmp


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the complete folder `src` to `dst` (same parent), replacing `dst` if it exists: the one
    folder swap of the project (datasets, model folders, checkpoints).

    A folder cannot replace a non-empty folder in one rename, so an existing `dst` is first renamed
    to a hidden sibling `.<name>.<random>.old.tmp` (still complete), then `src` is renamed into place
    (if that fails, the old folder is put back), then the old copy is deleted. A crash in between
    leaves the old folder under its hidden name, which `aced inspect` reports and the next writer of
    `dst` removes. The caller has fsynced `src`'s files; this fsyncs the folders around the renames.

    An object-store `dst` (a local `src` from `temp_sibling`): write-all-then-commit, not atomic
    (storage.fs.upload_dir); `src` is removed once uploaded.
    """
    if fs.is_url(dst):
        fs.upload_dir(src, dst)
        shutil.rmtree(src, ignore_errors=True)
        return
    src, dst = Path(src), Path(dst)
    fsync_dir(src)
    if dst.exists():
        old = dst.parent / f".{dst.name}.{secrets.token_hex(6)}.old{TMP_SUFFIX}"
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        fsync_dir(dst.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_dir(dst.parent)
