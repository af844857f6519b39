"""Joint batch selection (JEST / ACID): choose b of a super-batch of B candidates, chunk by chunk.

Paper: section 3.2 "Joint Batch Sampling" (n iterations of blocked Gibbs sampling after Evans et al.
[35]), Appendix G (the non-joint baselines: RHO-loss style learnability top-k, student-loss
prioritisation) and Appendix H.5 (filtering ratio f = 1 - b/B, temperature tau = 10). SPEC.md "Selection".

The law implemented for the joint rules ("learnability" = H-ACID, "easy_reference" = I-ACID), with
s(i, j) the pairwise score of ``kernels.cond_scores``:

- the b picks are split into n chunks (sizes differ by at most one, larger chunks first);
- chunk 1 is drawn without replacement from p(x) proportional to exp(tau * s(x, x));
- chunk k is drawn without replacement from p(x) proportional to exp(tau * cbar(x)) over the candidates
  not selected yet, where c(x) = s(x, x) + sum_{j selected} [s(x, j) + s(j, x)] and
  cbar(x) = c(x) / (2 |selected| + 1).

"Without replacement from a softmax" is drawn as the top-m of tau * score + Gumbel noise (the
Gumbel-top-k trick: the same law as m successive softmax draws that each remove the winner, and its
order is the order of those draws), computed in float64 log space, so no score overflows and no
B x B mask exists. The running sum over selected j is kept per candidate and only the newest chunk
is added (one ``conditional_scores`` call per chunk after the first).

Scores always use the sigmoid (SigLIP) per-pair loss, whatever contrastive loss trains the student:
the softmax form would need a log-sum-exp over the selected set per candidate (SPEC.md allows either;
this module documents the sigmoid choice).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.cond_scores import BACKENDS, conditional_scores, pair_loss_self, resolve_backend, self_scores

JOINT_RULES = ("learnability", "easy_reference")
SELECTION_RULES = JOINT_RULES + ("independent_learnability", "student_loss")

__all__ = ["JOINT_RULES", "SELECTION_RULES", "SelectionConfig", "SelectionResult", "chunk_sizes",
           "gumbel_top_k", "select"]


@dataclass(frozen=True)
class SelectionConfig:
    """How a sub-batch is chosen from a super-batch.

    rule: "learnability" (H-ACID / JEST: joint, s = ell_student - ell_reference),
        "easy_reference" (I-ACID: joint, s = -ell_reference),
        "independent_learnability" (RHO-loss style baseline: s(x, x) of learnability only, no joint terms),
        "student_loss" (baseline: prioritise a high student loss ell_student(x, x)).
        IID training draws no scores at all: the trainer takes the super-batch as it comes.
    n_chunks: n, the number of sampling rounds of the joint rules (JEST uses 16); capped at b.
    tau: temperature multiplying the scores (p proportional to exp(tau * score)); 0 = uniform, large = top-k.
    topk: take the top-m scores of each round deterministically instead of sampling (no noise).
    backend: "auto" | "triton" | "torch", passed to ``kernels.cond_scores.conditional_scores``.
    """

    rule: str = "learnability"
    n_chunks: int = 16
    tau: float = 10.0
    topk: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.rule not in SELECTION_RULES:
            raise ValueError(f"SelectionConfig.rule must be one of {SELECTION_RULES}, got {self.rule!r}")
        if not isinstance(self.n_chunks, int) or self.n_chunks < 1:
            raise ValueError(f"SelectionConfig.n_chunks must be an int >= 1, got {self.n_chunks!r}")
        if not (math.isfinite(self.tau) and self.tau >= 0):
            raise ValueError(f"SelectionConfig.tau must be finite and >= 0, got {self.tau!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"SelectionConfig.backend must be one of {BACKENDS}, got {self.backend!r}")


@dataclass(frozen=True)
class SelectionResult:
    """What ``select`` chose.

    indices: LongTensor[b], distinct candidate indices in selection order (chunk by chunk; within a
        chunk in the order of successive draws).
    scores: Tensor[B] float32, the score each candidate was sampled with: for a selected candidate the
        score of the round that picked it, for the others the score of the last round (cbar for the
        joint rules, the per-example score for the baselines).
    self_scores: Tensor[B] float32, s(x, x) of the rule (learnability for independent_learnability,
        ell_student(x, x) for student_loss).
    backend: the ``conditional_scores`` backend that ran ("triton" | "torch"), or "none" when the rule
        needs no conditional scores.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    self_scores: torch.Tensor
    backend: str


def chunk_sizes(b: int, n_chunks: int) -> list[int]:
    """Split b picks into min(n_chunks, b) chunks whose sizes differ by at most one, larger first.

    e.g. (64, 16) -> 16 x 4;  (10, 4) -> [3, 3, 2, 2];  (3, 16) -> [1, 1, 1].
    """
    if b < 1 or n_chunks < 1:
        raise ValueError(f"chunk_sizes: need b >= 1 and n_chunks >= 1, got b={b}, n_chunks={n_chunks}")
    n = min(n_chunks, b)
    q, r = divmod(b, n)
    return [q + 1] * r + [q] * (n - r)


