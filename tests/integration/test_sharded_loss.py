"""Each rank's rows of the loss on real gloo ranks (pipeline.losses ``*_rows``, pipeline.distributed.Dist).

(a) W = 2 ranks, each with its half of the batch, a DDP-wrapped two-tower model (`Dist.wrap`) and the
    ``*_rows`` losses, give the single-process loss, gradients and Adam updates on the concatenated batch,
    for every loss (sigmoid, softmax, softmax KD over a teacher ensemble, sigmoid KD, feature matching).
(b) The largest tensor created inside a loss (forward and backward) is one [m, m] column block at
    W = 1, 2, 4 with m fixed: flat in W, neither this rank's [m, b] rows (b^2 / W) nor the b x b matrix that
    gathering everything and running the plain loss builds (that path is measured too, so the check can fail).
(c) DDP reduces gradient buckets while backward is still running (overlap), not after it.
"""
from __future__ import annotations

import functools
import io
import math
import os
import queue
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipeline import distributed as D
from pipeline import losses as L

D_IN, D_EMB, D_TEA = 6, 4, 3


# ---------------------------------------------------------------- process harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, job, out) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    group = D.setup(torch.device("cpu"), timeout_s=120)
    try:
        buf = io.BytesIO()  # bytes, not tensors: a queued tensor's shared memory dies with this process
        torch.save(job(group), buf)
        out.put((rank, buf.getvalue()))
    finally:
        D.teardown()


def _on_ranks(world: int, job) -> list:
    """job(group) on `world` gloo ranks; the results in rank order.

    The ranks fork from a forkserver that imported torch and this module once: a spawned rank imports
    torch itself (seconds each, and four of them contend for the shared cores), while a plain fork of
    this process would copy the OpenMP state of the torch it has already run."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", __name__])
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, job, out)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    deadline = time.monotonic() + 300
    while len(results) < world:
        try:
            rank, res = out.get(timeout=1.0)
            results[rank] = torch.load(io.BytesIO(res))
        except queue.Empty:
            # a rank that died (its traceback is on stderr) leaves the others waiting in a collective
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                pytest.fail(f"ranks failed (exit codes {[p.exitcode for p in procs]}) or timed out")
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return [results[r] for r in range(world)]


# ---------------------------------------------------------------- (a) equality with one process


class Towers(nn.Module):
    """A two-tower toy with the student's learnable scale and bias and a feature-matching projection."""

    def __init__(self):
        super().__init__()
        self.img = nn.Linear(D_IN, D_EMB)
        self.txt = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, D_EMB))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-5.0))
        self.kd_projection = L.FeatureProjection(D_EMB, D_TEA)

    def forward(self, x_img: torch.Tensor, x_txt: torch.Tensor):
        return F.normalize(self.img(x_img), dim=-1), F.normalize(self.txt(x_txt), dim=-1)


def _unit(g: torch.Generator, b: int, d: int) -> torch.Tensor:
    return F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)


def _objective(kind: str, model: Towers, stu: L.Rows, teachers: list[L.Rows]):
    """What train_step computes, through the *_rows losses: (this rank's share, its metrics)."""
    a, c = model.logit_scale.exp(), model.logit_bias
    if kind == "softmax":
        return L.unified_objective(L.softmax_contrastive_rows(stu, a), {})
    ce = L.sigmoid_contrastive_rows(stu, a, c)
    if kind == "sigmoid":
        return L.unified_objective(ce, {})
    if kind == "softmax_kd":  # the ACED default, over an ensemble of two teachers
        kd = L.ensemble_kd(lambda t, at: L.softmax_kd_rows(stu, a, t, at), (), [(teachers[0], 20.0),
                                                                                (teachers[1], 7.0)])
    elif kind == "sigmoid_kd":
        kd = L.sigmoid_kd_rows(stu, a, c, teachers[0], 20.0, -8.0)
    else:
        kd = L.feature_matching_kd_rows(stu, teachers[0], model.kd_projection)
    return L.unified_objective(ce, {"kd": (2.0, kd)})


