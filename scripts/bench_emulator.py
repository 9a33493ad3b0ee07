"""Throughput of the bit-exact emulator vs PyTorch float eval vs qonnx's executor.

Run:  python scripts/bench_emulator.py [--samples N] [--qonnx-samples N] [--repeats R]
                                       [--models digits-mlp ...] [--threads N]

For digits-mlp and digits-cnn (QFX 8-bit, briefly trained so that every quantizer is
initialized) it measures samples per second of
  - the float model in eval mode (torch, float32) and the QGraph emulator (numpy; default
    arithmetic, and float64 too where the default is float32) on ``--samples`` inputs,
  - the QONNX graph run by qonnx's executor and the emulator on the same first
    ``--qonnx-samples`` of them (qonnx is slow),
  - the emulator and qonnx's executor called with one sample at a time (20 calls),
side by side in one run (rounds interleaved). Each measurement is 5 back-to-back calls, so
every variant is timed in steady state. Printed: the median rate of each, and each ratio
as the median and the range over the rounds (the ratio of two rates of one round).
``--threads N`` limits torch and numpy's BLAS to N threads: on a machine shared with other
jobs, one thread each gives far steadier ratios than two threads fighting for a core.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_models import batch_of_test_inputs, quick_quantized

from qflow.export.qonnx import export_qonnx, run_qonnx
from qflow.graph import Emulator

CALLS = 5  # untimed calls first, then timed calls: steady state for every variant alike
MIN_SECONDS = 0.25  # each measurement lasts at least this long
SETTLE_SECONDS = 0.5


def _rate(fn, n: int) -> float:
    """Samples per second of ``fn`` (``n`` samples per call): ``CALLS`` untimed calls
    (warm buffers, clock up after the pause), then at least ``CALLS`` timed calls and
    ``MIN_SECONDS``."""
    for _ in range(CALLS):
        fn()
    calls, start = 0, time.perf_counter()
    while calls < CALLS or time.perf_counter() - start < MIN_SECONDS:
        fn()
        calls += 1
    return calls * n / (time.perf_counter() - start)


def bench(model_name: str, samples: int, qonnx_samples: int, repeats: int, workdir: Path):
    data, float_model, graph = quick_quantized(model_name)
    emulator = Emulator(graph)
    qonnx_path = export_qonnx(graph, workdir / f"{model_name}.qonnx.onnx")

    x = batch_of_test_inputs(data, samples)
    xt = torch.as_tensor(x)
    xq = x[:qonnx_samples]
    float_model.eval()
    # warm-up (BLAS threads, first-call allocations, qonnx session set-up); both
    # executors compute the same codes on the same inputs
    with torch.no_grad():
        float_model(xt)
    emulator.run(x)
    if not np.array_equal(run_qonnx(qonnx_path, xq), emulator.run(xq)):
        raise SystemExit(f"{model_name}: qonnx's executor and the emulator disagree")

    singles = x[:20]

    def one_at_a_time(run):
        for i in range(len(singles)):
            run(singles[i:i + 1])

    variants = {
        "torch float eval": (lambda: float_model(xt), len(x)),
        f"emulator ({emulator.arithmetic})": (lambda: emulator.run(x), len(x)),
        "emulator, qonnx batch": (lambda: emulator.run(xq), len(xq)),
        "qonnx executor": (lambda: run_qonnx(qonnx_path, xq), len(xq)),
        "emulator, 1 sample per call": (lambda: one_at_a_time(emulator.run), len(singles)),
        "qonnx, 1 sample per call": (
            lambda: one_at_a_time(lambda s: run_qonnx(qonnx_path, s)), len(singles)),
    }
    if emulator.arithmetic != "float64":  # the previous default, for comparison
        wide = Emulator(graph, "float64")
        if not np.array_equal(wide.run(x), emulator.run(x)):
            raise SystemExit(f"{model_name}: float64 and {emulator.arithmetic} disagree")
        variants["emulator (float64)"] = (lambda: wide.run(x), len(x))
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, (fn, n) in variants.items():
            # the thread pools of the previous variant (OpenMP, OpenBLAS, ONNX Runtime)
            # spin-wait for a while after their last call: start each measurement on
            # quiet cores, or whichever runs second pays for the other's spinning
            time.sleep(SETTLE_SECONDS)
            with torch.no_grad():
                rates[name].append(_rate(fn, n))
    return rates


def _ratio(rates, a: str, b: str) -> str:
    per_round = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
    med = statistics.median(per_round)
    digits = 2 if med < 10 else 0
    return f"{med:.{digits}f}x (rounds {min(per_round):.{digits}f}-{max(per_round):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--qonnx-samples", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["digits-mlp", "digits-cnn"])
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch and numpy's BLAS (default: theirs)")
    args = parser.parse_args()
    if args.threads:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.samples} samples ({args.qonnx_samples} for qonnx), {args.repeats} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rates = bench(name, args.samples, args.qonnx_samples, args.repeats, Path(tmp))
            print(f"\n{name} (median samples/s)")
            for k, v in rates.items():
                print(f"  {k:30s} {statistics.median(v):12,.0f}")
            emu = next(k for k in rates if k.startswith("emulator ("))
            print(f"  emulator / torch float eval      = {_ratio(rates, emu, 'torch float eval')}")
            if emu != "emulator (float64)" and "emulator (float64)" in rates:
                print("  float64 emulator / torch         = "
                      f"{_ratio(rates, 'emulator (float64)', 'torch float eval')}")
            print(f"  emulator / qonnx, batch of {args.qonnx_samples:<5d} = "
                  f"{_ratio(rates, 'emulator, qonnx batch', 'qonnx executor')}")
            print("  emulator / qonnx, 1 sample/call  = "
                  f"{_ratio(rates, 'emulator, 1 sample per call', 'qonnx, 1 sample per call')}")


if __name__ == "__main__":
    main()
