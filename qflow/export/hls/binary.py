"""Binary layers in the hls4ml project: which ``sign`` outputs travel in hls4ml's XNOR
encoding, and the types of hls4ml's XNOR/popcount Dense and Conv2D.

A binary layer is a ``dense`` or ``conv2d`` whose input is a ``sign`` output (possibly
flattened) and whose weight codes are all ±1 on fraction 0 (``docs/qgraph.md``). hls4ml
computes such a layer without multipliers when both operands have its binary type
(``XnorPrecisionType``, C++ ``ap_uint<1>``), which holds 1 for +1 and 0 for -1: each
product is ``a == w`` (XNOR), the accumulator counts the matches m, and the result is
``2 * m - n`` (n = fan-in), equal to the ±1 sum Σ x·w. That is exact, with three
conditions qflow checks per layer (:func:`xnor_problem`):

- no zero padding: a padded input position holds 0, which the {0, 1} encoding reads as
  -1, while the QGraph pads with 0. Padded binary convolutions take ``ap_fixed<2,2>``
  operands instead (codes ±1, padding 0, products ±1 by hls4ml's ordinary kernels);
- one group (hls4ml's depthwise kernels have no binary form);
- a convolution bias must be an integer (it is added to the match count as bias / 2 and
  doubled with it) and ``2 * m - n + bias`` must fit the ``ap_int<ceil(log2 n) + 2>``
  that hls4ml's result conversion returns. A dense bias is a separate hls4ml layer.

A ``sign`` output is XNOR-encoded (:func:`xnor_tensors`) when every layer that reads it,
through flattening reshapes only, is a binary layer that meets those conditions;
otherwise it is ``ap_fixed<2,2>`` and every reader is hls4ml's ordinary layer.
"""

from __future__ import annotations

import numpy as np

from qflow.graph.infer import type_for_range
from qflow.graph.ir import Node, QGraph
from qflow.numerics import FixedType

#: the precision of a tensor in hls4ml's binary type: no hls4ml precision string names it,
#: so it is never written into the config; the read-back checks it by class
XNOR = "xnor"


def has_binary_weights(node: Node) -> bool:
    """Every weight code ±1 on fraction 0."""
    c = node.consts
    return bool(np.isin(c["weight"], (-1, 1)).all()
                and (np.asarray(c["weight_frac"]) == 0).all())


def bipolar_source(graph: QGraph, tensor: str) -> bool:
    """Whether ``tensor`` holds only ±1: a ``sign`` output, or one moved by ``reshape`` or
    ``maxpool2d`` (the maximum of ±1 values is ±1)."""
    producers = {n.output: n for n in graph.nodes}
    node = producers.get(tensor)
    while node is not None and node.op in ("reshape", "maxpool2d"):
        node = producers.get(node.inputs[0])
    return node is not None and node.op == "sign"


def is_binary_layer(graph: QGraph, node: Node) -> bool:
    """A dense/conv2d with ±1 inputs and ±1 weights: its products are XNORs."""
    return (node.op in ("dense", "conv2d") and has_binary_weights(node)
            and bipolar_source(graph, node.inputs[0]))


def fan_in(node: Node) -> int:
    """Products summed per output value."""
    return int(np.prod(node.consts["weight"].shape[1:]))


def ceillog2(x: int) -> int:
    """hls4ml's ``nnet::ceillog2`` (``nnet_helpers.h``): ceil(log2 x), but 1 for x <= 2.

    >>> [ceillog2(x) for x in (1, 2, 3, 4, 5, 54, 64, 65)]
    [1, 1, 2, 2, 3, 6, 6, 7]
    """
    return 1 if x <= 2 else 1 + ceillog2((x + 1) // 2)


def result_bits(n: int) -> int:
    """Width of the ``ap_int`` that hls4ml's result conversion of an XNOR layer of fan-in
    n returns: ``ceillog2(n) + 2`` (``nnet_mult.h``)."""
    return ceillog2(n) + 2


def xnor_problem(node: Node) -> str:
    """Why this ±1-input layer cannot take hls4ml's XNOR form ('' when it can)."""
    if node.op not in ("dense", "conv2d"):
        return f"op {node.op!r} reads it"
    if not has_binary_weights(node):
        return "its weights are not all ±1"
    if node.op == "dense":
        return ""
    a = node.attrs
    if any(int(p) for p in a["padding"]):
        return "zero padding reads as -1 in hls4ml's {0, 1} encoding"
    if int(a["groups"]) != 1:
        return "hls4ml has no binary grouped convolution"
    if tuple(a["dilation"]) != (1, 1):
        return "dilation"
    if "bias" in node.consts:
        bias = np.asarray(node.consts["bias"], dtype=np.int64)
        frac = np.asarray(node.consts["bias_frac"], dtype=np.int64)
        if (frac > 0).any():
            return "its bias has fractional bits"
        bias = bias << -frac
        n, top = fan_in(node), 2 ** (result_bits(fan_in(node)) - 1)
        if int(bias.min(initial=0)) - n < -top or int(bias.max(initial=0)) + n >= top:
            return "its bias is too large for hls4ml's XNOR result type"
    return ""


def xnor_tensors(graph: QGraph) -> frozenset[str]:
    """The tensors hls4ml holds in its binary {0, 1} type: ``sign`` outputs whose every
    reader (through flattening reshapes) is a binary layer in XNOR form, and those
    reshapes' outputs."""
    readers = graph.consumers()
    out: set[str] = set()
    for node in graph.nodes:
        if node.op != "sign":
            continue
        chain, todo, ok = [node.output], [node.output], True
        while todo and ok:
            tensor = todo.pop()
            users = readers.get(tensor, [])
            ok = tensor != graph.output and bool(users)
            for user in users:
                if user.op == "reshape":
                    chain.append(user.output)
                    todo.append(user.output)
                else:
                    ok = ok and not xnor_problem(user)
        if ok:
            out.update(chain)
    return frozenset(out)


def xnor_bias(node: Node) -> tuple[np.ndarray | None, FixedType | None]:
    """A binary convolution's bias as hls4ml adds it, to the match count before doubling:
    bias / 2 (real values) and its exact type, or (None, None) without a bias."""
    if "bias" not in node.consts:
        return None, None
    codes = np.asarray(node.consts["bias"], dtype=np.int64) << -np.asarray(
        node.consts["bias_frac"], dtype=np.int64)
    return np.ldexp(codes.astype(np.float64), -1), type_for_range(
        min(int(codes.min()), 0), max(int(codes.max()), 0), 1)


def popcount_type(node: Node) -> FixedType:
    """``accum_t`` of an XNOR layer: the match count 0..n, plus bias / 2 for a conv (a
    dense layer's bias is a separate hls4ml layer)."""
    n = fan_in(node)
    _, bias_t = xnor_bias(node) if node.op == "conv2d" else (None, None)
    if bias_t is None:
        return type_for_range(0, n, 0)
    return type_for_range(min(bias_t.qmin, 0), max(bias_t.qmax, 0) + 2 * n, 1)
