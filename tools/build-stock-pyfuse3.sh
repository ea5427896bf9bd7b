#!/usr/bin/env bash
# Builds the virtual environment of the benchmark's stock Python FUSE
# ceiling: tools/memfs.py on PyPI's pyfuse3, without our patches
# (build/stock-pyfuse3-venv, or $STOCK_VENV).
#
# pyfuse3 is the very sdist that tools/build-pyfuse3.sh pins (its version
# and sha256 are read from there), compiled by pip with libfuse3-dev; trio
# is pinned to the version that the patched ceiling runs with (.venv, or the
# interpreter $PATCHED_PYTHON), so that pyfuse3 is the only thing that
# differs between the two.
#
# Idempotent: does nothing if the environment already holds this pyfuse3
# and this trio. tools/setup.sh runs it; `swapfs bench` runs it on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(grep -E '^PYFUSE3_(VERSION|SHA256)=' tools/build-pyfuse3.sh)"
venv=${STOCK_VENV:-build/stock-pyfuse3-venv}
work=build/stock-pyfuse3
sdist=$work/pyfuse3-$PYFUSE3_VERSION.tar.gz

die() { echo "build-stock-pyfuse3: $*" >&2; exit 1; }

patched=${PATCHED_PYTHON:-.venv/bin/python}
[ -x "$patched" ] || die "no $patched: run tools/setup.sh first"
trio_version=$("$patched" -c 'import importlib.metadata as m; print(m.version("trio"))')
want="pyfuse3 $PYFUSE3_VERSION trio $trio_version"
stamp=$venv/.stock-pyfuse3
# The stock build has neither of our patches' additions.
check='import pyfuse3, sys; sys.exit(hasattr(pyfuse3.Operations, "fallocate"))'
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && "$venv/bin/python" -c "$check" 2>/dev/null; then
    exit 0
fi

echo "building the stock pyfuse3 $PYFUSE3_VERSION environment in $venv"
mkdir -p "$work"
if ! echo "$PYFUSE3_SHA256  $sdist" | sha256sum -c --status 2>/dev/null; then
    rm -f "$sdist"
    "$patched" -m pip download -q --no-deps --no-binary :all: -d "$work" "pyfuse3==$PYFUSE3_VERSION"
    echo "$PYFUSE3_SHA256  $sdist" | sha256sum -c --quiet \
        || die "$sdist does not have the pinned sha256"
fi
"$patched" -m venv --clear "$venv"
"$venv/bin/pip" install -q --no-cache-dir "$sdist" "trio==$trio_version"
"$venv/bin/python" -c "$check" || die "$venv has a patched pyfuse3"
echo "$want" > "$stamp"
echo "installed stock pyfuse3 $PYFUSE3_VERSION and trio $trio_version in $venv"
