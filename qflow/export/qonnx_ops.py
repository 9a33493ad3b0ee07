"""Node emitters of the QONNX exporter: one function per QGraph op, plus the cast route.

The mapping and the exactness arguments are in the docstring of :mod:`qflow.export.qonnx`.
Every emitter checks the bound its argument needs and raises :class:`InexactError` (naming
node and op) when it cannot prove the float arithmetic exact in the model's dtype.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qflow.errors import QflowError
from qflow.graph.infer import aligned_bias, aligned_weights
from qflow.graph.ir import Node, QGraph
from qflow.numerics import FixedType, Overflow, Rounding

from .hls.binary import has_binary_weights

DOMAIN = "qonnx.custom_op.general"
F32, F64 = TensorProto.FLOAT, TensorProto.DOUBLE
PRECISION = {F32: 24, F64: 53}  # significand bits: integers below 2**p are exact
NUMPY = {F32: np.float32, F64: np.float64}
QUANT_BITS = 24  # qonnx's Quant returns float32: its codes must fit 24 bits
FRAC_LIMIT = 100  # |fractional bits| kept far from float32's exponent range (2**-126)

#: qflow rounding -> qonnx Quant rounding_mode (RND and RND_MIN_INF add ±half an LSB first)
QUANT_MODE = {
    Rounding.TRN: "FLOOR", Rounding.TRN_ZERO: "DOWN", Rounding.RND_CONV: "ROUND",
    Rounding.RND_INF: "HALF_UP", Rounding.RND_ZERO: "HALF_DOWN",
    Rounding.RND: "FLOOR", Rounding.RND_MIN_INF: "CEIL",
}
HALF_SHIFT = {Rounding.RND: 1, Rounding.RND_MIN_INF: -1}
#: modes whose float form computes t ± 1/2 (inside or before the Quant)
NEEDS_HALF = {Rounding.RND, Rounding.RND_MIN_INF, Rounding.RND_INF}


class InexactError(QflowError):
    """This node has no float form in this dtype that is provably exact."""


def _bits(codes: np.ndarray) -> tuple[int, bool]:
    """(bit width, signed) of the narrowest Quant holding every code (never 1-bit signed:
    qonnx executes a 1-bit signed Quant as bipolar ±1)."""
    lo, hi = int(codes.min(initial=0)), int(codes.max(initial=0))
    if lo < 0:
        return max(hi.bit_length(), (-lo - 1).bit_length()) + 1, True
    return max(hi.bit_length(), 1), False


def max_abs(t: FixedType) -> int:
    return max(abs(t.qmin), t.qmax)


class Builder:
    """Collects ONNX nodes, initializers and value infos (batch dimension ``N``)."""

    def __init__(self, graph: QGraph, dtype: int):
        self.graph, self.dtype, self.p = graph, dtype, PRECISION[dtype]
        self.nodes: list = []
        self.inits: list = []
        self.infos: dict[str, tuple[int, tuple]] = {}  # tensor -> (elem type, full shape)
        self.const_shapes: dict[str, tuple] = {}
        self.names: set[str] = set()

    # -- plumbing --------------------------------------------------------------------
    def _claim(self, name: str) -> str:
        if name in self.names:
            raise QflowError(f"QONNX export: tensor name {name!r} is used twice")
        self.names.add(name)
        return name

    def const(self, name: str, value, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        self.inits.append(numpy_helper.from_array(arr, self._claim(name)))
        self.const_shapes[name] = arr.shape
        return name

    def real(self, name: str, value, elem: int) -> str:
        """A float constant that must be exact in ``elem``."""
        arr = np.asarray(value, dtype=np.float64)
        cast = arr.astype(NUMPY[elem])
        if not np.array_equal(cast.astype(np.float64), arr):
            raise InexactError(f"constant {name!r} is not exact in {NUMPY[elem].__name__}")
        return self.const(name, cast)

    def emit(self, op: str, inputs: list[str], out: str, shape, elem: int, *,
             name: str | None = None, domain: str = "", doc: str = "", batched: bool = True,
             **attrs) -> str:
        """Append a node; ``shape`` is per sample unless ``batched`` is false."""
        node = helper.make_node(op, inputs, [self._claim(out)], name=name or out,
                                domain=domain, **attrs)
        if doc:
            node.doc_string = doc
        self.nodes.append(node)
        self.infos[out] = (elem, ("N", *shape) if batched else tuple(shape))
        return out

    def elem(self, tensor: str) -> int:
        return self.infos[tensor][0]

    def shape(self, tensor: str) -> tuple:
        """Per-sample shape of a batched tensor."""
        return self.infos[tensor][1][1:]

    def full_shape(self, tensor: str) -> tuple:
        return self.infos[tensor][1] if tensor in self.infos else self.const_shapes[tensor]

    def cast_to(self, src: str, elem: int, out: str) -> str:
        return self.emit("Cast", [src], out, self.full_shape(src), elem, batched=False, to=elem)

    def quant(self, name: str, src: str, out: str, *, scale, bits: int, signed: bool,
              narrow: bool = False, mode: str = "ROUND", doc: str = "") -> str:
        """A qonnx Quant (zero point 0, power-of-two scale); its output is float32."""
        if bits > QUANT_BITS:
            raise InexactError(f"needs a {bits}-bit Quant; qonnx executes Quant in float32, "
                          f"exact up to {QUANT_BITS} bits")
        inputs = [src, self.real(f"{name}/scale", scale, F32),
                  self.real(f"{name}/zeropt", 0.0, F32),
                  self.real(f"{name}/bitwidth", float(bits), F32)]
        return self.emit("Quant", inputs, out, self.full_shape(src), F32, name=name,
                         domain=DOMAIN, doc=doc, batched=False, signed=int(signed),
                         narrow=int(narrow), rounding_mode=mode)

    def quant_const(self, name: str, codes, frac, doc: str, elem: int | None = None) -> str:
        """Initializer ``codes * 2**-frac`` (frac broadcasts against codes), a Quant stating
        its grid, and a Cast to ``elem`` (default: the model dtype). Returns the tensor."""
        codes = np.asarray(codes, dtype=np.int64)
        frac = np.asarray(frac, dtype=np.int64)
        if np.abs(frac).max(initial=0) > FRAC_LIMIT:
            raise InexactError(f"constant {name!r} has a fractional bit count beyond ±{FRAC_LIMIT}")
        bits, signed = _bits(codes)
        bits = 2 if signed and bits == 1 else bits
        if frac.size and (frac == frac.flat[0]).all():
            frac = frac.reshape(-1)[0]
        value = np.ldexp(codes.astype(np.float64), np.broadcast_to(-frac, codes.shape))
        src = self.real(name, value, F32)
        kind = "signed" if signed else "unsigned"
        out = self.quant(f"{name}_quant", src, f"{name}/q", scale=np.ldexp(1.0, -frac),
                         bits=bits, signed=signed,
                         doc=f"qflow constant {name}: {doc}; {bits}-bit {kind} codes")
        elem = self.dtype if elem is None else elem
        return out if elem == F32 else self.cast_to(out, elem, f"{name}/f64")

    def bipolar_const(self, name: str, codes, doc: str, elem: int | None = None) -> str:
        """±1 codes (binary weights, fraction 0) as an initializer and a ``BipolarQuant``
        of scale 1, the QONNX form of a binary tensor (qonnx: +1 where x >= 0, else -1),
        then a Cast to ``elem`` (default: the model dtype). Returns the tensor."""
        src = self.real(name, np.asarray(codes, dtype=np.float64), F32)
        one = self.real(f"{name}_quant/scale", 1.0, F32)
        out = self.emit("BipolarQuant", [src, one], f"{name}/q", self.const_shapes[name], F32,
                        name=f"{name}_quant", domain=DOMAIN, batched=False)
        self.nodes[-1].doc_string = f"qflow constant {name}: {doc}; bipolar codes ±1"
        elem = self.dtype if elem is None else elem
        return out if elem == F32 else self.cast_to(out, elem, f"{name}/f64")

    def weight(self, node: Node, codes, frac, doc: str, elem: int | None = None) -> str:
        """A weight constant: bipolar when the node's weights are binary, else Quant-ed."""
        if has_binary_weights(node):
            return self.bipolar_const(f"{node.name}/weight", codes, doc, elem)
        return self.quant_const(f"{node.name}/weight", codes, frac, doc, elem)

    def exact(self, bound: int, what: str, p: int | None = None) -> None:
        p = self.p if p is None else p
        if bound >= 2**p:
            kind = "float32" if p == PRECISION[F32] else "float64"
            raise InexactError(f"{what} reaches {bound} >= 2**{p} units: not exact in {kind}")


