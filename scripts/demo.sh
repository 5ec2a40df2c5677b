#!/usr/bin/env bash
# One command on a fresh clone: set up, build a small local Base/Instruct pair, analyse
# it with `mergekit-timber analyze`, merge it with `mergekit-yaml` (`merge_method: timber`)
# and check the output against the kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" scripts/demo.py "$@"
