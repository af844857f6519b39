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
    assert len(list(iter_samples(ref, decode=True))) == 4  # still decodes: only the checksum can tell
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
