"""Exact output types of QGraph nodes: each result gets a type wide enough to hold every
value its inputs' types allow, so no arithmetic node can overflow or lose bits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qflow.numerics import MAX_WIDTH, FixedType

from .ir import Node, QGraphError

#: the bipolar type of a ``sign`` output: ``ap_fixed<2,2>``, codes -1 and +1, no fraction
BIPOLAR = FixedType(signed=True, integer=1, fractional=0)


def type_for_range(lo: int, hi: int, fractional: int) -> FixedType:
    """The narrowest type with ``fractional`` bits whose codes cover ``[lo, hi]``.

    Accumulator types use the HLS defaults TRN/WRAP: nothing is ever rounded or wrapped
    in them, since they hold every possible value.
    """
    lo, hi = int(lo), int(hi)
    signed = lo < 0
    if signed:
        width = max(hi.bit_length(), (-lo - 1).bit_length()) + 1
    else:
        width = max(hi.bit_length(), 1)
    if width > MAX_WIDTH:
        raise QGraphError(f"a result needs {width} bits, more than the {MAX_WIDTH} qflow supports")
    return FixedType(signed=signed, integer=width - int(signed) - fractional,
                     fractional=fractional)


def _code_range(t: FixedType) -> tuple[int, int]:
    return t.qmin, t.qmax


def _obj(a) -> np.ndarray:
    """Python-int arrays: bound sums of wide products must not overflow."""
    return np.asarray(a).astype(object)


def aligned_weights(weight, weight_frac, in_frac: int, out_frac: int) -> np.ndarray:
    """Weight codes shifted per output channel so that every product has ``out_frac`` bits."""
    shift = out_frac - (in_frac + np.asarray(weight_frac))
    if (shift < 0).any():
        raise QGraphError("output fraction is narrower than a product fraction")
    shape = (-1,) + (1,) * (np.ndim(weight) - 1)
    return _obj(weight) * (2 ** _obj(shift)).reshape(shape)


def aligned_bias(bias, bias_frac, out_frac: int) -> np.ndarray:
    shift = out_frac - np.asarray(bias_frac)
    if (shift < 0).any():
        raise QGraphError("output fraction is narrower than the bias fraction")
    return _obj(bias) * (2 ** _obj(shift))


def accumulator_frac(in_frac: int, weight_frac, bias_frac=None) -> int:
    frac = int(in_frac + np.max(weight_frac))
    if bias_frac is not None:
        frac = max(frac, int(np.max(bias_frac)))
    return frac


def _weighted_sum_range(weight_rows: np.ndarray, lo: int, hi: int, offset) -> tuple[int, int]:
    """Min and max over channels of sum_j w_cj * x_j + offset_c with x_j in [lo, hi]."""
    a, b = weight_rows * lo, weight_rows * hi
    top = np.maximum(a, b).sum(axis=1) + offset
    bottom = np.minimum(a, b).sum(axis=1) + offset
    return int(bottom.min()), int(top.max())


def infer_weighted(node: Node, in_type: FixedType) -> FixedType:
    """Type of a dense or conv2d accumulator."""
    c = node.consts
    bias = c.get("bias")
    bias_frac = c.get("bias_frac")
    frac = accumulator_frac(in_type.fractional, c["weight_frac"], bias_frac)
    w = aligned_weights(c["weight"], c["weight_frac"], in_type.fractional, frac)
    rows = w.reshape(w.shape[0], -1)
    offset = aligned_bias(bias, bias_frac, frac) if bias is not None else 0
    lo, hi = _weighted_sum_range(rows, *_code_range(in_type), offset)
    # zero padding adds zeros: include 0 in the range of every term
    return type_for_range(min(lo, 0) if node.op == "conv2d" else lo,
                          max(hi, 0) if node.op == "conv2d" else hi, frac)


def infer_scale_shift(node: Node, in_type: FixedType) -> FixedType:
    c = node.consts
    frac = max(int(in_type.fractional + np.max(c["scale_frac"])), int(np.max(c["shift_frac"])))
    scale = aligned_weights(c["scale"], c["scale_frac"], in_type.fractional, frac)
    shift = aligned_bias(c["shift"], c["shift_frac"], frac)
    lo, hi = _weighted_sum_range(scale.reshape(-1, 1), *_code_range(in_type), shift)
    return type_for_range(lo, hi, frac)


def infer_add(a: FixedType, b: FixedType) -> FixedType:
    frac = max(a.fractional, b.fractional)
    lo = a.qmin * 2 ** (frac - a.fractional) + b.qmin * 2 ** (frac - b.fractional)
    hi = a.qmax * 2 ** (frac - a.fractional) + b.qmax * 2 ** (frac - b.fractional)
    return type_for_range(lo, hi, frac)


def infer_concat(types: list[FixedType]) -> FixedType:
    """The type of a concatenation: its inputs' type when they all have one; otherwise
    the narrowest type holding every input's values (the finest fraction of any input,
    codes aligned to it), as for ``add``."""
    if all(t == types[0] for t in types):
        return types[0]
    frac = max(t.fractional for t in types)
    lo = min(t.qmin * 2 ** (frac - t.fractional) for t in types)
    hi = max(t.qmax * 2 ** (frac - t.fractional) for t in types)
    return type_for_range(lo, hi, frac)


def infer_relu(t: FixedType) -> FixedType:
    return type_for_range(0, max(t.qmax, 0), t.fractional)


def infer_sign(t: FixedType) -> FixedType:
    """``sign`` gives +1 or -1 whatever its input type: the bipolar type."""
    return BIPOLAR


def infer_pool_sum(t: FixedType, count: int, reciprocal: int, reciprocal_frac: int) -> FixedType:
    return type_for_range(min(t.qmin * count * reciprocal, 0), t.qmax * count * reciprocal,
                          t.fractional + reciprocal_frac)


# -- exactness of float arithmetic -----------------------------------------------------
@dataclass(frozen=True)
class FloatFormat:
    """A float dtype for integer codes: integers of magnitude below ``2**bits`` are exact,
    and so is scaling such an integer by ``2**k`` for ``|k| <= max_shift``."""

    dtype: type
    bits: int
    max_shift: int


#: float32 and float64 codes: the bound on exact integers, and the largest power-of-two
#: scaling exponent that neither overflows nor underflows a code
FLOAT32 = FloatFormat(np.float32, 24, 100)
FLOAT64 = FloatFormat(np.float64, 53, 900)


@dataclass(frozen=True)
class FloatBounds:
    """What a float arithmetic must hold exactly to run a graph (see :func:`float_bounds`)."""

    width: int  # widest tensor type, in bits
    peak: int  # largest magnitude of any value formed: code, partial sum, product
    shift: int  # largest |k| of a scaling by 2**k (casts, the input cast)

    def fits(self, fmt: FloatFormat) -> bool:
        # one bit of room below the format's integer bound, as for float64 so far
        return (self.width < fmt.bits and self.peak < 2**fmt.bits
                and self.shift <= fmt.max_shift)

    def describe(self) -> str:
        return (f"widest tensor {self.width} bits, values up to 2**{self.peak.bit_length()}, "
                f"scaling by up to 2**{self.shift}")


def _max_abs(t: FixedType) -> int:
    return max(-t.qmin, t.qmax)


def float_bounds(graph) -> FloatBounds:
    """Bounds on every value the emulator's float arithmetic forms for ``graph``.

    From the exact types: every tensor's codes lie in its type; each node's own values
    are :func:`node_float_bounds`; the input cast scales by 2**f_in.
    """
    tensors = graph.tensors
    width = max(t.type.width for t in tensors.values())
    peak = max(_max_abs(t.type) for t in tensors.values())
    shift = abs(graph.input_type.fractional)
    for node in graph.nodes:
        node_peak, node_shift = node_float_bounds(graph, node)
        peak, shift = max(peak, node_peak), max(shift, node_shift)
    return FloatBounds(width, peak, shift)


def node_float_bounds(graph, node) -> tuple[int, int]:
    """(largest magnitude, largest |k| of a scaling by 2**k) of the values ``node`` forms
    beyond its input and output codes.

    A dense/conv2d partial sum (any subset of products, in any order, as BLAS may add
    them) is at most max_c sum_j |w_cj| * max|x|, and adding the bias gives the
    accumulator, which is in its type; a scale_shift product is at most
    max|scale| * max|x|; an add, add_const or concat term is max|a| * 2**k; a pooling sum
    (and a mean's) is count * max|x|, times the reciprocal; a matmul partial sum is at
    most K * max|a| * max|b|. Casts scale by 2**(f_out - f_in).
    """
    tensors = graph.tensors
    in_t = tensors[node.inputs[0]].type
    out_t = tensors[node.output].type
    c = node.consts
    peak, shift = 0, 0
    if node.op in ("dense", "conv2d"):
        frac = accumulator_frac(in_t.fractional, c["weight_frac"], c.get("bias_frac"))
        w = aligned_weights(c["weight"], c["weight_frac"], in_t.fractional, frac)
        rows = np.abs(w.reshape(w.shape[0], -1)).sum(axis=1)
        peak = int(rows.max(initial=0)) * _max_abs(in_t)
    elif node.op == "scale_shift":
        scale = aligned_weights(c["scale"], c["scale_frac"], in_t.fractional, out_t.fractional)
        peak = int(np.abs(scale).max(initial=0)) * _max_abs(in_t)
    elif node.op in ("add", "concat"):
        for name in node.inputs:
            t = tensors[name].type
            peak = max(peak, _max_abs(t) << (out_t.fractional - t.fractional))
    elif node.op in ("avgpool2d", "global_avgpool2d"):
        shape = tensors[node.inputs[0]].shape
        count = (int(np.prod(node.attrs["kernel"])) if node.op == "avgpool2d"
                 else int(np.prod(shape[-2:])))
        peak = count * _max_abs(in_t) * max(1, int(c["reciprocal"]))
    elif node.op == "cast":
        shift = abs(out_t.fractional - in_t.fractional)
    elif node.op == "matmul":  # any partial sum of K products of two codes
        depth = tensors[node.inputs[0]].shape[-1]
        peak = depth * _max_abs(in_t) * _max_abs(tensors[node.inputs[1]].type)
    elif node.op == "mean":
        count = tensors[node.inputs[0]].shape[int(node.attrs["axis"])]
        peak = count * _max_abs(in_t) * max(1, int(c["reciprocal"]))
    elif node.op == "add_const":
        value = int(np.abs(c["value"]).max(initial=0))
        peak = max(_max_abs(in_t) << (out_t.fractional - in_t.fractional),
                   value << (out_t.fractional - int(node.attrs["value_frac"])))
    # sign: its codes are +-1, within the bipolar type's bound; softmax, layernorm and
    # gelu compute in int64 whatever the arithmetic (their codes in and out are counted
    # with the tensors); transpose and slice move codes
    return peak, shift
