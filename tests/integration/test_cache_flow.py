"""Stage 1 end to end on tiny data: planning, the plain and Ray engines, the Prefect cache flow,
a run killed mid-way (SIGKILL) and resumed, and the eval flow.

Equality of two caches is checked on the data (uids, embedding values, every key-value metadata
field but `created`): the storage writer stamps each file with its creation time, so the Parquet
bytes of two runs differ whenever they ran in different seconds.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.integration.conftest import REFERENCE, SHARD_ROWS, TEACHER, aced_env, descendants, write_synthetic

MODELS = [REFERENCE, TEACHER]


def cache_contents(root: Path) -> dict:
    """{model/dataset/shard: (table as Python lists, kv metadata without `created`)} plus manifests
    without the file checksums (those cover `created` too)."""
    out = {}
    for path in sorted((root / "cache").rglob("*.parquet")):
        if path.name.startswith("."):
            continue
        t = pq.read_table(path)
        kv = {k.decode(): v.decode() for k, v in t.schema.metadata.items() if k != b"created"}
        out[path.relative_to(root / "cache").as_posix()] = (t.replace_schema_metadata(None).to_pydict(), kv)
    for path in sorted((root / "cache").rglob("_manifest.json")):
        doc = json.loads(path.read_text())
        doc["shards"] = {k: {kk: vv for kk, vv in v.items() if kk != "sha256"} for k, v in doc["shards"].items()}
        out[path.relative_to(root / "cache").as_posix()] = doc
    return out


def manifest_shards(root: Path, model_id: str, dataset: str) -> list[str]:
    try:
        return sorted(json.loads((root / "cache" / model_id / dataset / "_manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return []


# ---------------------------------------------------------------------------- plan + plain engine


def test_plan_plain_engine_and_rerun_does_nothing(workspace):
    from pipeline.ray_embed import embed_shards_plain, plan_cache
    from storage.cache import verify_cache

    plan = plan_cache(workspace, None, MODELS)
    assert plan.datasets == ("synth",)
    assert [(it.shard.name, it.model_ids) for it in plan.items] == [(f"{i:08d}", tuple(MODELS)) for i in range(4)]
    assert plan.pairs == 4 * SHARD_ROWS and plan.embeddings == 2 * plan.pairs
    seen = []
    res = embed_shards_plain(plan, chunk_size=5, torch_threads=1, on_shard=seen.append)  # last chunk of a shard: 1 row
    assert res.shards == 4 and res.pairs == 64 and res.embeddings == 128
    assert [(r.shard, r.done) for r in seen] == [(f"{i:08d}", i + 1) for i in range(4)]
    rep = verify_cache(workspace)
    assert rep.ok, rep.format()
    assert rep.shards == 8 and rep.rows == 128
    assert plan_cache(workspace, ["synth"], MODELS).items == ()
    assert embed_shards_plain(plan.refresh()).shards == 0


def test_plan_redoes_only_missing_or_stale_model_shards(workspace):
    from pipeline.ray_embed import embed_shards_plain, plan_cache

    embed_shards_plain(plan_cache(workspace, None, [REFERENCE]), torch_threads=1)
    (workspace / "cache" / REFERENCE / "synth" / "00000002.parquet").write_bytes(b"corrupt")
    plan = plan_cache(workspace, None, MODELS)
    pending = {it.shard.name: it.model_ids for it in plan.items}
    assert pending == {"00000000": (TEACHER,), "00000001": (TEACHER,), "00000002": tuple(MODELS),
                       "00000003": (TEACHER,)}


def test_unknown_model_or_dataset_is_a_clear_error(workspace):
    from pipeline.ray_embed import plan_cache

    with pytest.raises(FileNotFoundError, match="nope"):
        plan_cache(workspace, None, ["nope"])
    with pytest.raises(FileNotFoundError, match="missing-ds"):
        plan_cache(workspace, ["missing-ds"], MODELS)
    with pytest.raises(ValueError, match="no models"):
        plan_cache(workspace, None, [])


def test_cache_lock_refuses_a_second_run(workspace):
    from pipeline.ray_embed import cache_lock

    with cache_lock(workspace):
        code = ("import sys; from pipeline.ray_embed import cache_lock\n"
                f"with cache_lock({str(workspace)!r}): pass")
        p = subprocess.run([sys.executable, "-c", code], env=aced_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and "another cache run holds" in p.stderr
    with cache_lock(workspace):  # released on exit
        pass


# ---------------------------------------------------------------------------- Ray engine


def test_ray_engine_writes_the_same_cache_as_the_plain_loop(workspace, tmp_path, ray_local):
    from pipeline.ray_embed import embed_shards_plain, embed_shards_ray, plan_cache
    from storage.cache import verify_cache

    other = tmp_path / "plain"
    shutil.copytree(workspace, other)
    seen = []
    # one torch thread in both engines: float32 CPU results differ in the last bits between
    # thread counts (and batch sizes), and one thread is also fastest on a shared 2-core machine
    res = embed_shards_ray(plan_cache(workspace, None, MODELS), chunk_size=5, torch_threads=1, on_shard=seen.append)
    assert res.shards == 4 and res.pairs == 64
    assert [r.shard for r in seen] == [f"{i:08d}" for i in range(4)]  # committed in shard order
    embed_shards_plain(plan_cache(other, None, MODELS), chunk_size=5, torch_threads=1)
    assert verify_cache(workspace).ok
    ray_cache, plain_cache = cache_contents(workspace), cache_contents(other)
    assert len(ray_cache) == 2 * 4 + 2
    assert ray_cache == plain_cache  # bitwise-equal embeddings (float32 CPU forwards of identical chunks)


def test_ray_engine_bad_sample_fails_naming_the_tar(workspace, ray_local):
    from pipeline.ray_embed import embed_shards_ray, plan_cache

    tar = workspace / "datasets" / "synth" / "00000001.tar"
    data = bytearray(tar.read_bytes())
    # keep the tar structure, break one JPEG's payload (find the first JPEG magic number)
    i = data.index(b"\xff\xd8\xff")
    data[i:i + 64] = b"\0" * 64
    tar.write_bytes(bytes(data))
    plan = plan_cache(workspace, None, [REFERENCE])
    with pytest.raises(Exception, match="00000001"):
        embed_shards_ray(plan)
    assert "00000001" not in manifest_shards(workspace, REFERENCE, "synth")


# ---------------------------------------------------------------------------- the Prefect flow


@pytest.mark.parametrize("engine", ["plain", pytest.param("ray", marks=pytest.mark.slow)])
def test_cache_flow_embeds_only_pending_model_shards_then_reruns_with_nothing_to_do(engine, workspace, request,
                                                                                     prefect_harness):
    if engine == "ray":
        request.getfixturevalue("ray_local")
    from flows.cache_flow import cache_flow
    from pipeline.ray_embed import embed_shards_plain, plan_cache
    from storage.atomic import sha256_file
    from storage.cache import verify_cache

    embed_shards_plain(plan_cache(workspace, None, [REFERENCE]), torch_threads=1)  # the reference is cached already
    ref_dir = workspace / "cache" / REFERENCE / "synth"
    ref_files = {p.name: sha256_file(p) for p in ref_dir.glob("*.parquet")}
    out = cache_flow(str(workspace), None, MODELS, engine=engine, chunk_size=8, torch_threads=1)
    assert out["plan"]["shards"] == 4 and out["plan"]["embeddings"] == 64  # teacher only
    assert out["result"]["shards"] == 4 and all(w.startswith(TEACHER + ":") for w in out["result"]["written"])
    assert out["verified_files"] == 8
    assert ref_files == {p.name: sha256_file(p) for p in ref_dir.glob("*.parquet")}  # untouched
    assert verify_cache(workspace).ok
    again = cache_flow(str(workspace), ["synth"], MODELS, engine=engine)
    assert again["plan"]["shards"] == 0 and again["result"]["shards"] == 0 and again["verified_files"] == 8


def test_cache_flow_rejects_bad_parameters(workspace, prefect_harness):
    from flows.cache_flow import cache_flow

    with pytest.raises(ValueError, match="engine"):
        cache_flow(str(workspace), None, MODELS, engine="spark")
    with pytest.raises(ValueError, match="at least one model"):
        cache_flow(str(workspace), None, [])


def _kill_after_first_commit(root: Path, engine: str, api_url: str) -> int:
    """Run `aced cache` in a subprocess, SIGKILL it (and everything it started) once the first
    shard is committed; returns how many shards the reference manifest had then."""
    cmd = [sys.executable, "-m", "flows.cli", "--root", str(root), "cache", "--models", *MODELS,
           "--engine", engine, "--chunk-size", "2", "--torch-threads", "1"]
    proc = subprocess.Popen(cmd, env=aced_env(PREFECT_API_URL=api_url), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            done = manifest_shards(root, REFERENCE, "synth")
            if done:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else "(still running)"
                raise AssertionError(f"no shard committed before the run ended/timed out:\n{out[-4000:]}")
            time.sleep(0.01)
    finally:
        victims = [proc.pid, *descendants(proc.pid)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)
        proc.stdout.close()
    return len(done)


@pytest.mark.parametrize("engine", ["plain", pytest.param("ray", marks=pytest.mark.slow)])
def test_cache_killed_mid_run_resumes_to_the_uninterrupted_result(engine, workspace_template, tmp_path,
                                                                  prefect_harness):
    import prefect.settings

    from flows.cache_flow import cache_flow
    from pipeline.ray_embed import embed_shards_plain, plan_cache
    from storage.cache import verify_cache

    n_shards, rows = (10, 8) if engine == "plain" else (12, SHARD_ROWS)  # Ray commits in bursts: more data
    roots = {}
    for name in ("killed", "clean"):
        roots[name] = tmp_path / name
        (roots[name] / "datasets").mkdir(parents=True)
        shutil.copytree(workspace_template / "models", roots[name] / "models")
        write_synthetic(roots[name], "synth", n_shards * rows, seed=3, rows_per_shard=rows)
    t0 = time.monotonic()
    at_kill = _kill_after_first_commit(roots["killed"], engine, prefect.settings.PREFECT_API_URL.value())
    t1 = time.monotonic()
    assert 1 <= at_kill < n_shards, f"kill landed after {at_kill} of {n_shards} shards: test is not mid-run"
    # after the kill: committed shards are complete; the rest is missing from the manifests (a file
    # renamed into place just before the kill, its manifest entry not yet written, is not used; when
    # that was a folder's first file, the folder has no manifest yet)
    rep = verify_cache(roots["killed"])
    assert all("(missing)" in p or "unfinished file" in p or "no _manifest.json" in p for p in rep.problems), rep.format()
    out = cache_flow(str(roots["killed"]), None, MODELS, engine="plain", chunk_size=2, torch_threads=1)
    assert 0 < out["result"]["shards"] <= n_shards - at_kill + 1  # the rest (+ one half-committed shard at most)
    embed_shards_plain(plan_cache(roots["clean"], None, MODELS), chunk_size=2, torch_threads=1)
    rep = verify_cache(roots["killed"])
    assert rep.ok and rep.shards == 2 * n_shards, rep.format()
    assert cache_contents(roots["killed"]) == cache_contents(roots["clean"])
    print(f"killed after {at_kill}/{n_shards} shards; kill {t1 - t0:.1f} s, resume+clean {time.monotonic() - t1:.1f} s")


# ---------------------------------------------------------------------------- eval flow


def test_eval_flow_writes_results_and_a_markdown_artifact(workspace, tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.eval_flow import eval_flow

    model_dir = workspace / "models" / REFERENCE
    out = tmp_path / "eval"
    res = eval_flow(str(model_dir), {"synth": ["retrieval", str(workspace / "datasets" / "synth")]}, str(out))
    m = res["evals"]["synth"]["metrics"]
    assert 0.0 <= m["i2t_r1"] <= m["i2t_r5"] <= m["i2t_r10"] <= 1.0
    assert json.loads((out / "results.json").read_text())["headline"] == res["headline"]
    assert "| synth |" in (out / "results.md").read_text()
    bench = [json.loads(p.read_text()) for p in (out / "clip_benchmark").glob("*.json")]  # CLIP_benchmark's schema
    assert [(b["dataset"], b["pretrained"], b["task"]) for b in bench] == [("synth", REFERENCE, "zeroshot_retrieval")]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"eval-{REFERENCE}"])))
    assert arts and "| synth |" in arts[0].data


# ---------------------------------------------------------------------------- deployments


def test_deployments_register_in_a_process_work_pool(workspace, prefect_harness):
    """`aced serve --work-pool` (docker/compose.yaml's `register`): module-path entrypoints, the
    cron schedule, the pool created as a process pool; `list_deployments` reads them back."""
    from flows.serve import build_deployments, format_deployments, list_deployments, register_in_pool

    with pytest.raises(ValueError, match="not both"):
        build_deployments({}, cache_cron="0 2 * * *", cache_interval=5)
    deployments = build_deployments({"root": str(workspace), "models": [REFERENCE], "engine": "plain"},
                                    cache_cron="0 2 * * *")
    assert len(register_in_pool(deployments, "aced-test-pool")) == 2
    rows = {r["name"]: r for r in list_deployments()}
    cache, ev = rows["cache/cache"], rows["eval/eval"]
    assert cache["work_pool"] == ev["work_pool"] == "aced-test-pool"
    assert cache["schedules"] == ["cron '0 2 * * *' (UTC)"] and ev["schedules"] == []
    assert cache["entrypoint"] == "flows.cache_flow.cache_flow" and ev["entrypoint"] == "flows.eval_flow.eval_flow"
    assert cache["parameters"]["models"] == [REFERENCE]
    assert "cache/cache: cron '0 2 * * *' (UTC); pool=aced-test-pool" in format_deployments(list(rows.values()))
