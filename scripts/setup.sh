#!/usr/bin/env bash
# Create ./.venv (once) and install mergekit-timber (editable) with its test tools.
# torch is pinned to the CPU build by default: an unpinned torch pulls a CUDA build of
# several GB. On a GPU machine bring your own torch first, or set TORCH_SPEC.
#
# Says what it installs and how long that usually takes (first run: 1 to 5 minutes on a
# 2-core machine, depending on pip's cache and the connection; later runs: 10-30 s), and
# prints a line at least every 10 s while pip works. pip's full output: $VENV/setup.log.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
LOG="$VENV/setup.log"

say() { printf '[setup %3ds] %s\n' "$SECONDS" "$*"; }

# run_step WHAT COMMAND...: run COMMAND with its output in $LOG; every 10 s print how long
# it has run and pip's latest line; on failure print the end of the log.
run_step() {
    local what="$1"
    shift
    say "$what"
    "$@" >>"$LOG" 2>&1 &
    local pid=$! start=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            sleep 1
            kill -0 "$pid" 2>/dev/null || break
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "  ... $((SECONDS - start)) s: $(tail -n 1 "$LOG" | tr -d '\r' | cut -c1-100)"
        fi
    done
    if ! wait "$pid"; then
        say "failed: $what; the end of $LOG:"
        tail -n 30 "$LOG" >&2
        exit 1
    fi
}

if [ ! -x "$VENV/bin/python" ]; then
    say "creating the virtual environment $VENV (${PYTHON:-python3} -m venv)"
    "${PYTHON:-python3}" -m venv "$VENV"
    : >"$LOG"
    run_step "upgrading pip (a few seconds)" "$VENV/bin/python" -m pip install --upgrade pip
fi
touch "$LOG"
say "looking for torch in $VENV (importing it takes a few seconds)"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    run_step "installing $TORCH_SPEC (CPU build unless TORCH_SPEC says otherwise; ~200 MB, usually 1-2 min)" \
        "$VENV/bin/python" -m pip install "$TORCH_SPEC"
else
    say "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already in $VENV: kept"
fi
if [ "${MERGEKIT_TIMBER_SETUP_KEEP_INSTALL:-0}" = 1 ]; then
    # scripts/check_readme.py runs commands in a temporary copy that shares this .venv:
    # re-pointing the venv's editable install at that copy would break it once the copy is gone.
    say "keeping the installed packages (MERGEKIT_TIMBER_SETUP_KEEP_INSTALL=1; this checkout runs from PYTHONPATH)"
    # A venv installed from an older checkout has a registration hook this one lacks: every
    # Timber merge would then fail minutes into a long run. Check it now.
    if ! "$VENV/bin/python" -c 'import mergekit.merge_methods as m; m.get("timber")' >/dev/null 2>&1; then
        echo "setup: error: $VENV does not register merge_method timber for this checkout (installed from an older one?): run bash scripts/setup.sh in the checkout that owns $VENV" >&2
        exit 1
    fi
else
    run_step "installing mergekit-timber (editable) with mergekit 0.1.5, transformers, the test tools and the [tools] and [search] extras: matplotlib, ray, lm-eval (usually 2-4 min the first time, 10 s after)" \
        "$VENV/bin/python" -m pip install -e ".[test,tools]"
fi
say "done: $VENV is ready (pip's output: $LOG)"
# A new shell does not know the venv: say the exact command that makes its tools the ones run.
say "next, in each new shell: source $(cd "$VENV" && pwd)/bin/activate"
