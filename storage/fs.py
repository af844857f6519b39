"""Where a path lives: a local folder (the fast path, plain `pathlib.Path` and POSIX calls, unchanged) or
an object store named by URL (`s3://bucket/prefix`, any fsspec protocol), as a `upath.UPath` whose
file system is fsspec's (s3fs for S3). `as_path` is the one place a path or URL becomes one of the two;
the few operations POSIX and object stores do differently (hashing a file's version, a size, listing,
a folder swap, a lock, a pyarrow file system for bulk Parquet reads, a local copy of a folder) have
one helper each below, and every other module calls those.

What works on a URL: every workspace area (datasets and pools registered in place, caches, runs,
models), the cache stage, training and resume, `aced sql` and `aced inspect`; model folders through
their local copy (below). What does not: Prefect's state (below), a run's evaluation results and
`aced eval --out` (local folders).

Credentials and endpoint come from the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_PROFILE: botocore reads them) or fsspec's own config
(~/.config/fsspec/*.json, $FSSPEC_CONFIG_DIR). Listings are never cached (`use_listings_cache=False`):
a reader must see the objects another process wrote a moment ago.

What is atomic on S3, said plainly:
  - One object write (a single PUT, or a multipart upload, which becomes visible only when completed)
    IS atomic: a reader sees the old object or the whole new one. `storage.atomic.atomic_path` writes a
    local temporary file and uploads it in one such write, so every single-file contract keeps its
    guarantee: pair-shard metadata Parquet, `_dataset.json`, cache Parquet files, `_manifest.json`,
    run-log parts, `config.json`, checkpoint `latest` pointers.
  - A folder swap (a dataset, a checkpoint `step-N/`, a model folder: `storage.atomic.replace_dir`) is
    NOT atomic: S3 has no rename. It becomes write-all-then-commit: the old folder's commit file is
    deleted first, then every other file is uploaded, then the commit file last (`COMMIT_FILES`:
    `_dataset.json`, `aced_model.json`, `state.json`, which every reader opens first). A crash midway
    leaves a folder without its commit file, which readers refuse as incomplete; the next write of the
    same folder replaces it. A checkpoint is published only by its `latest` pointer (one PUT), after
    its folder is complete, so resume never sees a partial checkpoint.
  - The cache manifest's read-modify-write is a compare-and-swap: the new manifest is PUT with
    `If-Match: <etag read>` (or `If-None-Match: *` for the first one) and retried on a conflict, so
    two writers finishing shards at once cannot drop each other's entries.
  - Locks: a POSIX folder uses `flock`, which the kernel drops when its holder dies. S3 has no such
    thing: a lock is the object `<folder>/.lock` created with `If-None-Match: *` (exactly one creator
    wins), holding the holder's pid/host, deleted on release. A holder killed with SIGKILL leaves it
    behind: a later process on the SAME host takes it over when that pid is gone; on another host it
    cannot tell, and refuses, naming the holder and the object to delete. Without conditional-write
    support in the store (older MinIO, some gateways), two processes could both take the lock.
  - Prefect's database and the process records (`<root>/state`) need a POSIX folder: a workspace
    whose root is a URL keeps them in a local folder ($ACED_STATE_DIR, default
    ~/.cache/aced/state/<hash of the root URL>); the cache stage's lock there is per machine.
  - Model folders: open_clip loads from a local folder, so a model folder in the store (a workspace
    model of a URL root, or `s3://.../models/ID` given anywhere a model is) is downloaded once by
    `local_copy` into $ACED_MODEL_CACHE (default ~/.cache/aced/models)/<key>/<ID>, keyed by the
    folder URL and every object's size and ETag (so a changed model is a new copy, never a stale
    one), checked before it is published there (pipeline.models passes `load_model`, which verifies
    the fingerprint in aced_model.json) and renamed into place. Runs write their exported model to
    the store directly.
  - Reading Parquet in bulk (the SQL views of storage/sql.py) goes through pyarrow datasets over
    `arrow_files` (this same fsspec file system): DuckDB's own httpfs extension is neither
    installed nor loadable here.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import IO, Iterator

LOCAL_PROTOCOLS = ("", "file", "local")
# The file a reader of each kind of folder opens first: uploaded last, deleted first (module docstring).
COMMIT_FILES = ("_dataset.json", "aced_model.json", "state.json")
_CHUNK = 8 << 20


def is_url(p) -> bool:
    """True for a URL with a non-local scheme (`s3://...`) or a remote UPath."""
    if isinstance(p, Path):
        return False
    protocol = getattr(p, "protocol", None)
    if protocol is not None:
        return protocol not in LOCAL_PROTOCOLS
    s = os.fspath(p) if isinstance(p, os.PathLike) else str(p)
    scheme, sep, _ = s.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme not in LOCAL_PROTOCOLS


def as_path(p: str | os.PathLike):
    """A `pathlib.Path` for a local path, a `upath.UPath` (fsspec-backed, pathlib API) for a URL."""
    if isinstance(p, Path):
        return p
    if is_url(p):
        if getattr(p, "protocol", None) is not None:  # already a UPath
            return p
        from upath import UPath

        return UPath(str(p), use_listings_cache=False)
    return Path(p)


def resolve(p):
    """`Path.resolve()` for a local path; a URL is already absolute and has no links to follow."""
    p = as_path(p)
    return p if is_url(p) else p.resolve()


def is_absolute(p) -> bool:
    return is_url(p) or str(p).startswith("/")


def join(base, rel: str):
    """`base / rel`, where `rel` may itself be a URL or an absolute path (then it is the answer)."""
    return as_path(rel) if is_absolute(rel) else as_path(base) / rel


def posix_parts(p) -> PurePosixPath:
    """The path part of `p` (bucket/key for a URL) as a PurePosixPath, for name arithmetic."""
    p = as_path(p)
    return PurePosixPath("/" + p.path.lstrip("/")) if is_url(p) else PurePosixPath(p.resolve())


# --------------------------------------------------------------------------- reading

def open_read(p, *, stream: bool = False) -> IO[bytes]:
    """A binary file object for reading (for a URL: buffered ranged GETs; `stream` reads ahead for one
    sequential pass, as a tar reader does)."""
    p = as_path(p)
    if not is_url(p):
        return open(p, "rb")
    return p.fs.open(p.path, "rb", block_size=_CHUNK, cache_type="readahead" if stream else "bytes")


def read_bytes(p) -> bytes:
    return as_path(p).read_bytes()


def version(p) -> tuple:
    """What changes when the file's bytes change: (size, mtime_ns, inode) locally, (size, ETag) in an
    object store. FileNotFoundError when it is missing."""
    p = as_path(p)
    if not is_url(p):
        st = os.stat(p)
        return st.st_size, st.st_mtime_ns, st.st_ino
    info = p.fs.info(p.path)
    if info.get("type") != "file":
        raise FileNotFoundError(str(p))
    return info["size"], info.get("ETag") or info.get("etag") or info.get("LastModified")


def sha256(p) -> str:
    """Hex sha256 of a file's bytes, read in one streaming pass."""
    h = hashlib.sha256()
    with open_read(p, stream=True) as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def size(p) -> int:
    """Bytes in the file `p` (FileNotFoundError when it is missing)."""
    return version(p)[0]