KINDS = ("sigmoid", "softmax", "softmax_kd", "sigmoid_kd", "fm")
B, STEPS = 8, 2


def _train(group: D.Dist) -> dict:
    """Two Adam steps per loss on this rank's rows of a fixed global batch of B pairs."""
    g = torch.Generator().manual_seed(7)
    x_img = torch.randn(B, D_IN, generator=g, dtype=torch.float64)
    x_txt = torch.randn(B, D_IN, generator=g, dtype=torch.float64)
    teachers = [(_unit(g, B, D_TEA), _unit(g, B, D_TEA)) for _ in range(2)]
    m = group.shard_size(B, "batch")
    mine = slice(group.rank * m, (group.rank + 1) * m)
    results = {}
    for kind in KINDS:
        torch.manual_seed(0)
        model = Towers().double()
        net = group.wrap(model)  # a fresh DDP per loss: static_graph wants one set of used parameters
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        steps = []
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=True)
            img, txt = net(x_img[mine], x_txt[mine])
            stu = group.rows(img, txt)
            tea = [group.rows(ti[mine], tt[mine], grad=False) for ti, tt in teachers]
            total, metrics = _objective(kind, model, stu, tea)
            total.backward()
            metrics = group.sum_metrics(metrics)
            grads = {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
            steps.append(({k: float(v) for k, v in metrics.items()}, grads))
            opt.step()
        results[kind] = (steps, {k: p.detach().clone() for k, p in model.named_parameters()})
    return results


def _jobs(names: tuple[str, ...], group: D.Dist) -> dict:
    return {name: JOBS[name](group) for name in names}


@functools.lru_cache(maxsize=None)
def _ranks(world: int, names: tuple[str, ...]) -> list[dict]:
    """The named jobs run once on `world` spawned ranks (tests share one start-up: it dominates here)."""
    return _on_ranks(world, functools.partial(_jobs, names))


TWO_RANK_JOBS = ("train", "largest", "events")


def test_two_ranks_give_the_single_process_losses_gradients_and_updates():
    one = _train(D.SINGLE)
    ranks = [res["train"] for res in _ranks(2, TWO_RANK_JOBS)]
    for kind in KINDS:
        ref_steps, ref_params = one[kind]
        for rank, res in enumerate(ranks):
            steps, params = res[kind]
            for (metrics, grads), (ref_metrics, ref_grads) in zip(steps, ref_steps):
                assert metrics.keys() == ref_metrics.keys()
                for k in metrics:
                    assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-12), (kind, rank, k)
                for k, gr in ref_grads.items():
                    got = grads[k]
                    assert (got is None) == (gr is None), (kind, rank, k)  # e.g. no bias gradient under softmax
                    if gr is not None:
                        torch.testing.assert_close(got, gr, rtol=1e-10, atol=1e-12, msg=f"{kind} rank {rank} {k}")
            for k, p in ref_params.items():
                torch.testing.assert_close(params[k], p, rtol=1e-10, atol=1e-12, msg=f"{kind} rank {rank} {k}")
    assert one["softmax"][0][0][1]["logit_bias"] is None
    assert one["fm"][0][0][1]["kd_projection.weight"] is not None


