#!/usr/bin/env bash
# The test suite: creates .venv if needed, installs the pinned set, runs pytest (slow tests excluded;
# add `-m slow` or `-m "slow or not slow"` to include them). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
