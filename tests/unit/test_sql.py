"""SQL views over a workspace, their read-only lock-down, run logs, `aced sql` and `aced inspect`."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.cache import CacheWriter, ModelMeta
from storage.inspect import format_summary, inspect_path
from storage.runlog import SELECTIONS_SCHEMA, ParquetLog
from storage.shards import list_shards, read_metadata, write_shards
from storage.sql import QueryRefused, open_views, read_view, run_query
from tests.conftest import samples
from tests.conftest import data_cli as _cli

META = ModelMeta("ref", "fp", 4, 10.0, -10.0)


@pytest.fixture
def full_root(pair_root):
    """pair_root plus a nested dataset, a float16 cache of `tiny`, and one run's logs."""
    write_shards(samples(3, start=20), pair_root / "datasets" / "f" / "test", name="f/test", source="t")
    w = CacheWriter(pair_root / "cache", "tiny", META)
    for ref in list_shards(pair_root / "datasets" / "tiny"):
        x = np.full((ref.rows, 4), 0.5, np.float32)
        w.write_shard(ref, read_metadata(ref).column("uid").to_pylist(), x, -x)
    m = ParquetLog(pair_root / "runs" / "r1" / "metrics")
    m.append([{"step": 0, "loss": 2.0}, {"step": 1, "loss": 1.5, "lr": 1e-3}])
    m.flush("00000002")
    m.append([{"step": 2, "loss": 1.0, "acc": 0.25}])
    m.flush("00000003")
    s = ParquetLog(pair_root / "runs" / "r1" / "selections", SELECTIONS_SCHEMA)
    s.append([{"step": 1, "uid": "u1", "score": 0.5, "selected": True, "noisy": False},
              {"step": 1, "uid": "u2", "score": -1.0, "selected": False, "noisy": True}])
    s.flush("00000002")
    return pair_root


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_views_on_an_empty_workspace(tmp_path):
    for view, cols in (("pairs", ["dataset", "shard", "uid", "key", "image_id", "caption", "width", "height",
                                  "source", "noisy", "label", "split"]),
                       ("cache", ["model_id", "dataset", "shard", "uid", "image_emb", "text_emb"]),
                       ("metrics", ["run", "step"]),
                       ("selections", ["run", "step", "uid", "score", "selected", "self_score", "noisy"])):
        t = read_view(tmp_path, view)
        assert t.num_rows == 0 and t.column_names == cols, view
    assert str(read_view(tmp_path, "selections").schema.field("step").type) == "int64"
    assert read_view(tmp_path, "manifest").num_rows == 0


def test_pairs_cache_manifest_views(full_root):
    t = run_query(full_root, "SELECT dataset, count(*) AS n, count(DISTINCT image_id) AS imgs FROM pairs "
                             "GROUP BY dataset ORDER BY dataset")
    assert t.to_pylist() == [{"dataset": "f/test", "n": 3, "imgs": 3}, {"dataset": "tiny", "n": 10, "imgs": 10}]
    t = run_query(full_root, "SELECT shard, count(*) AS n FROM pairs WHERE dataset = 'tiny' GROUP BY 1 ORDER BY 1")
    assert t.to_pylist() == [{"shard": "00000000", "n": 4}, {"shard": "00000001", "n": 4}, {"shard": "00000002", "n": 2}]
    # float16 embeddings come back as FLOAT[] through the Parquet files; join with pairs by uid
    t = run_query(full_root, "SELECT p.caption, c.image_emb, c.text_emb FROM pairs p JOIN cache c USING (dataset, shard, uid) "
                             "ORDER BY p.key LIMIT 1")
    assert t.to_pylist() == [{"caption": "a picture number 0", "image_emb": [0.5] * 4, "text_emb": [-0.5] * 4}]
    t = run_query(full_root, "SELECT model_id, dataset, sum(rows) AS rows, any_value(dim) AS dim FROM manifest GROUP BY ALL")
    assert t.to_pylist() == [{"model_id": "ref", "dataset": "tiny", "rows": 10, "dim": 4}]
    assert run_query(full_root, "SELECT rows FROM datasets WHERE dataset = 'f/test'").to_pylist() == [{"rows": 3}]


def test_metrics_and_selections_views(full_root):
    t = run_query(full_root, "SELECT run, step, loss, lr, acc FROM metrics ORDER BY step")
    assert t.column("step").to_pylist() == [0, 1, 2] and t.column("run").to_pylist() == ["r1"] * 3
    assert t.column("acc").to_pylist() == [None, None, 0.25]  # columns united by name across parts
    t = run_query(full_root, "SELECT count(*) FILTER (selected) AS sel, count(*) FILTER (noisy) AS noisy FROM selections")
    assert t.to_pylist() == [{"sel": 1, "noisy": 1}]