# ---------------------------------------------------------------- (b) the largest tensor inside the loss


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op creates (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


# Per-rank batch and width: W * D_MEM < M at W = 4, so the gathered [b, d] embeddings (and their [b, d]
# gradient), which do grow with W, stay below one [m, m] block and the loss's own tensors are what is measured.
M, D_MEM = 16, 3


def _loss_by_rows(kind: str, group: D.Dist, img, txt, tea_img, tea_txt):
    stu, tea = group.rows(img, txt), group.rows(tea_img, tea_txt, grad=False)
    if kind == "sigmoid":
        return L.sigmoid_contrastive_rows(stu, 10.0, -10.0)
    if kind == "softmax":
        return L.softmax_contrastive_rows(stu, 10.0)
    if kind == "softmax_kd":
        return L.softmax_kd_rows(stu, 10.0, tea, 20.0)
    return L.sigmoid_kd_rows(stu, 10.0, -10.0, tea, 20.0, -5.0)


def _loss_gather_everything(kind: str, group: D.Dist, img, txt, tea_img, tea_txt):
    """The replaced path: gather both sides, then the plain loss over all b pairs on every rank."""
    img, txt = group.gather_with_grad(img), group.gather_with_grad(txt)
    tea_img, tea_txt = group.gather_rows(tea_img), group.gather_rows(tea_txt)
    if kind == "sigmoid":
        return L.sigmoid_contrastive(img, txt, 10.0, -10.0)
    if kind == "softmax":
        return L.softmax_contrastive(img, txt, 10.0)
    if kind == "softmax_kd":
        return L.softmax_kd(img, txt, 10.0, tea_img, tea_txt, 20.0)
    return L.sigmoid_kd(img, txt, 10.0, -10.0, tea_img, tea_txt, 20.0, -5.0)


MEM_KINDS = ("sigmoid", "softmax", "softmax_kd", "sigmoid_kd")


def _largest(group: D.Dist) -> dict:
    g = torch.Generator().manual_seed(group.rank)
    out = {}
    for path, fn in (("rows", _loss_by_rows), ("everything", _loss_gather_everything)):
        for kind in MEM_KINDS:
            img, txt = (_unit(g, M, D_MEM).float().requires_grad_() for _ in range(2))
            tea = [_unit(g, M, D_MEM).float() for _ in range(2)]
            with LargestTensor() as rec:
                fn(kind, group, img, txt, *tea).backward()
            out[path, kind] = (rec.largest, rec.op)
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_largest_tensor_of_the_loss_is_one_m_by_m_block_at_every_w(world):
    if world == 1:
        per_rank = [_largest(D.SINGLE)]
    else:
        per_rank = [res["largest"] for res in _ranks(world, TWO_RANK_JOBS if world == 2 else ("largest",))]
    b = world * M
    for res in per_rank:
        for kind in MEM_KINDS:
            largest, op = res["rows", kind]
            assert largest == M * M, (kind, world, largest, op)   # flat in W (an [m, b] block would be M * b)
            # the measurement sees the b x b matrix where the old path builds it
            assert res["everything", kind][0] == b * b, (kind, world, res["everything", kind])


# ---------------------------------------------------------------- (c) all-reduce overlapped with backward


def _events(group: D.Dist) -> list:
    """Order of (bucket reduction launched, gradient of the FIRST layer computed) in the third backward."""
    events: list = []
    hook = D._sum_hook

    def recording_hook(state, bucket):
        events.append("reduce")
        return hook(state, bucket)

    D._sum_hook = recording_hook  # Dist.wrap registers the module-level hook at wrap time
    torch.manual_seed(0)
    layers = [nn.Linear(384, 384) for _ in range(6)]  # 6 x 0.6 MB: several DDP buckets
    model = nn.Sequential(*[mod for lay in layers for mod in (lay, nn.Tanh())])
    layers[0].weight.register_hook(lambda g: events.append("first layer grad"))
    net = group.wrap(model, bucket_mb=1.0)
    x = torch.randn(4, 384)
    # Measured on torch 2.14: DDP reduces everything as one bucket after backward until it has rebuilt its
    # buckets in backward order, which static_graph does after its second iteration: the third overlaps.
    for _ in range(3):
        events.clear()
        model.zero_grad(set_to_none=True)
        net(x).square().sum().backward()
    return events


def test_ddp_reduces_buckets_while_backward_runs():
    for events in (res["events"] for res in _ranks(2, TWO_RANK_JOBS)):
        assert events.count("reduce") >= 2, events
        assert events.index("reduce") < events.index("first layer grad"), events


JOBS = {"train": _train, "largest": _largest, "events": _events}


def test_wrap_and_rows_are_plain_at_w1():
    model = Towers()
    assert D.SINGLE.wrap(model) is model
    u = torch.randn(3, 4)
    rows = D.SINGLE.rows(u, u)
    assert rows.whole and rows.img_all is u
    metrics = {"a": torch.tensor(1.5)}
    assert D.SINGLE.sum_metrics(metrics) is metrics
