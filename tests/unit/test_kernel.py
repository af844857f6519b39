"""Parity tests of kernels/cond_scores.py: Triton kernel (CPU interpreter / CUDA) vs PyTorch reference vs a
naive full-matrix float64 computation, on odd shapes, every dtype and both rules; picked rows given as indices
(``conditional_scores``) and as rows of which some are other ranks' (``cross_scores``), at the paper's widths
d in {128, 256, 768} with up to 2048 picked rows, and every tiling the GPU autotuner may choose.

Triton decides between compiled and interpreted when ``@triton.jit`` runs, i.e. when kernels.cond_scores is
imported, and the interpreter must not leak into other test modules. So the interpreter cases run in a
child process (this file executed as a script with TRITON_INTERPRET=1 in the child's environment only):
the child draws the inputs, runs backend="triton", saves inputs and outputs; the assertions run here.
The interpreter is 300-1300x slower than torch (STACK.md), hence B <= 256. bf16 is silently wrong in the
interpreter, so bf16 Triton parity runs only on CUDA (the one skip of this file, without a GPU).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kernels import cond_scores as cs
from kernels.cond_scores import (Embeddings, conditional_scores, cross_scores, pair_loss_self, prepare_scores,
                                 resolve_backend, self_scores, take_rows)

SHAPES = [(1, 1), (37, 5), (129, 33), (250, 33)]          # (B, k): odd, non-powers of two
DIMS = [(24, 40), (40, 24)]                              # (ds, dr): student and reference widths differ
RULES = ["learnability", "easy_reference"]
SCALES = dict(stu_scale=10.0, stu_bias=-10.0, ref_scale=14.0, ref_bias=-6.0)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_inputs(B, k, ds, dr, dtype, seed):
    """Normalised random embeddings; reference text = noisy copy of its image so positives score high."""
    g = torch.Generator().manual_seed(seed)

    def unit(n, d):
        return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)

    su, ru = unit(B, ds), unit(B, dr)
    sv = torch.nn.functional.normalize(su + 1.5 * torch.randn(B, ds, generator=g), dim=1)
    rv = torch.nn.functional.normalize(ru + 0.5 * torch.randn(B, dr, generator=g), dim=1)
    chunk = torch.randperm(B, generator=g)[:k]               # distinct; its members are candidates too
    return [t.to(dtype) for t in (su, sv, ru, rv)] + [chunk]


def naive_scores(su, sv, ru, rv, rule, *, stu_scale, stu_bias, ref_scale, ref_bias):
    """Full B x B pairwise score matrix s(i, j) in float64 (the definition, no blocking)."""
    def ell(u, v, a, c):
        logits = a * (u.double() @ v.double().T) + c
        y = 2.0 * torch.eye(len(u), dtype=torch.float64) - 1.0
        return torch.logaddexp(torch.zeros_like(logits), -y * logits)   # softplus(-y * l), exact

    s = -ell(ru, rv, ref_scale, ref_bias)
    if rule == "learnability":
        s = s + ell(su, sv, stu_scale, stu_bias)
    return s


def naive_conditional(su, sv, ru, rv, chunk, rule, **scales):
    s = naive_scores(su, sv, ru, rv, rule, **scales)
    return s[:, chunk].sum(1) + s[chunk, :].sum(0)


def make_cross_inputs(B, k, ds, dr, dtype, seed, shared):
    """B candidates and k picked rows, `shared` of which are candidates (ids = their index, y = +1 there)
    and the rest foreign rows (ids = -1: another rank's picks), in shuffled order."""
    g = torch.Generator().manual_seed(seed)

    def unit(n, d):
        return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)

    cand = [unit(B, ds), None, unit(B, dr), None]
    cand[1] = torch.nn.functional.normalize(cand[0] + 1.5 * torch.randn(B, ds, generator=g), dim=1)
    cand[3] = torch.nn.functional.normalize(cand[2] + 0.5 * torch.randn(B, dr, generator=g), dim=1)
    own = torch.randperm(B, generator=g)[:shared]
    foreign = [unit(k - shared, d) for d in (ds, ds, dr, dr)]
    order = torch.randperm(k, generator=g)
    picked = [torch.cat([c[own], f])[order] for c, f in zip(cand, foreign)]
    ids = torch.cat([own, torch.full((k - shared,), -1)])[order]
    return Embeddings(*(t.to(dtype) for t in cand)), Embeddings(*(t.to(dtype) for t in picked)), ids


