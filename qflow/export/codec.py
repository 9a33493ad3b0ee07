"""The numpy-only input/output helper written into every export: ``codec.py``.

Deployed artifacts take and return integer codes. :func:`write_codec` writes
``codec.py`` beside them: the model's input and output types as data at the top, and
``to_codes(x)`` (real inputs to input codes, in the input type's own rounding and
overflow modes, bit for bit :func:`qflow.numerics.to_codes`) and ``from_codes(q)``
(output codes to real values). It imports numpy only, so the export folder can be
copied to a device without qflow. The file is :mod:`qflow.export.codec_template` with
its types block replaced; that module is importable and tested as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from qflow.graph.ir import QGraph
from qflow.numerics.types import FixedType

#: the helper's file name in an export directory (not ``io.py``: that would shadow the
#: standard library's ``io`` module for a script run beside it)
CODEC_FILE = "codec.py"
TEMPLATE = Path(__file__).resolve().with_name("codec_template.py")
_BEGIN = "# ---- types: filled in by qflow at export ----\n"
_END = "# ---- end of types ----\n"


def type_literal(t: FixedType) -> str:
    """The helper's description of ``t``: ap_fixed's W and I, sign, rounding, overflow."""
    return (f'{{"width": {t.width}, "int_width": {t.int_width}, "signed": {t.signed}, '
            f'"rounding": "{t.rounding}", "overflow": "{t.overflow}"}}')


def render(input_type: FixedType, output_type: FixedType) -> str:
    """The text of ``codec.py`` for a model with these input and output types."""
    text = TEMPLATE.read_text(encoding="utf-8")
    start, end = text.index(_BEGIN), text.index(_END)
    block = (f"{_BEGIN}#: input type {input_type.to_ap()}\n"
             f"INPUT = {type_literal(input_type)}\n"
             f"#: output type {output_type.to_ap()}\n"
             f"OUTPUT = {type_literal(output_type)}\n")
    return text[:start] + block + text[end:]


def write_codec(graph: QGraph, out_dir: str | Path) -> Path:
    """Write ``codec.py`` for ``graph`` into ``out_dir`` (atomically); return its path."""
    path = Path(out_dir) / CODEC_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(render(graph.input_type, graph.output_type), encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
