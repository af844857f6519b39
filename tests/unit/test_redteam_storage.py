"""Storage findings of the red-team pass (numbers as in its report): each test fails on the code before the fix."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.cache import CacheError, CacheWriter, ModelMeta, read_manifest, verify_cache, write_table
from storage.importers import import_captions, import_class_folders, import_coco, import_webdataset
from storage.inspect import inspect_path
from storage.runlog import SELECTIONS_SCHEMA, ParquetLog
from storage.shards import DATASET_FILE, ShardError, list_shards, load_dataset, read_metadata, write_shards
from storage.sql import Limits, SqlError, run_query, stream_query, write_result
from storage.workspace import check_name
from tests.conftest import image_bytes, samples
from tests.conftest import data_cli as _cli

REPO = Path(__file__).resolve().parents[2]
META = ModelMeta("ref", "fp", 4, 10.0, -10.0)




def _cache(root: Path, dataset: str) -> CacheWriter:
    w = CacheWriter(root / "cache", dataset, META)
    for ref in list_shards(root / "datasets" / dataset):
        x = np.full((ref.rows, 4), 0.5, np.float32)
        w.write_shard(ref, read_metadata(ref).column("uid").to_pylist(), x, -x)
    return w


def _runlog(root: Path, run: str) -> None:
    m = ParquetLog(root / "runs" / run / "metrics")
    m.append([{"step": 0, "loss": 2.0}])
    m.flush("00000001")
    s = ParquetLog(root / "runs" / run / "selections", SELECTIONS_SCHEMA)
    s.append([{"step": 0, "uid": "u", "score": 0.5, "selected": True, "noisy": False}])
    s.flush("00000001")


# --------------------------------------------------------------------------- 1: glob characters in SQL paths

def test_sql_reads_exactly_the_files_of_datasets_named_with_glob_characters(tmp_path):
    root = tmp_path / "ws"
    names = ["a", "b", "*", "**", "?", "[ab]"]
    for i, n in enumerate(names):
        write_shards(samples(2 + i, start=10 * i), root / "datasets" / n, name=n, source="t")
        _cache(root, n)
        _runlog(root, f"r{n}")
    want = {n: 2 + i for i, n in enumerate(names)}
    for view in ("pairs", "cache"):
        t = run_query(root, f"SELECT dataset, count(*) AS n, count(DISTINCT uid) AS u FROM {view} GROUP BY 1")
        assert {r["dataset"]: r["n"] for r in t.to_pylist()} == want, view
        assert all(r["n"] == r["u"] for r in t.to_pylist()), view
    for view in ("metrics", "selections"):
        t = run_query(root, f"SELECT run, count(*) AS n FROM {view} GROUP BY 1")
        assert {r["run"]: r["n"] for r in t.to_pylist()} == {f"r{n}": 1 for n in names}, view
    # a query's own pattern still reaches only the files behind the views (DuckDB checks what it expands to)
    stray = root / "datasets" / "stray"
    stray.mkdir()
    shutil.copy(root / "datasets" / "a" / "00000000.parquet", stray / "00000000.parquet")
    with pytest.raises(Exception, match="Permission"):
        run_query(root, f"SELECT count(*) FROM read_parquet('{root}/datasets/*/00000000.parquet')")
    shutil.rmtree(stray)
    # inspect lists a dataset named "**" too (Python's glob refused it as a pattern)
    assert not inspect_path(root)["problems"]


def test_sql_in_a_workspace_whose_path_holds_a_bracket(tmp_path):
    for d, n in (("ws[1]", 3), ("ws1", 5)):  # "ws[1]" as a pattern matches "ws1"
        write_shards(samples(n), tmp_path / d / "datasets" / "s", name="s", source="t")
        _cache(tmp_path / d, "s")
    assert run_query(tmp_path / "ws[1]", "SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": 3}]
    assert run_query(tmp_path / "ws[1]", "SELECT count(*) AS n FROM cache").to_pylist() == [{"n": 3}]


# --------------------------------------------------------------------------- 2: inspect --verify checks caches

def test_inspect_verify_runs_the_cache_shard_check(pair_root, capsys):
    w = _cache(pair_root, "tiny")
    path = w.folder / "00000000.parquet"
    # a well-formed file with its own label, in another row order: only the manifest's sha256 and the uids tell
    t = pq.read_table(path)
    write_table(t.take(list(range(t.num_rows))[::-1]).replace_schema_metadata(t.schema.metadata), path)
    assert not inspect_path(w.folder)["problems"]  # counting alone sees nothing wrong
    assert not verify_cache(pair_root).ok
    for target in (w.folder, pair_root):
        probs = inspect_path(target, verify=True)["problems"]
        assert any(f"{path}: sha256 differs from the manifest" in p for p in probs), (target, probs)
        assert any(f"{path}: row 0: uid" in p for p in probs), (target, probs)
        assert _cli(pair_root, "inspect", str(target), "--verify") == 1
    capsys.readouterr()


# --------------------------------------------------------------------------- 3, 9: caption tables read strictly

def _table_src(tmp_path: Path, name: str, text: str, *, fname: str = "captions.csv") -> Path:
    src = tmp_path / name
    (src / "images").mkdir(parents=True)
    for i, f in enumerate(("a.jpg", "b.jpg", "c.jpg")):
        (src / "images" / f).write_bytes(image_bytes(i))
    (src / fname).write_text(text, encoding="utf-8")
    return src


def test_csv_with_an_unterminated_quote_is_an_error_naming_the_line(tmp_path):
    src = _table_src(tmp_path, "q", 'image,caption\na.jpg,fine\nb.jpg,"unterminated\nc.jpg,ok\n')
    for on_error in ("raise", "skip"):
        with pytest.raises(ShardError, match=r"captions\.csv:3: malformed CSV row"):
            import_captions(src, tmp_path / "ws", "q", on_error=on_error)


def test_csv_row_with_extra_fields_is_named_or_counted(tmp_path, caplog):
    src = _table_src(tmp_path, "x", "image,caption\na.jpg,hi,extra,cols\nb.jpg,ok\n")
    with pytest.raises(ShardError, match=r"captions\.csv:2: 4 field\(s\), but the header has 2"):
        import_captions(src, tmp_path / "ws", "x")
    with caplog.at_level(logging.WARNING):
        info = import_captions(src, tmp_path / "ws", "x", on_error="skip")[""]
    assert info.rows == 1 and info.extra["caption_table_skip_reasons"] == {"wrong number of fields": 1}
    assert "captions.csv:2: 4 field(s)" in caplog.text


def test_tsv_has_no_quoting(tmp_path):
    src = _table_src(tmp_path, "t", 'image\tcaption\na.jpg\t"Hi" she said\nb.jpg\t"open quote\nc.jpg\ta 5" screen\n',
                     fname="captions.tsv")
    info = import_captions(src, tmp_path / "ws", "t")[""]
    caps = [c for ref in info.shards for c in read_metadata(ref).column("caption").to_pylist()]
    assert caps == ['"Hi" she said', '"open quote', 'a 5" screen']


def test_two_caption_tables_are_ambiguous(tmp_path):
    src = _table_src(tmp_path, "both", "image,caption\na.jpg,csv\n")
    (src / "captions.tsv").write_text("image\tcaption\na.jpg\ttsv\n")
    with pytest.raises(ShardError, match=r"captions\.csv.*captions\.tsv.*--captions"):
        import_captions(src, tmp_path / "ws", "both")
    info = import_captions(src, tmp_path / "ws", "both", captions=src / "captions.tsv")[""]
    assert read_metadata(info.shards[0]).column("caption").to_pylist() == ["tsv"]


def test_a_megabyte_caption_is_read(tmp_path):
    src = _table_src(tmp_path, "big", f"image,caption\na.jpg,{'x' * 1_000_000}\nb.jpg,ok\n")
    info = import_captions(src, tmp_path / "ws", "big")[""]
    assert info.rows == 2


# --------------------------------------------------------------------------- 10: symlinks leaving the image folder

def test_symlinks_out_of_the_image_folder_are_refused(tmp_path, caplog):
    outside = tmp_path / "victim"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(image_bytes(9))
    src = _table_src(tmp_path, "cap", "image,caption\na.jpg,fine\nlink.jpg,x\ndirlink/secret.jpg,y\ninner.jpg,z\n")
    (src / "images" / "link.jpg").symlink_to(outside / "secret.jpg")
    (src / "images" / "dirlink").symlink_to(outside)
    (src / "images" / "inner.jpg").symlink_to(src / "images" / "b.jpg")  # stays inside: fine
    with pytest.raises(ShardError, match=rf"link\.jpg: leads to {outside / 'secret.jpg'}, outside the image folder"):
        import_captions(src, tmp_path / "ws", "cap")
    with caplog.at_level(logging.WARNING):
        info = import_captions(src, tmp_path / "ws", "cap", on_error="skip")[""]
    assert info.rows == 2 and info.extra["skip_reasons"] == {"path outside image folder": 2}
    (src / "images" / "loop.jpg").symlink_to("loop.jpg")  # a loop is refused too, not a traceback
    (src / "captions.csv").write_text("image,caption\na.jpg,fine\nloop.jpg,x\n")
    with pytest.raises(ShardError, match=r"loop\.jpg: leads to nowhere"):
        import_captions(src, tmp_path / "ws", "loop")
    # COCO: the same rule
    (tmp_path / "c.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"},
                                                            {"id": 2, "file_name": "link.jpg"}],
                                                 "annotations": [{"image_id": 1, "caption": "a"},
                                                                 {"image_id": 2, "caption": "b"}]}))
    with pytest.raises(ShardError, match="link.jpg: leads to"):
        import_coco(tmp_path / "c.json", src / "images", tmp_path / "ws", "coco")
    assert import_coco(tmp_path / "c.json", src / "images", tmp_path / "ws", "coco", on_error="skip").rows == 1
    # class folders: a linked file is skipped and counted, a linked class folder is refused
    cls = tmp_path / "cls"
    (cls / "cat").mkdir(parents=True)
    (cls / "cat" / "ok.jpg").write_bytes(image_bytes(1))
    (cls / "cat" / "l.jpg").symlink_to(outside / "secret.jpg")
    with pytest.raises(ShardError, match="l.jpg: leads to"):
        import_class_folders(cls, tmp_path / "ws", "cls")
    info = import_class_folders(cls, tmp_path / "ws", "cls", on_error="skip")
    assert info.rows == 1 and info.extra["skipped_at_import"] == 1
    (cls / "linked").symlink_to(outside)
    for on_error in ("raise", "skip"):
        with pytest.raises(ShardError, match=r"linked: class folder leads to .*outside"):
            import_class_folders(cls, tmp_path / "ws", "cls2", on_error=on_error)


# --------------------------------------------------------------------------- 11: cache verify, manifests

def test_cache_verify_names_a_cache_folder_without_manifest(pair_root):
    w = _cache(pair_root, "tiny")
    copy = pair_root / "cache" / "other" / "tiny"
    shutil.copytree(w.folder, copy)
    (copy / "_manifest.json").unlink()
    rep = verify_cache(pair_root)
    assert not rep.ok and any(f"{copy}: holds cache files but no _manifest.json" in p for p in rep.problems)
    assert any(str(copy) in p for p in inspect_path(pair_root)["problems"])


def test_manifest_with_a_null_dim_names_the_field(pair_root):
    w = _cache(pair_root, "tiny")
    doc = json.loads((w.folder / "_manifest.json").read_text())
    (w.folder / "_manifest.json").write_text(json.dumps({**doc, "dim": None}))
    with pytest.raises(CacheError, match=r"_manifest\.json: malformed manifest: 'dim' is None, want a positive integer"):
        read_manifest(w.folder)
    assert any("'dim' is None" in p for p in verify_cache(pair_root).problems)


# --------------------------------------------------------------------------- 12: truncated tars, malformed uids

def _wds_tar(path: Path, n: int, uid=None) -> None:
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            meta = {} if uid is None or i != 1 else {"uid": uid}
            for name, data in ((f"k{i:02d}.jpg", image_bytes(i)), (f"k{i:02d}.txt", f"cap {i}".encode()),
                               (f"k{i:02d}.json", json.dumps(meta).encode())):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


@pytest.mark.parametrize("cut", ["member", "data"])
def test_truncated_webdataset_tar_is_reported_as_such(tmp_path, cut):
    src = tmp_path / "wds"
    src.mkdir()
    _wds_tar(src / "0.tar", 6)
    data = (src / "0.tar").read_bytes()
    with tarfile.open(src / "0.tar") as tf:
        members = tf.getmembers()
    m = members[10]  # k03.txt: a cut right before its header, or inside its data
    end = m.offset if cut == "member" else m.offset_data + 2
    (src / "0.tar").write_bytes(data[:end])
    for kw in ({}, {"on_error": "skip"}, {"in_place": True, "on_error": "skip"}):
        with pytest.raises(ShardError, match=r"0\.tar: truncated tar"):
            import_webdataset(src, tmp_path / "ws", "w", **kw)


@pytest.mark.parametrize("uid", ["zz", 12345, ""])
def test_malformed_uid_is_never_replaced(tmp_path, uid):
    src = tmp_path / "wds"
    src.mkdir()
    _wds_tar(src / "0.tar", 3, uid=uid)
    for name, kw in (("repack", {}), ("in-place", {"in_place": True})):
        with pytest.raises(ShardError, match=rf"key='k01'.*{uid!r}"):
            import_webdataset(src, tmp_path / "ws", name, **kw)
        info = import_webdataset(src, tmp_path / "ws", name, on_error="skip", **kw)
        assert info.rows == 2 and info.extra["skipped_at_import"] == 1
        assert "k01" not in read_metadata(info.shards[0]).column("key").to_pylist()


# --------------------------------------------------------------------------- 13: COCO image id used twice

def test_coco_repeated_image_id_is_refused_or_counted(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i, f in enumerate(("a.jpg", "b.jpg", "c.jpg")):
        (imgs / f).write_bytes(image_bytes(i))
    (tmp_path / "c.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "c.jpg"}, {"id": "1", "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 2, "caption": "two"}]}))
    with pytest.raises(ShardError, match=r"images\[0\], images\[2\] share the id '1'"):
        import_coco(tmp_path / "c.json", imgs, tmp_path / "ws", "c")
    info = import_coco(tmp_path / "c.json", imgs, tmp_path / "ws", "c", on_error="skip")
    t = read_metadata(info.shards[0])
    assert t.column("caption").to_pylist() == ["two"] and info.extra["skip_reasons"] == {"repeated image id": 1}
    (tmp_path / "n.json").write_text(json.dumps({"images": [{"id": 1, "file_name": None}], "annotations": []}))
    with pytest.raises(ShardError, match=r"images\[0\] \(id 1\): file_name None is not a file name"):
        import_coco(tmp_path / "n.json", imgs, tmp_path / "ws", "n")


# --------------------------------------------------------------------------- 14: sql resource flags

@pytest.mark.parametrize("size,why", [("-1", "not a size"), ("-1GB", "not a size"), ("1KB", "below the minimum"),
                                      ("0MB", "below the minimum"), ("abc", "not a size")])
def test_sql_memory_limit_is_validated(pair_root, capsys, size, why):
    with pytest.raises(SqlError, match=why):
        Limits.for_machine(size)
    assert _cli(pair_root, "sql", "select count(*) from pairs", f"--memory-limit={size}") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: memory limit {size!r}") and err.count("\n") == 1
    assert Limits.for_machine("64MB").memory_limit == "64MB"


def test_sql_max_rows_and_threads_are_validated(pair_root, capsys):
    assert _cli(pair_root, "sql", "select 1", "--max-rows", "-1") == 2
    assert "--max-rows must be >= 1" in capsys.readouterr().err
    assert _cli(pair_root, "sql", "select 1", "--threads", "0") == 1
    assert "threads must be an integer >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- 16: _dataset.json, pipes, --out

@pytest.mark.parametrize("edit,why", [
    ({"format_version": 99}, "'format_version' is 99"),
    ({"rows": "abc"}, "'rows' is 'abc', want an integer"),
    ({"rows": 1e30}, "'rows' is 1e\\+30, want an integer"),
    ({"rows": 11}, "'rows' is 11, but its shards hold 10"),
    ({"name": "tiny\nfake line"}, "control characters"),
])
def test_dataset_json_quirks_are_named(pair_root, edit, why):
    folder = pair_root / "datasets" / "tiny"
    doc = json.loads((folder / DATASET_FILE).read_text())
    (folder / DATASET_FILE).write_text(json.dumps({**doc, **edit}))
    with pytest.raises(ShardError, match=rf"{folder / DATASET_FILE}: .*{why}"):
        load_dataset(folder)
    assert inspect_path(folder)["problems"]


def test_names_with_control_characters_are_refused():
    for bad in ("a\nb", "a\tb", "x\x1b[31m", "a\x7f"):
        with pytest.raises(ValueError, match="control characters"):
            check_name(bad)
    assert check_name("ünï cödé/ok name") == "ünï cödé/ok name"


def test_sql_into_a_closed_pipe_exits_quietly(pair_root):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "flows.cli", "--root", str(pair_root), "sql",
                          "select * from pairs a, pairs b, pairs c", "--format", "csv"],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().startswith(b"dataset,")
    p.stdout.close()  # as `| head -1` does: 1000 rows (~450 kB) cannot all fit in the pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) in (0, 141) and "Traceback" not in err and "Broken pipe" not in err, err


def test_sql_out_into_a_missing_folder_is_refused(pair_root, tmp_path, capsys):
    out = tmp_path / "nodir" / "x.csv"
    assert _cli(pair_root, "sql", "select 1 AS x", "--out", str(out), "--format", "csv") == 1
    assert f"its folder {out.parent} does not exist" in capsys.readouterr().err
    assert not out.parent.exists()
    with stream_query(pair_root, "select 1 AS x") as q, pytest.raises(FileNotFoundError, match="does not exist"):
        write_result(q, "csv", out)
