"""Prefect flow for stage 1: cache reference/teacher embeddings of pair shards (paper Appendix J).

plan (which shard x model pairs the manifests lack) -> embed them (one Ray Data pipeline, or the
plain loop) -> check every shard of the run's datasets reads back. The work itself lives in
`pipeline.ray_embed` (and the formats in `storage.cache`); this file only orders the steps, logs,
and retries.

Reruns are cheap and safe because the cache manifests, not Prefect, say what is done: a rerun
plans only missing shards, a retried task re-plans first, and a shard becomes visible only once
its file and manifest entry are both written (atomic renames). So Prefect's own result caching is
off (NO_CACHE): a deleted cache file must be recomputed, not answered from a stale task result.
"""
from __future__ import annotations


from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.ray_embed import (CachePlan, ShardWritten, cache_lock, embed_shards_plain, embed_shards_ray,
                                plan_cache, ray_session, verify_plan)
from storage import fs

ENGINES = ("ray", "plain")


@task(name="plan-cache", cache_policy=NO_CACHE)
def plan_task(root: str, datasets: list[str] | None, models: list[str], dtype: str) -> CachePlan:
    plan = plan_cache(root, datasets, models, dtype=dtype)
    logger = get_run_logger()
    logger.info("models: %s", ", ".join(f"{m.model_id} (d={m.meta.dim}, fp={m.meta.fingerprint[:12]})"
                                        for m in plan.models))
    logger.info("datasets: %s; pending: %d shards, %d pairs, %d embeddings",
                ", ".join(plan.datasets), len(plan.items), plan.pairs, plan.embeddings)
    return plan


@task(name="embed-pending", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def embed_task(plan: CachePlan, engine: str, chunk_size: int, actors: int | None, actor_cpus: float | None,
               torch_threads: int | None, ray_address: str | None, num_cpus: int | None,
               object_store_mb: int | None) -> dict:
    logger = get_run_logger()

    def progress(rec: ShardWritten) -> None:
        logger.info("cached %s/%s for %s: %d/%d shards, %.1f pairs/s%s", rec.dataset, rec.shard,
                    ",".join(rec.model_ids), rec.done, rec.total, rec.pairs_per_s,
                    f" (node {', '.join(n[:12] for n in rec.nodes)})" if rec.nodes else "")

    with cache_lock(plan.root):
        plan = plan.refresh()  # a retry (or a run racing a finished one) skips what is committed by now
        if not plan.items:
            logger.info("nothing left to embed")
            return {"engine": engine, "shards": 0, "pairs": 0}
        if engine == "ray":
            store = object_store_mb * 2**20 if object_store_mb else None
            with ray_session(ray_address, num_cpus=num_cpus, object_store_memory=store, root=plan.root):
                res = embed_shards_ray(plan, chunk_size=chunk_size, actors=actors, actor_cpus=actor_cpus,
                                       torch_threads=torch_threads, on_shard=progress)
        else:
            res = embed_shards_plain(plan, chunk_size=chunk_size, torch_threads=torch_threads, on_shard=progress)
    out = res.to_dict()
    logger.info("%s engine: %d shards, %d pairs in %.1f s (%s pairs/s)", engine, out["shards"], out["pairs"],
                out["seconds"], out["pairs_per_s"])
    if out["nodes"]:
        logger.info("pairs per Ray node: %s", {n[:12]: k for n, k in out["nodes"].items()})
    return out


@task(name="verify-cache", cache_policy=NO_CACHE)
def verify_task(plan: CachePlan) -> int:
    checked, problems = verify_plan(plan)
    if problems:
        raise RuntimeError(f"{len(problems)} cache problem(s) after the run:\n" + "\n".join(problems[:20]))
    get_run_logger().info("verified %d cache files", checked)
    return checked


@flow(name="cache", log_prints=True)
def cache_flow(root: str, datasets: list[str] | None = None, models: list[str] | None = None, *,
               engine: str = "ray", chunk_size: int = 64, dtype: str = "float16",
               actors: int | None = None, actor_cpus: float | None = None, torch_threads: int | None = None,
               ray_address: str | None = None, num_cpus: int | None = None,
               object_store_mb: int | None = None) -> dict:
    """Embed every shard of `datasets` (default: all under `<root>/datasets`) with every model in
    `models` (ids under `<root>/models` or folders) that its cache lacks, then verify the caches.

    engine: "ray" (one Ray Data pipeline; `ray_address`/$RAY_ADDRESS joins a running cluster, which
    is left running, else a local Ray with `num_cpus` and `object_store_mb`) or "plain" (this
    process). Returns a summary dict; its result has the pairs embedded per Ray node (`nodes`) and
    per actor (`actors`).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not models:
        raise ValueError("cache_flow: give at least one model (id under <root>/models, or a model folder)")
    plan = plan_task(str(fs.as_path(root)), datasets, list(models), dtype)  # a folder or s3://bucket/prefix
    result = embed_task(plan, engine, chunk_size, actors, actor_cpus, torch_threads, ray_address, num_cpus,
                        object_store_mb) if plan.items else {"engine": engine, "shards": 0, "pairs": 0}
    checked = verify_task(plan)
    return {"plan": plan.summary(), "result": result, "verified_files": checked}
