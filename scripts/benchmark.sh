#!/usr/bin/env bash
# One command on a fresh clone: set up, then run the speed and memory benchmark
# (about 20 minutes on 2 cores with --no-micro --no-profile; tables on stdout and in $TMPDIR/timber_bench/report.md;
# --readme-out PATH writes the figures README.md shows). Arguments go to scripts/benchmark.py
# (e.g. --layers 8, --e2e-only, --device cuda, --no-micro --no-profile).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" scripts/benchmark.py "$@"
