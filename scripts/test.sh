#!/usr/bin/env bash
# One command on a fresh clone: set up, then run the whole test suite (two workers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m pytest -q -n "${TEST_WORKERS:-2}" "$@"
