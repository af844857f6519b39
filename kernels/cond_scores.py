"""Conditional batch scores for joint (JEST) batch selection: a fused Triton kernel and its PyTorch reference.

Paper: section 3.2 "Joint Batch Sampling" (the blocked Gibbs sampler of JEST, Evans et al. [35]) and
Appendix J (the scoring cost must stay small next to the student's forward). Notation: SPEC.md "Selection".

For a super-batch of B candidates with L2-normalised image/text embeddings u_i, v_i (one set for the
student, one for the reference; their widths ds and dr differ in general) the sigmoid per-pair loss is

    ell(i, j) = softplus(-y_ij * (a * u_i . v_j + c)),   y_ij = +1 iff i == j (same candidate) else -1,

and the pairwise score is

    learnability   (H-ACID): s(i, j) = ell_student(i, j) - ell_reference(i, j)
    easy_reference (I-ACID): s(i, j) = -ell_reference(i, j).

The sampler adds a chunk J of already-drawn candidates to the batch at every step and needs, for every
candidate x, the *conditional* increment

    cond(x) = sum_{j in J} [ s(x, j) + s(j, x) ]          (y = +1 when x == j, so selected x are defined too)

This is O(B * k * d) work and would naively build B x k logit matrices (B x B for the whole batch); the
Triton kernel keeps every tile in registers and writes only the B results.

Reading order: the Triton kernel (with the derivation), its launcher, the PyTorch reference (what CPU
machines run), the self-score helpers, then the dispatcher ``conditional_scores``.
"""
from __future__ import annotations

import logging
import math
import os

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
    "conditional_scores",
    "conditional_scores_triton",
    "conditional_scores_torch",
    "pair_loss_self",
    "self_scores",
    "resolve_backend",
    "triton_interpreting",
]


# ============================================================================================
# 1. The Triton kernel
# ============================================================================================
#
# Derivation. Fix one tile of candidates X (BLOCK_B rows) and one tile of chunk entries J (BLOCK_K
# indices into the super-batch). For one model (student or reference) with scale a and bias c:
#
#     L_xj = a * <u_x, v_j> + c        (candidate's image vs chunk member's text)  = a * (U_X  V_J^T) + c
#     L_jx = a * <u_j, v_x> + c        (chunk member's image vs candidate's text)  = a * (V_X  U_J^T) + c
#
# so both directions are plain [BLOCK_B, d] x [d, BLOCK_K] products, accumulated over d in BLOCK_D
# slices with tl.dot (fp32 accumulator whatever the input dtype). The label is y = +1 exactly where the
# candidate index equals the chunk index (the candidate itself is in the chunk), so
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
# padding columns (past the end of the chunk) load zeros and are masked to 0 before the row sum, which
# is accumulated over the chunk tiles in fp32 in a loop inside the program: each program owns its
# BLOCK_B outputs, so there is no atomic and the result is deterministic. Only B floats are written.


@triton.jit
def _softplus(z):
    """softplus(z) = max(z, 0) + log1p(exp(-|z|)), overflow-free for any z."""
    e = tl.exp(-tl.abs(z))                        # in (0, 1]
    w = 1.0 + e
    # Goldberg: log1p(e) = log(w) * e / (w - 1) when w != 1, and = e when e is below half an ulp of 1.
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.maximum(z, 0.0) + log1p_e


