"""Issue 9, verification slice: checks that name what is wrong and exit non-zero, one checker for cache
reading and `aced cache verify`, datasets that must match their files, shard checksums checked where the
bytes are used (training, caching), labels that come from the data, bounded SQL, leftover temp files."""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch

from storage.cache import CacheError, CacheWriter, ModelMeta, cache_dir, read_cache_shard, verify_cache
from storage.shards import (DATASET_FILE, ShardError, iter_samples, list_shards, load_dataset, read_metadata,
                            tar_sha256, write_shards)
from tests.conftest import samples

D = 4
META = ModelMeta("ref", "fp", D, 10.0, -10.0)


def _cache_all(root, dataset="tiny"):
    w = CacheWriter(root / "cache", dataset, META)
    for ref in list_shards(root / "datasets" / dataset):
        x = np.random.default_rng(int(ref.name)).standard_normal((ref.rows, D)).astype(np.float32)
        w.write_shard(ref, read_metadata(ref).column("uid").to_pylist(), x, -x)
    return w


def _flip_a_bit_in_an_image(ref) -> None:
    """Flip one bit in the middle of the first JPEG's entropy-coded data: the image still decodes."""
    victim = next(s for s in samples(10) if s.uid in read_metadata(ref).column("uid").to_pylist())
    data = bytearray(ref.tar_path.read_bytes())
    at = bytes(data).index(victim.image_bytes) + len(victim.image_bytes) // 2
    data[at] ^= 0x01
    ref.tar_path.write_bytes(bytes(data))


def _cli(root, *argv) -> int:
    from flows import cmd_data, cmd_flows

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    cmd_data.add_commands(sub)
    cmd_flows.add_commands(sub)
    args = parser.parse_args(list(argv))
    args.root = root
    return args.func(args)


# --------------------------------------------------------------------------- 2, 3: cache verify = the reader's check

def test_cache_verify_fails_when_the_pair_tar_changed_after_caching(pair_root, capsys):
    w = _cache_all(pair_root)
    assert _cli(pair_root, "cache", "verify") == 0
    ref = list_shards(pair_root / "datasets" / "tiny")[1]
    _flip_a_bit_in_an_image(ref)  # _dataset.json and the cache still record the old checksum
    assert _cli(pair_root, "cache", "verify") == 1
    out = capsys.readouterr().out
    assert f"{w.folder / '00000001.parquet'}: its pair shard changed after caching" in out
    assert f"sha256 is {tar_sha256(ref)}, but" in out and ref.sha256 in out
    with pytest.raises(CacheError, match="its pair shard changed after caching"):
        read_cache_shard(w.folder, ref, expect=META)  # the trainer's reader says the same


def test_reader_and_verify_share_one_checker(pair_root, monkeypatch):
    import storage.cache as cache_mod
    import storage.runlog as runlog_mod

    w = _cache_all(pair_root)
    ref = list_shards(pair_root / "datasets" / "tiny")[0]
    calls = []
    real = cache_mod.check_cache_shard
    monkeypatch.setattr(cache_mod, "check_cache_shard", lambda *a, **k: calls.append(a[2].name) or real(*a, **k))
    read_cache_shard(w.folder, ref)
    assert verify_cache(pair_root).ok
    assert calls == ["00000000", "00000000", "00000001", "00000002"]
    assert not hasattr(cache_mod, "zip_caches") and not hasattr(cache_mod, "_verify_shard")
    assert not hasattr(runlog_mod.ParquetLog, "read")


# --------------------------------------------------------------------------- 5: labels come from the data

def test_swapped_metadata_parquet_files_are_refused(pair_root):
    folder = pair_root / "datasets" / "tiny"
    refs = list_shards(folder)
    a, b = refs[0].meta_path, refs[1].meta_path  # same row count (4), so only the label tells
    tmp = folder / "swap"
    os.replace(a, tmp), os.replace(b, a), os.replace(tmp, b)
    with pytest.raises(ShardError, match=rf"{a}: holds the metadata of shard 00000001 .* not of shard 00000000"):
        read_metadata(refs[0])


