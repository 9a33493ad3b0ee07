"""Shapes, types and width rules of the QGraph's transformer ops and token ops.

The transformer ops (``softmax``, ``layernorm``, ``gelu``, ``matmul``) are the integer ops
of ``docs/transformer_ops.md``; the token ops (``transpose``, ``slice``, ``add_const``,
``mean``) move, select, offset and average codes. ``docs/qgraph.md`` gives each op's
exact semantics. This module checks a node against them once (attributes, shapes, the
width rule of :mod:`qflow.numerics.transformer`) for the emulator and every exporter,
and gives the exact result type of the arithmetic ones (``matmul``, ``add_const``,
``mean``), as :mod:`qflow.graph.infer` does for the other ops. Errors are
:class:`QGraphError` naming the node and op.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qflow.numerics import FixedType
from qflow.numerics.transformer import (
    GeluWidths,
    LayerNormWidths,
    SoftmaxWidths,
    check_codes,
    gelu_widths,
    layernorm_widths,
    matmul_accumulator_type,
    softmax_widths,
)

from .infer import infer_pool_sum, type_for_range
from .ir import Node, QGraphError, TensorInfo

#: the integer transformer ops of docs/transformer_ops.md
TRANSFORMER_OPS = ("softmax", "layernorm", "gelu", "matmul")
#: ops that move, select, offset or average the codes of token tensors
TOKEN_OPS = ("transpose", "slice", "add_const", "mean")
#: ops whose output type is declared (they end with a cast to it), not derived
DECLARED_TYPE_OPS = ("softmax", "layernorm", "gelu")


def fail(node: Node, reason: str):
    raise QGraphError(f"node {node.name!r} (op {node.op!r}): {reason}")


def _int(node: Node, key: str) -> int:
    value = node.attrs.get(key)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        fail(node, f"attribute {key!r} must be an integer, got {value!r}")
    return int(value)


def axis_of(node: Node, rank: int) -> int:
    """The node's per-sample ``axis`` attribute (batch excluded), in ``[0, rank)``."""
    axis = _int(node, "axis")
    if not 0 <= axis < rank:
        fail(node, f"axis {axis} is outside the per-sample rank {rank} (batch excluded, "
                   "counted from 0)")
    return axis


def _one_type(node: Node, key: str) -> FixedType:
    try:
        return FixedType.parse(node.attrs[key])
    except (KeyError, TypeError, ValueError) as exc:
        fail(node, f"attribute {key!r} is not a fixed-point type ({exc})")


def _widths(node: Node, rule, *args):
    try:
        return rule(*args)
    except ValueError as exc:
        fail(node, str(exc))


# -- the transformer ops ---------------------------------------------------------------
def softmax_rule(node: Node, x: TensorInfo, out_type: FixedType) -> SoftmaxWidths:
    """The checked widths of a ``softmax`` node (its rows run along ``axis``)."""
    axis = axis_of(node, len(x.shape))
    return _widths(node, softmax_widths, x.type, out_type, x.shape[axis])


def layernorm_params(node: Node, length: int) -> tuple[np.ndarray, FixedType, np.ndarray,
                                                       FixedType]:
    """(gamma codes, gamma type, beta codes, beta type) of a ``layernorm`` node: each one
    value, or ``length`` values (one per element of a row), as int64 vectors."""
    out = []
    for key in ("gamma", "beta"):
        codes = np.asarray(node.consts[key], dtype=np.int64).reshape(-1)
        t = _one_type(node, f"{key}_type")
        if codes.size not in (1, length):
            fail(node, f"{key} holds {codes.size} values: one, or one per element of a row "
                       f"({length})")
        try:
            check_codes(codes, t, key)
        except ValueError as exc:
            fail(node, str(exc))
        out += [codes, t]
    return tuple(out)


def layernorm_rule(node: Node, x: TensorInfo, out_type: FixedType) -> LayerNormWidths:
    axis = axis_of(node, len(x.shape))
    _, gamma_t, _, beta_t = layernorm_params(node, x.shape[axis])
    return _widths(node, layernorm_widths, x.type, gamma_t, beta_t, out_type, x.shape[axis])


def gelu_rule(node: Node, x: TensorInfo, out_type: FixedType) -> GeluWidths:
    return _widths(node, gelu_widths, x.type, out_type)


def matmul_dims(node: Node, a: TensorInfo, b: TensorInfo) -> tuple[int, int, int]:
    """(M, K, N) of ``a @ b`` (``b`` transposed first when ``transpose_b``): per-sample
    operands of rank 2 or more whose leading dimensions are equal."""
    transpose_b = node.attrs.get("transpose_b")
    if not isinstance(transpose_b, bool):
        fail(node, f"attribute 'transpose_b' must be true or false, got {transpose_b!r}")
    if len(a.shape) < 2 or len(a.shape) != len(b.shape) or a.shape[:-2] != b.shape[:-2]:
        fail(node, f"operands of shapes {a.shape} and {b.shape} are not two matrices (or "
                   "stacks of matrices with equal leading dimensions)")
    m, k = a.shape[-2:]
    kb, n = b.shape[-1:-3:-1] if transpose_b else b.shape[-2:]
    if k != kb:
        fail(node, f"inner dimensions differ: {a.shape} @ {b.shape}"
                   f"{' transposed' if transpose_b else ''}")
    return m, k, n


