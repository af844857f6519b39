"""storage.workspace: the one place that knows the layout, names, and a dataset's identity (issue 11 item 4)."""
from __future__ import annotations

import shutil

import pytest

from storage.shards import write_shards
from storage.workspace import DatasetIdentityError, Workspace, check_name, dataset_identity

from tests.conftest import samples


def test_layout_and_names(tmp_path):
    ws = Workspace(tmp_path)
    assert ws.dataset("flickr8k/train") == tmp_path / "datasets" / "flickr8k" / "train"
    assert ws.cache_folder("ref", "flickr8k/train") == tmp_path / "cache" / "ref" / "flickr8k" / "train"
    assert (ws.model("ref"), ws.run("r1"), ws.state) == (tmp_path / "models" / "ref", tmp_path / "runs" / "r1",
                                                         tmp_path / "state")
    for bad in ("", "../x", "/abs", "a//b", "a/./b", ".hidden", "a/.tmp", "a\\b", "a\x00b"):
        with pytest.raises(ValueError, match="bad"):
            check_name(bad)
    with pytest.raises(ValueError, match="bad model id"):
        ws.cache_folder("../x", "d")
    with pytest.raises(FileNotFoundError, match="neither"):
        ws.resolve_dataset("nope")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ws.resolve_model("/nonexistent/model")


def _dataset(root, name):
    out = Workspace(root).dataset(name)
    write_shards(samples(6), out, name=name, source="test", samples_per_shard=3)
    return out


def test_a_dataset_is_known_by_its_path_below_datasets(tmp_path):
    d = _dataset(tmp_path, "pool/train")
    assert dataset_identity(d) == "pool/train"
    with pytest.raises(DatasetIdentityError, match="lives at datasets/other"):
        write_shards(samples(3), Workspace(tmp_path).dataset("other"), name="pool/train", source="test")


def test_a_copied_dataset_is_refused_by_the_trainer_and_the_cache_stage_alike(tmp_path):
    """Was: the trainer found a dataset's cache by the name inside _dataset.json and the cache stage filed
    it by its path, so a copy under another name was cached under one name and looked up under another."""
    from pipeline.data import PairIndex
    from pipeline.ray_embed import resolve_datasets

    d = _dataset(tmp_path, "a")
    copy = tmp_path / "datasets" / "b"
    shutil.copytree(d, copy)
    with pytest.raises(DatasetIdentityError, match="names dataset 'a' but it lives at datasets/b"):
        PairIndex([copy])
    with pytest.raises(DatasetIdentityError, match="names dataset 'a' but it lives at datasets/b"):
        resolve_datasets(tmp_path, ["b"])
    with pytest.raises(DatasetIdentityError):
        resolve_datasets(tmp_path, None)  # all datasets: the copy among them
    assert list(resolve_datasets(tmp_path, ["a"])) == ["a"] and len(PairIndex([d])) == 6
