#!/usr/bin/env bash
# Installs everything swapfs needs on a fresh Debian machine: the Debian
# packages (FUSE 3 and its headers, a compiler and patch for building
# pyfuse3 and swapfs's compiled modules, fio, util-linux; QEMU, a kernel
# and a static busybox for the guests of tools/guest.py) and a virtual
# environment in .venv with pyfuse3 built with our patches
# (tools/build-pyfuse3.sh), swapfs (its engine's per-block modules compiled
# where they compile) and its other Python dependencies; then the
# benchmark's stock pyfuse3 in build/stock-pyfuse3-venv
# (tools/build-stock-pyfuse3.sh). Safe to run again: it only installs what
# is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(libfuse3-dev fuse3 pkg-config fio util-linux gcc python3-dev patch python3-venv binutils
          qemu-system-x86 linux-image-amd64 busybox-static)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
modprobe fuse 2>/dev/null || true
modprobe loop 2>/dev/null || true

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# Before swapfs, so that pip finds pyfuse3==3.5.0 satisfied by the patched build.
bash tools/build-pyfuse3.sh
# The install compiles the engine's per-block modules with Cython (setup.py);
# again when an engine module changed since it was compiled.
stamp=.venv/.swapfs-installed
engine() { .venv/bin/python -c "import swapfs.engine.compiled as c; print(c.$1())" 2>/dev/null; }
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
        || [ "$(engine stale)" != "[]" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev,bench]'
    touch "$stamp"
fi
echo "swapfs engine: $(engine describe)"
# The benchmark's stock Python FUSE ceiling (unpatched pyfuse3; a few minutes the first time).
bash tools/build-stock-pyfuse3.sh
