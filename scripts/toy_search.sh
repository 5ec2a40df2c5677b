#!/usr/bin/env bash
# One command on a fresh clone: set up .venv (with the [search] extra: ray, lm-eval), then
# choose lambda on the trained toy pair with `mergekit-timber search` (scripts/toy_search.py;
# its options pass through). Writes toy_search/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" scripts/toy_search.py "$@"
