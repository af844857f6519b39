"""Benchmark: joint (JEST) selection with the fused conditional-score path vs a naive full-matrix PyTorch one.

Paper Appendix J / SPEC.md "Cost model": the conditional-score work must stay a small fraction of a step
and, above all, must not need the B x B score matrix. For each super-batch size B (b = B/5, i.e. f = 0.8,
n = 16 chunks, tau = 10, learnability rule, student and reference width d = 256) this measures

- total_s: one whole ``select`` call (self scores + n-1 conditional-score rounds + Gumbel-top-k sampling);
- score_s: the score work alone: the n-1 ``conditional_scores`` calls (fused) or building the B x B
  matrix (naive);
- peak_extra_bytes: the extra memory of one selection beyond the inputs.
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the allocated bytes before.
  CPU: RSS high-water-mark growth in a fresh subprocess per (implementation, B): after a warm-up call the
  kernel's peak RSS counter is reset (writing 5 to /proc/self/clear_refs), the baseline VmRSS is read, one
  selection runs, and VmHWM - baseline is reported. That child runs with MALLOC_MMAP_THRESHOLD_=65536 so
  freed blocks go back to the OS instead of a malloc cache that would hide the next call's allocations;
  as this setting slows allocation down, the timings come from a second fresh child with the default malloc.

Implementations: "fused" = ``pipeline.selection.select`` (Triton kernel on CUDA, the blocked PyTorch
reference on CPU); "naive" = materialise s(i, j) for all pairs in float32, then the same rounds and the
same sampler reading rows/columns of that matrix. With the same generator both must select the same
indices (checked: "same_selection"). Timings: median and min/max over repeats, each repeat in the same
warm process.

Two more modes (issue 10: selection without host syncs, one loop for W = 1 and W > 1):

- ``--compare-old REV``: ``select`` of this tree vs ``select`` of commit REV (its pipeline/selection.py and
  kernels/cond_scores.py loaded from git into a temporary folder), side by side in one process on the same
  inputs, alternating old/new each repeat; reports median [min-max] and whether the selections are
  identical. Writes kernel_vs_old.{json,md}.
- ``--big B``: one ``select`` at super-batch B in a fresh child process: wall time, peak RSS of the
  process (VmHWM, inputs included) and its growth during the call. Writes kernel_big.{json,md}.

Run:  .venv/bin/python benchmarks/kernel.py --threads 1   (writes benchmarks/results/kernel.{json,md})
      .venv/bin/python benchmarks/kernel.py --sizes 320 1024 --repeats 5 --out /tmp/bench
      .venv/bin/python benchmarks/kernel.py --compare-old 5dbecb0 --sizes 16384 --repeats 5
      .venv/bin/python benchmarks/kernel.py --big 163840
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# _common first: it puts the repository ahead of benchmarks/ on sys.path (benchmarks/storage.py would
# otherwise shadow the storage package)
from _common import RESULTS, fmt_range, machine, markdown_table, summarise, write_report

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.cond_scores import conditional_scores  # noqa: E402
from pipeline.selection import SelectionConfig, chunk_sizes, gumbel_top_k, select  # noqa: E402

D = 256
N_CHUNKS = 16
TAU = 10.0
SCALES = dict(stu_scale=10.0, stu_bias=-10.0, ref_scale=10.0, ref_bias=-10.0)


def make_inputs(B: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("stu_img", "stu_txt", "ref_img", "ref_txt"):
        out[name] = F.normalize(torch.randn(B, D, generator=g), dim=1).to(device)
    return {**out, **SCALES}


# ---------------------------------------------------------------------------------------------
# the naive baseline: the whole B x B pairwise score matrix


def full_pair_loss(u: torch.Tensor, v: torch.Tensor, a: float, c: float) -> torch.Tensor:
    """ell(i, j) = softplus(-y_ij (a u_i.v_j + c)) for all pairs: [B, B] float32 (in place where possible)."""
    logits = torch.addmm(torch.tensor(c, device=u.device), u, v.T, alpha=a)
    logits.diagonal().neg_()                      # y = +1 on the diagonal
    return F.softplus(logits)


def naive_select(b: int, inputs: dict, generator: torch.Generator, timings: dict) -> torch.Tensor:
    _sync()
    t0 = time.perf_counter()
    S = full_pair_loss(inputs["stu_img"], inputs["stu_txt"], SCALES["stu_scale"], SCALES["stu_bias"])
    S.sub_(full_pair_loss(inputs["ref_img"], inputs["ref_txt"], SCALES["ref_scale"], SCALES["ref_bias"]))
    _sync()
    timings["score_s"] = time.perf_counter() - t0
    s_self = S.diagonal().clone()
    taken = torch.zeros(len(S), dtype=torch.bool, device=S.device)
    pair_sum = torch.zeros(len(S), device=S.device)
    current, picks, n_sel = s_self, [], 0
    for m in chunk_sizes(b, N_CHUNKS):
        if picks:
            J = picks[-1]
            pair_sum += S[:, J].sum(1) + S[J, :].sum(0)
            current = (s_self + pair_sum) / (2 * n_sel + 1)
        chunk = gumbel_top_k(current, m, tau=TAU, taken=taken, generator=generator)
        taken[chunk] = True
        picks.append(chunk)
        n_sel += m
    idx = torch.cat(picks)
    _sync()
    timings["total_s"] = time.perf_counter() - t0
    return idx


def fused_select(b: int, inputs: dict, generator: torch.Generator, timings: dict) -> torch.Tensor:
    _sync()
    t0 = time.perf_counter()
    res = select(SelectionConfig(rule="learnability", n_chunks=N_CHUNKS, tau=TAU), b, **inputs,
                 generator=generator)
    _sync()
    timings["total_s"] = time.perf_counter() - t0
    # the score work alone: the same n-1 conditional-score rounds on the chunks just drawn
    sizes = chunk_sizes(b, N_CHUNKS)
    bounds = [sum(sizes[:i]) for i in range(len(sizes))]
    _sync()
    t0 = time.perf_counter()
    for start, m in zip(bounds[:-1], sizes[:-1]):
        conditional_scores(inputs["stu_img"], inputs["stu_txt"], inputs["ref_img"], inputs["ref_txt"],
                           res.indices[start:start + m], rule="learnability", **SCALES)
    _sync()
    timings["score_s"] = time.perf_counter() - t0
    return res.indices


IMPLS = {"fused": fused_select, "naive": naive_select}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _proc_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def worker(impl: str, B: int, repeats: int, device: str, threads: int) -> dict:
    """One (implementation, B) in this (fresh) process: memory of one call (repeats == 0) or timed repeats."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    b = B // 5
    inputs = make_inputs(B, device)
    fn = IMPLS[impl]
    fn(b, inputs, torch.Generator(device=device).manual_seed(0), {})         # warm-up
    _sync()
    out = {"impl": impl, "B": B, "b": b, "d": D, "n_chunks": N_CHUNKS, "threads": torch.get_num_threads(),
           "device": device}
    if repeats:
        totals, scores = [], []
        for r in range(repeats):
            t = {}
            fn(b, inputs, torch.Generator(device=device).manual_seed(100 + r), t)
            totals.append(t["total_s"])
            scores.append(t["score_s"])
        return {**out, "repeats": repeats, "total_s": totals, "score_s": scores}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        idx = fn(b, inputs, torch.Generator(device=device).manual_seed(1), {})
        _sync()
        peak = torch.cuda.max_memory_allocated() - before
        memory_method = "torch.cuda.max_memory_allocated - allocated before"
    else:
        Path("/proc/self/clear_refs").write_text("5")                        # reset VmHWM to VmRSS
        before = _proc_kib("VmRSS")
        idx = fn(b, inputs, torch.Generator(device=device).manual_seed(1), {})
        peak = (_proc_kib("VmHWM") - before) * 1024
        memory_method = ("CPU RSS: VmHWM growth after clear_refs in a fresh subprocess "
                         "(MALLOC_MMAP_THRESHOLD_=65536; timings from another subprocess with default malloc)")
    return {**out, "peak_extra_bytes": peak, "memory_method": memory_method, "indices_seed1": idx.tolist()}