# -- the cast route --------------------------------------------------------------------
def emit_cast(b: Builder, name: str, src: str, tin: FixedType | None, tout: FixedType,
              out: str) -> str:
    """Cast ``src`` (type ``tin``; ``None``: arbitrary float64 reals) to ``tout``, exactly."""
    w, f, ov, rnd = tout.width, tout.fractional, tout.overflow, tout.rounding
    if abs(f) > FRAC_LIMIT:
        raise InexactError(f"output type {tout.to_ap()} has more than ±{FRAC_LIMIT} "
                           "fractional bits")
    if ov in (Overflow.SAT, Overflow.SAT_SYM) and not (tout.signed and w == 1):
        bits, qsigned, narrow, post = w, tout.signed, ov is Overflow.SAT_SYM and tout.signed, ""
    elif ov in (Overflow.SAT, Overflow.SAT_SYM):  # 1-bit signed: codes {-1, 0}
        bits, qsigned, narrow, post = 2, True, False, "clip"
    elif ov is Overflow.SAT_ZERO:  # clamps to one code beyond the range: still out of it
        bits, qsigned, narrow, post = w + 1, tout.signed, False, "zero"
    else:  # WRAP: fmod first, so |t| <= 2**w; w + 2 signed bits never clamp
        bits, qsigned, narrow, post = w + 2, True, False, "wrap"
    quant_max = 2 ** (bits - 1) if qsigned else 2**bits - 1  # |t| after the Quant's clamp
    shift = None if tin is None else tin.fractional - f
    rounds = shift is None or shift > 0
    half = HALF_SHIFT.get(rnd, 0) if rounds else 0
    lsb = np.ldexp(1.0, -f)

    # dtype of the steps before the Quant: float32 only where t ± 1/2 is provably exact
    pre = None
    for elem in ((F32, F64) if tin is not None and b.elem(src) == F32 else (F64,)):
        p = PRECISION[elem]
        ok = quant_max < 2 ** (p - 1) and (tin is None or tin.width <= p)
        if ok and tin is not None and rounds and rnd in NEEDS_HALF:
            big = max_abs(tin) if ov is not Overflow.WRAP else min(max_abs(tin), 2 ** (w + shift))
            ok = big + 2 ** (shift - 1) < 2**p  # |t ± 1/2| in units of 2**-shift
        if ok:
            pre = elem
            break
    if pre is None:
        raise InexactError(f"cast to {tout.to_ap()}: t ± 1/2 is not exact in float64")
    cur = src if b.elem(src) == pre else b.cast_to(src, pre, f"{name}/pre")
    shape = b.shape(src)
    if ov is Overflow.WRAP:
        period = b.real(f"{name}/period", np.ldexp(1.0, w - f), pre)
        cur = b.emit("Mod", [cur, period], f"{name}/fmod", shape, pre, fmod=1)
    if tin is None and rounds and rnd in NEEDS_HALF:
        if ov is not Overflow.WRAP:
            bound = np.ldexp(1.0, w - f)
            cur = b.emit("Clip", [cur, b.real(f"{name}/lo", -bound, F64),
                                  b.real(f"{name}/hi", bound, F64)], f"{name}/clip", shape, F64)
        cur = _quarter_snap(b, name, cur, f)
    if half:
        cur = b.emit("Add", [cur, b.real(f"{name}/half", half * lsb / 2, pre)],
                     f"{name}/half_lsb", shape, pre)
    doc = (f"qflow.type={tout.to_ap()}; qflow.rounding={rnd.value}; "
           f"qflow.overflow={ov.value}; route={QUANT_MODE[rnd]}"
           f"{' after adding %+g LSB' % (half / 2) if half else ''}"
           f"{'; overflow by standard ops (' + post + ')' if post else ''}")
    last_f32 = not post and b.dtype == F32
    q = b.quant(name, cur, out if last_f32 else f"{name}/q", scale=lsb, bits=bits,
                signed=qsigned, narrow=narrow, mode=QUANT_MODE[rnd], doc=doc)
    if post:
        q = _overflow_ops(b, name, q, tout, post, out if b.dtype == F32 else f"{name}/ov")
    return q if b.dtype == F32 else b.cast_to(q, F64, out)


