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

Data-parallel ranks (ARCHITECTURE.md "Scale-out"; the layout of big_vision's SigLIP loss): each loss has
a ``*_rows`` form that takes a `Rows` (this rank's m = b / W rows of the batch, the whole batch's b rows
gathered on demand) and returns this rank's share L_r of the batch loss, so that L = sum_r L_r. A rank
owns only its [m, b] rows of the logits (its images against every text, and for the softmax losses'
text->image direction its texts against every image), and never materialises even those: they are
visited in column blocks of at most `block` columns (default m, one rank's worth), forward and again in
backward (recomputed, as flash attention does), so the largest tensor the loss creates is [m, block] and
the loss's logit memory stays flat as W grows at fixed m (a plain [m, b] block would grow as b^2 / W;
mlfoundations/open_clip issue 942). Sigmoid losses are sums over the blocks; softmax losses carry each
row's log-sum-exp across the blocks (online, also the teacher's for KD). What still grows with W is the
gathered columns themselves: [b, d] embeddings and their [b, d] gradient (d / m of an [m, b] block; a ring
exchange of [m, d] chunks, as big_vision's ppermute, would remove them too). Matching pairs are found by
index arithmetic (row i is pair offset + i), not by a dense identity matrix. With W = 1 (a `Rows` without
a gather) each ``*_rows`` function is its plain function, bit for bit, unless a `block` is asked for
(only worth it when b x b itself is too large).
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
    "Rows",
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
    "sigmoid_contrastive_rows",
    "softmax_contrastive_rows",
    "softmax_kd_rows",
    "sigmoid_kd_rows",
    "feature_matching_kd_rows",
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
    bias = None if bias is None else _scalar(bias, dtype, img.device, "bias")
    return _affine(img @ txt.T, _scalar(scale, dtype, img.device, "scale"), bias)


def _affine(dots: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *,
            inplace: bool = False) -> torch.Tensor:
    """scale * dots (+ bias): the one place logits are formed from dot products (plain and blocked).

    inplace: overwrite `dots` (a fresh matmul output inside a blocked Function, where no autograd graph
    needs it): one [m, block] tensor instead of three, the same bits."""
    if inplace:
        dots.mul_(scale)
        return dots if bias is None else dots.add_(bias)
    out = scale * dots
    return out if bias is None else out + bias


def _signed(logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """y * l for a block l[m, k] of the logits whose row i is pair offset + i: y = +1 at (i, offset + i)
    (the matching pair), -1 elsewhere. `offset` may be negative or beyond the block (a column block that
    starts after the pair, or holds none of them). Index arithmetic instead of a dense identity matrix;
    multiplying by +-1 is exact, so values and gradients are bit-identical to (2 * eye - 1) * l."""
    out = -logits
    out.diagonal(offset).neg_()  # entries (i, offset + i) inside the block
    return out


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
    return -F.logsigmoid(_signed(logits))


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


# --------------------------------------------------------------------------------------------
# this rank's rows of each loss (data-parallel ranks; module doc "Data-parallel ranks")


class Rows:
    """This rank's rows of a batch of b pairs, and the whole batch's rows when a loss asks for them.

    img[m, d], txt[m, d]: this rank's rows, which are pairs offset .. offset + m - 1 of the batch.
    `gather`: [m, d] -> [b, d], every rank's rows in rank order (pipeline.distributed.Dist.rows passes an
    all-gather: with gradient for the student, without for a cached teacher); None at W = 1, where the
    rows are the whole batch and every ``*_rows`` loss is its plain function.
    `img_all` / `txt_all` are gathered on first use and kept, so a loss that needs only the texts (sigmoid)
    never moves the images, and the KD loss on the same batch reuses the contrastive loss's gathers. Every
    rank runs the same loss code, so every rank asks for the same gathers in the same order.
    """

    def __init__(self, img: torch.Tensor, txt: torch.Tensor, *, offset: int = 0, total: int | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        _check_pair("Rows", img, txt)
        m = img.shape[0]
        total = m if total is None else int(total)
        if gather is None and (offset != 0 or total != m):
            raise ValueError(f"Rows: rows {offset}..{offset + m - 1} of {total} need a gather for the other rows")
        if not 0 <= offset <= total - m:
            raise ValueError(f"Rows: rows {offset}..{offset + m - 1} do not fit a batch of {total}")
        self.img, self.txt, self.offset, self.total = img, txt, int(offset), total
        self._gather = gather

    @property
    def whole(self) -> bool:
        """True when the rows are the whole batch (W = 1): the plain losses apply."""
        return self._gather is None

    def _all(self, x: torch.Tensor) -> torch.Tensor:
        if self._gather is None:
            return x
        out = self._gather(x)
        if out.shape != (self.total, x.shape[1]):
            raise ValueError(f"Rows: gather returned {tuple(out.shape)}, expected {(self.total, x.shape[1])}")
        return out

    @functools.cached_property
    def img_all(self) -> torch.Tensor:
        """[b, d] every rank's image rows in rank order."""
        return self._all(self.img)

    @functools.cached_property
    def txt_all(self) -> torch.Tensor:
        """[b, d] every rank's text rows in rank order."""
        return self._all(self.txt)


def _same_rows(name: str, stu: Rows, tea: Rows) -> None:
    """The teacher's rows must be the student's pairs: same count, same place in the same batch."""
    if (tea.img.shape[0], tea.offset, tea.total, tea.whole) != (stu.img.shape[0], stu.offset, stu.total, stu.whole):
        raise ValueError(f"{name}: teacher rows {tea.offset}+{tea.img.shape[0]} of {tea.total} != student rows "
                         f"{stu.offset}+{stu.img.shape[0]} of {stu.total} (teacher rows must be the same pairs)")


# ---------------------------------------------------------------- column blocks (flat per-rank memory)
# A rank's rows l[m, b] = a * rows @ cols.T (+ c) of the logits are visited `block` columns at a time by a
# custom autograd.Function: forward keeps only per-row statistics (nothing for the sigmoid sums, the row
# log-sum-exps for the softmax ones), backward recomputes each block and turns it into its gradient
# dL/dl[m, block] on the spot. torch.utils.checkpoint per block would also keep no block alive, but its
# slice of `cols` would give every block a zero-filled [b, d] gradient to add up: here one [b, d]
# gradient is written a block of rows at a time.


@dataclass(frozen=True)
class _Teacher:
    """The teacher's side of a blocked KD loss (cached embeddings: detached, no gradient).

    rows[m, d_t] and cols[b, d_t] in the compute dtype; logits t = scale * rows @ cols.T (+ bias) with 0-dim
    scale and bias (None for the softmax losses)."""

    rows: torch.Tensor
    cols: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def logits(self, j0: int, j1: int) -> torch.Tensor:
        """Columns j0 .. j1 - 1 of t: [m, j1 - j0]."""
        return _affine(self.rows @ self.cols[j0:j1].T, self.scale, self.bias, inplace=True)


def _column_blocks(b: int, block: int) -> list[tuple[int, int]]:
    """[(j0, j1)]: b columns in consecutive blocks of `block` (the last one shorter when block does not divide b)."""
    return [(j, min(j + block, b)) for j in range(0, b, block)]


def _blocked_backward(ctx, grad: torch.Tensor, dlogits: Callable[[torch.Tensor, int, int], torch.Tensor]):
    """Gradients (rows, cols, scale, bias) of a loss over the logits l = scale * rows @ cols.T (+ bias), given
    dlogits(l_block, j0, j1) = dL/dl for columns j0 .. j1 - 1 ([m, j1 - j0]); `grad` = dOut/dL (0-dim).

    With G = dL/dl:  dL/drows = scale * G @ cols,  dL/dcols = scale * G.T @ rows,  dL/dbias = sum G,
    dL/dscale = sum_ij G_ij rows_i . cols_j = sum (G @ cols) * rows, so no [m, b] tensor is needed for it."""
    rows, cols, scale, bias = ctx.saved_tensors[:4]
    with torch.autocast(device_type=rows.device.type, enabled=False):  # as in forward (module doc)
        g_rows, g_cols, g_bias = torch.zeros_like(rows), torch.empty_like(cols), rows.new_zeros(())
        for j0, j1 in _column_blocks(cols.shape[0], ctx.block):
            g = dlogits(_affine(rows @ cols[j0:j1].T, scale, bias, inplace=True), j0, j1)
            g_rows.addmm_(g, cols[j0:j1])
            g_cols[j0:j1] = g.T @ rows
            if bias is not None:
                g_bias += g.sum()
            g = None  # free this block before the next one is formed
        g_scale = (g_rows * rows).sum() * grad
        g_rows *= scale * grad
        g_cols *= scale * grad
    need = ctx.needs_input_grad
    return (g_rows if need[0] else None, g_cols if need[1] else None, g_scale if need[2] else None,
            g_bias * grad if bias is not None and need[3] else None)


class _SigmoidBlocks(torch.autograd.Function):
    """sum_{i < m, j < b} of the sigmoid loss terms of l = scale * rows @ cols.T + bias, by column blocks.

    Hard targets (teacher None; `sigmoid_contrastive`): softplus(-y_ij l_ij), y_ij = +1 iff j = offset + i.
    Soft targets (a `_Teacher` with logits t; `sigmoid_kd`): -(sigmoid(t) logsigmoid(l) + sigmoid(-t) logsigmoid(-l)).
    Inputs rows[m, d], cols[b, d], 0-dim scale and bias, all in the compute dtype -> 0-dim sum (not normalised).
    dL/dl: hard -y sigmoid(-y l); soft sigmoid(l) - sigmoid(t) (both in [0, 1]: an absolute error of one
    rounding, as autograd's sigmoid(-t) sigmoid(l) - sigmoid(t) sigmoid(-l) has, with half the sigmoids).
    """

    @staticmethod
    def forward(ctx, rows, cols, scale, bias, offset: int, block: int, teacher: _Teacher | None):
        total = rows.new_zeros(())
        for j0, j1 in _column_blocks(cols.shape[0], block):
            l = _affine(rows @ cols[j0:j1].T, scale, bias, inplace=True)
            if teacher is None:
                total += -F.logsigmoid(_signed(l, offset - j0)).sum()
            else:
                t = teacher.logits(j0, j1)
                total += -(torch.sigmoid(t) * F.logsigmoid(l) + torch.sigmoid(-t) * F.logsigmoid(-l)).sum()
            l = t = None  # free this block before the next one is formed
        ctx.save_for_backward(rows, cols, scale, bias)
        ctx.offset, ctx.block, ctx.teacher = offset, block, teacher
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        def dlogits(l, j0, j1):
            if ctx.teacher is None:
                g = torch.sigmoid(l)                                    # y = -1: d softplus(l) / dl
                pos = l.diagonal(ctx.offset - j0)
                g.diagonal(ctx.offset - j0).copy_(-torch.sigmoid(-pos))  # y = +1: d softplus(-l) / dl
                return g
            return torch.sigmoid(l) - torch.sigmoid(ctx.teacher.logits(j0, j1))
        return (*_blocked_backward(ctx, grad, dlogits), None, None, None)


class _SoftmaxBlocks(torch.autograd.Function):
    """sum_{i < m} of the row cross-entropies H(p_i, softmax(l_i,:)) of l = scale * rows @ cols.T, by column blocks.

    Hard targets (teacher None; `softmax_contrastive`): p_i one-hot at column offset + i, H = lse_i - l_i,offset+i.
    Soft targets (a `_Teacher`, logits t; `softmax_kd`): p_i = softmax(t_i,:), H = lse_i - sum_j p_ij l_ij.
    lse_i = log sum_j exp(l_ij) accumulates over the blocks with logaddexp; sum_j p_ij l_ij accumulates online
    against the teacher's running log-sum-exp (rescaled when it grows), so each block is seen once in forward.
    Backward recomputes each block: dL/dl = exp(l - lse) - p. Inputs rows[m, d], cols[b, d], 0-dim scale
    in the compute dtype -> 0-dim sum (not normalised). No bias: it cancels in a softmax.
    """

    @staticmethod
    def forward(ctx, rows, cols, scale, offset: int, block: int, teacher: _Teacher | None):
        m = rows.shape[0]
        lse = rows.new_full((m,), -math.inf)          # student row log-sum-exp so far
        lse_t = rows.new_full((m,), -math.inf)        # teacher's (soft targets)
        soft = rows.new_zeros(m)                      # sum_j p_ij l_ij so far, against lse_t
        hard = rows.new_zeros(())                     # sum of the matching pairs' logits so far
        for j0, j1 in _column_blocks(cols.shape[0], block):
            l = _affine(rows @ cols[j0:j1].T, scale, None, inplace=True)
            lse = torch.logaddexp(lse, l.logsumexp(dim=1))
            if teacher is None:
                hard += l.diagonal(offset - j0).sum()   # l[r, offset + r - j0]: the pairs in this block
            else:
                t = teacher.logits(j0, j1)
                new = torch.logaddexp(lse_t, t.logsumexp(dim=1))
                soft = soft * torch.exp(lse_t - new) + t.sub_(new[:, None]).exp_().mul_(l).sum(dim=1)
                lse_t = new
            l = t = None  # free this block before the next one is formed
        ctx.save_for_backward(rows, cols, scale, None, lse, lse_t)
        ctx.offset, ctx.block, ctx.teacher = offset, block, teacher
        return lse.sum() - (hard if teacher is None else soft.sum())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        lse, lse_t = ctx.saved_tensors[4:]

        def dlogits(l, j0, j1):
            g = l.sub_(lse[:, None]).exp_()                   # softmax(l) in this block (l is ours)
            if ctx.teacher is None:
                g.diagonal(ctx.offset - j0).sub_(1.0)
            else:
                g -= ctx.teacher.logits(j0, j1).sub_(lse_t[:, None]).exp_()
            return g
        g_rows, g_cols, g_scale, _ = _blocked_backward(ctx, grad, dlogits)
        return g_rows, g_cols, g_scale, None, None, None


def _block_size(x: Rows, block: int | None) -> int:
    """Columns per block: `block`, or this rank's row count m (one rank's worth: an [m, m] block)."""
    if block is None:
        return x.img.shape[0]
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int (columns per block), got {block!r}")
    return block


def _teacher(tea_rows: torch.Tensor, tea_cols: torch.Tensor, scale: Scalar, bias: Scalar | None,
             dtype: torch.dtype) -> _Teacher:
    """The teacher's side of a blocked KD loss; scale and bias as floats, like the plain KD losses."""
    dev = tea_rows.device
    return _Teacher(tea_rows.detach().to(dtype), tea_cols.detach().to(dtype),
                    _scalar(float(scale), dtype, dev, "scale"),
                    None if bias is None else _scalar(float(bias), dtype, dev, "bias"))


@_full_precision
def sigmoid_contrastive_rows(x: Rows, scale: Scalar, bias: Scalar, *, block: int | None = None) -> torch.Tensor:
    """This rank's share of `sigmoid_contrastive`: its rows of the b x b sum, over the global b.

    L_r = (1/b) * sum_{i in rows} sum_j softplus(-y_ij * (a * u_i . v_j + c)),  y_ij = +1 iff i == j,
    so that sum_r L_r = L. Shapes: x.img[m, d] against x.txt_all[b, d] (only the texts are gathered) ->
    0-dim tensor. The [m, b] rows are visited `block` columns at a time (default m), forward and backward:
    the largest tensor is [m, block]. At W = 1 with block None: `sigmoid_contrastive` itself.
    """
    if x.whole and block is None:
        return sigmoid_contrastive(x.img, x.txt, scale, bias)
    k, txt_all = _block_size(x, block), x.txt_all
    dtype = _compute_dtype(x.img, txt_all)
    dev = x.img.device
    total = _SigmoidBlocks.apply(x.img.to(dtype), txt_all.to(dtype), _scalar(scale, dtype, dev, "scale"),
                                 _scalar(bias, dtype, dev, "bias"), x.offset, k, None)
    return total / x.total


@_full_precision
def softmax_contrastive_rows(x: Rows, scale: Scalar, *, block: int | None = None) -> torch.Tensor:
    """This rank's share of `softmax_contrastive`: both cross-entropies of its own pairs.

    L_r = (1/2b) * sum_{i in rows} [ -log softmax_j(l_i,:)_i  -  log softmax_k(l_:,i)_i ],  l_ij = a * u_i . v_j
    The image->text term of row i needs image i against every text (x.img[m, d] against x.txt_all[b, d]); the
    text->image term of column i needs text i against every image (x.txt[m, d] against x.img_all[b, d], the
    columns of l as rows). Each direction is visited `block` columns at a time (default m) with a running
    log-sum-exp per row: the largest tensor is [m, block] -> 0-dim tensor. At W = 1 with block None:
    `softmax_contrastive` itself.
    """
    if x.whole and block is None:
        return softmax_contrastive(x.img, x.txt, scale)
    k, img_all, txt_all = _block_size(x, block), x.img_all, x.txt_all
    dtype = _compute_dtype(x.img, txt_all)
    a = _scalar(scale, dtype, x.img.device, "scale")
    i2t = _SoftmaxBlocks.apply(x.img.to(dtype), txt_all.to(dtype), a, x.offset, k, None)
    t2i = _SoftmaxBlocks.apply(x.txt.to(dtype), img_all.to(dtype), a, x.offset, k, None)
    return (i2t + t2i) / (2 * x.total)


@_full_precision
def softmax_kd_rows(stu: Rows, stu_scale: Scalar, tea: Rows, tea_scale: Scalar, *,
                    block: int | None = None) -> torch.Tensor:
    """This rank's share of `softmax_kd`: the image->text rows and text->image columns of its own pairs.

    T_ij = a_t * u^t_i . v^t_j,  S_ij = a_s * u_i . v_j
    L_r = -(1/2b) * sum_{i in rows} [ softmax(T_i,:) . log softmax(S_i,:) + softmax(T_:,i) . log softmax(S_:,i) ]
    Rows: stu.img[m, d_s] against stu.txt_all[b, d_s] with tea.img[m, d_t] against tea.txt_all; columns (as
    rows): stu.txt against stu.img_all with tea.txt against tea.img_all. Each visited `block` columns at a
    time (default m) with running log-sum-exps of student and teacher: the largest tensor is [m, block] ->
    0-dim tensor. `tea` is the same pairs as `stu` (its gather carries no gradient). At W = 1 with block
    None: `softmax_kd` itself.
    """
    _same_rows("softmax_kd_rows", stu, tea)
    if stu.whole and block is None:
        return softmax_kd(stu.img, stu.txt, stu_scale, tea.img, tea.txt, tea_scale)
    k = _block_size(stu, block)
    dtype = _compute_dtype(stu.img, stu.txt, tea.img, tea.txt)
    a = _scalar(stu_scale, dtype, stu.img.device, "scale")
    rows = _SoftmaxBlocks.apply(stu.img.to(dtype), stu.txt_all.to(dtype), a, stu.offset, k,
                                _teacher(tea.img, tea.txt_all, tea_scale, None, dtype))
    cols = _SoftmaxBlocks.apply(stu.txt.to(dtype), stu.img_all.to(dtype), a, stu.offset, k,
                                _teacher(tea.txt, tea.img_all, tea_scale, None, dtype))
    return (rows + cols) / (2 * stu.total)


@_full_precision
def sigmoid_kd_rows(stu: Rows, stu_scale: Scalar, stu_bias: Scalar,
                    tea: Rows, tea_scale: Scalar, tea_bias: Scalar, *, block: int | None = None) -> torch.Tensor:
    """This rank's share of `sigmoid_kd`: its rows of the b x b soft-target cross-entropy, over the global b.

    T_ij = a_t * u^t_i . v^t_j + c_t,  S_ij = a_s * u_i . v_j + c_s
    L_r = -(1/b) * sum_{i in rows} sum_j [ sigmoid(T_ij) log sigmoid(S_ij) + sigmoid(-T_ij) log sigmoid(-S_ij) ]
    Shapes: stu.img[m, d_s] against stu.txt_all[b, d_s], tea.img[m, d_t] against tea.txt_all[b, d_t] (only
    texts are gathered), visited `block` columns at a time (default m): the largest tensor is [m, block] ->
    0-dim tensor. At W = 1 with block None: `sigmoid_kd` itself.
    """
    _same_rows("sigmoid_kd_rows", stu, tea)
    if stu.whole and block is None:
        return sigmoid_kd(stu.img, stu.txt, stu_scale, stu_bias, tea.img, tea.txt, tea_scale, tea_bias)
    k = _block_size(stu, block)
    dtype = _compute_dtype(stu.img, stu.txt, tea.img, tea.txt)
    dev = stu.img.device
    total = _SigmoidBlocks.apply(stu.img.to(dtype), stu.txt_all.to(dtype), _scalar(stu_scale, dtype, dev, "scale"),
                                 _scalar(stu_bias, dtype, dev, "bias"), stu.offset, k,
                                 _teacher(tea.img, tea.txt_all, tea_scale, tea_bias, dtype))
    return total / stu.total


@_full_precision
def feature_matching_kd_rows(stu: Rows, tea: Rows, proj: nn.Module | None = None) -> torch.Tensor:
    """This rank's share of `feature_matching_kd`: its own pairs' squared errors over the global b.

    L_r = (1/2b) * sum_{i in rows} [ ||z_hat^img_i - u^t_i||^2 + ||z_hat^txt_i - v^t_i||^2 ],  z_hat = z P
    Per-pair, so nothing is gathered. Shapes: stu.img[m, d_s], tea.img[m, d_t] -> 0-dim tensor.
    At W = 1: `feature_matching_kd` itself.
    """
    _same_rows("feature_matching_kd_rows", stu, tea)
    local = feature_matching_kd(stu.img, stu.txt, tea.img, tea.txt, proj)   # (1/2m) * sum over the rows
    if stu.whole:
        return local
    return local * (stu.img.shape[0] / stu.total)
