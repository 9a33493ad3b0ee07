#!/usr/bin/env bash
# Set up (first run only) and run qflow's main job on the built-in default:
# train digits-mlp, quantize it with QFX 8-bit, print accuracies and formats.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

qflow quantize "$@"
