"""pipeline/distributed.py: environment handling, and the collectives on a real two-process gloo group."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pipeline import distributed as D


def test_single_process_without_torchrun_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    g = D.setup(torch.device("cpu"))
    assert g is D.SINGLE and g.is_main and not g.active
    x = torch.arange(6.0).reshape(3, 2)
    assert g.gather_rows(x) is x and g.gather_with_grad(x) is x
    assert g.sum_floats([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
    assert g.gather_objects("a") == ["a"]


def test_half_set_environment_names_what_is_missing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        D.setup(torch.device("cpu"))


def test_shares_must_divide():
    g = D.Dist(rank=0, world=2)
    assert g.shard_size(64, "batch_size") == 32
    with pytest.raises(ValueError, match="batch_size 63 is not divisible by the 2 data-parallel ranks"):
        g.shard_size(63, "batch_size")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    g = D.setup(torch.device("cpu"), timeout_s=60)
    try:
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        allx = g.gather_with_grad(x)
        # the same loss on every rank: sum_i c_i * ||row_i||^2 with weights c_i = i + 1
        weights = torch.arange(1.0, allx.shape[0] + 1)[:, None]
        (weights * allx ** 2).sum().backward()
        summed = g.sum_metrics({"loss": torch.tensor(0.25 * (rank + 1)), "n": torch.tensor(rank, dtype=torch.float64)})
        out.put((rank, allx.detach().tolist(), x.grad.tolist(),
                 g.sum_floats([rank, 1.0], torch.device("cpu")), g.gather_objects({"rank": rank}),
                 g.gather_rows(torch.tensor([[rank]])).tolist(),
                 {k: (v.item(), v.dtype) for k, v in summed.items()}))
    finally:
        D.teardown()


def test_collectives_on_two_gloo_processes():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r[0], r[1:]) for r in (out.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for rank in (0, 1):
        allx, xgrad, sums, objs, rows, summed = results[rank]
        assert allx == [[1.0] * 3, [1.0] * 3, [2.0] * 3, [2.0] * 3]
        # the gather's backward is a reduce-scatter: this rank's rows get the sum over the ranks of each
        # rank's gradient for them, here 2 x d/dx (the same loss on both ranks)
        c = [1.0, 2.0] if rank == 0 else [3.0, 4.0]
        assert xgrad == [[2 * 2 * ci * (rank + 1)] * 3 for ci in c]
        assert sums == [1.0, 2.0]
        assert rows == [[0], [1]]
        assert summed == {"loss": (0.75, torch.float32), "n": (1.0, torch.float64)}  # sums, dtypes kept
        assert objs == ([{"rank": 0}, {"rank": 1}] if rank == 0 else None)
