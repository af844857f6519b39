"""Conditional batch scores for joint (JEST) batch selection: a fused Triton kernel and its PyTorch reference.

Paper: section 3.2 "Joint Batch Sampling" (the blocked Gibbs sampler of JEST, Evans et al. [35]) and
Appendix J (the scoring cost must stay small next to the student's forward). Notation: SPEC.md "Selection".

For a super-batch of B candidates with L2-normalised image/text embeddings u_i, v_i (one set for the
student, one for the reference; their widths ds and dr differ in general) the sigmoid per-pair loss is

    ell(i, j) = softplus(-y_ij * (a * u_i . v_j + c)),   y_ij = +1 iff i == j (same candidate) else -1,

and the pairwise score is

    learnability   (H-ACID): s(i, j) = ell_student(i, j) - ell_reference(i, j)
    easy_reference (I-ACID): s(i, j) = -ell_reference(i, j).

The sampler adds a set J of already-drawn pairs to the batch at every round and needs, for every
candidate x, the *conditional* increment

    cond(x) = sum_{j in J} [ s(x, j) + s(j, x) ]          (y = +1 when x is j itself)

This is O(B * k * d) work and would naively build B x k logit matrices (B x B for the whole batch); the
Triton kernel keeps every tile in registers and writes only the B results.

The picked pairs J enter as their own embedding rows (``picked``), not as indices into the candidates:
in data-parallel selection they are every rank's picks, all-gathered, while the candidates are this
rank's only, so each rank scores just its own B candidates against W * k gathered rows. ``picked_ids``
names, for each picked row, the candidate it is (or -1): that is where y = +1.

Embeddings enter in the dtype they were produced in (float32, float16 or bfloat16; bf16/fp16 run on
tensor cores) and every product is accumulated in float32.

Cost of the checks: ``prepare_scores`` validates the candidates, reads the scales/biases as Python
floats (one device-to-host transfer at most) and resolves the backend, once per selection;
``cross_scores`` then runs with no checks and no host synchronisation, so a selection loop can call it
every round. ``conditional_scores`` is the checked one-shot form (chunk given as candidate indices).

Reading order: the Triton kernel (with the derivation), its launcher and autotuning, the PyTorch
reference (what CPU machines run), the self-score helpers, then validation and dispatch.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

log = logging.getLogger(__name__)

RULES = ("learnability", "easy_reference")
BACKENDS = ("auto", "triton", "torch")

__all__ = [
    "RULES",
    "BACKENDS",
    "Embeddings",
    "ScoreSetup",
    "conditional_scores",
    "conditional_scores_triton",
    "conditional_scores_torch",
    "cross_scores",
    "pair_loss_self",
    "prepare_scores",
    "self_scores",
    "resolve_backend",
    "take_rows",
    "triton_interpreting",
]


class Embeddings(NamedTuple):
    """One set of pairs as embedding rows: student image/text [n, ds] (None when the rule needs no
    student) and reference image/text [n, dr]; each model's pair shares one dtype and device."""

    stu_img: torch.Tensor | None
    stu_txt: torch.Tensor | None
    ref_img: torch.Tensor
    ref_txt: torch.Tensor


@dataclass(frozen=True)
class ScoreSetup:
    """What ``cross_scores`` needs besides the rows, validated once by ``prepare_scores``.

    rule: "learnability" or "easy_reference" (see the module docstring).
    backend: the resolved implementation, "triton" or "torch" (never "auto").
    stu_scale, stu_bias: the student's a = exp(t) and c as finite floats (0.0 for easy_reference: unused).
    ref_scale, ref_bias: the reference's a and c as finite floats.
    """

    rule: str
    backend: str
    stu_scale: float
    stu_bias: float
    ref_scale: float
    ref_bias: float

    @property
    def has_student(self) -> bool:
        return self.rule == "learnability"