def naive_cross(cand, picked, ids, rule, *, stu_scale, stu_bias, ref_scale, ref_bias):
    """sum_j s(x, j) + s(j, x) over picked rows j in float64, from the definition (y = +1 iff ids[j] == x)."""
    y = torch.where(torch.arange(len(cand.ref_img))[:, None] == ids[None, :], 1.0, -1.0).double()

    def ell_two_way(u, v, pu, pv, a, c):
        l_xj = a * (u.double() @ pv.double().T) + c
        l_jx = a * (v.double() @ pu.double().T) + c
        zero = torch.zeros_like(l_xj)
        return (torch.logaddexp(zero, -y * l_xj) + torch.logaddexp(zero, -y * l_jx)).sum(1)

    s = -ell_two_way(cand.ref_img, cand.ref_txt, picked.ref_img, picked.ref_txt, ref_scale, ref_bias)
    if rule == "learnability":
        s = s + ell_two_way(cand.stu_img, cand.stu_txt, picked.stu_img, picked.stu_txt, stu_scale, stu_bias)
    return s


def assert_close_f64(got, want, what):
    # fp32 accumulation of up to 4k terms of size <~ 30: a few 1e-6 relative
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-4, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------
# PyTorch reference vs the float64 definition (in-process: no Triton involved)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("B,k", SHAPES)
@pytest.mark.parametrize("ds,dr", DIMS)
def test_torch_path_matches_float64_definition(B, k, ds, dr, dtype, rule):
    su, sv, ru, rv, chunk = make_inputs(B, k, ds, dr, DTYPES[dtype], seed=B * 1000 + k)
    got = conditional_scores(su, sv, ru, rv, chunk, rule=rule, backend="torch", **SCALES)
    assert got.dtype == torch.float32 and got.shape == (B,)
    # the definition evaluated on the same (rounded) inputs: only the fp32 accumulation may differ
    want = naive_conditional(su, sv, ru, rv, chunk, rule, **SCALES)
    assert_close_f64(got, want, f"torch path {dtype} {rule} B={B} k={k}")


def test_torch_path_blocking_and_index_dtypes(monkeypatch):
    """Several candidate blocks (memory O(block * k)) give the same result; int32 chunks work too."""
    su, sv, ru, rv, chunk = make_inputs(250, 33, 24, 40, torch.float32, seed=7)
    whole = conditional_scores(su, sv, ru, rv, chunk, rule="learnability", backend="torch", **SCALES)
    monkeypatch.setattr(cs, "_TORCH_BLOCK_ELEMS", 33 * 16)        # 16 candidates per block, last one partial
    blocked = conditional_scores(su, sv, ru, rv, chunk.to(torch.int32), rule="learnability", backend="torch",
                                 **SCALES)
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-5)
    empty = conditional_scores(su, sv, ru, rv, chunk[:0], rule="learnability", backend="torch", **SCALES)
    assert torch.equal(empty, torch.zeros(250))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rule", RULES)
def test_cross_scores_torch_with_foreign_rows_matches_definition(dtype, rule):
    """Picked rows that are partly other ranks' (ids -1), k > B, half inputs computed in fp32."""
    cand, picked, ids = make_cross_inputs(37, 70, 24, 40, DTYPES[dtype], seed=21, shared=9)
    setup = prepare_scores(*cand, rule=rule, backend="torch", **SCALES)
    got = cross_scores(setup, cand, picked, ids)
    assert got.dtype == torch.float32 and got.shape == (37,)
    assert_close_f64(got, naive_cross(cand, picked, ids, rule, **SCALES), f"cross {dtype} {rule}")
    # ids None = no picked row is a candidate = every id -1
    none = cross_scores(setup, cand, picked)
    assert torch.equal(none, cross_scores(setup, cand, picked, torch.full((70,), -1)))
    assert_close_f64(none, naive_cross(cand, picked, torch.full((70,), -1), rule, **SCALES), "ids None")
    assert not torch.allclose(none, got)   # the y = +1 entries matter


