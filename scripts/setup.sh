#!/usr/bin/env bash
# Create .venv (if missing) and install qflow into it, with optional extras.
# Usage: scripts/setup.sh [EXTRAS]      e.g. scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
    python_bin=$(command -v python3.11 || command -v python3 || true)
fi
if [ -z "$python_bin" ]; then
    echo "setup: no python3 found; install Python 3.11" >&2
    exit 2
fi
if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
    echo "setup: $python_bin is $("$python_bin" --version 2>&1); qflow needs Python 3.11+" >&2
    exit 2
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$python_bin" --version 2>&1)"
    "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

quiet_pip() {
    # Drop pip's notes about unreachable local mirrors; keep real errors.
    pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2)
}

# The CPU build of torch first: a bare "torch" requirement pulls a multi-GB CUDA build.
if ! python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    echo "setup: installing torch 2.13.0 (CPU build)"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        quiet_pip torch==2.13.0 --index-url "$TORCH_INDEX_URL"
    else
        quiet_pip torch==2.13.0
    fi
fi

# The aarch64 cross toolchain links `qflow export --target arm64` into a shared library
# (without it the export writes object files). Best effort: only as root with apt-get.
install_cross_toolchain() {
    if command -v aarch64-linux-gnu-g++ >/dev/null 2>&1; then
        return
    fi
    if [ "${QFLOW_NO_APT:-}" = 1 ] || ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
        echo "setup: aarch64-linux-gnu-g++ not found (arm64 exports will be object files;" \
             "install Debian's g++-aarch64-linux-gnu to link them)"
        return
    fi
    echo "setup: installing the aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)"
    if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends g++-aarch64-linux-gnu; } >/dev/null 2>&1; then
        echo "setup: installed $(aarch64-linux-gnu-g++ --version | head -n 1)"
    else
        echo "setup: could not install g++-aarch64-linux-gnu (arm64 exports will be object files)"
    fi
}
case ",$extras," in
    *,dev,*|*,tvm,*) install_cross_toolchain ;;
esac

target="."
[ -n "$extras" ] && target=".[$extras]"
echo "setup: installing qflow${extras:+ with extras [$extras]}"
quiet_pip -e "$target"
