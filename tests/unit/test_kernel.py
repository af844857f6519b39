"""Parity tests of kernels/cond_scores.py: Triton kernel (CPU interpreter / CUDA) vs PyTorch reference vs a
naive full-matrix float64 computation, on odd shapes, every dtype and both rules.

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
from kernels.cond_scores import conditional_scores, pair_loss_self, resolve_backend, self_scores

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


def _run_interpreter_cases(out_path):
    """Child process (TRITON_INTERPRET=1): run every case through the Triton backend and save."""
    assert cs.triton_interpreting(), "child must be started with TRITON_INTERPRET=1"
    results = []
    for i, case in enumerate(INTERP_CASES):
        su, sv, ru, rv, chunk, scales = _case_inputs(i, case)
        _, _, _, _, _, rule, blocks, _ = case
        if blocks is None:
            out = conditional_scores(su, sv, ru, rv, chunk, rule=rule, backend="triton", **scales)
        else:
            bb, bk, bd = blocks
            out = cs.conditional_scores_triton(su, sv, ru, rv, chunk, rule=rule, block_b=bb, block_k=bk,
                                               block_d=bd, **scales)
        results.append(out)
    try:  # the interpreter must refuse bf16 rather than compute it wrongly
        su, sv, ru, rv, chunk = make_inputs(37, 5, 24, 40, torch.bfloat16, seed=0)
        conditional_scores(su, sv, ru, rv, chunk, rule="learnability", backend="triton", **SCALES)
        bf16_refused = ""
    except RuntimeError as e:
        bf16_refused = str(e)
    torch.save({"results": results, "bf16_refused": bf16_refused,
                "auto_on_cpu": resolve_backend("auto", torch.device("cpu"))}, out_path)


@pytest.fixture(scope="module")
def interpreter_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("interp") / "triton_interpreter.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpreter", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(out)


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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interpreter":
        _run_interpreter_cases(sys.argv[2])
    else:
        sys.exit("usage: TRITON_INTERPRET=1 python test_kernel.py --interpreter OUT.pt (run by pytest)")