# ============================================================================================
# 1. The Triton kernel
# ============================================================================================
#
# Derivation. Fix one tile of candidates X (BLOCK_B rows) and one tile of picked pairs J (BLOCK_K rows of
# the picked embeddings). For one model (student or reference) with scale a and bias c:
#
#     L_xj = a * <u_x, v_j> + c        (candidate's image vs picked pair's text)  = a * (U_X  V_J^T) + c
#     L_jx = a * <u_j, v_x> + c        (picked pair's image vs candidate's text)  = a * (V_X  U_J^T) + c
#
# so both directions are plain [BLOCK_B, d] x [d, BLOCK_K] products, accumulated over d in BLOCK_D
# slices with tl.dot (fp32 accumulator whatever the input dtype: fp16/bf16 tiles go to tensor cores).
# The label is y = +1 exactly where the picked row is the candidate itself (ids[j] == x), so
#
#     ell = softplus(-y * L) = softplus(z),  z = -L on those entries, +L elsewhere.
#
# softplus is evaluated as max(z, 0) + log1p(exp(-|z|)): exp never sees a positive argument, so no
# overflow for any logit, and log1p keeps the small tail accurate. Triton has no portable log1p, so
# log1p(e) for e in (0, 1] uses Goldberg's correction log(w) * e / (w - 1), w = 1 + e (exact to a few
# ulps; the plain log(1 + e) would lose all digits once e < 2^-24).
#
# Per model the tile contributes ell(x, j) + ell(j, x); the score tile is w_stu * (student) + w_ref *
# (reference) with (w_stu, w_ref) = (1, -1) for learnability and (0, -1) for easy_reference (the student
# matmuls are skipped entirely, HAS_STUDENT is a compile-time constant). Padding rows (x >= B) and
# padding columns (j >= K) load zeros and are masked to 0 before the row sum, which is accumulated over
# the picked tiles in fp32 in a loop inside the program: each program owns its BLOCK_B outputs, so there
# is no atomic and the result is deterministic. Only B floats are written, so re-running the kernel
# (as the autotuner does) is harmless.


@triton.jit
def _softplus(z):
    """softplus(z) = max(z, 0) + log1p(exp(-|z|)), overflow-free for any z."""
    e = tl.exp(-tl.abs(z))                        # in (0, 1]
    w = 1.0 + e
    # Goldberg: log1p(e) = log(w) * e / (w - 1) when w != 1, and = e when e is below half an ulp of 1.
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.maximum(z, 0.0) + log1p_e


@triton.jit
def _two_way_pair_loss(u_ptr, v_ptr, stride_u, stride_v, pu_ptr, pv_ptr, stride_pu, stride_pv, D, scale, bias,
                       rows_b, mask_b, rows_k, mask_k, is_pos, PRECISION: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_B, BLOCK_K] tile of ell(x, j) + ell(j, x) for one model (u = image, v = text rows;
    u/v: the candidates, pu/pv: the picked pairs)."""
    xj = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)   # <u_x, v_j>
    jx = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)   # <u_j, v_x>
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        m_bd = mask_b[:, None] & mask_d[None, :]
        m_kd = mask_k[:, None] & mask_d[None, :]
        u_x = tl.load(u_ptr + rows_b[:, None] * stride_u + offs_d[None, :], mask=m_bd, other=0.0)
        v_x = tl.load(v_ptr + rows_b[:, None] * stride_v + offs_d[None, :], mask=m_bd, other=0.0)
        u_j = tl.load(pu_ptr + rows_k[:, None] * stride_pu + offs_d[None, :], mask=m_kd, other=0.0)
        v_j = tl.load(pv_ptr + rows_k[:, None] * stride_pv + offs_d[None, :], mask=m_kd, other=0.0)
        # PRECISION is "ieee" for fp32 operands (a GPU would otherwise round them to tf32) and the
        # default "tf32" otherwise (where Triton ignores it: fp16/bf16 products are exact in fp32)
        xj = tl.dot(u_x, tl.trans(v_j), xj, input_precision=PRECISION)
        jx = tl.dot(v_x, tl.trans(u_j), jx, input_precision=PRECISION)
    l_xj = scale * xj + bias
    l_jx = scale * jx + bias
    return _softplus(tl.where(is_pos, -l_xj, l_xj)) + _softplus(tl.where(is_pos, -l_jx, l_jx))


@triton.jit
def _cond_scores_kernel(out_ptr, ids_ptr,
                        su_ptr, sv_ptr, ru_ptr, rv_ptr, psu_ptr, psv_ptr, pru_ptr, prv_ptr,
                        B, K, DS, DR,
                        stride_su, stride_sv, stride_ru, stride_rv,
                        stride_psu, stride_psv, stride_pru, stride_prv,
                        stu_scale, stu_bias, ref_scale, ref_bias,
                        B_BUCKET, K_BUCKET,
                        HAS_STUDENT: tl.constexpr, STU_PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[x] = sum_{j picked} s(x, j) + s(j, x) for the BLOCK_B candidates of this program.

    B_BUCKET, K_BUCKET are not read: they are the autotuner's key (sizes rounded to powers of two), so
    it tunes once per size class rather than once per exact B and K."""
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    rows_b = offs_b.to(tl.int64)                  # int64 row offsets: B * d may exceed 2^31
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows_k = offs_k.to(tl.int64)
        ids_k = tl.load(ids_ptr + offs_k, mask=mask_k, other=-1)
        is_pos = rows_b[:, None] == ids_k[None, :]           # y = +1: the picked pair is the candidate
        valid = mask_b[:, None] & mask_k[None, :]
        tile = -_two_way_pair_loss(ru_ptr, rv_ptr, stride_ru, stride_rv, pru_ptr, prv_ptr, stride_pru, stride_prv,
                                   DR, ref_scale, ref_bias, rows_b, mask_b, rows_k, mask_k, is_pos, REF_PRECISION,
                                   BLOCK_B, BLOCK_K, BLOCK_D)
        if HAS_STUDENT:
            tile += _two_way_pair_loss(su_ptr, sv_ptr, stride_su, stride_sv, psu_ptr, psv_ptr, stride_psu,
                                       stride_psv, DS, stu_scale, stu_bias, rows_b, mask_b, rows_k, mask_k, is_pos,
                                       STU_PRECISION, BLOCK_B, BLOCK_K, BLOCK_D)
        acc += tl.sum(tl.where(valid, tile, 0.0), axis=1)
    tl.store(out_ptr + offs_b, acc, mask=mask_b)


