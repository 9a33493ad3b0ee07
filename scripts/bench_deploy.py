"""Deployment latency: the TVM host build vs ONNX Runtime vs PyTorch float eval.

Run:  python scripts/bench_deploy.py [--models digits-cnn ...] [--rounds R] [--threads N]

For each zoo model (QFX 8-bit, briefly trained so that every quantizer is initialized)
it exports ``model.int.onnx`` and compiles it with TVM for this CPU (``--target cpu``,
default Relax pipeline, no tuning), then measures, at batch 1 and batch 256:
  - the TVM build through its VM (numpy codes in, numpy codes out, as ``tvm/run.py``),
  - ONNX Runtime on the same integer ONNX, default graph optimizations (its fastest
    setting; ``qflow verify`` runs it with optimizations off, which is slower),
  - the float model in eval mode (PyTorch, float32, real values in and out),
side by side in one run: rounds interleaved, median per call. Each runtime uses its
default number of threads (all cores; ``--threads N`` sets all three), with spin-waiting
turned off in all three (OpenMP passive wait, ONNX Runtime ``allow_spinning=0``, TVM spin
count 0): otherwise the idle pool of one runtime spins on the cores the next one needs.
Before timing, the TVM and ONNX Runtime outputs are compared on the benchmark batch
(mismatching samples are printed; they must be 0).
"""

from __future__ import annotations

import os
import sys

# before torch, onnxruntime and tvm start their thread pools
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
if "--threads" in sys.argv[:-1]:  # TVM reads its thread count once, at start-up
    os.environ["TVM_NUM_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from bench_models import batch_of_test_inputs, quick_quantized

import qflow
from qflow.export import export_onnx
from qflow.export.int_onnx import INPUT_NAME
from qflow.export.tvm.build import build_tvm
from qflow.export.tvm.runner import load
from qflow.numerics import to_codes
from qflow.targets import load_target
from qflow.zoo import MODELS

BATCHES = (1, 256)
THREADS = 0  # threads per runtime; 0: each runtime's default (all cores)
#: seconds of calls per measurement and batch size: enough calls to average out timer noise
MEASURE_SECONDS = {1: 0.2, 256: 0.5}


def _per_call(fn, seconds: float) -> float:
    """Median-friendly single measurement: mean seconds per call over about ``seconds``."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / calls


def prepare(model_name: str, workdir: Path):
    """(float model, QGraph, TVM model, ORT session) for one zoo model."""
    data, float_model, graph = quick_quantized(model_name)
    out = workdir / model_name
    out.mkdir()
    export_onnx(graph, out)
    start = time.perf_counter()
    build_tvm(graph, out / "model.int.onnx", out / "tvm", load_target("cpu"), print)
    build_seconds = time.perf_counter() - start
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(out / "model.int.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    return float_model.eval(), graph, load(out / "tvm"), session, data, build_seconds


def bench(model_name: str, rounds: int, workdir: Path) -> list[dict]:
    float_model, graph, tvm_model, session, data, build_seconds = prepare(model_name, workdir)
    rows = []
    for batch in BATCHES:
        x = batch_of_test_inputs(data, batch)
        codes = to_codes(x.astype(np.float64), graph.input_type)
        xt = torch.as_tensor(x)
        tvm_out = tvm_model(codes)
        ort_out = session.run(None, {INPUT_NAME: codes})[0]
        mismatches = int((tvm_out != ort_out).reshape(batch, -1).any(axis=1).sum())
        runners = {
            "tvm": lambda c=codes: tvm_model(c),
            "ort": lambda c=codes: session.run(None, {INPUT_NAME: c}),
            "torch": lambda t=xt: float_model(t),
        }
        times: dict[str, list[float]] = {name: [] for name in runners}
        with torch.no_grad():
            for _ in range(rounds):
                for name, fn in runners.items():
                    times[name].append(_per_call(fn, MEASURE_SECONDS[batch]))
        median = {name: statistics.median(t) for name, t in times.items()}
        rows.append({"model": model_name, "batch": batch, "mismatches": mismatches,
                     "build_s": build_seconds, **median})
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits-mlp", "digits-cnn", "jet-mlp"],
                        choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads per runtime (default 0: each runtime's default, all cores)")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    if THREADS:
        torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
          f"{ort.__version__}, qflow {qflow.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench(name, args.rounds, Path(tmp))
    print()
    print("| model | batch | TVM | ONNX Runtime | torch float | TVM / ORT | TVM / torch | "
          "TVM samples/s | TVM vs ORT mismatches |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {_ms(r['tvm'])} | {_ms(r['ort'])} | "
              f"{_ms(r['torch'])} | **{r['tvm'] / r['ort']:.2f}** | {r['tvm'] / r['torch']:.2f} | "
              f"{r['batch'] / r['tvm']:,.0f} | {r['mismatches']} |")
    print()
    for name in args.models:
        build = next(r["build_s"] for r in rows if r["model"] == name)
        print(f"{name}: TVM build (import + compile + link) {build:.1f} s")


if __name__ == "__main__":
    main()
