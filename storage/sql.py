"""Read-only SQL over a workspace: DuckDB views on the Parquet files of pairs, caches and run logs
(ARCHITECTURE.md "users ... inspect shards/caches/selections with SQL over Arrow").

Views (every one also readable as a pyarrow table with `read_view`):
  pairs       dataset, shard, uid, key, image_id, caption, width, height, source, noisy, label, split
  datasets    dataset, name, source, shards, rows, skipped, created, classnames
  cache       model_id, dataset, shard, uid, image_emb FLOAT[], text_emb FLOAT[]
  manifest    model_id, dataset, shard, rows, sha256, source_sha256, fingerprint, dim, dtype, logit_scale, logit_bias
  metrics     run, step, <the run's metric columns>      (runs/*/metrics/*.parquet, united by column name)
  selections  run, step, uid, score, selected, noisy     (runs/*/selections/*.parquet)

Nothing can be modified through `run_query`: (1) the text must parse (duckdb.extract_statements)
into exactly one statement of type SELECT (which includes WITH, VALUES, FROM-first, DESCRIBE,
SUMMARIZE, SHOW); (2) the connection is locked down after the views are made: external access is
off, so only the Parquet files behind the views can be opened (`allowed_paths`), extensions cannot
be installed or loaded, and `lock_configuration` stops a query from turning any of it back on.
The second layer alone would still let a COPY overwrite one of the allowed files, hence the first.
The views read the Parquet files (not in-memory Arrow): DuckDB cannot scan half-float Arrow data.
"""
from __future__ import annotations

import csv
import io
import decimal
import json
import logging
import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import atomic_write_bytes
from storage.cache import CacheError, find_cache_folders, read_manifest
from storage.shards import ShardError, find_datasets, load_dataset

log = logging.getLogger(__name__)

VIEWS = ("pairs", "datasets", "cache", "manifest", "metrics", "selections")
FORMATS = ("table", "csv", "json", "parquet")

_EMPTY = {
    "pairs": ("SELECT NULL::VARCHAR AS dataset, NULL::VARCHAR AS shard, NULL::VARCHAR AS uid, NULL::VARCHAR AS key, "
              "NULL::VARCHAR AS image_id, NULL::VARCHAR AS caption, NULL::INTEGER AS width, NULL::INTEGER AS height, "
              "NULL::VARCHAR AS source, NULL::BOOLEAN AS noisy, NULL::INTEGER AS label, NULL::VARCHAR AS split WHERE false"),
    "cache": ("SELECT NULL::VARCHAR AS model_id, NULL::VARCHAR AS dataset, NULL::VARCHAR AS shard, NULL::VARCHAR AS uid, "
              "NULL::FLOAT[] AS image_emb, NULL::FLOAT[] AS text_emb WHERE false"),
    "metrics": "SELECT NULL::VARCHAR AS run, NULL::BIGINT AS step WHERE false",
    "selections": ("SELECT NULL::VARCHAR AS run, NULL::BIGINT AS step, NULL::VARCHAR AS uid, NULL::FLOAT AS score, "
                   "NULL::BOOLEAN AS selected, NULL::BOOLEAN AS noisy WHERE false"),
}

_MANIFEST_SCHEMA = pa.schema([("model_id", pa.string()), ("dataset", pa.string()), ("shard", pa.string()),
                              ("rows", pa.int64()), ("sha256", pa.string()), ("source_sha256", pa.string()),
                              ("fingerprint", pa.string()), ("dim", pa.int32()), ("dtype", pa.string()),
                              ("logit_scale", pa.float64()), ("logit_bias", pa.float64())])
_DATASETS_SCHEMA = pa.schema([("dataset", pa.string()), ("name", pa.string()), ("source", pa.string()),
                              ("shards", pa.int64()), ("rows", pa.int64()), ("skipped", pa.int64()),
                              ("created", pa.string()), ("classnames", pa.list_(pa.string()))])


class QueryRefused(ValueError):
    """The SQL text is not a single read-only statement."""


def _lit(s: str | os.PathLike) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _file_list(paths: list[Path]) -> str:
    return "[" + ", ".join(_lit(p) for p in paths) + "]"


def _existing(paths: list[Path], what: str) -> list[Path]:
    missing = [p for p in paths if not p.is_file()]
    for p in missing:
        log.warning("%s: missing file %s left out of the SQL views", what, p)
    return [p for p in paths if p.is_file()]


def _run_files(root: Path, kind: str) -> list[Path]:
    runs = root / "runs"
    if not runs.is_dir():
        return []
    return sorted(p.resolve() for p in runs.glob(f"*/{kind}/*.parquet") if not p.name.startswith("."))


