#!/usr/bin/env bash
# mergekit's own test suite, run with mergekit-timber installed: installing the plugin must
# not break mergekit, and mergekit's regression tests run every registered method, so
# `timber` and `timber_l` too.
#
#   bash scripts/mergekit_peer_tests.sh            # the installed mergekit's version
#   PYTHON=/path/to/python bash scripts/mergekit_peer_tests.sh
#
# It downloads mergekit's sdist of the installed version from PyPI (network needed; cached
# in $MERGEKIT_SDIST_CACHE, default ~/.cache/mergekit-timber/sdist) and runs its tests/ from
# a directory without the sdist's package, so that the *installed* mergekit (and the
# plugin's import hook) is what the tests import. Test modules that import a helper the
# sdist does not ship (tests/common.py in 0.1.5) are listed and left out.
# Exit status: pytest's; 1 also when timber/timber_l were not among the tests run.
set -euo pipefail

PYTHON=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${MERGEKIT_SDIST_CACHE:-$HOME/.cache/mergekit-timber/sdist}
VERSION=$("$PYTHON" -c 'from importlib.metadata import version; print(version("mergekit"))')
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

mkdir -p "$CACHE"
SDIST="$CACHE/mergekit-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    "$PYTHON" -m pip download --quiet --no-binary :all: --no-deps "mergekit==$VERSION" -d "$CACHE"
fi
tar -xzf "$SDIST" -C "$WORK" "mergekit-$VERSION/tests" "mergekit-$VERSION/pyproject.toml"
RUN="$WORK/run"
mv "$WORK/mergekit-$VERSION" "$RUN"

ignore=()
if [ ! -f "$RUN/tests/common.py" ]; then
    for module in $(grep -l -E "from tests\.(common|test_tokenizer) import" "$RUN"/tests/test_*.py); do
        echo "left out (needs tests/common.py, not in the sdist): tests/$(basename "$module")"
        ignore+=(--ignore "$module")
    done
fi

cd "$RUN"
start=$(date +%s)
set +e
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" -m pytest -q -p no:cacheprovider -rA "${ignore[@]}" tests >"$WORK/log" 2>&1
status=$?
set -e
grep -E "^(FAILED|ERROR)" "$WORK/log" || true
tail -n 1 "$WORK/log"
echo "mergekit $VERSION peer tests: $(( $(date +%s) - start )) s (plugin from $("$PYTHON" -c 'import mergekit_timber, os; print(os.path.dirname(mergekit_timber.__file__))'))"
for method in timber timber_l; do
    if ! grep -q "^PASSED .*\[$method\]" "$WORK/log"; then
        echo "error: no test ran the $method method: is mergekit-timber installed (its .pth import hook)?" >&2
        status=1
    fi
done
exit $status
