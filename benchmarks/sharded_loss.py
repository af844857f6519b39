"""Benchmark: per-rank memory and time of the loss when each rank computes its own rows (issue 10 item 3).

For W in --worlds gloo ranks on this machine's CPU, each with m = --per-rank pairs of width --dim, every
loss (sigmoid, softmax, softmax KD, sigmoid KD) is run forward + backward on each rank three ways:
  blocks      pipeline.losses ``*_rows`` on `Dist.rows` with block = m (the current path: this rank's
              [m, b] rows visited as W [m, m] column blocks, recomputed in backward; at W = 1 the block is
              asked for explicitly, where the default is the plain loss)
  rows        this rank's whole [m, b] rows through plain autograd (the path the blocks replaced; kept here
              only as the baseline, written with the losses' own `_logits` / `_signed`)
  everything  all-gather both towers with gradient, then the plain loss over all b = W m pairs on every
              rank (the path before that: b x b per rank)
Per case: the peak of the memory alive at once among the tensors created inside the loss (forward and
backward; `_peak_and_largest`), the largest single tensor, and the median wall time over --repeats (all ranks
interleave the paths, so a load change hits all of them). The three paths' values are checked to agree.
Memory is exact; times on a shared CPU are only indicative (W ranks share the cores with whatever else
runs; the load average is recorded).

Run:  .venv/bin/python benchmarks/sharded_loss.py         (writes benchmarks/results/sharded_loss.{json,md})
      .venv/bin/python benchmarks/sharded_loss.py --per-rank 128 --repeats 2 --name /tmp/x/sharded_loss
"""
from __future__ import annotations

import _common  # noqa: F401  (puts the repo on sys.path; must come first)

import argparse
import io
import os
import socket
import statistics
import time
from pathlib import Path

from _common import markdown_table, summarise, write_report

KINDS = ("sigmoid", "softmax", "softmax_kd", "sigmoid_kd")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--per-rank", type=int, default=512, help="m, pairs per rank")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--name", default="sharded_loss", help="report name, or a path for a scratch report")
    return p.parse_args()


PATHS = ("blocks", "rows", "everything")


def _loss(path: str, kind: str, group, img, txt, tea_img, tea_txt):
    from pipeline import losses as L

    if path == "blocks":
        stu, tea, k = group.rows(img, txt), group.rows(tea_img, tea_txt, grad=False), img.shape[0]
        return {"sigmoid": lambda: L.sigmoid_contrastive_rows(stu, 10.0, -10.0, block=k),
                "softmax": lambda: L.softmax_contrastive_rows(stu, 10.0, block=k),
                "softmax_kd": lambda: L.softmax_kd_rows(stu, 10.0, tea, 20.0, block=k),
                "sigmoid_kd": lambda: L.sigmoid_kd_rows(stu, 10.0, -10.0, tea, 20.0, -5.0, block=k)}[kind]()
    if path == "rows":
        return _rows_autograd(kind, group.rows(img, txt), group.rows(tea_img, tea_txt, grad=False))
    img, txt = group.gather_with_grad(img), group.gather_with_grad(txt)
    tea_img, tea_txt = group.gather_rows(tea_img), group.gather_rows(tea_txt)
    return {"sigmoid": lambda: L.sigmoid_contrastive(img, txt, 10.0, -10.0),
            "softmax": lambda: L.softmax_contrastive(img, txt, 10.0),
            "softmax_kd": lambda: L.softmax_kd(img, txt, 10.0, tea_img, tea_txt, 20.0),
            "sigmoid_kd": lambda: L.sigmoid_kd(img, txt, 10.0, -10.0, tea_img, tea_txt, 20.0, -5.0)}[kind]()