def matmul_type(node: Node, a: TensorInfo, b: TensorInfo) -> FixedType:
    """The exact accumulator type of ``a @ b`` (:func:`matmul_accumulator_type`)."""
    _, k, _ = matmul_dims(node, a, b)
    return _widths(node, matmul_accumulator_type, a.type, b.type, k)


# -- the token ops -----------------------------------------------------------------------
def transpose_perm(node: Node, rank: int) -> list[int]:
    perm = node.attrs.get("perm")
    if not isinstance(perm, Sequence) or sorted(int(p) for p in perm) != list(range(rank)):
        fail(node, f"perm {perm!r} is not a permutation of the {rank} per-sample axes")
    return [int(p) for p in perm]


def slice_bounds(node: Node, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(axis, start, stop) of a ``slice`` node: ``0 <= start < stop <= shape[axis]``."""
    axis = axis_of(node, len(shape))
    start, stop = _int(node, "start"), _int(node, "stop")
    if not 0 <= start < stop <= shape[axis]:
        fail(node, f"slice [{start}, {stop}) is empty or outside axis {axis} of length "
                   f"{shape[axis]}")
    return axis, start, stop


def add_const_value(node: Node, x: TensorInfo) -> tuple[np.ndarray, int]:
    """The constant (the input's per-sample shape) and its fractional bits."""
    value = np.asarray(node.consts["value"], dtype=np.int64)
    if value.shape != tuple(x.shape):
        fail(node, f"value has shape {value.shape}, the input's per-sample shape is {x.shape}")
    return value, _int(node, "value_frac")


def add_const_type(node: Node, x: TensorInfo) -> FixedType:
    """``(x << (f - f_x)) + (value << (f - value_frac))`` at the finer fraction: the
    narrowest type holding the sum for every code of ``x``."""
    value, vfrac = add_const_value(node, x)
    frac = max(x.type.fractional, vfrac)
    kx, kv = 2 ** (frac - x.type.fractional), 2 ** (frac - vfrac)
    v = value.astype(object) * kv
    return type_for_range(x.type.qmin * kx + int(v.min()), x.type.qmax * kx + int(v.max()),
                          frac)


def mean_type(node: Node, x: TensorInfo) -> FixedType:
    """The sum along ``axis`` times the reciprocal code (as ``global_avgpool2d``)."""
    axis = axis_of(node, len(x.shape))
    recip = np.asarray(node.consts["reciprocal"]).reshape(-1)
    if recip.size != 1 or int(recip[0]) < 0:
        fail(node, "reciprocal must be one non-negative code")
    return infer_pool_sum(x.type, x.shape[axis], int(recip[0]), _int(node, "reciprocal_frac"))


# -- every op of this module ----------------------------------------------------------------
def output_info(node: Node, inputs: list[TensorInfo],
                declared: FixedType | None = None) -> tuple[tuple[int, ...], FixedType]:
    """(per-sample shape, type) of the output of a transformer or token op.

    The types of ``softmax``, ``layernorm`` and ``gelu`` are declared (``declared``; the
    width rule must accept it); ``transpose`` and ``slice`` keep their input's type; the
    others get their exact result type."""
    x = inputs[0]
    shape = tuple(x.shape)
    if node.op in DECLARED_TYPE_OPS:
        if declared is None:
            fail(node, "needs a declared output type")
        rule = {"softmax": softmax_rule, "layernorm": layernorm_rule, "gelu": gelu_rule}
        rule[node.op](node, x, declared)
        return shape, declared
    if node.op == "matmul":
        m, _, n = matmul_dims(node, *inputs)
        return (*shape[:-2], m, n), matmul_type(node, *inputs)
    if node.op == "transpose":
        return tuple(shape[p] for p in transpose_perm(node, len(shape))), x.type
    if node.op == "slice":
        axis, start, stop = slice_bounds(node, shape)
        return (*shape[:axis], stop - start, *shape[axis + 1:]), x.type
    if node.op == "add_const":
        return shape, add_const_type(node, x)
    if node.op == "mean":
        axis = axis_of(node, len(shape))
        return (*shape[:axis], *shape[axis + 1:]), mean_type(node, x)
    fail(node, "not a transformer or token op")


def check_node(graph, node: Node) -> None:
    """Refuse a transformer or token node whose declared output disagrees with its op:
    the shape must be the op's, the type the op's exact type (``matmul``, ``mean``:
    with its fraction; ``add_const``: holding every value at a fraction no coarser than
    its terms'; ``transpose``, ``slice``: the input's) or, for the declared-type ops, one
    the width rule accepts."""
    inputs = [graph.tensors[name] for name in node.inputs]
    out = graph.tensors[node.output]
    shape, needed = output_info(node, inputs, out.type)
    if tuple(out.shape) != shape:
        fail(node, f"declared shape {tuple(out.shape)} differs from the op's {shape}")
    t = out.type
    if node.op in ("transpose", "slice") and t != needed:
        fail(node, f"type {t.to_ap()} must be its input's ({needed.to_ap()})")
    if node.op in ("matmul", "mean") and t.fractional != needed.fractional:
        fail(node, f"type {t.to_ap()} has {t.fractional} fractional bits, the products "
                   f"need {needed.fractional}")
    shift = t.fractional - needed.fractional
    if shift < 0 or t.qmin > needed.qmin << shift or t.qmax < needed.qmax << shift:
        fail(node, f"declared type {t.to_ap()} does not hold its values ({needed.to_ap()})")