def gumbel_top_k(scores: torch.Tensor, m: int, *, tau: float, taken: torch.Tensor | None = None,
                 topk: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw m distinct indices without replacement with p proportional to exp(tau * scores), ordered.

    scores: [B] finite; taken: [B] bool, True = not eligible. Keys are tau * score + Gumbel(0, 1) in
    float64 (topk=True: the scores alone, a deterministic top-m); the top-m keys are the draw. Keys are
    clamped to the finite float64 range so an eligible candidate can never tie with the -inf of a taken
    one, whatever the scores. Noise comes from ``generator`` (on its own device) for reproducibility.
    """
    keys = scores.to(torch.float64)
    if not topk:
        # tau = 0: exp(0 * s) is uniform; zeros rather than 0 * s keeps the branch exact
        keys = torch.zeros_like(keys) if tau == 0 else keys * tau
        gen_device = generator.device if generator is not None else keys.device
        u = torch.rand(keys.shape, dtype=torch.float64, device=gen_device, generator=generator)
        tiny = torch.finfo(torch.float64).tiny
        gumbel = -torch.log(-torch.log(u.clamp_(min=tiny)))   # u in [tiny, 1): finite noise
        keys = keys + gumbel.to(keys.device)
    big = torch.finfo(torch.float64).max
    keys = torch.nan_to_num(keys, posinf=big, neginf=-big)   # (NaN cannot occur: scores are finite)
    if taken is not None:
        keys = keys.masked_fill(taken, float("-inf"))
    return torch.topk(keys, m, sorted=True).indices


def _super_batch(stu_img, ref_img) -> tuple[int, torch.device]:
    ref = ref_img if ref_img is not None else stu_img
    if ref is None:
        raise ValueError("select: pass the student and/or reference embeddings of the super-batch")
    return ref.shape[0], ref.device


def _require_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = torch.nonzero(~torch.isfinite(x)).flatten()[:5].tolist()
        raise ValueError(f"select: {name} are not finite for candidates {bad} (NaN/inf in the embeddings, "
                         "scale or bias?)")


def select(cfg: SelectionConfig, b: int, *, stu_img=None, stu_txt=None, stu_scale=None, stu_bias=None,
           ref_img=None, ref_txt=None, ref_scale=None, ref_bias=None,
           generator: torch.Generator | None = None,
           gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SelectionResult:
    """Choose b of the B candidates of a super-batch with rule ``cfg.rule`` (see ``SelectionConfig``).

    stu_img, stu_txt: [B, ds] normalised student embeddings, stu_scale/stu_bias its a and c
    (needed by learnability, independent_learnability, student_loss);
    ref_img, ref_txt: [B, dr] cached reference embeddings, ref_scale/ref_bias
    (needed by learnability, easy_reference, independent_learnability);
    uniform needs only one embedding tensor, to know B and the device.
    generator: torch.Generator for the sampling noise; the same generator state gives the same result.
    gather: data-parallel selection (ARCHITECTURE.md "Scale-out"). Each of W ranks holds its own B
        candidates and picks its own b of them, chunk by chunk, while the conditional scores see every
        rank's picks: ``gather(rows)`` maps this rank's [m, D] rows to all ranks' [W * m, D] rows in rank
        order (an all-gather; every rank must call ``select`` with the same b and config). cbar then
        normalises by the global number of picks. Only the joint rules gather; the others are per rank.
    Costs n_chunks - 1 ``conditional_scores`` calls (O(B * b * d) in all) for the joint rules.
    """
    B, device = _super_batch(stu_img, ref_img)
    if not isinstance(b, int) or not 1 <= b <= B:
        raise ValueError(f"select: sub-batch size b={b!r} must be an int in [1, B={B}]")

    if cfg.rule == "student_loss":
        s_self = pair_loss_self(stu_img, stu_txt, stu_scale, stu_bias)
    else:
        joint_rule = "easy_reference" if cfg.rule == "easy_reference" else "learnability"
        s_self = self_scores(stu_img, stu_txt, ref_img, ref_txt, stu_scale=stu_scale, stu_bias=stu_bias,
                             ref_scale=ref_scale, ref_bias=ref_bias, rule=joint_rule)
    _require_finite("self scores", s_self)

    if cfg.rule not in JOINT_RULES:  # non-joint baselines: one round on the per-example score
        idx = gumbel_top_k(s_self, b, tau=cfg.tau, topk=cfg.topk, generator=generator)
        return SelectionResult(idx, s_self.clone(), s_self, "none")

    # joint rules: n rounds; scores are converted to floats once (no device sync per round)
    stu_scale, stu_bias = (None, None) if cfg.rule == "easy_reference" else (float(stu_scale), float(stu_bias))
    ref_scale, ref_bias = float(ref_scale), float(ref_bias)
    dtypes = (ref_img.dtype,) + ((stu_img.dtype,) if cfg.rule == "learnability" else ())
    backend = resolve_backend(cfg.backend, device, dtypes)
    if gather is not None:
        return _select_joint_gathered(cfg, b, s_self, stu_img, stu_txt, ref_img, ref_txt, stu_scale, stu_bias,
                                      ref_scale, ref_bias, backend, generator, gather)
    taken = torch.zeros(B, dtype=torch.bool, device=device)
    pair_sum = torch.zeros(B, dtype=torch.float32, device=device)   # sum_{j selected} s(x,j) + s(j,x)
    picked_with = torch.zeros(B, dtype=torch.float32, device=device)
    current = s_self
    picks: list[torch.Tensor] = []
    n_selected = 0
    for m in chunk_sizes(b, cfg.n_chunks):
        if picks:
            pair_sum += conditional_scores(stu_img, stu_txt, ref_img, ref_txt, picks[-1],
                                           stu_scale=stu_scale, stu_bias=stu_bias, ref_scale=ref_scale,
                                           ref_bias=ref_bias, rule=cfg.rule, backend=backend)
            current = (s_self + pair_sum) / (2 * n_selected + 1)      # cbar(x)
            _require_finite("conditional batch scores", current)
        chunk = gumbel_top_k(current, m, tau=cfg.tau, taken=taken, topk=cfg.topk, generator=generator)
        picked_with[chunk] = current[chunk]
        taken[chunk] = True
        picks.append(chunk)
        n_selected += m
    scores = torch.where(taken, picked_with, current)
    return SelectionResult(torch.cat(picks), scores, s_self, backend)


def _select_joint_gathered(cfg, b, s_self, stu_img, stu_txt, ref_img, ref_txt, stu_scale, stu_bias, ref_scale,
                           ref_bias, backend, generator, gather) -> SelectionResult:
    """The joint rounds of ``select`` across ranks (see its `gather`).

    Every rank's picks of a round are all-gathered (student and reference rows, one call) into a
    buffer appended after the local candidates, so the kernel scores the local candidates against them
    by index, unchanged. The buffer rows are never candidates (they are sliced off the output), and a
    local candidate is never compared with its own copy in the buffer, because it is taken by then.
    """
    B, device = s_self.shape[0], s_self.device
    learn = cfg.rule == "learnability"
    parts = ([stu_img, stu_txt] if learn else []) + [ref_img, ref_txt]
    widths = [t.shape[1] for t in parts]
    sizes = chunk_sizes(b, cfg.n_chunks)
    world = 0  # known from the first gather (its rows / this rank's picks)
    ext: list[torch.Tensor] = []  # candidates + everyone's picks, allocated at the first gather
    taken = torch.zeros(B, dtype=torch.bool, device=device)
    pair_sum = torch.zeros(B, dtype=torch.float32, device=device)
    picked_with = torch.zeros(B, dtype=torch.float32, device=device)
    current = s_self
    picks: list[torch.Tensor] = []
    filled = 0  # rows of the pick buffer written so far (global picks)
    for r, m in enumerate(sizes):
        if r:
            newest = torch.arange(B + filled - world * sizes[r - 1], B + filled, device=device)
            stu_x = (ext[0], ext[1]) if learn else (None, None)
            full = conditional_scores(*stu_x, ext[-2], ext[-1], newest, stu_scale=stu_scale, stu_bias=stu_bias,
                                      ref_scale=ref_scale, ref_bias=ref_bias, rule=cfg.rule, backend=backend)
            pair_sum += full[:B]
            current = (s_self + pair_sum) / (2 * filled + 1)      # cbar(x) over every rank's picks
            _require_finite("conditional batch scores", current)
        chunk = gumbel_top_k(current, m, tau=cfg.tau, taken=taken, topk=cfg.topk, generator=generator)
        picked_with[chunk] = current[chunk]
        taken[chunk] = True
        picks.append(chunk)
        if r == len(sizes) - 1:
            break  # the last round's picks condition nothing: no gather
        rows = torch.cat([t.index_select(0, chunk).to(torch.float32) for t in parts], dim=1)
        everyone = gather(rows)
        if not ext:
            world = everyone.shape[0] // m
            ext = [torch.cat([t, t.new_zeros(world * b, t.shape[1])]) for t in parts]
        if everyone.shape != (world * m, sum(widths)):
            raise RuntimeError(f"select: gather returned {tuple(everyone.shape)} for {m} picks on each of {world} "
                               "ranks: every rank must select the same b with the same config")
        for t, piece in zip(ext, torch.split(everyone, widths, dim=1)):
            t[B + filled:B + filled + world * m] = piece.to(t.dtype)
        filled += world * m
    scores = torch.where(taken, picked_with, current)
    return SelectionResult(torch.cat(picks), scores, s_self, backend)