def _quarter_snap(b: Builder, name: str, x: str, f: int) -> str:
    """Move float64 ``x`` onto a grid of a quarter LSB without changing how any rounding
    mode rounds it: t = x·2^f = n + r (n = floor t) becomes n + r' with r' = 0, 1/4, 1/2
    or 3/4 as r is 0, in (0, 1/2), 1/2 or in (1/2, 1). Every step is exact (|t| ≤ 2^w)."""
    s = b.shape(x)

    def op(kind, inputs, role):
        return b.emit(kind, inputs, f"{name}/snap_{role}", s, F64)

    t = op("Mul", [x, b.real(f"{name}/const_up", np.ldexp(1.0, f), F64)], "t")
    n = op("Floor", [t], "floor")
    r = op("Sub", [t, n], "frac")
    # t - (n + 1/2), not r - 1/2: r can round to 1/2 (t = -1/2 + 2^-54), while n + 1/2 is
    # exact and the sign of a difference of two floats is always exact.
    mid = op("Add", [n, b.real(f"{name}/const_half", 0.5, F64)], "mid")
    r_half = op("Sub", [t, mid], "frac_half")
    s1, s2 = op("Sign", [r], "sign"), op("Sign", [r_half], "sign_half")
    k = op("Add", [s1, s2], "k")
    k = op("Add", [k, b.real(f"{name}/const_one", 1.0, F64)], "k1")
    q = op("Mul", [k, b.real(f"{name}/const_quarter", 0.25, F64)], "quarter")
    t = op("Add", [n, q], "snapped")
    return op("Mul", [t, b.real(f"{name}/const_down", np.ldexp(1.0, -f), F64)], "x")


