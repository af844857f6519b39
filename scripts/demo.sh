#!/usr/bin/env bash
# The main job end to end on the built-in synthetic data: creates .venv if needed, installs the pinned
# set, then `aced run` (data -> reference/teacher -> cache -> iid/h-acid/aced students -> eval -> table).
# Workspace: ./aced-demo (override with ACED_ROOT). Extra arguments go to `aced run`
# (e.g. --data ../shared/data/flickr8k, --size tiny).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec aced --root "${ACED_ROOT:-$ROOT/aced-demo}" run "$@"
