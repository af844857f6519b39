"""Where Prefect keeps its state for a workspace; must run BEFORE `prefect` is imported.

Prefect 3 reads its settings from the environment once, when `prefect` is first imported, so the
`aced` commands call `use_workspace_state(root)` first and import the flows afterwards.

Layout: `<root>/state/prefect/` is PREFECT_HOME and holds the SQLite database (`prefect.db`) of
both the temporary server a one-off flow run starts and the long-lived server `aced serve`
supervises (STACK.md: schedules need the long-lived one). While `aced serve` runs, its server's
address is in `<root>/state/prefect/server.json`; other `aced` commands on the same workspace then
talk to it instead of opening the same SQLite file from a second server ("database is locked").
"""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

SERVER_FILE = "server.json"


def prefect_home(root: str | os.PathLike) -> Path:
    """`<root>/state/prefect` (created)."""
    home = Path(root).resolve() / "state" / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    return home


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
    """
    if "prefect" in sys.modules:
        raise RuntimeError("use_workspace_state() must run before `prefect` is imported")
    if os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(prefect_home(root)))
        return "api-url"
    os.environ.update(server_env(root))
    url = running_server(root)
    if url:
        os.environ["PREFECT_API_URL"] = url
        return "serve"
    return "ephemeral"
