#!/usr/bin/env bash
# One command on a fresh clone: set up, then run the whole test suite (two workers).
# Usually 11 to 25 minutes on a 2-core machine (10.6 min quiet, 21 min under load; plus the
# set-up's first 2-4 minutes);
# pytest prints one dot per test. Pass pytest arguments to run less: tests/test_kernel.py
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "[test] pytest -n ${TEST_WORKERS:-2} $*: the whole suite usually takes 11 to 25 minutes on a 2-core machine (longer under load)"
exec "${VENV:-.venv}/bin/python" -m pytest -q -n "${TEST_WORKERS:-2}" "$@"