def open_views(root: str | os.PathLike) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views above over workspace `root`, locked down.

    Datasets or cache folders whose listing is unreadable, or whose listed files are missing, are
    left out with a logged warning (use `aced inspect` / `aced cache verify` to see why).
    Prefer `run_query` for SQL text from a user: it also refuses non-SELECT statements.
    """
    root = Path(root).resolve()
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False})
    allowed: list[Path] = []

    # pairs + datasets
    parts, ds_rows = [], []
    for ds, folder in find_datasets(root / "datasets").items():
        try:
            info = load_dataset(folder)
        except ShardError as e:
            log.warning("left out of the SQL views: %s", e)
            continue
        ds_rows.append({"dataset": ds, "name": info.name, "source": info.source, "shards": len(info.shards),
                        "rows": info.rows, "skipped": info.skipped, "created": info.created,
                        "classnames": info.classnames})
        files = _existing([s.meta_path.resolve() for s in info.shards], f"dataset {ds}")
        if files:
            allowed += files
            parts.append(f"SELECT {_lit(ds)} AS dataset, regexp_extract(filename, '([0-9]+)\\.parquet$', 1) AS shard, "
                         f"* EXCLUDE (filename) FROM read_parquet({_file_list(files)}, filename=true)")
    con.execute("CREATE VIEW pairs AS " + (" UNION ALL BY NAME ".join(parts) if parts else _EMPTY["pairs"]))
    _make_table(con, "datasets", pa.Table.from_pylist(ds_rows, schema=_DATASETS_SCHEMA))

    # cache + manifest
    parts, man_rows = [], []
    for (mid, ds), folder in find_cache_folders(root).items():
        try:
            doc = read_manifest(folder)
        except CacheError as e:
            log.warning("left out of the SQL views: %s", e)
            continue
        for name, e in doc["shards"].items():
            man_rows.append({"model_id": mid, "dataset": ds, "shard": name, "rows": e.get("rows"),
                             "sha256": e.get("sha256"), "source_sha256": e.get("source_sha256"),
                             "fingerprint": doc["fingerprint"], "dim": doc["dim"], "dtype": doc["dtype"],
                             "logit_scale": doc.get("logit_scale"), "logit_bias": doc.get("logit_bias")})
        files = _existing([(folder / f"{n}.parquet").resolve() for n in doc["shards"]], f"cache {mid}/{ds}")
        if files:
            allowed += files
            parts.append(f"SELECT {_lit(mid)} AS model_id, {_lit(ds)} AS dataset, "
                         f"regexp_extract(filename, '([0-9]+)\\.parquet$', 1) AS shard, uid, "
                         f"image_emb::FLOAT[] AS image_emb, text_emb::FLOAT[] AS text_emb "
                         f"FROM read_parquet({_file_list(files)}, filename=true)")
    con.execute("CREATE VIEW cache AS " + (" UNION ALL ".join(parts) if parts else _EMPTY["cache"]))
    _make_table(con, "manifest", pa.Table.from_pylist(man_rows, schema=_MANIFEST_SCHEMA))

    # run logs
    for kind in ("metrics", "selections"):
        files = _run_files(root, kind)
        if files:
            allowed += files
            con.execute(f"CREATE VIEW {kind} AS SELECT regexp_extract(filename, '/runs/([^/]+)/{kind}/[^/]+$', 1) AS run, "
                        f"* EXCLUDE (filename) FROM read_parquet({_file_list(files)}, union_by_name=true, filename=true)")
        else:
            con.execute(f"CREATE VIEW {kind} AS {_EMPTY[kind]}")

    con.execute("SET allowed_paths = ?", [[str(p) for p in allowed]])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


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


def run_query(root: str | os.PathLike, sql: str) -> pa.Table:
    """Run one read-only query over the workspace views and return the result as a pyarrow table."""
    query = check_read_only(sql)
    con = open_views(root)
    try:
        return con.sql(query).to_arrow_table()
    finally:
        con.close()


def read_view(root: str | os.PathLike, view: str) -> pa.Table:
    """A whole view (`VIEWS`) as a pyarrow table."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; views: {', '.join(VIEWS)}")
    return run_query(root, f"SELECT * FROM {view}")


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


def format_table(table: pa.Table, *, max_rows: int = 50, max_width: int = 60) -> str:
    """A plain-text grid of the first `max_rows` rows (long cells and lists abbreviated)."""
    names = table.column_names
    rows = [[_cell(v, max_width) for v in r.values()] for r in table.slice(0, max_rows).to_pylist()]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(names), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows]
    more = table.num_rows - len(rows)
    out.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''}" + (f", {more} not shown)" if more > 0 else ")"))
    return "\n".join(out)


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


def render(table: pa.Table, fmt: str, *, max_rows: int = 50) -> bytes:
    """The result in `fmt` ("table", "csv", "json" = a list of row objects, "parquet")."""
    if fmt == "table":
        return (format_table(table, max_rows=max_rows) + "\n").encode()
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(table.column_names)
        for r in table.to_pylist():
            w.writerow(["" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v for v in r.values()])
        return buf.getvalue().encode()
    if fmt == "json":
        rows = [{k: _jsonable(v) for k, v in r.items()} for r in table.to_pylist()]
        return (json.dumps(rows, default=str, allow_nan=False) + "\n").encode()
    if fmt == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        return sink.getvalue().to_pybytes()
    raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")


def write_result(table: pa.Table, fmt: str, out: str | os.PathLike) -> None:
    """Write the rendered result to `out` atomically (all rows, also for fmt="table")."""
    atomic_write_bytes(out, render(table, fmt, max_rows=table.num_rows))
