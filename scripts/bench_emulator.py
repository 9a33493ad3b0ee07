"""Throughput of the bit-exact emulator vs PyTorch float eval vs qonnx's executor.

Run:  python scripts/bench_emulator.py [--samples N] [--qonnx-samples N] [--repeats R]

For digits-mlp and digits-cnn (QFX 8-bit, briefly trained so that every quantizer is
initialized) it measures samples per second of
  - the float model in eval mode (torch, float32),
  - the QGraph emulator (numpy; default arithmetic),
  - the QONNX graph run by qonnx's executor (fewer samples: it is slow),
  - the emulator and qonnx's executor called with one sample at a time (20 calls),
side by side in one run (rounds interleaved, median taken), and prints the ratios.
Each measurement is 5 back-to-back calls, so every variant is timed in steady state.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import qflow
from qflow.export.qonnx import export_qonnx, run_qonnx
from qflow.graph import Emulator
from qflow.train import fit
from qflow.zoo import DATASETS, MODELS

CALLS = 5  # calls per measurement: steady state (warm buffers) for every variant alike


def _rate(fn, n: int) -> float:
    """Samples per second over ``CALLS`` back-to-back calls of ``fn`` (``n`` samples each)."""
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return CALLS * n / (time.perf_counter() - start)


def bench(model_name: str, samples: int, qonnx_samples: int, repeats: int, workdir: Path):
    zoo = MODELS[model_name]
    data = DATASETS[zoo.data]()
    torch.manual_seed(0)
    float_model = zoo.factory()
    fit(float_model, data.x_train, data.y_train, epochs=1, progress=False)
    qmodel = qflow.quantize_(copy.deepcopy(float_model))
    fit(qmodel, data.x_train[:512], data.y_train[:512], epochs=1, progress=False)
    graph = qflow.freeze(qmodel, torch.as_tensor(data.x_test[:4]))
    emulator = Emulator(graph)
    qonnx_path = export_qonnx(graph, workdir / f"{model_name}.qonnx.onnx")

    reps = -(-samples // len(data.x_test))
    x = np.concatenate([data.x_test] * reps)[:samples]
    xt = torch.as_tensor(x)
    xq = x[:qonnx_samples]
    float_model.eval()
    # warm-up (BLAS threads, first-call allocations, qonnx session set-up)
    with torch.no_grad():
        float_model(xt)
    emulator.run(x)
    run_qonnx(qonnx_path, xq[:8])

    singles = x[:20]

    def one_at_a_time(run):
        for i in range(len(singles)):
            run(singles[i:i + 1])

    rates: dict[str, list[float]] = {
        "torch float eval": [], "emulator": [], "qonnx executor": [],
        "emulator, 1 sample per call": [], "qonnx, 1 sample per call": []}
    for _ in range(repeats):
        with torch.no_grad():
            rates["torch float eval"].append(_rate(lambda: float_model(xt), len(x)))
        rates["emulator"].append(_rate(lambda: emulator.run(x), len(x)))
        rates["qonnx executor"].append(_rate(lambda: run_qonnx(qonnx_path, xq), len(xq)))
        rates["emulator, 1 sample per call"].append(
            _rate(lambda: one_at_a_time(emulator.run), len(singles)))
        rates["qonnx, 1 sample per call"].append(
            _rate(lambda: one_at_a_time(lambda s: run_qonnx(qonnx_path, s)), len(singles)))
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--qonnx-samples", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.samples} samples ({args.qonnx_samples} for qonnx), median of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("digits-mlp", "digits-cnn"):
            r = bench(name, args.samples, args.qonnx_samples, args.repeats, Path(tmp))
            print(f"\n{name}")
            for k, v in r.items():
                print(f"  {k:28s} {v:12,.0f} samples/s")
            emu = r["emulator"]
            print(f"  emulator / torch float eval = {emu / r['torch float eval']:.2f}x")
            print(f"  emulator / qonnx executor   = {emu / r['qonnx executor']:.0f}x "
                  f"(same batch of {args.qonnx_samples})")
            single = r["emulator, 1 sample per call"] / r["qonnx, 1 sample per call"]
            print(f"  emulator / qonnx executor   = {single:.0f}x (one sample per call)")


if __name__ == "__main__":
    main()
