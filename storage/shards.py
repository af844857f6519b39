"""Pair shards: the DataComp / img2dataset layout that every stage reads (ARCHITECTURE.md "Formats").

A dataset is a folder holding, per shard `NNNNNNNN`:
  - `NNNNNNNN.tar`: a webdataset tar with `<key>.jpg` (image bytes as imported, no re-encode),
    `<key>.txt` (the caption) and `<key>.json` (all metadata, including the 32-hex `uid`),
    grouped by key, one sample after another;
  - `NNNNNNNN.parquet`: the same samples' metadata (`METADATA_SCHEMA`), same rows, same order;
and `_dataset.json` listing the shards with row counts and the sha256 of each tar.

A uid is the join key between a pair and its cached embeddings (paper appendix J: reference and
teacher embeddings are computed once, offline, and zipped with the raw pairs at training time), so
it is deterministic: `make_uid` hashes where the pair came from, never a random number.

Tars are written with plain `tarfile` (the `webdataset` package imports torch, which `storage/`
never does) and deterministic headers (mtime 0, uid/gid 0), so re-importing the same data gives the
same bytes and the same checksums, and caches computed for the first import stay valid.

A whole dataset is written into a hidden sibling folder and renamed into place at the end, so a
reader sees either no dataset, the previous one, or the complete new one. The writer holds a flock on
that folder; one left by a killed writer is unlocked, and the next write of the same dataset removes it.

A dataset folder, and the tars it points at, may live in an object store (`s3://bucket/prefix`,
storage/fs.py): tars are read in one streaming pass (the sha256 check too), Parquet files whole; a
dataset written there is uploaded from a local work folder with `_dataset.json` last (its commit
file: a folder without one is no dataset), since an object store has no folder rename.

`decode_image` is the project's one image decoder (import checks, shard verification, training,
evaluation, stage-1 embedding): 8-bit RGB, 16-bit greyscale scaled, a pixel limit against
decompression bombs, and an ImageError naming the sample.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from storage import fs
from storage.atomic import atomic_path, atomic_write_json, is_temp_name, replace_dir, sha256_file, temp_sibling
from storage.workspace import check_name, check_placement

log = logging.getLogger(__name__)

DATASET_FILE = "_dataset.json"
FORMAT_VERSION = 1

METADATA_SCHEMA = pa.schema([
    pa.field("uid", pa.string(), nullable=False),       # 32 lowercase hex chars (make_uid)
    pa.field("key", pa.string(), nullable=False),       # webdataset key: tar members are <key>.<ext>
    pa.field("image_id", pa.string(), nullable=False),  # groups the captions of one image (retrieval)
    pa.field("caption", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("source", pa.string(), nullable=False),    # short name of the origin (e.g. "flickr8k")
    pa.field("noisy", pa.bool_()),                      # True = caption known to mismatch (synthetic)
    pa.field("label", pa.int32()),                      # class index for class-folder sets
    pa.field("split", pa.string()),                     # train/dev/test/other where known
])

# Columns a metadata Parquet may carry beyond METADATA_SCHEMA: a pair made from another pair's tar members
# (`storage.corrupt`: the image of one pair, the caption of another). `tar_uid` is the uid of the pair whose
# members (`<key>.jpg/.txt/.json`) the row reads, `caption_uid` the uid of the pair its caption comes from.
# Readers keep METADATA_SCHEMA's columns (`read_metadata`); `iter_samples` reads `tar_uid` for its checks.
PROVENANCE_FIELDS = (pa.field("tar_uid", pa.string(), nullable=False), pa.field("caption_uid", pa.string(), nullable=False))
PROVENANCE_SCHEMA = pa.schema([*METADATA_SCHEMA, *PROVENANCE_FIELDS])

# Image members a reader accepts; writers produce "jpg" for JPEG data (the contract's `<key>.jpg`).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_UID_RE = re.compile(r"^[0-9a-f]{32}$")
_SHARD_RE = re.compile(r"^[0-9]{8}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
OnError = Literal["raise", "skip"]


class ShardError(ValueError):
    """A pair shard or sample is unusable (bad input: a ValueError, so every command reports it as one
    line). The message always names the file and the sample."""


def make_uid(source: str, image_id: str, caption: str, index: int) -> str:
    """Deterministic 32-hex uid (blake2b-128) of a pair.

    `index` separates pairs that would otherwise collide (the n-th caption of an image; two equal
    captions of one image are still two pairs). The fields are JSON-encoded as a list so that no
    choice of separator can make two different tuples hash the same bytes.
    """
    payload = json.dumps([source, image_id, caption, int(index)], ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=16).hexdigest()


@dataclass
class Sample:
    """One image-text pair with its metadata (a row of METADATA_SCHEMA plus the image bytes)."""

    key: str
    uid: str
    image_bytes: bytes
    caption: str
    image_id: str
    width: int
    height: int
    source: str
    noisy: bool | None = None
    label: int | None = None
    split: str | None = None

    def problem(self, *, checked_size: tuple[int, int] | None = None) -> str | None:
        """Why this sample cannot be written, or None. `checked_size`: the image's header size if
        the caller already read it (skips a second header parse of the same bytes)."""
        if (not isinstance(self.key, str) or not self.key or "." in self.key or "/" in self.key
                or len(self.key.encode("utf-8")) > 90):
            return f"bad key {self.key!r} (must be 1-90 bytes, without '.' or '/')"
        if not isinstance(self.uid, str) or not _UID_RE.match(self.uid):
            return f"bad uid {self.uid!r} (must be 32 lowercase hex chars)"
        if not isinstance(self.caption, str) or not self.caption.strip():
            return "empty or missing caption"
        if not isinstance(self.image_bytes, (bytes, bytearray)) or not self.image_bytes:
            return "empty image"
        if image_format(self.image_bytes) is None:
            return "image bytes are not JPEG, PNG or WebP"
        if not (isinstance(self.width, int) and isinstance(self.height, int) and self.width > 0 and self.height > 0):
            return f"bad size {self.width}x{self.height}"
        try:
            size = checked_size or image_size(self.image_bytes)
        except ValueError as e:
            return str(e)
        if size != (self.width, self.height):
            return f"image is {size[0]}x{size[1]} but the sample says {self.width}x{self.height}"
        if not isinstance(self.image_id, str) or not self.image_id:
            return "empty image_id"
        return None

    def metadata(self) -> dict[str, Any]:
        return {"uid": self.uid, "key": self.key, "image_id": self.image_id, "caption": self.caption,
                "width": self.width, "height": self.height, "source": self.source, "noisy": self.noisy,
                "label": self.label, "split": self.split}


@dataclass(frozen=True)
class ShardRef:
    """One shard of a dataset: identity (dataset folder, name) plus its row count and tar checksum.

    `tar`: where the shard's tar lives when it is not `<dataset_dir>/<name>.tar` (a pool registered in
    place, `register_shards`): the path exactly as `_dataset.json` records it, absolute or relative to
    the dataset folder. Every reader goes through `tar_path`, so training, caching, evaluation and the
    checks read an external tar exactly as they read their own."""

    dataset_dir: Path
    name: str
    rows: int
    sha256: str
    tar: str | None = None

    @property
    def external(self) -> bool:
        """True when the tar lives outside the dataset folder's own `<name>.tar` (registered in place)."""
        return self.tar is not None

    @property
    def tar_path(self) -> Path:
        if self.tar is None:
            return self.dataset_dir / f"{self.name}.tar"
        # No normpath: "<dataset>/../pool/x.tar" must go through the real parent of a symlinked folder,
        # as the relative path was computed between resolved paths (an absolute `tar` or a URL stays as it is).
        return fs.join(self.dataset_dir, self.tar)

    @property
    def meta_path(self) -> Path:
        return self.dataset_dir / f"{self.name}.parquet"


