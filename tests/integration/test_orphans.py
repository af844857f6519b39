"""No orphans, and a full disk is one clear error (issue 9, child processes and Prefect state).

- SIGKILL of `aced cache` (Ray engine, local Ray) or `aced serve`: within seconds nothing they
  started is left (Prefect's temporary uvicorn server, the supervised `prefect server start`, Ray's
  daemons, workers and agents), and the next run on the workspace works.
- A killed predecessor whose watchdog died too: the next run reaps its recorded children (and only
  processes that are still the recorded ones: same start time).
- Free space under the Prefect state below the threshold: `aced cache` / `aced serve` exit 1 at once
  with "database or disk is full: <path>" (the free-space probe is faked; a disk cannot be filled here).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.conftest import REFERENCE, aced_env, write_synthetic

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux-only")


def _aced(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "--root", str(root), *args]


def _tree(pid: int) -> dict[int, "object"]:
    from pipeline.children import descendants

    return {p.pid: p for p in descendants(pid)}


def _run_until(proc: subprocess.Popen, log: Path, what: str, cond, seen: dict, timeout: float = 240) -> None:
    """Poll until `cond(descendants by pid)` holds, adding every descendant met to `seen`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _tree(proc.pid)
        seen.update(now)
        if cond(now):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (rc={proc.poll()}); end of its log:\n"
                         f"{log.read_text(errors='replace')[-5000:]}")


def _sigkill_and_expect_no_survivors(proc: subprocess.Popen, seen: dict, timeout: float = 15) -> None:
    seen.update(_tree(proc.pid))
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    deadline = time.monotonic() + timeout
    alive = [p for p in seen.values() if p.alive()]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in seen.values() if p.alive()]
    if alive:
        from pipeline.children import terminate

        terminate(alive)  # leave nothing behind for the next test, then fail
        raise AssertionError("processes outlived their SIGKILLed parent:\n"
                             + "\n".join(f"  {p.pid} {p.cmd[:120]}" for p in alive))


def _has(procs: dict, text: str) -> bool:
    return any(text in p.cmd for p in procs.values())


