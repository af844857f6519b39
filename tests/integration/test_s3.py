"""Object storage end to end against a real S3 API on 127.0.0.1 (moto's server mode, started here):
a pool registered in place from s3:// (tars and sidecars stay in the bucket), the Prefect cache flow
reading pairs from S3 and writing its cache to S3, a tiny training run reading dataset + cache from S3
and writing its run folder there, its resume, the run lock, the manifest compare-and-swap, and
interrupted writes that leave nothing visible as complete (storage/fs.py says what is atomic there);
`aced sql` (the same rows as over a local copy of the workspace), `aced inspect --verify`, and model
folders in the bucket (a workspace model of an s3:// root, or an s3://.../models/ID folder) used by a
cache run and `aced eval` through their verified local copy.

Networking stays on loopback; credentials are dummies.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.integration.conftest import REFERENCE, SHARD_ROWS, TEACHER, aced_env, write_synthetic

moto_server = pytest.importorskip("moto.server")
MODELS = [REFERENCE, TEACHER]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a free port) and the environment that points botocore at it."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "ACED_STATE_DIR": str(tmp_path_factory.mktemp("state")),
           "ACED_MODEL_CACHE": str(tmp_path_factory.mktemp("model-cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    fs = fsspec.filesystem("s3", use_listings_cache=False)
    yield fs, env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def bucket(s3, request):
    """A fresh bucket per test: `s3://<name>`."""
    fs, _ = s3
    name = request.node.name.lower().replace("_", "-")[:50].strip("-")
    fs.mkdir(name)
    return name


def _pool_on_s3(fs, bucket: str, tmp_path: Path, n: int = 4 * SHARD_ROWS) -> tuple[str, list[str]]:
    """A DataComp-style pool (tars of key.jpg/.txt/.json with a 32-hex uid, `<shard>.parquet` sidecars)
    uploaded to s3://<bucket>/pool; returns the prefix URL and the tar keys."""
    local = write_synthetic(tmp_path / "src", "pool", n)
    keys = []
    for p in sorted(local.iterdir()):
        if p.suffix in (".tar", ".parquet"):
            fs.put_file(str(p), f"{bucket}/pool/{p.name}")
            keys.append(f"{bucket}/pool/{p.name}")
    return f"s3://{bucket}/pool", [k for k in keys if k.endswith(".tar")]


def _register(fs, bucket: str, tmp_path: Path):
    """The pool on S3 registered in place as dataset `synth` of the workspace s3://<bucket>/ws."""
    from tests.conftest import data_cli

    pool, tars = _pool_on_s3(fs, bucket, tmp_path)
    root = f"s3://{bucket}/ws"
    assert data_cli(root, "import", "datacomp", pool, "--name", "synth") == 0
    return pool, tars, root, f"{root}/datasets/synth"


def test_register_in_place_read_and_cache_on_s3(s3, bucket, tmp_path, workspace_template):
    """The fast default test: registration in place, streamed reads with the sha256 check, and a cache
    written to and read back from S3 (plain engine, no Prefect)."""
    from pipeline.ray_embed import embed_shards_plain, plan_cache
    from storage.cache import read_cache_shard, read_manifest, verify_cache
    from storage.shards import ShardError, iter_samples, load_dataset

    fs, _ = s3
    pool, tars, root, ds = _register(fs, bucket, tmp_path)
    written = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/ws"))
    assert written == ["00000000.parquet", "00000001.parquet", "00000002.parquet", "00000003.parquet",
                       "_dataset.json"]  # metadata only: the tars stay in the pool, untouched
    info = load_dataset(ds)
    assert info.rows == 4 * SHARD_ROWS and [str(s.tar_path) for s in info.shards] == [f"s3://{t}" for t in tars]
    got = list(iter_samples(info.shards[0]))  # streamed, sha256 checked on the way
    assert [s.uid for s in got] == pq.read_table(fs.open(f"{bucket}/ws/datasets/synth/00000000.parquet")).column(
        "uid").to_pylist()

    models = [str(workspace_template / "models" / REFERENCE)]
    embed_shards_plain(plan_cache(root, None, models), chunk_size=8, torch_threads=1)
    doc = read_manifest(f"{root}/cache/{REFERENCE}/synth")
    assert sorted(doc["shards"]) == [s.name for s in info.shards]
    c = read_cache_shard(f"{root}/cache/{REFERENCE}/synth", info.shards[2])
    assert list(c.uids) == [s.uid for s in iter_samples(info.shards[2])] and c.image_emb.shape[1] == doc["dim"]
    assert verify_cache(root).ok, verify_cache(root).format()
    assert not plan_cache(root, None, models).items  # the manifest on S3 says done

    # a tar replaced in the bucket after registration: every reader refuses it (and the cache made from it)
    fs.pipe_file(tars[1], fs.cat(tars[0]))
    with pytest.raises(ShardError, match="sha256 is .* records"):
        list(iter_samples(info.shards[1]))
    rep = verify_cache(root)
    assert not rep.ok and any("changed after caching" in p for p in rep.problems)


