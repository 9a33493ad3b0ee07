"""Fusions of the integer ONNX export: fewer passes over the activations, the same codes.

ONNX Runtime runs each elementwise node as its own pass over the tensor, and in the
float arithmetics of :mod:`qflow.export.int_onnx` those passes, not the products, take
most of a convolutional model's time. :func:`plan_fusions` picks two rewrites on the
QGraph before any ONNX node is written; each node's route in the metadata says which
applied.

- **A ReLU done by its cast.** A ``relu`` whose only consumer is a ``cast`` to an
  unsigned SAT or SAT_SYM type, both in a float arithmetic, is not emitted. The cast
  clamps its scaled input to [0, qmax] before rounding (``kernel.reduce_range``), so a
  negative value becomes code 0 either way; a value at or above 0 is untouched by the
  ReLU. (The emulator skips the same ReLUs.)
- **A cast's scaling moved into the constants before it.** A float ``cast`` scales its
  input by 2**s before it clamps and rounds. When the node before it (looking through a
  skipped ReLU) is a ``dense`` or ``conv2d`` on the float32 route, a ``scale_shift``, an
  ``avgpool2d`` or a ``global_avgpool2d`` in the same float arithmetic, read by nothing
  else, that node's weights and bias (scale and shift; reciprocal) are multiplied by 2**s
  instead and the cast has no multiply. Exact: every value that node forms is an integer
  below the format's bound (or, for a pooling reciprocal, the exact product the export
  bounds); times 2**s, with |s| within the format's exponent margin (``max_shift``), it
  is that value's exact multiple, so each product and sum the runtime forms is the
  original one times 2**s, which is what the cast computed from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qflow.graph.infer import FLOAT32, FLOAT64
from qflow.graph.ir import Node, QGraph
from qflow.numerics import Overflow

#: ops whose constants can absorb the power-of-two scaling of the cast after them
SCALABLE_OPS = frozenset({"dense", "conv2d", "scale_shift", "avgpool2d", "global_avgpool2d"})
MAX_SHIFT = {"float32": FLOAT32.max_shift, "float64": FLOAT64.max_shift}
FORMAT_BITS = {"float32": FLOAT32.bits, "float64": FLOAT64.bits}


@dataclass
class Fusions:
    """What :func:`plan_fusions` chose: ReLU nodes not emitted, and for each node whose
    constants absorb a cast's scaling, the cast and the exponent s of 2**s."""

    skipped_relus: set[str] = field(default_factory=set)
    scaled: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def prescaled(self) -> set[str]:
        """The casts whose scaling a node before them took."""
        return {cast for cast, _ in self.scaled.values()}


def plan_fusions(graph: QGraph, arithmetics: dict[str, str]) -> Fusions:
    """The fusions for ``graph`` exported with ``arithmetics`` (node name -> arithmetic)."""
    consumers = graph.consumers()
    producers = {n.output: n for n in graph.nodes}
    fusions = Fusions()

    def sole_reader(tensor: str) -> Node | None:
        users = consumers.get(tensor, [])
        return users[0] if tensor != graph.output and len(users) == 1 else None

    for node in graph.nodes:
        cast = sole_reader(node.output) if node.op == "relu" else None
        if (cast is not None and cast.op == "cast" and _clamps_at_zero(graph, cast)
                and arithmetics[node.name] != "int64" and arithmetics[cast.name] != "int64"
                # the cast then reads the ReLU's input: its codes must be exact there too
                and graph.tensors[node.inputs[0]].type.width < FORMAT_BITS[
                    arithmetics[cast.name]]):
            fusions.skipped_relus.add(node.name)
    for cast in graph.nodes:
        if cast.op != "cast" or arithmetics[cast.name] == "int64":
            continue
        producer = producers.get(cast.inputs[0])
        if producer is not None and producer.name in fusions.skipped_relus:
            producer = producers.get(producer.inputs[0])
            if producer is not None and sole_reader(producer.output) is None:
                continue
        if (producer is None or producer.op not in SCALABLE_OPS
                or sole_reader(producer.output) is None
                or arithmetics[producer.name] != arithmetics[cast.name]):
            continue
        shift = (graph.tensors[cast.output].type.fractional
                 - graph.tensors[cast.inputs[0]].type.fractional)
        if shift and abs(shift) <= MAX_SHIFT[arithmetics[cast.name]]:
            fusions.scaled[producer.name] = (cast.name, shift)
    return fusions


def _clamps_at_zero(graph: QGraph, cast: Node) -> bool:
    t = graph.tensors[cast.output].type
    return not t.signed and t.overflow in (Overflow.SAT, Overflow.SAT_SYM)


def float32_pools(graph: QGraph) -> set[str]:
    """Average pools over a power-of-two count with a power-of-two reciprocal code, read
    only by a cast, that run in float32 with that cast (``AveragePool``: one pass),
    though the pool's own output type is too wide for the float32 bound: every value the
    pair forms is the window sum, an integer below 2**24, times a power of two within the
    exponent margin, and the cast's codes fit float32. Returns both nodes' names."""
    consumers = graph.consumers()
    chosen = set()
    for node in graph.nodes:
        if node.op not in ("avgpool2d", "global_avgpool2d"):
            continue
        in_t = graph.tensors[node.inputs[0]].type
        shape = graph.tensors[node.inputs[0]].shape
        count = int(np.prod(node.attrs["kernel"] if node.op == "avgpool2d" else shape[-2:]))
        reciprocal = int(node.consts["reciprocal"])
        users = consumers.get(node.output, [])
        if (node.output == graph.output or len(users) != 1 or users[0].op != "cast"
                or not _power_of_two(count) or not _power_of_two(reciprocal)):
            continue
        cast = users[0]
        shift = (reciprocal.bit_length() - 1 + graph.tensors[cast.output].type.fractional
                 - graph.tensors[cast.inputs[0]].type.fractional)
        if (in_t.width < FLOAT32.bits and graph.tensors[cast.output].type.width < FLOAT32.bits
                and count * max(abs(in_t.qmin), abs(in_t.qmax)) < 2**FLOAT32.bits
                and abs(shift) <= FLOAT32.max_shift):
            chosen.update((node.name, cast.name))
    return chosen


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