def _overflow_ops(b: Builder, name: str, y: str, t: FixedType, post: str, out: str) -> str:
    """SAT_ZERO / WRAP / 1-bit clip on the Quant's float32 output (|codes| <= 2**23)."""
    s, lo, hi = b.shape(y), t.min_value, t.max_value
    lo_t, hi_t = b.real(f"{name}/min", lo, F32), b.real(f"{name}/max", hi, F32)
    if post == "clip":
        return b.emit("Clip", [y, lo_t, hi_t], out, s, F32, name=f"{name}/clip")
    if post == "zero":
        below = b.emit("Less", [y, lo_t], f"{name}/below", s, TensorProto.BOOL)
        above = b.emit("Greater", [y, hi_t], f"{name}/above", s, TensorProto.BOOL)
        outside = b.emit("Or", [below, above], f"{name}/outside", s, TensorProto.BOOL)
        return b.emit("Where", [outside, b.real(f"{name}/zero", 0.0, F32), y], out, s, F32,
                      name=f"{name}/sat_zero")
    period = np.ldexp(1.0, t.width - t.fractional)  # R = 2^W · lsb
    d = b.emit("Sub", [y, lo_t], f"{name}/from_min", s, F32)
    d = b.emit("Mul", [d, b.real(f"{name}/inv_period", 1.0 / period, F32)], f"{name}/turns", s,
               F32)
    k = b.emit("Floor", [d], f"{name}/whole_turns", s, F32)
    k = b.emit("Mul", [k, b.real(f"{name}/wrap_period", period, F32)], f"{name}/wrapped", s, F32)
    return b.emit("Sub", [y, k], out, s, F32, name=f"{name}/wrap")


# -- arithmetic ops --------------------------------------------------------------------
def _obj(a) -> np.ndarray:
    return np.asarray(a).astype(object)