@dataclass
class DatasetInfo:
    """The content of `_dataset.json` (plus where it lives)."""

    name: str
    source: str
    path: Path
    shards: list[ShardRef]
    created: str
    skipped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"classnames": [...]}
    recorded_rows: int | None = None  # the file's top-level "rows" (checked against the shards' sum)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def classnames(self) -> list[str] | None:
        return self.extra.get("classnames")

    @property
    def templates(self) -> list[str] | None:
        """The set's own zero-shot prompt templates (each with one "{}"), if it names any: CLIP uses
        per-dataset prompts, and a set whose captions follow a known grammar should be asked in it."""
        return self.extra.get("templates")


def image_format(data: bytes) -> str | None:
    """Member extension for image bytes by their magic number ("jpg", "png", "webp"), else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


class ImageError(ShardError, ValueError):
    """Image bytes that cannot be decoded (corrupt, truncated, not an image, or over MAX_IMAGE_PIXELS).
    The message names the sample (the `where` given to `decode_image`)."""


# Decompression-bomb limit: a few hundred bytes of PNG can claim gigapixels. PIL only warns above its
# own limit (and raises above twice that), so the limit is enforced here, as an error, for every decode
# (checked on the header size, before any pixel is decoded).
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of a decoded image. 16/32-bit integer greyscale ("I;16*", "I", e.g. 16-bit PNGs) is
    scaled from the 16-bit range: PIL's own convert("RGB") clips those values at 255, turning almost
    every pixel white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.int64)  # PIL's "I;16B" etc. arrive in native byte order here
        a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535  # round(a / 257): 0 -> 0, 65535 -> 255
        return Image.fromarray(a.astype(np.uint8), mode="L").convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes, *, where: str = "") -> Image.Image:
    """The one image decoder of the project (importers, shard checks, training, evaluation, caching):
    every pixel decoded, as an 8-bit RGB PIL image (16-bit greyscale scaled, see `_to_rgb`).

    Raises ImageError "<where>: undecodable image (...)" for anything PIL cannot decode, and for images
    above MAX_IMAGE_PIXELS (decompression bombs) before their pixels are decoded.
    """
    prefix = f"{where}: " if where else ""
    try:
        # (No warnings.catch_warnings around PIL's own bomb warning: it changes process-wide state and
        # evaluation decodes in threads. The warning can only come with the error raised just below.)
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageError(f"{prefix}image is {w}x{h} = {w * h} pixels, above the limit of "
                                 f"{MAX_IMAGE_PIXELS} (decompression bomb?)")
            im.load()
            return _to_rgb(im)
    except ImageError:
        raise
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, bomb errors...)
        raise ImageError(f"{prefix}undecodable image ({type(e).__name__}: {e})") from None


def image_size(data: bytes, *, decode: bool = False, where: str = "") -> tuple[int, int]:
    """(width, height) from the image header; with `decode`, also decode all pixels through
    `decode_image` (catches truncated or corrupt bodies that a header read does not).
    Raises ImageError (a ValueError) if unreadable."""
    if decode:
        return decode_image(data, where=where).size
    prefix = f"{where}: " if where else ""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError...)
        raise ImageError(f"{prefix}undecodable image ({type(e).__name__}: {e})") from None


def shard_name(index: int) -> str:
    return f"{index:08d}"


# --------------------------------------------------------------------------- writing

class _HashingWriter:
    """File wrapper that hashes what tarfile writes, so a shard's sha256 costs no second read."""

    def __init__(self, f):
        self._f, self.hash = f, hashlib.sha256()

    def write(self, b) -> int:
        self.hash.update(b)
        return self._f.write(b)

    def tell(self) -> int:
        return self._f.tell()


def _member(name: str, data: bytes) -> bytes:
    """One tar member: a ustar header made by tarfile, the data, zero padding to 512 bytes.
    (Equivalent to TarFile.addfile, about 4x faster: no TarInfo copy, no pax-header probing,
    which dominated the import time of small images.)"""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    pad = -len(data) % tarfile.BLOCKSIZE
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict") + data + b"\0" * pad


