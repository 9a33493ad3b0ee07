"""TVM deployment backend: the integer ONNX model compiled with TVM (Relax) for a CPU
(this machine, or aarch64 such as the Cortex-A53 of Zynq UltraScale+ boards) or an
NVIDIA GPU.

:func:`export_tvm` writes the two ONNX files, then compiles ``model.int.onnx`` (integer
codes in and out) into ``tvm/``: the library, ``build.json`` and ``run.py``, a runner
that needs only numpy and the TVM runtime (see :mod:`qflow.export.tvm.runner`).
:func:`run_tvm` is the verify command's runner for the artifact kind ``tvm``; it raises
:class:`qflow.errors.ArtifactNotRunnableError` for a build this machine cannot run
(cross-compiled, or CUDA without a GPU). A linked aarch64 build is the artifact
``tvm_arm64`` instead: :func:`qflow.export.tvm.qemu.run_arm64` runs it natively on an
aarch64 machine and under qemu-user elsewhere.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from qflow.errors import ArtifactNotRunnableError, QflowError
from qflow.graph.ir import QGraph
from qflow.numerics import to_codes
from qflow.targets import TargetSpec

TVM_DIR = "tvm"
INSTALL_HINT = "TVM is not installed: pip install qflow[tvm]"


def require_tvm() -> None:
    """A one-line QflowError if TVM cannot be imported."""
    if importlib.util.find_spec("tvm") is None:
        raise QflowError(INSTALL_HINT)
    try:
        import tvm  # noqa: F401
    except ImportError as exc:
        raise QflowError(f"{INSTALL_HINT} ({exc})") from None


def export_tvm(graph: QGraph, out_dir: Path, target: TargetSpec, options) -> dict[str, str]:
    """Write the ONNX files and ``tvm/`` for ``target``; return the artifacts by kind."""
    from qflow.export import export_onnx

    require_tvm()
    from .build import build_tvm

    artifacts = export_onnx(graph, out_dir, target, options)
    options.progress(f"TVM: compiling model.int.onnx for {target.name} "
                     f"({target.description})")
    build = build_tvm(graph, out_dir / artifacts["int_onnx"], out_dir / TVM_DIR, target,
                      options.progress, options.build_options())
    # a linked aarch64 build runs natively on aarch64 and under qemu-user elsewhere
    linked_arm = build.get("arch") == "aarch64" and build.get("library")
    return {**artifacts, "tvm_arm64" if linked_arm else "tvm": TVM_DIR}


def run_tvm(path: Path, graph: QGraph, x: np.ndarray) -> np.ndarray:
    """Output codes of the TVM build in ``path`` (an export's ``tvm/``) for real input ``x``.

    Runs the build through its own ``run.py``, the file users run. Raises
    :class:`~qflow.errors.ArtifactNotRunnableError` when this machine cannot run the
    build, :class:`QflowError` for a missing or broken build.
    """
    from .build import error_summary

    require_tvm()
    path = Path(path)
    shipped = _load_runner(path)
    try:
        reason = shipped.not_runnable_reason(path)
        if reason:
            raise ArtifactNotRunnableError(reason)
        model = shipped.load(path)
        return model(to_codes(np.asarray(x, dtype=np.float64), graph.input_type))
    except shipped.NotRunnableError as exc:
        raise ArtifactNotRunnableError(str(exc)) from None
    except ArtifactNotRunnableError:
        raise
    except Exception as exc:  # a corrupt library raises TVM's C++ errors
        raise QflowError(f"{path}: TVM build failed to run ({error_summary(exc)})") from None


def _load_runner(directory: Path):
    """The ``run.py`` module shipped in a TVM export directory."""
    from .build import RUNNER, error_summary

    path = directory / RUNNER
    if not path.is_file():
        raise QflowError(f"{directory}: not a TVM build ({RUNNER} not found)")
    spec = importlib.util.spec_from_file_location(f"qflow_tvm_run_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise QflowError(f"{path}: unreadable runner ({error_summary(exc)})") from None
    return module