def run_child(impl: str, B: int, repeats: int, device: str, threads: int) -> dict:
    env = dict(os.environ)
    if not repeats:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run([sys.executable, __file__, "--worker", impl, str(B), str(repeats), device, str(threads)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {impl} B={B} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# this tree's select vs an earlier commit's, side by side in one process


def load_old_select(rev: str):
    """``select`` and ``SelectionConfig`` of commit ``rev``, with that commit's kernels/cond_scores.py."""
    root = Path(__file__).resolve().parent.parent
    tmp = Path(tempfile.mkdtemp(prefix="aced-old-select-"))
    show = lambda path: subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, check=True,  # noqa: E731
                                       capture_output=True, text=True).stdout
    (tmp / "old_cond_scores.py").write_text(show("kernels/cond_scores.py"))
    sel = show("pipeline/selection.py")
    if "from kernels.cond_scores import" not in sel:
        raise RuntimeError(f"{rev}:pipeline/selection.py does not import kernels.cond_scores as expected")
    (tmp / "old_selection.py").write_text(sel.replace("from kernels.cond_scores import", "from old_cond_scores import"))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("old_selection")


def compare_old(rev: str, sizes: list[int], repeats: int, device: str) -> list[dict]:
    old = load_old_select(rev)
    rows = []
    for B in sizes:
        b = B // 5
        inputs = make_inputs(B, device)
        impls = {"old": lambda g: old.select(old.SelectionConfig(rule="learnability", n_chunks=N_CHUNKS, tau=TAU), b,
                                             **inputs, generator=g),
                 "new": lambda g: select(SelectionConfig(rule="learnability", n_chunks=N_CHUNKS, tau=TAU), b,
                                         **inputs, generator=g)}
        results = {name: fn(torch.Generator(device=device).manual_seed(1)) for name, fn in impls.items()}  # warm-up
        same = (torch.equal(results["old"].indices, results["new"].indices)
                and torch.equal(results["old"].scores, results["new"].scores))
        times: dict[str, list[float]] = {name: [] for name in impls}
        for r in range(repeats):
            for name in (("old", "new") if r % 2 == 0 else ("new", "old")):   # alternate: drift hits both
                _sync()
                t0 = time.perf_counter()
                impls[name](torch.Generator(device=device).manual_seed(100 + r))
                _sync()
                times[name].append(time.perf_counter() - t0)
        row = {"B": B, "b": b, "d": D, "rev": rev, "repeats": repeats, "device": device,
               "threads": torch.get_num_threads(), "same_selection_and_scores": same, "total_s": times,
               "total": {k: summarise(v) for k, v in times.items()},
               "loadavg_after": os.getloadavg()}
        print(f"B={B:6d} old {row['total']['old']['median']:.3f}s new {row['total']['new']['median']:.3f}s "
              f"same={same}", flush=True)
        rows.append(row)
    return rows


def compare_markdown(rows: list[dict]) -> str:
    head = [
        f"# Joint selection: this tree vs commit {rows[0]['rev']}, side by side",
        "",
        f"Device: {rows[0]['device']}; torch threads: {rows[0]['threads']}. Learnability rule, b = B/5, d = {D}, "
        f"n = {N_CHUNKS} chunks, tau = {TAU}. One process, same inputs, old/new alternating each repeat; "
        "seconds per whole `select` call, median [min-max]. The machine was shared with other engineers' "
        "jobs (load average after each size in the JSON).",
        "",
    ]
    cols = [("B", "B"), ("b", "b"), ("repeats", "repeats"), ("old", f"{rows[0]['rev']} (s)"), ("new", "this tree (s)"),
            ("ratio", "new / old (medians)"), ("same", "same indices and scores")]
    cells = [{"B": r["B"], "b": r["b"], "repeats": r["repeats"], "old": fmt_range(r["total"]["old"], 3),
              "new": fmt_range(r["total"]["new"], 3),
              "ratio": f"{r['total']['new']['median'] / r['total']['old']['median']:.2f}",
              "same": r["same_selection_and_scores"]} for r in rows]
    return "\n".join(head) + "\n" + markdown_table(cols, cells) + "\n"


# ---------------------------------------------------------------------------------------------
# one selection at the paper's super-batch size: time and peak memory


def big_worker(B: int, device: str, threads: int) -> dict:
    if threads:
        torch.set_num_threads(threads)
    b = B // 5
    inputs = make_inputs(B, device)
    before = _proc_kib("VmRSS")
    _sync()
    t0 = time.perf_counter()
    res = select(SelectionConfig(rule="learnability", n_chunks=N_CHUNKS, tau=TAU), b, **inputs,
                 generator=torch.Generator(device=device).manual_seed(0))
    _sync()
    seconds = time.perf_counter() - t0
    assert len(set(res.indices.tolist())) == b
    out = {"B": B, "b": b, "d": D, "device": device, "threads": torch.get_num_threads(), "seconds": seconds,
           "backend": res.backend, "inputs_bytes": sum(t.numel() * t.element_size() for t in inputs.values()
                                                       if torch.is_tensor(t)),
           "rss_before_kib": before, "peak_rss_kib": _proc_kib("VmHWM"), "loadavg_after": os.getloadavg()}
    if device == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def big_markdown(r: dict) -> str:
    return "\n".join([
        f"# Joint selection at B = {r['B']:,}: time and peak memory",
        "",
        f"Device: {r['device']} (backend {r['backend']}); torch threads: {r['threads']}. Learnability rule, "
        f"b = {r['b']:,}, d = {D} (float32 inputs: {r['inputs_bytes'] / 2**30:.2f} GiB), n = {N_CHUNKS} chunks, "
        f"tau = {TAU}. One `select` call in a fresh process; the machine was shared with other engineers' jobs "
        f"(load average after: {', '.join(f'{x:.1f}' for x in r['loadavg_after'])}).",
        "",
        "| seconds | peak RSS of the process (GiB) | RSS before the call (GiB) | growth during the call (MiB) |",
        "|---|---|---|---|",
        f"| {r['seconds']:.1f} | {r['peak_rss_kib'] / 2**20:.2f} | {r['rss_before_kib'] / 2**20:.2f} | "
        f"{(r['peak_rss_kib'] - r['rss_before_kib']) / 2**10:,.1f} |",
        "",
    ])


def to_markdown(rows: list[dict], info: dict) -> str:
    head = [
        "# Joint selection: fused conditional scores vs naive full matrix",
        "",
        f"Device: {rows[0]['device']}"
        + (f" ({info['gpu']}): fused = Triton kernel" if "gpu" in info else
           ": fused = the blocked PyTorch reference path (no GPU)")
        + f"; torch threads: {rows[0]['threads']}.",
        f"Setup: learnability rule, b = B/5, d = {D} (student and reference), n = {N_CHUNKS} chunks, tau = {TAU}.",
        "Times in seconds, median [min-max] over the repeats: total = one whole select call; score = the score "
        "work alone (n-1 conditional-score calls for fused, building the B x B matrix for naive).",
        f"Memory: {rows[0]['memory_method']}.",
        "",
    ]
    cols = [("B", "B"), ("b", "b"), ("impl", "impl"), ("repeats", "repeats"), ("total", "total (s)"),
            ("score", "score (s)"), ("peak", "peak extra memory (MiB)"), ("bxb", "one B x B float32 (MiB)"),
            ("same", "same selection as naive")]
    cells = [{"B": r["B"], "b": r["b"], "impl": r["impl"], "repeats": r["repeats"],
              "total": fmt_range(r["total"], 4), "score": fmt_range(r["score"], 4),
              "peak": f"{r['peak_extra_bytes'] / 2**20:,.1f}", "bxb": f"{r['B'] ** 2 * 4 / 2**20:,.0f}",
              "same": r.get("same_selection", "")} for r in rows]
    return "\n".join(head) + "\n" + markdown_table(cols, cells) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[320, 1024, 4096, 16384],
                    help="super-batch sizes B (320 = the trainer's default step)")
    ap.add_argument("--repeats", type=int, default=None, help="default: 7 / 5 / 3 for B < 2048 / < 8192 / larger")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impls", nargs="+", default=["fused", "naive"], choices=list(IMPLS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--compare-old", metavar="REV", help="time this tree's select against commit REV's")
    ap.add_argument("--big", type=int, metavar="B", help="one select at super-batch B: time and peak RSS")
    ap.add_argument("--worker", nargs=5, metavar=("IMPL", "B", "REPEATS", "DEVICE", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--big-worker", nargs=3, metavar=("B", "DEVICE", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        impl, B, repeats, device, threads = args.worker
        print(json.dumps(worker(impl, int(B), int(repeats), device, int(threads))))
        return
    if args.big_worker:
        B, device, threads = args.big_worker
        print(json.dumps(big_worker(int(B), device, int(threads))))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_old:
        rows = compare_old(args.compare_old, args.sizes, args.repeats or 5, args.device)
        _, mp = write_report("kernel_vs_old", {"rows": rows}, compare_markdown(rows), out=args.out)
        print(mp.read_text())
        return
    if args.big:
        proc = subprocess.run([sys.executable, __file__, "--big-worker", str(args.big), args.device, str(args.threads)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"big worker failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        _, mp = write_report("kernel_big", r, big_markdown(r), out=args.out)
        print(mp.read_text())
        return
    rows = []
    for B in args.sizes:
        repeats = args.repeats or (7 if B < 2048 else 5 if B < 8192 else 3)
        by_impl = {}
        for impl in args.impls:
            r = {**run_child(impl, B, 0, args.device, args.threads),
                 **run_child(impl, B, repeats, args.device, args.threads)}
            r["total"], r["score"] = summarise(r["total_s"]), summarise(r["score_s"])
            by_impl[impl] = r
            print(f"B={B:6d} {impl:6s} total {r['total']['median']:.4f}s score {r['score']['median']:.4f}s "
                  f"peak +{r['peak_extra_bytes'] / 2**20:.1f} MiB", flush=True)
        if len(by_impl) == 2:
            same = by_impl["fused"]["indices_seed1"] == by_impl["naive"]["indices_seed1"]
            for r in by_impl.values():
                r["same_selection"] = same
        for r in by_impl.values():
            r.pop("indices_seed1")
            rows.append(r)
    torch_info = machine()
    jp, mp = write_report("kernel", {"setup": {"d": D, "n_chunks": N_CHUNKS, "tau": TAU, "rule": "learnability",
                                               "b": "B // 5", **SCALES}, "rows": rows},
                          to_markdown(rows, torch_info), out=args.out)
    print(mp.read_text())


if __name__ == "__main__":
    main()