def arrow_files(paths: list) -> tuple[object, list[str]]:
    """(pyarrow file system, the paths in it) for files on one file system (all local, or all in one
    store): pyarrow's local file system, or the URLs' fsspec file system wrapped for pyarrow (the same
    credentials and endpoint as every other access here), so a pyarrow dataset reads object-store
    files with ranged GETs of the parts it needs, never a whole download."""
    import pyarrow.fs as pafs

    ps = [as_path(p) for p in paths]
    remote = [p for p in ps if is_url(p)]
    if not remote:
        return pafs.LocalFileSystem(), [str(p) for p in ps]
    if len(remote) != len(ps) or len({p.protocol for p in remote}) != 1:
        raise ValueError(f"files on different file systems cannot be read as one: {ps[0]} ... {ps[-1]}")
    return pafs.PyFileSystem(pafs.FSSpecHandler(remote[0].fs)), [p.path for p in remote]


def is_file(p) -> bool:
    p = as_path(p)
    return p.is_file()


def list_files(p) -> list[str]:
    """Names of the files (not folders) directly in folder `p`."""
    p = as_path(p)
    if not is_url(p):
        return [e.name for e in os.scandir(p) if e.is_file()]
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such folder")
    return [PurePosixPath(e["name"]).name for e in p.fs.ls(p.path, detail=True) if e["type"] == "file"]


