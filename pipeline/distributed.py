"""Data-parallel training (ARCHITECTURE.md "Scale-out"): torchrun ranks, each with its share of the super-batch.

Stage 2 under `torchrun --nproc-per-node W` (or `aced train RUN --nproc W`): every rank reads, decodes and
scores only its B/W candidates, selects its b/W of them while the conditional scores see every rank's picks
(`pipeline.selection.select(gather=...)`, one all-gather per chunk), and trains on its m = b/W rows:
each rank computes its own rows of the contrastive and KD losses against the gathered columns
(`Dist.rows` -> `pipeline.losses.Rows` and the ``*_rows`` losses, as big_vision's SigLIP loss), one
[m, m] column block at a time, never [m, b] nor b x b (mlfoundations/open_clip issue 942 is the failure
this avoids); what still grows with W is the gathered [b, d] embeddings and their gradient.

Gradients. The batch loss is the sum of the ranks' shares, L = sum_r L_r. A rank's embeddings reach every
rank's share through the all-gather, whose backward sums the ranks' gradients for this rank's rows
(a reduce-scatter): rank r's embeddings receive dL/d(emb_r), so its parameter gradient is its rows'
part of dL/dtheta, and the ranks' parameter gradients must be SUMMED (not averaged) to give dL/dtheta, the
single-process gradient on the gathered batch. `Dist.wrap` does that sum with DistributedDataParallel and
a summing communication hook, bucket by bucket while backward runs. With W = 1 nothing here communicates
and the trainer is the single-process one.

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

from pipeline.losses import Rows

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
        out = x.new_empty((self.world * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x.contiguous())
        return out

    def gather_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows in rank order, differentiable: the backward sums every rank's gradient for the
        local rows (a reduce-scatter), so rank r's rows receive d(sum_s L_s)/d(rows_r)."""
        if not self.active:
            return x
        return _GatherWithGrad.apply(x.contiguous(), self.world)

    def rows(self, img: torch.Tensor, txt: torch.Tensor, *, grad: bool = True) -> Rows:
        """This rank's m rows of the b = W * m pair batch, for the ``*_rows`` losses of pipeline.losses.

        grad=True for the student (the gather is differentiable), False for cached teacher rows. At W = 1
        a `Rows` without a gather: every ``*_rows`` loss is then its plain single-process function."""
        if not self.active:
            return Rows(img, txt)
        m = img.shape[0]
        return Rows(img, txt, offset=self.rank * m, total=self.world * m,
                    gather=self.gather_with_grad if grad else self.gather_rows)

    def wrap(self, module: torch.nn.Module, *, bucket_mb: float = 25.0) -> torch.nn.Module:
        """`module` for training: DistributedDataParallel with SUMMED gradients at W > 1 (module doc:
        the ranks' shares L_r add up to the batch loss), `module` itself at W = 1.

        The training forward must go through the returned module's forward (DDP prepares its gradient
        buckets there); each bucket is all-reduced as soon as its gradients exist, overlapping the rest of
        backward. Parameters used outside that forward (the logit scale in the loss) still count: DDP
        hooks every parameter. static_graph: a parameter the objective never uses (the logit bias under a
        softmax loss) keeps grad None, as at W = 1, instead of stalling the reduction; the set of used
        parameters must therefore stay the same from step to step. Construction broadcasts rank 0's
        parameters and buffers (so wrap after loading a checkpoint); buffers are not re-sent every forward
        (forward_sync_buffers=False): the models here have no buffers that training changes.
        `bucket_mb`: DDP's bucket size; a model smaller than one bucket has nothing to overlap."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if next(module.parameters()).device.type == "cuda" else None
        ddp = DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False,
                                      bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True, static_graph=True)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp

    def sum_metrics(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum over the ranks of detached 0-dim tensors (the ranks' loss shares -> the batch losses), as
        one all-reduce with no host synchronisation; `metrics` itself at W = 1."""
        if not self.active or not metrics:
            return metrics
        flat = torch.stack([v.detach().reshape(()).to(torch.float64) for v in metrics.values()])
        dist.all_reduce(flat)
        return {k: flat[i].to(v.dtype) for i, (k, v) in enumerate(metrics.items())}

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

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per rank (LOCAL_RANK) on CUDA; the CPU is shared."""
        if requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested


SINGLE = Dist()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather into one [W * m, ...] tensor forward; backward = this rank's slice of the gradient summed
    over the ranks, as one reduce-scatter (W times less traffic than an all-reduce then a slice; NCCL and,
    in this torch, gloo both run it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, world: int) -> torch.Tensor:
        ctx.world = world
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // ctx.world, *grad.shape[1:]))
        dist.reduce_scatter_single(out, grad)
        return out, None


def _sum_hook(state, bucket):
    """DDP communication hook (dist.GradBucket -> Future[Tensor]): the SUM of a gradient bucket over the
    ranks (DDP's default divides by W; here the ranks' losses are shares of one sum, module doc), launched
    asynchronously while backward runs. No annotations: DDP compares them with the real classes, and this
    module's postponed annotations are strings."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


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
