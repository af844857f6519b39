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
is added (one ``kernels.cond_scores.cross_scores`` call per chunk after the first, against the newest
picks' rows). One loop serves one process and W data-parallel ranks (one process = the identity
gather); inputs are validated and the backend resolved once per ``select``, and the rounds make no host
synchronisation, so a GPU never waits for the CPU inside a selection.

Scores always use the sigmoid (SigLIP) per-pair loss, whatever contrastive loss trains the student:
the softmax form would need a log-sum-exp over the selected set per candidate (SPEC.md allows either;
this module documents the sigmoid choice).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.cond_scores import (BACKENDS, Embeddings, ScoreSetup, cross_scores, pair_loss_self, prepare_scores,
                                 self_scores, take_rows)

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
    backend: "auto" | "triton" | "torch", resolved by ``kernels.cond_scores.resolve_backend``.
    """

    rule: str = "learnability"
    n_chunks: int = 16
    tau: float = 10.0
    topk: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.rule not in SELECTION_RULES:
            raise ValueError(f"SelectionConfig.rule must be one of {SELECTION_RULES}, got {self.rule!r}")
        if not isinstance(self.n_chunks, int) or isinstance(self.n_chunks, bool) or self.n_chunks < 1:
            raise ValueError(f"SelectionConfig.n_chunks must be an int >= 1, got {self.n_chunks!r}")
        if (not isinstance(self.tau, (int, float)) or isinstance(self.tau, bool)
                or not (math.isfinite(self.tau) and self.tau >= 0)):
            raise ValueError(f"SelectionConfig.tau must be a finite number >= 0, got {self.tau!r}")
        if not isinstance(self.topk, bool):
            raise ValueError(f"SelectionConfig.topk must be true or false, got {self.topk!r}")
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
    backend: the conditional-score backend that ran ("triton" | "torch"), or "none" when the rule
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
    """One host synchronisation (reading the flag); call it outside the rounds."""
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
    Embeddings may be float32, float16 or bfloat16 (kept as they are; math in float32); scales and
    biases floats or 1-element tensors.
    generator: torch.Generator for the sampling noise; the same generator state gives the same result.
    gather: data-parallel selection (ARCHITECTURE.md "Scale-out"). Each of W ranks holds its own B
        candidates and picks its own b of them, chunk by chunk, while the conditional scores see every
        rank's picks: ``gather(rows)`` maps this rank's [m, D] rows to all ranks' [W * m, D] rows in rank
        order (an all-gather; every rank must call ``select`` with the same b and config). The rows are
        the picks' embeddings as raw bytes (uint8), so one collective carries every dtype unchanged.
        cbar then normalises by the global number of picks. None = one process (the identity gather).
        Only the joint rules gather; the others are per rank.
    Costs n_chunks - 1 conditional-score calls, each of this rank's B candidates against the W * m
    newest picks (O(B * b * W * d) in all, i.e. O(B * b_global * d)) for the joint rules. Host
    synchronisations: reading tensor scales (once), the finiteness of the self scores (once, before the
    rounds) and of the final scores (once, after them); the rounds themselves have none.
    """
    B, device = _super_batch(stu_img, ref_img)
    if not isinstance(b, int) or not 1 <= b <= B:
        raise ValueError(f"select: sub-batch size b={b!r} must be an int in [1, B={B}]")

    if cfg.rule == "student_loss":
        s_self = pair_loss_self(stu_img, stu_txt, stu_scale, stu_bias)
        _require_finite("self scores", s_self)
        idx = gumbel_top_k(s_self, b, tau=cfg.tau, topk=cfg.topk, generator=generator)
        return SelectionResult(idx, s_self.clone(), s_self, "none")

    joint_rule = "easy_reference" if cfg.rule == "easy_reference" else "learnability"
    if joint_rule == "easy_reference":
        stu_img = stu_txt = stu_scale = stu_bias = None
    # validated once here (scales read as floats, backend resolved): the rounds below do no checks
    setup = prepare_scores(stu_img, stu_txt, ref_img, ref_txt, stu_scale=stu_scale, stu_bias=stu_bias,
                           ref_scale=ref_scale, ref_bias=ref_bias, rule=joint_rule,
                           backend=cfg.backend if cfg.rule in JOINT_RULES else "torch")
    s_self = self_scores(stu_img, stu_txt, ref_img, ref_txt, stu_scale=setup.stu_scale, stu_bias=setup.stu_bias,
                         ref_scale=setup.ref_scale, ref_bias=setup.ref_bias, rule=joint_rule)
    _require_finite("self scores", s_self)
    if cfg.rule not in JOINT_RULES:  # independent_learnability: one round on the per-example score
        idx = gumbel_top_k(s_self, b, tau=cfg.tau, topk=cfg.topk, generator=generator)
        return SelectionResult(idx, s_self.clone(), s_self, "none")
    scores, picks = _joint_rounds(cfg, b, setup, Embeddings(stu_img, stu_txt, ref_img, ref_txt), s_self,
                                  generator, gather)
    return SelectionResult(picks, scores, s_self, setup.backend)