@triton.jit
def _two_way_pair_loss(u_ptr, v_ptr, stride_u, stride_v, D, scale, bias,
                       rows_b, mask_b, rows_k, mask_k, is_pos, PRECISION: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_B, BLOCK_K] tile of ell(x, j) + ell(j, x) for one model (u = image, v = text rows)."""
    xj = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)   # <u_x, v_j>
    jx = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)   # <u_j, v_x>
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        m_bd = mask_b[:, None] & mask_d[None, :]
        m_kd = mask_k[:, None] & mask_d[None, :]
        u_x = tl.load(u_ptr + rows_b[:, None] * stride_u + offs_d[None, :], mask=m_bd, other=0.0)
        v_x = tl.load(v_ptr + rows_b[:, None] * stride_v + offs_d[None, :], mask=m_bd, other=0.0)
        # gather the chunk members' rows by index ([BLOCK_K, BLOCK_D], row-contiguous loads)
        u_j = tl.load(u_ptr + rows_k[:, None] * stride_u + offs_d[None, :], mask=m_kd, other=0.0)
        v_j = tl.load(v_ptr + rows_k[:, None] * stride_v + offs_d[None, :], mask=m_kd, other=0.0)
        # PRECISION is "ieee" for fp32 operands (a GPU would otherwise round them to tf32) and the
        # default "tf32" otherwise (where Triton ignores it: fp16/bf16 products are exact in fp32)
        xj = tl.dot(u_x, tl.trans(v_j), xj, input_precision=PRECISION)
        jx = tl.dot(v_x, tl.trans(u_j), jx, input_precision=PRECISION)
    l_xj = scale * xj + bias
    l_jx = scale * jx + bias
    return _softplus(tl.where(is_pos, -l_xj, l_xj)) + _softplus(tl.where(is_pos, -l_jx, l_jx))


@triton.jit
def _cond_scores_kernel(out_ptr, chunk_ptr,
                        su_ptr, sv_ptr, ru_ptr, rv_ptr,
                        B, K, DS, DR,
                        stride_su, stride_sv, stride_ru, stride_rv,
                        stu_scale, stu_bias, ref_scale, ref_bias,
                        HAS_STUDENT: tl.constexpr, STU_PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[x] = sum_{j in chunk} s(x, j) + s(j, x) for the BLOCK_B candidates of this program."""
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    rows_b = offs_b.to(tl.int64)                  # int64 row offsets: B * d may exceed 2^31
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows_k = tl.load(chunk_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
        is_pos = rows_b[:, None] == rows_k[None, :]          # y = +1: the candidate is this chunk member
        valid = mask_b[:, None] & mask_k[None, :]
        tile = -_two_way_pair_loss(ru_ptr, rv_ptr, stride_ru, stride_rv, DR, ref_scale, ref_bias,
                                   rows_b, mask_b, rows_k, mask_k, is_pos, REF_PRECISION, BLOCK_B, BLOCK_K, BLOCK_D)
        if HAS_STUDENT:
            tile += _two_way_pair_loss(su_ptr, sv_ptr, stride_su, stride_sv, DS, stu_scale, stu_bias,
                                       rows_b, mask_b, rows_k, mask_k, is_pos, STU_PRECISION,
                                       BLOCK_B, BLOCK_K, BLOCK_D)
        acc += tl.sum(tl.where(valid, tile, 0.0), axis=1)
    tl.store(out_ptr + offs_b, acc, mask=mask_b)


# ============================================================================================
# 2. Launcher
# ============================================================================================


def triton_interpreting() -> bool:
    """True iff the kernel was built by the Triton CPU interpreter (TRITON_INTERPRET=1 at import time).

    ``triton.jit`` decides between compiled and interpreted when the decorator runs, i.e. when this
    module is imported; setting the variable later has no effect on this process.
    """
    return isinstance(_cond_scores_kernel, InterpretedFunction)


def _pow2_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def conditional_scores_triton(stu_img, stu_txt, ref_img, ref_txt, chunk, *, stu_scale, stu_bias,
                              ref_scale, ref_bias, rule, block_b: int | None = None,
                              block_k: int | None = None, block_d: int | None = None) -> torch.Tensor:
    """Launch the fused kernel (inputs already validated by ``conditional_scores``). Returns [B] float32.

    Blocks are powers of two >= 16 (GPU tl.dot minimum). Defaults: BLOCK_B 32 (64 for B > 4096, so
    small super-batches still spread over several SMs), BLOCK_K and BLOCK_D the next power of two of k
    and of the widest embedding, clamped to [16, 64]. The interpreter runs each program as numpy calls,
    so under TRITON_INTERPRET larger blocks (128) are used to cut the Python overhead.
    """
    B, k = ref_img.shape[0], chunk.numel()
    out = torch.empty(B, dtype=torch.float32, device=ref_img.device)
    if B == 0:
        return out
    has_student = rule == "learnability"
    ds = stu_img.shape[1] if has_student else 0
    dr = ref_img.shape[1]
    hi = 128 if triton_interpreting() else 64
    bb = block_b or (128 if triton_interpreting() else (64 if B > 4096 else 32))
    bk = block_k or _pow2_block(k, 16, hi)
    bd = block_d or _pow2_block(max(ds, dr), 16, hi)
    for name, blk in (("block_b", bb), ("block_k", bk), ("block_d", bd)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"conditional_scores_triton: {name}={blk} must be a power of two >= 16")
    ref_img, ref_txt = _row_major(ref_img), _row_major(ref_txt)
    if has_student:
        stu_img, stu_txt = _row_major(stu_img), _row_major(stu_txt)
    else:  # never read (HAS_STUDENT=False); any valid pointer will do
        stu_img, stu_txt = ref_img, ref_txt
    chunk = chunk.to(device=ref_img.device, dtype=torch.int64).contiguous()
    grid = (triton.cdiv(B, bb),)
    _cond_scores_kernel[grid](
        out, chunk, stu_img, stu_txt, ref_img, ref_txt,
        B, k, ds, dr,
        stu_img.stride(0), stu_txt.stride(0), ref_img.stride(0), ref_txt.stride(0),
        float(stu_scale) if has_student else 0.0, float(stu_bias) if has_student else 0.0,
        float(ref_scale), float(ref_bias),
        HAS_STUDENT=has_student, STU_PRECISION=_dot_precision(stu_img.dtype),
        REF_PRECISION=_dot_precision(ref_img.dtype), BLOCK_B=bb, BLOCK_K=bk, BLOCK_D=bd,
    )
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
    """[m] = sum_j ell(x, j) + ell(j, x) for one model; ``sign`` [m, k] is -y (so z = sign * logit)."""
    # both directions written by two GEMMs into one [2, m, k] buffer (no copy of the candidate rows)
    logits = torch.empty((2, u_x.shape[0], u_j.shape[0]), dtype=torch.float32, device=u_x.device)
    c = torch.tensor(bias, dtype=torch.float32, device=u_x.device)
    torch.addmm(c, u_x, v_j.T, alpha=scale, out=logits[0])       # a * u_x . v_j + c
    torch.addmm(c, v_x, u_j.T, alpha=scale, out=logits[1])       # a * u_j . v_x + c
    return F.softplus(logits.mul_(sign)).sum(dim=(0, 2))


def conditional_scores_torch(stu_img, stu_txt, ref_img, ref_txt, chunk, *, stu_scale, stu_bias,
                             ref_scale, ref_bias, rule) -> torch.Tensor:
    """Reference implementation: candidates in blocks, float32 math, memory O(block * k). Returns [B]."""
    B, k = ref_img.shape[0], chunk.numel()
    device = ref_img.device
    out = torch.zeros(B, dtype=torch.float32, device=device)
    if B == 0 or k == 0:
        return out
    chunk = chunk.to(device=device, dtype=torch.int64)
    models = [(ref_img, ref_txt, float(ref_scale), float(ref_bias), -1.0)]
    if rule == "learnability":
        models.append((stu_img, stu_txt, float(stu_scale), float(stu_bias), 1.0))
    # the chunk members' rows, gathered once per call, float32
    gathered = [(u.index_select(0, chunk).float(), v.index_select(0, chunk).float()) for u, v, *_ in models]
    block = max(1, _TORCH_BLOCK_ELEMS // k)
    for start in range(0, B, block):
        stop = min(B, start + block)
        # sign = -y: -1 where the candidate is the chunk member itself, +1 elsewhere
        is_pos = torch.arange(start, stop, device=device)[:, None] == chunk[None, :]
        sign = 1.0 - 2.0 * is_pos.to(torch.float32)
        total = out[start:stop]
        for (u, v, a, c, weight), (u_j, v_j) in zip(models, gathered):
            term = _two_way_pair_loss_torch(u[start:stop].float(), v[start:stop].float(), u_j, v_j, a, c, sign)
            total.add_(term, alpha=weight)
    return out


# ============================================================================================
# 4. Self scores s(x, x) (O(B * d): plain torch on any device)
# ============================================================================================


def pair_loss_self(img: torch.Tensor, txt: torch.Tensor, scale, bias) -> torch.Tensor:
    """ell(x, x) = softplus(-(a * u_x . v_x + c)): the positive-pair sigmoid term, [B] float32.

    img, txt: [B, d] (any float dtype, upcast to float32); scale a (exp already applied), bias c: floats
    or 1-element tensors.
    """
    _check_model("pair_loss_self", img, txt)
    a, c = _scalar("pair_loss_self: scale", scale), _scalar("pair_loss_self: bias", bias)
    dot = (img.float() * txt.float()).sum(dim=1)
    return F.softplus(-(a * dot + c))


def self_scores(stu_img, stu_txt, ref_img, ref_txt, *, stu_scale, stu_bias, ref_scale, ref_bias,
                rule: str) -> torch.Tensor:
    """s(x, x) for every candidate, [B] float32.

    learnability: ell_student(x, x) - ell_reference(x, x);  easy_reference: -ell_reference(x, x)
    (the student arguments may then be None).
    """
    _check_inputs(stu_img, stu_txt, ref_img, ref_txt, None, rule)
    s = -pair_loss_self(ref_img, ref_txt, ref_scale, ref_bias)
    if rule == "learnability":
        s = s + pair_loss_self(stu_img, stu_txt, stu_scale, stu_bias).to(s.device)
    return s


# ============================================================================================
# 5. Dispatcher
# ============================================================================================


def resolve_backend(backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> str:
    """Which implementation ``conditional_scores`` runs: "triton" or "torch". Never falls back silently.

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


def _scalar(name: str, x) -> float:
    """A scale or bias (float or 1-element tensor) as a finite Python float."""
    if x is None:
        raise ValueError(f"{name} is required")
    if isinstance(x, torch.Tensor) and x.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(x.shape)}")
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


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


def _check_inputs(stu_img, stu_txt, ref_img, ref_txt, chunk, rule) -> None:
    if rule not in RULES:
        raise ValueError(f"conditional batch scores: rule must be one of {RULES}, got {rule!r}")
    _check_model("reference", ref_img, ref_txt)
    if rule == "learnability":
        _check_model("student", stu_img, stu_txt)
        if stu_img.shape[0] != ref_img.shape[0]:
            raise ValueError(f"student has {stu_img.shape[0]} candidates but the reference {ref_img.shape[0]}")
        if stu_img.device != ref_img.device:
            raise ValueError(f"student embeddings on {stu_img.device} but reference on {ref_img.device}")
    if chunk is not None:
        if chunk.dim() != 1 or chunk.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"chunk must be a 1-d int64/int32 tensor of candidate indices, got "
                             f"{chunk.dtype} {tuple(chunk.shape)}")
        if chunk.numel():
            lo, hi = torch.aminmax(chunk)
            if int(lo) < 0 or int(hi) >= ref_img.shape[0]:
                raise IndexError(f"chunk indices must lie in [0, {ref_img.shape[0]}), got [{int(lo)}, {int(hi)}]")


def conditional_scores(stu_img, stu_txt, ref_img, ref_txt, chunk: torch.Tensor, *, stu_scale, stu_bias,
                       ref_scale, ref_bias, rule: str, backend: str = "auto") -> torch.Tensor:
    """cond(x) = sum_{j in chunk} [s(x, j) + s(j, x)] for every candidate x: Tensor[B] float32.

    stu_img, stu_txt: [B, ds] student embeddings (None allowed for rule="easy_reference");
    ref_img, ref_txt: [B, dr] reference embeddings; each model's pair shares one dtype
    (float32/float16/bfloat16; math in float32). chunk: [k] distinct indices into the super-batch
    (a duplicate would simply be counted twice); candidates in the chunk get y = +1 against themselves.
    Scales are exp(t) (already exponentiated), biases c; floats or 1-element tensors.
    rule: "learnability" (s = ell_student - ell_reference) or "easy_reference" (s = -ell_reference).
    backend: "auto" | "triton" | "torch" (see ``resolve_backend``); the choice is logged at DEBUG.
    """
    _check_inputs(stu_img, stu_txt, ref_img, ref_txt, chunk, rule)
    dtypes = (ref_img.dtype,) + ((stu_img.dtype,) if rule == "learnability" else ())
    ref_scale, ref_bias = _scalar("ref_scale", ref_scale), _scalar("ref_bias", ref_bias)
    if rule == "learnability":
        stu_scale, stu_bias = _scalar("stu_scale", stu_scale), _scalar("stu_bias", stu_bias)
    ran = resolve_backend(backend, ref_img.device, dtypes)
    log.debug("conditional_scores: backend=%s (asked %s) B=%d k=%d rule=%s",
              ran, backend, ref_img.shape[0], chunk.numel(), rule)
    impl = conditional_scores_triton if ran == "triton" else conditional_scores_torch
    return impl(stu_img, stu_txt, ref_img, ref_txt, chunk, stu_scale=stu_scale, stu_bias=stu_bias,
                ref_scale=ref_scale, ref_bias=ref_bias, rule=rule)
