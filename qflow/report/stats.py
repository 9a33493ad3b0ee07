"""What each quantized tensor does to the values it is given, on real data.

Every ``cast`` node of a QGraph (and the input's own cast) turns values into a
fixed-point type: it rounds them, then applies the type's overflow mode to what falls
outside its range. :func:`cast_statistics` runs the emulator on a data batch, keeping
every tensor, and for each cast compares what arrived (the input codes, exact) with the
type's range:

- ``outside``: the fraction of values whose rounded code lies outside ``[qmin, qmax]``;
  what happened to them is the overflow mode's (``SAT``: clipped to the nearest end;
  ``SAT_ZERO``: set to 0; ``SAT_SYM``: clipped to ``[-qmax, qmax]``; ``WRAP``: wrapped
  around), and ``clipped``, ``zeroed`` and ``wrapped`` repeat it under its own name;
- ``outside_count``: how many values that is;
- ``below`` and ``above``: the same, split by side;
- ``zero_codes``: the fraction of output codes that are 0;
- a histogram of the arriving values (real units) with the type's representable range.

The rates count values (elements), over ``samples`` inputs.
"""

from __future__ import annotations

import numpy as np

from qflow.graph.emulator import Emulator
from qflow.graph.ir import QGraph
from qflow.numerics import FixedType, Overflow, requantize, to_codes
from qflow.numerics.convert import FLOAT_EXACT_WIDTH
from qflow.numerics.types import MAX_WIDTH

#: histogram bins per tensor
BINS = 48
#: what the values outside the range became, by overflow mode
OVERFLOW_EFFECT = {Overflow.SAT: "clipped", Overflow.SAT_SYM: "clipped",
                   Overflow.SAT_ZERO: "zeroed", Overflow.WRAP: "wrapped"}


def cast_statistics(graph: QGraph, x: np.ndarray) -> list[dict]:
    """One row per quantizing step (the input's cast, then every ``cast`` node in graph
    order) for the real inputs ``x`` (batch first).

    >>> import torch, qflow
    >>> from qflow.graph import freeze
    >>> model = qflow.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
    >>> x = torch.rand(8, 4)
    >>> rows = cast_statistics(freeze(model, x), 4 * x.numpy())  # inputs beyond the range
    >>> rows[0]["tensor"], rows[0]["outside_count"] > 0, rows[0]["clipped"] == rows[0]["outside"]
    ('input', True, True)
    """
    x = np.asarray(x, dtype=np.float64)
    codes = to_codes(x, graph.input_type)
    tensors = Emulator(graph).run_codes(codes, keep=True)
    # the input's cast takes the real values themselves
    rows = [_row("input", "input", graph.input_type, x, graph.input_type.fractional, codes,
                 len(x))]
    for node in graph.nodes:
        if node.op != "cast":
            continue
        source = graph.tensors[node.inputs[0]].type
        rows.append(_row(node.name, node.source or node.name, graph.tensors[node.output].type,
                         tensors[node.inputs[0]], source.fractional, tensors[node.output],
                         len(x)))
    return rows


def _rounded(arriving, from_fractional: int, t: FixedType) -> np.ndarray:
    """The codes of ``t``'s rounding, before its overflow mode: cast into a type of the
    same fraction and rounding, wide enough for every value that arrives (real values
    are exact in float64 to 53 bits; integer codes to 62)."""
    real = arriving.dtype.kind == "f"  # the graph input: real values
    width = FLOAT_EXACT_WIDTH if real else MAX_WIDTH
    wide = FixedType(signed=True, integer=width - 1 - t.fractional, fractional=t.fractional,
                     rounding=t.rounding, overflow=Overflow.SAT)
    return to_codes(arriving, wide) if real else requantize(arriving, from_fractional, wide)


def _row(name: str, source: str, t: FixedType, arriving: np.ndarray, from_fractional: int,
         out_codes: np.ndarray, samples: int) -> dict:
    rounded = _rounded(np.asarray(arriving), from_fractional, t)
    values = rounded.size
    below, above = int((rounded < t.qmin).sum()), int((rounded > t.qmax).sum())
    real = (arriving if arriving.dtype.kind == "f"
            else np.ldexp(arriving.astype(np.float64), -from_fractional)).ravel()
    low, high = float(np.ldexp(t.qmin, -t.fractional)), float(np.ldexp(t.qmax, -t.fractional))
    lo, hi = min(low, float(real.min())), max(high, float(real.max()))
    counts, edges = np.histogram(real, bins=BINS, range=(lo, hi if hi > lo else lo + 1))
    outside = (below + above) / values
    row = {"tensor": name, "layer": source, "type": t.to_ap(), "samples": samples,
           "values": values, "outside_count": below + above, "range": [low, high],
           "below": below / values,
           "above": above / values, "outside": outside,
           "zero_codes": float((np.asarray(out_codes) == 0).mean()),
           "overflow": t.overflow.value, "histogram": {"counts": counts.tolist(),
                                                     "edges": edges.tolist()}}
    for effect in ("clipped", "zeroed", "wrapped"):
        row[effect] = outside if OVERFLOW_EFFECT[t.overflow] == effect else 0.0
    return row
