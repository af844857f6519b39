"""`aced cache --ray-address` on a multi-node Ray cluster started here (issue 11, item 5).

The cluster is real Ray, started the way a user starts one: `ray start --head --block` plus
`ray start --address HEAD --block` for each extra node, each its own raylet, object store and
workers, with small logical CPU counts (2 per node; Ray counts them, the machine may have fewer).
`aced cache` runs as a separate process (the driver) that only joins it.

What is checked:
- the work is spread: every chunk row carries the node id of the actor that embedded it
  (`EmbedResult.nodes`, in the command's JSON summary); with 2 actors of 1.5 CPUs on 2-CPU nodes
  no node can host both, the pipeline starts only once the whole pool is up, and the read tasks
  (0.5 CPU) fit one per node beside the actor, so shards are read on both nodes and Ray Data's
  actor locality hands each node's blocks to its own actor: both nodes must embed pairs (seen:
  32/32 and 48/16 of 64), and the node ids must be the cluster's own;
- the result equals one process: the cache (uids, embeddings, metadata but `created`, manifests
  but checksums) equals `embed_shards_plain` on a copy of the same workspace (same chunks, one
  torch thread: float32 CPU forwards are bit-identical then);
- teardown on every exit path: each node's processes carry a marker in their environment
  (inherited by every raylet, agent and worker); after the block ends, normally, by an exception,
  or because the process that started the cluster was SIGKILLed (its `ray start` processes get
  a parent-death SIGTERM and stop their node), no marked process is left.
- an actor pool the cluster cannot place fails after `actor_start_timeout_s`, naming the request
  (Ray Data alone would wait forever);
- a wrong `--ray-address` is a ConnectionError naming it within seconds (ray.init alone retries
  for minutes).

Timings on the 2-core test machine: about 15-25 s per cluster start; the module runs ~2-3 min.
Run alone:  python -m tests.integration.test_ray_cluster --hold   (starts a cluster, prints its
address, marker and temp folder, stops it when killed or interrupted; the SIGKILL test uses this).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
MARK = "ACED_TEST_RAY_CLUSTER"
NODE_CPUS = 2
OBJECT_STORE = 150 * 2**20

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux-only"),
              pytest.mark.slow]


# ---------------------------------------------------------------------------- the cluster


def marked_processes(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment holds `MARK=marker`."""
    needle = f"{MARK}={marker}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] not in ("Z", "X"):  # a zombie is dead, only not yet waited for
                    out.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]))
        except OSError:  # gone meanwhile, or not ours
            continue
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str
    marker: str
    env: dict[str, str]
    """Environment for drivers (auth mode, temp dir; without the marker: a driver is no node)."""
    starters: list[subprocess.Popen] = field(default_factory=list)
    node_ids: list[str] = field(default_factory=list)
    swept: list[tuple[int, str]] = field(default_factory=list)
    """Marked processes still alive after the `ray start` processes stopped (then killed here)."""


def _ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    from pipeline.children import parent_death_signal

    with open(log, "wb") as out:
        # --block: the `ray start` process stays, as the parent of its node's processes, and stops
        # them on SIGTERM; the parent-death signal sends it that SIGTERM if we are killed.
        return subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *args,
                                 "--num-cpus", str(NODE_CPUS), "--object-store-memory", str(OBJECT_STORE),
                                 "--disable-usage-stats"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=parent_death_signal(signal.SIGTERM))