def test_swapped_cache_files_are_refused_by_reader_and_verify(pair_root):
    w = _cache_all(pair_root)
    refs = list_shards(pair_root / "datasets" / "tiny")
    a, b = w.folder / "00000000.parquet", w.folder / "00000001.parquet"
    doc = json.loads((w.folder / "_manifest.json").read_text())
    tmp = w.folder / "swap"
    os.replace(a, tmp), os.replace(b, a), os.replace(tmp, b)
    # the manifest is made to agree with the swapped files: only their content can tell
    doc["shards"]["00000000"]["sha256"], doc["shards"]["00000001"]["sha256"] = (doc["shards"]["00000001"]["sha256"],
                                                                              doc["shards"]["00000000"]["sha256"])
    (w.folder / "_manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CacheError, match=r"00000000\.parquet: holds the embeddings of shard '00000001'"):
        read_cache_shard(w.folder, refs[0])
    assert any("00000001.parquet: holds the embeddings of shard '00000000'" in p for p in verify_cache(pair_root).problems)


# --------------------------------------------------------------------------- 6: checksums where the bytes are used

def test_training_refuses_a_flipped_bit_that_still_decodes(pair_root):
    from pipeline.data import PairIndex, SuperBatches

    ref = list_shards(pair_root / "datasets" / "tiny")[0]
    _flip_a_bit_in_an_image(ref)
    assert len(list(iter_samples(ref, decode=True, check_sha256=False))) == 4  # still decodes: only the checksum can tell
    index = PairIndex([pair_root / "datasets" / "tiny"])
    sb = SuperBatches(index, size=10, seed=0, window=3, preprocess=lambda im: torch.zeros(3, 2, 2),
                      tokenizer=lambda caps: torch.zeros(len(caps), 3, dtype=torch.long), on_bad_sample="skip")
    with pytest.raises(ShardError, match=rf"{ref.tar_path}: sha256 is {tar_sha256(ref)}, but .*{ref.sha256}"):
        sb[0]


def test_caching_refuses_a_flipped_bit_that_still_decodes(pair_root):
    from pipeline.ray_embed import PlanItem, _shard_chunks

    ref = list_shards(pair_root / "datasets" / "tiny")[2]
    assert len(list(_shard_chunks(PlanItem("tiny", ref, ("ref",)), 8))) == 1
    _flip_a_bit_in_an_image(ref)
    with pytest.raises(ShardError, match=rf"{ref.tar_path}: sha256 is .* records {ref.sha256} for shard 00000002"):
        list(_shard_chunks(PlanItem("tiny", ref, ("ref",)), 8))


def test_tar_checksum_is_memoised_per_file_version(pair_root, monkeypatch):
    import storage.shards as shards_mod

    ref = list_shards(pair_root / "datasets" / "tiny")[0]
    hashed = []
    real = shards_mod.sha256_file
    monkeypatch.setattr(shards_mod, "sha256_file", lambda p: hashed.append(p) or real(p))
    shards_mod._tar_sha256.cache_clear()
    for _ in range(3):
        shards_mod.check_tar_sha256(ref)
    assert len(hashed) == 1
    st = ref.tar_path.stat()
    os.utime(ref.tar_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new file version is hashed again
    shards_mod.check_tar_sha256(ref)
    assert len(hashed) == 2


# --------------------------------------------------------------------------- 7: a dataset matches its files

def test_shard_removed_from_the_listing_is_an_error_for_every_reader(pair_root):
    from pipeline.data import PairIndex

    folder = pair_root / "datasets" / "tiny"
    doc = json.loads((folder / DATASET_FILE).read_text())
    del doc["shards"][1]
    (folder / DATASET_FILE).write_text(json.dumps(doc))
    with pytest.raises(ShardError, match=r"does not list files present in .*: 00000001\.parquet, 00000001\.tar"):
        list_shards(folder)
    with pytest.raises(ShardError, match="00000001.tar"):
        PairIndex([folder])
    load_dataset(folder, check_files=False)  # inspect reads the listing alone, then reports the difference


def test_listed_shard_with_a_missing_file_is_an_error(pair_root):
    folder = pair_root / "datasets" / "tiny"
    (folder / "00000002.tar").unlink()
    with pytest.raises(ShardError, match=rf"{folder / DATASET_FILE}: lists files that are missing: .*00000002\.tar"):
        list_shards(folder)


@pytest.mark.parametrize("mutate,why", [
    (lambda d: "{not json", "unreadable"),
    (lambda d: {k: v for k, v in d.items() if k != "shards"}, "malformed: no 'shards'"),
    (lambda d: {**d, "shards": [{**d["shards"][0], "rows": "4"}] + d["shards"][1:]}, r"rows is '4', want an integer"),
    (lambda d: {**d, "shards": [{**d["shards"][0], "sha256": 5}] + d["shards"][1:]}, "sha256 is 5"),
    (lambda d: {**d, "name": ["tiny"]}, "'name' is a list, want a str"),
    (lambda d: [d], "top level is a list"),
])
def test_broken_dataset_json_when_training_is_a_named_error(pair_root, mutate, why):
    from pipeline.data import PairIndex

    path = pair_root / "datasets" / "tiny" / DATASET_FILE
    new = mutate(json.loads(path.read_text()))
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(ShardError, match=rf"{path}: .*{why}"):
        PairIndex([path.parent])


# --------------------------------------------------------------------------- 1, 9: inspect fails on problems, names leftovers

def test_inspect_verify_exits_1_when_it_finds_a_problem(pair_root, capsys):
    folder = pair_root / "datasets" / "tiny"
    assert _cli(pair_root, "inspect", str(folder), "--verify") == 0
    ref = list_shards(folder)[0]
    _flip_a_bit_in_an_image(ref)
    assert _cli(pair_root, "inspect", str(folder), "--verify") == 1
    captured = capsys.readouterr()
    assert f"{ref.tar_path}: sha256 is" in captured.out and "1 problem(s) found" in captured.err


def test_inspect_reports_leftover_temp_files_and_folders(pair_root, capsys):
    _cache_all(pair_root)
    assert _cli(pair_root, "inspect") == 0
    capsys.readouterr()
    folders = [pair_root / "datasets" / ".tiny.0123456789ab.tmp",               # an interrupted re-import
               pair_root / "runs" / "r" / "checkpoints" / ".00000010.0123456789ab.tmp",  # a killed checkpoint write
               pair_root / "runs" / "r" / "checkpoints" / ".tmp-step-00000010-4242"]     # ... by the older writer
    files = [pair_root / "datasets" / "tiny" / ".00000001.tar.ab12.tmp",            # an interrupted atomic write
             pair_root / "cache" / "ref" / "tiny" / ".00000000.parquet.cd34.tmp"]
    for p in folders:
        p.mkdir(parents=True)
        (p / "part").write_bytes(b"x")
    for p in files:
        p.write_bytes(b"partial")
    leftovers = folders + files
    assert _cli(pair_root, "inspect", "--json") == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    for p in leftovers:
        assert sum(x.startswith(f"{p}: leftover temporary") for x in problems) == 1, (p, problems)
    assert len(problems) == len(leftovers), problems
    assert _cli(pair_root, "inspect", str(pair_root / "datasets" / "tiny")) == 1
    out = capsys.readouterr().out
    assert str(folders[0]) in out and str(files[0]) in out  # its own leftovers and its interrupted re-import


# --------------------------------------------------------------------------- 4, 5: SQL is complete, or refuses

def test_sql_fails_naming_a_missing_file_unless_allow_missing(pair_root, capsys):
    w = _cache_all(pair_root)
    missing = list_shards(pair_root / "datasets" / "tiny")[1].meta_path
    missing.unlink()
    (w.folder / "00000002.parquet").unlink()
    assert _cli(pair_root, "sql", "select count(*) AS n from pairs") == 1
    err = capsys.readouterr().err
    assert str(missing) in err and str(w.folder / "00000002.parquet") in err and "--allow-missing" in err
    assert _cli(pair_root, "sql", "select count(*) AS n from pairs", "--allow-missing", "--format", "csv") == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["n", "6"]
    assert f"left out of the views (--allow-missing): dataset tiny: " in captured.err and str(missing) in captured.err


def test_sql_shard_label_comes_from_the_data_and_swaps_are_refused(pair_root, capsys):
    from storage.sql import IncompleteViews, run_query

    assert run_query(pair_root, "select shard, min(key) AS k from pairs group by 1 order by 1").to_pylist() == [
        {"shard": "00000000", "k": "00000000"}, {"shard": "00000001", "k": "00000004"},
        {"shard": "00000002", "k": "00000008"}]
    folder = pair_root / "datasets" / "tiny"
    a, b = folder / "00000000.parquet", folder / "00000001.parquet"
    tmp = folder / "swap"
    os.replace(a, tmp), os.replace(b, a), os.replace(tmp, b)
    with pytest.raises(IncompleteViews, match=rf"{a}: holds the metadata of shard 00000001"):
        run_query(pair_root, "select shard, min(key) from pairs group by 1")
    assert _cli(pair_root, "sql", "select shard, count(*) AS n from pairs group by 1", "--allow-missing",
                "--format", "csv") == 0
    assert capsys.readouterr().out.splitlines() == ["shard,n", "00000002,2"]  # the swapped pair is left out


# --------------------------------------------------------------------------- 8: bounded SQL

@pytest.fixture
def big_root(tmp_path):
    root = tmp_path / "ws"
    write_shards(samples(200), root / "datasets" / "big", name="big", source="t", samples_per_shard=100)
    return root


def test_sql_memory_limit_stops_a_runaway_cross_join_with_a_clear_error(big_root, capsys):
    import time

    t0 = time.perf_counter()
    rc = _cli(big_root, "sql", "select string_agg(a.caption || b.caption || c.caption, ',') from pairs a, pairs b, pairs c",
              "--memory-limit", "64MB", "--threads", "1")
    assert rc == 1 and time.perf_counter() - t0 < 20
    err = capsys.readouterr().err
    assert err.startswith("error: query needs more than 64MB of memory;") and "Traceback" not in err
    # a cross join printed as a table stops fetching after --max-rows: fast, whatever the result's size
    t0 = time.perf_counter()
    assert _cli(big_root, "sql", "select * from pairs a, pairs b, pairs c", "--memory-limit", "64MB",
                "--max-rows", "5") == 0
    out = capsys.readouterr().out
    assert time.perf_counter() - t0 < 20 and "(first 5 rows shown; more not fetched" in out and len(out.splitlines()) == 8


def test_sql_limits_and_spill_folder_come_from_the_machine_not_the_cwd(pair_root, tmp_path, monkeypatch):
    from storage.sql import Limits, open_views

    monkeypatch.chdir(tmp_path)
    lim = Limits.for_machine()
    assert lim.threads == len(os.sched_getaffinity(0))
    mib = int(lim.memory_limit.removesuffix("MiB"))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    assert 64 <= mib <= total // 2 + 1
    con = open_views(pair_root, limits=Limits("100MB", 1))
    try:
        temp, mem, threads = con.execute("select current_setting('temp_directory'), current_setting('memory_limit'), "
                                         "current_setting('threads')").fetchone()
    finally:
        con.close()
    assert os.path.isabs(temp) and not temp.startswith(str(tmp_path)) and threads == 1
    assert mem.replace(" ", "").upper().startswith(("95.3MIB", "100.0MB", "100MB")), mem
    assert not (tmp_path / ".tmp").exists()


def test_sql_results_stream_to_the_writer(big_root, tmp_path):
    """1M rows of CSV (100 MB) under a 64 MB DuckDB limit, in a fresh process: the peak memory stays far
    below what materialising the result (Arrow table + Python rows + rendered text: ~640 MB here) takes."""
    import subprocess
    import sys

    # peak RSS from /proc (VmHWM, in kB): getrusage's ru_maxrss would carry over pytest's across fork+exec
    code = ("import re, sys; from flows.cli import main; rc = main(sys.argv[1:]); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print(int(hwm) // 1024, file=sys.stderr); sys.exit(rc)")
    q = ("select a.uid, b.uid, c.uid from pairs a, pairs b, pairs c "
         "where a.key < '00000100' and b.key < '00000100' and c.key < '00000100'")
    out = tmp_path / "out.csv"
    p = subprocess.run([sys.executable, "-c", code, "--root", str(big_root), "sql", q, "--memory-limit", "64MB",
                        "--format", "csv", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "1000000 rows ->" in p.stderr and out.stat().st_size > 90e6
    assert int(p.stderr.strip().splitlines()[-1]) < 450, p.stderr
    # an existing output is replaced only with --overwrite
    assert _cli(big_root, "sql", "select 1", "--out", str(out)) == 1
    assert out.stat().st_size > 90e6


def test_aced_train_on_a_dataset_missing_a_file_is_one_line_naming_it(pair_root, capsys):
    from flows.cli import main

    missing = pair_root / "datasets" / "tiny" / "00000001.parquet"
    missing.unlink()
    assert main(["--root", str(pair_root), "train", "r1", "--recipe", "tiny", "--data", "tiny", "--steps", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("aced train: error: ") and f"lists files that are missing: {missing}" in err[-1]
    assert not any("Traceback" in line for line in err)
