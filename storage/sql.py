"""Read-only SQL over a workspace: DuckDB views on the Parquet files of pairs, caches and run logs
(ARCHITECTURE.md "users ... inspect shards/caches/selections with SQL over Arrow").

Views (every one also readable as a pyarrow table with `read_view`):
  pairs       dataset, shard, uid, key, image_id, caption, width, height, source, noisy, label, split
              (+ tar_uid, caption_uid once a `storage.corrupt` copy exists: null for other datasets)
  datasets    dataset, name, source, shards, rows, skipped, created, classnames
  cache       model_id, dataset, shard, uid, image_emb FLOAT[], text_emb FLOAT[]
  manifest    model_id, dataset, shard, rows, sha256, source_sha256, fingerprint, dim, dtype, logit_scale, logit_bias
  metrics     run, step, <the run's metric columns>      (runs/*/metrics/*.parquet, united by column name)
  selections  run, step, uid, score, selected, self_score, noisy (runs/*/selections/*.parquet)

Nothing can be modified through `run_query`: (1) the text must parse (duckdb.extract_statements)
into exactly one statement of type SELECT (which includes WITH, VALUES, FROM-first, DESCRIBE,
SUMMARIZE, SHOW); (2) the connection is locked down after the views are made: external access is
off, so only the Parquet files behind the views can be opened (`allowed_paths`), extensions cannot
be installed or loaded, and `lock_configuration` stops a query from turning any of it back on.
The second layer alone would still let a COPY overwrite one of the allowed files, hence the first.
Replacement scans are off too, so a query cannot read Python variables of the process.

Local or object store: the files are found and checked by one code path (Workspace, storage.fs);
only the reading differs. Local files are read by DuckDB's own Parquet reader (not in-memory Arrow:
DuckDB cannot scan half-float Arrow data). For a workspace root in an object store (`s3://...`),
DuckDB's httpfs extension is not available (no downloads here, and extensions stay off), so each view
is a pyarrow dataset over those objects (storage.fs.arrow_files: fsspec's file system, ranged GETs),
registered with DuckDB; the labels taken from file names locally (shard, run) are constant columns
of each file there, the columns are united by name the same way, and the embeddings are cast to
float32 on the scan. Same views, columns and rows; external access stays off (the registered
datasets need none). DuckDB's memory limit does not cover pyarrow's read buffers (a few batches).

Complete or refused: a listed file that is missing, or whose own metadata says it belongs to another
shard, fails the query (IncompleteViews) unless `allow_missing` (CLI --allow-missing) leaves it out
and names it. Bounded: DuckDB's memory_limit and threads come from the machine (`Limits`), it spills
to a temp folder (not the current directory), results stream to the writer batch by batch, and a
query that still needs more memory fails with QueryTooBig.
"""
from __future__ import annotations

import atexit
import contextlib
import csv
import io
import decimal
import json
import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from storage import fs
from storage.atomic import atomic_path
from storage.cache import CacheError, cache_file_label_problems, find_cache_folders, read_manifest
from storage.shards import ShardError, check_metadata_owner, dataset_file_problems, load_dataset
from storage.workspace import Workspace

log = logging.getLogger(__name__)

VIEWS = ("pairs", "datasets", "cache", "manifest", "metrics", "selections")
FORMATS = ("table", "csv", "json", "parquet")
BATCH_ROWS = 8192  # rows per Arrow batch fetched from DuckDB: the printer never holds more than this

_EMPTY = {
    "pairs": ("SELECT NULL::VARCHAR AS dataset, NULL::VARCHAR AS shard, NULL::VARCHAR AS uid, NULL::VARCHAR AS key, "
              "NULL::VARCHAR AS image_id, NULL::VARCHAR AS caption, NULL::INTEGER AS width, NULL::INTEGER AS height, "
              "NULL::VARCHAR AS source, NULL::BOOLEAN AS noisy, NULL::INTEGER AS label, NULL::VARCHAR AS split WHERE false"),
    "cache": ("SELECT NULL::VARCHAR AS model_id, NULL::VARCHAR AS dataset, NULL::VARCHAR AS shard, NULL::VARCHAR AS uid, "
              "NULL::FLOAT[] AS image_emb, NULL::FLOAT[] AS text_emb WHERE false"),
    "metrics": "SELECT NULL::VARCHAR AS run, NULL::BIGINT AS step WHERE false",
    "selections": ("SELECT NULL::VARCHAR AS run, NULL::BIGINT AS step, NULL::VARCHAR AS uid, NULL::FLOAT AS score, "
                   "NULL::BOOLEAN AS selected, NULL::FLOAT AS self_score, NULL::BOOLEAN AS noisy WHERE false"),
}

