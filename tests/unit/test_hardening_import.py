"""Issue 9, importers and images: paths that leave the image folder, text encodings, non-UTF-8 file
names, a full disk and leftover work folders, duplicate captions, 16-bit PNGs, colliding image ids,
nested class folders, skip counts that match the log, and the one image decoder."""
from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import storage.shards as shards
from storage.importers import import_captions, import_class_folders, import_coco, import_webdataset
from storage.shards import DiskFullError, ImageError, ShardError, decode_image, iter_samples, write_shards
from tests.conftest import image_bytes, samples
from tests.conftest import data_cli as _cli


def _all(info):
    return [s for ref in info.shards for s in iter_samples(ref)]




def _folder(tmp_path: Path, rows: list[list[str]], images: dict[str, bytes], *, name: str = "src") -> Path:
    src = tmp_path / name
    (src / "images").mkdir(parents=True)
    for fname, data in images.items():
        (src / "images" / fname).write_bytes(data)
    with open(src / "captions.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["image", "caption"]] + rows)
    return src


def _png16(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _gradient16(w: int = 32, h: int = 8) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))


# --------------------------------------------------------------------------- 1. paths leaving the image folder

def test_caption_table_paths_leaving_the_image_folder(tmp_path):
    secret = tmp_path / "secret.jpg"  # a readable image outside the image folder
    secret.write_bytes(image_bytes(9))
    src = _folder(tmp_path, [["ok.jpg", "fine"], ["../secret.jpg", "up"], [str(secret), "absolute"]],
                  {"ok.jpg": image_bytes(0)})
    with pytest.raises(ShardError, match=r"captions\.csv:3: image path '\.\./secret\.jpg' leaves the image folder"):
        import_captions(src, tmp_path / "ws", "d")
    out = import_captions(src, tmp_path / "ws", "d", on_error="skip")[""]
    assert [s.caption for s in _all(out)] == ["fine"]
    assert out.extra["skipped_rows_in_caption_table"] == 2
    assert out.extra["caption_table_skip_reasons"] == {"path outside image folder": 2}


def test_coco_file_name_leaving_the_image_folder(tmp_path):
    imgs = tmp_path / "val"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(image_bytes(1))
    (tmp_path / "b.jpg").write_bytes(image_bytes(2))
    ann = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "../b.jpg"}],
           "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 2, "caption": "two"},
                           {"image_id": 2, "caption": "two again"}]}
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    with pytest.raises(ShardError, match=r"captions\.json: images\[1\] \(image_id 2\): file_name '\.\./b\.jpg' leaves"):
        import_coco(tmp_path / "captions.json", imgs, tmp_path / "ws", "coco")
    info = import_coco(tmp_path / "captions.json", imgs, tmp_path / "ws", "coco", on_error="skip")
    assert [s.caption for s in _all(info)] == ["one"]
    assert info.extra["skip_reasons"] == {"path outside image folder": 2}


# --------------------------------------------------------------------------- 2. text encodings

