"""Embedding cache: reference/teacher embeddings computed once, offline, per pair shard (paper
appendix J; ARCHITECTURE.md "Formats"; docs/interfaces.md "storage/cache.py").

Layout: `<root>/cache/<model_id>/<dataset>/NNNNNNNN.parquet`, one file per pair shard with the same
rows in the same order, columns
    uid        string
    image_emb  fixed_size_list<float16, d>   (float32 on request)
    text_emb   fixed_size_list<float16, d>
and file key-value metadata: model_id, fingerprint, dim, logit_scale, logit_bias, dtype,
dataset, source_shard, source_sha256 (the pair tar's sha256), created. `_manifest.json` beside the
files lists the completed shards with rows, the file's sha256 and the source sha256.

Why so strict: the trainer zips cached rows with raw pairs by position, so a cache that is stale
(the pair shard was re-imported with different bytes), partial, from another model, or in another
order would silently train on wrong targets. One check (`check_cache_shard`), run by the reader
and by `verify_cache` alike, covers uid order, fingerprint, dim, finiteness, the file's own label and
the source checksum (against the pair tar's actual bytes), and names the file and the sample.

Writes are atomic (storage/atomic.py): the Parquet file first, then the manifest (under a file lock,
because several stage-1 workers may finish shards of one dataset at the same time). A shard is
"done" only once it is in the manifest with a matching file checksum.

In an object store (`s3://...`, storage/fs.py) each file is one atomic object write, and the manifest
update is a compare-and-swap (`If-Match` on the ETag read, `If-None-Match: *` for the first), retried on
a conflict, instead of a read-modify-write under a flock.

Encoding (measured in benchmarks/storage.py): float16, no dictionary, no statistics on the
embedding columns, zstd: 1,898 bytes per sample and model at d=512, 0.91x the raw payload
(2 x 512 x 2 bytes + a 32-char uid); float32 .pt shards take 4,138. BYTE_STREAM_SPLIT would
compress float16 further (0.84x), but DuckDB cannot read it for float16 columns.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage import fs
from storage.atomic import atomic_path, atomic_write_json, is_temp_name, sha256_file
from storage.shards import ShardError, ShardRef, check_tar_sha256, list_shards, read_metadata
from storage.workspace import Workspace

log = logging.getLogger(__name__)

MANIFEST_FILE = "_manifest.json"
_LOCK_FILE = ".manifest.lock"
DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
COMPRESSION = "zstd"


class CacheError(ValueError):
    """A cache file or manifest is unusable; the message names the file and the sample or field."""


@dataclass(frozen=True)
class ModelMeta:
    """What identifies the embeddings of a model.

    model_id: folder name under `<root>/cache` (no '/').
    fingerprint: sha256 over weights + preprocessing (pipeline.models.fingerprint).
    dim: embedding dimension d.
    logit_scale: a = exp(t), already exponentiated.
    logit_bias: c (0 for CLIP-style models).
    """

    model_id: str
    fingerprint: str
    dim: int
    logit_scale: float
    logit_bias: float

    def __post_init__(self):
        if not self.model_id or "/" in self.model_id or self.model_id.startswith("."):
            raise ValueError(f"model_id {self.model_id!r} must be a non-empty folder name without '/'")
        if not self.fingerprint:
            raise ValueError("fingerprint must be non-empty")
        if not (isinstance(self.dim, int) and self.dim > 0):
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        if not (math.isfinite(self.logit_scale) and math.isfinite(self.logit_bias)):
            raise ValueError(f"logit scale/bias must be finite, got {self.logit_scale}, {self.logit_bias}")


@dataclass
class CacheShard:
    """One cache file read back: rows aligned with the pair shard, embeddings as float32."""

    uids: list[str]
    image_emb: np.ndarray  # float32 [N, d]
    text_emb: np.ndarray   # float32 [N, d]
    meta: ModelMeta


def cache_dir(root: str | os.PathLike, model_id: str, dataset: str) -> Path:
    """`<root>/cache/<model_id>/<dataset>` for a workspace root (storage.workspace.Workspace.cache_folder)."""
    return Workspace(root).cache_folder(model_id, dataset)


def _file_meta(meta: ModelMeta, dtype: str, dataset: str, shard: ShardRef) -> dict[str, str]:
    return {"model_id": meta.model_id, "fingerprint": meta.fingerprint, "dim": str(meta.dim),
            "logit_scale": repr(float(meta.logit_scale)), "logit_bias": repr(float(meta.logit_bias)),
            "dtype": dtype, "dataset": dataset, "source_shard": shard.name, "source_sha256": shard.sha256,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _meta_from_kv(kv: dict[bytes, bytes] | None, path: Path) -> tuple[ModelMeta, dict[str, str]]:
    d = {k.decode(): v.decode() for k, v in (kv or {}).items()}
    try:
        meta = ModelMeta(d["model_id"], d["fingerprint"], int(d["dim"]), float(d["logit_scale"]),
                         float(d["logit_bias"]))
    except (KeyError, ValueError) as e:
        raise CacheError(f"{path}: missing or bad key-value metadata ({type(e).__name__}: {e})") from None
    return meta, d


def _fsl(values: np.ndarray, dim: int, pa_type: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa_type), dim)


def _first_nonfinite(a: np.ndarray) -> int | None:
    bad = ~np.isfinite(a).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def encode_table(uids: Sequence[str], image_emb: np.ndarray, text_emb: np.ndarray, *, dim: int,
                 dtype: str, kv: dict[str, str] | None = None) -> pa.Table:
    """The Arrow table of one cache file (no checks; `CacheWriter.write_shard` checks)."""
    np_t, pa_t = DTYPES[dtype]
    table = pa.table({"uid": pa.array(list(uids), pa.string()),
                      "image_emb": _fsl(np.ascontiguousarray(image_emb, dtype=np_t), dim, pa_t),
                      "text_emb": _fsl(np.ascontiguousarray(text_emb, dtype=np_t), dim, pa_t)})
    return table.replace_schema_metadata(kv) if kv else table


def write_table(table: pa.Table, path: str | os.PathLike) -> None:
    """Write one cache table with the encoding chosen in benchmarks/storage.py (not atomic)."""
    # Dictionary encoding and min/max statistics buy nothing for random uids and embedding
    # values and cost space; zstd still shaves the shared exponent bits of float16 values.
    pq.write_table(table, path, compression=COMPRESSION, use_dictionary=False, write_statistics=["uid"])


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive lock on the folder's manifest (several writers may finish shards at once)."""
    with open(folder / _LOCK_FILE, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _manifest_problem(doc) -> str | None:
    """Why a parsed `_manifest.json` is malformed (the field and its value), or None. Types are
    checked, not coerced: every reader compares these values with the files, and a `"dim": null`
    would otherwise surface as a puzzling column-type mismatch in every shard."""
    if not isinstance(doc, dict):
        return f"top level is a {type(doc).__name__}, want an object"
    for k in ("model_id", "fingerprint", "dim", "dtype", "shards"):
        if k not in doc:
            return f"manifest has no {k!r}"
    for k in ("model_id", "fingerprint"):
        if not isinstance(doc[k], str) or not doc[k]:
            return f"{k!r} is {doc[k]!r}, want a non-empty string"
    if not _is_int(doc["dim"]) or doc["dim"] < 1:
        return f"'dim' is {doc['dim']!r}, want a positive integer (the embedding dimension)"
    if doc["dtype"] not in DTYPES:
        return f"'dtype' is {doc['dtype']!r}, want one of {sorted(DTYPES)}"
    for k in ("logit_scale", "logit_bias"):
        v = doc.get(k, 0.0)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            return f"{k!r} is {v!r}, want a finite number"
    if "dataset" in doc and not (isinstance(doc["dataset"], str) and doc["dataset"]):
        return f"'dataset' is {doc['dataset']!r}, want a dataset name"
    if not isinstance(doc["shards"], dict):
        return f"'shards' is a {type(doc['shards']).__name__}, want an object {{shard name: entry}}"
    for name, e in doc["shards"].items():
        if not (len(name) == 8 and name.isascii() and name.isdigit()):
            return f"shards: bad shard name {name!r} (want 8 digits)"
        if not isinstance(e, dict):
            return f"shards[{name!r}] is a {type(e).__name__}, want an object"
        if not _is_int(e.get("rows")) or e["rows"] < 0:
            return f"shards[{name!r}].rows is {e.get('rows')!r}, want an integer >= 0"
        for k in ("sha256", "source_sha256"):
            if not isinstance(e.get(k), str):
                return f"shards[{name!r}].{k} is {e.get(k)!r}, want a hex checksum"
    return None


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The `_manifest.json` of a cache folder, or None if there is none; CacheError naming the file
    and the field if it is not JSON or malformed (`_manifest_problem`)."""
    path = fs.as_path(folder) / MANIFEST_FILE
    try:
        doc = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable manifest ({e})") from None
    why = _manifest_problem(doc)
    if why is not None:
        raise CacheError(f"{path}: malformed manifest: {why}")
    return doc


class CacheWriter:
    """Writes the cache of one model for one dataset, shard by shard (stage 1 calls `write_shard`).

    root_cache_dir: `<root>/cache`; files go to `<root_cache_dir>/<model_id>/<dataset>/`.
    dtype: "float16" (default; half the bytes, ample for unit vectors) or "float32".
    An existing manifest written for another fingerprint, dim or dtype is refused (CacheError):
    a cache folder never mixes two models' embeddings.
    """

    def __init__(self, root_cache_dir: str | os.PathLike, dataset: str, meta: ModelMeta, dtype: str = "float16"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.meta, self.dtype, self.dataset = meta, dtype, dataset
        self.folder = fs.as_path(root_cache_dir) / meta.model_id / dataset
        if not fs.is_url(self.folder):  # an object store has no folders to make
            self.folder.mkdir(parents=True, exist_ok=True)
        self._check_manifest(read_manifest(self.folder))

    def _check_manifest(self, doc: dict | None) -> None:
        if doc is None:
            return
        want = {"model_id": self.meta.model_id, "fingerprint": self.meta.fingerprint, "dim": self.meta.dim,
                "dtype": self.dtype}
        for k, v in want.items():
            if doc[k] != v:
                raise CacheError(f"{self.folder / MANIFEST_FILE}: {k} is {doc[k]!r}, this writer has {v!r}; "
                                 f"a cache folder holds one model's embeddings (delete it or use another model id)")

    def write_shard(self, shard: ShardRef, uids: list[str], image_emb: np.ndarray, text_emb: np.ndarray) -> Path:
        """Check and write the embeddings of `shard`, then record it in the manifest.

        uids must equal the shard's uids in order; image_emb/text_emb are [N, d] with d = meta.dim and
        finite (also after the cast to the storage dtype). Returns the file's path.
        """
        path = self.folder / f"{shard.name}.parquet"
        d = self.meta.dim
        try:
            want = read_metadata(shard).column("uid").to_pylist()
        except ShardError as e:
            raise CacheError(f"{path}: cannot read the pair shard: {e}") from None
        uids = list(uids)
        if len(uids) != len(want):
            raise CacheError(f"{path}: {len(uids)} uids given, shard {shard.tar_path} has {len(want)} rows")
        if uids != want:
            i = next(i for i, (a, b) in enumerate(zip(uids, want)) if a != b)
            raise CacheError(f"{path}: row {i}: uid {uids[i]} differs from the pair shard's {want[i]} "
                             f"({shard.meta_path}); rows must follow the shard's order")
        np_t, _ = DTYPES[self.dtype]
        arrays = {}
        for name, a in (("image_emb", image_emb), ("text_emb", text_emb)):
            a = np.asarray(a)
            if a.ndim != 2 or a.shape != (len(want), d):
                raise CacheError(f"{path}: {name} has shape {a.shape}, want ({len(want)}, {d}) (dim of {self.meta.model_id})")
            with np.errstate(over="ignore"):  # overflow becomes inf, reported just below
                cast = a.astype(np_t)
            for arr, what in ((a, "non-finite value"), (cast, f"value overflows {self.dtype}")):
                i = _first_nonfinite(arr)
                if i is not None:
                    raise CacheError(f"{path}: row {i} uid {want[i]}: {what} in {name}")
            arrays[name] = cast
        table = encode_table(want, arrays["image_emb"], arrays["text_emb"], dim=d, dtype=self.dtype,
                             kv=_file_meta(self.meta, self.dtype, self.dataset, shard))
        with atomic_path(path) as tmp:
            write_table(table, tmp)
            sha = sha256_file(tmp)
        entry = {"rows": len(want), "sha256": sha, "source_sha256": shard.sha256}
        if fs.is_url(self.folder):
            self._commit_cas(shard.name, entry)
        else:
            with _locked(self.folder):
                atomic_write_json(self.folder / MANIFEST_FILE, self._with_entry(read_manifest(self.folder),
                                                                                shard.name, entry))
        return path

    def _with_entry(self, doc: dict | None, name: str, entry: dict) -> dict:
        """The manifest `doc` (None: a new one) with shard `name` recorded as `entry`."""
        self._check_manifest(doc)
        if doc is None:
            doc = {"model_id": self.meta.model_id, "fingerprint": self.meta.fingerprint, "dim": self.meta.dim,
                   "dtype": self.dtype, "logit_scale": float(self.meta.logit_scale),
                   "logit_bias": float(self.meta.logit_bias), "dataset": self.dataset, "shards": {}}
        doc["shards"][name] = entry
        doc["shards"] = dict(sorted(doc["shards"].items()))
        return doc

    def _commit_cas(self, name: str, entry: dict, attempts: int = 20) -> None:
        """Object-store manifest update: read (ETag first, then the body: a body newer than the ETag
        makes the conditional write fail, never succeed on stale data), add the entry, write only if
        the object is still that version; on a conflict re-read and retry."""
        mpath = self.folder / MANIFEST_FILE
        for attempt in range(attempts):
            etag = fs.etag_of(mpath)
            try:
                doc = read_manifest(self.folder) if etag is not None else None
            except CacheError:
                if fs.etag_of(mpath) == etag:
                    raise  # really malformed, not replaced while we read it
                continue  # replaced between the ETag and the body (the read of that version failed): re-read
            body = (json.dumps(self._with_entry(doc, name, entry), indent=2, allow_nan=False) + "\n").encode()
            if fs.put_if(mpath, body, etag=etag):
                return
            time.sleep(0.05 * (attempt + 1))
        raise CacheError(f"{mpath}: {attempts} conflicting manifest updates in a row; re-run `aced cache`")

    def done(self, shard: ShardRef | str) -> bool:
        """True if the shard is in the manifest and its file's checksum matches; given a ShardRef,
        also that it was computed from the shard's current bytes (source sha256)."""
        name = shard.name if isinstance(shard, ShardRef) else shard
        doc = read_manifest(self.folder)
        if doc is None or name not in doc["shards"]:
            return False
        entry = doc["shards"][name]
        if isinstance(shard, ShardRef) and entry["source_sha256"] != shard.sha256:
            return False
        path = self.folder / f"{name}.parquet"
        return path.exists() and sha256_file(path) == entry["sha256"]


def _emb_numpy(col: pa.ChunkedArray, dim: int, path: Path, name: str) -> np.ndarray:
    arr = col.combine_chunks()
    if not (pa.types.is_fixed_size_list(arr.type) and arr.type.list_size == dim):
        raise CacheError(f"{path}: column {name} has type {arr.type}, want fixed_size_list<_, {dim}>")
    if arr.null_count:
        raise CacheError(f"{path}: column {name} has {arr.null_count} null rows")
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), dim)


