"""Kernels: conditional batch scores for joint batch selection (fused Triton kernel + PyTorch reference).

Knows nothing about datasets or training; see ``kernels.cond_scores`` and SPEC.md "Selection".
"""
from kernels.cond_scores import (
    BACKENDS,
    RULES,
    Embeddings,
    ScoreSetup,
    conditional_scores,
    cross_scores,
    pair_loss_self,
    prepare_scores,
    resolve_backend,
    self_scores,
    take_rows,
    triton_interpreting,
)

__all__ = ["BACKENDS", "RULES", "Embeddings", "ScoreSetup", "conditional_scores", "cross_scores", "pair_loss_self",
           "prepare_scores", "resolve_backend", "self_scores", "take_rows", "triton_interpreting"]