def test_killed_ray_cache_leaves_no_process_and_a_rerun_works(workspace, tmp_path):
    write_synthetic(workspace, "more", 4 * 16, seed=5)  # enough work that the kill lands mid-run
    log = tmp_path / "cache.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(_aced(workspace, "cache", "--models", REFERENCE, "--engine", "ray", "--chunk-size", "2",
                                      "--torch-threads", "1", "--num-cpus", "2", "--object-store-mb", "300"),
                                env=aced_env(), stdout=logf, stderr=subprocess.STDOUT)
    seen: dict = {}
    try:
        # Prefect's temporary server, the raylet, and a Ray worker or agent (the raylet's children)
        _run_until(proc, log, "Prefect's server and Ray's processes",
                   lambda now: _has(now, "uvicorn") and _has(now, "raylet") and _has(now, "ray::"), seen)
        time.sleep(1.0)
        assert proc.poll() is None, "the run ended before the kill: give it more work"
    finally:
        _sigkill_and_expect_no_survivors(proc, seen)
    assert _has(seen, "pipeline.children")  # the watchdog did it (and is gone too)
    # the rerun finds the workspace clean and completes (plain engine: quick)
    out = subprocess.run(_aced(workspace, "cache", "--models", REFERENCE, "--engine", "plain", "--torch-threads", "1"),
                         env=aced_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads(out.stdout[out.stdout.index("{"):])["verified_files"] == 4 + 4
    # the watchdog of the finished run removes its record once the run has exited
    deadline = time.monotonic() + 10
    while list((workspace / "state" / "children").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list((workspace / "state" / "children").glob("*.json"))


def _wait_server(root: Path, proc: subprocess.Popen, log: Path, seen: dict, not_pid: int | None = None) -> dict:
    from flows._prefect_env import healthy

    server_file = root / "state" / "prefect" / "server.json"

    def up(_now) -> bool:
        try:
            doc = json.loads(server_file.read_text())
        except (FileNotFoundError, ValueError):
            return False
        return doc["pid"] != not_pid and healthy(doc["api_url"])

    _run_until(proc, log, "the supervised Prefect server", up, seen)
    return json.loads(server_file.read_text())


def test_killed_serve_leaves_no_server_and_the_next_serve_starts(workspace, tmp_path):
    from flows._prefect_env import healthy
    from flows.serve import free_port

    port = free_port()
    cmd = _aced(workspace, "serve", "--cache-interval", "3600", "--models", REFERENCE, "--engine", "plain",
                "--port", str(port), "--no-ui")
    log = tmp_path / "serve1.log"
    with open(log, "wb") as logf:
        first = subprocess.Popen(cmd, env=aced_env(), stdout=logf, stderr=subprocess.STDOUT)
    seen: dict = {}
    try:
        doc = _wait_server(workspace, first, log, seen)
        assert _has(seen, "prefect server start")
    finally:
        _sigkill_and_expect_no_survivors(first, seen)
    assert not healthy(doc["api_url"])

    # the server record of the killed serve is still there; the next serve starts on the same port
    log2 = tmp_path / "serve2.log"
    with open(log2, "wb") as logf:
        second = subprocess.Popen(cmd, env=aced_env(), stdout=logf, stderr=subprocess.STDOUT)
    try:
        doc2 = _wait_server(workspace, second, log2, {}, not_pid=doc["pid"])
        assert doc2["api_url"] == doc["api_url"]
        _run_until(second, log2, "serving", lambda _now: "serving cache/cache" in log2.read_text(), {})
    finally:
        second.send_signal(signal.SIGTERM)
        rc = second.wait(90)
    assert rc == 0, log2.read_text(errors="replace")[-4000:]
    assert not healthy(doc2["api_url"])


def test_next_run_reaps_recorded_children_of_a_dead_owner_only(tmp_path):
    """The watchdog died with its owner (e.g. SIGKILL of the whole process group): the record stays,
    and `reap_orphans` ends the recorded processes that are still the same processes, on this host
    and since this boot."""
    from pipeline.children import Proc, _write_record, proc, reap_orphans, record_dir, record_path

    root = tmp_path / "ws"
    orphan = subprocess.Popen(["sleep", "120"], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)  # its pid, another start time
    kept = subprocess.Popen(["sleep", "120"], start_new_session=True)  # child of an owner still alive
    try:
        o, b, k = proc(orphan.pid), proc(bystander.pid), proc(kept.pid)
        dead_owner = Proc(os.getpid(), proc(os.getpid()).start - 1, "aced cache (killed)")  # pid reused since
        folder = record_dir(root)
        _write_record(record_path(root, 1), dead_owner, [o, Proc(b.pid, b.start + 1, b.cmd)])
        _write_record(record_path(root, 2), proc(os.getpid()), [k])
        record_path(root, 3).write_text("{not json")
        # another machine sharing the workspace: not ours to judge
        _write_record(folder / "elsewhere-4.json", dead_owner, [k])
        # a record from before a reboot: its start times mean other processes now
        _write_record(record_path(root, 5), dead_owner, [k])
        doc = json.loads(record_path(root, 5).read_text())
        record_path(root, 5).write_text(json.dumps({**doc, "boot_id": "an-earlier-boot"}))
        t0 = time.monotonic()
        reaped = reap_orphans(root)
        assert [p.pid for p in reaped] == [orphan.pid]
        assert orphan.wait(5) == -signal.SIGTERM and time.monotonic() - t0 < 5
        assert bystander.poll() is None and kept.poll() is None
        assert sorted(p.name for p in folder.glob("*.json")) == sorted([record_path(root, 2).name, "elsewhere-4.json"])
    finally:
        for p in (orphan, bystander, kept):
            p.kill()
            p.wait()


def test_parent_death_signal_reaches_our_own_child(tmp_path):
    """PR_SET_PDEATHSIG as `aced serve` uses it for its server: the grandchild dies with its parent."""
    code = textwrap.dedent("""
        import signal, subprocess, sys, time
        from pipeline.children import parent_death_signal
        p = subprocess.Popen(["sleep", "120"], preexec_fn=parent_death_signal(signal.SIGTERM))
        print(p.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], env=aced_env(), stdout=subprocess.PIPE, text=True)
    from pipeline.children import proc

    child = proc(int(parent.stdout.readline()))
    parent.kill()
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 5
    while child.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not child.alive()


# ---------------------------------------------------------------------------- full disk

_FAKE_FULL_DISK = """
import shutil, sys
real = shutil.disk_usage
shutil.disk_usage = lambda path: real(path)._replace(free=5 * 2**20)  # 5 MiB left
from flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [
    ["cache", "--models", REFERENCE, "--engine", "plain"],
    ["serve", "--cache-interval", "5", "--models", REFERENCE, "--engine", "plain", "--no-ui"],
])
def test_full_state_disk_is_one_clear_error_at_once(command, workspace):
    from flows.serve import free_port
    from pipeline.children import descendants, terminate

    if command[0] == "serve":
        command = [*command, "--port", str(free_port())]
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", _FAKE_FULL_DISK, "--root", str(workspace), *command],
                            env=aced_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        terminate([*descendants(proc.pid)])
        proc.kill()
        proc.communicate()
        raise AssertionError("no quick error on a full disk: still running after 60 s") from None
    took = time.monotonic() - t0
    out = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    db = workspace.resolve() / "state" / "prefect" / "prefect.db"
    assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: database or disk is full: {db} (5.0 MiB free on its filesystem, at least 64 MiB "
                      f"needed; free some space, or set ACED_STATE_MIN_FREE_MB)"], out.stderr
    assert "Traceback" not in out.stderr
    assert took < 60, took  # was: a 133 s wait for a temporary server that had died
    assert not (workspace / "cache").exists()


def test_state_space_threshold_is_configurable(workspace, monkeypatch):
    from flows._prefect_env import StateDiskFull, check_state_space

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=100 * 2**20))
    check_state_space(workspace)  # 100 MiB >= the default 64
    monkeypatch.setenv("ACED_STATE_MIN_FREE_MB", "200")
    with pytest.raises(StateDiskFull, match="100.0 MiB free.*200 MiB needed") as e:
        check_state_space(workspace)
    assert isinstance(e.value, OSError) and e.value.errno == 28
    monkeypatch.setenv("ACED_STATE_MIN_FREE_MB", "lots")
    with pytest.raises(ValueError, match="ACED_STATE_MIN_FREE_MB='lots'"):
        check_state_space(workspace)


