#!/usr/bin/env bash
# Set up (first run only) and run qflow's main job on the built-in default:
# train digits-mlp, quantize it with QFX 8-bit (accuracies and formats), export it to
# QONNX and integer ONNX, and verify every artifact against the emulator, bit for bit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

run=runs/demo-digits-mlp
qflow quantize --out "$run" "$@"
qflow export "$run" --target onnx
qflow verify "$run/export-onnx"
