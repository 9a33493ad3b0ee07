"""Builders for :mod:`qflow.export.int_onnx`: one emitter per QGraph op, each in
standard ONNX on integer codes. The module docstring of ``int_onnx`` explains the routes
and why each is exact; the bounds that the proofs need are checked here, at export.

A :class:`Builder` emits each node's codes as int64 or as float32 / float64
(integer-valued, below 2**24 / 2**53: see ``int_onnx``); the emitters write their
arithmetic constants with :meth:`Builder.num`, so most of them serve every arithmetic.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qflow.errors import QflowError
from qflow.graph.infer import FLOAT32, accumulator_frac, aligned_bias, aligned_weights
from qflow.graph.ir import Node, QGraph
from qflow.numerics import FixedType, Overflow
from qflow.numerics import kernel as K

INT64_LIMIT = 2**63
INT32_LIMIT = 2**31
FLOAT32_EXACT_LIMIT = 2**FLOAT32.bits  # integers of smaller magnitude are exact in float32
#: arithmetic -> (numpy dtype, ONNX element type) of the codes between nodes
ARITHMETICS = {"int64": (np.int64, TensorProto.INT64), "float32": (np.float32, TensorProto.FLOAT),
               "float64": (np.float64, TensorProto.DOUBLE)}
DOUBLE_EXACT_WIDTH = 53  # codes of at most this many bits are exact in a double
LIMB = 8  # bits per operand limb of MatMulInteger / ConvInteger


def _fail(node: Node, reason: str):
    raise QflowError(f"int ONNX export: node {node.name!r} (op {node.op!r}): {reason}")


def _int64(values, node: Node, what: str) -> np.ndarray:
    """Python-int (object) array -> int64, refusing values that do not fit."""
    arr = np.asarray(values, dtype=object)
    if arr.size and (max(int(v) for v in arr.flat) >= INT64_LIMIT
                     or min(int(v) for v in arr.flat) < -INT64_LIMIT):
        _fail(node, f"{what} does not fit int64")
    return arr.astype(np.int64)


class Builder:
    """Accumulates ONNX nodes and initializers with unique, node-derived names; the codes
    of the node being emitted are ``arithmetic`` values (a key of :data:`ARITHMETICS`)."""

    def __init__(self, arithmetic: str = "int64"):
        self.use(arithmetic)
        #: the node being emitted gives its values times 2**scale_exp (a fused cast's
        #: scaling, :mod:`.int_onnx_fuse`); a cast with ``prescaled`` gets them so
        self.scale_exp, self.prescaled = 0, False
        self.nodes: list = []
        self.inits: list = []
        self.used: set[str] = set()
        self.prefix = "graph"
        self._consts: dict[tuple, str] = {}

    def fresh(self, label: str) -> str:
        base = f"{self.prefix}/{label}"
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def const(self, value, dtype=np.int64, label: str = "const") -> str:
        """An initializer (shared by the ONNX nodes of one QGraph node when equal)."""
        arr = np.asarray(value, dtype=dtype)
        key = (self.prefix, arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh(label)
            self.inits.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def use(self, arithmetic: str) -> None:
        """Emit the next nodes in ``arithmetic``."""
        self.arithmetic = arithmetic
        self.value_dtype, self.value_type = ARITHMETICS[arithmetic]

    def num(self, value, label: str = "const") -> str:
        """An arithmetic constant in the codes' dtype; refuses one it would change."""
        arr = np.asarray(value)
        converted = arr.astype(self.value_dtype)
        if arr.size and not np.array_equal(converted.astype(arr.dtype), arr):
            raise QflowError(f"int ONNX export: constant {value!r} is not exact in "
                             f"{self.arithmetic}")
        return self.const(converted, self.value_dtype, label)

    def op(self, op_type: str, inputs: list[str], label: str | None = None, **attrs) -> str:
        out = self.fresh(label or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def rename_output(self, value: str, target: str, start: int) -> None:
        """Make ``value`` (produced at or after node ``start``) be called ``target``."""
        for node in self.nodes[start:]:
            if value in node.output:
                node.output[:] = [target if o == value else o for o in node.output]
                for later in self.nodes[start:]:
                    later.input[:] = [target if i == value else i for i in later.input]
                self.used.add(target)
                return
        self.nodes.append(helper.make_node("Identity", [value], [target],
                                           name=f"{self.prefix}/identity"))

    def prune(self, outputs: list[str]) -> None:
        """Drop nodes and initializers nothing depends on (masks a rounding mode ignores)."""
        needed = set(outputs)
        kept = []
        for node in reversed(self.nodes):
            if any(o in needed for o in node.output):
                kept.append(node)
                needed.update(i for i in node.input if i)
        self.nodes = kept[::-1]
        self.inits = [t for t in self.inits if t.name in needed]


class Sym:
    """An ONNX value that supports the operators ``kernel.round_from_parts`` and
    ``kernel.apply_overflow`` use, so the exported rounding and overflow rules are those
    functions themselves, traced into ONNX nodes (int64 values and bool masks). Results
    keep the operand's class (``int_onnx_transformer`` adds shifts and divisions)."""

    def __init__(self, b: Builder, name: str, is_bool: bool = False):
        self.b, self.name, self.is_bool = b, name, is_bool

    def _arg(self, other) -> str:
        if isinstance(other, Sym):
            if other.is_bool:
                return self.b.op("Cast", [other.name], "cast", to=self.b.value_type)
            return other.name
        return self.b.num(other)

    def _int(self, op_type, other, label, swap=False) -> Sym:
        a, c = self._arg(self), self._arg(other)
        return type(self)(self.b, self.b.op(op_type, [c, a] if swap else [a, c], label))

    def _cmp(self, op_type, other) -> Sym:
        return type(self)(self.b, self.b.op(op_type, [self._arg(self), self._arg(other)]), True)

    def _logic(self, op_type, other) -> Sym:
        return type(self)(self.b, self.b.op(op_type, [self.name, other.name]), True)

    def __add__(self, other):
        return self._int("Add", other, "add")

    __radd__ = __add__

    def __sub__(self, other):
        return self._int("Sub", other, "sub")

    def __rsub__(self, other):
        return self._int("Sub", other, "sub", swap=True)

    def __mul__(self, other):
        return self._int("Mul", other, "mul")

    __rmul__ = __mul__

    def __lt__(self, other):
        return self._cmp("Less", other)

    def __gt__(self, other):
        return self._cmp("Greater", other)

    def __ge__(self, other):
        return self._cmp("GreaterOrEqual", other)

    def __eq__(self, other):  # elementwise, as in numpy
        return self._cmp("Equal", other)

    __hash__ = None

    def __and__(self, other):
        return self._logic("And", other)

    def __or__(self, other):
        return self._logic("Or", other)

    def __invert__(self):
        return type(self)(self.b, self.b.op("Not", [self.name]), True)


class OnnxXp:
    """The array namespace ``kernel.apply_overflow`` (int64 or float codes) and
    ``kernel.quantize_scaled`` (float codes) need, on :class:`Sym` values."""

    int64 = np.int64

    @staticmethod
    def clip(q: Sym, lo, hi) -> Sym:
        b = q.b
        return type(q)(b, b.op("Clip", [q.name, b.num(lo), b.num(hi)]))

    @staticmethod
    def where(cond: Sym, a, q: Sym) -> Sym:
        b = q.b
        return type(q)(b, b.op("Where", [cond.name, q._arg(a), q._arg(q)]))

    @staticmethod
    def remainder(q: Sym, m: int) -> Sym:
        b = q.b
        return type(q)(b, b.op("Mod", [q.name, b.num(m)], fmod=0))

    @staticmethod
    def fmod(q: Sym, m: float) -> Sym:  # float codes: ONNX asks fmod=1 for floats
        b = q.b
        return type(q)(b, b.op("Mod", [q.name, b.num(m)], fmod=1))

    @staticmethod
    def zeros_like(q: Sym) -> Sym:  # a scalar zero: every use broadcasts
        return type(q)(q.b, q.b.num(0))

    @staticmethod
    def abs(q: Sym) -> Sym:
        return type(q)(q.b, q.b.op("Abs", [q.name]))

    @staticmethod
    def floor(q: Sym) -> Sym:
        return type(q)(q.b, q.b.op("Floor", [q.name]))

    @staticmethod
    def round(q: Sym) -> Sym:  # ONNX Round rounds half to even, as numpy does
        return type(q)(q.b, q.b.op("Round", [q.name]))

    @staticmethod
    def trunc(q: Sym) -> Sym:  # ONNX has no Trunc: ceil below zero, floor above
        b = q.b
        negative = b.op("Less", [q.name, b.num(0)], "negative")
        return type(q)(b, b.op("Where", [negative, b.op("Ceil", [q.name]),
                                         b.op("Floor", [q.name])], "trunc"))


# -- cast (requantize) -----------------------------------------------------------------
def emit_requantize(b: Builder, x: str, from_frac: int, t: FixedType,
                    node: Node) -> tuple[str, str]:
    """``qflow.numerics.requantize`` in int64 ONNX; returns (value, route)."""
    shift = from_frac - t.fractional
    if abs(shift) > 62:
        _fail(node, f"a shift of {shift} bits is out of range")
    q = Sym(b, x)
    if shift > 0:
        p = b.const(1 << shift, label="pow2")
        rem = Sym(b, b.op("Mod", [x, p], "rem", fmod=0))  # in [0, 2**shift)
        floor = Sym(b, b.op("Div", [(q - rem).name, p], "floor"))  # an exact division
        parity = Sym(b, b.op("Mod", [floor.name, b.const(2)], "parity", fmod=0))
        half = 1 << (shift - 1)
        rounded = K.round_from_parts(floor, rem > half, rem == half, rem > 0, q < 0,
                                     parity == 1, t.rounding)
        route = f"shift right {shift}, {t.rounding.value}, {t.overflow.value}"
    else:
        rounded = _shift_left(b, q, -shift, t)
        route = f"shift left {-shift}, {t.overflow.value}"
    out = K.apply_overflow(rounded, t.width, t.signed, t.overflow, OnnxXp)
    return out.name, route


def _shift_left(b: Builder, q: Sym, shift: int, t: FixedType) -> Sym:
    """As ``convert._shift_left``: reduce first so that the product cannot overflow."""
    if shift >= t.width + 1:
        bound = 1
    elif shift:
        bound = 1 << (t.width + 1 - shift)
    else:
        bound = 1 << 62
    if t.overflow is Overflow.WRAP:
        reduced = OnnxXp.remainder(q, bound) if shift < t.width else q * 0
    else:
        reduced = OnnxXp.clip(q, -bound, bound)
    return reduced * (1 << shift) if shift else reduced


# -- dense / conv2d ----------------------------------------------------------------------
def _u8_operand(lo: int, hi: int) -> int | None:
    """Zero point that maps codes in [lo, hi] onto uint8, or None."""
    if lo >= 0 and hi <= 255:
        return 0
    if lo >= -128 and hi <= 127:
        return 128
    return None


def _to_u8(b: Builder, x: str, zero_point: int) -> tuple[str, str]:
    if zero_point:
        x = b.op("Add", [x, b.const(zero_point)], "offset")
    return b.op("Cast", [x], "to_u8", to=TensorProto.UINT8), b.const(zero_point, np.uint8, "zp")


def _weight_limbs(w: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
    """Split integer weights into 8-bit limbs: [(uint8 array, zero point, max |limb|)].

    Low limbs are ``w mod 256`` (unsigned); the top limb is the rest (signed when w is).
    """
    lo, hi = int(w.min(initial=0)), int(w.max(initial=0))
    bits = max(hi.bit_length(), (-lo - 1).bit_length()) + 1 if lo < 0 else max(hi.bit_length(), 1)
    count = -(-bits // LIMB)
    limbs, rest = [], w.astype(np.int64)
    for _ in range(count - 1):
        low = np.remainder(rest, 256)
        limbs.append((low.astype(np.uint8), 0, 255))
        rest = (rest - low) // 256
    zp = _u8_operand(int(rest.min(initial=0)), int(rest.max(initial=0)))
    limbs.append(((rest + zp).astype(np.uint8), zp, int(np.abs(rest).max(initial=0))))
    return limbs


def _input_limbs(b: Builder, x: str, t: FixedType) -> list[tuple[str, str, int]]:
    """Split input codes of type ``t`` into 8-bit limbs in ONNX: [(u8 value, zp, max |limb|)]."""
    count = -(-t.width // LIMB)
    limbs, rest = [], x
    for _ in range(count - 1):
        low = b.op("Mod", [rest, b.const(256)], "limb", fmod=0)
        limbs.append((*_to_u8(b, low, 0), 255))
        rest = b.op("Div", [b.op("Sub", [rest, low], "sub"), b.const(256)], "rest")
    shift = LIMB * (count - 1)
    lo, hi = t.qmin >> shift, t.qmax >> shift
    limbs.append((*_to_u8(b, rest, _u8_operand(lo, hi)), max(abs(lo), abs(hi))))
    return limbs


def emit_weighted(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    """dense / conv2d: integer products on raw codes, then per-channel alignment and bias."""
    in_t, out_t = g.tensors[node.inputs[0]].type, g.tensors[node.output].type
    c = node.consts
    frac = accumulator_frac(in_t.fractional, c["weight_frac"], c.get("bias_frac"))
    if frac != out_t.fractional:
        _fail(node, f"output type has {out_t.fractional} fractional bits, the products need {frac}")
    shifts = frac - in_t.fractional - np.asarray(c["weight_frac"], dtype=np.int64)
    if (shifts < 0).any() or (shifts > 62).any():
        _fail(node, "weight alignment shift out of range")
    if b.arithmetic != "int64":
        return _float_weighted(b, node, x, in_t, frac)
    w = np.asarray(c["weight"], dtype=np.int64)
    channels = w.shape[0]
    max_x = max(abs(in_t.qmin), abs(in_t.qmax))
    row_abs = np.abs(w.reshape(channels, -1).astype(object)).sum(axis=1)
    if node.op == "dense":
        acc, route = _dense_products(b, node, x, in_t, w, max_x, row_abs)
    else:
        acc, route = _conv_products(b, node, x, in_t, w)
    view = (-1,) if node.op == "dense" else (1, -1, 1, 1)
    if shifts.any():
        scale = _int64(2 ** shifts.astype(object), node, "alignment")
        acc = b.op("Mul", [acc, b.const(scale.reshape(view), label="align_pow2")], "align")
    if "bias" in c:
        bias = _int64(aligned_bias(c["bias"], c["bias_frac"], frac), node, "aligned bias")
        acc = b.op("Add", [acc, b.const(bias.reshape(view), label="bias_aligned")], "bias")
    return acc, route


def _dense_products(b, node, x, in_t, w, max_x, row_abs) -> tuple[str, str]:
    zp_w = _u8_operand(int(w.min(initial=0)), int(w.max(initial=0)))
    zp_x = _u8_operand(in_t.qmin, in_t.qmax)
    if (in_t.width <= LIMB and zp_w is not None and zp_x is not None
            and _int32_safe(w.shape[1])):
        xu8, xzp = _to_u8(b, x, zp_x)
        wu8 = (w + zp_w).astype(np.uint8).T.copy()
        acc = b.op("MatMulInteger", [xu8, b.const(wu8, np.uint8, "weight"), xzp,
                                     b.const(zp_w, np.uint8, "zp")], "matmul")
        return b.op("Cast", [acc], "to_int64", to=TensorProto.INT64), "MatMulInteger(u8,u8)"
    if int(row_abs.max(initial=0)) * max_x >= INT64_LIMIT:
        _fail(node, "int64 partial sums could overflow")
    acc = b.op("MatMul", [x, b.const(w.T.copy(), label="weight")], "matmul")
    return acc, "MatMul(int64)"


def aligned_products(node: Node, in_t: FixedType, frac: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(weights and bias aligned to fraction ``frac``, as Python ints; the largest magnitude
    of any partial sum of products in any order, plus the bias)."""
    c = node.consts
    w = aligned_weights(c["weight"], c["weight_frac"], in_t.fractional, frac)
    channels = w.shape[0]
    bias = (aligned_bias(c["bias"], c["bias_frac"], frac) if "bias" in c
            else np.zeros(channels, dtype=object))
    max_x = max(abs(in_t.qmin), abs(in_t.qmax))
    rows = np.abs(w.reshape(channels, -1)).sum(axis=1)
    return w, bias, int((rows * max_x + np.abs(bias)).max(initial=0))


def _float_weighted(b: Builder, node: Node, x: str, in_t: FixedType,
                    frac: int) -> tuple[str, str]:
    """The float32 route: ``MatMul`` / ``Conv`` on weights aligned to the accumulator's
    fraction, bias added. Every product, every partial sum of any subset of them in any
    order (BLAS blocking, vector lanes, fused multiply-adds) and the bias on top is an
    integer of magnitude at most ``max_x * sum|w| + |bias|``, checked here to be below
    2**24: so each is exact in float32, whatever order the runtime's kernel takes (a
    Winograd or FFT convolution would not be: the runtimes' CPU float kernels qflow
    builds for are direct or im2col + GEMM, and ``qflow verify`` checks every artifact)."""
    w, bias, bound = aligned_products(node, in_t, frac)
    if bound >= FLOAT32_EXACT_LIMIT:
        _fail(node, f"float32 sums could reach 2**{bound.bit_length()}, not exact")
    has_bias = bool(np.any(bias != 0))
    w, bias = _scaled(b, w), _scaled(b, bias)
    if node.op == "dense":
        acc = b.op("MatMul", [x, b.num(w.T.copy(), "weight_aligned")], "matmul")
        if has_bias:
            acc = b.op("Add", [acc, b.num(bias, "bias_aligned")], "bias")
        return acc, f"MatMul(float32, sums below 2**{bound.bit_length()})"
    a = node.attrs
    inputs = [x, b.num(w, "weight_aligned")]
    if has_bias:
        inputs.append(b.num(bias, "bias_aligned"))
    acc = b.op("Conv", inputs, "conv", kernel_shape=list(w.shape[2:]),
               strides=list(a["stride"]), pads=list(a["padding"]) * 2,
               dilations=list(a["dilation"]), group=int(a["groups"]))
    return acc, f"Conv(float32, sums below 2**{bound.bit_length()})"


#: largest fan-in for one MatMulInteger / ConvInteger: with uint8 operands u, v and zero
#: points z, w <= 128, each product uv and each correction term (z v, w u, z w) is at
#: most 255**2, 128 * 255, 128 * 255, 128**2 in magnitude, summing to 383**2 per input
#: element, so every partial sum of any evaluation order fits int32.
MAX_FAN_IN = (INT32_LIMIT - 1) // (383 * 383)


def _int32_safe(fan_in: int) -> bool:
    return fan_in <= MAX_FAN_IN


def _conv_products(b, node, x, in_t, w) -> tuple[str, str]:
    a = node.attrs
    groups = int(a["groups"])
    channels, per_group = w.shape[0], w.shape[1]
    taps = int(np.prod(w.shape[2:]))
    # input-channel chunks (groups == 1) that keep each ConvInteger's fan-in int32-safe
    step = max(1, MAX_FAN_IN // max(taps, 1))
    if taps > MAX_FAN_IN or (groups > 1 and per_group * taps > MAX_FAN_IN):
        _fail(node, f"fan-in {per_group * taps} is too large for exact int32 ConvInteger sums")
    chunks = [(c0, min(c0 + step, per_group)) for c0 in range(0, per_group, step)]
    attrs = {"kernel_shape": list(w.shape[2:]), "strides": list(a["stride"]),
             "pads": list(a["padding"]) * 2, "dilations": list(a["dilation"]), "group": groups}
    x_limbs = _input_limbs(b, x, in_t)
    bound, acc, count = 0, None, 0
    for c0, c1 in chunks:
        w_limbs = _weight_limbs(w[:, c0:c1])
        for i, (xv, xzp, x_max) in enumerate(x_limbs):
            if len(chunks) > 1:
                xv = b.op("Slice", [xv, b.const([c0]), b.const([c1]), b.const([1])], "chunk")
            for j, (wv, wzp, _) in enumerate(w_limbs):
                limb = wv.astype(np.int64) - wzp
                row = int(np.abs(limb.reshape(channels, -1)).sum(axis=1).max(initial=0))
                bound += (row * x_max) << (LIMB * (i + j))
                part = b.op("ConvInteger", [xv, b.const(wv, np.uint8, "weight"), xzp,
                                            b.const(wzp, np.uint8, "zp")], "conv", **attrs)
                part = b.op("Cast", [part], "to_int64", to=TensorProto.INT64)
                if i + j:
                    part = b.op("Mul", [part, b.const(1 << (LIMB * (i + j)))], "limb_shift")
                acc = part if acc is None else b.op("Add", [acc, part], "limb_sum")
                count += 1
    if bound >= INT64_LIMIT:
        _fail(node, "int64 sums of the limb products could overflow")
    if count == 1:
        return acc, "ConvInteger(u8,u8)"
    return acc, f"ConvInteger(u8,u8) x{count} (input limbs {len(x_limbs)}, chunks {len(chunks)})"


# -- the other ops -------------------------------------------------------------------------
def _channel_view(ndim: int) -> tuple[int, ...]:
    return (1, -1) + (1,) * (ndim - 2)


def emit_scale_shift(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    in_t, out_t = g.tensors[node.inputs[0]].type, g.tensors[node.output].type
    c, frac = node.consts, out_t.fractional
    try:
        scale = aligned_weights(c["scale"], c["scale_frac"], in_t.fractional, frac)
        shift = aligned_bias(c["shift"], c["shift_frac"], frac)
    except QflowError as exc:
        _fail(node, str(exc))
    view = _channel_view(1 + len(g.tensors[node.inputs[0]].shape))
    scale = b.num(_scaled(b, _int64(scale, node, "scale").reshape(view)), "scale_aligned")
    shift = b.num(_scaled(b, _int64(shift, node, "shift").reshape(view)), "shift_aligned")
    out = b.op("Add", [b.op("Mul", [x, scale], "scale"), shift], "shift")
    return out, f"Mul+Add({b.arithmetic})"


def emit_add(b: Builder, g: QGraph, node: Node, xa: str, xb: str) -> tuple[str, str]:
    frac = g.tensors[node.output].type.fractional
    terms = []
    for value, name in zip((xa, xb), node.inputs, strict=True):
        shift = frac - g.tensors[name].type.fractional
        if not 0 <= shift <= 62:
            _fail(node, f"alignment shift {shift} of input {name!r} is out of range")
        terms.append(b.op("Mul", [value, b.num(1 << shift)], "align") if shift else value)
    return b.op("Add", terms), f"Add({b.arithmetic})"


def emit_concat(b: Builder, g: QGraph, node: Node, *xs: str) -> tuple[str, str]:
    """Each input aligned to the output's fraction (int64 ``Mul`` by 2**k), then ``Concat``."""
    frac = g.tensors[node.output].type.fractional
    parts = []
    for value, name in zip(xs, node.inputs, strict=True):
        shift = frac - g.tensors[name].type.fractional
        if not 0 <= shift <= 62:
            _fail(node, f"alignment shift {shift} of input {name!r} is out of range")
        parts.append(b.op("Mul", [value, b.num(1 << shift)], "align") if shift else value)
    route = f"Concat({b.arithmetic})"
    return b.op("Concat", parts, "concat", axis=1 + int(node.attrs["axis"])), route


def emit_relu(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    return b.op("Max", [x, b.num(0)], "relu"), f"Max({b.arithmetic})"


def emit_maxpool2d(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    a = node.attrs
    if a["ceil_mode"]:
        _fail(node, "ceil_mode is not supported")
    width = g.tensors[node.inputs[0]].type.width
    pool_attrs = {"kernel_shape": list(a["kernel"]), "strides": list(a["stride"]),
                  "pads": list(a["padding"]) * 2, "dilations": list(a["dilation"])}
    if b.arithmetic != "int64":  # the codes are exact floats already
        return b.op("MaxPool", [x], "maxpool", **pool_attrs), f"MaxPool({b.arithmetic})"
    if width > DOUBLE_EXACT_WIDTH:
        _fail(node, f"{width}-bit codes are not exact in a double (MaxPool has no int64 kernel)")
    xd = b.op("Cast", [x], "to_double", to=TensorProto.DOUBLE)
    pooled = b.op("MaxPool", [xd], "maxpool", **pool_attrs)
    return b.op("Cast", [pooled], "to_int64", to=TensorProto.INT64), "MaxPool(double)"


def emit_avgpool2d(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    (kh, kw), (sh, sw) = node.attrs["kernel"], node.attrs["stride"]
    channels, h, w = g.tensors[node.inputs[0]].shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    if ho < 1 or wo < 1:
        _fail(node, f"kernel {kh}x{kw} is larger than the {h}x{w} input")
    if _float_average(b, kh * kw):
        average = b.op("AveragePool", [x], "average", kernel_shape=[kh, kw], strides=[sh, sw])
        return _times_count_reciprocal(b, node, average, kh * kw)
    if (kh, kw) == (sh, sw):
        if (ho * kh, wo * kw) != (h, w):
            x = b.op("Slice", [x, b.const([0, 0]), b.const([ho * kh, wo * kw]),
                               b.const([2, 3])], "crop")
        tiles = b.op("Reshape", [x, b.const([0, channels, ho, kh, wo, kw])], "tiles")
        total = b.op("ReduceSum", [tiles, b.const([3, 5])], "sum", keepdims=0)
        route = f"Reshape+ReduceSum({b.arithmetic})"
    else:  # overlapping or gapped windows: one strided slice per kernel tap
        total = None
        for i in range(kh):
            for j in range(kw):
                tap = b.op("Slice", [x, b.const([i, j]),
                                     b.const([i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1]),
                                     b.const([2, 3]), b.const([sh, sw])], "tap")
                total = tap if total is None else b.op("Add", [total, tap], "sum")
        route = f"{kh * kw} strided Slices+Add({b.arithmetic})"
    reciprocal = _scaled(b, int(node.consts["reciprocal"]))
    return b.op("Mul", [total, b.num(reciprocal)], "reciprocal"), route


def emit_global_avgpool2d(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    count = int(np.prod(g.tensors[node.inputs[0]].shape[-2:]))
    if _float_average(b, count):
        return _times_count_reciprocal(b, node, b.op("GlobalAveragePool", [x], "average"), count)
    total = b.op("ReduceSum", [x, b.const([2, 3])], "sum", keepdims=1)
    out = b.op("Mul", [total, b.num(_scaled(b, int(node.consts["reciprocal"])))], "reciprocal")
    return out, f"ReduceSum({b.arithmetic})"


def _float_average(b: Builder, count: int) -> bool:
    """Can float32 ``AveragePool`` give the window sums (ONNX Runtime has no double one)?
    The sum is an integer below 2**24 (the export's bound) and dividing it by a
    power-of-two count is exact."""
    return b.arithmetic == "float32" and count & (count - 1) == 0


def _times_count_reciprocal(b: Builder, node: Node, average: str, count: int):
    """``average * count * reciprocal`` (= sum * reciprocal: the product is exact, being
    the value the export bounds), with the scaling of a fused cast; no ``Mul`` for 1."""
    factor = _scaled(b, count * int(node.consts["reciprocal"]))
    route = f"{'Global' if node.op == 'global_avgpool2d' else ''}AveragePool({b.arithmetic})"
    if factor == 1:
        return average, route
    return b.op("Mul", [average, b.num(factor)], "reciprocal"), route


def emit_reshape(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    shape = [int(s) for s in node.attrs["shape"]]
    if any(s <= 0 for s in shape):
        _fail(node, f"per-sample shape {shape} has a non-positive dimension")
    return b.op("Reshape", [x, b.const([0, *shape])], "reshape"), "Reshape"


def emit_sign(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    """+1 where x >= 0, else -1. Not ONNX ``Sign``: it gives 0 at 0, the QGraph +1."""
    negative = b.op("Less", [x, b.num(0)], "negative")
    return b.op("Where", [negative, b.num(-1), b.num(1)], "sign"), f"Where(Less({b.arithmetic}))"


def emit_cast(b: Builder, g: QGraph, node: Node, x: str) -> tuple[str, str]:
    from_frac, t = g.tensors[node.inputs[0]].type.fractional, g.tensors[node.output].type
    if b.arithmetic != "int64":
        return _float_requantize(b, x, from_frac, t)
    return emit_requantize(b, x, from_frac, t, node)


def _float_requantize(b: Builder, x: str, from_frac: int, t: FixedType) -> tuple[str, str]:
    """``kernel.quantize_scaled`` itself, traced onto float codes: scaling by a power of
    two, floor/round and comparisons are exact on integers below the format's bound
    (2**24, 2**53: the export's bounds) and their power-of-two fractions. With
    ``b.prescaled`` the input is already scaled (:mod:`.int_onnx_fuse`)."""
    shift = t.fractional - from_frac
    scaled = Sym(b, x) * 2.0**shift if shift and not b.prescaled else Sym(b, x)
    out = K.quantize_scaled(scaled, t.width, t.signed, t.rounding, t.overflow, OnnxXp)
    how = f"scale by 2**{shift}" + (" (done by the node before)" if b.prescaled else "")
    return out.name, f"{how}, {t.rounding.value}, {t.overflow.value} ({b.arithmetic})"


def _scaled(b: Builder, value):
    """Integer constant(s) ``value`` times 2**``b.scale_exp`` (float64, exact: the fusion
    plan keeps |scale_exp| within the format's margin; :meth:`Builder.num` re-checks that
    the arithmetic holds them)."""
    if not b.scale_exp:
        return value
    arr = np.asarray(value, dtype=object)
    as_float = arr.astype(np.float64)
    if not np.array_equal(as_float.astype(object), arr):
        raise QflowError(f"int ONNX export: constant {value!r} is not exact in float64")
    return as_float * 2.0**b.scale_exp


EMITTERS = {
    "dense": emit_weighted,
    "conv2d": emit_weighted,
    "scale_shift": emit_scale_shift,
    "relu": emit_relu,
    "add": emit_add,
    "maxpool2d": emit_maxpool2d,
    "avgpool2d": emit_avgpool2d,
    "global_avgpool2d": emit_global_avgpool2d,
    "reshape": emit_reshape,
    "concat": emit_concat,
    "cast": emit_cast,
    "sign": emit_sign,
}
