"""Shared fixtures: tiny generated data (images, samples, a pair dataset in a workspace).

Keep this small; fixtures used by one test file belong in that file.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def image_bytes(seed: int, size: tuple[int, int] = (16, 12), fmt: str = "JPEG") -> bytes:
    """A small random image encoded as `fmt` (deterministic in `seed`)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def samples(n: int, *, source: str = "test", start: int = 0, size: tuple[int, int] = (16, 12)):
    """`n` valid storage.shards.Sample objects with distinct uids and keys."""
    from storage.shards import Sample, make_uid

    out = []
    for i in range(start, start + n):
        caption = f"a picture number {i}"
        out.append(Sample(key=f"{i:08d}", uid=make_uid(source, f"img{i}", caption, 0), image_bytes=image_bytes(i, size),
                          caption=caption, image_id=f"img{i}", width=size[0], height=size[1], source=source,
                          noisy=(i % 3 == 0), split="train"))
    return out


@pytest.fixture
def pair_root(tmp_path) -> Path:
    """A workspace root holding dataset `tiny`: 10 pairs in shards of 4, 4 and 2."""
    from storage.shards import write_shards

    root = tmp_path / "ws"
    write_shards(samples(10), root / "datasets" / "tiny", name="tiny", source="test", samples_per_shard=4)
    return root


def data_cli(root, *argv) -> int:
    """`aced <argv>` for the data commands (flows/cmd_data.py) in this process, on workspace `root`;
    returns the exit code."""
    import argparse

    from flows import cmd_data

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    cmd_data.add_commands(sub)
    args = parser.parse_args(list(argv))
    args.root = root
    return args.func(args)
