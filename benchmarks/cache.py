"""Benchmark: stage-1 caching throughput (pairs/s), Ray Data vs a plain loop, and fixed start-up costs.

Same models (a reference and a teacher, both embedded in each pass), same shards, same chunk size:
  - plain loop (`pipeline.ray_embed.embed_shards_plain`) in this process, torch on `--plain-threads`;
  - the Ray Data pipeline (`embed_shards_ray`) inside a running Ray (local, or the cluster at
    `--ray-address`) with each pool size of `--actors`, `--actor-threads` torch threads per actor
    (the actor pool is where Ray can win on a multi-core machine or a cluster);
  - the whole Prefect flow (`flows.cache_flow.cache_flow`: plan + embed + verify) with each engine,
    the Ray one starting and stopping its own local Ray per run, as `aced cache` does;
  - fixed costs: `ray.init` + `ray.shutdown` of a local instance; a Ray pipeline over one tiny shard
    (actor start + model load: the part of a Ray run that does not shrink with the data); Prefect's
    first flow run in a fresh process (temporary server start; cold = new database, warm = existing)
    and a further trivial flow run in a warm process.
The throughput cases run side by side: each round runs every case once, in a rotating order, so a
change of machine load hits every case alike; each run starts from an empty cache and includes
loading the models (and, for Ray, starting the actor pool); the table gives median [min-max] and
the spread ((max - min) / median) over `--repeats` rounds, and the machine's load (1-minute load
average) around each run is recorded and named. The caches of the plain and Ray cases at the same
torch thread count are compared on their data (uids, embeddings, metadata but the creation time):
they must be identical (same chunks, same thread count, float32 CPU forwards).

Run:  .venv/bin/python benchmarks/cache.py                  (writes benchmarks/results/cache.{json,md})
      .venv/bin/python benchmarks/cache.py --pairs 10240 --per-shard 256 --reference aced-vit-t \
          --quick --name cache-10k                        (the 10k-pair throughput table, ~15 min on 2 cores)
      .venv/bin/python benchmarks/cache.py --pairs 256 --repeats 2 --quick --name cache-smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The repository before benchmarks/ (which `python benchmarks/cache.py` puts first): otherwise
# benchmarks/storage.py would shadow the `storage` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_STATE = Path(tempfile.mkdtemp(prefix="aced-bench-cache-"))
# Prefect reads its settings at import: keep its state (and the temporary server's database) here
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_TMPDIR"] = str(_STATE / "ray")
os.environ.pop("RAY_ADDRESS", None)

from _common import fmt_range, markdown_table, rate, repeat, summarise, write_report  # noqa: E402

REF, TEACHER = "reference", "teacher"

PREFECT_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
from prefect import flow
t1 = time.perf_counter()
@flow
def noop():
    return 1
noop()
t2 = time.perf_counter()
noop()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_flow_s": t2 - t1, "next_flow_s": t3 - t2}))
"""


def build_workspace(root: Path, pairs: int, per_shard: int, reference: str, teacher: str) -> None:
    from pipeline.models import create_model, save_model
    from pipeline.synthetic import generate_pairs
    from storage.shards import write_shards

    write_shards(generate_pairs(pairs, seed=0, noise_frac=0.2), root / "datasets" / "bench", name="bench",
                 source="synthetic", samples_per_shard=per_shard)
    save_model(create_model(reference, seed=0), root / "models" / REF)
    if teacher != "none":
        save_model(create_model(teacher, seed=1), root / "models" / TEACHER)


def clear_cache(root: Path) -> None:
    shutil.rmtree(root / "cache", ignore_errors=True)


