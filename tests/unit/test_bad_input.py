"""Bad input: every case gives a clear error naming the file and the sample, or (where asked) a
counted, logged skip; interrupted writes leave the previous files and manifest intact."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import storage.cache as cache_mod
from storage.cache import (CacheError, CacheWriter, ModelMeta, cache_dir, encode_table, read_cache_shard, read_manifest,
                           verify_cache, write_table)
from storage.importers import import_captions, import_webdataset
from storage.shards import Sample, ShardError, iter_samples, list_shards, read_metadata, write_shards
from tests.conftest import image_bytes, samples

D = 4
META = ModelMeta("ref", "fp", D, 10.0, -10.0)
REPO = Path(__file__).resolve().parents[2]


def _uids(ref):
    return read_metadata(ref).column("uid").to_pylist()


def _emb(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _cache_all(root, meta=META):
    w = CacheWriter(root / "cache", "tiny", meta)
    for ref in list_shards(root / "datasets" / "tiny"):
        w.write_shard(ref, _uids(ref), _emb(ref.rows, 1), _emb(ref.rows, 2))
    return w


def _folder(tmp_path, rows: list[list[str]], images: dict[str, bytes]) -> Path:
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    for name, data in images.items():
        (src / "images" / name).write_bytes(data)
    with open(src / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"]] + rows)
    return src


# --------------------------------------------------------------------------- importing

def test_undecodable_and_truncated_images(tmp_path):
    good = image_bytes(0)
    src = _folder(tmp_path, [["ok.jpg", "fine"], ["garbage.jpg", "x"], ["ok.jpg", "fine too"], ["cut.jpg", "y"]],
                  {"ok.jpg": good, "garbage.jpg": b"\xff\xd8\xff not really a jpeg", "cut.jpg": good[: len(good) // 2]})
    with pytest.raises(ShardError, match=r"garbage\.jpg: undecodable image .*captions\.csv:3"):
        import_captions(src, tmp_path / "ws", "d")
    out = import_captions(src, tmp_path / "ws", "d", on_error="skip")[""]
    assert out.rows == 2 and [s.caption for s in iter_samples(out.shards[0])] == ["fine", "fine too"]
    doc = json.loads((out.path / "_dataset.json").read_text())
    assert doc["skipped_at_import"] == 2 and doc["skip_reasons"] == {"bad image": 2}


def test_empty_or_missing_caption_and_missing_image(tmp_path):
    src = _folder(tmp_path, [["a.jpg", "fine"], ["a.jpg", "   "], ["a.jpg"], ["gone.jpg", "z"]], {"a.jpg": image_bytes(1)})
    with pytest.raises(ShardError, match=r"captions\.csv:3: image 'a\.jpg': empty or missing caption"):
        import_captions(src, tmp_path / "ws", "d")
    out = import_captions(src, tmp_path / "ws", "d", on_error="skip")[""]
    assert out.rows == 1 and out.extra["skip_reasons"] == {"missing image": 1}
    assert out.extra["skipped_rows_in_caption_table"] == 2
    assert out.extra["caption_table_skip_reasons"] == {"empty caption": 1, "wrong number of fields": 1}
    with pytest.raises(ShardError, match=r"gone\.jpg: missing image"):
        import_captions(_folder(tmp_path / "b", [["gone.jpg", "z"]], {}), tmp_path / "ws", "e")
    with pytest.raises(ShardError, match=r"key='00000000'.*empty or missing caption"):
        write_shards([replace(samples(1)[0], caption="")], tmp_path / "x", name="x", source="s")


def test_duplicate_uid(tmp_path):
    a, b = samples(2)
    dup = replace(b, uid=a.uid)
    with pytest.raises(ShardError, match=f"key='00000001'.*duplicate uid {a.uid} \\(already used by key '00000000'\\)"):
        write_shards([a, dup], tmp_path / "x", name="x", source="s")
    info = write_shards([a, dup], tmp_path / "y", name="y", source="s", on_error="skip")
    assert info.rows == 1 and info.skipped == 1
    # the same uid arriving from two webdataset shards
    write_shards([a], tmp_path / "w1", name="w1", source="s")
    (tmp_path / "w1" / "00000000.tar").rename(tmp_path / "w1" / "00000001.tar.bak")
    src = tmp_path / "wds"
    src.mkdir()
    for i in range(2):
        (src / f"0000{i}.tar").write_bytes((tmp_path / "w1" / "00000001.tar.bak").read_bytes())
    with pytest.raises(ShardError, match="duplicate uid"):
        import_webdataset(src, tmp_path / "ws", "web")


# --------------------------------------------------------------------------- reading shards

def test_truncated_tar(pair_root, tmp_path):
    ref = list_shards(pair_root / "datasets" / "tiny")[0]
    data = ref.tar_path.read_bytes()
    ref.tar_path.write_bytes(data[: len(data) // 2])  # cut inside sample 2 of 4
    with pytest.raises(ShardError, match=rf"{ref.tar_path}: sha256 is"):  # every reader checks the tar first
        list(iter_samples(ref, on_error="skip"))
    # without the checksum (inspect reports it separately), the cut is still found and named
    with pytest.raises(ShardError, match=rf"{ref.tar_path}: sample key='0000000[12]'"):
        list(iter_samples(ref, check_sha256=False))
    stats = {}
    got = list(iter_samples(ref, on_error="skip", stats=stats, check_sha256=False))
    assert len(got) + stats["skipped"] == 4 and 1 <= len(got) <= 2
    # the webdataset importer names the cut; the samples after it cannot be counted, so not even a skip
    src = tmp_path / "wds"
    src.mkdir()
    (src / "00000.tar").write_bytes(data[: len(data) // 2])
    for on_error in ("raise", "skip"):
        with pytest.raises(ShardError, match="truncated tar"):
            import_webdataset(src, tmp_path / "ws", "web", on_error=on_error)


def test_undecodable_image_inside_a_shard(pair_root):
    ref = list_shards(pair_root / "datasets" / "tiny")[1]
    victim = samples(10)[5]  # second sample of shard 1
    data = ref.tar_path.read_bytes()
    at = data.index(victim.image_bytes)
    ref.tar_path.write_bytes(data[:at] + b"NOPE" + data[at + 4:])
    with pytest.raises(ShardError, match=rf"{ref.tar_path}: sha256 is"):
        list(iter_samples(ref))
    with pytest.raises(ShardError, match=rf"{ref.tar_path}: sample key='00000005' uid={victim.uid}: undecodable image"):
        list(iter_samples(ref, check_sha256=False))
    stats = {}
    assert [s.key for s in iter_samples(ref, on_error="skip", stats=stats, check_sha256=False)] == \
        ["00000004", "00000006", "00000007"]
    assert stats["skipped"] == 1


def test_unreadable_parquet(pair_root):
    ref = list_shards(pair_root / "datasets" / "tiny")[0]
    ref.meta_path.write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(ShardError, match=rf"{ref.meta_path}: unreadable Parquet"):
        read_metadata(ref)
    with pytest.raises(ShardError, match="unreadable Parquet"):
        list(iter_samples(ref))


def test_unreadable_cache_parquet(pair_root):
    _cache_all(pair_root)
    folder = cache_dir(pair_root, "ref", "tiny")
    ref = list_shards(pair_root / "datasets" / "tiny")[0]
    (folder / "00000000.parquet").write_bytes(b"garbage")
    with pytest.raises(CacheError, match=r"00000000\.parquet: sha256 differs from the manifest"):
        read_cache_shard(folder, ref)
    with pytest.raises(CacheError, match=r"00000000\.parquet: unreadable Parquet"):
        read_cache_shard(folder, ref, check_file_sha=False)
    text = "\n".join(verify_cache(pair_root).problems)
    assert "00000000.parquet: sha256 differs" in text and "00000000.parquet: unreadable Parquet" in text


# --------------------------------------------------------------------------- embeddings

def test_embedding_dim_mismatch(pair_root):
    ref = list_shards(pair_root / "datasets" / "tiny")[0]
    w = CacheWriter(pair_root / "cache", "tiny", META)
    with pytest.raises(CacheError, match=r"text_emb has shape \(4, 5\), want \(4, 4\)"):
        w.write_shard(ref, _uids(ref), _emb(4), np.zeros((4, 5), np.float32))
    w.write_shard(ref, _uids(ref), _emb(4), _emb(4))
    with pytest.raises(CacheError, match=r"written by another model: .*'dim': \(8, 4\)"):
        read_cache_shard(w.folder, ref, expect=replace(META, dim=8))
    # a file whose width differs from the manifest's dim (written behind the writer's back)
    kv = {k.decode(): v.decode() for k, v in pq.read_schema(w.folder / "00000000.parquet").metadata.items()}
    kv["dim"] = "6"
    write_table(encode_table(_uids(ref), np.ones((4, 6)), np.ones((4, 6)), dim=6, dtype="float16", kv=kv),
                w.folder / "00000000.parquet")
    text = "\n".join(verify_cache(pair_root).problems)
    assert "00000000.parquet: dim 6 differs from the manifest's 4" in text
    assert "column image_emb has type fixed_size_list<element: halffloat>[6], want fixed_size_list<_, 4>" in text


def test_nan_inf_embeddings(pair_root):
    ref = list_shards(pair_root / "datasets" / "tiny")[0]
    uids = _uids(ref)
    w = CacheWriter(pair_root / "cache", "tiny", META)
    bad = _emb(4)
    bad[2, 1] = np.nan
    with pytest.raises(CacheError, match=rf"row 2 uid {uids[2]}: non-finite value in image_emb"):
        w.write_shard(ref, uids, bad, _emb(4))
    big = _emb(4)
    big[3, 0] = 1e6
    with pytest.raises(CacheError, match=rf"row 3 uid {uids[3]}: value overflows float16 in text_emb"):
        w.write_shard(ref, uids, _emb(4), big)
    assert not w.done(ref)
    # a file with inf that bypassed the writer: readers and verify name the row
    w.write_shard(ref, uids, _emb(4), _emb(4))
    kv = {k.decode(): v.decode() for k, v in pq.read_schema(w.folder / "00000000.parquet").metadata.items()}
    inf = _emb(4)
    inf[1, 3] = np.inf
    write_table(encode_table(uids, _emb(4), inf, dim=D, dtype="float16", kv=kv), w.folder / "00000000.parquet")
    with pytest.raises(CacheError, match=rf"row 1 uid {uids[1]}: non-finite value in text_emb"):
        read_cache_shard(w.folder, ref, check_file_sha=False)
    assert any(f"row 1 uid {uids[1]}: non-finite value in text_emb (1 row(s) in all)" in p
               for p in verify_cache(pair_root).problems)


def test_cache_from_another_model(pair_root):
    w = _cache_all(pair_root)
    ref = list_shards(pair_root / "datasets" / "tiny")[0]
    other = ModelMeta("ref", "another-fingerprint", D, 10.0, -10.0)
    with pytest.raises(CacheError, match=r"written by another model: .*fingerprint"):
        read_cache_shard(w.folder, ref, expect=other)
    with pytest.raises(CacheError, match="fingerprint is 'fp', this writer has 'another-fingerprint'"):
        CacheWriter(pair_root / "cache", "tiny", other)
    # a file of another model dropped into this model's folder
    kv = {k.decode(): v.decode() for k, v in pq.read_schema(w.folder / "00000001.parquet").metadata.items()}
    kv["fingerprint"] = "intruder"
    write_table(encode_table(_uids(list_shards(pair_root / "datasets" / "tiny")[1]), _emb(4), _emb(4), dim=D,
                             dtype="float16", kv=kv), w.folder / "00000001.parquet")
    assert any("00000001.parquet: fingerprint 'intruder' differs from the manifest's 'fp'" in p
               for p in verify_cache(pair_root).problems)


def test_stale_cache_after_reimport(pair_root):
    w = _cache_all(pair_root)
    new = samples(10)
    new[1] = replace(new[1], caption="a changed caption")
    write_shards(new, pair_root / "datasets" / "tiny", name="tiny", source="t", samples_per_shard=4, overwrite=True)
    refs = list_shards(pair_root / "datasets" / "tiny")
    with pytest.raises(CacheError, match=rf"00000000\.parquet: stale: .* {refs[0].tar_path} now has {refs[0].sha256}"):
        read_cache_shard(w.folder, refs[0])
    read_cache_shard(w.folder, refs[1])  # untouched shards stay valid (deterministic tars)
    assert not w.done(refs[0]) and w.done(refs[1])
    rep = verify_cache(pair_root)
    assert len(rep.problems) == 1 and "00000000.parquet: stale" in rep.problems[0], rep.format()


# --------------------------------------------------------------------------- interrupted writes

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_exception_inside_cache_write_keeps_previous_state(pair_root, monkeypatch):
    refs = list_shards(pair_root / "datasets" / "tiny")
    w = CacheWriter(pair_root / "cache", "tiny", META)
    w.write_shard(refs[0], _uids(refs[0]), _emb(4, 1), _emb(4, 2))
    before = _snapshot(w.folder)

    def broken(table, path):
        write_table(table.slice(0, 1), path)  # a partial file on disk ...
        raise OSError("disk full")            # ... then the writer dies

    monkeypatch.setattr(cache_mod, "write_table", broken)
    for ref in refs[:2]:  # rewriting a done shard, and writing a new one
        with pytest.raises(OSError, match="disk full"):
            w.write_shard(ref, _uids(ref), _emb(ref.rows, 7), _emb(ref.rows, 8))
    assert _snapshot(w.folder) == before
    assert sorted(p.name for p in w.folder.iterdir()) == sorted([*before, ".manifest.lock"])  # no temp files
    monkeypatch.undo()
    np.testing.assert_allclose(read_cache_shard(w.folder, refs[0]).image_emb, _emb(4, 1), atol=1e-3)

    # dying between the file's rename and the manifest update: the file is not used
    monkeypatch.setattr(cache_mod, "atomic_write_json", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        w.write_shard(refs[1], _uids(refs[1]), _emb(4), _emb(4))
    monkeypatch.undo()
    assert not w.done(refs[1]) and list(read_manifest(w.folder)["shards"]) == ["00000000"]
    with pytest.raises(CacheError, match="not in .*_manifest.json"):
        read_cache_shard(w.folder, refs[1])
    assert any("00000001.parquet: not in the manifest (extra or unfinished file)" in p
               for p in verify_cache(pair_root).problems)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import storage.cache as c
    from storage.shards import list_shards, read_metadata
    root, shard = sys.argv[1], int(sys.argv[2])
    ref = list_shards(root + "/datasets/tiny")[shard]
    w = c.CacheWriter(root + "/cache", "tiny", c.ModelMeta("ref", "fp", 4, 10.0, -10.0))
    real = c.write_table
    def dying(table, path):
        real(table.slice(0, 1), path)
        os.kill(os.getpid(), signal.SIGKILL)
    c.write_table = dying
    w.write_shard(ref, read_metadata(ref).column("uid").to_pylist(), np.ones((ref.rows, 4)), np.ones((ref.rows, 4)))
""")


