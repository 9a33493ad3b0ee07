"""``freeze`` for the transformer layers (:mod:`qflow.nn.transformer`) and the token moves
of a forward (``transpose``, ``permute``, basic slicing).

Each layer becomes the QGraph nodes of its forward pass, in the same order: the casts of
its inputs to its input quantizers' types (left out where a tensor has that type
already: such a cast is exact), then the op (``layernorm``, ``gelu``, ``softmax``,
``matmul``, ``add_const``, ``mean``), then, for ``add_const`` and ``mean``, the cast to
the output quantizer's type; ``softmax``, ``layernorm`` and ``gelu`` end in their
declared output type. Token moves become ``transpose`` and ``slice`` nodes (an integer
index is a one-element ``slice`` and a ``reshape`` that drops the axis). Shapes and types
are checked by :func:`qflow.graph.transformer.output_info`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from qflow.errors import QflowError
from qflow.nn.elementwise import RECIPROCAL_TYPE
from qflow.nn.transformer import QGELU, QAddConst, QLayerNorm, QMatmul, QMean, QSoftmax
from qflow.numerics import FixedType
from qflow.quantizers import FixedQuantizer

from . import transformer as tr
from .ir import Node


@dataclass(frozen=True)
class Param:
    """A parameter or buffer of the model read in a forward (an fx ``get_attr`` node)."""

    value: torch.Tensor
    target: str


def _fail(label: str, reason: str):
    from .from_torch import FreezeError

    raise FreezeError(f"{label}: {reason}")


def _codes(values: torch.Tensor, t: FixedType, where: str) -> np.ndarray:
    v = values.detach().to(torch.float64).cpu().numpy()
    scaled = np.ldexp(v, t.fractional)
    codes = np.rint(scaled)
    if not np.array_equal(codes, scaled):
        _fail(where, "quantized values are not on their fixed-point grid")
    return codes.astype(np.int64)


def cast_to(b, name: str, src: str, quant: FixedQuantizer, source: str) -> str:
    """``src`` cast to ``quant``'s type; ``src`` itself when it has that type already."""
    t = quant.fixed_type()
    if b.type_of(src) == t:
        return src
    return b.add("cast", name, [src], b.shape_of(src), t, source=source)


def _op(b, op: str, name: str, inputs: list[str], shape, declared=None, *, attrs=None,
        consts=None, source: str = "") -> str:
    """Add a transformer or token node, its type (and shape) from ``output_info``."""
    attrs, consts = attrs or {}, consts or {}
    probe = Node(op, name, inputs, name, attrs, consts)
    try:
        out_shape, t = tr.output_info(probe, [b.tensors[i] for i in inputs], declared)
    except QflowError as exc:
        _fail(f"node {name}", str(exc))
    if tuple(out_shape) != tuple(shape):
        _fail(f"node {name}", f"the QGraph op gives shape {out_shape}, the model {shape}")
    return b.add(op, name, inputs, shape, t, attrs=attrs, consts=consts, source=source)


def _axis(label: str, dim: int, rank: int) -> int:
    """A torch dim of a tensor with ``rank`` per-sample dims as a per-sample axis."""
    full = dim + rank + 1 if dim < 0 else dim
    if not 1 <= full <= rank:
        _fail(label, f"dim {dim} is not a per-sample dim of a {rank + 1}-D tensor")
    return full - 1


# -- the layers ------------------------------------------------------------------------------
def _freeze_layernorm(b, name, module: QLayerNorm, args, shape):
    weight, bias = (args[i].value if len(args) > i and isinstance(args[i], Param) else None
                    for i in (1, 2))
    x = cast_to(b, f"{name}_in", args[0], module.in_quant, name)
    with torch.no_grad():
        gamma, gamma_t, beta, beta_t = module.quantized_gamma_beta(torch.float64, weight, bias)
    consts = {"gamma": _codes(gamma.reshape(-1), gamma_t, f"{name}.gamma"),
              "beta": _codes(beta.reshape(-1), beta_t, f"{name}.beta")}
    attrs = {"axis": len(shape) - 1, "gamma_type": gamma_t.to_ap(), "beta_type": beta_t.to_ap()}
    return _op(b, "layernorm", name, [x], shape, module.out_quant.fixed_type(), attrs=attrs,
               consts=consts, source=name)


def _freeze_gelu(b, name, module: QGELU, args, shape):
    x = cast_to(b, f"{name}_in", args[0], module.in_quant, name)
    return _op(b, "gelu", name, [x], shape, module.out_quant.fixed_type(), source=name)


def _freeze_softmax(b, name, module: QSoftmax, args, shape):
    x = cast_to(b, f"{name}_in", args[0], module.in_quant, name)
    axis = _axis(f"node {name}", module.dim, len(shape))
    return _op(b, "softmax", name, [x], shape, module.out_quant.fixed_type(),
               attrs={"axis": axis}, source=name)


def _freeze_matmul(b, name, module: QMatmul, args, shape):
    x = cast_to(b, f"{name}_a", args[0], module.a_quant, name)
    y = cast_to(b, f"{name}_b", args[1], module.b_quant, name)
    return _op(b, "matmul", name, [x, y], shape, attrs={"transpose_b": False}, source=name)


