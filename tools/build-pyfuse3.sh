#!/usr/bin/env bash
# Builds pyfuse3 from its PyPI sdist with our patches applied (patches/,
# in name order) and installs it into the virtual environment (.venv, or
# $VENV).
#
# Why each patch exists and how to drop it: docs/pyfuse3-patch.md.
#
# The sdist is pinned by version and sha256, and so are the build tools
# (Cython re-generates the C code from the patched .pyx/.pxi; the C file
# shipped in the sdist is deleted first, so a build without Cython fails
# instead of silently compiling the unpatched code). The patch must apply
# exactly (no fuzz) or the script stops.
#
# Idempotent: does nothing if the venv already holds a build of this very
# patch set; reuses a wheel built earlier from the same version and patches.
set -euo pipefail
cd "$(dirname "$0")/.."

PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
# Cython 3.2.4 generated the C code shipped in the 3.5.0 sdist.
BUILD_TOOLS=(cython==3.2.4 setuptools==84.2.1 setuptools-scm==10.3.4)
# A local version label says in `pip list` that this is not PyPI's build;
# `pyfuse3==3.5.0` in pyproject.toml still matches it.
LOCAL_VERSION="$PYFUSE3_VERSION+swapfs"

venv=${VENV:-.venv}
patch_files=("$PWD"/patches/pyfuse3-"$PYFUSE3_VERSION"-*.patch)
[ -f "${patch_files[0]}" ] || { echo "build-pyfuse3: no patches for $PYFUSE3_VERSION" >&2; exit 1; }
patch_sha=$(cat "${patch_files[@]}" | sha256sum | cut -c1-16)
stamp=$venv/.pyfuse3-patched
work=$PWD/build/pyfuse3
dist=$work/dist-$PYFUSE3_VERSION-$patch_sha

die() { echo "build-pyfuse3: $*" >&2; exit 1; }

# Each patch must be in the compiled module: the fallocate handler (not only
# Operations.fallocate), init()'s init_request argument, and main()'s
# max_burst argument (the non-blocking loop).
check='import inspect, pyfuse3, sys; sys.exit(not (hasattr(pyfuse3.Operations, "fallocate") and hasattr(pyfuse3, "fuse_fallocate_async") and "init_request" in (pyfuse3.init.__doc__ or "") and "max_burst" in inspect.signature(pyfuse3.main).parameters))'

[ -x "$venv/bin/python" ] || die "no virtual environment at $venv"
if [ "$(cat "$stamp" 2>/dev/null)" = "$LOCAL_VERSION $patch_sha" ] \
        && "$venv/bin/python" -c "$check" 2>/dev/null; then
    exit 0
fi

wheel=$(ls "$dist"/pyfuse3-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
    echo "building pyfuse3 $PYFUSE3_VERSION with ${#patch_files[@]} patches from patches/"
    mkdir -p "$work"
    tools=$work/tools-venv
    if [ ! -x "$tools/bin/pip" ]; then
        # Same interpreter as the venv, so the wheel fits it.
        "$venv/bin/python" -m venv --clear "$tools"
    fi
    "$tools/bin/pip" install -q "${BUILD_TOOLS[@]}"

    sdist=$work/pyfuse3-$PYFUSE3_VERSION.tar.gz
    if ! echo "$PYFUSE3_SHA256  $sdist" | sha256sum -c --status 2>/dev/null; then
        rm -f "$sdist"
        "$tools/bin/pip" download -q --no-deps --no-binary :all: --no-build-isolation \
            -d "$work" "pyfuse3==$PYFUSE3_VERSION"
        echo "$PYFUSE3_SHA256  $sdist" | sha256sum -c --quiet \
            || die "$sdist does not have the pinned sha256"
    fi

    src=$work/pyfuse3-$PYFUSE3_VERSION
    rm -rf "$src"
    tar -xzf "$sdist" -C "$work"
    for patch_file in "${patch_files[@]}"; do
        patch -d "$src" -p1 --forward --batch --fuzz=0 < "$patch_file" \
            || die "patches/$(basename "$patch_file") does not apply to pyfuse3 $PYFUSE3_VERSION"
    done
    rm "$src/src/pyfuse3/__init__.c"  # stale: generated from the unpatched sources

    rm -rf "$dist.tmp"
    SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3=$LOCAL_VERSION \
        "$tools/bin/pip" wheel -q --no-deps --no-build-isolation -w "$dist.tmp" "$src"
    rm -rf "$dist"
    mv "$dist.tmp" "$dist"
    rm -rf "$src"
    wheel=$(ls "$dist"/pyfuse3-*.whl)
fi

# Replace whatever pyfuse3 is there in one step, then add missing dependencies (trio).
"$venv/bin/pip" install -q --force-reinstall --no-deps "$wheel"
"$venv/bin/pip" install -q "$wheel"
"$venv/bin/python" -c "$check" || die "the installed pyfuse3 lacks a patch"
echo "$LOCAL_VERSION $patch_sha" > "$stamp"
echo "installed $(basename "$wheel")"
