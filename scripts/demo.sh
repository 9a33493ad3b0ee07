#!/usr/bin/env bash
# Set up (first run only) and run qflow's main job on the built-in default:
# train digits-mlp, quantize it with QFX 8-bit (accuracies and formats), export it for
# the Ultra96-V2 board (QONNX, integer ONNX and an hls4ml HLS project, with a resource
# estimate), and verify every artifact against the emulator, bit for bit, including the
# HLS project's C simulation.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh hls
# shellcheck disable=SC1091
. .venv/bin/activate

run=runs/demo-digits-mlp
# --force: the demo may run again; it replaces only what an earlier demo wrote
qflow quantize --out "$run" --force "$@"
qflow export "$run" --target ultra96 --force
qflow verify "$run/export-ultra96"
