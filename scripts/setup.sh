#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install fewstep with its dev extras.
# The environment lives in $FEWSTEP_VENV (default: .venv in the repository); $FEWSTEP_CONSTRAINTS,
# if set, is a pip constraints file (scripts/test-oldest.sh pins the oldest declared versions).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FEWSTEP_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
"$VENV/bin/python" -m pip install --quiet -e ".[dev]" ${FEWSTEP_CONSTRAINTS:+-c "$FEWSTEP_CONSTRAINTS"}
echo "fewstep installed in $VENV${FEWSTEP_CONSTRAINTS:+ (constraints: $FEWSTEP_CONSTRAINTS)}"
