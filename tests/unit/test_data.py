"""Input pipeline (pipeline/data.py): epoch order, super-batches as a function of the step, data-parallel shares."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import EpochOrder, PairIndex, SuperBatches
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


def epoch_order(rows, *, seed, epoch, window):
    order = EpochOrder(rows, seed=seed, epoch=epoch, window=window)
    return order.slice(0, int(order.starts[-1]))


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


def _old_epoch_order(rows, *, seed, epoch, window):
    """The materialised order of earlier versions (kept here: runs resume into the same batches)."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    offsets = np.concatenate([[0], np.cumsum(rows)])
    perm = rng.permutation(len(rows))
    parts = []
    for start in range(0, len(perm), window):
        ids = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in perm[start:start + window]])
        rng.shuffle(ids)
        parts.append(ids)
    return np.concatenate(parts)


@pytest.mark.parametrize("window", [1, 3, 8])
def test_epoch_order_read_in_slices_is_the_materialised_order(window):
    rows = np.array([7, 20, 1, 13, 20, 20, 5, 9, 11, 2, 20])
    want = _old_epoch_order(rows, seed=4, epoch=2, window=window)
    order = EpochOrder(rows, seed=4, epoch=2, window=window)
    got = np.concatenate([order.slice(a, min(a + 17, len(want))) for a in range(0, len(want), 17)])
    assert got.tolist() == want.tolist()
    late = EpochOrder(rows, seed=4, epoch=2, window=window)  # a resumed reader starts mid-epoch
    assert late.slice(100, 120).tolist() == want[100:120].tolist()
    if window == 1:  # windows 0..k-2 are gone: reading back needs a new reader (SuperBatches makes one)
        with pytest.raises(ValueError, match="forward only"):
            late.slice(0, 5)


def test_index_memory_is_per_shard_and_uids_are_checked_across_datasets(dataset, tmp_path):
    from pipeline.data import duplicate_uids, uid_keys

    index = PairIndex([dataset])
    assert len(index) == 90 and not hasattr(index, "uids")  # no per-pair arrays at start-up
    keys = uid_keys(["0" * 31 + "1", "f" * 32, "0" * 31 + "1", "0" * 32])
    assert keys.dtype == np.dtype("S16") and duplicate_uids(keys).tolist() == [bytes.fromhex("0" * 31 + "1")]
    with pytest.raises(ValueError, match="not 32 hex digits"):
        uid_keys(["xyz"])
    twin = tmp_path / "datasets" / "twin"
    write_shards(generate_pairs(30, seed=0, noise_frac=0.3), twin, name="twin", source="synthetic",
                 samples_per_shard=20)  # the first 30 pairs of `dataset` again
    with pytest.raises(ValueError, match="30 uid\\(s\\) occur in more than one training dataset"):
        PairIndex([dataset, twin])
