"""Integer ONNX routes of the transformer ops and token ops (``docs/qgraph.md``).

Each op follows its specification (``docs/transformer_ops.md``) step by step in int64
ONNX; the pieces that are array code in :mod:`qflow.numerics.transformer` (the exp of
softmax, the leading-zero count and the square root of LayerNorm, the final cast) are
those functions themselves, traced onto ONNX values (:class:`TSym`, as the casts trace
``qflow.numerics.kernel``). The spec bounds every intermediate below 2**62, so int64
never wraps; the extra values the lowering forms (the products of a floor division's
correction, the powers of two of a shift) are no larger. Integer arithmetic in ONNX and
how each piece is made exact:

- ``x >> k`` (floor, any sign) for a constant k: ``(x - Mod(x, 2**k)) / 2**k``, an exact
  ``Div``; ``x << k``: ``Mul`` by 2**k. ``BitShift`` is not used (unsigned types only).
- a shift by a tensor amount s (0 <= s <= 62: the exp's ``>> n``, LayerNorm's ``<< t``):
  2**s from ``Gather`` on a table of the 63 powers of two, then ``Mul``, or the floor
  division below.
- ``a // d`` with d > 0 (the one division per row of softmax and LayerNorm, and the
  shifts by a tensor): ``q = Div(a, d)`` (ONNX Runtime truncates toward zero), then
  ``q - 1`` where ``a - q·d < 0``: the floor for either sign of ``a``, and nothing changes
  where ``Div`` already floors.
- ``x & (2**k - 1)``: ``Mod(x, 2**k)`` (fmod=0: in [0, 2**k), two's complement's bits).
- comparisons ``Less``/``Greater``/``Equal`` (``>=`` and ``!=`` through ``Not``), ``Where``,
  ``Abs``; row maxima and sums ``ReduceMax``/``ReduceSum`` (int64, keepdims).

Routes per op:

- ``softmax``: ``ReduceMax`` along the axis, d = max - q, the exp codes
  (``exp_codes``: ``Mul`` by log2(e), shifts, the quadratic, a shift by the integer part),
  ``ReduceSum``, ``2**K // S`` once per row, ``Mul``, the final cast (``shift_requantize``).
- ``layernorm``: ``ReduceSum`` of q and of q·q, V = N·Σq² - T², c = N·q - T, the
  leading-zero count t of V as the 6 comparisons of ``bit_length``, V·4**t, the 31-step
  square root (``isqrt_steps``), ``2**K // s`` once per row, the normalised value rounded
  half away from zero, ``Mul`` by gamma, ``Add`` of the aligned beta, the final cast.
- ``gelu``: ``Abs``, the shift (or clamp and left shift) to 12 fractional bits, the clip
  ``Where``, 591·gap², ``Where`` on the sign, ``Mul`` by q, the final cast.
- ``matmul``: ``MatMulInteger`` on uint8 operands (signed codes offset by 128, zero
  point 128, as ``dense``) when both operands are 8-bit codes and the depth is at most
  ``MAX_FAN_IN``; otherwise int64 ``MatMul``, refused when K · max|a| · max|b| could reach
  2**63. ``Transpose`` of the second operand first when ``transpose_b``.
- ``transpose``: ``Transpose`` (batch kept first); ``slice``: ``Slice``; ``add_const``:
  ``Mul`` by 2**k and ``Add`` of the aligned constant; ``mean``: ``ReduceSum`` along the
  axis (keepdims 0), ``Mul`` by the reciprocal code.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from qflow.graph import transformer as tr
from qflow.graph.ir import Node, QGraph, QGraphError
from qflow.numerics.transformer import (
    GELU_CLIP_CODE,
    GELU_CURVE_CODE,
    GELU_FACTOR_FRAC_BITS,
    INT_LIMIT_BITS,
    _along,
    bit_length,
    exp_codes,
    isqrt_steps,
    shift_requantize,
)

from .int_onnx_ops import INT64_LIMIT, Builder, OnnxXp, Sym, _fail, _int32_safe, _to_u8, _u8_operand


def rule(node: Node, check, *args):
    """A ``qflow.graph.transformer`` rule; its refusal becomes the exporter's, naming the
    node."""
    try:
        return check(node, *args)
    except QGraphError as exc:
        _fail(node, str(exc).split("): ", 1)[-1])


class TSym(Sym):
    """:class:`Sym` with what the transformer kernels use besides: shifts by constants and
    by tensors, masks, floor division, negation, ``>=``, ``!=`` and numpy constants."""

    def _arg(self, other) -> str:
        if isinstance(other, np.ndarray):
            return self.b.const(other.astype(np.int64))
        return super()._arg(other)

    def _new(self, name: str, is_bool: bool = False) -> TSym:
        return TSym(self.b, name, is_bool)

    def _pow2(self, amount: TSym) -> str:
        """2**amount for a tensor 0 <= amount <= 62: a ``Gather`` from a table."""
        table = self.b.const([1 << k for k in range(INT_LIMIT_BITS + 1)], label="pow2_table")
        return self.b.op("Gather", [table, amount.name], "pow2", axis=0)

    def floordiv(self, divisor: str) -> TSym:
        """floor(self / divisor) for a positive divisor (ONNX ``Div`` truncates)."""
        b = self.b
        quotient = b.op("Div", [self.name, divisor], "quotient")
        rest = b.op("Sub", [self.name, b.op("Mul", [quotient, divisor], "product")], "rest")
        low = b.op("Less", [rest, b.const(0)], "negative_rest")
        return self._new(b.op("Where", [low, b.op("Sub", [quotient, b.const(1)], "less"),
                                        quotient], "floordiv"))

    def __rshift__(self, amount):
        if isinstance(amount, TSym):
            return self.floordiv(self._pow2(amount))
        if amount == 0:
            return self
        p = self.b.const(1 << int(amount), label="pow2")
        rest = self.b.op("Mod", [self.name, p], "dropped", fmod=0)
        return self._new(self.b.op("Div", [self.b.op("Sub", [self.name, rest], "floor"), p],
                                   "shifted"))

    def __lshift__(self, amount):
        if isinstance(amount, TSym):
            return self._new(self.b.op("Mul", [self.name, self._pow2(amount)], "shl"))
        return self * (1 << int(amount)) if amount else self

    def __and__(self, other):
        if isinstance(other, Sym):
            return super().__and__(other)
        mask = int(other)
        if mask < 0 or mask & (mask + 1):
            raise ValueError(f"only masks 2**k - 1 are lowered, not {mask}")
        return self._new(self.b.op("Mod", [self.name, self.b.const(mask + 1)], "low_bits",
                                   fmod=0))

    def __rfloordiv__(self, numerator):
        return self._new(self.b.const(int(numerator), label="numerator")).floordiv(self.name)

    def __neg__(self):
        return self._int("Sub", 0, "negate", swap=True)

    def __ge__(self, other):
        return ~(self < other)

    def __ne__(self, other):
        return ~(self == other)


class TXp(OnnxXp):
    """The array namespace of the traced kernels (``where`` on any mix of values)."""

    @staticmethod
    def where(cond: TSym, a, q) -> TSym:
        return TSym(cond.b, cond.b.op("Where", [cond.name, cond._arg(a), cond._arg(q)]))

    @staticmethod
    def abs(q: TSym) -> TSym:
        return TSym(q.b, q.b.op("Abs", [q.name], "abs"))


def _reduce(b: Builder, op: str, x: TSym, axis: int) -> TSym:
    if op == "ReduceMax":  # opset 17: axes is an attribute of ReduceMax, an input of ReduceSum
        return TSym(b, b.op(op, [x.name], "row_max", axes=[axis], keepdims=1))
    return TSym(b, b.op(op, [x.name, b.const([axis])], "row_sum", keepdims=1))


def emit_softmax(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    widths = rule(node, tr.softmax_rule, g.tensors[node.inputs[0]], g.tensors[node.output].type)
    axis = 1 + int(node.attrs["axis"])
    q = TSym(b, x)
    exps = exp_codes(_reduce(b, "ReduceMax", q, axis) - q, widths.arg_shift, TXp)
    reciprocal = (1 << widths.reciprocal_frac) // _reduce(b, "ReduceSum", exps, axis)
    out = shift_requantize(exps * reciprocal, widths.reciprocal_frac, widths.out_type, TXp)
    return out.name, "ReduceMax, shift exp, ReduceSum, one Div per row (int64)"


def emit_layernorm(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    info = g.tensors[node.inputs[0]]
    widths = rule(node, tr.layernorm_rule, info, g.tensors[node.output].type)
    gamma, _, beta, _ = rule(node, tr.layernorm_params, widths.row_length)
    axis, ndim, n = 1 + int(node.attrs["axis"]), 1 + len(info.shape), widths.row_length
    gamma = _along(gamma, axis, ndim, n, "gamma")
    beta = _along(beta, axis, ndim, n, "beta")
    q = TSym(b, x)
    total = _reduce(b, "ReduceSum", q, axis)  # N * mean, never rounded
    spread = n * _reduce(b, "ReduceSum", q * q, axis) - total * total  # N**2 * variance
    centred = n * q - total
    norm_shift = (INT_LIMIT_BITS - bit_length(spread, TXp)) >> 1
    root = isqrt_steps(spread << (norm_shift * 2), TXp)
    root = TXp.where(root == 0, 1, root)
    reciprocal = (1 << widths.reciprocal_frac) // root
    drop = widths.reciprocal_frac - widths.norm_frac
    magnitude = ((TXp.abs(centred) << norm_shift) * reciprocal + (1 << (drop - 1))) >> drop
    norm = TXp.where(centred < 0, -magnitude, magnitude)
    result = norm * gamma + (beta << widths.beta_shift)
    out = shift_requantize(result, widths.norm_frac + widths.gamma_type.fractional,
                           widths.out_type, TXp)
    return out.name, "ReduceSum, integer variance, 31-step isqrt, one Div per row (int64)"


def emit_gelu(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    widths = rule(node, tr.gelu_rule, g.tensors[node.inputs[0]], g.tensors[node.output].type)
    q = TSym(b, x)
    magnitude = TXp.abs(q)
    if widths.arg_shift >= 0:
        arg = magnitude >> widths.arg_shift
    else:
        magnitude = TXp.where(magnitude > widths.arg_limit, widths.arg_limit, magnitude)
        arg = magnitude << -widths.arg_shift
    arg = TXp.where(arg > GELU_CLIP_CODE, GELU_CLIP_CODE, arg)
    gap = GELU_CLIP_CODE - arg
    tail = GELU_CURVE_CODE * gap * gap
    factor = TXp.where(q >= 0, (2 << GELU_FACTOR_FRAC_BITS) - tail, tail)
    out = shift_requantize(q * factor, widths.product_frac, widths.out_type, TXp)
    return out.name, "Abs, clip, 591·gap², Where, Mul (int64)"


def emit_matmul(b: Builder, g: QGraph, node: Node, xa: str, xb: str) -> tuple[str, str]:
    a, bt = (g.tensors[name] for name in node.inputs)
    _, depth, _ = rule(node, tr.matmul_dims, a, bt)
    if node.attrs["transpose_b"]:
        rank = 1 + len(bt.shape)
        xb = b.op("Transpose", [xb], "transpose_b",
                  perm=[*range(rank - 2), rank - 1, rank - 2])
    zps = [_u8_operand(t.type.qmin, t.type.qmax) for t in (a, bt)]
    if None not in zps and a.type.width <= 8 and bt.type.width <= 8 and _int32_safe(depth):
        (ua, za), (ub, zb) = (_to_u8(b, v, zp) for v, zp in zip((xa, xb), zps, strict=True))
        acc = b.op("MatMulInteger", [ua, ub, za, zb], "matmul")
        return b.op("Cast", [acc], "to_int64", to=TensorProto.INT64), "MatMulInteger(u8,u8)"
    bound = depth * max(-a.type.qmin, a.type.qmax) * max(-bt.type.qmin, bt.type.qmax)
    if bound >= INT64_LIMIT:
        _fail(node, "int64 partial sums could overflow")
    return b.op("MatMul", [xa, xb], "matmul"), "MatMul(int64)"


def emit_transpose(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    perm = rule(node, tr.transpose_perm, len(g.tensors[node.inputs[0]].shape))
    return b.op("Transpose", [x], "transpose", perm=[0, *(1 + p for p in perm)]), "Transpose"


def emit_slice(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    axis, start, stop = rule(node, tr.slice_bounds, g.tensors[node.inputs[0]].shape)
    out = b.op("Slice", [x, b.const([start]), b.const([stop]), b.const([1 + axis])], "slice")
    return out, "Slice"


def emit_add_const(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    info = g.tensors[node.inputs[0]]
    value, value_frac = rule(node, tr.add_const_value, info)
    frac = g.tensors[node.output].type.fractional
    shift = frac - info.type.fractional
    if shift:
        x = b.op("Mul", [x, b.const(1 << shift)], "align")
    offset = value[None] << (frac - value_frac)
    return b.op("Add", [x, b.const(offset, label="value_aligned")], "add_const"), "Add(int64)"


def emit_mean(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    axis = 1 + int(node.attrs["axis"])
    total = b.op("ReduceSum", [x, b.const([axis])], "sum", keepdims=0)
    recip = int(np.asarray(node.consts["reciprocal"]).reshape(-1)[0])
    return b.op("Mul", [total, b.const(recip)], "reciprocal"), "ReduceSum(int64)"


EMITTERS = {
    "softmax": emit_softmax,
    "layernorm": emit_layernorm,
    "gelu": emit_gelu,
    "matmul": emit_matmul,
    "transpose": emit_transpose,
    "slice": emit_slice,
    "add_const": emit_add_const,
    "mean": emit_mean,
}
