"""Tests of pipeline/selection.py: the sampling law of JEST joint selection, computed exactly on small cases
and compared with the empirical law of many draws (chi-square); its limits (tau -> large = greedy top-k,
tau = 0 = uniform); the baselines; robustness (huge scores, distinct indices, determinism).

Every chi-square test also checks its own power: the same counts must reject a plausible wrong law
(no 1/(2|selected|+1) normalisation, a sample-and-reject chunk instead of Gumbel-top-k), so none can pass
by being unable to fail.
"""
from __future__ import annotations

import itertools
import threading
from collections import Counter

import pytest
import torch
from scipy import stats

from pipeline.selection import SelectionConfig, chunk_sizes, gumbel_top_k, select

P_THRESHOLD = 1e-3   # generous: a correct sampler fails 1 in 1000 seeds; the seeds are fixed anyway


def unit(g, n, d):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def make_batch(B, seed, ds=6, dr=8):
    """Student and reference embeddings whose pairwise scores are O(1) and asymmetric (s(i,j) != s(j,i))."""
    g = torch.Generator().manual_seed(seed)
    su, ru = unit(g, B, ds), unit(g, B, dr)
    sv = torch.nn.functional.normalize(su + 1.0 * torch.randn(B, ds, generator=g), dim=1)
    rv = torch.nn.functional.normalize(ru + 0.5 * torch.randn(B, dr, generator=g), dim=1)
    # bias near 0 so negative pairs matter (with SigLIP's -10 the off-diagonal terms are ~1e-4)
    return dict(stu_img=su, stu_txt=sv, stu_scale=4.0, stu_bias=-1.0,
                ref_img=ru, ref_txt=rv, ref_scale=8.0, ref_bias=-2.0)


def score_matrix(batch, rule="learnability"):
    """s(i, j) over the whole super-batch in float64, straight from the definition (SPEC.md)."""
    def ell(u, v, a, c):
        logits = a * (u.double() @ v.double().T) + c
        y = 2.0 * torch.eye(len(u), dtype=torch.float64) - 1.0
        return torch.logaddexp(torch.zeros_like(logits), -y * logits)

    ref = ell(batch["ref_img"], batch["ref_txt"], batch["ref_scale"], batch["ref_bias"])
    if rule == "easy_reference":
        return -ref
    return ell(batch["stu_img"], batch["stu_txt"], batch["stu_scale"], batch["stu_bias"]) - ref


def cbar(S, selected):
    """Conditional batch score of every candidate given the selected list (float64)."""
    s = S.diagonal()
    if not selected:
        return s.clone()
    return (s + S[:, selected].sum(1) + S[selected, :].sum(0)) / (2 * len(selected) + 1)


def plackett_luce(logits, order):
    """P(drawing `order` first, in that order, without replacement from softmax(logits))."""
    p, left = 1.0, torch.ones_like(logits, dtype=torch.bool)
    for i in order:
        q = torch.softmax(logits.masked_fill(~left, float("-inf")), 0)
        p *= float(q[i])
        left[i] = False
    return p


def exact_law(S, b, sizes, tau, within_chunk="plackett_luce", normalise=True):
    """Probability of every ordered selection under the sequential definition (or a wrong variant)."""
    law = {}
    for seq in itertools.permutations(range(S.shape[0]), b):
        p, start = 1.0, 0
        for m in sizes:
            chunk, selected = list(seq[start:start + m]), list(seq[:start])
            score = cbar(S, selected) if normalise else cbar(S, selected) * (2 * len(selected) + 1)
            logits = (tau * score).masked_fill(torch.isin(torch.arange(S.shape[0]), torch.tensor(selected,
                                                                                              dtype=torch.long)),
                                               float("-inf"))
            if within_chunk == "plackett_luce":
                p *= plackett_luce(logits, chunk)
            else:  # wrong: m independent draws, rejected unless distinct
                q = torch.softmax(logits, 0)
                distinct = sum(float(torch.prod(q[list(c)])) for c in itertools.permutations(
                    [i for i in range(len(q)) if q[i] > 0], m))
                p *= float(torch.prod(q[chunk])) / distinct
            start += m
        law[seq] = p
    return law


def chi_square_p(counts: Counter, law: dict, n: int, *, null: bool = True) -> float:
    """p-value of the counts under `law`; for the law under test (null=True) every cell must expect >= 5."""
    keys = sorted(law)
    observed = [counts.get(k, 0) for k in keys]
    expected = [law[k] * n for k in keys]
    assert sum(observed) == n
    assert not null or min(expected) >= 5, "design the case so every cell expects >= 5 draws"
    return stats.chisquare(observed, expected).pvalue