def cache_data(root: Path) -> dict:
    """{file: (sha256 of its table as Arrow IPC, kv metadata without the creation time)}: the cache's
    contents (uids, embeddings, model metadata) in a form that stays small at 10k+ rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    for p in sorted((root / "cache").rglob("[0-9]*.parquet")):
        t = pq.read_table(p)
        kv = sorted((k.decode(), v.decode()) for k, v in t.schema.metadata.items() if k != b"created")
        t = t.replace_schema_metadata(None).combine_chunks()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t)
        out[p.relative_to(root).as_posix()] = (hashlib.sha256(sink.getvalue()).hexdigest(), kv)
    return out


def prefect_startup(repeats: int) -> dict:
    """First flow run in a fresh process: cold (new PREFECT_HOME: migrations), then warm (same home)."""
    res = {"cold": [], "warm": [], "import": [], "next_flow": []}
    for _ in range(repeats):
        home = Path(tempfile.mkdtemp(prefix="prefect-", dir=_STATE))
        for kind in ("cold", "warm"):
            env = {**os.environ, "PREFECT_HOME": str(home)}
            p = subprocess.run([sys.executable, "-c", PREFECT_PROBE], env=env, capture_output=True, text=True,
                               timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"prefect probe failed:\n{p.stderr[-3000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            res[kind].append(r["first_flow_s"])
            res["import"].append(r["import_s"])
            res["next_flow"].append(r["next_flow_s"])
    return {k: summarise(v) for k, v in res.items()}


def side_by_side(cases: list[tuple[str, callable]], *, repeats: int, setup, last_round=None) -> dict[str, list[dict]]:
    """Run every case once per round, rotating the order each round; `setup()` (unmeasured) before
    each run, `last_round(case)` (unmeasured) after each run of the last round.
    Returns {case: [{"seconds", "load_before", "load_after", "result"}]}."""
    runs: dict[str, list[dict]] = {name: [] for name, _ in cases}
    for r in range(repeats):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for name, fn in order:
            setup()
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            res = fn()
            dt_s = time.perf_counter() - t0
            runs[name].append({"seconds": dt_s, "load_before": load0, "load_after": os.getloadavg()[0],
                               "result": res})
            print(f"round {r + 1}/{repeats} {name}: {dt_s:.2f} s (load {load0:.2f} -> {os.getloadavg()[0]:.2f})",
                  flush=True)
            if last_round is not None and r == repeats - 1:
                last_round(name)
    return runs


def ray_init_local(cores: int, tries: int = 3) -> None:
    """A local Ray; retried: on an overloaded machine its raylet can miss Ray's fixed 30 s start-up
    deadline ("The current node timed out during startup", measured at a load average of 12 on 2 cores)."""
    import ray

    for i in range(tries):
        try:
            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception here
            ray.shutdown()
            if i == tries - 1:
                raise
            print(f"ray.init failed ({e}); retrying", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--reference", default="aced-vit-s", help="model of the reference (ladder name)")
    ap.add_argument("--teacher", default="aced-vit-t",
                    help="model of the teacher (ladder name), or none: cache the reference only (as ACID needs)")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plain-threads", type=int, nargs="+", default=[1], help="torch threads of the plain cases")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="actor pool sizes of the Ray cases")
    ap.add_argument("--actor-threads", type=int, default=1, help="torch threads per actor")
    ap.add_argument("--ray-address", default=None,
                    help="run the Ray cases on this running cluster (default: a local Ray with every core)")
    ap.add_argument("--quick", action="store_true",
                    help="only the throughput table: skip the Prefect flow cases, the Prefect probe and the Ray fixed costs")
    ap.add_argument("--name", default="cache", help="report name: <out>/<name>.{json,md} (default cache)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()

    import ray
    import torch

    from pipeline.ray_embed import embed_shards_plain, embed_shards_ray, plan_cache

    cores = os.cpu_count() or 1
    root = _STATE / "ws"
    t_build = time.perf_counter()
    build_workspace(root, args.pairs, args.per_shard, args.reference, args.teacher)
    print(f"workspace: {args.pairs} pairs in {time.perf_counter() - t_build:.1f} s", flush=True)
    models = [REF] if args.teacher == "none" else [REF, TEACHER]
    rows, raw = [], {}
    plans = {}

    def fresh_plan():
        clear_cache(root)
        plans["p"] = plan_cache(root, None, models)

    # ---- Ray: start-up (local only), then one running Ray for every Ray case
    if args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=False)
    elif args.quick:
        ray_init_local(cores)
    else:
        raw["ray_init_shutdown"] = summarise(repeat(
            lambda: (ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False), ray.shutdown()),
            repeats=args.repeats))
        ray_init_local(cores)
    ray_cpus = float(ray.cluster_resources().get("CPU", cores))
    ray_nodes = sum(1 for n in ray.nodes() if n.get("Alive"))

    # ---- the throughput cases, side by side
    cases, meta, snapshots = [], {}, {}

    def plain(threads):
        return lambda: embed_shards_plain(plans["p"], chunk_size=args.chunk_size, torch_threads=threads)

    def on_ray(actors, actor_cpus):
        return lambda: embed_shards_ray(plans["p"], chunk_size=args.chunk_size, actors=actors,
                                        actor_cpus=actor_cpus, torch_threads=args.actor_threads)

    for threads in args.plain_threads:
        name = f"plain, {threads} thread(s)"
        cases.append((name, plain(threads)))
        meta[name] = ("plain", f"torch threads {threads}", threads, "model load included")
    for actors in args.actors:
        # below the cluster's CPUs (an actor pool holding every CPU starves the reads: STACK.md)
        actor_cpus = min(1.0, (ray_cpus - 0.5) / actors)
        name = f"ray, {actors} actor(s) x {args.actor_threads} thread(s)"
        cases.append((name, on_ray(actors, actor_cpus)))
        meta[name] = ("ray", f"{actors} actors x {actor_cpus:.2g} CPU x {args.actor_threads} threads",
                      args.actor_threads, "actor start + model load included")
    # the cache of each case's last run, for the equality check (each against the first case at its thread count)
    runs = side_by_side(cases, repeats=args.repeats, setup=fresh_plan,
                        last_round=lambda name: snapshots.__setitem__(name, cache_data(root)))
    identical = {}
    for name, _ in cases:
        ref = next(n for n, _ in cases if meta[n][2] == meta[name][2])
        if ref != name:
            identical[f"{name} == {ref}"] = snapshots[name] == snapshots[ref]
    loads = []
    for name, _ in cases:
        rs = runs[name]
        t = summarise([r["seconds"] for r in rs])
        load = [x for r in rs for x in (r["load_before"], r["load_after"])]
        loads += load
        work = [getattr(r["result"], "actors", None) or {} for r in rs]  # pairs per actor, per run
        used = sorted({len(w) for w in work if w})
        engine, setting, _, note = meta[name]
        raw[name] = {"seconds": t, "pairs_per_s": rate(args.pairs, t), "engine": engine, "setting": setting,
                     "runs_s": [round(r["seconds"], 3) for r in rs], "load_1min": summarise(load),
                     "pairs_per_actor_per_run": work}
        rows.append({"case": name, "setting": setting, "pairs": args.pairs, "seconds": fmt_range(t, 2),
                     "pairs_per_s": fmt_range(rate(args.pairs, t), 1), "spread": f"{t['spread']:.0%}",
                     "load": fmt_range(summarise(load), 1), "note": note,
                     "actors_used": "/".join(map(str, used))})
        print(f"{name}: {fmt_range(t, 2)} s, {fmt_range(rate(args.pairs, t), 1)} pairs/s", flush=True)
    base = next(n for n, _ in cases if meta[n][0] == "plain") if args.plain_threads else None
    for row in rows:
        if base:
            row["vs_plain"] = f"{raw[base]['seconds']['median'] / raw[row['case']]['seconds']['median']:.2f}x"

    if not (args.ray_address or args.quick):
        clear_cache(root)
        full = plan_cache(root, None, models)
        one_shard = dataclasses.replace(full, items=full.items[:1])

        def one():
            clear_cache(root)
            embed_shards_ray(one_shard, chunk_size=args.chunk_size, actors=1, torch_threads=1)
        raw["ray_one_shard"] = summarise(repeat(one, repeats=args.repeats))
    ray.shutdown()

    # ---- the Prefect flow, end to end (plan + embed + verify; Ray started per run)
    fixed = {}
    if not args.quick:
        from flows.cache_flow import cache_flow

        for engine in ("plain", "ray"):
            kw = dict(engine=engine, chunk_size=args.chunk_size, torch_threads=1)
            if engine == "ray":
                kw.update(actors=cores, actor_cpus=(cores - 0.5) / cores if cores > 1 else None,
                          num_cpus=cores)
            times = repeat(lambda: cache_flow(str(root), None, models, **kw), repeats=args.repeats, warmup=1,
                           setup=lambda: clear_cache(root))
            t = summarise(times)
            name = f"flow, {engine}"
            raw[name] = {"seconds": t, "pairs_per_s": rate(args.pairs, t), "engine": f"flow+{engine}"}
            rows.append({"case": name, "setting": "1 thread per process/actor", "pairs": args.pairs,
                         "seconds": fmt_range(t, 2), "pairs_per_s": fmt_range(rate(args.pairs, t), 1),
                         "spread": f"{t['spread']:.0%}",
                         "note": "plan + embed + verify" + (" + ray.init/shutdown" if engine == "ray" else "")
                         + " (run after the table above, not side by side)"})
        fixed["prefect"] = prefect_startup(args.repeats)

    shutil.rmtree(_STATE, ignore_errors=True)

    # ---- report
    fixed_rows = []
    if "ray_init_shutdown" in raw:
        fixed_rows.append({"what": "ray.init + ray.shutdown (local, no dashboard)",
                           "seconds": fmt_range(raw["ray_init_shutdown"], 2)})
    if "ray_one_shard" in raw:
        fixed_rows.append({"what": f"Ray pipeline over 1 shard ({args.per_shard} pairs): actor start + model load + work",
                           "seconds": fmt_range(raw["ray_one_shard"], 2)})
    if "prefect" in fixed:
        p = fixed["prefect"]
        fixed_rows += [{"what": "import prefect", "seconds": fmt_range(p["import"], 2)},
                       {"what": "first flow run in a fresh process, new PREFECT_HOME (temporary server + migrations)",
                        "seconds": fmt_range(p["cold"], 2)},
                       {"what": "first flow run in a fresh process, existing PREFECT_HOME", "seconds": fmt_range(p["warm"], 2)},
                       {"what": "a further trivial flow run in the same process", "seconds": fmt_range(p["next_flow"], 3)}]
    load_all = summarise(loads)
    report = {"pairs": args.pairs, "per_shard": args.per_shard, "shards": -(-args.pairs // args.per_shard),
              "reference": args.reference, "teacher": args.teacher, "chunk_size": args.chunk_size,
              "repeats": args.repeats, "torch": torch.__version__, "ray": ray.__version__,
              "ray_cluster": {"address": args.ray_address or "local", "nodes": ray_nodes, "cpus": ray_cpus},
              "load_1min_during_cases": load_all, "cases": raw, "fixed": fixed, "identical": identical}
    ident = "; ".join(f"{k}: {v}" for k, v in identical.items()) or "(no two cases at the same thread count)"
    where = (f"the Ray cluster at {args.ray_address} ({ray_nodes} nodes, {ray_cpus:g} CPUs)" if args.ray_address
             else f"a local Ray with {ray_cpus:g} CPUs")
    md = "\n".join([
        "# Stage-1 caching throughput: Ray Data vs a plain loop",
        "",
        f"{args.pairs} synthetic 64x64 pairs in {report['shards']} shards; "
        + (f"reference `{args.reference}` only (no teacher); " if args.teacher == "none" else
           f"reference `{args.reference}` and teacher `{args.teacher}` embedded in the same pass (pairs/s counts "
           "each pair once, both models included); ")
        + f"chunk {args.chunk_size}; float32 CPU inference; Ray cases on {where}. The cases ran side "
        f"by side: {args.repeats} rounds, each running every case once (rotating order), each run from an "
        "empty cache; median [min-max] and spread = (max - min) / median. Load = the machine's 1-minute load "
        f"average before and after each run, median [min-max] (over all cases: {fmt_range(load_all, 1)} on "
        f"{cores} cores): other work shared the machine.",
        "",
        markdown_table([("case", "case"), ("setting", "setting"), ("seconds", "seconds"),
                        ("pairs_per_s", "pairs/s"), ("spread", "spread"), ("vs_plain", "vs plain"),
                        ("actors_used", "actors that did work (per run)"), ("load", "load"), ("note", "includes")], rows),
        "",
        "## Fixed costs",
        "",
        markdown_table([("what", "what"), ("seconds", "seconds")], fixed_rows) if fixed_rows else "(not measured)",
        "",
        f"Caches identical on the data (uids, embeddings, metadata but creation time): {ident}.",
        "",
    ])
    jp, mp = write_report(args.name, report, md, **({"out": args.out} if args.out else {}))
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    try:
        main()
    finally:  # also after an error (its temporary workspace holds 10k+ pairs)
        shutil.rmtree(_STATE, ignore_errors=True)
