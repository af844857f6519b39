"""`aced data corrupt` (storage/corrupt.py): a copy of a real pair set with swapped captions flagged noisy,
reading the source's tars in place; and noise that is unknown shows as null, not 0.

The Flickr8k tests import a small real subset of ../shared/data/flickr8k (40 train + 10 test images, 5
captions each) and skip cleanly without it."""
from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from storage.corrupt import corrupt_dataset, derange, swap_count
from storage.shards import (ShardError, Sample, iter_samples, list_shards, load_dataset, make_uid, read_metadata,
                            read_provenance, write_shards)
from storage.sql import run_query
from tests.conftest import FLICKR8K, image_bytes
from tests.conftest import data_cli as _cli

N_TRAIN_IMAGES, N_TEST_IMAGES = 40, 10


@pytest.fixture(scope="module")
def flickr_template(tmp_path_factory) -> Path:
    """A workspace with flickr8k/train (40 images, 200 pairs, shards of 64) and flickr8k/test (10 images),
    imported from the real files with split lists, as `aced import captions` does."""
    if not (FLICKR8K / "captions.csv").exists():
        pytest.skip("no ../shared/data/flickr8k")
    from storage.importers import import_captions

    tmp = tmp_path_factory.mktemp("flickr")
    lists = {s: (FLICKR8K / "splits" / f"{s}.txt").read_text().split() for s in ("train", "test")}
    lists = {"train": lists["train"][:N_TRAIN_IMAGES], "test": lists["test"][:N_TEST_IMAGES]}
    keep = {n for names in lists.values() for n in names}
    with open(FLICKR8K / "captions.csv", newline="") as f, open(tmp / "captions.csv", "w", newline="") as g:
        r, w = csv.reader(f), csv.writer(g)
        w.writerow(next(r))
        w.writerows(row for row in r if row[0] in keep)
    (tmp / "splits").mkdir()
    for s, names in lists.items():
        (tmp / "splits" / f"{s}.txt").write_text("\n".join(names) + "\n")
    root = tmp / "ws"
    out = import_captions(FLICKR8K, root, "flickr8k", captions=tmp / "captions.csv", splits=tmp / "splits",
                          samples_per_shard=64)
    assert out["train"].rows == 5 * N_TRAIN_IMAGES
    return root