def draw(cfg, b, batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    return Counter(tuple(select(cfg, b, **batch, generator=g).indices.tolist()) for _ in range(n))


# ----------------------------------------------------------------------------------------------
# the sampling law


def test_law_chunks_of_one_matches_sequential_definition():
    """B=5, b=2, n=2: first pick from softmax(tau s(x,x)), second from softmax(tau cbar) given the first."""
    batch, tau, n = make_batch(5, seed=1), 1.0, 4000       # seed/tau: every cell expects >= 74 draws
    S = score_matrix(batch)
    law = exact_law(S, 2, [1, 1], tau)
    assert abs(sum(law.values()) - 1) < 1e-9
    counts = draw(SelectionConfig(n_chunks=2, tau=tau), 2, batch, n, seed=1)
    assert chi_square_p(counts, law, n) > P_THRESHOLD
    # power: the same counts reject the law without the 1/(2|selected|+1) normalisation
    assert chi_square_p(counts, exact_law(S, 2, [1, 1], tau, normalise=False), n, null=False) < P_THRESHOLD


def test_law_chunk_of_two_is_gumbel_top_k_without_replacement():
    """B=5, b=3, n=2 (chunks of 2 then 1): Plackett-Luce order inside a chunk, then the conditional."""
    batch, tau, n = make_batch(5, seed=5), 0.5, 6000       # every cell expects >= 13 draws
    S = score_matrix(batch)
    assert chunk_sizes(3, 2) == [2, 1]
    law = exact_law(S, 3, [2, 1], tau)
    counts = draw(SelectionConfig(n_chunks=2, tau=tau), 3, batch, n, seed=2)
    assert chi_square_p(counts, law, n) > P_THRESHOLD
    # power: rejects "independent draws, rejected unless distinct" inside the chunk, and a wrong normaliser
    assert chi_square_p(counts, exact_law(S, 3, [2, 1], tau, within_chunk="reject"), n, null=False) < P_THRESHOLD
    assert chi_square_p(counts, exact_law(S, 3, [2, 1], tau, normalise=False), n, null=False) < P_THRESHOLD


@pytest.mark.parametrize("rule", ["learnability", "independent_learnability"])
def test_tau_zero_is_uniform(rule):
    batch, n = make_batch(5, seed=3), 3000
    counts = draw(SelectionConfig(rule=rule, n_chunks=2, tau=0.0), 2, batch, n, seed=4)
    uniform = {seq: 1 / 20 for seq in itertools.permutations(range(5), 2)}
    assert chi_square_p(counts, uniform, n) > P_THRESHOLD
    # power: the tau = 3 law of these scores is rejected by the tau = 0 draws
    assert chi_square_p(counts, exact_law(score_matrix(batch), 2, [1, 1], 3.0), n, null=False) < P_THRESHOLD


# ----------------------------------------------------------------------------------------------
# limits, baselines, bookkeeping


def greedy(S, b, sizes):
    """Deterministic JEST: each round takes the top-m of cbar among the unselected (float64)."""
    selected = []
    for m in sizes:
        score = cbar(S, selected)
        score[selected] = float("-inf")
        selected += torch.topk(score, m).indices.tolist()
    return selected


@pytest.mark.parametrize("rule", ["learnability", "easy_reference"])
@pytest.mark.parametrize("b,n_chunks", [(12, 4), (10, 4), (7, 16)])
def test_topk_and_large_tau_equal_greedy(rule, b, n_chunks):
    batch = make_batch(40, seed=5, ds=24, dr=40)
    want = greedy(score_matrix(batch, rule), b, chunk_sizes(b, n_chunks))
    top = select(SelectionConfig(rule=rule, n_chunks=n_chunks, topk=True), b, **batch)
    assert top.indices.tolist() == want
    hot = select(SelectionConfig(rule=rule, n_chunks=n_chunks, tau=1e7), b, **batch,
                 generator=torch.Generator().manual_seed(0))
    assert hot.indices.tolist() == want


def test_scores_record_the_round_that_picked_each_candidate():
    batch = make_batch(40, seed=6, ds=24, dr=40)
    S = score_matrix(batch)
    res = select(SelectionConfig(n_chunks=4, topk=True), 12, **batch)
    picks = res.indices.tolist()
    torch.testing.assert_close(res.self_scores.double(), S.diagonal(), rtol=1e-5, atol=1e-5)
    for r in range(4):
        chunk, before = picks[3 * r:3 * r + 3], picks[:3 * r]
        torch.testing.assert_close(res.scores[chunk].double(), cbar(S, before)[chunk], rtol=1e-5, atol=1e-5)
    rest = [i for i in range(40) if i not in picks]
    torch.testing.assert_close(res.scores[rest].double(), cbar(S, picks[:9])[rest], rtol=1e-5, atol=1e-5)
    assert res.backend == "torch"


def test_baselines():
    batch = make_batch(40, seed=7, ds=24, dr=40)
    S = score_matrix(batch)
    res = select(SelectionConfig(rule="independent_learnability", topk=True), 10, **batch)
    assert res.indices.tolist() == torch.topk(S.diagonal(), 10).indices.tolist() and res.backend == "none"
    ell_stu = torch.nn.functional.softplus(-(4.0 * (batch["stu_img"] * batch["stu_txt"]).sum(1) - 1.0))
    res = select(SelectionConfig(rule="student_loss", topk=True), 10, stu_img=batch["stu_img"],
                 stu_txt=batch["stu_txt"], stu_scale=4.0, stu_bias=-1.0)
    assert res.indices.tolist() == torch.topk(ell_stu, 10).indices.tolist()
    torch.testing.assert_close(res.scores, ell_stu)
    # one chunk of the joint rule is the independent baseline: same law, same noise, same draw
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    joint = select(SelectionConfig(n_chunks=1, tau=2.0), 10, **batch, generator=g1)
    indep = select(SelectionConfig(rule="independent_learnability", tau=2.0), 10, **batch, generator=g2)
    assert torch.equal(joint.indices, indep.indices)


def test_easy_reference_needs_no_student():
    batch = make_batch(40, seed=8, ds=24, dr=40)
    ref_only = {k: v for k, v in batch.items() if k.startswith("ref")}
    res = select(SelectionConfig(rule="easy_reference", n_chunks=3), 9, **ref_only,
                 generator=torch.Generator().manual_seed(0))
    assert len(set(res.indices.tolist())) == 9


def test_huge_scores_give_no_nan_and_distinct_indices():
    batch = make_batch(64, seed=9, ds=24, dr=40)
    batch.update(stu_scale=1e30, stu_bias=1e29, ref_scale=3e30, ref_bias=-1e29)   # losses ~1e30
    for tau, topk in [(10.0, False), (1e300, False), (10.0, True)]:   # tau * score overflows float64 too
        res = select(SelectionConfig(n_chunks=8, tau=tau, topk=topk), 32, **batch,
                     generator=torch.Generator().manual_seed(1))
        idx = res.indices.tolist()
        assert len(idx) == 32 and len(set(idx)) == 32 and all(0 <= i < 64 for i in idx)
        assert torch.isfinite(res.scores).all() and torch.isfinite(res.self_scores).all()


def test_non_finite_embeddings_raise():
    batch = make_batch(20, seed=10)
    batch["ref_txt"] = batch["ref_txt"].clone()
    batch["ref_txt"][3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not finite for candidates \[3\]"):
        select(SelectionConfig(), 5, **batch)


def test_deterministic_given_generator():
    batch = make_batch(200, seed=11, ds=24, dr=40)
    cfg = SelectionConfig(n_chunks=16, tau=10.0)
    a = select(cfg, 40, **batch, generator=torch.Generator().manual_seed(123))
    b = select(cfg, 40, **batch, generator=torch.Generator().manual_seed(123))
    c = select(cfg, 40, **batch, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    assert not torch.equal(a.indices, c.indices)
    assert len(set(a.indices.tolist())) == 40


def test_chunk_sizes_and_validation():
    assert chunk_sizes(64, 16) == [4] * 16
    assert chunk_sizes(10, 4) == [3, 3, 2, 2]
    assert chunk_sizes(3, 16) == [1, 1, 1]
    assert chunk_sizes(5, 1) == [5]
    with pytest.raises(ValueError):
        chunk_sizes(0, 4)
    with pytest.raises(ValueError, match="rule must be one of"):
        SelectionConfig(rule="jest")
    with pytest.raises(ValueError, match="tau"):
        SelectionConfig(tau=-1.0)
    with pytest.raises(ValueError, match="n_chunks"):
        SelectionConfig(n_chunks=0)
    batch = make_batch(20, seed=12)
    with pytest.raises(ValueError, match=r"b=21 must be an int in \[1, B=20\]"):
        select(SelectionConfig(), 21, **batch)
    with pytest.raises(ValueError, match="reference"):
        select(SelectionConfig(), 5, stu_img=batch["stu_img"], stu_txt=batch["stu_txt"], stu_scale=4.0,
               stu_bias=-1.0)


def test_gumbel_top_k_respects_taken():
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    taken = torch.tensor([True, False, True, False, False])
    got = gumbel_top_k(scores, 3, tau=1.0, taken=taken, topk=True)
    assert got.tolist() == [1, 3, 4]
    got = gumbel_top_k(scores, 3, tau=1e6, taken=taken, generator=torch.Generator().manual_seed(0))
    assert got.tolist() == [1, 3, 4]


# ---------------------------------------------------------------- data-parallel selection (gather)


class ThreadGather:
    """All-gather among `world` threads of one process: a stand-in for torch.distributed that lets
    the ranks of a data-parallel selection run side by side in a unit test."""

    def __init__(self, world: int):
        self.world = world
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world, timeout=30)

    def for_rank(self, rank: int):
        def gather(rows: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = rows.clone()
            self.barrier.wait()
            out = torch.cat(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before everyone has read it
            return out
        return gather


def run_ranks(world, fn):
    """fn(rank, gather) on `world` threads; results in rank order (exceptions re-raised)."""
    group, results, errors = ThreadGather(world), [None] * world, []

    def target(rank):
        try:
            results[rank] = fn(rank, group.for_rank(rank))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
            group.barrier.abort()
    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def shard(batch, rank, world):
    B = batch["ref_img"].shape[0] // world
    return {k: (v[rank * B:(rank + 1) * B] if torch.is_tensor(v) else v) for k, v in batch.items()}


def sharded_greedy(S, world, b, sizes):
    """Deterministic data-parallel JEST from the definition (float64): in each round every rank takes
    the top-m of cbar among its own unselected candidates, where cbar conditions on all ranks' picks."""
    B = S.shape[0] // world
    selected, per_rank = [], [[] for _ in range(world)]
    for m in sizes:
        score = cbar(S, selected)
        score[selected] = float("-inf")
        new = []
        for r in range(world):
            top = torch.topk(score[r * B:(r + 1) * B], m).indices
            per_rank[r] += top.tolist()
            new += (top + r * B).tolist()
        selected += new
    return per_rank


@pytest.mark.parametrize("rule", ["learnability", "easy_reference"])
@pytest.mark.parametrize("world,b,n_chunks", [(2, 6, 3), (3, 5, 4), (2, 4, 16)])
def test_gathered_selection_conditions_on_every_ranks_picks(rule, world, b, n_chunks):
    batch = make_batch(20 * world, seed=11, ds=24, dr=40)
    want = sharded_greedy(score_matrix(batch, rule), world, b, chunk_sizes(b, n_chunks))
    got = run_ranks(world, lambda r, g: select(SelectionConfig(rule=rule, n_chunks=n_chunks, topk=True), b,
                                               **shard(batch, r, world), gather=g).indices.tolist())
    assert got == want
    # and it is not what each rank would pick on its own (the joint terms cross the ranks)
    alone = [select(SelectionConfig(rule=rule, n_chunks=n_chunks, topk=True), b, **shard(batch, r, world))
             .indices.tolist() for r in range(world)]
    assert alone != want


def test_gathered_selection_of_one_rank_is_plain_selection():
    batch = make_batch(40, seed=3)
    cfg = SelectionConfig(rule="learnability", n_chunks=4, tau=10.0)
    plain = select(cfg, 12, **batch, generator=torch.Generator().manual_seed(7))
    one = select(cfg, 12, **batch, generator=torch.Generator().manual_seed(7), gather=lambda x: x.clone())
    assert one.indices.tolist() == plain.indices.tolist()
    assert torch.allclose(one.scores, plain.scores, atol=1e-6)


def test_gathered_selection_rejects_ranks_that_disagree_on_b():
    batch = make_batch(40, seed=3)
    with pytest.raises((RuntimeError, threading.BrokenBarrierError)):
        run_ranks(2, lambda r, g: select(SelectionConfig(rule="learnability", n_chunks=2, topk=True), 4 + 2 * r,
                                         **shard(batch, r, 2), gather=g))
