"""QGraph IR, the integer emulator and (with torch) ``freeze``.

``qflow.graph.ir`` and ``qflow.graph.emulate`` import without torch; ``freeze`` is
loaded on first use.
"""

from .emulator import Emulator, emulate
from .ir import OP_SPECS, Node, QGraph, QGraphError, TensorInfo

__all__ = ["OP_SPECS", "Emulator", "Node", "QGraph", "QGraphError", "TensorInfo", "emulate",
           "freeze"]


def __getattr__(name):
    if name == "freeze":
        from .from_torch import freeze

        return freeze
    raise AttributeError(name)
