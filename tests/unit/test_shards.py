"""Pair shards: uids, the tar + Parquet layout, `_dataset.json`, reading back, atomic dataset writes."""
from __future__ import annotations

import json
import tarfile
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from storage.atomic import atomic_path, atomic_write_json, sha256_file
from storage.shards import (METADATA_SCHEMA, Sample, ShardError, find_datasets, iter_samples, list_shards,
                            load_dataset, make_uid, read_metadata, write_shards)
from tests.conftest import image_bytes, samples


def test_make_uid_is_deterministic_hex_and_separates_fields():
    u = make_uid("flickr8k", "123_abc", "A dog runs .", 0)
    assert u == make_uid("flickr8k", "123_abc", "A dog runs .", 0)
    assert len(u) == 32 and int(u, 16) >= 0 and u == u.lower()
    others = {make_uid("flickr8k", "123_abc", "A dog runs .", 1), make_uid("coco", "123_abc", "A dog runs .", 0),
              make_uid("flickr8k", "123_abd", "A dog runs .", 0), make_uid("flickr8k", "123_abc", "A dog runs", 0)}
    assert u not in others and len(others) == 4
    # no separator ambiguity: moving a boundary changes the uid
    assert make_uid("a,b", "c", "d", 0) != make_uid("a", "b,c", "d", 0)


def test_write_and_read_round_trip(tmp_path):
    src = samples(10)
    out = tmp_path / "datasets" / "tiny"
    info = write_shards(src, out, name="tiny", source="unit test", samples_per_shard=4)
    assert [s.name for s in info.shards] == ["00000000", "00000001", "00000002"]
    assert [s.rows for s in info.shards] == [4, 4, 2] and info.rows == 10
    doc = json.loads((out / "_dataset.json").read_text())
    assert doc["name"] == "tiny" and doc["source"] == "unit test" and doc["created"]
    for entry, ref in zip(doc["shards"], list_shards(out)):
        assert entry == {"name": ref.name, "rows": ref.rows, "sha256": ref.sha256}
        assert sha256_file(ref.tar_path) == ref.sha256
    back = [s for ref in list_shards(out) for s in iter_samples(ref, decode=True)]
    assert back == src  # every field, image bytes untouched, order kept
    meta = read_metadata(list_shards(out)[0])
    assert meta.schema.equals(METADATA_SCHEMA, check_metadata=False)
    assert meta.column("uid").to_pylist() == [s.uid for s in src[:4]]


def test_tar_is_webdataset_layout(pair_root):
    ref = list_shards(pair_root / "datasets" / "tiny")[0]
    with tarfile.open(ref.tar_path) as tf:
        names = tf.getnames()
        assert names[:3] == ["00000000.jpg", "00000000.txt", "00000000.json"]
        assert len(names) == 3 * ref.rows
        meta = json.loads(tf.extractfile("00000000.json").read())
        assert tf.extractfile("00000000.txt").read().decode() == meta["caption"]
    assert len(meta["uid"]) == 32 and set(meta) == set(METADATA_SCHEMA.names)


def test_rewrite_gives_identical_bytes(tmp_path):
    a = write_shards(samples(6), tmp_path / "a", name="a", source="s", samples_per_shard=4)
    b = write_shards(samples(6), tmp_path / "b", name="a", source="s", samples_per_shard=4)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_existing_dataset_needs_overwrite_and_failed_write_keeps_it(tmp_path):
    out = tmp_path / "d"
    first = write_shards(samples(5), out, name="d", source="s", samples_per_shard=2)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(samples(3), out, name="d", source="s")

    def crashing():
        yield from samples(4)
        raise RuntimeError("producer crashed")

    with pytest.raises(RuntimeError, match="producer crashed"):
        write_shards(crashing(), out, name="d", source="s", samples_per_shard=2, overwrite=True)
    assert load_dataset(out).shards == first.shards  # old dataset untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folder left
    new = write_shards(samples(3, start=100), out, name="d", source="s", overwrite=True)
    assert new.rows == 3 and sorted(p.name for p in out.iterdir()) == ["00000000.parquet", "00000000.tar", "_dataset.json"]


def test_png_kept_as_png_member(tmp_path):
    png = image_bytes(1, (8, 8), fmt="PNG")
    s = Sample(key="k1", uid=make_uid("s", "i", "c", 0), image_bytes=png, caption="c", image_id="i",
               width=8, height=8, source="s", label=3)
    info = write_shards([s], tmp_path / "p", name="p", source="s")
    with tarfile.open(info.shards[0].tar_path) as tf:
        assert tf.getnames()[0] == "k1.png"
    (back,) = list(iter_samples(info.shards[0]))
    assert back.image_bytes == png and back.label == 3 and back.noisy is None


def test_find_datasets_nested_names_skip_hidden(tmp_path):
    root = tmp_path / "datasets"
    write_shards(samples(2), root / "f" / "train", name="f/train", source="s")
    write_shards(samples(2), root / "f" / "test", name="f/test", source="s")
    write_shards(samples(2), root / "g", name="g", source="s")
    (root / ".hidden.tmp").mkdir()
    atomic_write_json(root / ".hidden.tmp" / "_dataset.json", {})
    assert list(find_datasets(root)) == ["f/test", "f/train", "g"]


def test_invalid_samples_raise_or_skip(tmp_path):
    good = samples(3)
    bad_key = Sample(**{**good[0].__dict__, "key": "a.b", "uid": make_uid("x", "y", "z", 9)})
    with pytest.raises(ShardError, match=r"key='a\.b'.*bad key"):
        write_shards([good[1], bad_key], tmp_path / "x", name="x", source="s")
    wrong_size = Sample(**{**good[0].__dict__, "width": 99})
    with pytest.raises(ShardError, match="image is 16x12 but the sample says 99x12"):
        write_shards([wrong_size], tmp_path / "x", name="x", source="s")
    info = write_shards([good[0], bad_key, good[1], wrong_size, good[2]], tmp_path / "y", name="y", source="s",
                        on_error="skip")
    assert info.rows == 3 and info.skipped == 2
    assert json.loads((tmp_path / "y" / "_dataset.json").read_text())["skipped"] == 2


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise ValueError("boom")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_metadata_parquet_records_tar_checksum(pair_root):
    ref = list_shards(pair_root / "datasets" / "tiny")[1]
    kv = pq.read_schema(ref.meta_path).metadata
    assert kv[b"aced.tar_sha256"].decode() == ref.sha256 and kv[b"aced.shard"] == b"00000001"


def test_nothing_to_write_is_an_error(tmp_path):
    with pytest.raises(ShardError, match="no samples to write"):
        write_shards([], tmp_path / "e", name="e", source="s")
    bad = replace(samples(1)[0], caption=" ")
    with pytest.raises(ShardError, match=r"no samples to write \(all 1 skipped\)"):
        write_shards([bad], tmp_path / "e", name="e", source="s", on_error="skip")
    assert list(tmp_path.iterdir()) == []