@pytest.fixture
def flickr_ws(flickr_template, tmp_path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(flickr_template, root)  # relative tar paths: a copied workspace stays valid
    return root


def _pairs(root: Path, name: str) -> list[Sample]:
    """Every pair of a dataset through the readers' one path (sha256 and member checks included)."""
    return [s for ref in list_shards(root / "datasets" / name) for s in iter_samples(ref, decode=True)]


def _provenance(root: Path, name: str) -> list[dict]:
    return [r for ref in list_shards(root / "datasets" / name) for r in read_provenance(ref).to_pylist()]


def _noisy_tar_uids(root: Path, name: str) -> set[str]:
    pairs, prov = _pairs(root, name), _provenance(root, name)
    return {p["tar_uid"] for s, p in zip(pairs, prov) if s.noisy}


def test_corrupt_swaps_exactly_round_f_n_captions_of_other_images_in_the_split(flickr_ws, capsys):
    assert _cli(flickr_ws, "data", "corrupt", "flickr8k", "--split", "train", "--name", "flickr8k-swap40/train",
                "--swap-frac", "0.4", "--seed", "0") == 0
    assert "80 captions swapped (40.0%)" in capsys.readouterr().out
    src, out = _pairs(flickr_ws, "flickr8k/train"), _pairs(flickr_ws, "flickr8k-swap40/train")
    prov = _provenance(flickr_ws, "flickr8k-swap40/train")
    n = len(src)
    assert n == 5 * N_TRAIN_IMAGES and len(out) == n
    noisy = [s for s in out if s.noisy]
    assert len(noisy) == swap_count(n, 0.4) == round(0.4 * n) == 80
    assert all(s.noisy is False for s in out if not s.noisy)  # the copy knows its noise: no null flag
    by_uid = {s.uid: s for s in src}
    test_uids = {s.uid for s in _pairs(flickr_ws, "flickr8k/test")}
    for a, b, p in zip(src, out, prov):  # same pairs in the same order; images read from the source's tars
        assert (a.key, a.image_id, a.image_bytes, a.split) == (b.key, b.image_id, b.image_bytes, b.split)
        assert p["tar_uid"] == a.uid
        if not b.noisy:
            assert (b.uid, b.caption) == (a.uid, a.caption) and p["caption_uid"] == a.uid
            continue
        donor = by_uid[p["caption_uid"]]  # a caption of the same split (the train source), never the test split
        assert p["caption_uid"] not in test_uids
        assert b.caption == donor.caption and donor.image_id != b.image_id  # another image's caption
        own = {s.caption for s in src if s.image_id == b.image_id}
        assert b.caption not in own  # neither its own caption nor another caption of its image
        assert b.uid != a.uid and b.uid not in by_uid  # a new pair: a new uid (its embeddings differ)
    # A derangement among the chosen pairs: their captions are the swapped captions, each used once.
    chosen = [a for a, b in zip(src, out) if b.noisy]
    assert Counter(a.caption for a in chosen) == Counter(b.caption for b in noisy)
    assert sorted(p["caption_uid"] for p, b in zip(prov, out) if b.noisy) == sorted(a.uid for a in chosen)
    # The SQL views see the flags and the provenance.
    t = run_query(flickr_ws, "SELECT count(*) FILTER (WHERE noisy) AS noisy, count(noisy) AS known, "
                             "count(caption_uid) AS with_provenance FROM pairs WHERE dataset = 'flickr8k-swap40/train'")
    assert t.to_pylist() == [{"noisy": 80, "known": n, "with_provenance": n}]
    from storage.inspect import inspect_path

    assert inspect_path(flickr_ws / "datasets" / "flickr8k-swap40" / "train", verify=True)["noisy"] == 80
    assert inspect_path(flickr_ws / "datasets" / "flickr8k" / "train")["noisy"] == "n/a"  # a plain import: unknown


def test_corrupt_is_deterministic_and_nested_in_the_fraction(flickr_ws):
    def meta(name):
        return [(r["uid"], r["caption"], r["noisy"]) for ref in list_shards(flickr_ws / "datasets" / name)
                for r in read_metadata(ref).to_pylist()]

    corrupt_dataset(flickr_ws, "flickr8k/train", name="a", swap_frac=0.4, seed=3)
    corrupt_dataset(flickr_ws, "flickr8k/train", name="b", swap_frac=0.4, seed=3)
    corrupt_dataset(flickr_ws, "flickr8k/train", name="c", swap_frac=0.4, seed=4)
    corrupt_dataset(flickr_ws, "flickr8k/train", name="d", swap_frac=0.2, seed=3)
    assert meta("a") == meta("b")
    assert meta("a") != meta("c")
    assert sum(m[2] for m in meta("d")) == 40
    assert _noisy_tar_uids(flickr_ws, "d") < _noisy_tar_uids(flickr_ws, "a")  # same seed: a subset of the pairs


def test_no_image_byte_is_copied_and_the_source_checksums_still_apply(flickr_ws):
    corrupt_dataset(flickr_ws, "flickr8k", split="train", name="noisy/train", swap_frac=0.4, seed=0)
    out, src = flickr_ws / "datasets" / "noisy" / "train", flickr_ws / "datasets" / "flickr8k" / "train"
    assert not list(out.glob("*.tar"))
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size < 0.1 * sum(p.stat().st_size for p in src.glob("*.tar"))
    doc = json.loads((out / "_dataset.json").read_text())
    assert [s["tar"] for s in doc["shards"]] == [f"../../flickr8k/train/{r.name}.tar" for r in list_shards(src)]
    assert [s["sha256"] for s in doc["shards"]] == [r.sha256 for r in list_shards(src)]
    assert doc["corrupted_from"] == "flickr8k/train" and doc["swapped"] == 80 and doc["swap_frac"] == 0.4
    # Change one byte of a source tar: the copy refuses it as the source does.
    tar = src / "00000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 1
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256"):
        list(iter_samples(list_shards(out)[1]))
    with pytest.raises(ShardError, match="sha256"):  # and a new copy is not made of a changed tar
        corrupt_dataset(flickr_ws, "flickr8k/train", name="again", swap_frac=0.4, seed=0)


def test_a_swapped_row_must_still_read_its_own_tar_members(flickr_ws):
    """The caption rule relaxes the .txt check only: a swapped row whose tar_uid names another pair's
    members (metadata edited) is refused by the .json uid check."""
    import pyarrow.parquet as pq

    corrupt_dataset(flickr_ws, "flickr8k/train", name="x", swap_frac=0.4, seed=0)
    ref = list_shards(flickr_ws / "datasets" / "x")[0]
    table = pq.read_table(ref.meta_path)
    prov = table.column("tar_uid").to_pylist()
    noisy = table.column("noisy").to_pylist()
    i = noisy.index(True)
    prov[i] = prov[(i + 1) % len(prov)]
    import pyarrow as pa

    table = table.set_column(table.schema.get_field_index("tar_uid"), table.schema.field("tar_uid"),
                             pa.array(prov, pa.string()))
    pq.write_table(table, ref.meta_path)
    with pytest.raises(ShardError, match="tar_uid"):
        list(iter_samples(ref))


def _split_column_dataset(root: Path) -> Path:
    """12 images x 2 captions; images 0-7 in split "train", 8-11 in "test" (one dataset, a split column)."""
    out = []
    for i in range(12):
        img = image_bytes(i)
        for j in range(2):
            cap = f"image {i} caption {j}"
            out.append(Sample(key=f"{i:04d}_{j}", uid=make_uid("t", f"img{i}", cap, j), image_bytes=img, caption=cap,
                              image_id=f"img{i}", width=16, height=12, source="t",
                              split="train" if i < 8 else "test"))
    return write_shards(out, root / "datasets" / "mixed", name="mixed", source="t", samples_per_shard=10).path


def test_captions_move_within_their_split_column_and_split_filters(tmp_path):
    root = tmp_path / "ws"
    _split_column_dataset(root)
    info = corrupt_dataset(root, "mixed", name="mixed-noisy", swap_frac=0.5, seed=1)
    assert info.rows == 24 and info.extra["swapped"] == 12
    for s in _pairs(root, "mixed-noisy"):
        donor_image = int(s.caption.split()[1])
        assert (donor_image < 8) == (s.split == "train")
        assert (donor_image != int(s.image_id[3:])) == bool(s.noisy)
    only = corrupt_dataset(root, "mixed", name="mixed-train", swap_frac=0.5, seed=1, split="train")
    assert only.rows == 16 and only.extra["swapped"] == 8 and only.extra["split"] == "train"
    assert {s.split for s in _pairs(root, "mixed-train")} == {"train"}
    with pytest.raises(ValueError, match="no pair of split 'dev'.*test, train"):
        corrupt_dataset(root, "mixed", name="mixed-dev", swap_frac=0.5, seed=1, split="dev")


def test_bad_requests_are_refused_with_a_reason(tmp_path, capsys):
    root = tmp_path / "ws"
    _split_column_dataset(root)
    assert _cli(root, "data", "corrupt", "mixed", "--name", "m2", "--swap-frac", "1.5") == 1
    assert "swap_frac must be a number in [0, 1]" in capsys.readouterr().err
    assert _cli(root, "data", "corrupt", "mixed", "--name", "mixed", "--swap-frac", "0.5") == 1
    assert "the source itself" in capsys.readouterr().err
    assert _cli(root, "data", "corrupt", "nope", "--name", "m2", "--swap-frac", "0.5") == 1
    assert "dataset 'nope'" in capsys.readouterr().err
    assert _cli(root, "data", "corrupt", "mixed", "--name", "m2", "--swap-frac", "0.5") == 0
    assert _cli(root, "data", "corrupt", "mixed", "--name", "m2", "--swap-frac", "0.5") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert _cli(root, "data", "corrupt", "mixed", "--name", "m2", "--swap-frac", "0.75", "--split", "train",
                "--overwrite") == 0
    assert load_dataset(root / "datasets" / "m2").extra["swap_frac"] == 0.75
    # One chosen caption cannot go anywhere; two of one image cannot be swapped with each other.
    write_shards([Sample(key=f"k{j}", uid=make_uid("t", "one", f"c{j}", j), image_bytes=image_bytes(0),
                         caption=f"c{j}", image_id="one", width=16, height=12, source="t") for j in range(4)],
                 root / "datasets" / "single", name="single", source="t")
    with pytest.raises(ValueError, match="show the same image"):
        corrupt_dataset(root, "single", name="s2", swap_frac=0.5, seed=0)
    assert corrupt_dataset(root, "single", name="s3", swap_frac=0.0, seed=0).extra["swapped"] == 0


@pytest.mark.parametrize("m", [2, 3, 7, 40, 501])
def test_derange_is_a_permutation_that_never_keeps_a_group(m):
    rng = np.random.default_rng(m)
    for _ in range(50):
        groups = rng.integers(0, max(2, m // 2), m)
        if 2 * np.bincount(groups).max() > m:
            with pytest.raises(ValueError):
                derange(groups, rng)
            continue
        donor = derange(groups, rng)
        assert sorted(donor.tolist()) == list(range(m))
        assert (groups[donor] != groups).all()


def _train(root: Path, run: str, dataset: str, method: str, steps: int = 2):
    from pipeline.recipes import recipe
    from pipeline.trainer import train

    cfg = recipe("tiny", method=method, train_data=(str(root / "datasets" / dataset),), steps=steps,
                 selection_log_every=1, filter_ratio=0.5)  # b = 16 of a super-batch of 32
    return train(cfg, root / "runs" / run, progress=False)


def test_training_reports_the_injected_noise_and_null_where_the_noise_is_unknown(flickr_ws, capsys):
    """A couple of steps on the corrupted split: the noisy fractions are those of the logged candidates;
    on the plain import (no flags recorded) they are null, in the metrics and the selection logs."""
    corrupt_dataset(flickr_ws, "flickr8k/train", name="swap40", swap_frac=0.4, seed=0)
    for run, dataset, method in (("noisy-sel", "swap40", "student-loss"), ("plain-sel", "flickr8k/train", "student-loss"),
                                 ("noisy-iid", "swap40", "iid"), ("plain-iid", "flickr8k/train", "iid")):
        result = _train(flickr_ws, run, dataset, method)
        known = dataset == "swap40"
        for key in ("noisy_frac_superbatch", "noisy_frac_selected"):
            assert (result.metrics[key] is not None) == known, (run, key)
    t = run_query(flickr_ws, "SELECT run, step, noisy_frac_superbatch AS sb, noisy_frac_selected AS sel "
                             "FROM metrics ORDER BY run, step").to_pylist()
    by_run = {}
    for r in t:
        by_run.setdefault(r["run"], []).append(r)
    assert all(r["sb"] is None and r["sel"] is None for run in ("plain-sel", "plain-iid") for r in by_run[run])
    # The selection method's fractions are those of the candidates it logged (all of them, every step).
    sel = run_query(flickr_ws, "SELECT run, step, avg(noisy::INT) AS sb, avg(noisy::INT) FILTER (WHERE selected) AS sel, "
                               "count(noisy) AS known, count(*) AS n FROM selections GROUP BY ALL ORDER BY ALL").to_pylist()
    logged = {(r["run"], r["step"]): r for r in sel}
    for r in by_run["noisy-sel"]:
        want = logged[("noisy-sel", r["step"])]
        assert want["known"] == want["n"] == 32  # every candidate logged, every flag known
        assert r["sb"] == pytest.approx(want["sb"]) and r["sel"] == pytest.approx(want["sel"])
        assert 0 < r["sb"] < 1
    assert all(logged[("plain-sel", r["step"])]["known"] == 0 for r in by_run["plain-sel"])
    assert all(0 < r["sb"] < 1 and r["sb"] == r["sel"] for r in by_run["noisy-iid"])
    # The CLI's summary line says n/a, not 0.
    assert _cli(flickr_ws, "sql", "SELECT count(*) AS n, count(noisy_frac_selected) AS known FROM metrics "
                                  "WHERE run = 'plain-iid'", "--format", "csv") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2,0"
