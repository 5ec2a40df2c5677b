#!/usr/bin/env bash
# GPU acceptance in one command (under 8 minutes on one H100): the CUDA tests (skip
# reasons shown), then the device benchmark table (scripts/device_bench.py), written to
# docs/device_check.md for README.md's figure block.
#
#   bash scripts/device_check.sh                      # on a CUDA machine
#   bash scripts/device_check.sh --device cpu --reduced --workdir DIR -o FILE   # the proof run on a CPU
#
# Arguments go to scripts/device_bench.py. PYTHON picks the interpreter (default: ./.venv's,
# which must hold a CUDA build of torch on a GPU machine: scripts/setup.sh pins the CPU one
# unless TORCH_SPEC says otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-${VENV:-.venv}/bin/python}"
start=$SECONDS
echo "== device check: $("$PY" -c 'import torch; print("torch", torch.__version__, "| CUDA devices:", torch.cuda.device_count())')"
echo "== 1/2 the CUDA tests (tests/test_cuda.py; -rs lists why any was skipped)"
"$PY" -m pytest -q -rs -n 0 -p no:cacheprovider tests/test_cuda.py
echo "== 2/2 the device benchmark (scripts/device_bench.py $*)"
"$PY" scripts/device_bench.py "$@"
echo "== device check done in $((SECONDS - start)) s"
