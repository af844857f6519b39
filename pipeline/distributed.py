"""Data-parallel training (ARCHITECTURE.md "Scale-out"): torchrun ranks, each with its share of the super-batch.

Stage 2 under `torchrun --nproc-per-node W` (or `aced train RUN --nproc W`): every rank reads, decodes and
scores only its B/W candidates, selects its b/W of them while the conditional scores see every rank's picks
(`pipeline.selection.select(gather=...)`, one all-gather per chunk), and trains on the gathered b-pair batch:
the contrastive and KD losses are computed over all b pairs on every rank (embeddings all-gathered with
their gradient, as open_clip's `gather_with_grad`), then gradients are averaged over the ranks. With W = 1
nothing here communicates and the trainer is the single-process one.

Backends: NCCL on CUDA (one GPU per rank, `LOCAL_RANK`), gloo on the CPU (what the tests run).
This module never imports Prefect; the process group is created from torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Dist", "setup", "SINGLE"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the data-parallel group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder (config, metrics, selections, checkpoints, exported model)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard_size(self, n: int, what: str) -> int:
        """n / world, refusing a split that would give the ranks different shares."""
        if n % self.world:
            raise ValueError(f"{what} {n} is not divisible by the {self.world} data-parallel ranks")
        return n // self.world

    # ---------------------------------------------------------------- collectives (no-ops at W = 1)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows in rank order, no gradient ([m, D] -> [W * m, D])."""
        if not self.active:
            return x
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    def gather_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows in rank order, differentiable: the backward sums every rank's gradient for the
        local rows, so with the same loss on every rank and `average_gradients` afterwards the update is
        the gradient of the loss over the whole gathered batch."""
        if not self.active:
            return x
        return _GatherWithGrad.apply(x.contiguous(), self.rank, self.world)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Mean of each gradient over the ranks, as one flat all-reduce (one message, not one per tensor)."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def sum_floats(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's picklable `obj` on rank 0 (rank order); None on the other ranks."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers everywhere (ranks start from the same weights by seed anyway;
        this makes it a guarantee)."""
        if not self.active:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per rank (LOCAL_RANK) on CUDA; the CPU is shared."""
        if requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested


SINGLE = Dist()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward = this rank's slice of the gradient summed over the ranks (an
    all-reduce then a slice: a reduce-scatter that gloo can run too)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, x.shape[0]
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows], None, None


def setup(device: torch.device, *, timeout_s: float = 1800.0) -> Dist:
    """The data-parallel group from torchrun's environment; SINGLE when WORLD_SIZE is unset or 1.

    Creates the default process group if nobody has (NCCL for CUDA, gloo for the CPU) and returns the
    rank. Raises with the variable's name when the environment is half set.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the trainer with torchrun "
                           "(or `aced train RUN --nproc N`)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with the "
                           f"environment (RANK={rank}, WORLD_SIZE={world})")
    return Dist(rank=rank, world=world, local_rank=local_rank)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
