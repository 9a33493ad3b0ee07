"""Bring your own quantized model: QONNX graphs (brevitas, HAWQ, QKeras via qonnx) as QGraphs.

:func:`import_qonnx` reads a QONNX file, cleans it with qonnx's own transformations
(``cleanup_model``: shapes, constant folding, readable names) and converts it node by
node (:mod:`qflow.qonnx_import.convert`); :func:`import_brevitas` runs brevitas's own
``export_qonnx`` on a model first. The QGraph computes the exact arithmetic meaning of the
QONNX graph; ``qflow import`` writes it as a run directory that ``qflow export`` and
``qflow verify`` take like any other (``docs/import.md``).

>>> # graph = import_qonnx("model.onnx"); graph = import_brevitas(model, torch.rand(1, 64))
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from qflow.errors import QflowError
from qflow.graph.ir import QGraph

from .convert import Converter, QonnxError

__all__ = ["QonnxError", "clean_qonnx", "import_brevitas", "import_qonnx"]


def clean_qonnx(path: str | Path, *, batch: int | None = None):
    """The QONNX file at ``path`` as a cleaned qonnx ``ModelWrapper`` (one line on a file
    that is not ONNX); ``batch``, when given, becomes the graph's batch size."""
    import onnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    path = Path(path)
    if not path.is_file():
        raise QflowError(f"{path}: no such file")
    try:
        model = ModelWrapper(onnx.load(str(path)))
    except Exception as exc:  # onnx raises DecodeError, ValueError, OSError ...
        raise QflowError(f"{path}: not an ONNX model ({_first_line(exc)})") from None
    try:
        return cleanup_model(model, override_inpsize=batch)
    except Exception as exc:
        raise QflowError(f"{path}: qonnx cannot clean this graph ({_first_line(exc)})") from None


def import_qonnx(path: str | Path) -> QGraph:
    """The QGraph of a QONNX file; :class:`QonnxError` (a QflowError) names the first
    node without an exact integer form."""
    graph = Converter(clean_qonnx(path)).convert()
    graph.meta["source"] = Path(path).name
    return graph


def import_brevitas(model, example) -> QGraph:
    """Export a brevitas model with brevitas's own ``export_qonnx`` (on ``example``, one
    input batch) and import the result. Needs brevitas and onnxoptimizer."""
    try:
        from brevitas.export import export_qonnx
    except ImportError:
        raise QflowError("import_brevitas needs brevitas: pip install brevitas") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        model.eval()
        export_qonnx(model, input_t=example, export_path=str(path))
        return import_qonnx(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
