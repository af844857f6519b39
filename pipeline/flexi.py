"""Scoring at a lower image resolution (Flexi-JEST style; paper section 3.3 / Appendix J cost model).

The scoring forward over the whole super-batch dominates an ACID step. A ViT sees a lower-resolution
image as fewer patches (same patch size), so its cost drops roughly with the square of the
resolution. The learned positional embedding is resized (bicubic over the patch grid, class token
kept) for the duration of the forward only; the trained parameter itself is never modified.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F


def _resized_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + g*g, w] -> [1 + grid*grid, w] (class token first, patch grid interpolated)."""
    cls, patches = pos[:1], pos[1:]
    g = int(round(math.sqrt(patches.shape[0])))
    if g * g != patches.shape[0]:
        raise ValueError(f"positional embedding of {patches.shape[0]} patches is not a square grid")
    if g == grid:
        return pos
    img = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img.float(), size=(grid, grid), mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(grid * grid, -1)], dim=0)


@contextlib.contextmanager
def at_resolution(model: torch.nn.Module, resolution: int) -> Iterator[None]:
    """Within the block, `model.encode_image` accepts images of `resolution` x `resolution` pixels."""
    visual = getattr(model, "visual", None)
    pos = getattr(visual, "positional_embedding", None)
    conv = getattr(visual, "conv1", None)
    if pos is None or conv is None:
        raise TypeError("low-resolution scoring needs an open_clip VisionTransformer image tower "
                        f"(positional_embedding + conv1); got {type(visual).__name__}")
    patch = conv.kernel_size[0]
    if resolution % patch:
        raise ValueError(f"score resolution {resolution} is not a multiple of the patch size {patch}")
    params = visual._parameters
    original = params["positional_embedding"]
    # Swap the value in place (not del + setattr): the parameter keeps its position in the module, so
    # parameter order -- and with it every reduction over parameters -- is the same as without scoring,
    # which exact resume relies on. The optimizer holds the original object, put back in `finally`.
    params["positional_embedding"] = _resized_pos_embed(original.detach(), resolution // patch)
    try:
        yield
    finally:
        params["positional_embedding"] = original