@pytest.mark.slow
def test_cache_flow_training_and_resume_on_s3(s3, bucket, tmp_path, workspace_template, prefect_harness):
    """The Prefect cache flow reads pairs from S3 and writes its cache there; a tiny run reads dataset and
    cache from S3, writes its run folder there, and resumes from it (~2-3 min on 2 busy cores)."""
    from flows.cache_flow import cache_flow
    from pipeline.recipes import recipe
    from pipeline.trainer import train
    from storage.cache import read_manifest
    from storage.shards import load_dataset

    fs, _ = s3
    pool, tars, root, ds = _register(fs, bucket, tmp_path)
    info = load_dataset(ds)

    # 2. the Prefect cache flow reads pairs from S3 and writes the cache there (models: local folders).
    models = [str(workspace_template / "models" / m) for m in MODELS]
    out = cache_flow(root, None, models, engine="plain", chunk_size=8, torch_threads=1)
    assert out["result"]["shards"] == 4 and out["verified_files"] == 8
    for m in MODELS:
        assert sorted(read_manifest(f"{root}/cache/{m}/synth")["shards"]) == [s.name for s in info.shards]
    assert cache_flow(root, ["synth"], models, engine="plain")["plan"]["shards"] == 0  # the manifests say done

    # 3. a tiny run reads dataset + cache from S3 and writes its run folder to S3 ...
    run = f"{root}/runs/r1"
    cfg = recipe("tiny", method="aced-acidistill", train_data=(ds,), cache_root=f"{root}/cache", reference=REFERENCE,
                 teacher=(TEACHER,), batch_size=8, steps=4, checkpoint_every=2, keep_checkpoints=2)
    assert train(cfg, run, progress=False).step == 4
    r1 = f"{bucket}/ws/runs/r1"
    names = {p.split("/ws/runs/r1/", 1)[1] for p in fs.find(r1)}
    assert {"config.json", "checkpoints/latest", "checkpoints/step-00000002/state.json",
            "checkpoints/step-00000004/model.safetensors", "model/aced_model.json",
            "model/open_clip_model.safetensors"} <= names
    assert not fs.exists(f"{r1}/.lock")  # released
    assert fs.cat(f"{r1}/checkpoints/latest").decode() == "step-00000004"
    uninterrupted = _losses(run)
    assert [s for s, _ in uninterrupted] == [0, 1, 2, 3]

    # ... and resumes from S3: a run stopped after its step-2 checkpoint (its `latest` still there, the
    # steps after it logged) replays steps 2-3 from that checkpoint to the very same losses.
    fs.pipe_file(f"{r1}/checkpoints/latest", b"step-00000002")
    fs.rm(f"{r1}/checkpoints/step-00000004", recursive=True)
    assert train(cfg, run, progress=False).step == 4
    assert _losses(run) == uninterrupted
    assert fs.cat(f"{r1}/checkpoints/latest").decode() == "step-00000004"


