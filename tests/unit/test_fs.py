"""storage/fs.py without a server: which paths are URLs, how they join, and what the workspace makes of a
URL root (the S3 behaviour itself is tested against a real server in tests/integration/test_s3.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from storage import fs
from storage.workspace import Workspace, placed_name


@pytest.mark.parametrize("p, url", [("s3://bucket/key", True), ("gs://b/k", True), ("/tmp/x", False),
                                    ("relative/dir", False), ("file:///tmp/x", False), (Path("s3:/b/k"), False)])
def test_is_url(p, url):
    assert fs.is_url(p) is url


def test_local_paths_stay_plain_pathlib():
    assert type(fs.as_path("/tmp/x")) is type(Path("/tmp/x"))
    assert fs.join(Path("/w/datasets/d"), "../pool/a.tar") == Path("/w/datasets/d/../pool/a.tar")  # no normpath
    assert fs.join("/w/datasets/d", "/pool/a.tar") == Path("/pool/a.tar")


def test_urls_keep_their_scheme_through_joins():
    p = fs.as_path("s3://bucket/ws")
    assert fs.is_url(p) and p.protocol == "s3" and str(p / "datasets" / "x") == "s3://bucket/ws/datasets/x"
    assert str(fs.join(Path("/w/datasets/d"), "s3://pool/a.tar")) == "s3://pool/a.tar"
    assert str(fs.join(p / "datasets" / "d", "00000000.tar")) == "s3://bucket/ws/datasets/d/00000000.tar"
    assert fs.resolve(p) is p


def test_workspace_on_a_url_keeps_state_local(monkeypatch, tmp_path):
    monkeypatch.setenv("ACED_STATE_DIR", str(tmp_path / "state"))
    ws = Workspace("s3://bucket/ws")
    assert str(ws.dataset("flickr8k/train")) == "s3://bucket/ws/datasets/flickr8k/train"
    assert str(ws.cache_folder("m", "d")) == "s3://bucket/ws/cache/m/d"
    assert ws.state == tmp_path / "state" and isinstance(ws.state, Path)
    monkeypatch.delenv("ACED_STATE_DIR")
    assert Workspace("s3://bucket/ws").state != Workspace("s3://bucket/other").state  # one per root
    assert placed_name("s3://bucket/ws/datasets/flickr8k/train") == "flickr8k/train"
    with pytest.raises(ValueError, match="bad dataset name"):
        ws.dataset("../x")