def _wait_for_nodes(c: Cluster, n: int, timeout_s: float = 180) -> list[str]:
    """Node ids once `n` nodes are alive (a short-lived driver connection from this process)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:  # the head's GCS port first: ray.init on a closed port retries for minutes
        dead = [p for p in c.starters if p.poll() is not None]
        if dead:
            raise RuntimeError(f"`ray start` exited with {dead[0].returncode}: see {c.env['RAY_TMPDIR']}/*.log")
        with contextlib.suppress(OSError):
            socket.create_connection(tuple(c.address.rsplit(":", 1)), timeout=1).close()  # type: ignore[arg-type]
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"no GCS at {c.address} after {timeout_s} s")
        time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_TMPDIR")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=c.env["RAY_TMPDIR"])
    try:
        ray.init(address=c.address, log_to_driver=False)
        try:
            while True:
                alive = [x["NodeID"] for x in ray.nodes() if x["Alive"]]
                if len(alive) >= n:
                    return alive
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(alive)} of {n} Ray nodes alive after {timeout_s} s")
                time.sleep(0.3)
        finally:
            ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop(c: Cluster, grace_s: float = 60) -> None:
    """Stop the nodes as a user would (SIGTERM to each `ray start --block`, extra nodes first), then
    kill whatever marked process is left (recorded in `c.swept`: the test asserts on it)."""
    from pipeline.children import Proc, start_time, terminate

    for p in reversed(c.starters):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in reversed(c.starters):
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    time.sleep(1)  # a raylet's agents notice its death within a second
    c.swept = marked_processes(c.marker)
    if c.swept:
        terminate([Proc(pid, st) for pid, _ in c.swept if (st := start_time(pid)) is not None])


@contextlib.contextmanager
def ray_cluster(nodes: int = 2) -> Iterator[Cluster]:
    """A head plus `nodes - 1` extra nodes on this machine, stopped on leaving the block (any way)."""
    tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Unix socket paths <= 107 bytes
    marker = uuid.uuid4().hex
    port = _free_port()
    base = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    base.pop("RAY_ADDRESS", None)
    c = Cluster(f"127.0.0.1:{port}", marker, dict(base))
    node_env = {**base, MARK: marker}
    ok = False
    try:
        c.starters.append(_ray_start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                                      "--include-dashboard", "false", "--temp-dir", str(tmp)],
                                     node_env, tmp / "head.log"))
        for i in range(1, nodes):
            c.starters.append(_ray_start(["--address", c.address, "--node-ip-address", "127.0.0.1"], node_env,
                                         tmp / f"node{i}.log"))
        c.node_ids = _wait_for_nodes(c, nodes)
        yield c
        ok = True
    finally:
        _stop(c)
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"Ray cluster logs kept in {tmp}", file=sys.stderr)


# ---------------------------------------------------------------------------- tests


def _aced_cache(root: Path, *args: str, api_url: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.cli", "--root", str(root), "cache", *args]
    return subprocess.run(cmd, env={**env, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": api_url},
                          capture_output=True, text=True, timeout=900, cwd=REPO)


def _summary(stdout: str) -> dict:
    """The JSON summary `aced cache` prints last."""
    return json.loads(stdout[stdout.index("\n{") + 1:] if not stdout.startswith("{") else stdout)


def test_aced_cache_spreads_over_the_nodes_and_equals_one_process(workspace, tmp_path, prefect_harness):
    import prefect.settings

    from pipeline.ray_embed import embed_shards_plain, plan_cache
    from storage.cache import verify_cache
    from tests.integration.conftest import REFERENCE, TEACHER
    from tests.integration.test_cache_flow import cache_contents

    plain = tmp_path / "plain"
    shutil.copytree(workspace, plain)
    with ray_cluster(nodes=2) as cluster:
        assert len(set(cluster.node_ids)) == 2
        proc = _aced_cache(workspace, "--models", REFERENCE, TEACHER, "--ray-address", cluster.address,
                           "--actors", "2", "--actor-cpus", "1.5", "--torch-threads", "1", "--chunk-size", "4",
                           api_url=prefect.settings.PREFECT_API_URL.value(), env=cluster.env)
        assert proc.returncode == 0, proc.stderr[-6000:]
        # the driver joined this cluster (no local Ray of its own)
        assert f"joined the Ray cluster at {cluster.address}: 2 node(s)" in proc.stderr, proc.stderr[-4000:]
    assert cluster.swept == [], f"processes outlived their `ray start`: {cluster.swept}"
    assert marked_processes(cluster.marker) == []

    res = _summary(proc.stdout)["result"]
    assert res["engine"] == "ray" and res["shards"] == 4 and res["pairs"] == 64
    nodes = res["nodes"]
    print(f"pairs per node: {nodes}; per actor: {res['actors']}")
    assert set(nodes) <= set(cluster.node_ids), (nodes, cluster.node_ids)
    assert len(nodes) == 2 and all(n > 0 for n in nodes.values()), f"work not spread over the nodes: {nodes}"
    assert sum(nodes.values()) == 64 and len(res["actors"]) == 2

    embed_shards_plain(plan_cache(plain, None, [REFERENCE, TEACHER]), chunk_size=4, torch_threads=1)
    assert verify_cache(workspace).ok
    ray_cache, plain_cache = cache_contents(workspace), cache_contents(plain)
    assert len(ray_cache) == 2 * 4 + 2  # 4 shards x 2 models + 2 manifests
    assert ray_cache == plain_cache


def test_unplaceable_pool_fails_and_the_cluster_stops_when_the_block_raises_and_a_dead_address_is_named(workspace):
    from pipeline.ray_embed import embed_shards_ray, plan_cache, ray_session
    from tests.integration.conftest import REFERENCE

    plan = plan_cache(workspace, None, [REFERENCE])
    with pytest.raises(RuntimeError, match="boom"):
        with ray_cluster(nodes=2) as cluster:
            assert len(marked_processes(cluster.marker)) >= 6  # 2 raylets, GCS, agents, workers...
            # 3 actors x 1.2 CPU: 3.6 of the cluster's 4 CPUs, but a 2-CPU node holds only one of them
            t0 = time.monotonic()
            with ray_session(cluster.address):
                with pytest.raises(RuntimeError, match=r"actor pool \(3 x 1.2 CPU, 0 GPU\) did not start within 20 s"):
                    embed_shards_ray(plan, actors=3, actor_cpus=1.2, torch_threads=1, actor_start_timeout_s=20)
            assert time.monotonic() - t0 < 120
            assert not (workspace / "cache").exists() or not list((workspace / "cache").rglob("*.parquet"))
            raise RuntimeError("boom")
    assert cluster.swept == [] and marked_processes(cluster.marker) == []
    shutil.rmtree(cluster.env["RAY_TMPDIR"])  # kept for a look after an error; this one was wanted
    # nothing listens there any more: a clear error in seconds, naming the address
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=f"no Ray cluster answers at {cluster.address}"):
        with ray_session(cluster.address):
            pass
    assert time.monotonic() - t0 < 30
    with pytest.raises(ValueError, match="expected host:port"):
        with ray_session("127.0.0.1"):
            pass


def test_cluster_dies_with_the_process_that_started_it_on_sigkill(tmp_path):
    holder = subprocess.Popen([sys.executable, "-m", "tests.integration.test_ray_cluster", "--hold"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        seen = []
        for line in holder.stdout:  # "ready <address> <marker> <temp dir>" once every node is up
            seen.append(line)
            if line.startswith("ready "):
                break
        assert seen and seen[-1].startswith("ready "), f"holder failed (rc {holder.poll()}): {''.join(seen)[-2000:]}"
        _, _, marker, tmp = seen[-1].split()
        assert len(marked_processes(marker)) >= 6
    finally:
        holder.kill()  # SIGKILL: no Python cleanup runs in the holder (its `ray start`s get SIGTERM)
        holder.wait(30)
        holder.stdout.close()
    deadline = time.monotonic() + 60
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], f"orphaned Ray processes after the SIGKILL: {left}"
    shutil.rmtree(tmp)  # the holder could not clean up after itself


if __name__ == "__main__":
    if sys.argv[1:] != ["--hold"]:
        raise SystemExit("usage: python -m tests.integration.test_ray_cluster --hold")
    with ray_cluster(nodes=2) as c:
        print("ready", c.address, c.marker, c.env["RAY_TMPDIR"], flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
