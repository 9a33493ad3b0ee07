"""Run a qflow model compiled by TVM: int64 input codes in, int64 output codes out.

This file is copied into every TVM export as ``tvm/run.py``; it needs only numpy and the
TVM runtime (``pip install apache-tvm``, or a runtime-only TVM build on a board), not
qflow or torch. ``build.json`` beside it describes the build: library file, device,
input and output shapes and fixed-point types, and the batch size when the build was
made for a fixed one (``qflow export --batch N``: any number of samples still works; they
go N per call, the last call padded).

Input codes are the input type's own cast of the real values (``build.json``:
``input.type``): t = x * 2**fractional, rounded to an integer by the type's rounding mode
(TRN floors, RND_CONV rounds ties to even, ...), then its overflow mode applied to that
integer (SAT clamps to ``[qmin, qmax]``, SAT_ZERO gives 0 outside it, WRAP keeps the low
W bits). That is ``round(x * 2**fractional)`` saturated only for an RND_CONV/SAT input
type. ``codec.py``, which every export writes beside ``tvm/`` (numpy only; copy it with
``tvm/``), computes them exactly; output codes stand for ``code * 2**-fractional``.
Codes outside ``[qmin, qmax]`` are refused.

Command line (codes in a ``.npy`` file, shape ``[N, *input_shape]``, integers)::

    python codec.py to-codes inputs.npy input_codes.npy      # real values -> input codes
    python tvm/run.py input_codes.npy output_codes.npy
    python codec.py from-codes output_codes.npy outputs.npy  # output codes -> real values

From Python::

    import importlib.util

    def load_file(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
        return module

    codec = load_file("codec", "export-cpu/codec.py")
    run = load_file("qflow_tvm_run", "export-cpu/tvm/run.py")
    model = run.load()                    # the build beside run.py; or run.load("path/to/tvm")
    out_codes = model(codec.to_codes(x))  # x: real inputs [N, *input_shape]
    y = codec.from_codes(out_codes)       # real outputs (float64, exact)
"""

from __future__ import annotations

import json
import platform
import sys
import threading
from pathlib import Path

import numpy as np

MANIFEST = "build.json"
FORMAT = "qflow-tvm/1"
RUN_CHUNK = 4096  # samples per call when build.json names none: bounds the buffers
ALIGNMENT = 64  # bytes: TVM's compiled functions take tensors whose data is aligned so
#: platform.machine() spellings -> the architecture names build.json uses
MACHINE_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64",
                "arm64": "aarch64"}


class NotRunnableError(RuntimeError):
    """This machine cannot run the build (other architecture, no GPU, not linked)."""