def _weighted_bound(node: Node, tin: FixedType, frac: int, with_bias: bool) -> int:
    """max over output channels of sum |w| · max|x| (+ |bias|), in units of 2**-frac."""
    c = node.consts
    w = aligned_weights(c["weight"], c["weight_frac"], tin.fractional, frac)
    rows = np.abs(w.reshape(w.shape[0], -1)).sum(axis=1) * max_abs(tin)
    if with_bias and "bias" in c:
        rows = rows + np.abs(aligned_bias(c["bias"], c["bias_frac"], frac))
    return int(rows.max(initial=0))


def emit_dense(b: Builder, node: Node) -> None:
    c, (x,) = node.consts, node.inputs
    tin, tout = b.graph.tensors[x].type, b.graph.tensors[node.output].type
    b.exact(_weighted_bound(node, tin, tout.fractional, True), "the weighted sum")
    w = b.weight(node, c["weight"].T, c["weight_frac"][None, :],
                 "weight, transposed to (in, out)")
    has_bias = "bias" in c
    acc = f"{node.name}/acc" if has_bias else node.output
    out_shape = b.graph.tensors[node.output].shape
    b.emit("MatMul", [x, w], acc, out_shape, b.dtype, name=node.name)
    if has_bias:
        bias = b.quant_const(f"{node.name}/bias", c["bias"], c["bias_frac"], "bias")
        b.emit("Add", [acc, bias], node.output, out_shape, b.dtype, name=f"{node.name}/bias_add")


def _digits(w: np.ndarray, base_bits: int) -> list[np.ndarray]:
    """w = sum_j d_j · 2**(j·base_bits): low digits in [0, 2**b), the last one signed."""
    pieces, rest = [], w.astype(np.int64)
    while (np.abs(rest) >= 2**base_bits).any():
        pieces.append(rest & (2**base_bits - 1))
        rest = rest >> base_bits
    return [*pieces, rest]


def _row_sums(d: np.ndarray) -> np.ndarray:
    return np.abs(_obj(d).reshape(len(d), -1)).sum(axis=1)


def emit_conv2d(b: Builder, node: Node) -> None:
    """Conv in float32 (ONNX Runtime has no float64 Conv). When a channel's sum can reach
    2**24, a float64 model splits the weights into base-2**k digits small enough that every
    float32 Conv stays exact, and adds the digit convolutions (scaled) in float64."""
    c, (x,) = node.consts, node.inputs
    a = node.attrs
    tin, tout = b.graph.tensors[x].type, b.graph.tensors[node.output].type
    if tin.width > PRECISION[F32]:
        raise InexactError(f"input type {tin.to_ap()} is wider than 24 bits: not exact in a "
                      "float32 Conv (ONNX Runtime has no float64 Conv)")
    w, wf = c["weight"], c["weight_frac"]
    attrs = {"kernel_shape": list(w.shape[2:]), "strides": a["stride"],
             "pads": [*a["padding"], *a["padding"]], "dilations": a["dilation"],
             "group": a["groups"]}
    out_shape = b.graph.tensors[node.output].shape
    xf = x if b.elem(x) == F32 else b.cast_to(x, F32, f"{node.name}/x_f32")
    fshape = (-1, 1, 1, 1)
    bound = _weighted_bound(node, tin, tout.fractional, True)
    b.exact(bound, "the weighted sum")
    if bound < 2 ** PRECISION[F32]:
        inputs = [xf, b.weight(node, w, wf.reshape(fshape), "weight", F32)]
        if "bias" in c:
            inputs.append(b.quant_const(f"{node.name}/bias", c["bias"], c["bias_frac"], "bias",
                                        F32))
        out = node.output if b.dtype == F32 else f"{node.name}/acc"
        b.emit("Conv", inputs, out, out_shape, F32, name=node.name, **attrs)
        if b.dtype == F64:
            b.cast_to(out, F64, node.output)
        return
    xmax = max_abs(tin)
    for base in range(int(np.abs(w).max()).bit_length(), 0, -1):
        pieces = _digits(w, base)
        if all(int(_row_sums(d).max()) * xmax < 2 ** PRECISION[F32] for d in pieces):
            break
    else:
        raise InexactError("even 1-bit weight digits give float32 Conv sums of 2**24 or more")
    # every partial sum of the float64 additions, in units of the accumulator's LSB
    align = 2 ** (tout.fractional - tin.fractional - _obj(wf))
    total = sum(_row_sums(d) * 2 ** (j * base) * align for j, d in enumerate(pieces)) * xmax
    if "bias" in c:
        total = total + np.abs(aligned_bias(c["bias"], c["bias_frac"], tout.fractional))
    b.exact(int(total.max()), "the sum of the weight-digit convolutions")
    terms = []
    for j, d in enumerate(pieces):
        wq = b.quant_const(f"{node.name}/weight_{j}", d, (wf - j * base).reshape(fshape),
                           f"weight digit {j} (weight = sum_j digit_j · 2^({base}·j))", F32)
        part = b.emit("Conv", [xf, wq], f"{node.name}/part_{j}", out_shape, F32,
                      name=node.name if j == 0 else f"{node.name}/conv_{j}", **attrs)
        terms.append(b.cast_to(part, F64, f"{node.name}/part_{j}_f64"))
    if "bias" in c:
        terms.append(b.quant_const(f"{node.name}/bias", c["bias"].reshape(-1, 1, 1),
                                   c["bias_frac"].reshape(-1, 1, 1), "bias"))
    acc = terms[0]
    if len(terms) == 1:
        b.emit("Identity", [acc], node.output, out_shape, F64, name=f"{node.name}/out")
    for j, term in enumerate(terms[1:], 1):
        out = node.output if j == len(terms) - 1 else f"{node.name}/sum_{j}"
        acc = b.emit("Add", [acc, term], out, out_shape, F64)