def _joint_rounds(cfg: SelectionConfig, b: int, setup: ScoreSetup, cand: Embeddings, s_self: torch.Tensor,
                  generator, gather) -> tuple[torch.Tensor, torch.Tensor]:
    """The n rounds of joint sampling (one loop for one process and for W ranks): (scores [B], picks [b]).

    After each round but the last, the newest picks' rows are gathered from every rank (``_gather_picks``;
    a plain row selection in one process) and this rank's B candidates are scored against them only.
    A candidate is never scored against its own pick with y = +1 (``picked_ids`` None): it is taken by
    then, so its value is never read (its recorded score is the one it was picked with).
    No host synchronisation inside the loop: sizes come from shapes, indices stay on the device.
    """
    B, device = s_self.shape[0], s_self.device
    sizes = chunk_sizes(b, cfg.n_chunks)
    taken = torch.zeros(B, dtype=torch.bool, device=device)
    pair_sum = torch.zeros(B, dtype=torch.float32, device=device)   # sum_{j selected} s(x,j) + s(j,x)
    picked_with = torch.zeros(B, dtype=torch.float32, device=device)
    current = s_self
    picks: list[torch.Tensor] = []
    newest: Embeddings | None = None   # every rank's picks of the previous round
    n_global = 0                       # picks so far over all ranks
    world = None                       # learnt from the first gather
    for r, m in enumerate(sizes):
        if newest is not None:
            pair_sum += cross_scores(setup, cand, newest)
            current = (s_self + pair_sum) / (2 * n_global + 1)      # cbar(x) over every rank's picks
        chunk = gumbel_top_k(current, m, tau=cfg.tau, taken=taken, topk=cfg.topk, generator=generator)
        picked_with.index_copy_(0, chunk, current.index_select(0, chunk))
        taken.index_fill_(0, chunk, True)
        picks.append(chunk)
        if r == len(sizes) - 1:
            break  # the last round's picks condition nothing: no gather
        newest, world = _gather_picks(cand, chunk, gather, world)
        n_global += newest.ref_img.shape[0]
    _require_finite("conditional batch scores", current)
    return torch.where(taken, picked_with, current), torch.cat(picks)


def _gather_picks(cand: Embeddings, chunk: torch.Tensor, gather, world: int | None) -> tuple[Embeddings, int]:
    """Every rank's rows for this round's picks, in their own dtypes, and the number of ranks.

    gather None: this process's rows. Otherwise one collective: the rows of every tensor are laid side
    by side as raw bytes ([m, sum of row bytes] uint8), so student and reference embeddings of any
    dtypes (bf16 student, fp16 cache) travel in one message without a conversion, then are cut apart.
    """
    rows = take_rows(cand, chunk)
    if gather is None:
        return rows, 1
    parts = [t for t in rows if t is not None]
    widths = [t.shape[1] * t.element_size() for t in parts]
    m = chunk.shape[0]
    everyone = gather(torch.cat([t.contiguous().view(torch.uint8) for t in parts], dim=1))
    world = world or everyone.shape[0] // m
    if everyone.shape != (world * m, sum(widths)) or everyone.dtype != torch.uint8:
        raise RuntimeError(f"select: gather returned {everyone.dtype} {tuple(everyone.shape)} for {m} picks on "
                           f"each of {world} ranks: every rank must select the same b with the same config")
    pieces = iter(t.contiguous().view(p.dtype) for t, p in zip(torch.split(everyone, widths, dim=1), parts))
    return Embeddings(*(None if t is None else next(pieces) for t in rows)), world