def _losses(run_dir) -> list[tuple[int, float]]:
    """(step, total loss) of every metrics row of a run folder (local or URL)."""
    from storage import fs as sfs
    from storage.shards import read_parquet

    parts = sorted((sfs.as_path(run_dir) / "metrics").glob("part-*.parquet"), key=str)
    return sorted((r["step"], r["total"]) for p in parts for r in read_parquet(p).to_pylist())


def test_run_lock_is_a_conditional_write(s3, bucket):
    from storage.workspace import FolderLock, LockedError, held_by

    folder = f"s3://{bucket}/runs/x"
    with FolderLock(folder, "run"):
        assert held_by(folder) == os.getpid()
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            FolderLock(folder, "run").acquire()
    assert held_by(folder) is None
    # a lock left by a dead process of this host (SIGKILL: no release) is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    fs, _ = s3
    fs.pipe_file(f"{bucket}/runs/x/.lock", json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}).encode())
    assert held_by(folder) is None
    with FolderLock(folder, "run"):
        assert held_by(folder) == os.getpid()
    # one held on another host cannot be judged: refused, naming the object to delete
    fs.pipe_file(f"{bucket}/runs/x/.lock", json.dumps({"pid": 1, "host": "elsewhere"}).encode())
    with pytest.raises(LockedError, match=r"elsewhere.*delete s3://.*/runs/x/\.lock"):
        FolderLock(folder, "run").acquire()


def test_manifest_updates_from_concurrent_writers_are_not_lost(s3, bucket, tmp_path):
    """Eight threads commit eight shards of one cache folder at once: the If-Match compare-and-swap
    keeps every entry (a plain read-modify-write would drop some)."""
    import numpy as np

    from storage.cache import CacheWriter, ModelMeta, read_manifest
    from storage.shards import write_shards
    from tests.conftest import samples

    ds = f"s3://{bucket}/ws/datasets/d"
    info = write_shards(samples(16), ds, name="d", source="test", samples_per_shard=2)
    meta = ModelMeta("m", "f" * 64, 4, 10.0, 0.0)
    errors = []

    def commit(shard):
        try:
            w = CacheWriter(f"s3://{bucket}/ws/cache", "d", meta)
            n = shard.rows
            w.write_shard(shard, [s.uid for s in samples(16)][int(shard.name) * 2:int(shard.name) * 2 + n],
                          np.ones((n, 4)), np.ones((n, 4)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(s,)) for s in info.shards]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(read_manifest(f"s3://{bucket}/ws/cache/m/d")["shards"]) == [s.name for s in info.shards]
    assert CacheWriter(f"s3://{bucket}/ws/cache", "d", meta).done(info.shards[3])