def _write_shard(folder: Path, name: str, samples: list[Sample], *, dataset: str) -> ShardRef:
    """Write `<name>.tar` then `<name>.parquet` (each atomically) and return their ShardRef."""
    tar_path = folder / f"{name}.tar"
    with atomic_path(tar_path) as tmp:
        with open(tmp, "wb") as raw:
            w = _HashingWriter(raw)
            for s in samples:
                w.write(_member(f"{s.key}.{image_format(s.image_bytes)}", bytes(s.image_bytes))
                        + _member(f"{s.key}.txt", s.caption.encode("utf-8"))
                        + _member(f"{s.key}.json", json.dumps(s.metadata(), ensure_ascii=False).encode("utf-8")))
            # End of archive: two zero blocks, then padding to a whole record (as TarFile.close does).
            size = w.tell() + 2 * tarfile.BLOCKSIZE
            w.write(b"\0" * (2 * tarfile.BLOCKSIZE + (-size % tarfile.RECORDSIZE)))
        ref = ShardRef(folder, name, len(samples), w.hash.hexdigest())
    _write_metadata(folder, ref, pa.Table.from_pylist([s.metadata() for s in samples], schema=METADATA_SCHEMA),
                    dataset=dataset)
    return ref


def _write_metadata(folder: Path, ref: ShardRef, table: pa.Table, *, dataset: str) -> None:
    """`<folder>/<name>.parquet` (atomically), labelled with its shard and that shard's tar checksum
    (`check_metadata_owner`)."""
    kv = {"aced.dataset": dataset, "aced.shard": ref.name, "aced.tar_sha256": ref.sha256}
    if ref.external:
        kv["aced.tar"] = ref.tar
    with atomic_path(folder / f"{ref.name}.parquet") as tmp:
        pq.write_table(table.replace_schema_metadata(kv), tmp, compression="zstd")


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    entries = [p for p in out_dir.iterdir() if not is_temp_name(p.name)]
    if not entries:
        return
    if not (out_dir / DATASET_FILE).exists():
        raise FileExistsError(f"{out_dir} is not empty and holds no {DATASET_FILE}: refusing to replace it")
    if not overwrite:
        raise FileExistsError(f"{out_dir} already holds a dataset; pass overwrite=True (CLI: --overwrite) to replace it")
    nested = [p for p in entries if p.is_dir()]
    if nested:
        raise FileExistsError(f"{out_dir} holds sub-folders {[p.name for p in nested]}: refusing to replace it")


class DiskFullError(OSError):
    """The disk (or quota) filled up while writing a dataset; nothing of the new dataset was kept."""


def _work_re(out_dir: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out_dir.name)}\.[0-9a-f]{{12}}(\.old)?\.tmp$")


def work_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """The hidden work folders `write_shards` makes beside the dataset folder `out_dir`, in use or left
    behind by a killed write: `.<name>.<12 hex>.tmp` (the new dataset being written) and
    `.<name>.<12 hex>.old.tmp` (a replaced dataset being deleted). Every such name is also an
    `storage.atomic.is_temp_name`, the test readers and `aced inspect` use for any leftover."""
    out_dir = Path(out_dir)
    pattern = _work_re(out_dir)
    try:
        entries = sorted(out_dir.parent.iterdir())
    except FileNotFoundError:
        return []
    return [p for p in entries if pattern.match(p.name) and is_temp_name(p.name)]


def _flock(fd: int, *, wait: bool) -> bool:
    """Take an exclusive flock on `fd`: True if taken, False if another process holds it (`wait`
    False). A filesystem without flock support (some network mounts) counts as "held elsewhere",
    so a cleaner there never deletes a folder it cannot prove abandoned, and a writer goes on unlocked."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        log.debug("flock unsupported here (%s)", e)
        return False
    return True


@contextlib.contextmanager
def _parent_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on `folder` while a work folder is created and locked, or while stale ones are
    removed, so a cleaner never sees a live work folder before its writer has locked it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _flock(fd, wait=True)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_dir(path: Path, *, wait: bool) -> int | None:
    """An fd holding an exclusive flock on the folder `path` (released when the fd is closed, also when
    the process is killed). Without `wait`: None if the lock is held elsewhere (fd closed)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if not _flock(fd, wait=wait) and not wait:
            os.close(fd)
            return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_stale_work_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the work folders of `out_dir` (see `work_dirs`) that no running write holds: a killed
    import leaves its hidden folder behind, and nothing else ever removes it. Only folders named by
    our own pattern, only beside `out_dir`; a live write's folder is locked and left alone."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    removed = []
    with _parent_lock(out_dir.parent):
        for p in work_dirs(out_dir):
            if p.is_symlink() or not p.is_dir():
                continue
            try:
                fd = _lock_dir(p, wait=False)
            except FileNotFoundError:  # its writer finished (renamed or removed it) since the listing
                continue
            if fd is None:
                log.info("%s: in use by a running write (or not lockable here), left alone", p)
                continue
            try:
                shutil.rmtree(p)
            except OSError as e:  # a leftover we cannot delete must not stop the new import
                log.warning("%s: left by an interrupted write, but cannot be removed (%s)", p, e)
                continue
            finally:
                os.close(fd)
            removed.append(p)
    if removed:
        log.warning("%s: removed %d work folder(s) left by an interrupted write: %s",
                    out_dir.parent, len(removed), ", ".join(p.name for p in removed))
    return removed


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


