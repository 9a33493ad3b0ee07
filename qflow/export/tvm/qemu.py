"""Run an aarch64 TVM build: natively on an aarch64 machine, under qemu-user on any
other; the verify command's runner for the artifact kind ``tvm_arm64``.

The build's own ``run.py`` runs in an aarch64 Python (Debian's arm64 packages unpacked
into a sysroot, never installed) with aarch64 wheels of numpy and the TVM runtime:

    PYTHONPATH=<dir>/site qemu-aarch64 -L <dir>/sysroot <dir>/sysroot/usr/bin/python3.11 \\
        tvm/run.py input_codes.npy output_codes.npy

``scripts/setup.sh dev`` (as root, with apt-get) prepares ``<dir>``: by default
``arm64/`` inside the Python environment (``sys.prefix``), or the folder the environment
variable ``QFLOW_ARM64_EMULATION`` names. Without it the runner raises
:class:`~qflow.errors.ArtifactNotRunnableError` saying what is missing.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from qflow.errors import ArtifactNotRunnableError, QflowError
from qflow.graph.ir import QGraph
from qflow.numerics import to_codes

ENV = "QFLOW_ARM64_EMULATION"
PYTHON = "usr/bin/python3.11"
TIMEOUT_S = 1800


def emulation_dir() -> Path:
    """Where the aarch64 sysroot and site folders are (or would be)."""
    return Path(os.environ.get(ENV) or Path(sys.prefix) / "arm64")


def missing() -> str | None:
    """What is missing to run aarch64 builds here, or None."""
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 not found (Debian: apt-get install qemu-user)"
    root = emulation_dir()
    if not (root / "sysroot" / PYTHON).is_file():
        return f"no aarch64 Python in {root / 'sysroot'}"
    if not (root / "site" / "tvm").is_dir() or not (root / "site" / "numpy").is_dir():
        return f"no aarch64 numpy and TVM runtime in {root / 'site'}"
    return None


def run_arm64(path: Path, graph: QGraph, x: np.ndarray) -> np.ndarray:
    """Output codes of the aarch64 build in ``path`` (an export's ``tvm/``) for real
    input ``x``: through its own ``run.py``, natively on aarch64, else under qemu-user."""
    from .build import RUNNER
    from .runner import read_manifest

    path = Path(path)
    if platform.machine().lower() in ("aarch64", "arm64"):
        from . import run_tvm

        return run_tvm(path, graph, x)
    reason = missing()
    if reason:
        raise ArtifactNotRunnableError(f"arm64 emulation is not set up: {reason}; "
                                       "scripts/setup.sh dev sets it up as root")
    if not (path / RUNNER).is_file():
        raise QflowError(f"{path}: not a TVM build ({RUNNER} not found)")
    try:
        build = read_manifest(path)
    except ValueError as exc:
        raise QflowError(str(exc)) from None
    if build.get("arch") != "aarch64":
        raise ArtifactNotRunnableError(f"built for {build.get('arch')}, not aarch64")
    if not build.get("library"):
        raise ArtifactNotRunnableError("object files only: no aarch64 linker was found at "
                                       "export")
    root = emulation_dir()
    with tempfile.TemporaryDirectory(prefix="qflow-qemu-") as tmp:
        inputs, outputs = Path(tmp) / "in.npy", Path(tmp) / "out.npy"
        np.save(inputs, to_codes(np.asarray(x, dtype=np.float64), graph.input_type))
        env = {**os.environ, "PYTHONPATH": str(root / "site"), "PYTHONNOUSERSITE": "1"}
        command = ["qemu-aarch64", "-L", str(root / "sysroot"), str(root / "sysroot" / PYTHON),
                   str(path / RUNNER), str(inputs), str(outputs)]
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True,
                                    timeout=TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise QflowError(f"{path}: the aarch64 run took more than {TIMEOUT_S} s under "
                             "qemu") from None
        if result.returncode != 0 or not outputs.is_file():
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            raise QflowError(f"{path}: run.py under qemu-aarch64 exited {result.returncode}"
                             + (f": {lines[-1].strip()}" if lines else ""))
        return np.load(outputs, allow_pickle=False)