def test_half_inputs_equal_their_float32_values_on_the_torch_path():
    """The reference keeps fp16/bf16 inputs as they are and computes in fp32: the same numbers as
    feeding it the fp32 values of those half inputs."""
    for dtype in (torch.float16, torch.bfloat16):
        cand, picked, ids = make_cross_inputs(129, 33, 24, 40, dtype, seed=22, shared=5)
        setup = prepare_scores(*cand, rule="learnability", backend="torch", **SCALES)
        up = [Embeddings(*(t.float() for t in e)) for e in (cand, picked)]
        torch.testing.assert_close(cross_scores(setup, cand, picked, ids), cross_scores(setup, *up, ids),
                                   rtol=0, atol=0)


def test_tensor_scales_are_read_once():
    """0-dim tensor scales are read as floats in one transfer (one .tolist()), not one per scalar."""
    su, sv, ru, rv, _ = make_inputs(37, 5, 24, 40, torch.float32, seed=4)
    reads = []
    orig = torch.Tensor.tolist

    def counting(self):
        reads.append(tuple(self.shape))
        return orig(self)
    torch.Tensor.tolist = counting
    try:
        setup = prepare_scores(su, sv, ru, rv, rule="learnability", stu_scale=torch.tensor(10.0),
                               stu_bias=torch.tensor([-10.0]), ref_scale=torch.tensor(14.0), ref_bias=-6.0)
    finally:
        torch.Tensor.tolist = orig
    assert reads == [(3,)]
    assert (setup.stu_scale, setup.stu_bias, setup.ref_scale, setup.ref_bias) == (10.0, -10.0, 14.0, -6.0)
    with pytest.raises(ValueError, match="stu_scale must be finite"):
        prepare_scores(su, sv, ru, rv, rule="learnability", stu_scale=torch.tensor(float("nan")),
                       stu_bias=0.0, ref_scale=1.0, ref_bias=0.0)
    with pytest.raises(ValueError, match="must be a scalar"):
        prepare_scores(su, sv, ru, rv, rule="learnability", stu_scale=torch.ones(2), stu_bias=0.0,
                       ref_scale=1.0, ref_bias=0.0)


def test_autotune_configs_and_pruning():
    """Every config is a GPU-valid tiling; pruning drops tiles far larger than the problem, keeps one."""
    for c in cs.AUTOTUNE_CONFIGS + [cs.INTERPRETER_CONFIG]:
        for name in ("BLOCK_B", "BLOCK_K", "BLOCK_D"):
            blk = c.kwargs[name]
            assert blk >= 16 and blk & (blk - 1) == 0, (c, name)
    big = cs._prune_configs(cs.AUTOTUNE_CONFIGS, {"B_BUCKET": 262144, "K_BUCKET": 4096})
    assert big == cs.AUTOTUNE_CONFIGS
    small = cs._prune_configs(cs.AUTOTUNE_CONFIGS, {"B_BUCKET": 32, "K_BUCKET": 16})
    assert small and all(c.kwargs["BLOCK_B"] <= 32 and c.kwargs["BLOCK_K"] <= 32 for c in small)
    assert cs._bucket(1) == 16 and cs._bucket(163840) == 262144 and cs._bucket(2048) == 2048