def check_cache_shard(folder: str | os.PathLike, doc: dict, shard: ShardRef, *, expect: ModelMeta | None = None,
                      check_file_sha: bool = True) -> tuple[CacheShard | None, list[str]]:
    """THE per-shard check of a cache file (the trainer's `read_cache_shard` and `verify_cache` both
    run this, so what is verified is exactly what training relies on).

    folder: the cache folder; doc: its manifest (`read_manifest`); shard: the pair shard it embeds.
    Returns (the rows as float32, []) if every check passes, else (None, problems): each problem a
    line naming the file (and the row/uid where one is at fault). Checked, in order: the shard is in
    the manifest and its file exists; the file's sha256 equals the manifest's (`check_file_sha`);
    the pair tar still has the sha256 of `_dataset.json` (the data the cache was made from did not
    change under it) and that is the source sha256 recorded at caching (else stale); the Parquet is
    readable; its key-value metadata matches `expect`, the manifest (model, fingerprint, dim, dtype,
    source sha256) and names this shard and dataset; row count and uid order equal the pair shard's;
    embedding columns are fixed-size lists of the manifest's dim, without nulls, every value finite.
    """
    folder = fs.as_path(folder)
    path = folder / f"{shard.name}.parquet"
    entry = doc["shards"].get(shard.name)
    if entry is None:
        return None, [f"{path}: shard {shard.name} is not in {folder / MANIFEST_FILE} (not computed or unfinished)"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, [f"{path}: missing, but listed in the manifest"]
    probs = []
    if check_file_sha and hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        probs.append(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
    try:
        check_tar_sha256(shard)
    except ShardError as e:
        probs.append(f"{path}: its pair shard changed after caching: {e}")
    if entry.get("source_sha256") != shard.sha256:
        probs.append(f"{path}: stale: computed from source sha256 {entry.get('source_sha256')}, but "
                     f"{shard.tar_path} now has {shard.sha256} (re-run `aced cache` for this shard)")
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError/... for corrupt files
        return None, probs + [f"{path}: unreadable Parquet ({type(e).__name__}: {e})"]
    try:
        meta, kv = _meta_from_kv(table.schema.metadata, path)
    except CacheError as e:
        return None, probs + [str(e)]
    # The file's own label first: a swapped or renamed file explains every other difference below.
    probs += [f"{path}: {p}" for p in _label_problems(kv, shard.name, doc.get("dataset"))]
    if expect is not None and meta != expect:
        diff = {k: (v, getattr(meta, k)) for k, v in asdict(expect).items() if getattr(meta, k) != v}
        probs.append(f"{path}: written by another model: expected vs found {diff}")
    for k, want in (("model_id", doc["model_id"]), ("fingerprint", doc["fingerprint"]), ("dim", doc["dim"]),
                    ("dtype", doc["dtype"])):
        got = kv.get("dtype") if k == "dtype" else getattr(meta, k)
        if got != want:
            probs.append(f"{path}: {k} {got!r} differs from the manifest's {want!r}")
    if kv.get("source_sha256") != entry.get("source_sha256"):
        probs.append(f"{path}: file source sha256 {kv.get('source_sha256')} differs from the manifest's "
                     f"{entry.get('source_sha256')}")
    try:
        want = read_metadata(shard).column("uid").to_pylist()
    except ShardError as e:
        return None, probs + [f"{path}: cannot read the pair shard: {e}"]
    if table.num_rows != entry.get("rows") or table.num_rows != len(want):
        probs.append(f"{path}: {table.num_rows} rows; manifest says {entry.get('rows')}, "
                     f"pair shard {shard.meta_path} has {len(want)}")
    uids = table.column("uid").to_pylist() if "uid" in table.column_names else []
    if "uid" not in table.column_names:
        probs.append(f"{path}: no column uid")
    elif uids != want and len(uids) == len(want):
        i = next(i for i, (a, b) in enumerate(zip(uids, want)) if a != b)
        probs.append(f"{path}: row {i}: uid {uids[i]} differs from the pair shard's {want[i]} ({shard.meta_path})")
    embs = {}
    for name in ("image_emb", "text_emb"):
        if name not in table.column_names:
            probs.append(f"{path}: no column {name}")
            continue
        try:
            a = _emb_numpy(table.column(name), doc["dim"], path, name).astype(np.float32)
        except CacheError as e:
            probs.append(str(e))
            continue
        bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
        if bad.size:
            i = int(bad[0])
            probs.append(f"{path}: row {i} uid {uids[i] if i < len(uids) else '?'}: non-finite value in {name} "
                         f"({bad.size} row(s) in all)")
        embs[name] = a
    if probs:
        return None, probs
    return CacheShard(uids, embs["image_emb"], embs["text_emb"], meta), []


def _label_problems(kv: dict[str, str], shard_name: str, dataset: str | None) -> list[str]:
    """What is wrong with a cache file's own label (its `source_shard` and `dataset` key-value
    metadata) for the shard and dataset it is filed under: a renamed or swapped file says so here.
    Shared by `check_cache_shard` and the SQL views (storage/sql.py)."""
    out = []
    if kv.get("source_shard") != shard_name:
        out.append(f"holds the embeddings of shard {kv.get('source_shard')!r}, not of shard {shard_name} "
                   f"it is filed as (swapped or renamed file)")
    if dataset is not None and kv.get("dataset") != dataset:
        out.append(f"holds the embeddings of dataset {kv.get('dataset')!r}, not of {dataset!r}")
    return out


def cache_file_label_problems(path: str | os.PathLike, shard_name: str, dataset: str | None) -> list[str]:
    """`_label_problems` of a cache file read from its Parquet footer only (cheap: no data pages)."""
    try:
        with fs.open_read(path) as f:  # a local file or an object (ranged GETs of the footer)
            kv = {k.decode(): v.decode() for k, v in (pq.read_schema(f).metadata or {}).items()}
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError/... for corrupt files
        return [f"{path}: unreadable Parquet ({type(e).__name__}: {e})"]
    return [f"{path}: {p}" for p in _label_problems(kv, shard_name, dataset)]


def read_cache_shard(cache_dir_for_model_dataset: str | os.PathLike, shard: ShardRef, *,
                     expect: ModelMeta | None = None, check_file_sha: bool = True) -> CacheShard:
    """Read the cache of `shard` and prove it belongs to it (the checks of `check_cache_shard`).

    Raises CacheError naming the file (and the sample) at the first problem: no manifest, shard not
    in the manifest, file missing or changed (`check_file_sha`), pair tar changed or stale, another
    model than `expect`, uids differing from the shard's, a value not finite, ...
    """
    folder = fs.as_path(cache_dir_for_model_dataset)
    doc = read_manifest(folder)
    if doc is None:
        raise CacheError(f"{folder / MANIFEST_FILE}: missing (no completed shards in {folder})")
    c, probs = check_cache_shard(folder, doc, shard, expect=expect, check_file_sha=check_file_sha)
    if probs:
        more = f" (and {len(probs) - 1} more problem(s); `aced cache verify` lists them)" if len(probs) > 1 else ""
        raise CacheError(probs[0] + more)
    return c


# --------------------------------------------------------------------------- verification

@dataclass
class VerifyReport:
    """Result of `verify_cache`: `problems` make it fail; `notes` are harmless leftovers."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # "<model_id>/<dataset>" folders looked at
    shards: int = 0
    rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"checked {len(self.checked)} cache folder(s), {self.shards} shard(s), {self.rows} row(s): "
                 + ("OK" if self.ok else f"{len(self.problems)} problem(s)")]
        lines += [f"PROBLEM {p}" for p in self.problems]
        lines += [f"note {n}" for n in self.notes]
        return "\n".join(lines)


def find_cache_folders(root: str | os.PathLike, model_id: str | None = None) -> dict[tuple[str, str], Path]:
    """Every cache folder with a manifest: {(model_id, dataset): folder}."""
    base = Workspace(root).cache
    out: dict[tuple[str, str], Path] = {}
    if not base.is_dir():
        return out
    models = [model_id] if model_id else sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    for m in models:
        mdir = base / m
        for dirpath, dirnames, filenames in fs.walk(mdir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if MANIFEST_FILE in filenames:
                out[(m, fs.posix_parts(dirpath).relative_to(fs.posix_parts(mdir)).as_posix())] = dirpath
    return out


def unlisted_cache_folders(root: str | os.PathLike, model_id: str | None = None) -> list[Path]:
    """Folders below `<root>/cache/<model>` that hold cache files (`*.parquet`) but no manifest
    (`find_cache_folders` cannot see them: copied without it, or its manifest deleted): no reader
    can use their files, and a check that passes over them would call the cache complete."""
    base = Workspace(root).cache
    if not base.is_dir():
        return []
    models = [model_id] if model_id else sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    out = []
    for m in models:
        for dirpath, dirnames, filenames in fs.walk(base / m):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if MANIFEST_FILE not in filenames and any(f.endswith(".parquet") and not f.startswith(".")
                                                      for f in filenames):
                out.append(dirpath)
    return out


def verify_cache(root: str | os.PathLike, model_id: str | None = None) -> VerifyReport:
    """Check every cache folder of the workspace `root` (or of one model) against its pair shards.

    Per shard: `check_cache_shard`, the same check the trainer's reader runs (so the pair tar is
    hashed and compared with `_dataset.json` too: a cache is verified together with the data it was
    made from). Per folder: a `_dataset.json` that does not match its files, pair shards with no
    cache entry, manifest entries with no pair shard, cache files not in the manifest; per model:
    one fingerprint across datasets.
    """
    ws = Workspace(root)
    rep = VerifyReport()
    if model_id is not None and not (ws.cache / model_id).is_dir():
        rep.problems.append(f"{ws.cache / model_id}: no cache for model {model_id}")
        return rep
    folders = find_cache_folders(ws.root, model_id)
    unlisted = unlisted_cache_folders(ws.root, model_id)
    rep.problems += [f"{f}: holds cache files but no {MANIFEST_FILE} (copied without it, or it was deleted): "
                     f"no reader can use them; re-run `aced cache` for it or delete the folder" for f in unlisted]
    if not folders:
        if not unlisted:
            rep.problems.append(f"{ws.cache}: no cache folders with a {MANIFEST_FILE}")
        return rep
    datasets = ws.find_datasets()
    fingerprints: dict[str, dict[str, str]] = {}
    for (mid, ds), folder in folders.items():
        rep.checked.append(f"{mid}/{ds}")
        try:
            doc = read_manifest(folder)
        except CacheError as e:
            rep.problems.append(str(e))
            continue
        mpath = folder / MANIFEST_FILE
        if doc["model_id"] != mid:
            rep.problems.append(f"{mpath}: model_id {doc['model_id']!r} does not match the folder {mid!r}")
        fingerprints.setdefault(mid, {})[ds] = doc["fingerprint"]
        if ds not in datasets:
            rep.problems.append(f"{folder}: no pair dataset {ds!r} under {ws.datasets}")
            continue
        try:
            shards = {s.name: s for s in list_shards(datasets[ds])}
        except ShardError as e:
            rep.problems.append(str(e))
            continue
        for name in sorted(set(shards) - set(doc["shards"])):
            rep.problems.append(f"{folder}: pair shard {ds}/{name} has no cache entry in the manifest (missing)")
        for name in sorted(set(doc["shards"]) - set(shards)):
            rep.problems.append(f"{mpath}: entry {name} has no pair shard in {datasets[ds]} (extra)")
        listed = {f"{n}.parquet" for n in doc["shards"]}
        for p in sorted(folder.iterdir()):
            if p.is_file() and is_temp_name(p.name):
                rep.notes.append(f"{p}: leftover temporary file of an interrupted write (invisible to readers; safe to delete)")
            elif p.is_file() and p.suffix == ".parquet" and p.name not in listed:
                rep.problems.append(f"{p}: not in the manifest (extra or unfinished file)")
        for name in sorted(doc["shards"]):
            if name in shards:
                rep.shards += 1
                c, probs = check_cache_shard(folder, doc, shards[name])
                rep.problems.extend(probs)
                rep.rows += len(c.uids) if c is not None else 0
    for mid, per_ds in fingerprints.items():
        if len(set(per_ds.values())) > 1:
            rep.problems.append(f"{ws.cache / mid}: datasets were cached with different fingerprints {per_ds} "
                                f"(the model changed between them)")
    return rep