def emit_scale_shift(b: Builder, node: Node) -> None:
    c, (x,) = node.consts, node.inputs
    tin, tout = b.graph.tensors[x].type, b.graph.tensors[node.output].type
    scale = aligned_weights(c["scale"], c["scale_frac"], tin.fractional, tout.fractional)
    b.exact(int(np.abs(scale).max(initial=0)) * max_abs(tin), "the product x · scale")
    s = b.graph.tensors[x].shape
    cshape = (-1,) + (1,) * (len(s) - 1)
    sc = b.quant_const(f"{node.name}/scale", c["scale"].reshape(cshape),
                       c["scale_frac"].reshape(cshape), "per-channel scale")
    sh = b.quant_const(f"{node.name}/shift", c["shift"].reshape(cshape),
                       c["shift_frac"].reshape(cshape), "per-channel shift")
    mid = b.emit("Mul", [x, sc], f"{node.name}/scaled", s, b.dtype, name=node.name)
    b.emit("Add", [mid, sh], node.output, s, b.dtype, name=f"{node.name}/shift_add")


def emit_pool_sum(b: Builder, node: Node) -> None:
    """Exact window sums (reshape + ReduceSum, or strided slices), then · reciprocal."""
    (x,) = node.inputs
    tin = b.graph.tensors[x].type
    s = b.graph.tensors[x].shape
    out_shape = b.graph.tensors[node.output].shape
    ch, h, w = s
    if node.op == "global_avgpool2d":
        count = h * w
        total = b.emit("ReduceSum", [x, b.const(f"{node.name}/axes", [2, 3], np.int64)],
                       f"{node.name}/sum", (ch, 1, 1), b.dtype, name=node.name, keepdims=1)
    else:
        (kh, kw), (sh, sw) = node.attrs["kernel"], node.attrs["stride"]
        ho, wo = out_shape[1:]
        count = kh * kw
        total = _window_sum(b, node, x, (ch, ho, wo), (kh, kw), (sh, sw))
    b.exact(count * max_abs(tin), "the window sum")
    rf = int(node.attrs["reciprocal_frac"])
    recip = b.quant_const(f"{node.name}/reciprocal", np.asarray(node.consts["reciprocal"]),
                          np.asarray(rf), f"1/{count}")
    b.emit("Mul", [total, recip], node.output, out_shape, b.dtype, name=f"{node.name}/scale")