def test_interrupted_writes_leave_nothing_visible_as_complete(s3, bucket, tmp_path):
    from pipeline.checkpoint import latest_checkpoint
    from storage.atomic import atomic_path, atomic_write_bytes, atomic_write_json, replace_dir, temp_sibling
    from storage.shards import ShardError, load_dataset, write_shards
    from tests.conftest import samples

    fs, env = s3
    # a single-object write that fails mid-way: the old object stays, no partial one appears
    target = f"s3://{bucket}/a/config.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("killed")
    assert json.loads(fs.cat(f"{bucket}/a/config.json")) == {"v": 1}
    assert fs.find(f"{bucket}/a") == [f"{bucket}/a/config.json"]

    # a process SIGKILLed during a multipart upload (it kills itself once the first part is stored, so
    # the cut is deterministic): the object never appears, only an unfinished upload the store holds
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 << 20))
    code = ("import os, signal, sys, fsspec\n"
            "fs = fsspec.filesystem('s3', use_listings_cache=False)\n"
            "call = fs._call_s3\n"
            "async def cut(method, *a, **k):\n"
            "    out = await call(method, *a, **k)\n"
            "    if method == 'upload_part':\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return out\n"
            "fs._call_s3 = cut\n"
            "from storage.fs import put_file\n"
            "fs.put_file(sys.argv[1], sys.argv[2], chunksize=5 * 2**20)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(big), f"{bucket}/a/big.bin"], env=aced_env(**env),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not fs.exists(f"{bucket}/a/big.bin")
    pending = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in pending] == ["a/big.bin"]

    # a folder upload cut before its commit file: no dataset is seen, only an incomplete one
    ds = f"s3://{bucket}/ws/datasets/d"
    write_shards(samples(6), ds, name="d", source="test", samples_per_shard=3)
    fs.rm_file(f"{bucket}/ws/datasets/d/_dataset.json")  # what an upload killed before its last file leaves
    with pytest.raises(ShardError, match="_dataset.json: missing"):
        load_dataset(ds)
    # ... and the next write of that folder replaces it whole (refused without overwrite: not a dataset)
    with pytest.raises(FileExistsError, match="holds no _dataset.json"):
        write_shards(samples(6), ds, name="d", source="test", samples_per_shard=3)

    # a checkpoint folder uploaded without its pointer update: resume follows `latest`, the old one
    ckpts = f"s3://{bucket}/run/checkpoints"
    for step in (1, 2):
        tmp = temp_sibling(f"{ckpts}/step-{step:08d}", mkdir=True)
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        replace_dir(tmp, f"{ckpts}/step-{step:08d}")
        if step == 1:  # step 2's pointer update never happened
            atomic_write_bytes(f"{ckpts}/latest", b"step-00000001")
    assert latest_checkpoint(ckpts).name == "step-00000001"


# --------------------------------------------------------------------------- aced sql / inspect / model folders

def _s3_workspace(fs, bucket: str, tmp_path: Path, workspace_template: Path) -> str:
    """A whole workspace in the bucket: the pool registered in place, the reference model in
    `<root>/models`, its cache made by a plain cache run that names the model by id (so the model is
    read from the bucket through its local copy), and the logs of two runs written by the trainer's
    own writer (storage.runlog.ParquetLog), whose metric columns differ (the views unite them by name)."""
    from pipeline.ray_embed import embed_shards_plain, plan_cache
    from storage.runlog import SELECTIONS_SCHEMA, ParquetLog

    _, _, root, _ = _register(fs, bucket, tmp_path)
    for f in sorted((workspace_template / "models" / REFERENCE).iterdir()):
        fs.put_file(str(f), f"{bucket}/ws/models/{REFERENCE}/{f.name}")
    plan = plan_cache(root, None, [REFERENCE])
    (spec,) = plan.models  # loaded from its verified local copy, filed under its id
    assert Path(os.environ["ACED_MODEL_CACHE"]) in spec.model_dir.parents and spec.meta.model_id == REFERENCE
    embed_shards_plain(plan, chunk_size=8, torch_threads=1)
    recorded = json.loads(fs.cat(f"{bucket}/ws/models/{REFERENCE}/aced_model.json"))["fingerprint"]
    assert json.loads(fs.cat(f"{bucket}/ws/cache/{REFERENCE}/synth/_manifest.json"))["fingerprint"] == recorded

    for run, extra in (("r1", "kd"), ("r2", "noisy_frac_selected")):
        log = ParquetLog(f"{root}/runs/{run}/metrics")
        log.append([{"step": s, "total": 1.0 / (s + 1), "lr": 1e-3} for s in range(3)])
        log.flush("00000002")
        log.append([{"step": 3, "total": 0.2, "lr": 5e-4, extra: None}, {"step": 4, "total": 0.1, "lr": 1e-4, extra: 0.5}])
        log.flush("00000004")
        sel = ParquetLog(f"{root}/runs/{run}/selections", SELECTIONS_SCHEMA)
        sel.append([{"step": s, "uid": f"{run}-{s}-{i}", "score": 0.1 * i, "selected": i % 2 == 0,
                     "self_score": 0.2 * i, "noisy": None if run == "r2" else i == 1} for s in range(2) for i in range(3)])
        sel.flush("00000001")
    return root


