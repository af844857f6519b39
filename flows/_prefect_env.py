"""Where Prefect keeps its state for a workspace; must run BEFORE `prefect` is imported.

Prefect 3 reads its settings from the environment once, when `prefect` is first imported, so the
`aced` commands call `use_workspace_state(root)` first and import the flows afterwards.

Layout: `<root>/state/prefect/` is PREFECT_HOME and holds the SQLite database (`prefect.db`) of
both the temporary server a one-off flow run starts and the long-lived server `aced serve`
supervises (STACK.md: schedules need the long-lived one). While `aced serve` runs, its server's
address is in `<root>/state/prefect/server.json`; other `aced` commands on the same workspace then
talk to it instead of opening the same SQLite file from a second server ("database is locked").

Two guards live here because every command that uses Prefect passes through `use_workspace_state`:
- processes: `pipeline.children.supervise` reaps what a killed predecessor left running and makes
  Prefect's temporary server (and a local Ray) die with this process;
- disk: SQLite on a full filesystem fails deep inside Prefect's server (measured: 29 tracebacks and
  a 133 s wait for a temporary server that had already died), so the free space under PREFECT_HOME
  is checked first (`check_state_space`, at least $ACED_STATE_MIN_FREE_MB, default 64 MiB) and
  `state_errors` turns a "database or disk is full" failure into one `StateDiskFull` error.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from storage import fs
from storage.workspace import Workspace

SERVER_FILE = "server.json"
MIN_FREE_ENV = "ACED_STATE_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 64.0
DISK_FULL = "database or disk is full"  # SQLite's message for SQLITE_FULL


class StateDiskFull(OSError):
    """The filesystem holding the workspace's Prefect state (PREFECT_HOME) is full or nearly so."""

    def __init__(self, path: str | os.PathLike, detail: str = ""):
        super().__init__(f"{DISK_FULL}: {path}" + (f" ({detail})" if detail else ""))
        self.errno = errno.ENOSPC
        self.path = Path(path)


def prefect_home(root: str | os.PathLike) -> Path:
    """`<root>/state/prefect` (created)."""
    home = Workspace(fs.resolve(root)).state / "prefect"
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StateDiskFull(home, "cannot create the folder") from e
        raise
    return home


def min_free_bytes() -> int:
    """Free space the Prefect state needs before a command starts: $ACED_STATE_MIN_FREE_MB MiB."""
    raw = os.environ.get(MIN_FREE_ENV, "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_MIN_FREE_MB
        if mb < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{MIN_FREE_ENV}={raw!r}: expected a number of MiB >= 0") from None
    return int(mb * 2**20)


def check_state_space(root: str | os.PathLike) -> None:
    """Raise `StateDiskFull` if the filesystem of `<root>/state/prefect` has less free space than
    `min_free_bytes()`: SQLite would fail mid-run (a Prefect server keeps writing run states)."""
    home = prefect_home(root)
    need = min_free_bytes()
    free = shutil.disk_usage(home).free
    if free < need:
        raise StateDiskFull(home / "prefect.db", f"{free / 2**20:.1f} MiB free on its filesystem, at least "
                                                 f"{need / 2**20:.0f} MiB needed; free some space, or set "
                                                 f"{MIN_FREE_ENV}")


def is_disk_full(exc: BaseException) -> bool:
    """True if `exc` or an exception it was raised from/during says the disk or database is full."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StateDiskFull) or getattr(e, "errno", None) == errno.ENOSPC or DISK_FULL in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def state_errors(root: str | os.PathLike) -> Iterator[None]:
    """Turn a failure caused by a full disk under the Prefect state into `StateDiskFull`.

    The cause shows either in the error (SQLite's "database or disk is full", ENOSPC, a server log
    quoted in the message) or only in the free space now: a temporary server that died on a full
    disk surfaces as a start-up timeout without its stderr.
    """
    try:
        yield
    except StateDiskFull:
        raise
    except Exception as e:
        db = Workspace(fs.resolve(root)).state / "prefect" / "prefect.db"
        if is_disk_full(e):
            raise StateDiskFull(db) from e
        try:
            check_state_space(root)
        except StateDiskFull as full:
            raise full from e
        except (OSError, ValueError):
            pass  # the probe itself failed: keep the original error
        raise


def database_url(root: str | os.PathLike) -> str:
    return f"sqlite+aiosqlite:///{prefect_home(root) / 'prefect.db'}"


def server_env(root: str | os.PathLike) -> dict[str, str]:
    """Environment that points Prefect (client or `prefect server start`) at the workspace state."""
    return {
        "PREFECT_HOME": str(prefect_home(root)),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url(root),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # library loggers show up in flow-run logs (and the UI), not only on the console
        "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline,storage",
        # first start runs the migrations: ~14 s on a 2-core machine (STACK.md), more under load
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": os.environ.get(
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"),
    }


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True if a Prefect API answers `GET <api_url>/health` with 200."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def running_server(root: str | os.PathLike) -> str | None:
    """API URL of the server `aced serve` runs for this workspace, if it is up."""
    path = prefect_home(root) / SERVER_FILE
    try:
        url = json.loads(path.read_text())["api_url"]
    except (FileNotFoundError, ValueError, KeyError):
        return None
    return url if healthy(url) else None


def use_workspace_state(root: str | os.PathLike) -> str:
    """Point this process's Prefect at the workspace; returns how ("api-url", "serve", "ephemeral").

    PREFECT_API_URL already set: that server is used as is. Else a running `aced serve` server of
    the workspace, else Prefect's temporary server over `<root>/state/prefect/prefect.db`.
    Refuses to run after `prefect` was imported (the settings would silently not apply).
    First reaps what a killed predecessor left running and supervises this process's children
    (`pipeline.children.supervise`); with local state, raises `StateDiskFull` if its disk is full.
    """
    from pipeline.children import supervise

    if "prefect" in sys.modules:
        raise RuntimeError("use_workspace_state() must run before `prefect` is imported")
    # before looking for a running server: a killed `aced serve` may have left its server answering
    supervise(root)
    if os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(prefect_home(root)))
        return "api-url"
    check_state_space(root)
    os.environ.update(server_env(root))
    url = running_server(root)
    if url:
        os.environ["PREFECT_API_URL"] = url
        return "serve"
    return "ephemeral"
