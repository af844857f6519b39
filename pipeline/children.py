"""Child processes die with the `aced` process that started them, or the next run reaps them.

Why: `aced cache` and `aced serve` start long-lived helpers: Prefect's temporary API server (a
uvicorn subprocess Prefect spawns and stops only from an `atexit` hook), the `prefect server start`
that `aced serve` supervises, and a local Ray (gcs_server, raylet, workers, and the raylet's
dashboard/runtime-env agents). After a SIGKILL (OOM killer, `kill -9`, a CI timeout) no Python
cleanup runs: measured with Ray 2.60 and Prefect 3.8, the uvicorn server and both Ray agents lived
on indefinitely (the agents notice the raylet died but hang on exit), holding ports, memory and the
SQLite state, and the next `aced serve` refused to start because the orphaned server still answered.

Three layers, each covering what the previous one cannot:
1. `parent_death_signal` (PR_SET_PDEATHSIG): a preexec hook for children we spawn ourselves;
   the kernel signals them the moment we die. It cannot reach processes a library spawns.
2. A watchdog per supervised process (`supervise(root)`): a small stdlib-only process that polls its
   parent, keeps a record of the parent's descendants (pid + start time) in
   `<root>/state/children/<host>-<pid>.json`, and when the parent dies, terminates every recorded process
   that is still the same process (same start time in /proc/<pid>/stat, so a reused pid is never
   hit), plus their descendants, then removes the record.
3. `reap_orphans(root)` at start-up: a record whose owner is dead (its watchdog was killed too, e.g.
   the whole process group got SIGKILL) is reaped the same way by the next run.

Linux only (/proc, prctl); elsewhere the functions do nothing. Stdlib only: the watchdog starts in a
few tens of milliseconds and never imports torch, Ray or Prefect.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from storage import fs
from storage.workspace import Workspace

log = logging.getLogger(__name__)

RECORD_DIR = ("state", "children")
POLL_S = 0.1  # how often the watchdog checks its parent (os.getppid: free)
# How often it records the parent's descendants: often while processes come and go (a process
# younger than one period at the kill can be missed), rarely once the tree is stable (a snapshot of
# a local Ray's ~15 many-threaded processes costs ~10 ms of /proc reads).
SNAPSHOT_BUSY_S, SNAPSHOT_IDLE_S, SETTLE_S = 0.2, 1.0, 5.0
GRACE_S = 2.0  # SIGTERM first (a Prefect server closes SQLite cleanly), SIGKILL after this
_PR_SET_PDEATHSIG = 1

_watchdogs: dict[Path, subprocess.Popen] = {}


# --------------------------------------------------------------------------------------------
# /proc


@dataclass(frozen=True)
class Proc:
    """A process identified for good: a pid alone may be reused once the process is gone."""
    pid: int
    start: int  # /proc/<pid>/stat field 22, clock ticks after boot
    cmd: str = ""

    def alive(self) -> bool:
        return start_time(self.pid) == self.start


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the parenthesised command, which may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return text.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """Start time of a live process, None if gone or a zombie (dead, only not yet waited for)."""
    f = _stat_fields(pid)
    if f is None or f[0] in ("Z", "X"):
        return None
    return int(f[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:300]
    except OSError:
        return ""


def proc(pid: int) -> Proc | None:
    start = start_time(pid)
    return None if start is None else Proc(pid, start, _cmdline(pid))


def children(pid: int) -> list[int]:
    """Direct children of `pid` (/proc/<pid>/task/*/children; a full /proc scan without it)."""
    task_dir = Path(f"/proc/{pid}/task")
    out: list[int] = []
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return out
    for t in tasks:
        try:
            out.extend(int(c) for c in (t / "children").read_text().split())
        except FileNotFoundError:  # kernel without CONFIG_PROC_CHILDREN
            return [int(d.name) for d in Path("/proc").iterdir()
                    if d.name.isdigit() and (_stat_fields(int(d.name)) or ["", "0"])[1] == str(pid)]
        except OSError:
            continue
    return out


def descendants(pid: int, known: dict[int, Proc] | None = None) -> list[Proc]:
    """Every live descendant of `pid`, parents before children (`known`: reuse their command lines)."""
    out, todo, seen = [], [pid], {pid}
    known = known or {}
    while todo:
        for c in children(todo.pop(0)):
            if c in seen or (start := start_time(c)) is None:
                continue
            old = known.get(c)
            seen.add(c)
            out.append(old if old is not None and old.start == start else Proc(c, start, _cmdline(c)))
            todo.append(c)
    return out


def terminate(procs: list[Proc], *, grace: float = GRACE_S) -> list[Proc]:
    """SIGTERM every process of `procs` that is still the same process, and their descendants;
    SIGKILL what is left after `grace` seconds. Returns the processes that were signalled."""
    targets: dict[int, Proc] = {}
    for p in procs:
        if p.alive():
            targets.setdefault(p.pid, p)
            for d in descendants(p.pid):
                targets.setdefault(d.pid, d)
    targets.pop(os.getpid(), None)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in targets.values() if p.alive()]
        for p in live:
            try:
                os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(p.alive() for p in live):
            time.sleep(0.05)
    return list(targets.values())


# --------------------------------------------------------------------------------------------
# layer 1: our own children


def parent_death_signal(sig: int = signal.SIGTERM):
    """A Popen `preexec_fn` that has the kernel send `sig` to the child when we die (None off Linux).

    The kernel ties this to the parent *thread* that forked, so spawn from a thread that lives as
    long as the child should (the main thread). prctl is looked up here, in the parent: the child
    of a threaded process may only make async-signal-safe calls before exec (no dlopen). If the
    parent died between fork and prctl the signal would never come: the child exits at once.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)

    return preexec


# --------------------------------------------------------------------------------------------
# layers 2 and 3: records, watchdog, reaping


def record_dir(root: str | os.PathLike) -> Path:
    # Workspace.state: `<root>/state`, or a local folder for an object-store root (storage/fs.py)
    return Workspace(fs.resolve(root)).state.joinpath(*RECORD_DIR[1:])


def _host() -> str:
    """Records are per host (a workspace on shared storage is seen by several machines)."""
    return socket.gethostname().replace("/", "_")


def _boot_id() -> str:
    """Start times count from boot: a record from before a reboot names processes long gone."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def record_path(root: str | os.PathLike, pid: int) -> Path:
    return record_dir(root) / f"{_host()}-{pid}.json"


def _write_record(path: Path, owner: Proc, procs: list[Proc]) -> None:
    from storage.atomic import atomic_write_json  # stdlib-only module: cheap in the watchdog

    atomic_write_json(path, {"boot_id": _boot_id(), "owner": asdict(owner), "children": [asdict(p) for p in procs]})


def _read_record(path: Path) -> tuple[Proc, list[Proc]]:
    """(owner, children); no children if the record is from an earlier boot."""
    doc = json.loads(path.read_text())
    procs = [Proc(**c) for c in doc["children"]] if doc["boot_id"] == _boot_id() else []
    return Proc(**doc["owner"]), procs


def reap_orphans(root: str | os.PathLike) -> list[Proc]:
    """Terminate what killed predecessors on this workspace left running (records whose owner is
    dead); returns the processes signalled. Records of live owners (a concurrent `aced serve`) stay."""
    folder = record_dir(root)
    reaped: list[Proc] = []
    if not folder.is_dir():
        return reaped
    for path in sorted(folder.glob(f"{_host()}-*.json")):
        try:
            owner, procs = _read_record(path)
        except FileNotFoundError:
            continue  # its watchdog removed it meanwhile
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable child-process record %s (%s); removing it", path, e)
            path.unlink(missing_ok=True)
            continue
        if owner.alive():
            continue
        done = terminate(procs)
        if done:
            log.warning("reaped %d process(es) left by a killed aced process (pid %d, %s): %s", len(done),
                        owner.pid, owner.cmd[:80], ", ".join(f"{p.pid} {p.cmd[:60]}" for p in done))
        reaped.extend(done)
        path.unlink(missing_ok=True)
    return reaped


def supervise(root: str | os.PathLike) -> None:
    """Reap a killed predecessor's leftovers, then make every process this one starts from now on
    die with it (a watchdog process; once per process and workspace). Linux only."""
    if not sys.platform.startswith("linux"):
        return
    folder = record_dir(root)
    running = _watchdogs.get(folder)
    if running is not None and running.poll() is None:
        return
    reap_orphans(root)
    folder.mkdir(parents=True, exist_ok=True)
    me = proc(os.getpid())
    cmd = [sys.executable, "-m", "pipeline.children", "--parent", str(me.pid), "--parent-start", str(me.start),
           "--record", str(record_path(root, me.pid))]
    # stdout/stderr not inherited: a caller reading our output to EOF must not wait for the watchdog
    _watchdogs[folder] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, close_fds=True)


def _watch(parent: int, parent_start: int, record: Path) -> int:
    """The watchdog's loop (see module docstring); returns when the parent is gone and cleaned up."""
    # a Ctrl-C or a closed terminal reaches the whole process group: outlive the parent to clean up
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    me = os.getpid()
    owner = Proc(parent, parent_start, _cmdline(parent))
    known: dict[int, Proc] = {}
    written: set[Proc] | None = None
    next_snapshot = last_change = 0.0
    while os.getppid() == parent:
        if time.monotonic() >= next_snapshot:
            if not owner.alive():
                break
            for p in descendants(parent, known):
                if p.pid != me:
                    known[p.pid] = p
            # forget the ones that ended; a pid now held by another process is told apart by start time
            known = {pid: p for pid, p in known.items() if p.alive()}
            if set(known.values()) != written:
                last_change = time.monotonic()
                try:
                    _write_record(record, owner, list(known.values()))
                    written = set(known.values())
                except OSError:  # disk full: the in-memory list still works for the common case
                    pass
            settled = time.monotonic() - last_change > SETTLE_S
            next_snapshot = time.monotonic() + (SNAPSHOT_IDLE_S if settled else SNAPSHOT_BUSY_S)
        time.sleep(POLL_S)
    done = terminate(list(known.values()))
    if done:
        _log_line(record.parent / "watchdog.log",
                  f"parent {parent} ({owner.cmd[:100]}) ended; terminated {len(done)} leftover process(es): "
                  + ", ".join(f"{p.pid} {p.cmd[:60]}" for p in done))
    record.unlink(missing_ok=True)
    return 0


def _log_line(path: Path, line: str) -> None:
    try:
        with open(path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.children", description="watchdog of one aced process")
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--parent-start", type=int, required=True)
    ap.add_argument("--record", type=Path, required=True)
    a = ap.parse_args(argv)
    return _watch(a.parent, a.parent_start, a.record)


if __name__ == "__main__":
    sys.exit(main())