def test_huge_logits_stay_finite_and_exact():
    """softplus must not overflow: logits around 1e4 give finite scores equal to the definition."""
    su, sv, ru, rv, chunk = make_inputs(37, 5, 24, 40, torch.float32, seed=3)
    big = dict(stu_scale=1e4, stu_bias=-3e3, ref_scale=2e4, ref_bias=5e3)
    got = conditional_scores(su, sv, ru, rv, chunk, rule="learnability", backend="torch", **big)
    assert torch.isfinite(got).all()
    want = naive_conditional(su, sv, ru, rv, chunk, "learnability", **big)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0.5)   # terms ~1e4: fp32 ulp ~1e-3


@pytest.mark.parametrize("rule", RULES)
def test_self_scores_are_the_diagonal(rule):
    su, sv, ru, rv, _ = make_inputs(41, 1, 24, 40, torch.float16, seed=11)
    stu = (su, sv) if rule == "learnability" else (None, None)
    got = self_scores(*stu, ru, rv, rule=rule, **SCALES)
    want = naive_scores(su, sv, ru, rv, rule, **SCALES).diagonal()
    assert_close_f64(got, want, f"self_scores {rule}")
    ell = pair_loss_self(su, sv, 10.0, -10.0)
    y = torch.nn.functional.softplus(-(10.0 * (su.double() * sv.double()).sum(1) - 10.0))
    assert_close_f64(ell, y, "pair_loss_self")


def test_easy_reference_ignores_the_student():
    su, sv, ru, rv, chunk = make_inputs(37, 5, 24, 40, torch.float32, seed=5)
    without = conditional_scores(None, None, ru, rv, chunk, rule="easy_reference", backend="torch",
                                 stu_scale=None, stu_bias=None, ref_scale=14.0, ref_bias=-6.0)
    with_ = conditional_scores(su, sv, ru, rv, chunk, rule="easy_reference", backend="torch", **SCALES)
    assert torch.equal(without, with_)


def test_bad_inputs_raise_clear_errors():
    su, sv, ru, rv, chunk = make_inputs(37, 5, 24, 40, torch.float32, seed=1)
    call = dict(rule="learnability", backend="torch", **SCALES)
    with pytest.raises(ValueError, match="rule must be one of"):
        conditional_scores(su, sv, ru, rv, chunk, **{**call, "rule": "hard"})
    with pytest.raises(ValueError, match="backend must be one of"):
        conditional_scores(su, sv, ru, rv, chunk, **{**call, "backend": "cuda"})
    with pytest.raises(ValueError, match="student has 36 candidates"):
        conditional_scores(su[:36], sv[:36], ru, rv, chunk, **call)
    with pytest.raises(ValueError, match="same shape"):
        conditional_scores(su, sv[:, :8], ru, rv, chunk, **call)
    with pytest.raises(ValueError, match="student: image and text embeddings are required"):
        conditional_scores(None, None, ru, rv, chunk, **call)
    with pytest.raises(IndexError, match=r"\[0, 37\)"):
        conditional_scores(su, sv, ru, rv, torch.tensor([3, 37]), **call)
    with pytest.raises(ValueError, match="int64/int32"):
        conditional_scores(su, sv, ru, rv, chunk.float(), **call)
    with pytest.raises(TypeError, match="share one dtype"):
        conditional_scores(su, sv.half(), ru, rv, chunk, **call)
    with pytest.raises(ValueError, match="ref_scale must be finite"):
        conditional_scores(su, sv, ru, rv, chunk, **{**call, "ref_scale": float("inf")})
    with pytest.raises(ValueError, match="stu_bias is required"):
        conditional_scores(su, sv, ru, rv, chunk, **{**call, "stu_bias": None})


def test_backend_resolution_never_falls_back_silently():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    su, sv, ru, rv, chunk = make_inputs(37, 5, 24, 40, torch.float32, seed=2)
    if cs.triton_interpreting():   # this pytest process was started with TRITON_INTERPRET=1
        got = conditional_scores(su, sv, ru, rv, chunk, rule="learnability", backend="triton", **SCALES)
        assert_close_f64(got, naive_conditional(su, sv, ru, rv, chunk, "learnability", **SCALES), "triton")
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            conditional_scores(su, sv, ru, rv, chunk, rule="learnability", backend="triton", **SCALES)