REFUSED = ["COPY (SELECT 1) TO 'x.csv'", "ATTACH 'x.db' AS x", "INSTALL httpfs", "LOAD httpfs",
           "CREATE TABLE t AS SELECT 1", "CREATE VIEW v AS SELECT 1", "INSERT INTO datasets SELECT * FROM datasets",
           "UPDATE datasets SET rows = 0", "DELETE FROM datasets", "DROP VIEW pairs", "PRAGMA version",
           "SET enable_external_access = true", "CALL duckdb_settings()", "EXPORT DATABASE 'out'",
           "EXPLAIN ANALYZE SELECT 1", "SELECT 1; SELECT 2", "SELECT 1; COPY pairs TO 'x.csv'", "BEGIN", "",
           "this is not sql"]


@pytest.mark.parametrize("sql", REFUSED)
def test_non_select_statements_are_refused(full_root, sql):
    with pytest.raises(QueryRefused):
        run_query(full_root, sql)


def test_nothing_outside_the_views_can_be_read_or_written(full_root, tmp_path):
    before = _digest(full_root)
    for sql in ["SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM read_text('/etc/hostname')",
                f"SELECT * FROM read_text('{full_root}/datasets/tiny/_dataset.json')",
                f"SELECT * FROM read_blob('{full_root}/datasets/tiny/00000000.tar')", "SELECT * FROM glob('/tmp/*')"]:
        with pytest.raises(duckdb.Error, match="disabled by configuration"):
            run_query(full_root, sql)
    con = open_views(full_root)
    # the connection itself stays locked: no turning access back on, no writes to other files
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET enable_external_access = true")
    with pytest.raises(duckdb.Error, match="disabled by configuration"):
        con.execute(f"COPY (SELECT 1) TO '{tmp_path}/out.csv'")
    assert _digest(full_root) == before and not (tmp_path / "out.csv").exists()


def test_parquet_log_truncate_after(tmp_path):
    from pipeline.report import read_metrics  # what reads a run's metric parts back (reports, `aced train`)

    log = ParquetLog(tmp_path / "run" / "metrics")
    for a, b in ((0, 10), (10, 20), (20, 30)):
        log.append([{"step": s, "loss": float(s)} for s in range(a, b)])
        log.flush(f"{b:08d}")
    log.append([{"step": 30, "loss": 0.0}])
    touched = log.truncate_after(14)
    assert [p.name for p in touched] == ["part-00000020.parquet", "part-00000030.parquet"]
    assert [p.name for p in log.parts()] == ["part-00000010.parquet", "part-00000020.parquet"]
    assert read_metrics(tmp_path / "run").column("step").to_pylist() == list(range(15)) and log.pending == 0
    with pytest.raises(ValueError, match="integer 'step'"):
        log.append([{"step": 1.5}])
    with pytest.raises(ValueError, match="mixed types"):
        log.append([{"step": 1, "x": 1.0}, {"step": 2, "x": "text"}])
        log.flush("bad")
    assert pq.read_table(log.parts()[0]).schema.field("step").type == "int64"




def test_cli_sql_formats(full_root, tmp_path, capsys):
    assert _cli(full_root, "sql", "select count(*) as n, count(distinct image_id) as m from pairs") == 0
    out = capsys.readouterr().out
    assert "13" in out and "(1 row)" in out
    assert _cli(full_root, "sql", "select step, loss from metrics order by step", "--format", "csv") == 0
    assert capsys.readouterr().out.splitlines() == ["step,loss", "0,2.0", "1,1.5", "2,1.0"]
    assert _cli(full_root, "sql", "select shard, image_emb from cache order by shard limit 1", "--format", "json") == 0
    assert json.loads(capsys.readouterr().out) == [{"shard": "00000000", "image_emb": [0.5] * 4}]
    assert _cli(full_root, "sql", "select * from pairs", "--format", "parquet", "--out", str(tmp_path / "p.parquet")) == 0
    assert pq.read_table(tmp_path / "p.parquet").num_rows == 13
    assert _cli(full_root, "sql", "drop view pairs") == 2
    assert "refused" in capsys.readouterr().err


def test_inspect_dataset_cache_workspace(full_root, capsys):
    d = inspect_path(full_root / "datasets" / "tiny", verify=True)
    assert d["kind"] == "dataset" and d["rows"] == 10 and d["distinct_uid"] == 10 and not d["problems"]
    assert d["noisy"] == 4 and d["splits"] == {"train": 10}
    c = inspect_path(full_root / "cache" / "ref" / "tiny")
    assert c["kind"] == "cache" and c["dim"] == 4 and c["rows"] == 10 and c["missing_shards"] == []
    assert c["image_emb_norm"] == {"min": 1.0, "mean": 1.0, "max": 1.0} and c["image_emb_nonfinite_rows"] == 0
    w = inspect_path(full_root)
    assert w["kind"] == "workspace" and len(w["datasets"]) == 2 and w["runs"][0]["metrics_last_step"] == 2
    assert "model_id: ref" in format_summary(w)
    # a shard the cache lacks shows up as a problem
    write_shards(samples(2, start=40), full_root / "datasets" / "tiny", name="tiny", source="t", overwrite=True)
    c = inspect_path(full_root / "cache" / "ref" / "tiny")
    assert c["stale_shards"] == ["00000000"] and c["extra_shards"] == ["00000001", "00000002"] and c["problems"]
    assert _cli(full_root, "inspect", str(full_root / "datasets")) == 0
    assert "f/test" in capsys.readouterr().out
