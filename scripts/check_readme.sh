#!/usr/bin/env bash
# Rerun the command of every figure block of README.md and docs/*.md and compare its output
# with the block (see scripts/check_readme.py: --list, --only N|COMMAND|FILE, --update).
# Slow: each block reruns its command (the durations block includes a fresh set-up,
# about 5 minutes). Not CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/check_readme.py "$@"