def read_manifest(directory: str | Path) -> dict:
    """The build description ``build.json`` of a TVM export directory."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable TVM build description ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a qflow TVM build (format {FORMAT!r} expected)")
    return manifest


def not_runnable_reason(directory: str | Path) -> str | None:
    """Why this machine cannot run the build in ``directory``, or None if it can."""
    manifest = read_manifest(directory)
    arch = manifest["arch"]
    machine = MACHINE_ARCH.get(platform.machine().lower(), platform.machine())
    if manifest["device"] == "cpu" and arch != machine:
        return (f"cross-compiled for {arch}, this machine is {machine}: copy the tvm/ "
                "directory to the board and run run.py there")
    if not manifest.get("library"):
        return (f"object files only ({manifest.get('objects')}): no {arch} linker was found "
                "at export; link them on the board or install the cross toolchain")
    if not (Path(directory) / manifest["library"]).is_file():
        return f"the library {manifest['library']} is missing from {directory}"
    if manifest["device"] != "cpu":
        import tvm

        if not tvm.device(manifest["device"], 0).exist:
            return (f"no GPU: the {manifest['device'].upper()} module was built but not run "
                    f"(the TVM runtime finds no {manifest['device']} device)")
    return None


class TvmModel:
    """A loaded build: call it with integer input codes to get int64 output codes. Calls
    from several threads are safe; they run one at a time."""

    def __init__(self, directory: str | Path):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        reason = not_runnable_reason(self.directory)
        if reason:
            raise NotRunnableError(reason)
        self.device = tvm.device(self.manifest["device"], 0)
        library = tvm.runtime.load_module(str(self.directory / self.manifest["library"]))
        self._tvm = tvm
        self._vm = VirtualMachine(library, self.device)
        self._main = self._vm["main"]
        # read once: a small model's call takes microseconds, and so do dict lookups
        spec = self.manifest["input"]
        self._input_shape = tuple(spec["shape"])
        self._qmin, self._qmax = int(spec["qmin"]), int(spec["qmax"])
        self._batch = self.manifest.get("batch")  # a build for a fixed batch takes only that
        self._step = int(self._batch or self.manifest.get("samples_per_call") or RUN_CHUNK)
        self._lock = threading.Lock()
        self._input: np.ndarray | None = None  # see _run
        self._input_tensor = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["output"]["shape"])

    def __call__(self, codes) -> np.ndarray:
        """Output codes (int64, ``[N, *output_shape]``) for input codes ``[N, *input_shape]``."""
        codes = np.asarray(codes)
        if codes.dtype.kind not in "iub":
            raise ValueError(f"input codes must be integers, got dtype {codes.dtype}")
        if codes.shape[1:] != self._input_shape or codes.ndim != 1 + len(self._input_shape):
            raise ValueError(f"input has shape {codes.shape}, the model expects "
                             f"(N, {', '.join(map(str, self._input_shape))})")
        codes = np.ascontiguousarray(codes, dtype=np.int64)
        if codes.size:
            low, high = int(codes.min()), int(codes.max())
            if low < self._qmin or high > self._qmax:
                spec = self.manifest["input"]
                raise ValueError(f"input codes span [{low}, {high}], outside the range "
                                 f"[{self._qmin}, {self._qmax}] of {spec['type']}")
        batch, step = self._batch, self._step
        if len(codes) == (batch or len(codes)) and 0 < len(codes) <= step:  # one call
            return self._run(codes).astype(np.int64)
        outs = [np.empty((0, *self.output_shape), dtype=np.int64)]
        for start in range(0, len(codes), step):
            chunk = codes[start:start + step]
            count = len(chunk)
            if batch and count < batch:  # pad the last call with copies of its first sample
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - count, axis=0)])
            outs.append(self._run(chunk)[:count].astype(np.int64))
        return outs[1] if len(outs) == 2 else np.concatenate(outs)

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        """One call of the compiled model, one at a time (TVM's virtual machine is not
        for concurrent calls). On the CPU, the codes go in through an aligned buffer kept
        between calls and shared with TVM (DLPack), and come out the same way: checking
        and wrapping new memory per call cost a small model 1.5 us of its 10."""
        runtime = self._tvm.runtime
        with self._lock:
            if self.manifest["device"] != "cpu":
                return self._main(runtime.tensor(chunk, self.device)).numpy()
            if self._input is None or self._input.shape != chunk.shape:
                self._input = _aligned(np.empty(chunk.shape, np.int64))
                self._input_tensor = runtime.from_dlpack(self._input)
            self._input[...] = chunk
            return np.from_dlpack(self._main(self._input_tensor))


def _aligned(array: np.ndarray) -> np.ndarray:
    """``array`` (C-contiguous), or a copy of it whose data starts on the byte boundary
    TVM's kernels assume."""
    if array.ctypes.data % ALIGNMENT == 0:
        return array
    raw = np.empty(array.nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    copy = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy


def load(directory: str | Path | None = None) -> TvmModel:
    """The build in ``directory`` (default: the directory this file is in)."""
    return TvmModel(Path(directory) if directory is not None else Path(__file__).parent)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python run.py INPUT_CODES.npy OUTPUT_CODES.npy (integer codes of the "
              "input type: python codec.py to-codes INPUTS.npy INPUT_CODES.npy makes them)",
              file=sys.stderr)
        return 2
    try:
        model = load()
        out = model(np.load(argv[0]))
    except (NotRunnableError, ValueError, OSError) as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 2
    np.save(argv[1], out)
    print(f"{len(out)} samples -> {argv[1]} (int64 codes of {model.manifest['output']['type']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