def _rows_autograd(kind: str, stu, tea):
    """This rank's share over its whole [m, b] rows by plain autograd (fp32): the replaced ``*_rows`` code."""
    import torch
    import torch.nn.functional as F

    from pipeline import losses as L

    def lg(rows, cols, a, c=None):
        return L._logits(rows, cols, a, c, torch.float32)   # [m, b]

    b = stu.total
    if kind == "sigmoid":
        return -F.logsigmoid(L._signed(lg(stu.img, stu.txt_all, 10.0, -10.0), stu.offset)).sum() / b
    target = torch.arange(stu.offset, stu.offset + stu.img.shape[0])
    if kind == "softmax":
        return (F.cross_entropy(lg(stu.img, stu.txt_all, 10.0), target, reduction="sum")
                + F.cross_entropy(lg(stu.txt, stu.img_all, 10.0), target, reduction="sum")) / (2 * b)
    if kind == "softmax_kd":
        with torch.no_grad():
            p_rows = torch.softmax(lg(tea.img, tea.txt_all, 20.0), dim=1)
            p_cols = torch.softmax(lg(tea.txt, tea.img_all, 20.0), dim=1)
        return -((p_rows * torch.log_softmax(lg(stu.img, stu.txt_all, 10.0), dim=1)).sum()
                 + (p_cols * torch.log_softmax(lg(stu.txt, stu.img_all, 10.0), dim=1)).sum()) / (2 * b)
    s = lg(stu.img, stu.txt_all, 10.0, -10.0)
    with torch.no_grad():
        t = lg(tea.img, tea.txt_all, 20.0, -5.0)
    return -(torch.sigmoid(t) * F.logsigmoid(s) + torch.sigmoid(-t) * F.logsigmoid(-s)).sum() / b


def _peak_and_largest(fn) -> tuple[int, int]:
    """(peak bytes alive at once of the tensors created inside fn, largest single one), exact.

    Every op's outputs are seen through a TorchDispatchMode (backward included: on the CPU the autograd
    engine runs in this thread); a new storage (not one of the op's inputs, not already counted) is added
    and a finalizer on it subtracts it when it is freed (torch keeps one Python object per storage, so the
    finalizer fires when the memory goes, also for tensors only autograd still holds). Counts what the
    loss allocates, not allocator caching nor scratch space inside a kernel. (torch.profiler's per-op
    memory counts a free inside an enclosing op twice, which made the blocked path's peak come out below
    its own largest tensor.)"""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    state = {"cur": 0, "peak": 0, "largest": 0}
    live: set[int] = set()

    def free(ptr: int, nbytes: int) -> None:
        live.discard(ptr)
        state["cur"] -= nbytes

    class LiveBytes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor):
                    continue
                st = t.untyped_storage()
                ptr, nbytes = st.data_ptr(), st.nbytes()
                if nbytes == 0 or ptr in inputs or ptr in live:
                    continue
                live.add(ptr)
                weakref.finalize(st, free, ptr, nbytes)
                state["cur"] += nbytes
                state["peak"] = max(state["peak"], state["cur"])
                state["largest"] = max(state["largest"], nbytes)
            return out

    with LiveBytes():
        fn()
    return state["peak"], state["largest"]


def _rank(group, m: int, d: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(group.rank)
    unit = lambda: F.normalize(torch.randn(m, d, generator=g), dim=1)  # noqa: E731
    img, txt, tea_img, tea_txt = unit(), unit(), unit(), unit()

    def once(path, kind):
        a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
        loss = _loss(path, kind, group, a, b, tea_img, tea_txt)
        loss.backward()
        return loss.detach()

    out = {}
    for kind in KINDS:
        values = {}
        for path in PATHS:
            values[path] = once(path, kind)  # warm-up
            out[path, kind] = {"memory": _peak_and_largest(lambda: once(path, kind)), "times": []}
        # this rank's share two ways (fp32 sums in different orders); "everything" is the whole loss
        torch.testing.assert_close(values["blocks"], values["rows"], rtol=1e-4, atol=0, msg=kind)
        for _ in range(repeats):
            for path in PATHS:
                group.barrier()
                t0 = time.perf_counter()
                once(path, kind)
                out[path, kind]["times"].append(time.perf_counter() - t0)
    return out


def _entry(rank: int, world: int, port: int, m: int, d: int, repeats: int, q) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    from pipeline import distributed as D

    torch.set_num_threads(1)
    group = D.setup(torch.device("cpu"), timeout_s=600) if world > 1 else D.SINGLE
    try:
        buf = io.BytesIO()
        torch.save(_rank(group, m, d, repeats), buf)
        q.put((rank, buf.getvalue()))
    finally:
        D.teardown()


def run_world(world: int, args) -> list[dict]:
    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, world, port, args.per_rank, args.dim, args.repeats, q))
             for r in range(world)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise SystemExit(f"rank failed with exit code {p.exitcode}")
    return [torch.load(io.BytesIO(res[r])) for r in range(world)]