def walk(p) -> Iterator[tuple[object, list[str], list[str]]]:
    """os.walk for both kinds: (folder, sub-folder names (prune in place), file names), top down."""
    p = as_path(p)
    if not is_url(p):
        for dirpath, dirnames, filenames in os.walk(p):
            yield Path(dirpath), dirnames, filenames
        return
    todo = [p]
    while todo:
        d = todo.pop(0)
        entries = d.fs.ls(d.path, detail=True)
        dirnames = sorted(PurePosixPath(e["name"].rstrip("/")).name for e in entries if e["type"] == "directory")
        filenames = sorted(PurePosixPath(e["name"]).name for e in entries if e["type"] == "file")
        yield d, dirnames, filenames
        todo[:0] = [d / n for n in dirnames]


def model_cache_dir() -> Path:
    """Where `local_copy` keeps downloaded folders: $ACED_MODEL_CACHE, else ~/.cache/aced/models."""
    return Path(os.environ.get("ACED_MODEL_CACHE") or Path.home() / ".cache" / "aced" / "models")


def _tree(p) -> list[tuple[str, int, str]]:
    """(name relative to folder `p`, size, ETag) of every object below it, hidden names left out
    (lock objects, temporary names), sorted: one listing, no request per object."""
    found = p.fs.find(p.path, detail=True)
    base = p.path.rstrip("/") + "/"
    out = []
    for key, info in found.items():
        rel = key[len(base):] if key.startswith(base) else None
        if not rel or rel.endswith("/") or info.get("type", "file") != "file":  # a folder marker object
            continue
        if any(s in ("", "..") for s in rel.split("/")):  # an object key may say "a/../../b": never follow it
            raise ValueError(f"{p}: object {key!r} has an empty or '..' part in its name; refusing to copy the folder")
        if not any(s.startswith(".") for s in rel.split("/")):
            out.append((rel, int(info["size"]), str(info.get("ETag") or info.get("etag") or info.get("LastModified"))))
    return sorted(out)


def local_copy(url, *, check=None) -> Path:
    """A local copy of the object-store folder `url`, for readers that need a POSIX folder (open_clip
    loads models from one); a local path is returned as it is.

    Downloaded once per content: the copy lives at `model_cache_dir()/<24 hex>/<folder name>`, the hex
    a sha256 of the URL and every object's (name, size, ETag), so a folder changed in the store is a
    new download and a copy never stands for other bytes. The download goes to a hidden temporary
    folder beside it; each file's size is checked, the listing is taken again (a folder rewritten
    during the download is an error, not a mix), `check(temporary folder)` runs (pipeline.models
    passes `load_model`, which verifies the recorded fingerprint) and only then is the folder renamed
    into place, so a failed or killed download never leaves a copy that looks complete. Two processes
    downloading at once both verify; the first rename wins and the other uses it."""
    src = as_path(url)
    if not is_url(src):
        return Path(src)
    name = posix_parts(src).name
    listing = _tree(src)
    if not listing:
        raise FileNotFoundError(f"{src}: no such folder in the object store (no objects below it)")
    key = hashlib.sha256(json.dumps([str(src).rstrip("/"), listing]).encode()).hexdigest()[:24]
    home = model_cache_dir() / key
    dst = home / name
    if dst.is_dir():
        return dst
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=home))
    try:
        base = src.path.rstrip("/")
        for rel, nbytes, _ in listing:
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            src.fs.get_file(f"{base}/{rel}", str(local))
            if local.stat().st_size != nbytes:
                raise OSError(f"{src}/{rel}: downloaded {local.stat().st_size} bytes, the store lists {nbytes}")
        if _tree(src) != listing:
            raise OSError(f"{src}: changed while it was being downloaded (a writer at work?); try again")
        if check is not None:
            check(tmp)
        try:
            os.rename(tmp, dst)
        except OSError:
            if not dst.is_dir():
                raise
            # another process published the same content first: use its copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            home.rmdir()  # only when empty: a failed download leaves nothing behind
    return dst


# --------------------------------------------------------------------------- writing

