"""Emulator steps of the transformer ops and token ops (``docs/qgraph.md``).

``softmax``, ``layernorm`` and ``gelu`` call the numpy twins' kernels
(:mod:`qflow.numerics.transformer`) on int64 codes in every arithmetic: a float
arithmetic converts its integer-valued input to int64 and the output codes back, both
exact (every code fits the format, :func:`qflow.graph.infer.float_bounds`). ``matmul``
multiplies in the arithmetic's dtype (exact: ``float_bounds`` bounds every partial sum
by K · max|a| · max|b|); under int64 it takes a float64 BLAS product where that bound is
below 2**53, else an integer one. The token ops move codes (``transpose``, ``slice``),
offset them by an aligned constant (``add_const``) or sum them along an axis and
multiply by the reciprocal code (``mean``), as the other ops do.

Each builder has the emulator's signature ``(emulator, node, in_place, fold) ->
function``; the emulator checks every node with :func:`qflow.graph.transformer.check_node`
first.
"""

from __future__ import annotations

import numpy as np

from qflow.numerics.transformer import gelu_kernel, layernorm_kernel, softmax_kernel

from . import transformer as tr


def _ints(em, kernel):
    """Run an int64 kernel in the emulator's arithmetic: exact conversions around it."""
    if not em.float_mode:
        return kernel
    dtype = em.dtype
    return lambda x: kernel(x.astype(np.int64)).astype(dtype)


def _info(em, name: str):
    return em.graph.tensors[name]


def build_softmax(em, node, in_place: bool, fold: float):
    widths = tr.softmax_rule(node, _info(em, node.inputs[0]), em._type(node.output))
    axis = 1 + int(node.attrs["axis"])  # the batch comes first
    return _ints(em, lambda q: softmax_kernel(q, widths, axis, np))


def build_layernorm(em, node, in_place: bool, fold: float):
    x = _info(em, node.inputs[0])
    widths = tr.layernorm_rule(node, x, em._type(node.output))
    axis = 1 + int(node.attrs["axis"])
    gamma, _, beta, _ = tr.layernorm_params(node, widths.row_length)
    return _ints(em, lambda q: layernorm_kernel(q, gamma, beta, widths, axis, np))


def build_gelu(em, node, in_place: bool, fold: float):
    widths = tr.gelu_rule(node, _info(em, node.inputs[0]), em._type(node.output))
    return _ints(em, lambda q: gelu_kernel(q, widths, np))


def build_matmul(em, node, in_place: bool, fold: float):
    a, b = (_info(em, name) for name in node.inputs)
    _, depth, _ = tr.matmul_dims(node, a, b)
    transpose_b = bool(node.attrs["transpose_b"])
    dtype = em.dtype
    if not em.float_mode:
        bound = depth * max(-a.type.qmin, a.type.qmax) * max(-b.type.qmin, b.type.qmax)
        dtype = np.float64 if bound < 2**53 else np.int64

    def matmul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if transpose_b:
            y = np.swapaxes(y, -1, -2)
        out = np.matmul(x.astype(dtype, copy=False), y.astype(dtype, copy=False))
        return out if out.dtype == em.dtype else out.astype(em.dtype)

    return matmul


def build_transpose(em, node, in_place: bool, fold: float):
    perm = (0, *(1 + p for p in tr.transpose_perm(node, len(_info(em, node.inputs[0]).shape))))
    return lambda x: np.ascontiguousarray(x.transpose(perm))


def build_slice(em, node, in_place: bool, fold: float):
    axis, start, stop = tr.slice_bounds(node, _info(em, node.inputs[0]).shape)
    index = (slice(None),) * (1 + axis) + (slice(start, stop),)
    return lambda x: np.ascontiguousarray(x[index])


def build_add_const(em, node, in_place: bool, fold: float):
    x = _info(em, node.inputs[0])
    value, value_frac = tr.add_const_value(node, x)
    frac = em._type(node.output).fractional
    scale = em.dtype(1 << (frac - x.type.fractional))
    offset = (value << (frac - value_frac)).astype(em.dtype)

    def add_const(q: np.ndarray) -> np.ndarray:
        y = np.multiply(q, scale, out=q if in_place else None)
        y += offset
        return y

    return add_const


def build_mean(em, node, in_place: bool, fold: float):
    axis = 1 + int(node.attrs["axis"])
    recip = em.dtype(int(np.asarray(node.consts["reciprocal"]).reshape(-1)[0]))
    return lambda x: x.sum(axis=axis) * recip


BUILDERS = {
    "softmax": build_softmax,
    "layernorm": build_layernorm,
    "gelu": build_gelu,
    "matmul": build_matmul,
    "transpose": build_transpose,
    "slice": build_slice,
    "add_const": build_add_const,
    "mean": build_mean,
}
