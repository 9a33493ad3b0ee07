"""Exporters: a QGraph to deployable artifacts, picked by target name from a table.

Each target is an object with ``name``, ``description`` and
``export(graph, out_dir) -> dict[str, str]`` (artifact kind -> file name). The
verification side (``qflow.verify``) knows how to run each artifact kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qflow.errors import QflowError
from qflow.graph.ir import QGraph


def _export_onnx(graph: QGraph, out_dir: Path) -> dict[str, str]:
    from .int_onnx import export_int_onnx
    from .qonnx import export_qonnx

    export_qonnx(graph, out_dir / "model.qonnx.onnx")
    export_int_onnx(graph, out_dir / "model.int.onnx")
    return {"qonnx": "model.qonnx.onnx", "int_onnx": "model.int.onnx"}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    export: Callable[[QGraph, Path], dict[str, str]]


TARGETS: dict[str, Target] = {
    "onnx": Target("onnx", "QONNX graph (qonnx executor, hls4ml input) and integer ONNX "
                   "(ONNX Runtime)", _export_onnx),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise QflowError(f"unknown target {name!r} (known: {', '.join(sorted(TARGETS))})")
    return TARGETS[name]