def local_temp_dir(prefix: str = ".aced-") -> Path:
    """A fresh local folder to stage files bound for an object store ($ACED_STAGING_DIR or the system
    temporary folder)."""
    base = os.environ.get("ACED_STAGING_DIR") or None
    if base:
        os.makedirs(base, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def put_file(local: str | os.PathLike, dst) -> None:
    """Upload one local file as the object `dst` in one write (atomic: see the module docstring)."""
    dst = as_path(dst)
    dst.fs.put_file(os.fspath(local), dst.path)


def remove(p, *, missing_ok: bool = True) -> None:
    p = as_path(p)
    try:
        p.fs.rm_file(p.path) if is_url(p) else p.unlink()
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_tree(p) -> None:
    """Delete folder `p` and everything below it (no error if it is gone)."""
    p = as_path(p)
    if not is_url(p):
        shutil.rmtree(p, ignore_errors=True)
        return
    try:
        p.fs.rm(p.path, recursive=True)
    except FileNotFoundError:
        pass


def upload_dir(src: str | os.PathLike, dst) -> None:
    """Replace the object-store folder `dst` by the local folder `src` (write-all-then-commit: the old
    commit file is deleted first, every file then uploaded, the `COMMIT_FILES` last; objects below
    `dst` that `src` does not hold are deleted before the commit file appears)."""
    src, dst = Path(src), as_path(dst)
    files = sorted((f for f in src.rglob("*") if f.is_file()), key=lambda f: (f.name in COMMIT_FILES, str(f)))
    keep = {f.relative_to(src).as_posix() for f in files}
    for name in COMMIT_FILES:
        remove(dst / name)
    if dst.exists():
        for d, _, names in list(walk(dst)):
            for n in names:
                rel = (posix_parts(d / n)).relative_to(posix_parts(dst)).as_posix()
                if rel not in keep:
                    remove(d / n)
    for f in files:
        put_file(f, dst / f.relative_to(src).as_posix())


def _s3_bucket_key(p) -> tuple[str, str]:
    p = as_path(p)
    bucket, _, key = p.path.partition("/")
    return bucket, key


def etag_of(p) -> str | None:
    """The object's ETag, or None when it does not exist."""
    p = as_path(p)
    try:
        info = p.fs.info(p.path)
    except FileNotFoundError:
        return None
    return info.get("ETag") if info.get("type") == "file" else None


def put_if(p, data: bytes, *, etag: str | None) -> bool:
    """Write `data` to `p` only if the object is unchanged: `etag` None means "only if it does not
    exist" (`If-None-Match: *`), else "only if its ETag is still `etag`" (`If-Match`). False when
    another writer got there first (HTTP 412/409). S3 (and moto, MinIO >= 2024) only."""
    p = as_path(p)
    if p.protocol not in ("s3", "s3a"):
        raise NotImplementedError(f"{p}: conditional writes are implemented for S3 only")
    bucket, key = _s3_bucket_key(p)
    cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
    try:
        p.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
    except FileExistsError:  # s3fs maps 412 PreconditionFailed on If-None-Match to this
        return False
    except OSError as e:
        text = str(e)
        if "pre-condition" in text.lower() or "precondition" in text.lower() or "412" in text or "409" in text \
                or "ConditionalRequestConflict" in text:
            return False
        raise
    finally:
        p.fs.invalidate_cache(p.path)
    return True


# --------------------------------------------------------------------------- locks in an object store

def holder_info() -> dict:
    """Who holds a lock: pid, host, command, since when."""
    import sys

    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)[:300]}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def read_lock(lock) -> dict | None:
    """The holder recorded in a lock object, or None when there is none (or it is a dead process of
    this host: a lock that can be taken over)."""
    try:
        info = json.loads(as_path(lock).read_bytes().decode() or "{}")
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        info = {}
    if info.get("host") == socket.gethostname() and not _pid_alive(info.get("pid")):
        return None
    return info


def acquire_object_lock(lock) -> tuple[bool, dict]:
    """Create the lock object `lock` (If-None-Match: *) holding this process's identity. Returns
    (True, me) when taken, (False, holder) when a live holder has it. A lock left by a dead process of
    this host is deleted and taken over (once)."""
    me = holder_info()
    body = json.dumps(me).encode()
    for _ in range(2):
        if put_if(lock, body, etag=None):
            return True, me
        holder = read_lock(lock)
        if holder is not None:
            return False, holder
        remove(lock)  # its holder (a process of this host) is gone
    return False, read_lock(lock) or {}


def release_object_lock(lock, me: dict) -> None:
    """Delete the lock object if it still names this process."""
    try:
        info = json.loads(as_path(lock).read_bytes().decode() or "{}")
    except (FileNotFoundError, ValueError):
        return
    if info.get("pid") == me.get("pid") and info.get("host") == me.get("host") and info.get("since") == me.get("since"):
        remove(lock)