# ----------------------------------------------------------------------------------------------
# Triton kernel in the CPU interpreter (child process) vs the PyTorch reference and the definition

# (B, k, ds, dr, dtype, rule, blocks, layout); blocks None = the launcher's defaults
INTERP_CASES = (
    [(B, k, 24, 40, dt, rule, None, "plain") for B, k in SHAPES for dt in ("float32", "float16") for rule in RULES]
    + [(37, 33, 40, 24, "float32", "learnability", (16, 16, 16), "plain"),   # several B, k and d tiles
       (129, 5, 24, 40, "float16", "learnability", (16, 16, 16), "plain"),
       (250, 33, 40, 24, "float32", "easy_reference", (32, 16, 16), "plain"),
       (129, 33, 24, 40, "float32", "learnability", (16, 16, 16), "strided"),  # row stride != d, transposed txt
       (37, 5, 24, 40, "float32", "learnability", None, "huge")]               # logits ~1e4
)
HUGE = dict(stu_scale=1e4, stu_bias=-3e3, ref_scale=2e4, ref_bias=5e3)


def _case_inputs(i, case):
    B, k, ds, dr, dtype, rule, blocks, layout = case
    su, sv, ru, rv, chunk = make_inputs(B, k, ds, dr, DTYPES[dtype], seed=100 + i)
    if layout == "strided":   # a column slice of a wider buffer, and a transposed (column-major) view
        su = torch.cat([su, torch.randn(B, 8)], 1)[:, :ds]
        rv = rv.T.contiguous().T
        assert su.stride(0) != ds and rv.stride(1) != 1
    scales = HUGE if layout == "huge" else SCALES
    return su, sv, ru, rv, chunk, scales


# Wide embeddings and large chunks (the paper's widths, W * m picked rows up to 2048), picked rows partly
# foreign (ids -1), through the autotuner's interpreter config: (B, k, ds, dr, dtype, rule). A few seconds
# each in the interpreter, so they run in their own child, marked slow except the two smallest.
WIDE_CASES = [(B, k, ds, dr, dt, rule) for B, k, ds, dr, rule in [
    (100, 1000, 128, 256, "learnability"),
    (250, 333, 256, 128, "easy_reference"),
    (37, 2048, 256, 768, "learnability"),
    (64, 2048, 768, 768, "learnability"),
] for dt in ("float32", "float16")]
WIDE_FAST = 4   # the first cases run by default; the rest are @slow
# every autotuning config, forced, on one case with several tiles of each size
CONFIG_CASE = (129, 70, 128, 256, "float32", "learnability")


