#!/usr/bin/env bash
# Set up a fresh machine: OpenBLAS on Debian/Ubuntu Linux (MLX's fast float32 path there),
# then a virtual environment in .venv with the package, its test and server extras.
# PYTHON=/path/to/python3.X picks the interpreter; otherwise the newest Python >= 3.10 found.
# VENV=/path/to/env puts the environment elsewhere (default: .venv in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}

sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

debian_install() {  # debian_install PACKAGE...: install Debian/Ubuntu packages that are missing
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "setup: installing ${missing[*]} (apt-get)"
    sudo_if_needed apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y -qq "${missing[@]}" >/dev/null
}

is_debian=false
[ "$(uname -s)" = Linux ] && command -v dpkg >/dev/null && is_debian=true
ok_python() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; }

python=""
if [ -n "${PYTHON:-}" ] && ! { command -v "$PYTHON" >/dev/null && ok_python "$PYTHON"; }; then
    echo "setup: PYTHON=$PYTHON is not a Python 3.10 or newer." >&2
    exit 1
fi
for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3.10 python3; do
    if command -v "$candidate" >/dev/null && ok_python "$candidate"; then
        python=$(command -v "$candidate")
        break
    fi
done
if [ -z "$python" ]; then
    echo "setup: mlx_spec needs Python 3.10 or newer, and none was found on the PATH." >&2
    echo "  macOS: 'brew install python@3.12' (Homebrew) or the installer from python.org;" >&2
    echo "  Debian/Ubuntu: 'sudo apt-get install python3 python3-venv' (Ubuntu 22.04+, Debian 12+)." >&2
    echo "  Then run this script again, or point it at one: PYTHON=/path/to/python3.12 bash scripts/setup.sh" >&2
    exit 1
fi

if [ -x "$venv/bin/python" ] && ! ok_python "$venv/bin/python"; then
    echo "setup: $venv has a Python older than 3.10; remove it (rm -rf $venv) and run again." >&2
    exit 1
fi

$is_debian && debian_install libopenblas0-pthread
if [ ! -x "$venv/bin/python" ]; then
    # Debian and Ubuntu ship venv's pip bootstrap apart, as python3.X-venv.
    if ! "$python" -c 'import ensurepip' >/dev/null 2>&1 && $is_debian; then
        debian_install "python3-venv" "$(basename "$python")-venv" || true
    fi
    echo "setup: creating $venv with $("$python" --version) ($python)"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test,server]'