_MANIFEST_SCHEMA = pa.schema([("model_id", pa.string()), ("dataset", pa.string()), ("shard", pa.string()),
                              ("rows", pa.int64()), ("sha256", pa.string()), ("source_sha256", pa.string()),
                              ("fingerprint", pa.string()), ("dim", pa.int32()), ("dtype", pa.string()),
                              ("logit_scale", pa.float64()), ("logit_bias", pa.float64())])
_DATASETS_SCHEMA = pa.schema([("dataset", pa.string()), ("name", pa.string()), ("source", pa.string()),
                              ("shards", pa.int64()), ("rows", pa.int64()), ("skipped", pa.int64()),
                              ("created", pa.string()), ("classnames", pa.list_(pa.string()))])


class SqlError(ValueError):
    """A query that cannot be answered as asked; the message says why (and names files where it can)."""


class QueryRefused(SqlError):
    """The SQL text is not a single read-only statement."""


class IncompleteViews(SqlError):
    """Listed files are missing, unreadable or not what their name says: the views would silently
    return less (or mislabelled) data. `allow_missing=True` leaves them out and names them instead."""


class QueryTooBig(SqlError):
    """The query needs more memory than its limit (DuckDB spills what it can to a temp folder first)."""


MIN_MEMORY = 16 * 2**20  # below this DuckDB cannot even build the views (it fails with a raw OOM text)
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory_limit(size: str) -> int:
    """Bytes of a memory size like "512MB" or "4GiB" (DuckDB's units); SqlError naming it when it is
    not one, or below MIN_MEMORY. DuckDB itself reads "-1" (and "-1GB") as "no limit at all" and
    accepts sizes it cannot work in, so sizes are checked here before DuckDB sees them."""
    m = _SIZE_RE.match(str(size))
    if m is None:
        raise SqlError(f"memory limit {size!r} is not a size: want a positive number and a unit, "
                       f"e.g. 512MB or 4GiB (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n < MIN_MEMORY:
        raise SqlError(f"memory limit {size!r} is below the minimum of {MIN_MEMORY // 2**20}MiB")
    return n


@dataclass(frozen=True)
class Limits:
    """Resources of one query: DuckDB's memory_limit (a size string, e.g. "64MB", "4GiB", at least
    MIN_MEMORY: `parse_memory_limit`) and threads (>= 1). `Limits.for_machine()` takes half the memory
    (cgroup limit included) and every CPU this process may use, so a runaway join fails with
    QueryTooBig instead of taking the machine down."""

    memory_limit: str
    threads: int

    def __post_init__(self) -> None:
        parse_memory_limit(self.memory_limit)
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
            raise SqlError(f"threads must be an integer >= 1, got {self.threads!r}")

    @classmethod
    def for_machine(cls, memory_limit: str | None = None, threads: int | None = None) -> "Limits":
        if memory_limit is None:
            memory_limit = f"{max(64, _machine_memory() // 2 // 2**20)}MiB"
        if threads is None:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return cls(str(memory_limit), threads)


def _machine_memory() -> int:
    """Physical memory in bytes, or the cgroup (v2/v1) memory limit of this container if smaller."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            total = min(total, int(Path(f).read_text().strip()))  # "max" (no limit) fails int(): ignored
    return total


@dataclass
class QueryStream:
    """A running query: `schema`, then `batches()` (each at most BATCH_ROWS rows); `left_out` names
    what `allow_missing` left out of the views (empty otherwise)."""

    schema: pa.Schema
    reader: pa.RecordBatchReader
    limits: Limits
    left_out: list[str] = field(default_factory=list)

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The result's batches; DuckDB's out-of-memory error becomes QueryTooBig."""
        with _memory_errors(self.limits):
            yield from self.reader


@contextlib.contextmanager
def _memory_errors(limits: Limits) -> Iterator[None]:
    try:
        yield
    except (duckdb.OutOfMemoryException, pa.ArrowException) as e:
        if isinstance(e, pa.ArrowException) and "Out of Memory" not in str(e):
            raise
        raise QueryTooBig(f"query needs more than {limits.memory_limit} of memory; narrow it (WHERE, LIMIT, fewer "
                          f"columns, no cross joins) or raise --memory-limit") from None


def _lit(s: str | os.PathLike) -> str:
    return "'" + str(s).replace("'", "''") + "'"


_GLOB_CHARS = re.compile(r"([*?\[])")


def glob_literal(path: str | os.PathLike) -> str:
    """`path` as a DuckDB file pattern that matches exactly that file: DuckDB glob-expands every path
    given to read_parquet, so a dataset named "*" or a workspace under "ws[1]" would read other files
    (or fail on a sibling). Each of its glob characters '*', '?', '[' is put in a one-character class
    ("[*]", "[?]", "[[]"); '{', '}', ']' and '\\' are literal in DuckDB's globs."""
    return _GLOB_CHARS.sub(r"[\1]", str(path))


def _file_list(paths: list[Path]) -> str:
    return "[" + ", ".join(_lit(glob_literal(p)) for p in paths) + "]"


def _allowed(paths: list[Path]) -> list[str]:
    """What `allowed_paths` must hold for the views to read `paths`: each file, and the pattern
    `glob_literal` made of it where that differs (DuckDB checks the pattern before expanding it)."""
    out = []
    for p in paths:
        out.append(str(p))
        if glob_literal(p) != str(p):
            out.append(glob_literal(p))
    return out


def _schema(path) -> pa.Schema:
    """A Parquet file's schema with its key-value metadata, from its footer only (locally, or by ranged
    GETs in an object store)."""
    if fs.is_url(path):
        with fs.open_read(path) as f:
            return pq.read_schema(f)
    return pq.read_schema(path)


def _pair_files(ds: str, folder, problems: list[str]) -> tuple[dict | None, list[tuple[str, object, pa.Schema]]]:
    """(row of the datasets view, [(shard name, metadata Parquet file, its schema)] to read) of one
    dataset; what is wrong goes to `problems`: a broken `_dataset.json`, files that differ from the
    listing, and metadata files whose own label (key-value metadata) is another shard's (their file
    names were swapped)."""
    try:
        info = load_dataset(folder, check_files=False)
    except ShardError as e:
        problems.append(f"dataset {ds}: {e}")
        return None, []
    problems += [f"dataset {ds}: {p}" for p in dataset_file_problems(info)]
    files = []
    for s in info.shards:
        if not fs.is_file(s.meta_path):
            continue  # named by dataset_file_problems
        try:
            schema = _schema(s.meta_path)
            check_metadata_owner(s, schema.metadata)
        except ShardError as e:
            problems.append(f"dataset {ds}: {e}")
            continue
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError/... for corrupt files
            problems.append(f"dataset {ds}: {s.meta_path}: unreadable Parquet ({type(e).__name__}: {e})")
            continue
        files.append((s.name, fs.resolve(s.meta_path), schema))
    row = {"dataset": ds, "name": info.name, "source": info.source, "shards": len(info.shards), "rows": info.rows,
           "skipped": info.skipped, "created": info.created, "classnames": info.classnames}
    return row, files


def _cache_files(root, problems: list[str], man_rows: list[dict]) -> list[tuple[str, str, list[tuple[str, object]]]]:
    """[(model id, dataset, [(shard name, cache file)])] of every cache folder, with a manifest row per
    listed shard in `man_rows`; problems: an unreadable manifest, listed files that are missing or
    whose own `source_shard`/`dataset` label is another's."""
    out = []
    for (mid, ds), folder in find_cache_folders(root).items():
        try:
            doc = read_manifest(folder)
        except CacheError as e:
            problems.append(f"cache {mid}/{ds}: {e}")
            continue
        files = []
        for name, e in doc["shards"].items():
            man_rows.append({"model_id": mid, "dataset": ds, "shard": name, "rows": e.get("rows"),
                             "sha256": e.get("sha256"), "source_sha256": e.get("source_sha256"),
                             "fingerprint": doc["fingerprint"], "dim": doc["dim"], "dtype": doc["dtype"],
                             "logit_scale": doc.get("logit_scale"), "logit_bias": doc.get("logit_bias")})
            path = folder / f"{name}.parquet"
            if not fs.is_file(path):
                problems.append(f"cache {mid}/{ds}: {path}: listed in the manifest but missing")
                continue
            bad = cache_file_label_problems(path, name, doc.get("dataset"))
            problems += [f"cache {mid}/{ds}: {p}" for p in bad]
            if not bad:
                files.append((name, fs.resolve(path)))
        if files:
            out.append((mid, ds, files))
    return out


def open_views(root: str | os.PathLike, *, allow_missing: bool = False, limits: Limits | None = None,
               temp_dir: str | os.PathLike | None = None, left_out: list[str] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views above over workspace `root`, locked down.

    A listed file that is missing, unreadable or labelled as another shard (its own key-value
    metadata; a swapped file name cannot lie about its content), a dataset whose `_dataset.json` is
    broken or does not match its files, or an unreadable cache manifest: IncompleteViews naming each,
    because the views would otherwise return smaller counts or wrong shard labels without a word.
    With `allow_missing` those are left out instead and named in `left_out` (and the log).
    `limits`: memory and threads (default `Limits.for_machine()`); `temp_dir`: where DuckDB spills
    (default: a new folder in the system temp dir, removed at exit; never the current directory).
    `root` may be an object-store URL (module docstring: the same files, read through pyarrow).
    Prefer `stream_query`/`run_query` for SQL text from a user: they also refuse non-SELECT statements.
    """
    root = fs.resolve(root)
    limits = limits or Limits.for_machine()
    # Which files, and what is wrong with them: one code path for both kinds of root.
    problems: list[str] = []
    pair_sources, ds_rows = [], []
    for ds, folder in Workspace(root).find_datasets().items():
        row, files = _pair_files(ds, folder, problems)
        if row is not None:
            ds_rows.append(row)
        if files:
            pair_sources.append((ds, files))
    man_rows: list[dict] = []
    cache_sources = _cache_files(root, problems, man_rows)
    run_sources = {kind: Workspace(root).run_logs(kind) for kind in ("metrics", "selections")}
    if problems and not allow_missing:
        raise IncompleteViews(f"{len(problems)} problem(s) in {root}: the views would leave out or mislabel data: "
                              + "; ".join(problems) + " (fix them, see `aced inspect` / `aced cache verify`; "
                              "or pass --allow-missing to query without them)")
    for p in problems:
        log.warning("left out of the SQL views: %s", p)
    if left_out is not None:
        left_out += problems

    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False})
    try:
        # no progress bar: it would mix carriage-return noise into the stderr of `aced sql` and its callers
        con.execute("SET enable_progress_bar = false")
        con.execute("SET memory_limit = ?", [limits.memory_limit])
        con.execute("SET threads = ?", [limits.threads])
    except duckdb.Error as e:
        con.close()
        raise SqlError(f"bad resource limit (memory {limits.memory_limit!r}, threads {limits.threads}): {e}") from None
    # In-memory databases spill to "./.tmp" by default: the current directory is not ours to write.
    if temp_dir is None:
        temp_dir = tempfile.mkdtemp(prefix="aced-sql-")
        atexit.register(shutil.rmtree, temp_dir, ignore_errors=True)
    con.execute("SET temp_directory = ?", [str(temp_dir)])
    try:
        _make_table(con, "datasets", pa.Table.from_pylist(ds_rows, schema=_DATASETS_SCHEMA))
        _make_table(con, "manifest", pa.Table.from_pylist(man_rows, schema=_MANIFEST_SCHEMA))
        # Only the last step differs: DuckDB reads local Parquet files itself; object-store files are
        # read through pyarrow datasets over storage.fs's file system (DuckDB's httpfs is not here).
        make = _arrow_views if fs.is_url(root) else _parquet_views
        allowed = make(con, pair_sources, cache_sources, run_sources)
    except BaseException:
        con.close()
        raise
    # A query may not read Python variables of its caller (DuckDB's replacement scans) nor any file
    # but the views' own.
    con.execute("SET python_enable_replacements = false")
    con.execute("SET allowed_paths = ?", [_allowed(allowed)])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _parquet_views(con: duckdb.DuckDBPyConnection, pair_sources, cache_sources, run_sources) -> list[Path]:
    """The views over local files, read by DuckDB's own Parquet reader (shard and run labels from the
    file names, which the checks above proved equal to the files' own labels); returns the files,
    for `allowed_paths`."""
    allowed: list[Path] = []
    parts = []
    for ds, files in pair_sources:
        paths = [f for _, f, _ in files]
        allowed += paths
        parts.append(f"SELECT {_lit(ds)} AS dataset, regexp_extract(filename, '([0-9]+)\\.parquet$', 1) AS shard, "
                     f"* EXCLUDE (filename) FROM read_parquet({_file_list(paths)}, filename=true, "
                     f"hive_partitioning=false)")
    con.execute("CREATE VIEW pairs AS " + (" UNION ALL BY NAME ".join(parts) if parts else _EMPTY["pairs"]))

    parts = []
    for mid, ds, files in cache_sources:
        paths = [f for _, f in files]
        allowed += paths
        parts.append(f"SELECT {_lit(mid)} AS model_id, {_lit(ds)} AS dataset, "
                     f"regexp_extract(filename, '([0-9]+)\\.parquet$', 1) AS shard, uid, "
                     f"image_emb::FLOAT[] AS image_emb, text_emb::FLOAT[] AS text_emb "
                     f"FROM read_parquet({_file_list(paths)}, filename=true, hive_partitioning=false)")
    con.execute("CREATE VIEW cache AS " + (" UNION ALL ".join(parts) if parts else _EMPTY["cache"]))

    for kind, runs in run_sources.items():
        paths = [fs.resolve(f) for files in runs.values() for f in files]
        if paths:
            allowed += paths
            con.execute(f"CREATE VIEW {kind} AS SELECT regexp_extract(filename, '/runs/([^/]+)/{kind}/[^/]+$', 1) AS run, "
                        f"* EXCLUDE (filename) FROM read_parquet({_file_list(paths)}, union_by_name=true, filename=true, "
                        f"hive_partitioning=false)")
        else:
            con.execute(f"CREATE VIEW {kind} AS {_EMPTY[kind]}")
    return allowed


_EMB = pa.list_(pa.float32())


def _arrow_views(con: duckdb.DuckDBPyConnection, pair_sources, cache_sources, run_sources) -> list[Path]:
    """The same views over object-store files: one pyarrow dataset per view, each file a fragment
    whose labels (dataset, shard, model_id, run) are constant columns of that fragment, the columns
    united by name as DuckDB's `UNION ALL BY NAME` / `union_by_name` do (missing columns null, types
    widened); the embeddings cast to float32 lists on the scan (DuckDB cannot scan Arrow's float16).
    DuckDB scans them through the registered datasets, so nothing needs `allowed_paths`."""
    files = [({"dataset": ds, "shard": shard}, f) for ds, fl in pair_sources for shard, f, _ in fl]
    if files:
        cols = _united([sch for _, fl in pair_sources for _, _, sch in fl], "pairs")
        _register(con, "pairs", files, pa.schema([("dataset", pa.string()), ("shard", pa.string())] + _without(cols, ("dataset", "shard"))),
                  "SELECT * FROM {src}")
    else:
        con.execute(f"CREATE VIEW pairs AS {_EMPTY['pairs']}")

    files = [({"model_id": mid, "dataset": ds, "shard": shard}, f) for mid, ds, fl in cache_sources for shard, f in fl]
    if files:
        schema = pa.schema([("model_id", pa.string()), ("dataset", pa.string()), ("shard", pa.string()),
                            ("uid", pa.string()), ("image_emb", _EMB), ("text_emb", _EMB)])
        _register(con, "cache", files, schema, "SELECT model_id, dataset, shard, uid, image_emb::FLOAT[] AS image_emb, "
                                               "text_emb::FLOAT[] AS text_emb FROM {src}")
    else:
        con.execute(f"CREATE VIEW cache AS {_EMPTY['cache']}")

    for kind, runs in run_sources.items():
        files = [({"run": run}, f) for run, fl in runs.items() for f in fl]
        if not files:
            con.execute(f"CREATE VIEW {kind} AS {_EMPTY[kind]}")
            continue
        # every part's footer (a run logs a part every ~30 s): fetched concurrently, not one by one
        with ThreadPoolExecutor(16) as pool:
            schemas = list(pool.map(_schema, [f for _, f in files]))
        cols = _united(schemas, kind)
        _register(con, kind, files, pa.schema([("run", pa.string())] + _without(cols, ("run",))), "SELECT * FROM {src}")
    return []


def _united(schemas: list[pa.Schema], view: str) -> pa.Schema:
    try:
        return pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise SqlError(f"view {view}: the files' columns cannot be united (a column with incompatible types): {e}") from None


def _without(schema: pa.Schema, names: tuple[str, ...]) -> list[pa.Field]:
    return [f for f in schema if f.name not in names]


def _register(con: duckdb.DuckDBPyConnection, view: str, files: list[tuple[dict, object]], schema: pa.Schema,
              select: str) -> None:
    """View `view` = `select` over one pyarrow dataset of `files` ([(constant columns, file)])."""
    filesystem, paths = fs.arrow_files([f for _, f in files])
    labels = []
    for consts, _ in files:
        expr = None
        for k, v in consts.items():
            e = pc.field(k) == v
            expr = e if expr is None else expr & e
        labels.append(expr)
    dataset = pads.FileSystemDataset.from_paths(paths, schema=schema, format=pads.ParquetFileFormat(),
                                                filesystem=filesystem, partitions=labels)
    con.register(f"_arrow_{view}", dataset)
    con.execute(f"CREATE VIEW {view} AS " + select.format(src=f"_arrow_{view}"))


def _make_table(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> None:
    con.register(f"_arrow_{name}", table)
    con.execute(f"CREATE TABLE {name} AS SELECT * FROM _arrow_{name}")
    con.unregister(f"_arrow_{name}")


def check_read_only(sql: str) -> str:
    """Return the single SELECT statement in `sql`, or raise QueryRefused saying why."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryRefused(f"cannot parse the query: {e}") from None
    if len(statements) != 1:
        raise QueryRefused(f"expected exactly one statement, got {len(statements)}")
    st = statements[0]
    if st.type != duckdb.StatementType.SELECT:
        raise QueryRefused(f"only read-only SELECT queries are allowed, got a {st.type.name} statement")
    return st.query


@contextlib.contextmanager
def stream_query(root: str | os.PathLike, sql: str, *, allow_missing: bool = False, limits: Limits | None = None,
                 batch_rows: int = BATCH_ROWS) -> Iterator[QueryStream]:
    """Run one read-only query over the workspace views; yields a QueryStream whose batches are
    fetched from DuckDB as they are consumed (a result larger than memory is never materialised).
    Leaving the block stops the query and removes DuckDB's spill folder."""
    query = check_read_only(sql)
    limits = limits or Limits.for_machine()
    with tempfile.TemporaryDirectory(prefix="aced-sql-") as spill:
        left_out: list[str] = []
        with _memory_errors(limits):  # a tiny limit can fail already while the views are made
            con = open_views(root, allow_missing=allow_missing, limits=limits, temp_dir=spill, left_out=left_out)
        try:
            with _memory_errors(limits):
                reader = con.sql(query).to_arrow_reader(batch_rows)
            yield QueryStream(reader.schema, reader, limits, left_out)
        finally:
            con.close()


def run_query(root: str | os.PathLike, sql: str, **kw) -> pa.Table:
    """`stream_query`, read whole into one pyarrow table (for small results and tests)."""
    with stream_query(root, sql, **kw) as q:
        return pa.Table.from_batches(list(q.batches()), schema=q.schema)


def read_view(root: str | os.PathLike, view: str, **kw) -> pa.Table:
    """A whole view (`VIEWS`) as a pyarrow table."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; views: {', '.join(VIEWS)}")
    return run_query(root, f"SELECT * FROM {view}", **kw)


# --------------------------------------------------------------------------- output

def _cell(v, width: int) -> str:
    if isinstance(v, float):
        s = f"{v:.6g}"
    elif isinstance(v, list):
        s = "[" + ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v[:8]) + (", ...]" if len(v) > 8 else "]")
    else:
        s = "NULL" if v is None else str(v)
    s = s.replace("\n", " ")
    return s if len(s) <= width else s[: width - 3] + "..."


def _grid(names: list[str], rows: list[list[str]], widths: list[int] | None = None) -> tuple[list[str], list[int]]:
    widths = widths or [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [line(r) for r in rows], widths


def _jsonable(v):
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, decimal.Decimal):  # DuckDB's sum() of BIGINT is a HUGEINT/DECIMAL: keep it a number
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)


def _rows(b: pa.RecordBatch) -> list[tuple]:
    """Rows as tuples (not dicts: `SELECT *` over a join repeats column names)."""
    return list(zip(*(c.to_pylist() for c in b.columns)))


def write_stream(q: QueryStream, fmt: str, out: BinaryIO, *, max_rows: int | None = None) -> int:
    """Write the result in `fmt` ("table", "csv", "json" = a list of row objects, "parquet") to the
    binary stream `out`, batch by batch; returns the rows written. `max_rows` (table only): stop
    fetching after that many rows and say so (the rest of the query is never computed)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    n = 0
    if fmt == "parquet":
        with pq.ParquetWriter(out, q.schema, compression="zstd") as w:
            for b in q.batches():
                w.write_batch(b)
                n += b.num_rows
        return n
    names = q.schema.names
    if fmt == "csv":
        text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
        w = csv.writer(text, lineterminator="\n")
        w.writerow(names)
        for b in q.batches():
            w.writerows(["" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v for v in r]
                        for r in _rows(b))
            n += b.num_rows
        text.detach()
        return n
    if fmt == "json":
        out.write(b"[")
        for b in q.batches():
            for r in b.to_pylist():
                out.write((", " if n else "").encode() + json.dumps({k: _jsonable(v) for k, v in r.items()},
                                                                    default=str, allow_nan=False).encode())
                n += 1
        out.write(b"]\n")
        return n
    # table: column widths from the first batch (a later longer cell shifts its own row only)
    widths, more = None, False
    for b in q.batches():
        rows = _rows(b)
        if max_rows is not None and n + len(rows) > max_rows:
            rows, more = rows[: max_rows - n], True
        cells = [[_cell(v, 60) for v in r] for r in rows]
        if widths is None:
            body, widths = _grid(names, cells + [names])
            body = body[:-1]
            head, _ = _grid(names, [names], widths)
            out.write(("\n".join(head + ["-+-".join("-" * w for w in widths)]) + "\n").encode())
        else:
            body, _ = _grid(names, cells, widths)
        out.write("".join(line + "\n" for line in body).encode())
        n += len(rows)
        if more:
            break
    if widths is None:
        head, widths = _grid(names, [names])
        out.write(("\n".join(head + ["-+-".join("-" * w for w in widths)]) + "\n").encode())
    out.write((f"(first {n} rows shown; more not fetched: add LIMIT/WHERE, or use --out)\n" if more else
               f"({n} row{'s' if n != 1 else ''})\n").encode())
    return n


def write_result(q: QueryStream, fmt: str, out: str | os.PathLike, *, overwrite: bool = False) -> int:
    """Stream the whole result (also for fmt="table") to the file `out`, atomically: a failed or
    interrupted query leaves no partial file. An existing file is replaced only with `overwrite`."""
    out = fs.as_path(out)  # an object-store URL too: one upload (storage.atomic)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if not fs.is_url(out) and not out.parent.is_dir():  # a typo in the folder must not create a new tree of folders
        raise FileNotFoundError(f"{out}: its folder {out.parent} does not exist (create it first)")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; name a file to write")
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            return write_stream(q, fmt, f)
