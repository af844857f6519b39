"""`aced serve` end to end: a real `prefect server start` supervised by `aced serve`, an interval
schedule of a few seconds, scheduled cache runs that really execute (the manifest gains the
shards, a flow run completes), and SIGTERM stops the server too. The slow variants also add a
dataset while serving (a later scheduled run caches it) and read the schedule back with
`aced deployments`.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import REFERENCE, aced_env, write_synthetic


def _api(url: str, path: str, body: dict) -> list | dict:
    req = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _completed_cache_runs(api_url: str) -> int:
    runs = _api(api_url, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                                                "deployments": {"name": {"any_": ["cache"]}}})
    return len(runs)


def _shards(root: Path, dataset: str) -> list[str]:
    try:
        return sorted(json.loads((root / "cache" / REFERENCE / dataset / "_manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _wait(what: str, cond, timeout: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (serve rc={proc.poll()}); end of its log:\n"
                         f"{log.read_text(errors='replace')[-6000:]}")


def _serve_and_check(root: Path, tmp_path: Path, engine: str, *, full: bool) -> None:
    from flows.serve import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "flows.cli", "--root", str(root), "serve", "--cache-interval", "3",
           "--models", REFERENCE, "--engine", engine, "--port", str(port), "--no-ui"]
    env = aced_env(PREFECT_RUNNER_POLL_FREQUENCY="2")
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
    server_file = root / "state" / "prefect" / "server.json"
    try:
        api_url = _wait("the supervised server",
                        lambda: server_file.exists() and json.loads(server_file.read_text())["api_url"], 240, proc, log)
        assert api_url == f"http://127.0.0.1:{port}/api"
        _wait("a scheduled run to cache every shard", lambda: len(_shards(root, "synth")) == 4, 300, proc, log)
        first = _wait("a completed cache flow run", lambda: _completed_cache_runs(api_url), 120, proc, log)
        if full:
            # a dataset arrives while serving: a later scheduled run caches it (and redoes nothing)
            write_synthetic(root, "arrived", 32, seed=7)
            _wait("the arrived dataset to be cached", lambda: len(_shards(root, "arrived")) == 2, 300, proc, log)
            _wait("another completed run", lambda: _completed_cache_runs(api_url) > first, 120, proc, log)

            # `aced deployments` finds the running server through <root>/state/prefect/server.json
            out = subprocess.run([sys.executable, "-m", "flows.cli", "--root", str(root), "deployments"],
                                 env=aced_env(), capture_output=True, text=True, timeout=180)
            assert out.returncode == 0, out.stderr[-3000:]
            assert "cache/cache: every 3 s" in out.stdout and "eval/eval: no schedule" in out.stdout, out.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, log.read_text(errors="replace")[-4000:]
    from flows._prefect_env import healthy
    assert not server_file.exists() and not healthy(api_url)


def test_serve_runs_a_scheduled_cache_flow(workspace, tmp_path):
    _serve_and_check(workspace, tmp_path, "plain", full=False)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["plain", "ray"])
def test_serve_caches_a_dataset_that_arrives_while_serving(engine, workspace, tmp_path):
    _serve_and_check(workspace, tmp_path, engine, full=True)


def test_serve_needs_a_schedule_and_models(workspace):
    for args, msg in ((["serve", "--models", REFERENCE], "--cache-cron"),
                      (["serve", "--cache-interval", "5"], "--models")):
        p = subprocess.run([sys.executable, "-m", "flows.cli", "--root", str(workspace), *args], env=aced_env(),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and msg in p.stderr, p.stderr


def test_compose_file_wires_server_worker_and_ray_cluster():
    """docker/compose.yaml (no Docker engine here): the services exist, share the image and the
    workspace volume, the GPU worker reserves a GPU, the worker polls the pool `register` fills."""
    import yaml

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker" / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"prefect-server", "ray-head", "ray-gpu-worker", "register", "worker", "trainer"}
    for name, svc in services.items():
        assert svc["image"] == "aced:gpu" and svc["build"]["dockerfile"] == "docker/Dockerfile", name
        assert "aced-data:/data/aced" in svc["volumes"], name
    gpu = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "--address=ray-head:6379" in services["ray-gpu-worker"]["command"]
    # the trainer (profile "train", started on demand) reserves every GPU for its torchrun ranks
    trainer = services["trainer"]
    assert trainer["profiles"] == ["train"] and trainer["restart"] == "no"
    tgpu = trainer["deploy"]["resources"]["reservations"]["devices"][0]
    assert tgpu["driver"] == "nvidia" and tgpu["count"] == "all" and "gpu" in tgpu["capabilities"]
    register = services["register"]["command"]
    pool = register[register.index("--work-pool") + 1]
    assert register[:2] == ["aced", "serve"] and "--cache-cron" in register
    assert f"--pool {pool} --type process" in services["worker"]["command"][-1]
    for client in ("register", "worker"):
        assert services[client]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert services[client]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert services["worker"]["environment"]["RAY_ADDRESS"] == "auto"
    assert "aced-data" in doc["volumes"]
    # the registration command parses with the real CLI
    from flows.cli import build_parser

    args = build_parser().parse_args(register[1:])
    assert args.work_pool == pool and args.models == ["reference", "teacher"] and args.cache_cron == "0 2 * * *"
