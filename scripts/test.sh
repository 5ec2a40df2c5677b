#!/usr/bin/env bash
# One command on a fresh clone: set up, then run the whole test suite (two workers).
# Its duration depends on what else the machine runs, so it is stated with the load it was
# measured at, and this script prints the load now, at its start and at its end.
# pytest prints one dot per test. Pass pytest arguments to run less: tests/test_kernel.py
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${VENV:-.venv}/bin/python"
load() { "$PY" -c 'import os; print(f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")'; }
echo "[test] pytest -n ${TEST_WORKERS:-2} $*: the whole suite took 10.6 min on a 2-core machine with nothing else running, 29 min with other jobs (load average 6.3 at its start, 6.4 at its end); load average now $(load)"
started=$SECONDS
status=0
"$PY" -m pytest -q -n "${TEST_WORKERS:-2}" "$@" || status=$?
echo "[test] took $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s; load average now $(load)"
exit "$status"
