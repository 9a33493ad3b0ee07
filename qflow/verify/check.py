"""Run every artifact of an export directory and count mismatches against the emulator."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qflow.errors import QflowError
from qflow.graph.emulator import Emulator
from qflow.graph.ir import QGraph
from qflow.jsonfile import read_json
from qflow.numerics import FixedType, to_codes

from .corners import corner_inputs

EXPORT_FILE = "export.json"
QGRAPH_FILE = "model.qgraph"


@dataclass
class ArtifactResult:
    artifact: str
    samples: int
    mismatching_samples: int
    max_diff_lsb: int
    seconds: float
    note: str = ""


def _run_qonnx(path: Path, graph: QGraph, x: np.ndarray) -> np.ndarray:
    from qflow.export.qonnx import run_qonnx

    return run_qonnx(path, x)


def _run_int_onnx(path: Path, graph: QGraph, x: np.ndarray) -> np.ndarray:
    from qflow.export.int_onnx import run_int_onnx

    return run_int_onnx(path, to_codes(x, graph.input_type))


def _run_hls_csim(path: Path, graph: QGraph, x: np.ndarray) -> np.ndarray:
    from qflow.export.hls import run_csim

    return run_csim(path, graph, x)


def _run_tvm(path: Path, graph: QGraph, x: np.ndarray) -> np.ndarray:
    from qflow.export.tvm import run_tvm

    return run_tvm(path, graph, x)


class ArtifactNotRunnableError(QflowError):
    """An artifact that cannot run on this machine (a CUDA build without a GPU, say);
    verify reports the reason instead of a result."""


#: artifact kind -> runner(path, graph, real-valued input) -> output codes; a runner
#: raises ArtifactNotRunnableError when this machine cannot run the artifact
RUNNERS: dict[str, Callable[[Path, QGraph, np.ndarray], np.ndarray]] = {
    "qonnx": _run_qonnx,
    "int_onnx": _run_int_onnx,
    "hls_csim": _run_hls_csim,
    "tvm": _run_tvm,
}


def read_export(directory: Path) -> dict:
    return read_json(directory / EXPORT_FILE, missing=f"{directory} is not an export "
                     f"directory ({EXPORT_FILE} not found)")


def qat_codes(run_dir: Path, graph: QGraph, x: np.ndarray) -> np.ndarray:
    """Output codes of the QAT model (eval mode, exact float64 path) of a run directory."""
    import torch

    from qflow.runs import load_run

    model, _ = load_run(run_dir)
    with torch.no_grad():
        out = model(torch.as_tensor(x, dtype=torch.float32)).numpy().astype(np.float64)
    return values_to_codes(out, graph.output_type)


def values_to_codes(values: np.ndarray, t: FixedType) -> np.ndarray:
    """Real values on ``t``'s grid -> int64 codes; an off-grid value (or NaN) becomes a
    code no type has, so it counts as a mismatch."""
    scaled = np.ldexp(values, t.fractional)
    codes = np.rint(scaled)
    off_grid = ~(codes == scaled)
    # an off-grid value can never match: push it out of reach so it counts as a mismatch
    return np.where(off_grid, np.iinfo(np.int64).min // 2, codes).astype(np.int64)


def compare(reference: np.ndarray, codes: np.ndarray) -> tuple[int, int]:
    """(mismatching samples, max |difference| in LSBs) between two code arrays."""
    if codes.shape != reference.shape:
        return len(reference), -1
    diff = np.abs(codes.astype(np.float64) - reference.astype(np.float64))
    per_sample = diff.reshape(len(diff), -1).max(axis=1)
    return int((per_sample > 0).sum()), int(per_sample.max()) if len(per_sample) else 0


def verification_inputs(graph: QGraph, data, samples: int, corners: int,
                        seed: int = 0) -> tuple[np.ndarray, dict[str, int]]:
    """Up to ``samples`` data-derived inputs, then ``corners`` corner cases.

    The data-derived inputs are the test split, then (when it is shorter than
    ``samples``) the training split, then test inputs moved by a few LSBs of the input
    type. ``data`` is a data set with ``x_test`` (and ``x_train``) or None. Returns the
    inputs and the count of each kind.
    """
    shape = tuple(graph.tensors[graph.input].shape)
    parts, counts = [], {"test": 0, "train": 0, "perturbed test": 0, "corner": 0}
    if data is not None and samples:
        test = np.asarray(data.x_test[:samples], dtype=np.float64)
        parts.append(test)
        counts["test"] = len(test)
        train = getattr(data, "x_train", None)
        if train is not None and counts["test"] < samples:
            extra = np.asarray(train[:samples - counts["test"]], dtype=np.float64)
            parts.append(extra)
            counts["train"] = len(extra)
        missing = samples - counts["test"] - counts["train"]
        if missing > 0 and len(test):
            rng = np.random.default_rng(seed)
            picked = test[rng.integers(0, len(test), missing)]
            lsb = graph.input_type.lsb
            parts.append(picked + lsb * rng.integers(-4, 5, picked.shape) / 2)
            counts["perturbed test"] = missing
    if corners:
        parts.append(corner_inputs(graph.input_type, shape, corners))
        counts["corner"] = len(parts[-1])
    return np.concatenate(parts), counts


def verify_directory(directory: Path, *, samples: int, corners: int,
                     progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Check every artifact in ``directory``; return the report written to verify.json."""
    directory = Path(directory)
    info = read_export(directory)
    graph = QGraph.load(directory / QGRAPH_FILE)
    run_dir = (directory / info["run"]).resolve() if info.get("run") else None
    data = None
    if info.get("data"):
        from qflow.sources import resolve_data

        data = resolve_data(info["data"])
    x, counts = verification_inputs(graph, data, samples, corners)
    n_test = len(x) - counts["corner"]
    progress(f"{len(x)} samples: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()
                                                if n))

    start = time.perf_counter()
    reference = Emulator(graph).run(x)
    results = [ArtifactResult("emulator (reference)", len(x), 0, 0,
                              time.perf_counter() - start)]
    if run_dir is not None and run_dir.is_dir():
        results.append(_timed("QAT model (torch eval)", reference,
                              lambda: qat_codes(run_dir, graph, x)))
    for kind, filename in info.get("artifacts", {}).items():
        runner = RUNNERS.get(kind)
        if runner is None:
            raise QflowError(f"{directory / EXPORT_FILE}: unknown artifact kind {kind!r}")
        path = directory / filename
        if not path.exists():
            raise QflowError(f"artifact not found: {path}")
        progress(f"running {kind} ({filename})")
        try:
            results.append(_timed(kind, reference,
                                  lambda r=runner, p=path: r(p, graph, x)))
        except ArtifactNotRunnableError as exc:
            results.append(ArtifactResult(kind, 0, 0, 0, 0.0,
                                          note=f"not run: {exc}"))
    report = {
        "directory": str(directory),
        "samples": len(x),
        "test_samples": n_test,
        "corner_samples": counts["corner"],
        "sample_kinds": counts,
        "output_type": graph.output_type.to_ap(),
        "results": [asdict(r) for r in results],
        "mismatching_samples": sum(r.mismatching_samples for r in results),
    }
    tmp = directory / ".verify.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(directory / "verify.json")
    return report


def _timed(name: str, reference: np.ndarray, run: Callable[[], np.ndarray]) -> ArtifactResult:
    start = time.perf_counter()
    codes = run()
    seconds = time.perf_counter() - start
    bad, max_diff = compare(reference, codes)
    return ArtifactResult(name, len(reference), bad, max_diff, seconds)
