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


# ---------------------------------------------------------------- unchanged selections, one loop, no host syncs

# Recorded with the implementation of commit 5dbecb0 (separate W = 1 and gathered loops, per-round checks)
# on this seed and these inputs: the rewrite must select the same candidates in the same order with the same
# scores. (rule, dtype, n_chunks, tau, topk, seed) -> (indices, sum of scores, sum of squared scores).
RECORDED = {
    ("learnability", "float32", 16, 10.0, False, 0): (
        [6, 191, 187, 114, 95, 170, 66, 136, 186, 75, 247, 177, 238, 210, 245, 251, 8, 258, 27, 184, 100, 68, 221,
         115, 123, 109, 223, 192, 298, 289, 197, 265, 276, 84, 253, 50, 63, 167, 29, 260],
        53.69332429394126, 17.825363569488594),
    ("learnability", "float32", 5, 1.0, False, 1): (
        [21, 90, 87, 296, 151, 108, 132, 61, 172, 111, 166, 157, 253, 18, 38, 107, 279, 12, 32, 91, 205, 294, 35,
         79, 223, 201, 202, 217, 255, 240, 195, 281, 210, 70, 62, 115, 30, 206, 109, 47],
        52.5947604002431, 14.893943178202257),
    ("easy_reference", "float32", 16, 10.0, False, 2): (
        [126, 147, 153, 249, 222, 220, 196, 234, 122, 237, 0, 44, 89, 202, 282, 69, 198, 1, 22, 289, 233, 278,
         286, 160, 195, 58, 254, 149, 212, 100, 248, 53, 177, 294, 268, 260, 102, 290, 151, 88],
        -66.21985190361738, 14.962837397422014),
    ("learnability", "float16", 16, 10.0, False, 3): (
        [276, 59, 297, 162, 179, 107, 235, 152, 277, 202, 279, 112, 9, 283, 175, 0, 15, 56, 27, 298, 114, 88, 174,
         1, 272, 90, 172, 189, 299, 102, 80, 117, 245, 21, 273, 79, 237, 171, 53, 193],
        53.51556247472763, 17.659211582420806),
    ("learnability", "float32", 7, 10.0, True, 4): (
        [117, 30, 288, 129, 100, 230, 218, 215, 131, 275, 77, 112, 55, 9, 226, 195, 42, 258, 108, 287, 94, 245,
         237, 206, 170, 23, 198, 107, 1, 50, 284, 220, 69, 37, 192, 208, 5, 115, 137, 87],
        59.21067203528946, 31.221550797132625),
}
# W = 2 (ThreadGather), B = 150 per rank, b = 24, 8 chunks, tau = 10, rank r seeded r: per-rank indices, score sums
RECORDED_W2 = {
    "learnability": ([[15, 63, 30, 115, 76, 96, 95, 88, 103, 36, 43, 124, 136, 17, 66, 94, 47, 29, 87, 120, 75, 27,
                       97, 72],
                      [32, 112, 28, 85, 146, 47, 18, 111, 21, 22, 16, 127, 108, 12, 91, 129, 144, 55, 13, 106, 94,
                       73, 52, 42]], [27.753754917532206, 29.643649466335773]),
    "easy_reference": ([[63, 48, 53, 76, 114, 69, 95, 89, 30, 36, 43, 86, 17, 136, 66, 94, 62, 29, 87, 115, 120, 27,
                         97, 72],
                        [21, 108, 122, 146, 47, 29, 111, 38, 18, 22, 16, 127, 12, 32, 91, 129, 144, 55, 94, 13, 24,
                         73, 51, 52]], [-33.92596881091595, -33.13969711959362]),
}


def _recorded_batch(rule, dtype, seed):
    batch = make_batch(300, seed=100 + seed, ds=24, dr=40)
    for k in ("stu_img", "stu_txt", "ref_img", "ref_txt"):
        batch[k] = batch[k].to(getattr(torch, dtype))
    return {k: v for k, v in batch.items() if k.startswith("ref")} if rule == "easy_reference" else batch


