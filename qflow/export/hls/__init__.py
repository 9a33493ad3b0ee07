"""hls4ml exporter: a QGraph to an HLS project for an FPGA target, bit-exact in C simulation.

``export_hls(graph, out_dir, target, options)`` writes

- ``model.qonnx.onnx`` and ``model.int.onnx`` (as for ``--target onnx``);
- ``model.hls4ml.onnx``: the channels-last QONNX graph hls4ml's ONNX frontend reads
  (see :mod:`.onnx_graph`);
- ``hls/``: the hls4ml 1.3 project (Vitis backend, the target's part and clock), every
  layer's precisions set from the QGraph and read back after conversion
  (:mod:`.convert`), with a testbench fed by corner-case inputs;
- ``board/`` for boards with a processing system (:mod:`.board`);
- ``report.json``: settings, every layer's types and the resource estimate
  (:mod:`.estimate`).

``run_csim(hls_dir, graph, x)`` compiles the project with g++ and returns the output
codes of its C simulation; the verify command compares them with the emulator.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qflow.errors import QflowError
from qflow.graph.emulator import Emulator
from qflow.graph.ir import QGraph
from qflow.numerics.corners import corner_inputs

from .convert import HLS_ONNX_FILE, PROJECT_NAME, Project, convert, run_project
from .onnx_graph import HlsExportError

__all__ = ["HlsExportError", "export_hls", "run_csim"]

HLS_DIR = "hls"
BOARD_DIR = "board"
REPORT_FILE = "report.json"
TESTBENCH_SAMPLES = 64


#: reuse factors ``auto`` tries, smallest first
AUTO_REUSE = tuple(2**k for k in range(13))


def _settings(graph: QGraph, target, options):
    """(settings, their resource estimate): io type, reuse factor and strategy are the
    user's, else the target's; reuse ``auto`` is the smallest power of two whose estimate
    fits every budget; 1 when the layers the reuse factor does not fold exceed a budget on
    their own (no reuse factor fits), the largest tried when none fits otherwise."""
    from .estimate import estimate_resources

    defaults = target.defaults
    settings = {
        "io_type": options.io_type or defaults["io_type"],
        "reuse_factor": options.reuse_factor or defaults["reuse_factor"],
        "strategy": options.strategy or defaults["strategy"],
    }
    if settings["reuse_factor"] != "auto":
        return settings, estimate_resources(graph, target, **settings)
    note = ""
    for reuse in AUTO_REUSE:
        settings["reuse_factor"] = reuse
        estimate = estimate_resources(graph, target, **settings)
        if estimate.fits():
            break
        if not estimate.fits_at_some_reuse():
            note = (" (no reuse factor fits the board: the layers it does not fold exceed "
                    "it on their own)")
            break
    options.progress(f"reuse factor auto: {settings['reuse_factor']}{note}")
    return settings, estimate




def _require_hls4ml() -> None:
    try:
        import hls4ml  # noqa: F401
    except ImportError:
        raise QflowError("FPGA targets need hls4ml: pip install 'qflow[hls]'") from None


def export_hls(graph: QGraph, out_dir: Path, target, options) -> dict[str, str]:
    """Write the ONNX files, the hls4ml project, board files and report.json."""
    from qflow.export import export_onnx

    _require_hls4ml()
    settings, estimate = _settings(graph, target, options)
    artifacts = export_onnx(graph, out_dir, target, options)
    shape = tuple(graph.tensors[graph.input].shape)
    tb_x = corner_inputs(graph.input_type, shape, TESTBENCH_SAMPLES)
    tb_y = np.ldexp(Emulator(graph).run(tb_x).astype(np.float64),
                    -graph.output_type.fractional)
    options.progress(f"converting with hls4ml ({settings['io_type']}, reuse factor "
                     f"{settings['reuse_factor']}, {settings['strategy']} strategy, part "
                     f"{target.part} at {target.clock_mhz:g} MHz)")
    project = convert(graph, out_dir / HLS_DIR, part=target.part, clock_mhz=target.clock_mhz,
                      log=out_dir / "hls4ml.log", testbench=(tb_x, tb_y), **settings)
    options.progress(f"hls4ml project written; {len(project.layers)} layers, every type "
                     "read back and equal to the QGraph's")
    board_files = _write_board(graph, out_dir, target, project)
    report = {
        "target": target.name,
        "part": target.part,
        "clock_mhz": target.clock_mhz,
        "settings": settings,
        "hls4ml_project": {"directory": HLS_DIR, "project_name": PROJECT_NAME,
                           "input_graph": HLS_ONNX_FILE},
        "layers": project.layers,
        "board": board_files,
        "estimate": estimate.to_json(),
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    options.progress(estimate.table())
    options.progress(("" if estimate.fits() else "[yellow]") + estimate.verdict()
                     + ("" if estimate.fits() else "[/]"))
    for warning in estimate.warnings:
        options.progress(f"[yellow]warning:[/] {warning}")
    for note in estimate.notes:
        options.progress(note)
    if not target.processing_system:
        options.progress(f"no board files: {target.name} has no processing system")
    return {**artifacts, "hls_csim": HLS_DIR}


def _write_board(graph: QGraph, out_dir: Path, target, project: Project) -> list[str]:
    if not target.processing_system:
        return []
    from .board import board_spec, write_board

    spec = board_spec(graph, target, project.io_type, project_name=PROJECT_NAME,
                      hls_dir=f"../{HLS_DIR}")
    return write_board(out_dir / BOARD_DIR, target, spec)


def run_csim(hls_dir: Path, graph: QGraph, x: np.ndarray, *, workers: int = 1,
             progress: Callable[[str], None] | None = None) -> np.ndarray:
    """Output codes of the project's C simulation (g++) for real-valued input ``x``, run
    in ``workers`` processes."""
    _require_hls4ml()
    hls_dir = Path(hls_dir)
    if not (hls_dir / "firmware" / f"{PROJECT_NAME}.cpp").is_file():
        raise QflowError(f"{hls_dir} is not a qflow hls4ml project")
    return run_project(hls_dir, graph, x, hls_dir.parent / "csim.log", workers=workers,
                       progress=progress)
