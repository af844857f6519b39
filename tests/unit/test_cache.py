"""Embedding cache: file format, manifest, reading back, zipping with pairs, verification."""
from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.cache import (MANIFEST_FILE, CacheError, CacheWriter, ModelMeta, cache_dir, encode_table, read_cache_shard,
                           read_manifest, verify_cache, write_table)
from storage.shards import list_shards, read_metadata, write_shards
from tests.conftest import samples

D = 8
META = ModelMeta("ref", "fp-ref", D, 10.0, -10.0)
META_T = ModelMeta("teacher", "fp-teacher", 4, 1 / 0.07, 0.0)


def _emb(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _fill(root, meta=META, dataset="tiny", dtype="float16", seed=0):
    w = CacheWriter(root / "cache", dataset, meta, dtype=dtype)
    for ref in list_shards(root / "datasets" / dataset):
        uids = read_metadata(ref).column("uid").to_pylist()
        w.write_shard(ref, uids, _emb(ref.rows, meta.dim, seed + int(ref.name)), _emb(ref.rows, meta.dim, 100 + int(ref.name)))
    return w


def test_file_format_and_manifest(pair_root):
    _fill(pair_root)
    folder = cache_dir(pair_root, "ref", "tiny")
    ref = list_shards(pair_root / "datasets" / "tiny")[0]
    pf = pq.ParquetFile(folder / "00000000.parquet")
    schema = pf.schema_arrow
    assert schema.field("image_emb").type == pa.list_(pa.float16(), D)
    assert schema.field("text_emb").type == pa.list_(pa.float16(), D)
    kv = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert kv["model_id"] == "ref" and kv["fingerprint"] == "fp-ref" and kv["dim"] == str(D)
    assert float(kv["logit_scale"]) == 10.0 and float(kv["logit_bias"]) == -10.0 and kv["dtype"] == "float16"
    assert kv["source_sha256"] == ref.sha256 and kv["created"]
    assert pf.metadata.num_rows == ref.rows
    doc = json.loads((folder / MANIFEST_FILE).read_text())
    assert (doc["model_id"], doc["fingerprint"], doc["dim"], doc["dtype"]) == ("ref", "fp-ref", D, "float16")
    assert list(doc["shards"]) == ["00000000", "00000001", "00000002"]
    assert doc["shards"]["00000000"]["rows"] == 4 and doc["shards"]["00000000"]["source_sha256"] == ref.sha256


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-3), ("float32", 0.0)])
def test_read_back_is_aligned_and_checked(pair_root, dtype, tol):
    _fill(pair_root, dtype=dtype)
    ref = list_shards(pair_root / "datasets" / "tiny")[1]
    c = read_cache_shard(cache_dir(pair_root, "ref", "tiny"), ref, expect=META)
    assert c.uids == read_metadata(ref).column("uid").to_pylist()
    assert c.image_emb.dtype == np.float32 and c.image_emb.shape == (ref.rows, D)
    np.testing.assert_allclose(c.image_emb, _emb(ref.rows, D, 1), atol=tol)
    np.testing.assert_allclose(c.text_emb, _emb(ref.rows, D, 101), atol=tol)
    assert c.meta == META


def test_done_tracks_manifest_file_and_source(pair_root):
    w = _fill(pair_root)
    refs = list_shards(pair_root / "datasets" / "tiny")
    assert w.done("00000000") and w.done(refs[0]) and not w.done("00000007")
    from dataclasses import replace
    assert not w.done(replace(refs[0], sha256="0" * 64))  # the pair shard changed since
    (w.folder / "00000001.parquet").write_bytes(b"garbage")
    assert not w.done("00000001")


def test_writer_checks_uids_shape_and_owner(pair_root):
    ref = list_shards(pair_root / "datasets" / "tiny")[0]
    uids = read_metadata(ref).column("uid").to_pylist()
    w = CacheWriter(pair_root / "cache", "tiny", META)
    with pytest.raises(CacheError, match=r"row 0: uid .* differs"):
        w.write_shard(ref, uids[::-1], _emb(4, D, 0), _emb(4, D, 1))
    with pytest.raises(CacheError, match="3 uids given"):
        w.write_shard(ref, uids[:3], _emb(3, D, 0), _emb(3, D, 1))
    with pytest.raises(CacheError, match=r"image_emb has shape \(4, 9\), want \(4, 8\)"):
        w.write_shard(ref, uids, _emb(4, 9, 0), _emb(4, D, 1))
    w.write_shard(ref, uids, _emb(4, D, 0), _emb(4, D, 1))
    with pytest.raises(CacheError, match="fingerprint is 'fp-ref', this writer has 'other'"):
        CacheWriter(pair_root / "cache", "tiny", ModelMeta("ref", "other", D, 10.0, -10.0))
    with pytest.raises(CacheError, match="dtype"):
        CacheWriter(pair_root / "cache", "tiny", META, dtype="float32")