def test_caption_table_with_bom_is_read_and_latin1_is_named(tmp_path):
    src = _folder(tmp_path, [], {"a.jpg": image_bytes(1)})
    (src / "captions.csv").write_bytes("\ufeffimage,caption\na.jpg,caf\u00e9 au lait\n".encode("utf-8"))
    out = import_captions(src, tmp_path / "ws", "bom")[""]
    assert [s.caption for s in _all(out)] == ["caf\u00e9 au lait"]
    (src / "captions.csv").write_bytes("image,caption\na.jpg,fine\na.jpg,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ShardError, match=r"captions\.csv:3: not UTF-8 \(byte 0xe9 at column 10\)"):
        import_captions(src, tmp_path / "ws", "latin")
    # a split list in Latin-1 is named the same way
    (src / "captions.csv").write_bytes(b"image,caption\na.jpg,fine\n")
    (src / "splits").mkdir()
    (src / "splits" / "train.txt").write_bytes("a.jpg\n\u00e9.jpg\n".encode("latin-1"))
    with pytest.raises(ShardError, match=r"train\.txt:2: not UTF-8"):
        import_captions(src, tmp_path / "ws", "latin2")


# --------------------------------------------------------------------------- 3. non-UTF-8 file names

def test_class_folder_file_name_not_utf8(tmp_path):
    src = tmp_path / "cls"
    (src / "cat").mkdir(parents=True)
    (src / "cat" / "ok.png").write_bytes(image_bytes(1, fmt="PNG"))
    with open(os.path.join(os.fsencode(src / "cat"), b"caf\xe9.png"), "wb") as f:
        f.write(image_bytes(2, fmt="PNG"))
    with pytest.raises(ShardError, match=re.escape(f"{src / 'cat'}: file name b'caf\\xe9.png' is not UTF-8")):
        import_class_folders(src, tmp_path / "ws", "c")
    info = import_class_folders(src, tmp_path / "ws", "c", on_error="skip")
    assert [s.image_id for s in _all(info)] == ["cat/ok"]
    assert info.extra["skipped_at_import"] == 1 and info.extra["skip_reasons"] == {"non-UTF-8 name": 1}


# --------------------------------------------------------------------------- 4. full disk, leftover work folders

def test_disk_full_while_writing_shards_leaves_nothing(tmp_path, monkeypatch, capsys):
    src = _folder(tmp_path, [[f"{i}.jpg", f"caption {i}"] for i in range(4)],
                  {f"{i}.jpg": image_bytes(i) for i in range(4)})
    real = shards._write_shard
    calls = []

    def full_disk(folder, name, batch, *, dataset):
        calls.append(name)
        if len(calls) == 2:  # the second shard: a partial tar on disk, then ENOSPC
            (folder / f".{name}.tar.0123456789ab.tmp").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(folder, name, batch, dataset=dataset)

    monkeypatch.setattr(shards, "_write_shard", full_disk)
    root = tmp_path / "ws"
    with pytest.raises(DiskFullError, match=re.escape(str(root / "datasets" / "full")) + ".*disk full") as e:
        import_captions(src, root, "full", samples_per_shard=2)
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert list((root / "datasets").iterdir()) == []  # no dataset, no hidden work folder
    calls.clear()
    assert _cli(root, "import", "captions", str(src), "--name", "full", "--samples-per-shard", "2") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "disk full" in err and str(root / "datasets") in err
    assert list((root / "datasets").iterdir()) == []


def test_rerun_removes_work_folders_of_a_killed_import(tmp_path, caplog):
    src = _folder(tmp_path, [["a.jpg", "one"]], {"a.jpg": image_bytes(1)})
    ds = tmp_path / "ws" / "datasets"
    stale = [ds / ".toy.0123456789ab.tmp", ds / ".toy.ba9876543210.old.tmp"]
    for p in stale:
        (p / "sub").mkdir(parents=True)
        (p / "sub" / "00000000.tar").write_bytes(b"half")
    live = ds / ".toy.aaaaaaaaaaaa.tmp"  # held by a running import (flock on the folder)
    live.mkdir()
    keep = [ds / ".other.0123456789ab.tmp", ds / ".toy.tmp", ds / "toyx"]  # not our pattern for "toy"
    for p in keep:
        p.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with caplog.at_level(logging.INFO, logger="storage.shards"):
            import_captions(src, tmp_path / "ws", "toy")
    finally:
        os.close(fd)
    assert not any(p.exists() for p in stale)
    assert live.is_dir() and all(p.is_dir() for p in keep)
    assert any("removed 2 work folder(s) left by an interrupted write" in r.getMessage() for r in caplog.records)
    assert shards.work_dirs(ds / "toy") == [live]
    assert shards.remove_stale_work_dirs(ds / "toy") == [live]  # lock released: now stale


def test_failed_swap_puts_the_old_dataset_back(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    write_shards(samples(2), out, name="ds", source="s")
    before = sorted(p.name for p in out.iterdir())
    real = os.replace

    def fail_second(src, dst):
        if Path(src).name.startswith(".ds.") and not Path(src).name.endswith(".old.tmp") and Path(dst) == out:
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(shards.os, "replace", fail_second)
    with pytest.raises(OSError, match="I/O error"):
        write_shards(samples(3), out, name="ds", source="s", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before and shards.load_dataset(out).rows == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


# --------------------------------------------------------------------------- 5. duplicate captions

def test_duplicate_caption_rows_are_dropped_counted_and_reported(tmp_path, caplog, capsys):
    src = _folder(tmp_path, [["a.jpg", "one"], ["a.jpg", "two"], ["a.jpg", "one"], ["b.jpg", "one"]],
                  {"a.jpg": image_bytes(1), "b.jpg": image_bytes(2)})
    with caplog.at_level(logging.WARNING, logger="storage.importers"):
        out = import_captions(src, tmp_path / "ws", "d")[""]
    assert [(s.image_id, s.caption) for s in _all(out)] == [("a", "one"), ("a", "two"), ("b", "one")]
    assert out.extra["duplicate_captions_dropped"] == 1
    assert any("dropped 1 duplicate caption(s)" in r.getMessage() and "line 4 repeats line 2" in r.getMessage()
               for r in caplog.records)
    assert _cli(tmp_path / "ws2", "import", "captions", str(src), "--name", "d") == 0
    assert "(1 duplicate captions dropped)" in capsys.readouterr().out.splitlines()[-1]


def test_duplicate_coco_annotations_are_dropped(tmp_path):
    imgs = tmp_path / "val"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(image_bytes(1))
    ann = {"images": [{"id": 1, "file_name": "a.jpg"}],
           "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 1, "caption": " one "}]}
    (tmp_path / "c.json").write_text(json.dumps(ann))
    info = import_coco(tmp_path / "c.json", imgs, tmp_path / "ws", "coco")
    assert info.rows == 1 and info.extra["duplicate_captions_dropped"] == 1


# --------------------------------------------------------------------------- 6. 16-bit PNG

def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = _gradient16()
    data = _png16(arr)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")  # Pillow really wrote a 16-bit PNG
    rgb = np.asarray(decode_image(data))
    assert rgb.shape == (8, 32, 3) and rgb.dtype == np.uint8
    want = np.round(arr / 257.0)
    assert np.abs(rgb[..., 0].astype(int) - want).max() <= 1 and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and 120 <= rgb[0, 16, 0] <= 135
    # through an import (re-encoded to JPEG): a grey ramp, not a white image
    src = tmp_path / "cls"
    (src / "ramp").mkdir(parents=True)
    (src / "ramp" / "r.png").write_bytes(data)
    s = _all(import_class_folders(src, tmp_path / "ws", "ramp"))[0]
    got = np.asarray(Image.open(io.BytesIO(s.image_bytes)).convert("L")).astype(int)
    assert np.abs(got - want).mean() < 4


# --------------------------------------------------------------------------- 7. colliding image ids

def test_same_stem_different_suffix_are_two_images(tmp_path):
    src = tmp_path / "cls"
    (src / "cat").mkdir(parents=True)
    (src / "cat" / "x.webp").write_bytes(image_bytes(1, fmt="WEBP"))
    (src / "cat" / "x.tiff").write_bytes(image_bytes(2, fmt="TIFF"))
    (src / "cat" / "y.png").write_bytes(image_bytes(3, fmt="PNG"))
    got = _all(import_class_folders(src, tmp_path / "ws", "c"))
    assert sorted(s.image_id for s in got) == ["cat/x.tiff", "cat/x.webp", "cat/y"]
    assert len({s.uid for s in got}) == 3
    # the same for a caption table naming both files
    cap = _folder(tmp_path, [["x.webp", "a"], ["x.tiff", "b"]],
                  {"x.webp": image_bytes(1, fmt="WEBP"), "x.tiff": image_bytes(2, fmt="TIFF")}, name="cap")
    got = _all(import_captions(cap, tmp_path / "ws", "cap")[""])
    assert [(s.image_id, s.caption) for s in got] == [("x.webp", "a"), ("x.tiff", "b")]


# --------------------------------------------------------------------------- 8. nested class folders

def test_images_in_class_sub_folders_are_kept(tmp_path, caplog):
    src = tmp_path / "cls"
    (src / "cat" / "indoor").mkdir(parents=True)
    (src / "dog").mkdir()
    (src / "cat" / "a.png").write_bytes(image_bytes(1, fmt="PNG"))
    (src / "cat" / "indoor" / "b.png").write_bytes(image_bytes(2, fmt="PNG"))
    (src / "dog" / "c.png").write_bytes(image_bytes(3, fmt="PNG"))
    with caplog.at_level(logging.WARNING, logger="storage.importers"):
        info = import_class_folders(src, tmp_path / "ws", "c")
    assert [(s.image_id, s.label) for s in _all(info)] == [("cat/a", 0), ("cat/indoor/b", 0), ("dog/c", 1)]
    assert info.extra["images_in_subfolders"] == 1
    assert any("1 images in sub-folders" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- 9. skip counts equal the log

def _logged_skips(caplog) -> int:
    return sum(getattr(r, "skipped_pairs", 1) for r in caplog.records
               if r.levelno == logging.WARNING and r.getMessage().startswith("skipping "))


def _printed_skips(out: str) -> int:
    m = re.search(r"\((\d+) skipped", out.splitlines()[-1])
    return int(m.group(1)) if m else 0


def _wds(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_skip_bad_summary_equals_logged_skips_in_every_importer(tmp_path, caplog, capsys):
    root = tmp_path / "ws"
    # captions with splits: a bad table row, a missing image with 2 captions, an undecodable image, a path escape
    src = _folder(tmp_path, [["a.jpg", "one"], ["", "no image"], ["gone.jpg", "x"], ["gone.jpg", "y"],
                             ["bad.jpg", "z"], ["../a.jpg", "w"], ["c.jpg", "three"]],
                  {"a.jpg": image_bytes(1), "bad.jpg": b"\xff\xd8\xff nope", "c.jpg": image_bytes(3)})
    (src / "splits").mkdir()
    (src / "splits" / "train.txt").write_text("a.jpg\ngone.jpg\n")
    (src / "splits" / "test.txt").write_text("bad.jpg\nc.jpg\n")
    # COCO: an unknown image_id, an empty caption, a missing file with 2 captions
    imgs = tmp_path / "coco"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(image_bytes(1))
    (tmp_path / "c.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "gone.jpg"}],
        "annotations": [{"image_id": 1, "caption": "ok"}, {"image_id": 5, "caption": "x"},
                        {"image_id": 1, "caption": ""}, {"image_id": 2, "caption": "p"}, {"image_id": 2, "caption": "q"}]}))
    # class folders: an undecodable image
    cls = tmp_path / "cls"
    (cls / "cat").mkdir(parents=True)
    (cls / "cat" / "ok.png").write_bytes(image_bytes(1, fmt="PNG"))
    (cls / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    # webdataset: a sample without an image, and a duplicate uid (skipped by the shard writer)
    wds = tmp_path / "wds"
    wds.mkdir()
    uid = "0123456789abcdef0123456789abcdef"
    _wds(wds / "0.tar", [("k0.jpg", image_bytes(0)), ("k0.txt", b"a"), ("k0.json", json.dumps({"uid": uid}).encode()),
                         ("k1.txt", b"no image"),
                         ("k2.jpg", image_bytes(2)), ("k2.txt", b"b"), ("k2.json", json.dumps({"uid": uid}).encode())])
    runs = [(("captions", str(src)), 5), (("coco", str(tmp_path / "c.json"), "--images", str(imgs)), 4),
            (("classes", str(cls)), 1), (("webdataset", str(wds)), 2)]
    for i, (argv, want) in enumerate(runs):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert _cli(root, "import", *argv, "--name", f"d{i}", "--skip-bad") == 0
        out = capsys.readouterr().out
        assert _printed_skips(out) == _logged_skips(caplog) == want, (argv[0], out)


# --------------------------------------------------------------------------- 10. one image decoder

def test_one_decoder_everywhere(tmp_path, monkeypatch):
    import torch

    import pipeline.data as data_mod
    import pipeline.evaluate as eval_mod
    import pipeline.ray_embed as ray_mod

    repo = Path(__file__).resolve().parents[2]
    for f in ("pipeline/data.py", "pipeline/evaluate.py", "pipeline/ray_embed.py", "storage/importers.py"):
        assert "Image.open" not in (repo / f).read_text(), f  # every decode goes through decode_image
    png = _png16(_gradient16())
    ref = SimpleNamespace(tar_path=tmp_path / "00000000.tar")
    seen = []

    def pre(im):
        seen.append(np.asarray(im))
        return torch.zeros(1)

    # training input pipeline
    fake = SimpleNamespace(preprocess=pre, on_bad_sample="raise", skipped=0)
    data_mod.SuperBatches._decode(fake, png, ref, "u1")
    with pytest.raises(ImageError, match=r"00000000\.tar: sample uid=u2: undecodable image"):
        data_mod.SuperBatches._decode(fake, b"junk", ref, "u2")
    fake.on_bad_sample = "skip"
    assert data_mod.SuperBatches._decode(fake, b"junk", ref, "u3") is None and fake.skipped == 1
    # evaluation
    eval_mod._decode(ref, "k1", png, pre)
    with pytest.raises(ShardError, match=r"00000000\.tar: sample 'k2': undecodable image"):
        eval_mod._decode(ref, "k2", b"junk", pre)
    # stage-1 embedding
    bundle = SimpleNamespace(preprocess=pre, encode_image=lambda x: x, encode_text=lambda t: t.float(),
                             tokenizer=lambda caps: torch.zeros(len(caps), 1))
    emb = SimpleNamespace(models={"m": bundle}, _pre_key={"m": "k"}, device=torch.device("cpu"))
    ray_mod.MultiModelEmbedder.embed_chunk(emb, [png], ["c"], ["m"], where="d/00000000:0")
    with pytest.raises(ValueError, match=r"d/00000000:0 row 1: undecodable image"):
        ray_mod.MultiModelEmbedder.embed_chunk(emb, [png, b"junk"], ["c", "d"], ["m"], where="d/00000000:0")
    assert len(seen) == 3
    for px in seen:  # each path saw the same 8-bit RGB ramp, not a white image
        assert px.shape == (8, 32, 3) and px[0, 0, 0] == 0 and px[0, -1, 0] == 255 and 120 <= px[0, 16, 0] <= 135
    # decompression-bomb limit, as a named error before the pixels are decoded
    monkeypatch.setattr(shards, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match=r"where: image is 16x12 = 192 pixels, above the limit of 100"):
        decode_image(image_bytes(0), where="where")


def test_work_folder_of_a_sigkilled_import_is_removed_by_the_next(tmp_path, caplog):
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "ws" / "datasets" / "k"
    marker = tmp_path / "started"
    script = f"""
import sys, time
sys.path.insert(0, {str(repo)!r})
from pathlib import Path
from storage.shards import write_shards
from tests.conftest import samples
def gen():
    yield from samples(3)
    Path({str(marker)!r}).write_text("x")
    time.sleep(60)
write_shards(gen(), {str(out)!r}, name="k", source="s", samples_per_shard=1)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the writer did not start"
        live = shards.work_dirs(out)
        assert len(live) == 1 and shards.remove_stale_work_dirs(out) == []  # locked while it runs
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert shards.work_dirs(out) == live and any(live[0].iterdir())  # what the killed import left
    with caplog.at_level(logging.WARNING, logger="storage.shards"):
        write_shards(samples(2), out, name="k", source="s")
    assert shards.work_dirs(out) == [] and shards.load_dataset(out).rows == 2
    assert any("removed 1 work folder(s)" in r.getMessage() for r in caplog.records)
