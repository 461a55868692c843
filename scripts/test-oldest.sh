#!/usr/bin/env bash
# The "oldest declared dependencies" job: install fewstep with its dev extras pinned to the lower
# bounds in pyproject.toml (scripts/oldest-constraints.txt), then run the same test command as
# scripts/test.sh.  The environment lives in $FEWSTEP_VENV_OLDEST (default: .venv-oldest).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FEWSTEP_VENV_OLDEST:-.venv-oldest}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
"$VENV/bin/python" -m pip install --quiet -e ".[dev]" -c scripts/oldest-constraints.txt
echo "fewstep installed in $VENV (oldest declared dependencies)"
exec "$VENV/bin/python" -m pytest -q -n 2 "$@"
