#!/usr/bin/env bash
# One command on a fresh clone: set up, build a small local Base/Instruct pair, run
# `mergekit-yaml` with `merge_method: timber` on it, and analyse what Timber did.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" scripts/demo.py "$@"
