"""How to run each kind of exported artifact: the table the verify command uses.

A runner takes the artifact's path, the QGraph it was exported from and real-valued
inputs (batch first, the QGraph's layout), and as keywords the number of worker
processes it may use and a progress callback (runners that finish quickly ignore both);
it returns the output codes (int64, the QGraph's output type). It raises
:class:`qflow.errors.ArtifactNotRunnableError` when this machine cannot run the
artifact, and any other exception when the artifact is broken; the verify command
records either as that artifact's row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from qflow.graph.ir import QGraph
from qflow.numerics import to_codes

Runner = Callable[..., np.ndarray]  # (path, graph, x, *, workers, progress) -> codes


def _run_qonnx(path: Path, graph: QGraph, x: np.ndarray, **_) -> np.ndarray:
    from .qonnx import run_qonnx

    return run_qonnx(path, x)


def _run_int_onnx(path: Path, graph: QGraph, x: np.ndarray, **_) -> np.ndarray:
    from .int_onnx import run_int_onnx

    return run_int_onnx(path, to_codes(x, graph.input_type))


def _run_hls_csim(path: Path, graph: QGraph, x: np.ndarray, *, workers: int = 1,
                  progress=None) -> np.ndarray:
    from .hls import run_csim

    return run_csim(path, graph, x, workers=workers, progress=progress)


def _run_tvm(path: Path, graph: QGraph, x: np.ndarray, **_) -> np.ndarray:
    from .tvm import run_tvm

    return run_tvm(path, graph, x)


def _run_tvm_arm64(path: Path, graph: QGraph, x: np.ndarray, **_) -> np.ndarray:
    from .tvm.qemu import run_arm64

    return run_arm64(path, graph, x)


#: artifact kind (a key of export.json's ``artifacts``) -> runner
RUNNERS: dict[str, Runner] = {
    "qonnx": _run_qonnx,
    "int_onnx": _run_int_onnx,
    "hls_csim": _run_hls_csim,
    "tvm": _run_tvm,
    "tvm_arm64": _run_tvm_arm64,
}