def _window_sum(b, node, x, out_shape, kernel, stride) -> str:
    ch, ho, wo = out_shape
    (kh, kw), (sh, sw) = kernel, stride
    h, w = b.shape(x)[1:]
    if (kh, kw) == (sh, sw):  # non-overlapping windows: crop, reshape, ReduceSum
        if (h, w) != (ho * kh, wo * kw):
            x = _slice(b, f"{node.name}/crop", x, (0, 0), (ho * kh, wo * kw), (1, 1),
                       (ch, ho * kh, wo * kw))
        r = b.emit("Reshape", [x, b.const(f"{node.name}/windows", [0, ch, ho, kh, wo, kw],
                                          np.int64)], f"{node.name}/win", (ch, ho, kh, wo, kw),
                   b.dtype)
        return b.emit("ReduceSum", [r, b.const(f"{node.name}/axes", [3, 5], np.int64)],
                      f"{node.name}/sum", out_shape, b.dtype, name=node.name, keepdims=0)
    total = None
    for i in range(kh):
        for j in range(kw):
            part = _slice(b, f"{node.name}/tap_{i}_{j}", x, (i, j),
                          (i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1), (sh, sw), out_shape)
            total = part if total is None else b.emit(
                "Add", [total, part], f"{node.name}/sum_{i}_{j}", out_shape, b.dtype,
                name=node.name if (i, j) == (kh - 1, kw - 1) else None)
    return total


def _slice(b, name, x, starts, ends, steps, shape) -> str:
    ins = [x, b.const(f"{name}/starts", starts, np.int64), b.const(f"{name}/ends", ends, np.int64),
           b.const(f"{name}/axes", [2, 3], np.int64), b.const(f"{name}/steps", steps, np.int64)]
    return b.emit("Slice", ins, name, shape, b.elem(x))


def emit_simple(b: Builder, node: Node) -> None:
    out_shape = b.graph.tensors[node.output].shape
    a = node.attrs
    if node.op == "relu":
        b.emit("Relu", node.inputs, node.output, out_shape, b.dtype, name=node.name)
    elif node.op == "add":
        b.emit("Add", node.inputs, node.output, out_shape, b.dtype, name=node.name)
    elif node.op == "maxpool2d":
        if a["ceil_mode"]:
            raise InexactError("ceil_mode is not supported")
        b.emit("MaxPool", node.inputs, node.output, out_shape, b.dtype, name=node.name,
               kernel_shape=a["kernel"], strides=a["stride"],
               pads=[*a["padding"], *a["padding"]], dilations=a["dilation"])
    elif node.op == "reshape":
        shape = b.const(f"{node.name}/shape", [0, *a["shape"]], np.int64)
        b.emit("Reshape", [node.inputs[0], shape], node.output, out_shape, b.dtype,
               name=node.name)
    elif node.op == "concat":  # real values: moved, never changed
        b.emit("Concat", node.inputs, node.output, out_shape, b.dtype, name=node.name,
               axis=1 + int(a["axis"]))


def emit_sign(b: Builder, node: Node) -> None:
    """qonnx's ``BipolarQuant`` (scale 1) is the QGraph's sign: +1 where x >= 0 (so at 0
    and at -0.0 too), else -1. Its output keeps the input's float type (qonnx computes
    it in numpy on the input array); ±1 is exact in either."""
    (x,) = node.inputs
    elem = b.elem(x)
    one = b.real(f"{node.name}/scale", 1.0, elem)
    b.emit("BipolarQuant", [x, one], node.output, b.graph.tensors[node.output].shape, elem,
           name=node.name, domain=DOMAIN, doc="qflow sign: +1 where x >= 0, else -1")


def emit_cast_node(b: Builder, node: Node) -> None:
    (x,) = node.inputs
    emit_cast(b, node.name, x, b.graph.tensors[x].type, b.graph.tensors[node.output].type,
              node.output)


EMITTERS = {
    "dense": emit_dense, "conv2d": emit_conv2d, "scale_shift": emit_scale_shift,
    "relu": emit_simple, "add": emit_simple, "maxpool2d": emit_simple, "reshape": emit_simple,
    "concat": emit_simple,
    "avgpool2d": emit_pool_sum, "global_avgpool2d": emit_pool_sum, "cast": emit_cast_node,
    "sign": emit_sign,
}