def test_kill_inside_cache_write_keeps_previous_state(pair_root):
    refs = list_shards(pair_root / "datasets" / "tiny")
    w = CacheWriter(pair_root / "cache", "tiny", META)
    w.write_shard(refs[0], _uids(refs[0]), _emb(4, 1), _emb(4, 2))
    before = _snapshot(w.folder)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for shard in (0, 1):  # killed while replacing a done shard, and while writing a new one
        proc = subprocess.run([sys.executable, "-c", KILLER, str(pair_root), str(shard)], env=env,
                              capture_output=True, timeout=60)
        assert proc.returncode == -9, proc.stderr.decode()
    assert _snapshot(w.folder) == before  # old file and manifest byte-identical, nothing new visible
    temps = [p.name for p in w.folder.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 2 and all(t.startswith(".") for t in temps)  # leftovers are hidden temp names
    rep = verify_cache(pair_root)
    assert len(rep.notes) == 2 and all("leftover temporary file" in n for n in rep.notes)
    assert all("(missing)" in p for p in rep.problems) and len(rep.problems) == 2, rep.format()
    np.testing.assert_allclose(read_cache_shard(w.folder, refs[0], expect=META).text_emb, _emb(4, 2), atol=1e-3)


def test_sample_with_wrong_image_type(tmp_path):
    s = replace(samples(1)[0], image_bytes=b"GIF89a....")
    with pytest.raises(ShardError, match="not JPEG, PNG or WebP"):
        write_shards([s], tmp_path / "x", name="x", source="s")
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []
    assert isinstance(s, Sample)