# ============================================================================================
# 2. Launcher and autotuning
# ============================================================================================

# Candidate tilings for large super-batches (B in the thousands to 10^5) and d in {128, 256, 768}. A tile
# holds two [BLOCK_B, BLOCK_K] fp32 accumulators, so the 128 x 64 tiles get 8 warps (register pressure);
# BLOCK_D 32/64 keeps the operand tiles small enough for 2-3 pipeline stages. All blocks are >= 16
# (the GPU tl.dot minimum) and powers of two.
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_B": bb, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
    for bb, bk, bd, w, s in [
        (32, 32, 64, 4, 3),
        (64, 32, 64, 4, 3),
        (64, 64, 32, 4, 3),
        (64, 64, 64, 4, 3),
        (128, 32, 64, 4, 3),
        (128, 64, 32, 8, 3),
        (128, 64, 64, 8, 2),
    ]
]
# The interpreter cannot time configs (no CUDA events) and runs each program as numpy calls, so there
# the autotuner gets this one config and benchmarks nothing. Large blocks cut the per-tile Python
# overhead: B = 64, k = 2048, d = 768 takes 12 s at 64 x 128 x 128 tiles and 2.4 s at 64 x 512 x 256.
INTERPRETER_CONFIG = triton.Config({"BLOCK_B": 128, "BLOCK_K": 512, "BLOCK_D": 256}, num_warps=4, num_stages=1)


def _prune_configs(configs, named_args, **kwargs):
    """Drop tilings much larger than the problem: BLOCK_B above B's bucket or BLOCK_K above K's bucket
    only adds padding. Always keeps at least the smallest config."""
    kept = [c for c in configs if c.kwargs["BLOCK_B"] <= max(32, named_args["B_BUCKET"])
            and c.kwargs["BLOCK_K"] <= max(32, named_args["K_BUCKET"])]
    return kept or configs[:1]


def triton_interpreting() -> bool:
    """True iff the kernel was built by the Triton CPU interpreter (TRITON_INTERPRET=1 at import time).

    ``triton.jit`` decides between compiled and interpreted when the decorator runs, i.e. when this
    module is imported; setting the variable later has no effect on this process.
    """
    return isinstance(_cond_scores_kernel, InterpretedFunction)


