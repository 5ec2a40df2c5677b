#!/usr/bin/env bash
# One command on a fresh clone: set up .venv, then train the toy pair, merge it with
# Timber, sample every model and score them (scripts/toy_study.py; its options pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" scripts/toy_study.py "$@"