@pytest.mark.parametrize("case", list(RECORDED), ids=["-".join(map(str, c)) for c in RECORDED])
def test_same_selection_as_the_previous_implementation(case):
    rule, dtype, n_chunks, tau, topk, seed = case
    res = select(SelectionConfig(rule=rule, n_chunks=n_chunks, tau=tau, topk=topk), 40,
                 **_recorded_batch(rule, dtype, seed), generator=torch.Generator().manual_seed(seed))
    idx, total, squares = RECORDED[case]
    assert res.indices.tolist() == idx
    assert float(res.scores.double().sum()) == pytest.approx(total, rel=1e-6)
    assert float(res.scores.double().pow(2).sum()) == pytest.approx(squares, rel=1e-6)


@pytest.mark.parametrize("rule", list(RECORDED_W2))
def test_same_gathered_selection_as_the_previous_implementation(rule):
    batch = make_batch(2 * 150, seed=200, ds=24, dr=40)
    out = run_ranks(2, lambda r, g: select(SelectionConfig(rule=rule, n_chunks=8, tau=10.0), 24, **shard(batch, r, 2),
                                           generator=torch.Generator().manual_seed(r), gather=g))
    idx, sums = RECORDED_W2[rule]
    assert [o.indices.tolist() for o in out] == idx
    assert [float(o.scores.double().sum()) for o in out] == pytest.approx(sums, rel=1e-6)