def main() -> None:
    args = parse()
    rows = []
    for world in args.worlds:
        load = os.getloadavg()[0]
        per_rank = run_world(world, args)
        b = world * args.per_rank
        for kind in KINDS:
            for path in PATHS:
                peak = max(r[path, kind]["memory"][0] for r in per_rank)
                largest = max(r[path, kind]["memory"][1] for r in per_rank)
                times = [statistics.median(r[path, kind]["times"]) for r in per_rank]
                t = summarise([x for r in per_rank for x in r[path, kind]["times"]])
                rows.append({"W": world, "b": b, "loss": kind, "path": path, "peak_mib": peak / 2**20,
                             "largest_mib": largest / 2**20, "peak_over_mm_fp32": peak / (args.per_rank ** 2 * 4),
                             "time_ms": {k: (v * 1e3 if k in ("median", "min", "max") else v) for k, v in t.items()},
                             "rank_medians_ms": [x * 1e3 for x in times], "load_before": load})
    cols = [("W", "W"), ("b", "b"), ("loss", "loss"), ("path", "path"), ("peak", "peak MiB / rank"),
            ("largest", "largest tensor MiB"), ("ratio", "peak / (m m fp32)"), ("time", "time ms median [min-max]"),
            ("load", "load avg")]
    cells = [{"W": r["W"], "b": r["b"], "loss": r["loss"], "path": r["path"], "peak": f"{r['peak_mib']:.2f}",
              "largest": f"{r['largest_mib']:.2f}", "ratio": f"{r['peak_over_mm_fp32']:.2f}",
              "time": f"{r['time_ms']['median']:.1f} [{r['time_ms']['min']:.1f}-{r['time_ms']['max']:.1f}]",
              "load": f"{r['load_before']:.1f}"} for r in rows]
    # per W and loss: the blocks' time over the [m, b] autograd rows (the recompute's price), and the peaks
    by = {(r["W"], r["loss"], r["path"]): r for r in rows}
    scols = [("W", "W"), ("loss", "loss"), ("blocks", "blocks peak MiB"), ("rows", "[m, b] rows peak MiB"),
             ("every", "everything peak MiB"), ("time", "time blocks / rows (medians)")]
    summary = [{"W": w, "loss": k, "blocks": f"{by[w, k, 'blocks']['peak_mib']:.2f}",
                "rows": f"{by[w, k, 'rows']['peak_mib']:.2f}", "every": f"{by[w, k, 'everything']['peak_mib']:.2f}",
                "time": f"{by[w, k, 'blocks']['time_ms']['median'] / by[w, k, 'rows']['time_ms']['median']:.2f}"}
               for w in args.worlds for k in KINDS]
    md = (f"# Per-rank loss memory: column blocks vs [m, b] rows vs gather everything (m = {args.per_rank} per "
          f"rank, d = {args.dim}, fp32, gloo ranks x 1 thread)\n\n" + markdown_table(scols, summary) +
          "\n\n" + markdown_table(cols, cells) +
          "\n\nPeak and largest tensor: tensors created inside loss forward + backward, alive at once (a dispatch mode "
          "with a finalizer per storage), the max over "
          "ranks; the peak includes the gathered [b, d] embeddings and their gradient, which grow with W "
          "(b d = W m d floats). Times: every rank's repeats pooled; indicative only on a shared CPU.\n")
    name = args.name
    out = Path(name).parent if "/" in name else None
    kwargs = {"out": out} if out else {}
    paths = write_report(Path(name).name, {"args": vars(args), "rows": rows}, md, **kwargs)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
