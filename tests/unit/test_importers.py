"""Importers: caption folder (+ splits), COCO JSON, webdataset/img2dataset tars, class folders, synthetic."""
from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.importers import import_captions, import_class_folders, import_coco, import_webdataset
from storage.shards import iter_samples, list_shards, load_dataset, make_uid, read_metadata
from storage.sql import run_query
from tests.conftest import FLICKR8K, image_bytes
from tests.conftest import data_cli as _cli


def _all(info):
    return [s for ref in info.shards for s in iter_samples(ref)]


@pytest.fixture
def caption_folder(tmp_path) -> Path:
    """5 images (one PNG), 2 captions each (one with a comma), splits train/test; img4 is in no split."""
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    for i in range(5):
        fmt, ext = ("PNG", "png") if i == 2 else ("JPEG", "jpg")
        (src / "images" / f"img{i}.{ext}").write_bytes(image_bytes(i, (20 + i, 10), fmt=fmt))
    with open(src / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i in range(5):
            ext = "png" if i == 2 else "jpg"
            w.writerow([f"img{i}.{ext}", f"A thing, number {i} ."])
            w.writerow([f"img{i}.{ext}", f"Another caption of {i}"])
    (src / "splits").mkdir()
    (src / "splits" / "train.txt").write_text("img0.jpg\nimg1.jpg\nimg2.png\n")
    (src / "splits" / "test.txt").write_text("img3.jpg\n")
    return src


def test_caption_folder_with_splits(caption_folder, tmp_path):
    root = tmp_path / "ws"
    out = import_captions(caption_folder, root, "toy")
    assert {k: v.rows for k, v in out.items()} == {"train": 6, "test": 2, "other": 2}
    assert sorted(d for d in run_query(root, "SELECT DISTINCT dataset FROM pairs").column(0).to_pylist()) == \
        ["toy/other", "toy/test", "toy/train"]
    train = _all(out["train"])
    assert [s.image_id for s in train] == ["img0", "img0", "img1", "img1", "img2", "img2"]
    assert train[0].caption == "A thing, number 0 ." and train[0].split == "train" and train[0].source == "toy"
    assert train[0].uid == make_uid("toy", "img0", "A thing, number 0 .", 0)
    assert train[1].uid == make_uid("toy", "img0", "Another caption of 0", 1)
    # JPEG bytes are kept exactly; the PNG is re-encoded to JPEG with its size
    assert train[0].image_bytes == (caption_folder / "images" / "img0.jpg").read_bytes()
    assert train[4].image_bytes[:3] == b"\xff\xd8\xff" and (train[4].width, train[4].height) == (22, 10)
    assert _all(out["other"])[0].split == "other"
    # deterministic: a second import elsewhere gives the same tars (so caches stay valid)
    again = import_captions(caption_folder, tmp_path / "ws2", "toy")
    assert [s.sha256 for s in again["train"].shards] == [s.sha256 for s in out["train"].shards]


def test_caption_table_without_splits_tsv(tmp_path):
    src = tmp_path / "s"
    (src / "images").mkdir(parents=True)
    (src / "images" / "a.jpg").write_bytes(image_bytes(1))
    (src / "captions.tsv").write_text("image\tcaption\na.jpg\tone, two\na.jpg\tthree\n")
    out = import_captions(src, tmp_path / "ws", "plain", samples_per_shard=1)
    assert list(out) == [""] and out[""].rows == 2 and len(out[""].shards) == 2
    assert load_dataset(tmp_path / "ws" / "datasets" / "plain").name == "plain"


def test_coco(tmp_path):
    imgs = tmp_path / "val"
    imgs.mkdir()
    for i in (7, 9):
        (imgs / f"COCO_{i}.jpg").write_bytes(image_bytes(i))
    ann = {"images": [{"id": 9, "file_name": "COCO_9.jpg"}, {"id": 7, "file_name": "COCO_7.jpg"}],
           "annotations": [{"id": 1, "image_id": 7, "caption": "seven a"}, {"id": 2, "image_id": 9, "caption": "nine"},
                           {"id": 3, "image_id": 7, "caption": " seven b "}]}
    (tmp_path / "captions_val.json").write_text(json.dumps(ann))
    info = import_coco(tmp_path / "captions_val.json", imgs, tmp_path / "ws", "coco/val", split="val")
    got = [(s.image_id, s.caption, s.split) for s in _all(info)]
    assert got == [("9", "nine", "val"), ("7", "seven a", "val"), ("7", "seven b", "val")]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_webdataset_img2dataset_style(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    uid0 = "0123456789abcdef0123456789abcdef"
    _tar(src / "00000.tar", [("000000000.jpg", image_bytes(0)), ("000000000.txt", b"first"),
                             ("000000000.json", json.dumps({"key": "000000000", "uid": uid0}).encode()),
                             ("000000001.jpg", image_bytes(1)), ("000000001.txt", b"second")])
    _tar(src / "00001.tar", [("000010000.webp", image_bytes(2, fmt="WEBP")),
                             ("000010000.json", json.dumps({"caption": "third"}).encode())])
    # img2dataset sidecar supplies the uid of a sample whose json lacks one
    pq.write_table(pa.table({"key": ["000000001"], "uid": ["f" * 32], "caption": ["second"]}), src / "00000.parquet")
    info = import_webdataset(src, tmp_path / "ws", "web")
    got = _all(info)
    assert [(s.key, s.uid, s.caption) for s in got] == [
        ("000000000", uid0, "first"), ("000000001", "f" * 32, "second"),
        ("000010000", make_uid("web", "000010000", "third", 0), "third")]
    assert got[2].image_bytes == image_bytes(2, fmt="WEBP")  # untouched, not re-encoded
    assert read_metadata(info.shards[0]).num_rows == 3  # sidecar built


def test_webdataset_round_trip_of_own_shards(pair_root, tmp_path):
    src = pair_root / "datasets" / "tiny"
    info = import_webdataset(src, tmp_path / "ws", "copy", samples_per_shard=4)
    before = [s for ref in list_shards(src) for s in iter_samples(ref)]
    assert _all(info) == before
    assert [s.sha256 for s in info.shards] == [s.sha256 for s in list_shards(src)]


def test_class_folders(tmp_path):
    src = tmp_path / "cls"
    for c in ("zebra", "ant", "sea_lion"):
        (src / c).mkdir(parents=True)
        for j in range(2):
            (src / c / f"{j:04d}.png").write_bytes(image_bytes(j, fmt="PNG"))
    info = import_class_folders(src, tmp_path / "ws", "cls/test")
    assert info.classnames == ["ant", "sea lion", "zebra"]
    assert json.loads((info.path / "_dataset.json").read_text())["classnames"] == ["ant", "sea lion", "zebra"]
    got = _all(info)
    assert [(s.label, s.caption, s.image_id) for s in got[::2]] == [(0, "ant", "ant/0000"), (1, "sea lion", "sea_lion/0000"),
                                                                    (2, "zebra", "zebra/0000")]




def test_cli_import_autodetects_and_refuses_overwrite(caption_folder, tmp_path, capsys):
    root = tmp_path / "ws"
    assert _cli(root, "import", "captions", str(caption_folder), "--name", "toy") == 0
    assert "toy/train: 6 pairs" in capsys.readouterr().out
    assert _cli(root, "import", "captions", str(caption_folder), "--name", "toy") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert _cli(root, "import", "captions", str(caption_folder), "--name", "toy", "--overwrite") == 0


def test_cli_synth_pairs_and_classes(tmp_path):
    synthetic = pytest.importorskip("pipeline.synthetic")
    root = tmp_path / "ws"
    assert _cli(root, "data", "synth", "--name", "synthetic", "--n", "12", "--noise-frac", "0.5", "--seed", "3",
                "--samples-per-shard", "5") == 0
    t = run_query(root, "SELECT count(*) AS n, count(*) FILTER (noisy) AS noisy FROM pairs")
    assert t.column("n")[0].as_py() == 12 and 0 < t.column("noisy")[0].as_py() < 12
    assert _cli(root, "data", "synth", "--name", "synthetic-classes", "--n", "1", "--classes") == 0
    info = load_dataset(root / "datasets" / "synthetic-classes")
    assert info.classnames == list(synthetic.CLASSNAMES) and info.rows == len(synthetic.CLASSNAMES)
    assert info.templates == list(synthetic.class_templates("shape"))
    assert _cli(root, "data", "synth", "--name", "synthetic-colours", "--n", "2", "--classes", "colour") == 0
    info = load_dataset(root / "datasets" / "synthetic-colours")
    assert info.classnames == list(synthetic.COLOURS) and info.rows == 2 * len(synthetic.COLOURS)
    assert info.templates == list(synthetic.class_templates("colour"))


@pytest.mark.flickr
def test_flickr8k_subset(tmp_path):
    """The real layout, on the first 40 images of the dev list (the full import is the slow test below)."""
    if not (FLICKR8K / "captions.csv").exists():
        pytest.skip("no ../shared/data/flickr8k")
    dev = (FLICKR8K / "splits" / "dev.txt").read_text().split()[:40]
    keep = set(dev)
    table = tmp_path / "captions.csv"
    with open(FLICKR8K / "captions.csv", newline="") as f, open(table, "w", newline="") as g:
        r, w = csv.reader(f), csv.writer(g)
        w.writerow(next(r))
        w.writerows(row for row in r if row[0] in keep)
    out = import_captions(FLICKR8K, tmp_path / "ws", "flickr8k", captions=table, splits=False)
    assert out[""].rows == 200
    t = run_query(tmp_path / "ws", "SELECT count(DISTINCT image_id) AS imgs, min(width) AS w FROM pairs")
    assert t.to_pylist() == [{"imgs": 40, "w": 64}]
    s = next(iter_samples(out[""].shards[0]))
    assert s.image_bytes == (FLICKR8K / "images" / f"{s.image_id}.jpg").read_bytes()


@pytest.mark.slow
@pytest.mark.flickr
def test_flickr8k_full_import_acceptance(tmp_path, capsys):
    if not (FLICKR8K / "captions.csv").exists():
        pytest.skip("no ../shared/data/flickr8k")
    root = tmp_path / "ws"
    assert _cli(root, "import", "captions", str(FLICKR8K), "--name", "flickr8k") == 0
    assert _cli(root, "sql", "select count(*), count(distinct image_id) from pairs", "--format", "csv") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "40445,8091"  # 40455 captions, 10 repeat an earlier caption of their image
    t = run_query(root, "SELECT dataset, count(*) AS n FROM pairs GROUP BY 1 ORDER BY 1")
    assert t.to_pylist() == [{"dataset": "flickr8k/dev", "n": 5000}, {"dataset": "flickr8k/other", "n": 455},
                             {"dataset": "flickr8k/test", "n": 4999}, {"dataset": "flickr8k/train", "n": 29991}]
