#!/usr/bin/env bash
# Installs everything swapfs needs on a fresh Debian machine: the Debian
# packages (FUSE 3 and its headers, a compiler and patch for building
# pyfuse3, fio, util-linux) and a virtual environment in .venv with pyfuse3
# built with our patches (tools/build-pyfuse3.sh), swapfs and its
# other Python dependencies; then the benchmark's stock pyfuse3 in
# build/stock-pyfuse3-venv (tools/build-stock-pyfuse3.sh). Safe to run
# again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(libfuse3-dev fuse3 pkg-config fio util-linux gcc python3-dev patch python3-venv binutils)
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
stamp=.venv/.swapfs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev,bench]'
    touch "$stamp"
fi
# The benchmark's stock Python FUSE ceiling (unpatched pyfuse3; a few minutes the first time).
bash tools/build-stock-pyfuse3.sh