_cond_scores_autotuned = triton.autotune(
    configs=[INTERPRETER_CONFIG] if triton_interpreting() else AUTOTUNE_CONFIGS,
    key=["B_BUCKET", "K_BUCKET", "DS", "DR", "HAS_STUDENT"],   # (+ the tensors' dtypes, added by Triton)
    prune_configs_by={"early_config_prune": _prune_configs},
)(_cond_scores_kernel)


def _bucket(n: int) -> int:
    """Autotuning key of a size: the next power of two (>= 16)."""
    return max(16, triton.next_power_of_2(max(n, 1)))


def conditional_scores_triton(setup: ScoreSetup, cand: Embeddings, picked: Embeddings,
                              picked_ids: torch.Tensor | None = None, *,
                              blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Launch the fused kernel (inputs already validated by ``prepare_scores``). Returns [B] float32.

    blocks: (BLOCK_B, BLOCK_K, BLOCK_D) powers of two >= 16 to force one tiling (tests use small ones to
    cover several tiles); None = the autotuner picks among ``AUTOTUNE_CONFIGS`` per (B bucket, K bucket,
    widths, dtypes), or uses ``INTERPRETER_CONFIG`` under the interpreter. No host synchronisation
    (after the autotuner's first call per key, which times the configs).
    """
    B, k = cand.ref_img.shape[0], picked.ref_img.shape[0]
    device = cand.ref_img.device
    out = torch.zeros(B, dtype=torch.float32, device=device)
    if B == 0 or k == 0:
        return out
    has_student = setup.has_student
    ds = cand.stu_img.shape[1] if has_student else 0
    dr = cand.ref_img.shape[1]
    cu, cv, pu, pv = (_row_major(t) for t in (cand.ref_img, cand.ref_txt, picked.ref_img, picked.ref_txt))
    if has_student:
        su, sv, psu, psv = (_row_major(t) for t in (cand.stu_img, cand.stu_txt, picked.stu_img, picked.stu_txt))
    else:  # never read (HAS_STUDENT=False); any valid pointer will do
        su, sv, psu, psv = cu, cv, pu, pv
    if picked_ids is None:   # no picked row is one of the candidates: y = -1 everywhere
        ids = torch.full((k,), -1, dtype=torch.int64, device=device)
    else:
        ids = picked_ids.to(device=device, dtype=torch.int64).contiguous()
    args = (out, ids, su, sv, cu, cv, psu, psv, pu, pv, B, k, ds, dr,
            su.stride(0), sv.stride(0), cu.stride(0), cv.stride(0),
            psu.stride(0), psv.stride(0), pu.stride(0), pv.stride(0),
            setup.stu_scale, setup.stu_bias, setup.ref_scale, setup.ref_bias, _bucket(B), _bucket(k))
    consts = dict(HAS_STUDENT=has_student, STU_PRECISION=_dot_precision(su.dtype),
                  REF_PRECISION=_dot_precision(cu.dtype))
    if blocks is None:
        _cond_scores_autotuned[lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)](*args, **consts)
        return out
    for name, blk in zip(("BLOCK_B", "BLOCK_K", "BLOCK_D"), blocks):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"conditional_scores_triton: {name}={blk} must be a power of two >= 16")
    bb, bk, bd = blocks
    _cond_scores_kernel[(triton.cdiv(B, bb),)](*args, **consts, BLOCK_B=bb, BLOCK_K=bk, BLOCK_D=bd)
    return out


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 embeddings, Triton's default otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """The kernel addresses rows by stride and columns as contiguous: copy only when that fails."""
    return x if x.stride(1) == 1 else x.contiguous()


# ============================================================================================
# 3. PyTorch reference (what CPU machines run; also the oracle of the parity tests)
# ============================================================================================

# Candidates per block are chosen so one [2, block, k] float32 temporary stays near 4 MiB: memory is
# O(block * k), never O(B * k) or O(B^2).
_TORCH_BLOCK_ELEMS = 1 << 19


def _two_way_pair_loss_torch(u_x, v_x, u_j, v_j, scale: float, bias: float, sign) -> torch.Tensor:
    """[m] = sum_j ell(x, j) + ell(j, x) for one model (float32 rows); ``sign`` [m, k] is -y
    (z = sign * logit), or None when y = -1 everywhere (no picked pair is one of these candidates)."""
    # both directions written by two GEMMs into one [2, m, k] buffer (no copy of the candidate rows);
    # the bias is filled in first so that addmm_ adds a * u . v to it (no bias tensor to create)
    logits = torch.empty((2, u_x.shape[0], u_j.shape[0]), dtype=torch.float32, device=u_x.device).fill_(bias)
    logits[0].addmm_(u_x, v_j.T, alpha=scale)       # a * u_x . v_j + c
    logits[1].addmm_(v_x, u_j.T, alpha=scale)       # a * u_j . v_x + c
    if sign is not None:
        logits.mul_(sign)
    return F.softplus(logits).sum(dim=(0, 2))


def conditional_scores_torch(setup: ScoreSetup, cand: Embeddings, picked: Embeddings,
                             picked_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Reference implementation: candidates in blocks, float32 math (half inputs are upcast block by
    block), memory O(block * k). Returns [B] float32. No host synchronisation."""
    B, k = cand.ref_img.shape[0], picked.ref_img.shape[0]
    device = cand.ref_img.device
    out = torch.zeros(B, dtype=torch.float32, device=device)
    if B == 0 or k == 0:
        return out
    models = [(cand.ref_img, cand.ref_txt, picked.ref_img, picked.ref_txt, setup.ref_scale, setup.ref_bias, -1.0)]
    if setup.has_student:
        models.append((cand.stu_img, cand.stu_txt, picked.stu_img, picked.stu_txt, setup.stu_scale,
                       setup.stu_bias, 1.0))
    ids = None if picked_ids is None else picked_ids.to(device=device, dtype=torch.int64)
    # the picked rows as float32, once per call
    models = [(u, v, pu.float(), pv.float(), a, c, w) for u, v, pu, pv, a, c, w in models]
    block = max(1, _TORCH_BLOCK_ELEMS // k)
    for start in range(0, B, block):
        stop = min(B, start + block)
        sign = None
        if ids is not None:   # sign = -y: -1 where the picked pair is the candidate itself, +1 elsewhere
            sign = 1.0 - 2.0 * (torch.arange(start, stop, device=device)[:, None] == ids[None, :]).to(torch.float32)
        total = out[start:stop]
        for u, v, u_j, v_j, a, c, weight in models:
            term = _two_way_pair_loss_torch(u[start:stop].float(), v[start:stop].float(), u_j, v_j, a, c, sign)
            total.add_(term, alpha=weight)
    return out


# ============================================================================================
# 4. Self scores s(x, x) (O(B * d): plain torch on any device)
# ============================================================================================


def pair_loss_self(img: torch.Tensor, txt: torch.Tensor, scale, bias) -> torch.Tensor:
    """ell(x, x) = softplus(-(a * u_x . v_x + c)): the positive-pair sigmoid term, [B] float32.

    img, txt: [B, d] (any float dtype, upcast to float32); scale a (exp already applied), bias c: floats
    or 1-element tensors (a tensor costs one device-to-host read).
    """
    _check_model("pair_loss_self", img, txt)
    s = _scalars("pair_loss_self", scale=scale, bias=bias)
    dot = (img.float() * txt.float()).sum(dim=1)
    return F.softplus(-(s["scale"] * dot + s["bias"]))


def self_scores(stu_img, stu_txt, ref_img, ref_txt, *, stu_scale, stu_bias, ref_scale, ref_bias,
                rule: str) -> torch.Tensor:
    """s(x, x) for every candidate, [B] float32.

    learnability: ell_student(x, x) - ell_reference(x, x);  easy_reference: -ell_reference(x, x)
    (the student arguments may then be None).
    """
    _check_embeddings(Embeddings(stu_img, stu_txt, ref_img, ref_txt), rule)
    s = -pair_loss_self(ref_img, ref_txt, ref_scale, ref_bias)
    if rule == "learnability":
        s = s + pair_loss_self(stu_img, stu_txt, stu_scale, stu_bias).to(s.device)
    return s


# ============================================================================================
# 5. Validation (once per selection) and dispatch (every round)
# ============================================================================================


def resolve_backend(backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> str:
    """Which implementation runs: "triton" or "torch". Never falls back silently.

    auto: Triton for CUDA tensors, the PyTorch reference otherwise. "triton" on CPU tensors needs the
    Triton interpreter (TRITON_INTERPRET=1 before this module is imported), and refuses bf16 there
    because the interpreter computes bf16 wrongly without any error.
    """
    if backend not in BACKENDS:
        raise ValueError(f"conditional_scores: backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if device.type == "cuda":
        return "triton"
    if device.type != "cpu":
        raise RuntimeError(f"conditional_scores: backend='triton' supports CUDA tensors (or CPU tensors under "
                           f"the Triton interpreter), got device {device}; use backend='torch'")
    if not triton_interpreting():
        hint = (" (TRITON_INTERPRET is set now but was not when kernels.cond_scores was imported)"
                if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "")
        raise RuntimeError("conditional_scores: backend='triton' got CPU tensors, which only the Triton "
                           "interpreter can run: set TRITON_INTERPRET=1 before importing kernels.cond_scores, "
                           f"move the tensors to CUDA, or use backend='torch'{hint}")
    if torch.bfloat16 in dtypes:
        raise RuntimeError("conditional_scores: the Triton interpreter computes bfloat16 silently wrong; "
                           "use float32/float16 inputs or backend='torch' on CPU")
    return "triton"


def _scalars(where: str, **named) -> dict[str, float]:
    """Scales and biases (floats or 1-element tensors) as finite Python floats.

    The tensor ones are read in one transfer per device (one host synchronisation, not one per scalar).
    """
    tensors: dict[torch.device, list[str]] = {}
    for name, x in named.items():
        if x is None:
            raise ValueError(f"{where}: {name} is required")
        if isinstance(x, torch.Tensor):
            if x.numel() != 1:
                raise ValueError(f"{where}: {name} must be a scalar, got shape {tuple(x.shape)}")
            tensors.setdefault(x.device, []).append(name)
    out = {name: float(x) for name, x in named.items() if not isinstance(x, torch.Tensor)}
    for names in tensors.values():
        values = torch.stack([named[n].detach().reshape(()).double() for n in names]).tolist()
        out.update(zip(names, values))
    for name, v in out.items():
        if not math.isfinite(v):
            raise ValueError(f"{where}: {name} must be finite, got {v}")
    return out


def _check_model(name: str, img, txt) -> None:
    if img is None or txt is None:
        raise ValueError(f"{name}: image and text embeddings are required")
    if img.dim() != 2 or img.shape != txt.shape:
        raise ValueError(f"{name}: expected img[B, d] and txt[B, d] of the same shape, got "
                         f"{tuple(img.shape)} and {tuple(txt.shape)}")
    if img.dtype not in (torch.float32, torch.float16, torch.bfloat16) or txt.dtype != img.dtype:
        raise TypeError(f"{name}: embeddings must share one dtype among float32/float16/bfloat16, "
                        f"got {img.dtype} and {txt.dtype}")
    if img.device != txt.device:
        raise ValueError(f"{name}: img on {img.device} but txt on {txt.device}")


def _check_embeddings(e: Embeddings, rule: str) -> None:
    """Shapes, dtypes and devices (no host synchronisation)."""
    if rule not in RULES:
        raise ValueError(f"conditional batch scores: rule must be one of {RULES}, got {rule!r}")
    _check_model("reference", e.ref_img, e.ref_txt)
    if rule == "learnability":
        _check_model("student", e.stu_img, e.stu_txt)
        if e.stu_img.shape[0] != e.ref_img.shape[0]:
            raise ValueError(f"student has {e.stu_img.shape[0]} candidates but the reference {e.ref_img.shape[0]}")
        if e.stu_img.device != e.ref_img.device:
            raise ValueError(f"student embeddings on {e.stu_img.device} but reference on {e.ref_img.device}")


def prepare_scores(stu_img, stu_txt, ref_img, ref_txt, *, stu_scale, stu_bias, ref_scale, ref_bias, rule: str,
                   backend: str = "auto") -> ScoreSetup:
    """Validate the candidates' embeddings and the scalars and resolve the backend: once per selection.

    Arguments as for ``conditional_scores`` (without the chunk). Costs at most one host synchronisation
    (reading tensor scales/biases), none for float ones. Rows later given to ``cross_scores`` must have
    the candidates' widths, dtypes and device (the picked rows of a selection do by construction).
    """
    _check_embeddings(Embeddings(stu_img, stu_txt, ref_img, ref_txt), rule)
    learn = rule == "learnability"
    named = dict(ref_scale=ref_scale, ref_bias=ref_bias)
    if learn:
        named.update(stu_scale=stu_scale, stu_bias=stu_bias)
    s = _scalars("conditional batch scores", **named)
    dtypes = (ref_img.dtype,) + ((stu_img.dtype,) if learn else ())
    ran = resolve_backend(backend, ref_img.device, dtypes)
    log.debug("conditional scores: backend=%s (asked %s) B=%d rule=%s", ran, backend, ref_img.shape[0], rule)
    return ScoreSetup(rule=rule, backend=ran, stu_scale=s.get("stu_scale", 0.0), stu_bias=s.get("stu_bias", 0.0),
                      ref_scale=s["ref_scale"], ref_bias=s["ref_bias"])


def cross_scores(setup: ScoreSetup, cand: Embeddings, picked: Embeddings,
                 picked_ids: torch.Tensor | None = None) -> torch.Tensor:
    """cond(x) = sum_{j picked} [s(x, j) + s(j, x)] for every candidate x: Tensor[B] float32.

    cand: the B candidates' rows; picked: the k picked pairs' rows (same widths, dtypes and device);
    picked_ids: [k] int64/int32, the candidate index each picked row is (y = +1 there), -1 for a row
    that is no candidate (another rank's pick); None = no picked row is a candidate.
    No checks and no host synchronisation: ``prepare_scores`` validated the setup once.
    """
    impl = conditional_scores_triton if setup.backend == "triton" else conditional_scores_torch
    return impl(setup, cand, picked, picked_ids)


def take_rows(e: Embeddings, idx: torch.Tensor) -> Embeddings:
    """The rows ``idx`` of every tensor of ``e`` (student entries stay None when absent)."""
    return Embeddings(*(None if t is None else t.index_select(0, idx) for t in e))


def conditional_scores(stu_img, stu_txt, ref_img, ref_txt, chunk: torch.Tensor, *, stu_scale, stu_bias,
                       ref_scale, ref_bias, rule: str, backend: str = "auto") -> torch.Tensor:
    """cond(x) = sum_{j in chunk} [s(x, j) + s(j, x)] for every candidate x: Tensor[B] float32.

    The checked one-shot form of ``prepare_scores`` + ``cross_scores`` (a selection loop uses those).
    stu_img, stu_txt: [B, ds] student embeddings (None allowed for rule="easy_reference");
    ref_img, ref_txt: [B, dr] reference embeddings; each model's pair shares one dtype
    (float32/float16/bfloat16; math in float32). chunk: [k] distinct indices into the super-batch
    (a duplicate would simply be counted twice); candidates in the chunk get y = +1 against themselves.
    Scales are exp(t) (already exponentiated), biases c; floats or 1-element tensors.
    rule: "learnability" (s = ell_student - ell_reference) or "easy_reference" (s = -ell_reference).
    backend: "auto" | "triton" | "torch" (see ``resolve_backend``); the choice is logged at DEBUG.
    The index range check reads the chunk's min and max (one host synchronisation).
    """
    setup = prepare_scores(stu_img, stu_txt, ref_img, ref_txt, stu_scale=stu_scale, stu_bias=stu_bias,
                           ref_scale=ref_scale, ref_bias=ref_bias, rule=rule, backend=backend)
    if chunk.dim() != 1 or chunk.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"chunk must be a 1-d int64/int32 tensor of candidate indices, got "
                         f"{chunk.dtype} {tuple(chunk.shape)}")
    B = ref_img.shape[0]
    chunk = chunk.to(ref_img.device)
    if chunk.numel():
        lo, hi = torch.stack(torch.aminmax(chunk)).tolist()
        if lo < 0 or hi >= B:
            raise IndexError(f"chunk indices must lie in [0, {B}), got [{lo}, {hi}]")
    cand = Embeddings(stu_img if setup.has_student else None, stu_txt if setup.has_student else None,
                      ref_img, ref_txt)
    return cross_scores(setup, cand, take_rows(cand, chunk), chunk)
