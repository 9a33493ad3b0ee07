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

# qemu-user runs `qflow export --target arm64` builds on this x86 machine, so that
# `qflow verify` checks them (the artifact tvm_arm64): an aarch64 Python from Debian's
# arm64 packages, unpacked (never installed) into .venv/arm64/sysroot, and aarch64
# wheels of numpy and the TVM runtime unpacked into .venv/arm64/site. Best effort, once:
# only as root with apt-get; it says what is missing otherwise.
ARM64_PACKAGES="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 zlib1g
    libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libstdc++6 libgcc-s1 libsqlite3-0 libuuid1
    libncursesw6 libtinfo6 libreadline8 libcrypt1"
arm64_emulation_steps() {  # dir tmp: each step or return 1
    local dir=$1 tmp=$2 deb wheel tvm_version numpy_version
    tvm_version=$(python -c 'import importlib.metadata as m; print(m.version("apache-tvm"))') || return 1
    numpy_version=$(python -c 'import numpy; print(numpy.__version__)') || return 1
    dpkg --add-architecture arm64 || return 1
    apt-get update -qq || return 1
    if ! command -v qemu-aarch64 >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            qemu-user || return 1
    fi
    # shellcheck disable=SC2046
    (cd "$tmp" && chmod 777 . && apt-get download \
        $(for p in $ARM64_PACKAGES; do echo "$p:arm64"; done)) || return 1
    for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$dir/sysroot" || return 1; done
    pip download --quiet --disable-pip-version-check --only-binary=:all: \
        --platform manylinux_2_28_aarch64 --python-version 3.11 -d "$tmp/wheels" \
        "numpy==$numpy_version" "apache-tvm==$tvm_version" || return 1
    for wheel in "$tmp"/wheels/*.whl; do python -m zipfile -e "$wheel" "$dir/site" || return 1; done
}
install_arm64_emulation() {
    local dir=.venv/arm64 tmp
    if [ -f "$dir/.complete" ]; then
        return
    fi
    if [ "${QFLOW_NO_APT:-}" = 1 ] || ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
        echo "setup: arm64 emulation not set up (needs root and apt-get: qemu-user and" \
             "Debian's arm64 Python); arm64 exports are built but not run by qflow verify"
        return
    fi
    echo "setup: setting up arm64 emulation in $dir (qemu-user, Debian arm64 Python," \
         "aarch64 numpy and TVM wheels)"
    tmp=$(mktemp -d)
    rm -rf "$dir" && mkdir -p "$dir/sysroot" "$dir/site"
    if arm64_emulation_steps "$dir" "$tmp" >/dev/null 2>&1; then
        touch "$dir/.complete"
        echo "setup: arm64 emulation ready ($(qemu-aarch64 --version | head -n 1))"
    else
        rm -rf "$dir"
        echo "setup: could not set up arm64 emulation (apt-get or pip download failed);" \
             "arm64 exports are built but not run by qflow verify"
    fi
    rm -rf "$tmp"
}
case ",$extras," in
    *,dev,*|*,tvm,*) install_arm64_emulation ;;
esac

# Headless Chromium opens report.html in the report's browser test (it says why it is
# skipped without one). Best effort: only as root with apt-get.
install_chromium() {
    if command -v chromium >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; then
        return
    fi
    if [ "${QFLOW_NO_APT:-}" = 1 ] || ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
        echo "setup: chromium not found (the report's browser test will be skipped)"
        return
    fi
    echo "setup: installing headless Chromium for the report test (apt-get install chromium)"
    if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends chromium; } >/dev/null 2>&1; then
        echo "setup: installed $(chromium --version 2>/dev/null | head -n 1)"
    else
        echo "setup: could not install chromium (the report's browser test will be skipped)"
    fi
}
case ",$extras," in
    *,dev,*) install_chromium ;;
esac