def _freeze_add_const(b, name, module: QAddConst, args, shape):
    param = args[1]
    if not isinstance(param, Param):
        _fail(f"node {name}", "the constant is not a parameter or buffer of the model")
    with torch.no_grad():
        value = module.value_quant(param.value.to(torch.float64))
    t = module.value_quant.fixed_type()
    per_sample = torch.broadcast_to(value, (1, *shape))[0]
    consts = {"value": _codes(per_sample, t, f"{name}.{param.target}")}
    out = _op(b, "add_const", name, [args[0]], shape, attrs={"value_frac": t.fractional},
              consts=consts, source=name)
    return b.cast(name, out, module.out_quant, name)


def _freeze_mean(b, name, module: QMean, args, shape):
    from .from_torch import _reciprocal_code

    src = args[0]
    in_shape = b.shape_of(src)
    axis = _axis(f"node {name}", module.dim, len(in_shape))
    recip = _reciprocal_code(in_shape[axis])
    reduced = in_shape[:axis] + in_shape[axis + 1:]
    out = _op(b, "mean", name, [src], reduced, attrs={
        "axis": axis, "reciprocal_frac": RECIPROCAL_TYPE.fractional},
        consts={"reciprocal": np.array(recip, dtype=np.int64)}, source=name)
    out = b.cast(name, out, module.out_quant, name)
    if tuple(shape) != tuple(reduced):  # keepdim
        out = b.add("reshape", f"{name}_keepdim", [out], shape, b.type_of(out),
                    attrs={"shape": list(shape)}, source=name)
    return out


MODULE_FREEZERS = {
    QLayerNorm: _freeze_layernorm,
    QGELU: _freeze_gelu,
    QSoftmax: _freeze_softmax,
    QMatmul: _freeze_matmul,
    QAddConst: _freeze_add_const,
    QMean: _freeze_mean,
}


def freeze_module(b, name: str, module, args, shape) -> str | None:
    """The output tensor of a transformer layer; None for another module."""
    freezer = MODULE_FREEZERS.get(type(module))
    return None if freezer is None else freezer(b, name, module, args, shape)


# -- token moves -------------------------------------------------------------------------------
def is_move(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("transpose", "permute")) or (
        node.op == "call_function" and node.target in (torch.transpose, torch.permute,
                                                       operator.getitem))


def _transpose(b, node: fx.Node, src: str, shape, label: str) -> str:
    rank = len(b.shape_of(src))
    if node.target in ("transpose", torch.transpose):
        dims = [node.args[1], node.args[2]] if len(node.args) == 3 else [
            node.kwargs.get("dim0"), node.kwargs.get("dim1")]
        a, c = (_axis(label, int(d), rank) for d in dims)
        perm = list(range(rank))
        perm[a], perm[c] = perm[c], perm[a]
    else:
        dims = node.args[1:] if len(node.args) > 2 or not isinstance(
            node.args[1] if len(node.args) > 1 else None, list | tuple) else node.args[1]
        dims = list(dims) or list(node.kwargs.get("dims", ()))
        full = [int(d) + rank + 1 if int(d) < 0 else int(d) for d in dims]
        if sorted(full) != list(range(rank + 1)) or full[0] != 0:
            _fail(label, f"permute{tuple(dims)} must keep the batch dim 0 first")
        perm = [d - 1 for d in full[1:]]
    if perm == list(range(rank)):
        return src
    return _op(b, "transpose", node.name, [src], shape, attrs={"perm": perm}, source=node.name)


def _slice(b, node: fx.Node, src: str, shape, label: str) -> str:
    index = node.args[1]
    in_shape = list(b.shape_of(src))
    rank = len(in_shape)
    items = list(index[1:])  # index[0] is the batch's slice(None) (checked by quantize_)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (rank - len(items) + 1)
    if len(items) > rank or any(not isinstance(i, int | slice) for i in items):
        _fail(label, f"index {index!r}: only integers and slices of per-sample dims")
    out, current = src, list(in_shape)
    for axis, item in enumerate(items):
        if isinstance(item, int):
            start = item + in_shape[axis] if item < 0 else item
            stop = start + 1
        else:
            start, stop, step = item.indices(in_shape[axis])
            if step != 1:
                _fail(label, f"index {index!r}: slices with a step are not supported")
            if (start, stop) == (0, in_shape[axis]):
                continue
        if not 0 <= start < stop <= in_shape[axis]:
            _fail(label, f"index {index!r} selects nothing along axis {axis}")
        current[axis] = stop - start
        out = _op(b, "slice", f"{node.name}_{axis}" if len(items) > 1 else node.name, [out],
                  tuple(current), attrs={"axis": axis, "start": start, "stop": stop},
                  source=node.name)
    if tuple(current) != tuple(shape):  # integer indices drop their axes
        out = b.add("reshape", f"{node.name}_drop", [out], shape, b.type_of(out),
                    attrs={"shape": list(shape)}, source=node.name)
    return out


def freeze_move(b, node: fx.Node, src: str, shape, label: str) -> str:
    """A transpose, permute or slicing of a frozen tensor ``src``."""
    if node.target is operator.getitem:
        index = node.args[1]
        if not isinstance(index, tuple) or not index or index[0] != slice(None):
            _fail(label, f"index {index!r} selects along the batch dim")
        return _slice(b, node, src, shape, label)
    return _transpose(b, node, src, shape, label)