def test_sqlite_full_errors_become_one_named_error(workspace, monkeypatch):
    from flows._prefect_env import StateDiskFull, state_errors

    db = workspace.resolve() / "state" / "prefect" / "prefect.db"
    # SQLite's error, wrapped the way a library re-raises it
    with pytest.raises(StateDiskFull) as e:
        with state_errors(workspace):
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError as inner:
                raise RuntimeError("flow run crashed") from inner
    assert str(e.value) == f"database or disk is full: {db}"
    # an unrelated error stays itself while there is space ...
    with pytest.raises(KeyError):
        with state_errors(workspace):
            raise KeyError("x")
    # ... and is attributed to the disk when there is none (a temporary server that died silently)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=0))
    with pytest.raises(StateDiskFull, match="0.0 MiB free"):
        with state_errors(workspace):
            raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")


def test_local_server_checks_space_before_starting(workspace, monkeypatch):
    from flows._prefect_env import StateDiskFull
    from flows.serve import LocalPrefectServer

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=2**20))
    server = LocalPrefectServer(workspace, port=1)
    with pytest.raises(StateDiskFull, match="prefect.db"):
        server.__enter__()
    assert server.proc is None


# ---------------------------------------------------------------------------- Ray's temporary folder


def test_local_ray_session_removes_the_temporary_folder_it_made(tmp_path):
    """A local Ray without RAY_TMPDIR gets a short folder under /tmp; it goes after a clean shutdown."""
    code = textwrap.dedent("""
        import os
        from pipeline.ray_embed import ray_session
        with ray_session(num_cpus=1, object_store_memory=100 * 2**20, root=os.environ["WS"]):
            print(os.environ["RAY_TMPDIR"], flush=True)
        print(os.environ.get("RAY_TMPDIR"))
    """)
    env = aced_env(WS=str(tmp_path / "ws"))
    env.pop("RAY_TMPDIR")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    made, after = out.stdout.split()
    assert made.startswith("/tmp/ray-") and after == "None"
    assert not Path(made).exists()