def _wide_inputs(i, case):
    B, k, ds, dr, dtype, rule = case
    return make_cross_inputs(B, k, ds, dr, DTYPES[dtype], seed=300 + i, shared=min(B, k) // 3)


def _run_interpreter_cases(out_path, which):
    """Child process (TRITON_INTERPRET=1): run the cases through the Triton backend and save."""
    assert cs.triton_interpreting(), "child must be started with TRITON_INTERPRET=1"
    if which == "wide-slow":   # the @slow wide cases only
        results = {}
        for i in range(WIDE_FAST, len(WIDE_CASES)):
            cand, picked, ids = _wide_inputs(i, WIDE_CASES[i])
            setup = prepare_scores(*cand, rule=WIDE_CASES[i][5], backend="triton", **SCALES)
            results[i] = cross_scores(setup, cand, picked, ids)
        torch.save({"results": results}, out_path)
        return
    if which == "wide":
        results = []
        for i, case in enumerate(WIDE_CASES[:WIDE_FAST]):
            cand, picked, ids = _wide_inputs(i, case)
            setup = prepare_scores(*cand, rule=case[5], backend="triton", **SCALES)
            results.append(cross_scores(setup, cand, picked, ids))
        cand, picked, ids = _wide_inputs(-1, CONFIG_CASE)
        setup = prepare_scores(*cand, rule=CONFIG_CASE[5], backend="triton", **SCALES)
        per_config = [cs.conditional_scores_triton(setup, cand, picked, ids, blocks=(
            c.kwargs["BLOCK_B"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_D"])) for c in cs.AUTOTUNE_CONFIGS]
        torch.save({"results": results, "per_config": per_config}, out_path)
        return
    results = []
    for i, case in enumerate(INTERP_CASES):
        su, sv, ru, rv, chunk, scales = _case_inputs(i, case)
        _, _, _, _, _, rule, blocks, _ = case
        if blocks is None:
            out = conditional_scores(su, sv, ru, rv, chunk, rule=rule, backend="triton", **scales)
        else:
            setup = prepare_scores(su, sv, ru, rv, rule=rule, backend="triton", **scales)
            cand = Embeddings(su, sv, ru, rv)
            out = cs.conditional_scores_triton(setup, cand, take_rows(cand, chunk), chunk, blocks=blocks)
        results.append(out)
    try:  # the interpreter must refuse bf16 rather than compute it wrongly
        su, sv, ru, rv, chunk = make_inputs(37, 5, 24, 40, torch.bfloat16, seed=0)
        conditional_scores(su, sv, ru, rv, chunk, rule="learnability", backend="triton", **SCALES)
        bf16_refused = ""
    except RuntimeError as e:
        bf16_refused = str(e)
    torch.save({"results": results, "bf16_refused": bf16_refused,
                "auto_on_cpu": resolve_backend("auto", torch.device("cpu"))}, out_path)


def _interpreter_child(tmp_path_factory, which, name):
    out = tmp_path_factory.mktemp("interp") / name
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpreter", which, str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(out)


@pytest.fixture(scope="module")
def interpreter_run(tmp_path_factory):
    return _interpreter_child(tmp_path_factory, "small", "triton_interpreter.pt")


@pytest.fixture(scope="module")
def interpreter_wide_fast(tmp_path_factory):
    return _interpreter_child(tmp_path_factory, "wide", "wide_fast.pt")


@pytest.fixture(scope="module")
def interpreter_wide_slow(tmp_path_factory):
    return _interpreter_child(tmp_path_factory, "wide-slow", "wide_slow.pt")


@pytest.mark.parametrize("i", range(len(INTERP_CASES)), ids=[
    f"B{c[0]}-k{c[1]}-ds{c[2]}-dr{c[3]}-{c[4]}-{c[5]}-{'x'.join(map(str, c[6])) if c[6] else 'auto'}-{c[7]}"
    for c in INTERP_CASES])
def test_triton_interpreter_matches_torch_and_definition(interpreter_run, i):
    case = INTERP_CASES[i]
    rule = case[5]
    su, sv, ru, rv, chunk, scales = _case_inputs(i, case)
    got = interpreter_run["results"][i]
    assert got.dtype == torch.float32 and got.shape == (case[0],) and torch.isfinite(got).all()
    ref = conditional_scores(su, sv, ru, rv, chunk, rule=rule, backend="torch", **scales)
    want = naive_conditional(su, sv, ru, rv, chunk, rule, **scales)
    if case[7] == "huge":
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=0.5)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0.5)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
        assert_close_f64(got, want, f"triton case {case}")


def _check_wide(got, i):
    case = WIDE_CASES[i]
    cand, picked, ids = _wide_inputs(i, case)
    assert got.dtype == torch.float32 and got.shape == (case[0],) and torch.isfinite(got).all()
    setup = prepare_scores(*cand, rule=case[5], backend="torch", **SCALES)
    torch.testing.assert_close(got, cross_scores(setup, cand, picked, ids), rtol=1e-5, atol=1e-3)
    # k up to 2048 terms of size ~10 in fp32: a few 1e-6 relative
    torch.testing.assert_close(got.double(), naive_cross(cand, picked, ids, case[5], **SCALES), rtol=2e-5,
                               atol=2e-3)


WIDE_IDS = [f"B{c[0]}-k{c[1]}-ds{c[2]}-dr{c[3]}-{c[4]}-{c[5]}" for c in WIDE_CASES]


@pytest.mark.parametrize("i", range(WIDE_FAST), ids=WIDE_IDS[:WIDE_FAST])
def test_triton_interpreter_wide_and_long_chunks(interpreter_wide_fast, i):
    _check_wide(interpreter_wide_fast["results"][i], i)


@pytest.mark.slow
@pytest.mark.parametrize("i", range(WIDE_FAST, len(WIDE_CASES)), ids=WIDE_IDS[WIDE_FAST:])
def test_triton_interpreter_wide_and_long_chunks_slow(interpreter_wide_slow, i):
    _check_wide(interpreter_wide_slow["results"][i], i)


@pytest.mark.parametrize("c", range(len(cs.AUTOTUNE_CONFIGS)),
                         ids=["x".join(str(v) for v in c.kwargs.values()) for c in cs.AUTOTUNE_CONFIGS])
def test_triton_interpreter_every_autotune_config(interpreter_wide_fast, c):
    """Each tiling the GPU autotuner may choose computes the same scores (several B, K and d tiles)."""
    cand, picked, ids = _wide_inputs(-1, CONFIG_CASE)
    setup = prepare_scores(*cand, rule=CONFIG_CASE[5], backend="torch", **SCALES)
    torch.testing.assert_close(interpreter_wide_fast["per_config"][c], cross_scores(setup, cand, picked, ids),
                               rtol=1e-5, atol=1e-4)


def test_triton_interpreter_refuses_bf16_and_auto_stays_torch_on_cpu(interpreter_run):
    assert "bfloat16" in interpreter_run["bf16_refused"]
    assert interpreter_run["auto_on_cpu"] == "torch"


# ----------------------------------------------------------------------------------------------
# Compiled Triton on a GPU (bf16 can only be checked there)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the Triton interpreter computes "
                    "bf16 wrongly, so compiled-kernel parity (incl. bf16) can only run on a GPU")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rule", RULES)
def test_triton_cuda_matches_torch(dtype, rule):
    for i, (B, k) in enumerate(SHAPES + [(4099, 205)]):
        su, sv, ru, rv, chunk = [t.cuda() for t in make_inputs(B, k, 24, 40, DTYPES[dtype], seed=i)]
        assert resolve_backend("auto", su.device) == "triton"
        got = conditional_scores(su, sv, ru, rv, chunk, rule=rule, backend="auto", **SCALES)
        ref = conditional_scores(su, sv, ru, rv, chunk, rule=rule, backend="torch", **SCALES)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3 if k > 100 else 1e-4)
        want = naive_conditional(*[t.cpu() for t in (su, sv, ru, rv, chunk)], rule, **SCALES)
        torch.testing.assert_close(got.cpu().double(), want, rtol=2e-5, atol=1e-3 if k > 100 else 2e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled, autotuned kernel; bf16)")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_triton_cuda_wide_autotuned_matches_torch(dtype):
    """The autotuned kernel at the paper's widths and W * m = 2048 picked rows, partly foreign, on a
    super-batch large enough to pick the big tiles."""
    for i, case in enumerate(WIDE_CASES[::2]):
        B, k, ds, dr, _, rule = case
        cand, picked, ids = make_cross_inputs(4 * 4099, k, ds, dr, DTYPES[dtype], seed=400 + i, shared=k // 3)
        cand, picked = (Embeddings(*(t.cuda() for t in e)) for e in (cand, picked))
        setup = prepare_scores(*cand, rule=rule, backend="auto", **SCALES)
        assert setup.backend == "triton"
        got = cross_scores(setup, cand, picked, ids.cuda())
        ref = cs.conditional_scores_torch(setup, cand, picked, ids.cuda())
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-3)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--interpreter" and sys.argv[2] in ("small", "wide", "wide-slow"):
        _run_interpreter_cases(sys.argv[3], sys.argv[2])
    else:
        sys.exit("usage: TRITON_INTERPRET=1 python test_kernel.py --interpreter small|wide|wide-slow OUT.pt "
                 "(run by pytest)")
