"""Benchmark: stage-1 caching throughput (pairs/s), Ray Data vs a plain loop, and fixed start-up costs.

Same models (a reference and a teacher, both embedded in each pass), same shards, same chunk size:
  - plain loop (`pipeline.ray_embed.embed_shards_plain`) in this process, torch on 1 and on all cores;
  - the Ray Data pipeline (`embed_shards_ray`) inside a running local Ray: 1 actor x all cores, and
    one actor per core x 1 thread (the actor pool is where Ray can win on a multi-core machine);
  - the whole Prefect flow (`flows.cache_flow.cache_flow`: plan + embed + verify) with each engine,
    the Ray one starting and stopping its own local Ray per run, as `aced cache` does;
  - fixed costs: `ray.init` + `ray.shutdown` of a local instance; a Ray pipeline over one tiny shard
    (actor start + model load: the part of a Ray run that does not shrink with the data); Prefect's
    first flow run in a fresh process (temporary server start; cold = new database, warm = existing)
    and a further trivial flow run in a warm process.
Every case is repeated (`--repeats`, after one unmeasured warm-up where noted) from an empty cache;
the table gives median [min-max]. The plain and Ray caches of the 1-thread cases are compared on
their data (they must be identical: same chunks, same thread count, float32 CPU forwards).

Run:  .venv/bin/python benchmarks/cache.py                  (writes benchmarks/results/cache.{json,md})
      .venv/bin/python benchmarks/cache.py --pairs 256 --repeats 2 --quick
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
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
    save_model(create_model(teacher, seed=1), root / "models" / TEACHER)


def clear_cache(root: Path) -> None:
    shutil.rmtree(root / "cache", ignore_errors=True)


def cache_data(root: Path) -> dict:
    """Cache contents without the per-file creation time (see tests/integration/test_cache_flow.py)."""
    import pyarrow.parquet as pq

    out = {}
    for p in sorted((root / "cache").rglob("[0-9]*.parquet")):
        t = pq.read_table(p)
        kv = {k: v for k, v in t.schema.metadata.items() if k != b"created"}
        out[p.relative_to(root).as_posix()] = (t.replace_schema_metadata(None).to_pydict(), kv)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--reference", default="aced-vit-s", help="model of the reference (ladder name)")
    ap.add_argument("--teacher", default="aced-vit-t", help="model of the teacher (ladder name)")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip the Prefect flow cases and the cold-start probe")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()

    import ray
    import torch

    from pipeline.ray_embed import embed_shards_plain, embed_shards_ray, plan_cache

    cores = os.cpu_count() or 1
    root = _STATE / "ws"
    build_workspace(root, args.pairs, args.per_shard, args.reference, args.teacher)
    models = [REF, TEACHER]
    rows, raw = [], {}
    plain_1 = ray_1 = None

    def case(name: str, engine: str, setting: str, times: list[float], pairs: int, note: str = "") -> None:
        t = summarise(times)
        raw[name] = {"seconds": t, "pairs_per_s": rate(pairs, t), "engine": engine, "setting": setting}
        rows.append({"case": name, "engine": engine, "setting": setting, "pairs": pairs,
                     "seconds": fmt_range(t, 2), "pairs_per_s": fmt_range(rate(pairs, t), 1), "note": note})
        print(f"{name}: {fmt_range(t, 2)} s, {fmt_range(rate(pairs, t), 1)} pairs/s", flush=True)

    plans = {}

    def fresh_plan():
        clear_cache(root)
        plans["p"] = plan_cache(root, None, models)

    # ---- plain loop
    for threads in sorted({1, cores}):
        times = repeat(lambda: embed_shards_plain(plans["p"], chunk_size=args.chunk_size, torch_threads=threads),
                       repeats=args.repeats, warmup=1, setup=fresh_plan)
        case(f"plain, {threads} thread(s)", "plain", f"torch threads {threads}", times, args.pairs)
        if threads == 1:
            plain_1 = cache_data(root)

    # ---- Ray: start-up, then pipelines inside one running local Ray
    ray_start = repeat(lambda: (ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False),
                                ray.shutdown()), repeats=args.repeats)
    raw["ray_init_shutdown"] = summarise(ray_start)
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray_cases = [(1, max(1, cores), None)]
    if cores > 1:
        ray_cases.append((cores, 1, (cores - 0.5) / cores))
    for actors, threads, actor_cpus in ray_cases:
        times = repeat(lambda: embed_shards_ray(plans["p"], chunk_size=args.chunk_size, actors=actors,
                                                actor_cpus=actor_cpus, torch_threads=threads),
                       repeats=args.repeats, setup=fresh_plan)
        case(f"ray, {actors} actor(s) x {threads} thread(s)", "ray", f"{actors} actors x {threads} threads",
             times, args.pairs, "actor start + model load included")
        if threads == 1:
            ray_1 = cache_data(root)
    clear_cache(root)
    full = plan_cache(root, None, models)
    one_shard = dataclasses.replace(full, items=full.items[:1])

    def one():
        clear_cache(root)
        embed_shards_ray(one_shard, chunk_size=args.chunk_size, actors=1, torch_threads=1)
    raw["ray_one_shard"] = summarise(repeat(one, repeats=args.repeats))
    ray.shutdown()
    identical = plain_1 == ray_1 if ray_1 is not None else None

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
            case(f"flow, {engine}", f"flow+{engine}", "1 thread per process/actor", times, args.pairs,
                 "plan + embed + verify" + (" + ray.init/shutdown" if engine == "ray" else ""))
        fixed["prefect"] = prefect_startup(args.repeats)

    shutil.rmtree(_STATE, ignore_errors=True)

    # ---- report
    fixed_rows = [{"what": "ray.init + ray.shutdown (local, no dashboard)", "seconds": fmt_range(raw["ray_init_shutdown"], 2)},
                  {"what": f"Ray pipeline over 1 shard ({args.per_shard} pairs): actor start + model load + work",
                   "seconds": fmt_range(raw["ray_one_shard"], 2)}]
    if "prefect" in fixed:
        p = fixed["prefect"]
        fixed_rows += [{"what": "import prefect", "seconds": fmt_range(p["import"], 2)},
                       {"what": "first flow run in a fresh process, new PREFECT_HOME (temporary server + migrations)",
                        "seconds": fmt_range(p["cold"], 2)},
                       {"what": "first flow run in a fresh process, existing PREFECT_HOME", "seconds": fmt_range(p["warm"], 2)},
                       {"what": "a further trivial flow run in the same process", "seconds": fmt_range(p["next_flow"], 3)}]
    report = {"pairs": args.pairs, "per_shard": args.per_shard, "shards": -(-args.pairs // args.per_shard),
              "reference": args.reference, "teacher": args.teacher, "chunk_size": args.chunk_size,
              "repeats": args.repeats, "torch": torch.__version__, "cases": raw, "fixed": fixed,
              "plain_vs_ray_1_thread_identical": identical}
    md = "\n".join([
        "# Stage-1 caching throughput: Ray Data vs a plain loop",
        "",
        f"{args.pairs} synthetic 64x64 pairs in {report['shards']} shards; reference `{args.reference}` and "
        f"teacher `{args.teacher}` embedded in the same pass (pairs/s counts each pair once, both models "
        f"included); chunk {args.chunk_size}; float32 CPU inference; median [min-max] of {args.repeats} "
        "repeats, each from an empty cache.",
        "",
        markdown_table([("case", "case"), ("seconds", "seconds"), ("pairs_per_s", "pairs/s"), ("note", "includes")], rows),
        "",
        "## Fixed costs",
        "",
        markdown_table([("what", "what"), ("seconds", "seconds")], fixed_rows),
        "",
        f"Plain (1 thread) and Ray (1 thread per actor) caches identical on the data: {identical}.",
        "",
    ])
    jp, mp = write_report("cache", report, md, **({"out": args.out} if args.out else {}))
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
