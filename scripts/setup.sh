#!/usr/bin/env bash
# Set up a fresh machine: OpenBLAS on Debian/Ubuntu Linux (MLX's fast float32 path there), then the package.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" = Linux ] && command -v dpkg >/dev/null && ! dpkg -s libopenblas0-pthread >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq libopenblas0-pthread
fi
python3 -m pip install -q -e '.[test]'
