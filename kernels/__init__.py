"""Kernels: conditional batch scores for joint batch selection (fused Triton kernel + PyTorch reference).

Knows nothing about datasets or training; see ``kernels.cond_scores`` and SPEC.md "Selection".
"""
from kernels.cond_scores import (
    BACKENDS,
    RULES,
    conditional_scores,
    pair_loss_self,
    resolve_backend,
    self_scores,
    triton_interpreting,
)

__all__ = ["BACKENDS", "RULES", "conditional_scores", "pair_loss_self", "resolve_backend", "self_scores",
           "triton_interpreting"]
