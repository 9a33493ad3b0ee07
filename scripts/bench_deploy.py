"""Deployment latency: qflow's exact CPU artifacts vs what a user would run instead.

Run:  python scripts/bench_deploy.py [--models digits-cnn resnet8 ...] [--rounds R] [--threads N]
                                    [--tune TRIALS]

For each zoo model (QFX 8-bit, briefly trained so that every quantizer is initialized)
it exports ``model.int.onnx`` and compiles it with TVM for this CPU (``--target cpu``)
three times: qflow's default build (any batch size) and two builds for a fixed batch
(``--batch 1``, and ``--batch K`` with K the samples per call that keep a call's tensors
in cache, ``build.json``'s ``samples_per_call``), tuned with ``--tune TRIALS`` when given.
Then it measures, at batch 1 and batch 256:
  - the default TVM build through its runner (numpy codes in, numpy codes out, as
    ``tvm/run.py``),
  - the fixed-batch TVM build: ``--batch 1`` at batch 1; ``--batch K`` at batch 256, fed
    K samples per call by its runner,
  - ONNX Runtime on the same integer ONNX with graph optimizations off (as ``qflow
    verify`` runs it: qflow does not prove every rewrite ONNX Runtime may make exact),
    and with its default optimizations (as ``InferenceSession(path)`` runs it),
  - ONNX Runtime on the float model (exported by ``torch.onnx``), default optimizations,
  - ONNX Runtime int8: the same float model through ``onnxruntime.quantization
    .quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, calibrated on
    512 training samples), default optimizations: the fast route a user would pick; it is
    not bit-exact to anything,
  - the float model in eval mode (PyTorch, float32, real values in and out),
side by side in one run: rounds interleaved, median per call. Each runtime uses its
default number of threads (all cores; ``--threads N`` sets all of them), with
spin-waiting turned off (OpenMP passive wait, ONNX Runtime ``allow_spinning=0``, TVM spin
count 0): otherwise the idle pool of one runtime spins on the cores the next one needs.
Before timing, the TVM and optimized integer-ONNX outputs are compared with the
integer ONNX as written on the benchmark batch (mismatching samples are printed; they
must be 0).
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
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from bench_models import batch_of_test_inputs, quick_quantized

import qflow
from qflow.export import export_onnx
from qflow.export.int_onnx import INPUT_NAME
from qflow.export.tvm.build import BuildOptions, build_tvm, samples_per_call
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


def _session(path: Path, optimized: bool):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = THREADS
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def float_onnx_models(float_model, data, out: Path) -> tuple[Path, Path]:
    """The float model as ONNX, and its ONNX Runtime static int8 QDQ quantization."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path, pre_path = out / "float.onnx", out / "float.pre.onnx"
    int8_path = out / "int8.onnx"
    example = torch.as_tensor(data.x_test[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(float_model, (example,), str(float_path), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
                          dynamo=False)
        quant_pre_process(str(float_path), str(pre_path))

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": np.asarray(data.x_train[i:i + 64], np.float32)}
                                 for i in range(0, 512, 64)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(pre_path), str(int8_path), Calibration(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return float_path, int8_path


def prepare(model_name: str, workdir: Path, tune: int):
    """(float model, QGraph, data, TVM models by batch (None: any), sessions, build
    seconds of the default build) for one zoo model."""
    data, float_model, graph = quick_quantized(model_name)
    float_model.eval()
    out = workdir / model_name
    out.mkdir()
    export_onnx(graph, out)
    start = time.perf_counter()
    build_tvm(graph, out / "model.int.onnx", out / "tvm", load_target("cpu"), print)
    build_seconds = time.perf_counter() - start
    builds = {None: load(out / "tvm")}
    for fixed in sorted({1, min(samples_per_call(graph), max(BATCHES))}):
        build_tvm(graph, out / "model.int.onnx", out / f"tvm-{fixed}", load_target("cpu"), print,
                  BuildOptions(batch=fixed, tune_trials=tune))
        builds[fixed] = load(out / f"tvm-{fixed}")
    float_path, int8_path = float_onnx_models(float_model, data, out)
    sessions = {"int": _session(out / "model.int.onnx", optimized=False),
                "int_opt": _session(out / "model.int.onnx", optimized=True),
                "float": _session(float_path, optimized=True),
                "int8": _session(int8_path, optimized=True)}
    return float_model, graph, data, builds, sessions, build_seconds


def bench(model_name: str, rounds: int, workdir: Path, tune: int) -> list[dict]:
    float_model, graph, data, builds, sessions, build_seconds = prepare(model_name, workdir,
                                                                        tune)
    tvm_model = builds[None]
    rows = []
    for batch in BATCHES:
        fixed = builds[1 if batch == 1 else max(builds, key=lambda b: b or 0)]
        x = batch_of_test_inputs(data, batch)
        codes = to_codes(x.astype(np.float64), graph.input_type)
        xf = np.ascontiguousarray(x, dtype=np.float32)
        xt = torch.as_tensor(xf)
        int_out = sessions["int"].run(None, {INPUT_NAME: codes})[0]
        outputs = [tvm_model(codes), fixed(codes),
                   sessions["int_opt"].run(None, {INPUT_NAME: codes})[0]]
        mismatches = sum(int((out != int_out).reshape(batch, -1).any(axis=1).sum())
                         for out in outputs)
        runners = {
            "tvm": lambda c=codes: tvm_model(c),
            "tvm_fixed": lambda c=codes, m=fixed: m(c),
            "int_onnx": lambda c=codes: sessions["int"].run(None, {INPUT_NAME: c}),
            "int_onnx_opt": lambda c=codes: sessions["int_opt"].run(None, {INPUT_NAME: c}),
            "ort_float": lambda v=xf: sessions["float"].run(None, {"x": v}),
            "ort_int8": lambda v=xf: sessions["int8"].run(None, {"x": v}),
            "torch": lambda t=xt: float_model(t),
        }
        times: dict[str, list[float]] = {name: [] for name in runners}
        with torch.no_grad():
            for _ in range(rounds):
                for name, fn in runners.items():
                    times[name].append(_per_call(fn, MEASURE_SECONDS[batch]))
        median = {name: statistics.median(t) for name, t in times.items()}
        rows.append({"model": model_name, "batch": batch, "mismatches": mismatches,
                     "build_s": build_seconds, "fixed_batch": fixed.manifest["batch"],
                     **median})
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["digits-mlp", "digits-cnn", "jet-mlp", "resnet8"],
                        choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads per runtime (default 0: each runtime's default, all cores)")
    parser.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                        help="tune the fixed-batch builds with this many trials (default 0)")
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
            rows += bench(name, args.rounds, Path(tmp), args.tune)
    print()
    tuned = f", --tune {args.tune}" if args.tune else ""
    print(f"| model | batch | qflow TVM (any batch) | qflow TVM (--batch K{tuned}) | qflow int "
          "ONNX (ORT, as written) | qflow int ONNX (ORT optimized) | ORT float | ORT int8 QDQ "
          "| torch float | TVM --batch / ORT int8 | TVM any / ORT int8 | int ONNX / ORT int8 "
          "| int ONNX optimized / ORT int8 | TVM --batch / ORT float | TVM --batch / torch "
          "| mismatches vs int ONNX |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {_ms(r['tvm'])} | {_ms(r['tvm_fixed'])} "
              f"(K={r['fixed_batch']}) | {_ms(r['int_onnx'])} | {_ms(r['int_onnx_opt'])} | "
              f"{_ms(r['ort_float'])} | {_ms(r['ort_int8'])} | {_ms(r['torch'])} | "
              f"**{r['tvm_fixed'] / r['ort_int8']:.2f}** | {r['tvm'] / r['ort_int8']:.2f} | "
              f"**{r['int_onnx'] / r['ort_int8']:.2f}** | "
              f"**{r['int_onnx_opt'] / r['ort_int8']:.2f}** | "
              f"{r['tvm_fixed'] / r['ort_float']:.2f} | "
              f"{r['tvm_fixed'] / r['torch']:.2f} | {r['mismatches']} |")
    print()
    for name in args.models:
        build = next(r["build_s"] for r in rows if r["model"] == name)
        print(f"{name}: TVM build (import + compile + link) {build:.1f} s")


if __name__ == "__main__":
    main()
