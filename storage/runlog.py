"""Run logs as Parquet parts: training metrics and per-step selection records (ARCHITECTURE.md
"Run logs"), queryable with the same SQL as the caches (`storage/sql.py` views `metrics`, `selections`).

`<root>/runs/<run>/metrics/part-<tag>.parquet` and `.../selections/part-<tag>.parquet`: the trainer
appends rows and flushes a part now and then (each part written atomically); at resume,
`truncate_after(step)` drops what was logged after the checkpoint so the replayed steps are not
logged twice. The folder may be in an object store (storage/fs.py): each part is one atomic object write.

Row conventions: every row has an integer `step`. Selection rows (section 3.2, one per candidate of
a super-batch): step int64, uid string, score float32, selected bool, noisy bool (nullable).
"""
from __future__ import annotations

import operator
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage import fs
from storage.atomic import atomic_path
from storage.shards import read_parquet

_TAG_RE = re.compile(r"^[A-Za-z0-9_-]+$")

SELECTIONS_SCHEMA = pa.schema([
    pa.field("step", pa.int64(), nullable=False),
    pa.field("uid", pa.string(), nullable=False),
    pa.field("score", pa.float32()),
    pa.field("selected", pa.bool_(), nullable=False),
    pa.field("self_score", pa.float32()),
    pa.field("noisy", pa.bool_()),
])


class ParquetLog:
    """Append-only log of rows in one folder, flushed as `part-<tag>.parquet` files.

    folder: where the parts live (created on the first flush).
    schema: optional fixed schema (e.g. SELECTIONS_SCHEMA); without one the schema is inferred per
        part from the rows, with `step` cast to int64 (the SQL views union parts by column name), and a
        column with no value in a part (a metric that is null, e.g. an unknown noisy fraction) written as
        float64 nulls, not as Arrow's null type, so every part types a metric alike.
    """

    def __init__(self, folder: str | os.PathLike, schema: pa.Schema | None = None):
        self.folder = fs.as_path(folder)
        self.schema = schema
        self._rows: list[dict[str, Any]] = []
        self._tables: list[pa.Table] = []  # columnar appends (need a fixed schema)

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Buffer rows; each must have an integer `step`."""
        checked = []
        for r in rows:
            step = r.get("step")
            try:
                if isinstance(step, bool):
                    raise TypeError
                step = operator.index(step)  # int or numpy integer, not float
            except TypeError:
                raise ValueError(f"{self.folder}: row without an integer 'step': {r!r}") from None
            checked.append({**r, "step": step})
        self._rows.extend(checked)

    def append_table(self, table: pa.Table) -> None:
        """Buffer rows given as columns (cheap for many rows: no Python object per value). The log must
        have a fixed schema and the table must match it."""
        if self.schema is None or not table.schema.equals(self.schema):
            raise ValueError(f"{self.folder}: append_table needs the log's schema {self.schema}, got {table.schema}")
        self._tables.append(table)

    @property
    def pending(self) -> int:
        return len(self._rows) + sum(t.num_rows for t in self._tables)

    def part_path(self, tag: str) -> Path:
        if not _TAG_RE.match(tag):
            raise ValueError(f"tag {tag!r} must match {_TAG_RE.pattern}")
        return self.folder / f"part-{tag}.parquet"

    def flush(self, tag: str) -> Path | None:
        """Write the buffered rows as `part-<tag>.parquet` atomically (replacing a part of that
        tag) and clear the buffer. Returns the path, or None if nothing was buffered."""
        path = self.part_path(tag)
        if not self.pending:
            return None
        if self.schema is not None:
            table = pa.concat_tables([pa.Table.from_pylist(self._rows, schema=self.schema), *self._tables])
        else:
            # Columns = the union of the rows' keys (from_pylist would keep only the first row's).
            names = list(dict.fromkeys(k for r in self._rows for k in r))
            cols = {}
            for k in names:
                values = [r.get(k) for r in self._rows]
                kind = pa.int64() if k == "step" else pa.float64() if all(v is None for v in values) else None
                try:
                    cols[k] = pa.array(values, type=kind)
                except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                    raise ValueError(f"{path}: column {k!r} has values of mixed types ({e})") from None
            table = pa.table(cols)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        self._rows = []
        self._tables = []
        return path

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet")) if self.folder.is_dir() else []

    def truncate_after(self, step: int) -> list[Path]:
        """Forget everything logged after `step` (used at resume from a checkpoint at `step`).

        Parts whose first step is > step are removed; a part that straddles `step` is rewritten
        (atomically) with only its rows at step <= step; the unflushed buffer is dropped likewise.
        Returns the parts removed or rewritten.
        """
        touched = []
        self._rows = [r for r in self._rows if int(r["step"]) <= step]
        self._tables = [t.filter(pc.less_equal(t.column("step"), step)) for t in self._tables]
        for p in self.parts():
            steps = read_parquet(p, columns=["step"]).column("step")
            if len(steps) == 0 or pc.max(steps).as_py() <= step:
                continue
            if pc.min(steps).as_py() > step:
                p.unlink()
            else:
                table = read_parquet(p)
                table = table.filter(pc.less_equal(table.column("step"), step))
                with atomic_path(p) as tmp:
                    pq.write_table(table, tmp, compression="zstd")
            touched.append(p)
        return touched