class CountingGather:
    """Identity all-gather of one rank that records what crossed it."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, rows):
        self.calls.append((rows.dtype, tuple(rows.shape)))
        return rows.clone()


def test_ranks_score_only_their_own_candidates_against_gathered_rows(monkeypatch):
    """W = 3: each conditional-score call takes this rank's B candidates and the 3 * m newest picks' rows
    (not B + 3 * b rows of which B are kept), in the dtypes the embeddings came in (bf16 student,
    fp16 reference), one gather per round but the last."""
    import pipeline.selection as sel
    world, B, b, n_chunks = 3, 30, 6, 3
    batch = make_batch(world * B, seed=13, ds=24, dr=40)
    for k, dt in (("stu_img", torch.bfloat16), ("stu_txt", torch.bfloat16), ("ref_img", torch.float16),
                  ("ref_txt", torch.float16)):
        batch[k] = batch[k].to(dt)
    calls: list[tuple] = []
    lock = threading.Lock()
    real = sel.cross_scores

    def spy(setup, cand, picked, picked_ids=None):
        with lock:
            calls.append(([tuple(t.shape) for t in cand], [(tuple(t.shape), t.dtype) for t in picked], picked_ids))
        return real(setup, cand, picked, picked_ids)
    monkeypatch.setattr(sel, "cross_scores", spy)
    run_ranks(world, lambda r, g: select(SelectionConfig(n_chunks=n_chunks, tau=10.0), b, **shard(batch, r, world),
                                         generator=torch.Generator().manual_seed(r), gather=g))
    assert len(calls) == world * (n_chunks - 1)
    m = b // n_chunks
    for cand_shapes, picked, ids in calls:
        assert cand_shapes == [(B, 24), (B, 24), (B, 40), (B, 40)]
        assert picked == [((world * m, 24), torch.bfloat16), ((world * m, 24), torch.bfloat16),
                          ((world * m, 40), torch.float16), ((world * m, 40), torch.float16)]
        assert ids is None
    # one gather per round but the last, of the picks' bytes: m rows of 2 * (24 * 2 + 40 * 2) bytes
    gather = CountingGather()
    select(SelectionConfig(n_chunks=n_chunks, tau=10.0), b, **shard(batch, 0, world),
           generator=torch.Generator().manual_seed(0), gather=gather)
    assert gather.calls == [(torch.uint8, (m, 2 * (24 * 2 + 40 * 2)))] * (n_chunks - 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("world", [1, 2])
def test_half_embeddings_select_as_their_float32_values(dtype, world):
    """Half inputs stay half through the gather and are computed in fp32: the same selection and scores as
    passing the fp32 values of those half numbers."""
    batch = make_batch(world * 60, seed=14, ds=24, dr=40)
    half = {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in batch.items()}
    up = {k: (v.float() if torch.is_tensor(v) else v) for k, v in half.items()}
    cfg = SelectionConfig(n_chunks=4, tau=10.0)

    def run(inputs):
        if world == 1:
            return [select(cfg, 12, **inputs, generator=torch.Generator().manual_seed(5))]
        return run_ranks(world, lambda r, g: select(cfg, 12, **shard(inputs, r, world),
                                                    generator=torch.Generator().manual_seed(r), gather=g))
    for a, b in zip(run(half), run(up)):
        assert a.indices.tolist() == b.indices.tolist()
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)


SYNCING = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class SyncCounter:
    """Counts the Python-level ways a tensor's value reaches the host (each a device sync on CUDA):
    Tensor.item/.tolist/.numpy and bool()/int()/float()/index conversions."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in SYNCING:
            orig = getattr(torch.Tensor, name)

            def counted(self_, *args, _name=name, _orig=orig, **kwargs):
                self.calls.append(_name)
                return _orig(self_, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("gathered", [False, True])
@pytest.mark.parametrize("rule", ["learnability", "easy_reference"])
def test_rounds_make_no_host_syncs(monkeypatch, rule, gathered):
    """The number of host reads of a selection does not grow with the number of rounds: 2 with float
    scales (self scores finite before the rounds, final scores finite after them), 3 with 0-dim tensor
    scales (read together once)."""
    batch = make_batch(200, seed=15, ds=24, dr=40)
    tensor_scales = {k: torch.tensor(v) for k, v in batch.items() if not torch.is_tensor(v)}
    counts = {}
    for scales in ("float", "tensor"):
        for n_chunks in (2, 16):
            inputs = {**batch, **(tensor_scales if scales == "tensor" else {})}
            with monkeypatch.context() as mp:
                counter = SyncCounter(mp)
                select(SelectionConfig(rule=rule, n_chunks=n_chunks, tau=10.0), 40, **inputs,
                       generator=torch.Generator().manual_seed(0), gather=CountingGather() if gathered else None)
            counts[scales, n_chunks] = list(counter.calls)
    assert counts["float", 2] == counts["float", 16] == ["__bool__", "__bool__"]
    assert counts["tensor", 2] == counts["tensor", 16] == ["tolist", "__bool__", "__bool__"]
    # power: the counter sees a per-round check of the kind the rounds used to make
    with monkeypatch.context() as mp:
        counter = SyncCounter(mp)
        bool(torch.isfinite(torch.ones(3)).all())
        int(torch.tensor(3))
        torch.tensor([1.0]).item()
    assert counter.calls == ["__bool__", "__int__", "item"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("rule", ["learnability", "easy_reference"])
def test_rounds_make_no_cuda_syncs(monkeypatch, rule):
    """On CUDA, with the two finiteness reads outside the rounds stubbed out, a whole selection (Triton
    kernel, sampling, bookkeeping) runs under sync debug mode "error" without a synchronisation."""
    import pipeline.selection as sel
    batch = {k: (v.cuda().to(torch.bfloat16) if torch.is_tensor(v) else v)
             for k, v in make_batch(4096, seed=16, ds=256, dr=256).items()}
    cfg = SelectionConfig(rule=rule, n_chunks=16, tau=10.0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    select(cfg, 819, **batch, generator=gen)          # warm-up: the autotuner times its configs (syncs)
    torch.cuda.synchronize()
    monkeypatch.setattr(sel, "_require_finite", lambda name, x: None)
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = select(cfg, 819, **batch, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(set(res.indices.tolist())) == 819 and res.backend == "triton"
