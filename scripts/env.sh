#!/usr/bin/env bash
# Creates .venv (once) and installs the project with the pinned set in constraints.txt.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it re-installs only on change).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.aced-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade "pip>=24" >/dev/null
  "$VENV/bin/python" -m pip install --quiet -c "$ROOT/constraints.txt" -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"

# Headless Chromium renders the HTML run report in tests/integration/test_report.py (which skips
# without /usr/bin/chromium). Best effort, tried once per .venv: only when missing, only as root with
# apt-get; a failure is one line here, never a failed environment.
CHROMIUM_TRIED="$VENV/.chromium-tried"
if [ ! -x /usr/bin/chromium ] && [ ! -f "$CHROMIUM_TRIED" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  touch "$CHROMIUM_TRIED"
  # bounded: an unreachable mirror must not stall the test command
  if ! { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq chromium; } >/dev/null 2>&1; then
    echo "scripts/env.sh: could not install chromium with apt-get (the HTML report test will be skipped)" >&2
  fi
fi
