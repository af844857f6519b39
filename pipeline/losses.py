"""Every training loss of ACID/ACED: contrastive losses, distillation losses and the unified objective.

Paper: section 3.1 (eqs. 1-3), Appendix B (eqs. 6-7: softmax / sigmoid contrastive) and Appendix D
(eqs. 12-18: softmax, sigmoid and feature-matching distillation, the combined objective, teacher
ensembles). Notation follows SPEC.md "Losses":

- a batch holds b pairs; ``img[b, d]`` = u_i, ``txt[b, d]`` = v_j are L2-normalised embeddings;
- ``scale`` is the inverse temperature a = exp(t) (already exponentiated), ``bias`` the offset c;
- logits l_ij = a * (u_i . v_j) + c  (row i = image i, column j = text j).

Conventions shared by every function here:

- Scale and bias are Python floats or 0-dim tensors (a learnable student scale keeps its graph).
- Math runs in float32 even for bf16/fp16 inputs (upcast first: a bf16 b x b logit matrix loses the
  small differences the losses are made of); float64 inputs stay float64 (used by gradcheck).
  Autocast is switched off inside every loss: under an enclosing ``torch.autocast`` region the
  trainer's forward runs in bf16, but autocast would otherwise recast the logit matmul to bf16 too.
- Logs of probabilities come from ``logsigmoid`` / ``log_softmax`` only, never ``log(sigmoid(x))``
  or ``exp`` of a logit, so logits of any size (scale 100 or more) give finite losses and gradients.
- The teacher side is a set of cached embeddings (plain tensors) plus the teacher's scale and bias as
  floats: it is detached here, so no gradient ever reaches a cache.
- Every loss returns a 0-dim tensor.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Scalar = float | torch.Tensor

__all__ = [
    "sigmoid_pair_terms",
    "sigmoid_self_terms",
    "sigmoid_contrastive",
    "softmax_contrastive",
    "softmax_kd",
    "sigmoid_kd",
    "FeatureProjection",
    "feature_matching_kd",
    "ensemble_kd",
    "unified_objective",
]


# --------------------------------------------------------------------------------------------
# helpers


def _full_precision(fn):
    """Run `fn` with autocast disabled on the device of its first tensor argument (see module doc)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        device_type = first.device.type if first is not None else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (gradcheck), else float32 (bf16/fp16/fp32 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_pair(name: str, img: torch.Tensor, txt: torch.Tensor) -> None:
    if img.dim() != 2 or txt.dim() != 2:
        raise ValueError(f"{name}: expected img[b, d] and txt[b, d], got {tuple(img.shape)} and {tuple(txt.shape)}")
    if img.shape != txt.shape:
        raise ValueError(f"{name}: img {tuple(img.shape)} and txt {tuple(txt.shape)} must have the same shape")
    if img.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (b = 0)")
    if not (img.is_floating_point() and txt.is_floating_point()):
        raise TypeError(f"{name}: embeddings must be floating point, got {img.dtype} and {txt.dtype}")


def _scalar(x: Scalar, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    """A float or 0-dim/1-element tensor as a 0-dim tensor of `dtype` (keeps the autograd graph)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(x.shape)}")
        return x.reshape(()).to(device=device, dtype=dtype)
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return torch.tensor(x, dtype=dtype, device=device)


def _logits(img: torch.Tensor, txt: torch.Tensor, scale: Scalar, bias: Scalar | None,
            dtype: torch.dtype) -> torch.Tensor:
    """l[b, b] = scale * img @ txt.T (+ bias), in `dtype`."""
    img, txt = img.to(dtype), txt.to(dtype)
    out = _scalar(scale, dtype, img.device, "scale") * (img @ txt.T)
    if bias is not None:
        out = out + _scalar(bias, dtype, img.device, "bias")
    return out


def _signs(b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """y[b, b]: +1 on the diagonal (matching pairs), -1 elsewhere."""
    return 2.0 * torch.eye(b, dtype=dtype, device=device) - 1.0


# --------------------------------------------------------------------------------------------
# contrastive losses (Appendix B)


@_full_precision
def sigmoid_pair_terms(img: torch.Tensor, txt: torch.Tensor, scale: Scalar, bias: Scalar) -> torch.Tensor:
    """Per-pair sigmoid loss terms ell(i, j) (SigLIP, eq. 7 split into its b*b terms).

    ell(i, j) = softplus(-y_ij * l_ij) = -logsigmoid(y_ij * l_ij),  l_ij = a * u_i . v_j + c,
    y_ij = +1 if i == j else -1.

    Shapes: img[B, d], txt[B, d] -> [B, B] float32 (float64 for float64 inputs); row i = image i.
    This is the plain reference of the per-pair term that selection scores are built from
    (kernels/cond_scores.py fuses the same arithmetic without materialising [B, B]).
    """
    _check_pair("sigmoid_pair_terms", img, txt)
    dtype = _compute_dtype(img, txt)
    logits = _logits(img, txt, scale, bias, dtype)
    return -F.logsigmoid(_signs(img.shape[0], dtype, img.device) * logits)


@_full_precision
def sigmoid_self_terms(img: torch.Tensor, txt: torch.Tensor, scale: Scalar, bias: Scalar) -> torch.Tensor:
    """Diagonal of `sigmoid_pair_terms`: ell(i, i) = -logsigmoid(a * u_i . v_i + c).

    Shapes: img[B, d], txt[B, d] -> [B]. Costs O(B d): only the matching pairs are formed.
    """
    _check_pair("sigmoid_self_terms", img, txt)
    dtype = _compute_dtype(img, txt)
    dots = (img.to(dtype) * txt.to(dtype)).sum(dim=1)
    logits = _scalar(scale, dtype, img.device, "scale") * dots + _scalar(bias, dtype, img.device, "bias")
    return -F.logsigmoid(logits)


@_full_precision
def sigmoid_contrastive(img: torch.Tensor, txt: torch.Tensor, scale: Scalar, bias: Scalar) -> torch.Tensor:
    """Sigmoid contrastive loss (SigLIP; Appendix B eq. 7 averaged over the batch; the default loss).

    L = (1/b) * sum_i sum_j softplus(-y_ij * (a * u_i . v_j + c)),  y_ij = +1 if i == j else -1.

    Shapes: img[b, d], txt[b, d]; scale a and bias c scalars -> 0-dim tensor.
    The 1/b normalisation (not 1/b^2) is SigLIP's: one positive and b-1 negatives per image.
    """
    terms = sigmoid_pair_terms(img, txt, scale, bias)
    return terms.sum() / img.shape[0]


@_full_precision
def softmax_contrastive(img: torch.Tensor, txt: torch.Tensor, scale: Scalar) -> torch.Tensor:
    """Softmax contrastive loss (CLIP; Appendix B eq. 6 averaged over the batch).

    l_ij = a * u_i . v_j;  L = (1/2b) * sum_i [ -log softmax_j(l_i,:)_i  -  log softmax_j(l_:,i)_i ]
    (image->text cross-entropy over rows plus text->image cross-entropy over columns).

    Shapes: img[b, d], txt[b, d]; scale a scalar -> 0-dim tensor. No bias: it cancels in a softmax.
    """
    _check_pair("softmax_contrastive", img, txt)
    dtype = _compute_dtype(img, txt)
    logits = _logits(img, txt, scale, None, dtype)
    target = torch.arange(img.shape[0], device=img.device)
    # cross_entropy uses log_softmax internally: finite for any logit size.
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# --------------------------------------------------------------------------------------------
# distillation losses (Appendix D); the teacher is a cache: detached tensors + float scale/bias


def _teacher_side(name: str, tea_img: torch.Tensor, tea_txt: torch.Tensor, b: int) -> None:
    _check_pair(name + " (teacher)", tea_img, tea_txt)
    if tea_img.shape[0] != b:
        raise ValueError(f"{name}: teacher batch {tea_img.shape[0]} != student batch {b} "
                         "(teacher rows must be the same pairs, in the same order)")


@_full_precision
def softmax_kd(stu_img: torch.Tensor, stu_txt: torch.Tensor, stu_scale: Scalar,
               tea_img: torch.Tensor, tea_txt: torch.Tensor, tea_scale: Scalar) -> torch.Tensor:
    """Softmax contrastive distillation (eq. 3 / eq. 13; the ACED default KD loss).

    T_ij = a_t * u^t_i . v^t_j,   S_ij = a_s * u_i . v_j   (eq. 12, no bias: it cancels in a softmax)
    L = -(1/2b) * sum_i [ softmax(T_i,:) . log softmax(S_i,:)      (image -> text, rows)
                        + softmax(T_:,i) . log softmax(S_:,i) ]    (text -> image, columns)

    Shapes: stu_img[b, d_s], stu_txt[b, d_s], tea_img[b, d_t], tea_txt[b, d_t] (d_s may differ from
    d_t: only the b x b logits are compared) -> 0-dim tensor.
    This is a cross-entropy, not a KL: its minimum over S is reached at S = T (up to a per-row
    constant) where it equals the teacher's entropy, so its gradient vanishes there but its value does not.
    """
    _check_pair("softmax_kd (student)", stu_img, stu_txt)
    b = stu_img.shape[0]
    _teacher_side("softmax_kd", tea_img, tea_txt, b)
    dtype = _compute_dtype(stu_img, stu_txt, tea_img, tea_txt)
    s = _logits(stu_img, stu_txt, stu_scale, None, dtype)
    with torch.no_grad():
        t = _logits(tea_img.detach(), tea_txt.detach(), float(tea_scale), None, dtype)
        p_rows = torch.softmax(t, dim=1)   # teacher image->text
        p_cols = torch.softmax(t, dim=0)   # teacher text->image (column i sums to 1)
    rows = (p_rows * torch.log_softmax(s, dim=1)).sum()
    cols = (p_cols * torch.log_softmax(s, dim=0)).sum()
    return -(rows + cols) / (2 * b)


@_full_precision
def sigmoid_kd(stu_img: torch.Tensor, stu_txt: torch.Tensor, stu_scale: Scalar, stu_bias: Scalar,
               tea_img: torch.Tensor, tea_txt: torch.Tensor, tea_scale: Scalar, tea_bias: Scalar) -> torch.Tensor:
    """Sigmoid contrastive distillation (eq. 15, logits with biases as in eq. 14).

    T_ij = a_t * u^t_i . v^t_j + c_t,   S_ij = a_s * u_i . v_j + c_s
    L = -(1/b) * sum_i sum_j [ sigmoid(T_ij) * log sigmoid(S_ij) + sigmoid(-T_ij) * log sigmoid(-S_ij) ]

    i.e. a binary cross-entropy with soft targets sigmoid(T_ij) for every one of the b*b pairs, summed
    over both indices and divided by b (the same normalisation as `sigmoid_contrastive`, whose hard
    targets y = (1 + y_ij)/2 it generalises). Shapes: stu_*[b, d_s], tea_*[b, d_t] -> 0-dim tensor.
    """
    _check_pair("sigmoid_kd (student)", stu_img, stu_txt)
    b = stu_img.shape[0]
    _teacher_side("sigmoid_kd", tea_img, tea_txt, b)
    dtype = _compute_dtype(stu_img, stu_txt, tea_img, tea_txt)
    s = _logits(stu_img, stu_txt, stu_scale, stu_bias, dtype)
    with torch.no_grad():
        t = _logits(tea_img.detach(), tea_txt.detach(), float(tea_scale), float(tea_bias), dtype)
        p = torch.sigmoid(t)
        q = torch.sigmoid(-t)   # = 1 - p, without cancellation for large t
    return -(p * F.logsigmoid(s) + q * F.logsigmoid(-s)).sum() / b


class FeatureProjection(nn.Module):
    """Learnable linear head P_head mapping student embeddings to the teacher's dimension (eq. 16).

    z_hat[b, d_teacher] = z[b, d_student] @ P,  P[d_student, d_teacher], no bias (the paper's
    z P_head). Used only when the dimensions differ. P starts semi-orthogonal so that a unit-norm
    student embedding keeps unit norm when d_teacher >= d_student (the teacher's embeddings are unit
    norm too): the loss then starts on the scale of the equal-dimension case instead of near ||t||^2 = 1
    from a tiny random projection. Computes in float32 (float64 for float64 inputs), like the losses.
    """

    def __init__(self, d_student: int, d_teacher: int):
        super().__init__()
        if d_student <= 0 or d_teacher <= 0:
            raise ValueError(f"FeatureProjection dims must be positive, got {d_student} -> {d_teacher}")
        self.d_student, self.d_teacher = int(d_student), int(d_teacher)
        self.weight = nn.Parameter(torch.empty(self.d_student, self.d_teacher))
        nn.init.orthogonal_(self.weight)

    @_full_precision
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != self.d_student:
            raise ValueError(f"FeatureProjection expects last dim {self.d_student}, got {tuple(z.shape)}")
        dtype = _compute_dtype(z, self.weight)
        return z.to(dtype) @ self.weight.to(dtype)

    def extra_repr(self) -> str:
        return f"d_student={self.d_student}, d_teacher={self.d_teacher}"


@_full_precision
def feature_matching_kd(stu_img: torch.Tensor, stu_txt: torch.Tensor, tea_img: torch.Tensor,
                        tea_txt: torch.Tensor, proj: nn.Module | None = None) -> torch.Tensor:
    """Feature-matching distillation (eq. 16; CLIP-KD's embedding MSE).

    z_hat = z P (P = `proj`, required when d_s != d_t; None means identity and needs d_s == d_t)
    L = (1/2b) * sum_i [ ||z_hat^img_i - u^t_i||^2 + ||z_hat^txt_i - v^t_i||^2 ]

    Shapes: stu_img[b, d_s], stu_txt[b, d_s], tea_img[b, d_t], tea_txt[b, d_t] -> 0-dim tensor.
    One projection is shared by both towers, as in the paper. The projected student is not
    renormalised (eq. 16 compares z P with the teacher's unit vectors directly).
    """
    _check_pair("feature_matching_kd (student)", stu_img, stu_txt)
    b = stu_img.shape[0]
    _teacher_side("feature_matching_kd", tea_img, tea_txt, b)
    d_s, d_t = stu_img.shape[1], tea_img.shape[1]
    if proj is None and d_s != d_t:
        raise ValueError(f"feature_matching_kd: student dim {d_s} != teacher dim {d_t}; "
                         "pass proj=FeatureProjection(d_student, d_teacher)")
    dtype = _compute_dtype(stu_img, stu_txt, tea_img, tea_txt)
    zi, zt = stu_img.to(dtype), stu_txt.to(dtype)
    if proj is not None:
        zi, zt = proj(zi).to(dtype), proj(zt).to(dtype)
        if zi.shape != tea_img.shape:
            raise ValueError(f"feature_matching_kd: projected student {tuple(zi.shape)} != teacher {tuple(tea_img.shape)}")
    ti, tt = tea_img.detach().to(dtype), tea_txt.detach().to(dtype)
    return (((zi - ti) ** 2).sum() + ((zt - tt) ** 2).sum()) / (2 * b)


def ensemble_kd(kd_fn: Callable[..., torch.Tensor], student_args: Sequence,
                teachers: Sequence[Sequence]) -> torch.Tensor:
    """Teacher-ensemble distillation (eq. 18): the mean over K teachers of one KD loss.

    L = (1/K) * sum_k kd_fn(*student_args, *teachers[k])

    e.g. ``ensemble_kd(softmax_kd, (img, txt, a_s), [(ti1, tt1, a1), (ti2, tt2, a2)])``.
    For softmax KD this equals eq. 18 exactly, and (the student side being shared) it is the
    cross-entropy against the teachers' averaged probabilities. Returns a 0-dim tensor.
    """
    if len(teachers) == 0:
        raise ValueError("ensemble_kd needs at least one teacher")
    total = None
    for args in teachers:
        term = kd_fn(*student_args, *args)
        total = term if total is None else total + term
    return total / len(teachers)


# --------------------------------------------------------------------------------------------
# the unified objective (eq. 17; SPEC.md "Full objective")


def unified_objective(contrastive_term: torch.Tensor,
                      kd_terms: Mapping[str, tuple[float, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full objective (eq. 17): L = L_contrastive + sum_k lambda_k * L_k.

    contrastive_term: 0-dim tensor (sigmoid or softmax contrastive loss on B_CE);
    kd_terms: {name: (lambda_k, L_k)} with L_k 0-dim tensors (on B_KD, which may be another batch).
    Returns (total, metrics): `total` keeps the graph; `metrics` holds detached 0-dim tensors
    "contrastive", one per KD name (unweighted) and "total", for per-step logging without a sync.
    """
    if contrastive_term.dim() != 0:
        raise ValueError(f"contrastive term must be a 0-dim tensor, got shape {tuple(contrastive_term.shape)}")
    total = contrastive_term
    metrics: dict[str, torch.Tensor] = {"contrastive": contrastive_term.detach()}
    for name, (weight, value) in kd_terms.items():
        if name in ("contrastive", "total"):
            raise ValueError(f"KD term name {name!r} is reserved")
        if value.dim() != 0:
            raise ValueError(f"KD term {name!r} must be a 0-dim tensor, got shape {tuple(value.shape)}")
        if not math.isfinite(float(weight)) or weight < 0:
            raise ValueError(f"KD term {name!r}: weight must be finite and >= 0, got {weight!r}")
        total = total + float(weight) * value.to(total.dtype)
        metrics[name] = value.detach()
    metrics["total"] = total.detach()
    return total, metrics
