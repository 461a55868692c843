#!/usr/bin/env bash
# The "oldest declared dependencies" job: install fewstep with its dev extras pinned to the lower
# bounds in pyproject.toml (scripts/oldest-constraints.txt), then run the same test command as
# scripts/test.sh.  The environment lives in $FEWSTEP_VENV_OLDEST (default: .venv-oldest).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FEWSTEP_VENV_OLDEST:-.venv-oldest}"
FEWSTEP_VENV="$VENV" FEWSTEP_CONSTRAINTS=scripts/oldest-constraints.txt bash scripts/setup.sh
exec "$VENV/bin/python" -m pytest -q -n 2 "$@"
