#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FEWSTEP_VENV:-.venv}"
bash scripts/setup.sh
exec "$VENV/bin/python" -m pytest -q -n 2 "$@"