def _rows(table) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in table.to_pylist())


def test_sql_on_s3_returns_the_rows_of_a_local_copy(s3, bucket, tmp_path, workspace_template, capsys):
    """Every view over the s3:// workspace (pyarrow datasets over the bucket) equals the same view over
    a local copy of it (DuckDB's Parquet reader): same columns, types and rows; the CLI prints the
    same answer and writes --out to the bucket; a missing object is an error unless --allow-missing;
    the connection still reads nothing but its views."""
    import duckdb

    from storage.sql import VIEWS, IncompleteViews, read_view, run_query
    from tests.conftest import data_cli

    fs, _ = s3
    root = _s3_workspace(fs, bucket, tmp_path, workspace_template)
    local = tmp_path / "copy"
    fs.get(f"{bucket}/ws/", str(local), recursive=True)
    assert (local / "datasets" / "synth" / "_dataset.json").is_file()

    counts = {}
    for view in VIEWS:
        remote, here = read_view(root, view), read_view(local, view)
        assert remote.schema == here.schema, (view, remote.schema, here.schema)
        assert _rows(remote) == _rows(here), view
        counts[view] = remote.num_rows
    assert counts == {"pairs": 4 * SHARD_ROWS, "datasets": 1, "cache": 4 * SHARD_ROWS, "manifest": 4,
                      "metrics": 10, "selections": 12}
    assert set(read_view(root, "metrics").column_names) == {"run", "step", "total", "lr", "kd", "noisy_frac_selected"}
    # a filter and a join across views, pushed through the registered datasets
    q = ("SELECT c.shard, count(*) AS n, min(p.caption = p.caption) AS ok FROM cache c JOIN pairs p USING (uid) "
         "WHERE c.shard >= '00000002' GROUP BY 1 ORDER BY 1")
    assert run_query(root, q).to_pylist() == run_query(local, q).to_pylist() == [
        {"shard": "00000002", "n": SHARD_ROWS, "ok": True}, {"shard": "00000003", "n": SHARD_ROWS, "ok": True}]

    sql = "SELECT run, max(step) AS last, count(*) AS n FROM metrics GROUP BY 1 ORDER BY 1"
    capsys.readouterr()
    assert data_cli(root, "sql", sql, "--format", "csv") == 0
    assert data_cli(local, "sql", sql, "--format", "csv") == 0
    out = capsys.readouterr().out
    assert out == "run,last,n\nr1,4,5\nr2,4,5\n" * 2
    assert data_cli(root, "sql", sql, "--format", "parquet", "--out", f"{root}/answers/last.parquet") == 0
    assert pq.read_table(fs.open(f"{bucket}/ws/answers/last.parquet")).to_pylist()[0] == {"run": "r1", "last": 4, "n": 5}

    # nothing else is readable: not a local file, not another object, not a Python variable
    for probe in (f"SELECT * FROM read_parquet('{local}/datasets/synth/00000000.parquet')",
                  f"SELECT * FROM read_parquet('{root}/datasets/synth/00000000.parquet')",
                  "SELECT * FROM fs"):
        with pytest.raises(duckdb.Error):
            run_query(root, probe)

    # a cache object gone from the bucket: named, and the query refused unless it may be left out
    fs.rm_file(f"{bucket}/ws/cache/{REFERENCE}/synth/00000001.parquet")
    with pytest.raises(IncompleteViews, match=r"cache/ref-t/synth/00000001\.parquet: listed in the manifest but missing"):
        read_view(root, "cache")
    assert data_cli(root, "sql", "SELECT count(*) FROM cache") == 1
    assert read_view(root, "cache", allow_missing=True).num_rows == 3 * SHARD_ROWS