def test_two_models_read_back_aligned_with_the_pair_shard(pair_root):
    """What the trainer does per shard (pipeline/data.py): one read_cache_shard per model, rows in shard order."""
    _fill(pair_root)
    _fill(pair_root, META_T, seed=50)
    ref = list_shards(pair_root / "datasets" / "tiny")[2]
    uids = read_metadata(ref).column("uid").to_pylist()
    r = read_cache_shard(cache_dir(pair_root, "ref", "tiny"), ref, expect=META)
    t = read_cache_shard(cache_dir(pair_root, "teacher", "tiny"), ref)
    assert r.uids == t.uids == uids and t.image_emb.shape == (2, 4) and t.meta.logit_scale == pytest.approx(1 / 0.07)
    np.testing.assert_allclose(t.image_emb, _emb(2, 4, 52), atol=1e-3)
    with pytest.raises(CacheError, match="written by another model"):
        read_cache_shard(cache_dir(pair_root, "teacher", "tiny"), ref, expect=META)


def test_verify_ok_then_each_problem_is_named(pair_root):
    _fill(pair_root)
    rep = verify_cache(pair_root)
    assert rep.ok and rep.shards == 3 and rep.rows == 10, rep.format()
    folder = cache_dir(pair_root, "ref", "tiny")
    # an extra file, a missing shard, and a file whose uid order differs (manifest updated to match it)
    (folder / "00000009.parquet").write_bytes(b"x")
    doc = read_manifest(folder)
    del doc["shards"]["00000002"]
    (folder / "00000002.parquet").unlink()
    ref = list_shards(pair_root / "datasets" / "tiny")[0]
    uids = read_metadata(ref).column("uid").to_pylist()
    kv = pq.read_schema(folder / "00000000.parquet").metadata
    table = encode_table(uids[::-1], _emb(4, D, 0), _emb(4, D, 1), dim=D, dtype="float16",
                         kv={k.decode(): v.decode() for k, v in kv.items()})
    write_table(table, folder / "00000000.parquet")
    from storage.atomic import atomic_write_json, sha256_file
    doc["shards"]["00000000"]["sha256"] = sha256_file(folder / "00000000.parquet")
    atomic_write_json(folder / MANIFEST_FILE, doc)
    rep = verify_cache(pair_root, "ref")
    text = "\n".join(rep.problems)
    assert not rep.ok
    assert "00000009.parquet: not in the manifest" in text
    assert "tiny/00000002 has no cache entry in the manifest (missing)" in text
    assert f"00000000.parquet: row 0: uid {uids[-1]} differs" in text
    assert len(rep.problems) == 3, rep.format()


def test_verify_flags_fingerprint_change_between_datasets(pair_root):
    write_shards(samples(3, start=50), pair_root / "datasets" / "more", name="more", source="t")
    _fill(pair_root)
    _fill(pair_root, ModelMeta("ref", "fp-CHANGED", D, 10.0, -10.0), dataset="more")
    rep = verify_cache(pair_root)
    assert any("different fingerprints" in p for p in rep.problems), rep.format()
    assert verify_cache(pair_root, "nope").problems[0].endswith("no cache for model nope")


def test_concurrent_writers_keep_every_manifest_entry(pair_root):
    refs = list_shards(pair_root / "datasets" / "tiny")
    errors = []

    def work(ref):
        try:
            w = CacheWriter(pair_root / "cache", "tiny", META)
            w.write_shard(ref, read_metadata(ref).column("uid").to_pylist(), _emb(ref.rows, D, 0), _emb(ref.rows, D, 1))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in refs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert list(read_manifest(cache_dir(pair_root, "ref", "tiny"))["shards"]) == [r.name for r in refs]


def test_float16_bytes_per_sample_at_d512(tmp_path):
    """Goal from the issue: <= 1.1 x (2 x 512 x 2 bytes + 32-char uid) per sample and model."""
    n, d = 1000, 512
    uids = [f"{i:032x}" for i in range(n)]
    table = encode_table(uids, _emb(n, d, 0), _emb(n, d, 1), dim=d, dtype="float16", kv={"model_id": "m"})
    write_table(table, tmp_path / "c.parquet")
    per = (tmp_path / "c.parquet").stat().st_size / n
    assert per <= 1.1 * (2 * d * 2 + 32), per
