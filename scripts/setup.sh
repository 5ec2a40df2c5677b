#!/usr/bin/env bash
# Create ./.venv (once) and install mergekit-timber (editable) with its test tools.
# torch is pinned to the CPU build by default: an unpinned torch pulls a CUDA build of
# several GB. On a GPU machine bring your own torch first, or set TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