def test_inspect_verify_on_s3(s3, bucket, tmp_path, workspace_template, capsys):
    """`aced inspect --verify` on the s3:// root (and on a dataset URL) runs every check of a local
    workspace: exit 0, then 1 naming the object after one cache object is corrupted in the bucket."""
    from tests.conftest import data_cli

    fs, _ = s3
    root = _s3_workspace(fs, bucket, tmp_path, workspace_template)
    capsys.readouterr()
    assert data_cli(root, "inspect", "--verify", "--json") == 0, capsys.readouterr()
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "workspace" and not summary["problems"]
    (ds,) = summary["datasets"]
    assert ds["rows"] == 4 * SHARD_ROWS and ds["tar_bytes"] > 0 and ds["distinct_uid"] == 4 * SHARD_ROWS
    (cache,) = summary["caches"]
    assert cache["rows"] == 4 * SHARD_ROWS and cache["dataset"] == "synth" and not cache["missing_shards"]
    assert {r["run"]: r["metrics_rows"] for r in summary["runs"]} == {"r1": 5, "r2": 5}
    assert data_cli(root, "inspect", f"{root}/datasets/synth", "--verify") == 0

    key = f"{bucket}/ws/cache/{REFERENCE}/synth/00000002.parquet"
    data = bytearray(fs.cat(key))
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the embeddings: only the sha256 can tell
    fs.pipe_file(key, bytes(data))
    capsys.readouterr()
    assert data_cli(root, "inspect", "--verify") == 1
    out = capsys.readouterr()
    assert f"s3://{key}: sha256 differs from the manifest" in out.out
    assert "problem(s) found in s3://" in out.err


def test_model_folder_on_s3_is_copied_once_verified_and_evaluated(s3, bucket, workspace, capsys):
    """`aced eval s3://.../models/ID` (an s3:// model folder given to a local workspace): the folder is
    downloaded once into $ACED_MODEL_CACHE, its fingerprint verified, and loaded from there; loading it
    again reuses that copy; weights changed in the bucket are a new download, refused by the fingerprint
    check and never published as a copy."""
    from flows.cli import main
    from pipeline.models import fingerprint, load_model, local_model_dir

    fs, env = s3
    url = f"s3://{bucket}/models/{REFERENCE}"
    for f in sorted((workspace / "models" / REFERENCE).iterdir()):
        fs.put_file(str(f), f"{bucket}/models/{REFERENCE}/{f.name}")
    cache = Path(env["ACED_MODEL_CACHE"])
    before = set(cache.iterdir())
    capsys.readouterr()
    assert main(["--root", str(workspace), "eval", url, "--retrieval", "synth", "--batch-size", "32"]) == 0
    assert "synth" in capsys.readouterr().out
    (key,) = set(cache.iterdir()) - before
    copy = local_model_dir(url)
    assert copy == key / REFERENCE and not [p for p in key.iterdir() if p.name.startswith(".")]  # no leftovers
    recorded = json.loads((workspace / "models" / REFERENCE / "aced_model.json").read_text())["fingerprint"]
    assert fingerprint(load_model(url)) == recorded
    assert set(cache.iterdir()) - before == {key}  # loaded from the same copy, nothing downloaded again

    # the bucket's weights replaced by another model's (aced_model.json unchanged): a new key, a fresh
    # download, refused by the fingerprint check, and no copy published for it
    fs.put_file(str(workspace / "models" / TEACHER / "open_clip_model.safetensors"),
                f"{bucket}/models/{REFERENCE}/open_clip_model.safetensors")
    with pytest.raises(ValueError, match="do not match the fingerprint"):
        load_model(url)
    assert set(cache.iterdir()) - before == {key}
    assert main(["--root", str(workspace), "eval", url, "--retrieval", "synth"]) == 1

    # an object key that climbs out of the folder ("a/../../../x") is refused before anything is written
    fs.call_s3("put_object", Bucket=bucket, Key=f"models/{REFERENCE}/a/../../../escaped", Body=b"x")
    with pytest.raises(ValueError, match=r"'\.\.' part in its name"):
        load_model(url)
    assert not list(cache.parent.rglob("escaped")) and set(cache.iterdir()) - before == {key}