@contextlib.contextmanager
def _dataset_work(out_dir: Path, *, overwrite: bool, name: str) -> Iterator[Path]:
    """The hidden, locked work folder of a new dataset `out_dir`; swapped into place when the block
    ends without error (after `_DATASET_FILE` was written there), removed on any error. A full disk is
    a DiskFullError naming `out_dir`. Stale work folders of `out_dir` are removed first."""
    check_placement(out_dir, name)  # a dataset's name is its path below datasets/ (storage.workspace)
    _check_target(out_dir, overwrite)
    if fs.is_url(out_dir):  # no rename, no flock: a local work folder, uploaded with _dataset.json last
        work = temp_sibling(out_dir, mkdir=True)
        try:
            yield work
            replace_dir(work, out_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work_dirs(out_dir)
    work = temp_sibling(out_dir)
    work_fd = None
    try:
        with _parent_lock(out_dir.parent):
            work.mkdir()
            work_fd = _lock_dir(work, wait=True)  # held until the end: marks the folder as live
        yield work
        # Swap into place. Without an old dataset this is one atomic rename; with one, the old
        # folder is locked (so no cleaner takes it for a leftover) and renamed aside first; a crash
        # in between leaves both folders, nothing half-written.
        old_fd = _lock_dir(out_dir, wait=True) if out_dir.exists() else None
        try:
            replace_dir(work, out_dir)
        finally:
            if old_fd is not None:
                os.close(old_fd)
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            raise DiskFullError(e.errno, f"{out_dir}: disk full while writing dataset {name!r} "
                                         f"({e.strerror}); nothing was kept (the partial work folder was "
                                         f"removed): free space under {out_dir.parent} and re-run") from e
        raise
    finally:
        if work_fd is not None:
            os.close(work_fd)


def _write_dataset_file(work: Path, *, name: str, source: str, shards: list[ShardRef], skipped: int,
                        extra: dict[str, Any] | Callable[[], dict[str, Any]] | None) -> None:
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    doc = {"name": name, "source": source, "format_version": FORMAT_VERSION,
           "shards": [{"name": r.name, "rows": r.rows, "sha256": r.sha256, **({"tar": r.tar} if r.external else {})}
                      for r in shards],
           "rows": sum(r.rows for r in shards), "skipped": skipped, "created": created}
    for k, v in ((extra() if callable(extra) else extra) or {}).items():
        if k in doc:
            raise ValueError(f"extra key {k!r} would overwrite a standard _dataset.json field")
        doc[k] = v
    atomic_write_json(work / DATASET_FILE, doc)


def write_shards(samples: Iterable[Sample], out_dir: str | os.PathLike, *, name: str, source: str,
                 samples_per_shard: int = 1000, on_error: OnError = "raise", overwrite: bool = False,
                 extra: dict[str, Any] | Callable[[], dict[str, Any]] | None = None) -> DatasetInfo:
    """Write `samples` as a dataset folder `out_dir` (tar + parquet per shard, then `_dataset.json`).

    name: the dataset name (its path under `<root>/datasets`, e.g. "flickr8k/train").
    source: where the data came from (recorded in `_dataset.json`).
    on_error: "raise" -> ShardError naming the sample for an invalid sample or a duplicate uid/key;
        "skip" -> such samples are logged and counted (`DatasetInfo.skipped`).
    overwrite: replace an existing dataset in `out_dir` (otherwise FileExistsError).
    extra: more keys for `_dataset.json` (e.g. {"classnames": [...]}), or a function returning them,
        called once all samples are consumed (so an importer can record how many it skipped).

    The dataset is written into a hidden temporary sibling folder (see `work_dirs`; locked while this
    write runs) and renamed into place only once complete; on any error nothing is left behind and an
    existing dataset is untouched; a full disk is a DiskFullError naming `out_dir`. Work folders of
    `out_dir` left by a killed write are removed first (`remove_stale_work_dirs`, logged).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    out_dir = fs.as_path(out_dir)
    with _dataset_work(out_dir, overwrite=overwrite, name=name) as work:
        shards: list[ShardRef] = []
        seen_uid: dict[str, str] = {}
        seen_key: set[str] = set()
        skipped = 0
        buf: list[Sample] = []
        last_image: tuple[bytes | None, tuple[int, int] | None] = (None, None)
        for s in samples:
            # Consecutive captions of one image share one bytes object: parse its header once.
            why = s.problem(checked_size=last_image[1] if s.image_bytes is last_image[0] else None)
            if why is None:
                last_image = (s.image_bytes, (s.width, s.height))
            if why is None and s.uid in seen_uid:
                why = f"duplicate uid {s.uid} (already used by key {seen_uid[s.uid]!r})"
            if why is None and s.key in seen_key:
                why = f"duplicate key {s.key!r}"
            if why is not None:
                msg = f"{out_dir}: sample key={s.key!r} uid={s.uid!r} image_id={s.image_id!r}: {why}"
                if on_error == "raise":
                    raise ShardError(msg)
                skipped += 1
                log.warning("skipping %s", msg)
                continue
            seen_uid[s.uid] = s.key
            seen_key.add(s.key)
            buf.append(s)
            if len(buf) == samples_per_shard:
                shards.append(_write_shard(work, shard_name(len(shards)), buf, dataset=name))
                buf = []
        if buf:
            shards.append(_write_shard(work, shard_name(len(shards)), buf, dataset=name))
        if not shards:
            raise ShardError(f"{out_dir}: no samples to write" + (f" (all {skipped} skipped)" if skipped else ""))
        _write_dataset_file(work, name=name, source=source, shards=shards, skipped=skipped, extra=extra)
    if skipped:
        log.warning("%s: skipped %d bad samples", out_dir, skipped)
    return load_dataset(out_dir)


@dataclass
class ExternalShard:
    """A tar that stays where it is (an img2dataset / DataComp shard registered in place): its path,
    the sha256 of its bytes and the metadata rows (METADATA_SCHEMA dicts, tar order) of the samples the
    project will read from it. Tar members whose key has no row (samples left out at registration,
    counted there) are passed over by every reader."""

    tar: Path
    sha256: str
    rows: list[dict[str, Any]]


def _uid_bytes(uids: list[str]) -> np.ndarray:
    """32-hex uids as fixed-width 16-byte values (for duplicate checks by sorting, not by a set)."""
    return np.frombuffer(bytes.fromhex("".join(uids)), dtype="S16") if uids else np.empty(0, dtype="S16")


def register_shards(shards: Iterable[ExternalShard], out_dir: str | os.PathLike, *, name: str, source: str,
                    relative: bool = False, on_error: OnError = "raise", overwrite: bool = False,
                    extra: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
                    schema: pa.Schema = METADATA_SCHEMA) -> DatasetInfo:
    """Write the dataset folder `out_dir` for tars that stay where they are: one metadata Parquet per
    tar (`NNNNNNNN.parquet`, labelled with the tar's sha256 as `_write_shard` labels its own) and
    `_dataset.json`, whose shard entries carry `"tar"`: the tar's path, absolute, or with `relative`
    relative to `out_dir` (a workspace and a pool that move together). No image byte is copied.

    Rows are checked as `write_shards` checks samples, minus the image (the importer read it): a bad
    uid or key, an empty caption, a duplicate key in one tar, a uid used twice in the whole dataset
    (found by sorting 16-byte uids at the end, not with a set of strings). on_error="raise" stops at
    the first; "skip" logs and counts each (`DatasetInfo.skipped`; for a uid seen twice, the later
    rows). A tar with no row left is not listed (logged). Same work-folder protocol as `write_shards`.
    schema: METADATA_SCHEMA, or PROVENANCE_SCHEMA for rows that record `tar_uid`/`caption_uid` (`storage.corrupt`).
    """
    if schema not in (METADATA_SCHEMA, PROVENANCE_SCHEMA):
        raise ValueError("schema must be METADATA_SCHEMA or PROVENANCE_SCHEMA")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    out_dir = fs.as_path(out_dir)
    if relative and fs.is_url(out_dir):
        raise ValueError(f"{out_dir}: relative tar paths are for local dataset folders only")
    with _dataset_work(out_dir, overwrite=overwrite, name=name) as work:
        refs: list[ShardRef] = []
        tables: list[pa.Table] = []
        skipped = 0

        def bad(msg: str) -> None:
            nonlocal skipped
            if on_error == "raise":
                raise ShardError(msg)
            skipped += 1
            log.warning("skipping %s", msg)

        for ext in shards:
            keys: set[str] = set()
            rows = []
            for r in ext.rows:
                why = None
                if not isinstance(r.get("uid"), str) or not _UID_RE.match(r["uid"]):
                    why = f"bad uid {r.get('uid')!r} (must be 32 lowercase hex chars)"
                elif not isinstance(r.get("key"), str) or not r["key"]:
                    why = f"bad key {r.get('key')!r}"
                elif r["key"] in keys:
                    why = f"duplicate key {r['key']!r}"
                elif not isinstance(r.get("caption"), str) or not r["caption"].strip():
                    why = "empty or missing caption"
                if why is not None:
                    bad(f"{ext.tar}: sample key={r.get('key')!r} uid={r.get('uid')!r}: {why}")
                    continue
                keys.add(r["key"])
                rows.append(r)
            if not rows:
                log.warning("%s: no usable sample: shard not listed", ext.tar)
                continue
            tar = fs.as_path(ext.tar) if fs.is_url(ext.tar) else Path(os.path.abspath(ext.tar))
            if relative and fs.is_url(tar):
                raise ValueError(f"{tar}: relative tar paths are for local tars only (an object-store tar is "
                                 f"recorded by its URL)")
            recorded = os.path.relpath(tar.resolve(), out_dir.parent.resolve() / out_dir.name) if relative else str(tar)
            refs.append(ShardRef(out_dir, shard_name(len(refs)), len(rows), ext.sha256, recorded))
            tables.append(pa.Table.from_pylist(rows, schema=schema))
        if not refs:
            raise ShardError(f"{out_dir}: no samples to register" + (f" (all {skipped} skipped)" if skipped else ""))
        # A uid twice in the dataset: sort 16-byte uids once (O(n log n), 24 bytes a row), no set of strings.
        uids = np.concatenate([_uid_bytes(t["uid"].to_pylist()) for t in tables])
        order = np.argsort(uids, kind="stable")  # stable: the first occurrence in dataset order comes first
        dup = np.flatnonzero(uids[order][1:] == uids[order][:-1]) + 1
        if dup.size:
            offsets = np.cumsum([0] + [t.num_rows for t in tables])
            drop: dict[int, list[int]] = {}
            for pos in order[dup]:
                s = int(np.searchsorted(offsets, pos, side="right") - 1)
                r = int(pos - offsets[s])
                bad(f"{refs[s].tar_path}: sample key={tables[s]['key'][r].as_py()!r}: duplicate uid "
                    f"{tables[s]['uid'][r].as_py()} (already used earlier in the dataset)")
                drop.setdefault(s, []).append(r)
            for s, rs in drop.items():
                keep = np.ones(tables[s].num_rows, dtype=bool)
                keep[rs] = False
                tables[s] = tables[s].filter(pa.array(keep))
                refs[s] = ShardRef(out_dir, refs[s].name, tables[s].num_rows, refs[s].sha256, refs[s].tar)
            empty = [s for s in range(len(refs)) if refs[s].rows == 0]
            if empty:  # every row of a tar was a duplicate: drop it and renumber, as for a tar with no row
                for s in empty:
                    log.warning("%s: no usable sample: shard not listed", refs[s].tar_path)
                keep_s = [s for s in range(len(refs)) if refs[s].rows]
                tables = [tables[s] for s in keep_s]
                refs = [ShardRef(out_dir, shard_name(i), refs[s].rows, refs[s].sha256, refs[s].tar)
                        for i, s in enumerate(keep_s)]
                if not refs:
                    raise ShardError(f"{out_dir}: no samples to register (all {skipped} skipped)")
        for ref, table in zip(refs, tables):
            _write_metadata(work, ref, table, dataset=name)
        _write_dataset_file(work, name=name, source=source, shards=refs, skipped=skipped, extra=extra)
    if skipped:
        log.warning("%s: skipped %d bad samples", out_dir, skipped)
    return load_dataset(out_dir)


# --------------------------------------------------------------------------- reading

def _dataset_doc_problem(doc: Any) -> str | None:
    """Why a parsed `_dataset.json` is malformed (missing keys, wrong types), or None.
    Types are checked, not coerced: a "rows" of "4" or 4.0 means the file was not written by us."""
    if not isinstance(doc, dict):
        return f"top level is a {type(doc).__name__}, want an object"
    for k, t in (("name", str), ("source", str), ("created", str), ("shards", list)):
        if k not in doc:
            return f"no {k!r}"
        if not isinstance(doc[k], t):
            return f"{k!r} is a {type(doc[k]).__name__}, want a {t.__name__}"
    try:
        check_name(doc["name"], "'name'")
    except ValueError as e:
        return str(e)
    if "format_version" in doc and (type(doc["format_version"]) is not int or doc["format_version"] != FORMAT_VERSION):
        return (f"'format_version' is {doc['format_version']!r}; this version of aced reads format {FORMAT_VERSION} "
                f"only (written by another version? re-import the dataset)")
    if not isinstance(doc.get("skipped", 0), int) or isinstance(doc.get("skipped", 0), bool):
        return f"'skipped' is {doc['skipped']!r}, want an integer"
    for i, s in enumerate(doc["shards"]):
        if not isinstance(s, dict):
            return f"shards[{i}] is a {type(s).__name__}, want an object"
        for k in ("name", "rows", "sha256"):
            if k not in s:
                return f"shards[{i}] has no {k!r}"
        if not isinstance(s["name"], str) or not _SHARD_RE.match(s["name"]):
            return f"shards[{i}]: bad shard name {s['name']!r} (want 8 digits)"
        if not isinstance(s["rows"], int) or isinstance(s["rows"], bool) or s["rows"] < 0:
            return f"shards[{i}] ({s['name']}): rows is {s['rows']!r}, want an integer >= 0"
        if not isinstance(s["sha256"], str) or not _SHA256_RE.match(s["sha256"]):
            return f"shards[{i}] ({s['name']}): sha256 is {s['sha256']!r}, want 64 lowercase hex chars"
        if "tar" in s and not (isinstance(s["tar"], str) and s["tar"] and "\x00" not in s["tar"]):
            return (f"shards[{i}] ({s['name']}): tar is {s['tar']!r}, want a path (absolute or relative to the "
                    f"dataset folder)")
    names = [s["name"] for s in doc["shards"]]
    if len(set(names)) != len(names):
        return f"shard names listed twice: {sorted({n for n in names if names.count(n) > 1})}"
    if "rows" in doc and (type(doc["rows"]) is not int or doc["rows"] < 0):
        return f"'rows' is {doc['rows']!r}, want an integer >= 0 (the sum of the shards' rows)"
    return None


def dataset_file_problems(info: DatasetInfo) -> list[str]:
    """How the folder's files differ from its `_dataset.json`: a listed shard whose tar (its own, or an
    external one a shard entry points at) or metadata Parquet is missing, or a `.tar`/`.parquet` file
    in the folder that no listed shard owns (a shard removed from the listing, or a stray file); and a
    top-level "rows" that is not the sum of the listed shards' rows.
    Temporary files of interrupted writes (hidden) are not counted."""
    path = info.path / DATASET_FILE
    try:
        present = {n for n in fs.list_files(info.path) if not n.startswith(".")}
    except OSError as e:
        return [f"{info.path}: cannot list the dataset folder ({e})"]
    listed = {f"{s.name}.parquet" for s in info.shards} | {f"{s.name}.tar" for s in info.shards if not s.external}
    missing = [str(info.path / n) for n in sorted(listed - present)]
    missing += [str(s.tar_path) for s in info.shards if s.external and not fs.is_file(s.tar_path)]
    here = fs.posix_parts(info.path)
    external_here = {s.tar_path.name for s in info.shards
                     if s.external and fs.posix_parts(s.tar_path).parent == here}
    extra = sorted(n for n in present - listed - external_here if n.endswith((".tar", ".parquet")))
    out = []
    if missing:
        out.append(f"{path}: lists files that are missing: {', '.join(missing)}")
    if extra:
        out.append(f"{path}: does not list files present in {info.path}: {', '.join(extra)} "
                   f"(a shard removed from the listing, or a stray file)")
    if info.recorded_rows is not None and info.recorded_rows != info.rows:
        out.append(f"{path}: 'rows' is {info.recorded_rows}, but its shards hold {info.rows} (hand-edited, or a "
                   f"shard entry removed)")
    return out


def load_dataset(dataset_dir: str | os.PathLike, *, check_files: bool = True) -> DatasetInfo:
    """Read and check `_dataset.json` of a dataset folder: ShardError naming the file if it is
    missing, not JSON, or malformed (missing keys, wrong types); with `check_files` (every reader),
    also if the folder's shard files differ from the listing (`dataset_file_problems`), so that a
    shard dropped from the listing or a missing file is an error, never a smaller dataset."""
    dataset_dir = fs.as_path(dataset_dir)
    path = dataset_dir / DATASET_FILE
    try:
        doc = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path}: missing (not a dataset folder, or its import did not finish)") from None
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    why = _dataset_doc_problem(doc)
    if why is not None:
        raise ShardError(f"{path}: malformed: {why}")
    shards = [ShardRef(dataset_dir, s["name"], s["rows"], s["sha256"], s.get("tar")) for s in doc["shards"]]
    info = DatasetInfo(name=doc["name"], source=doc["source"], path=dataset_dir, shards=shards,
                       created=doc["created"], skipped=doc.get("skipped", 0), recorded_rows=doc.get("rows"),
                       extra={k: v for k, v in doc.items() if k not in
                              ("name", "source", "shards", "created", "skipped", "rows", "format_version")})
    if check_files:
        problems = dataset_file_problems(info)
        if problems:
            raise ShardError("; ".join(problems))
    return info


def list_shards(dataset_dir: str | os.PathLike) -> list[ShardRef]:
    """The shards of a dataset, in order, as recorded in its `_dataset.json` (checked against the
    folder's files, see `load_dataset`)."""
    return load_dataset(dataset_dir).shards


@functools.lru_cache(maxsize=1 << 16)
def _tar_sha256(path: str, version: tuple) -> str:
    return sha256_file(path)


def tar_sha256(shard: ShardRef) -> str:
    """The actual sha256 of the shard's tar, hashed once per process per file version: memoised by
    (path, size, mtime, inode), in an object store (URL, size, ETag), so a reader may call it every time
    it opens the shard. An object-store tar is hashed in one streaming pass (storage.fs.sha256)."""
    try:
        version = fs.version(shard.tar_path)
    except FileNotFoundError:
        raise ShardError(f"{shard.tar_path}: missing tar of shard {shard.name}") from None
    return _tar_sha256(str(shard.tar_path), version)


def check_tar_sha256(shard: ShardRef) -> None:
    """ShardError unless the tar's bytes still have the sha256 recorded in `_dataset.json` (a flipped
    bit in a JPEG may still decode: only the checksum tells). Cheap after the first call (`tar_sha256`)."""
    actual = tar_sha256(shard)
    if actual != shard.sha256:
        raise ShardError(f"{shard.tar_path}: sha256 is {actual}, but {shard.dataset_dir / DATASET_FILE} records "
                         f"{shard.sha256} for shard {shard.name} (changed or corrupted after "
                         f"{'registration' if shard.external else 'import'})")


def find_datasets(datasets_root: str | os.PathLike) -> dict[str, Path]:
    """Every dataset below `datasets_root` ({relative name: folder}), hidden folders skipped."""
    root = fs.as_path(datasets_root)
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for p, dirnames, filenames in fs.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if DATASET_FILE in filenames:
            found[fs.posix_parts(p).relative_to(fs.posix_parts(root)).as_posix()] = p
    return dict(sorted(found.items()))


def read_metadata(shard: ShardRef) -> pa.Table:
    """The shard's metadata table (METADATA_SCHEMA), checked against its ShardRef."""
    path = shard.meta_path
    try:
        table = read_parquet(path)
    except FileNotFoundError:
        raise ShardError(f"{path}: missing metadata Parquet of shard {shard.name}") from None
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        raise ShardError(f"{path}: unreadable Parquet ({type(e).__name__}: {e})") from None
    kv = table.schema.metadata  # before the cast below, which drops it
    if not table.schema.equals(METADATA_SCHEMA, check_metadata=False):
        try:  # (extra columns, e.g. PROVENANCE_FIELDS, are left out)
            table = table.select(METADATA_SCHEMA.names).cast(METADATA_SCHEMA)
        except Exception as e:
            raise ShardError(f"{path}: schema does not match METADATA_SCHEMA ({e})") from None
    if table.num_rows != shard.rows:
        raise ShardError(f"{path}: {table.num_rows} rows, but _dataset.json says {shard.rows}")
    check_metadata_owner(shard, kv)
    return table


def read_parquet(path, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file, local or in an object store (fetched as one object: metadata, cache files and log
    parts are megabytes)."""
    if fs.is_url(path):
        return pq.read_table(pa.BufferReader(fs.read_bytes(path)), columns=columns)
    return pq.read_table(path, columns=columns)


def check_metadata_owner(shard: ShardRef, kv: dict[bytes, bytes] | None) -> None:
    """ShardError unless a metadata Parquet's key-value metadata (written by `_write_shard`) says it
    belongs to `shard`: its own shard name and tar checksum. File names can be swapped or copied
    between datasets; the content cannot lie about where it was written."""
    kv = kv or {}
    label = kv.get(b"aced.shard", b"").decode("utf-8", "replace")
    tar_sha = kv.get(b"aced.tar_sha256", b"").decode("utf-8", "replace")
    if label != shard.name or tar_sha != shard.sha256:
        raise ShardError(f"{shard.meta_path}: holds the metadata of shard {label or '(unlabelled)'} with tar sha256 "
                         f"{tar_sha or '(none)'}, not of shard {shard.name} ({shard.sha256}) as its name and "
                         f"{DATASET_FILE} say (swapped or copied file)")


def tar_groups(tf: tarfile.TarFile, path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for consecutive members sharing a key (the webdataset grouping: the key is
    the member's path up to the first '.' of its file name, folder part included, as webdataset's
    `__key__`; the project's own tars have no folders)."""
    key, group = None, {}
    for info in tf:
        if not info.isfile():
            continue
        folder, _, base = info.name.rpartition("/")
        if "." not in base:
            raise ShardError(f"{path}: member {info.name!r} has no extension")
        k, ext = base.split(".", 1)
        k = f"{folder}/{k}" if folder else k
        if k != key:
            if key is not None:
                yield key, group
            key, group = k, {}
        try:
            group[ext.lower()] = tf.extractfile(info).read()
        except (tarfile.TarError, OSError) as e:
            raise ShardError(f"{path}: sample key={k!r}: member {info.name!r} unreadable "
                             f"({type(e).__name__}: {e}; truncated tar?)") from None
    if key is not None:
        yield key, group


def iter_samples(shard: ShardRef, *, on_error: OnError = "raise", decode: bool = False,
                 stats: dict[str, int] | None = None, check_sha256: bool = True) -> Iterator[Sample]:
    """Samples of `shard` in metadata order, from a tar whose sha256 is the one `_dataset.json` records
    (`check_tar_sha256`, memoised: hashed once per file version per process; a mismatch is a ShardError
    even under on_error="skip", since nothing in such a tar can be trusted). Every reader (training,
    caching, evaluation) gets the check here; only `aced inspect`, which reports it itself, turns it off.

    A missing, extra or unreadable member, an undecodable image (header read; with `decode`, every
    pixel), a caption or uid that differs between tar and Parquet, or a truncated tar raises
    ShardError naming the tar and the sample key/uid; with on_error="skip" the sample is logged and
    counted instead (in `stats["skipped"]` when a dict is passed). A truncated tar also counts every
    sample after the cut as skipped.

    An external tar (a pool registered in place, `ShardRef.external`) may hold samples the metadata
    leaves out (failed or bad at registration, counted there): they are passed over. Its `.json`
    members need not carry a uid (one made at registration then lives only in the metadata).

    The caption rule (one for training, caching, evaluation and SQL): a pair's caption is its metadata
    Parquet's `caption` column. The tar's `.txt` must equal it, except in a row whose `tar_uid`
    (PROVENANCE_FIELDS) differs from its `uid`: that pair reads another pair's members (a caption
    swapped in by `storage.corrupt`), so its `.json` uid must be `tar_uid` and the `.txt`, the other
    pair's caption, is not compared.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if check_sha256:
        check_tar_sha256(shard)
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", 0)
    rows = read_metadata(shard).to_pylist()
    provenance = read_provenance(shard)
    tar_uids = provenance.column("tar_uid").to_pylist() if provenance is not None else None
    path = shard.tar_path
    pending = {r["key"]: i for i, r in enumerate(rows)}
    if len(pending) != len(rows):
        raise ShardError(f"{shard.meta_path}: duplicate keys in metadata")
    next_row = 0

    def bad(row: dict, why: str) -> None:
        msg = f"{path}: sample key={row['key']!r} uid={row['uid']}: {why}"
        if on_error == "raise":
            raise ShardError(msg)
        stats["skipped"] += 1
        log.warning("skipping %s", msg)

    try:
        # An object-store tar is read in one sequential pass ("r|": no seeks, no ranged re-reads).
        tf = (tarfile.open(fileobj=fs.open_read(path, stream=True), mode="r|") if fs.is_url(path)
              else tarfile.open(path, mode="r:"))
    except FileNotFoundError:
        raise ShardError(f"{path}: missing tar of shard {shard.name}") from None
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{path}: unreadable tar ({type(e).__name__}: {e})") from None
    with tf:
        groups = tar_groups(tf, path)
        while True:
            try:
                key, members = next(groups)
            except StopIteration:
                break
            except ShardError as e:
                if on_error == "raise":
                    raise
                log.warning("%s (rest of the shard skipped)", e)
                break  # a truncated tar cannot be read past the cut
            i = pending.pop(key, None)
            if i is None and shard.external:
                continue  # left out at registration (failed, bad or a repeated key: counted there)
            if i is None or i < next_row:
                msg = f"{path}: sample key={key!r}: member in tar but not in metadata (or out of order)"
                if on_error == "raise":
                    raise ShardError(msg)
                stats["skipped"] += 1
                log.warning("skipping %s", msg)
                continue
            for j in range(next_row, i):  # rows the tar jumped over
                if rows[j]["key"] in pending:
                    pending.pop(rows[j]["key"])
                    bad(rows[j], "missing from the tar")
            next_row = i + 1
            row = rows[i]
            sample = _sample_from(row, members, bad, decode, external=shard.external,
                                  tar_uid=tar_uids[i] if tar_uids is not None else None)
            if sample is not None:
                yield sample
    for j in range(next_row, len(rows)):
        if rows[j]["key"] in pending:
            bad(rows[j], "missing from the tar (truncated tar?)")


def read_provenance(shard: ShardRef) -> pa.Table | None:
    """The PROVENANCE_FIELDS columns (`tar_uid`, `caption_uid`) of the shard's metadata Parquet, in its row
    order, or None for a shard without them (every dataset but a `storage.corrupt` copy)."""
    names = [f.name for f in PROVENANCE_FIELDS]
    try:
        if fs.is_url(shard.meta_path):  # one GET of a small object, not a footer read and a second GET
            table = read_parquet(shard.meta_path)
            return table.select(names) if set(names) <= set(table.column_names) else None
        if not set(names) <= set(pq.read_schema(shard.meta_path).names):
            return None
        return pq.read_table(shard.meta_path, columns=names)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        raise ShardError(f"{shard.meta_path}: unreadable Parquet ({type(e).__name__}: {e})") from None


def _sample_from(row: dict, members: dict[str, bytes], bad, decode: bool, *, external: bool = False,
                 tar_uid: str | None = None) -> Sample | None:
    exts = [e for e in IMAGE_EXTS if e in members]
    if not exts:
        bad(row, f"no image member (found {sorted(members)})")
        return None
    if "txt" not in members:
        bad(row, "no .txt member")
        return None
    image = members[exts[0]]
    try:
        w, h = image_size(image, decode=decode)
    except ValueError as e:
        bad(row, str(e))
        return None
    if (w, h) != (row["width"], row["height"]):
        bad(row, f"image is {w}x{h} but metadata says {row['width']}x{row['height']}")
        return None
    swapped = tar_uid is not None and tar_uid != row["uid"]  # the caption rule (iter_samples)
    caption = members["txt"].decode("utf-8", errors="replace")
    if caption != row["caption"] and not swapped:
        bad(row, "caption in .txt differs from the metadata Parquet")
        return None
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            uid = meta.get("uid") if isinstance(meta, dict) else None
        except ValueError:
            bad(row, ".json member is not valid JSON")
            return None
        want = tar_uid if swapped else row["uid"]
        if uid != want and not (external and uid is None):
            bad(row, f".json uid {uid!r} differs from the metadata Parquet"
                     + (f"'s tar_uid {want}" if swapped else ""))
            return None
    return Sample(key=row["key"], uid=row["uid"], image_bytes=image, caption=row["caption"],
                  image_id=row["image_id"], width=row["width"], height=row["height"], source=row["source"],
                  noisy=row["noisy"], label=row["label"], split=row["split"])
