"""Input pipeline (pipeline/data.py): epoch order, super-batches as a function of the step, data-parallel shares."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import PairIndex, SuperBatches, epoch_order
from pipeline.synthetic import generate_pairs
from storage.shards import write_shards


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("d") / "synth"
    write_shards(generate_pairs(90, seed=0, noise_frac=0.3), out, name="synth", source="synthetic",
                 samples_per_shard=20)
    return out


def _batches(index, **kw) -> SuperBatches:
    return SuperBatches(index, seed=3, window=2, preprocess=lambda im: torch.zeros(3, 4, 4),
                        tokenizer=lambda caps: torch.zeros(len(caps), 5, dtype=torch.long), **kw)


def test_epoch_order_is_a_seeded_permutation():
    rows = np.array([20, 20, 20, 20, 10])
    a = epoch_order(rows, seed=0, epoch=0, window=2)
    assert sorted(a.tolist()) == list(range(90))
    assert a.tolist() == epoch_order(rows, seed=0, epoch=0, window=2).tolist()
    assert a.tolist() != epoch_order(rows, seed=0, epoch=1, window=2).tolist()
    assert a.tolist() != epoch_order(rows, seed=1, epoch=0, window=2).tolist()


def test_superbatch_is_a_function_of_the_step(dataset):
    index = PairIndex([dataset])
    sb = _batches(index, size=16)
    assert sb.per_epoch == 90 // 16
    first = sb[7].uids.tolist()
    assert len(first) == 16 and len(set(first)) == 16
    assert _batches(index, size=16)[7].uids.tolist() == first  # a fresh reader (a resumed run) reads the same
    epoch0 = [u for step in range(sb.per_epoch) for u in sb[step].uids]
    assert len(set(epoch0)) == len(epoch0)  # no pair twice within an epoch


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_read_disjoint_contiguous_shares_of_the_same_superbatch(dataset, world):
    index = PairIndex([dataset])
    full = _batches(index, size=16)
    for step in (0, 5, 6):
        parts = [_batches(index, size=16, shard=(r, world))[step] for r in range(world)]
        assert [u for p in parts for u in p.uids] == full[step].uids.tolist()
        assert torch.equal(torch.cat([p.noisy for p in parts]), full[step].noisy)
        assert all(len(p) == 16 // world for p in parts)


def test_shard_validation(dataset):
    index = PairIndex([dataset])
    with pytest.raises(ValueError, match="divisible by world"):
        _batches(index, size=15, shard=(0, 2))
    with pytest.raises(ValueError, match="rank < world"):
        _batches(index, size=16, shard=(2, 2))
    with pytest.raises(ValueError, match="fewer than one super-batch"):
        _batches(index, size=128)
