#!/usr/bin/env bash
# Rebuild tests/data/lm_eval-<version>/ with the real lm-evaluation-harness (run once, commit
# the result). lm-eval lives in its own venv, never in the project's: the project's tests
# only read the committed files.
#
#   scripts/make_lmeval_fixtures.sh            # venv at $LMEVAL_VENV (default /tmp/venv-lmeval)
#
# Creates the venv when missing (torch 2.13.0 CPU, lm-eval[hf] 0.4.13, from the package
# index), then runs scripts/make_lmeval_fixtures.py: two tiny random Llama models with a
# local tokenizer, ten local problems, one task per setup, `lm_eval run --log_samples`.
# Nothing is read from the Hub (HF_HUB_OFFLINE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LMEVAL_VENV:-/tmp/venv-lmeval}"
if ! "$VENV/bin/python" -c "import lm_eval, accelerate" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0 "lm-eval[hf]==0.4.13"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" scripts/make_lmeval_fixtures.py "$@"
