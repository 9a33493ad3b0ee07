"""The golden model: a QGraph run on numpy integer codes, batched and vectorized.

Three arithmetics give the same codes:
- ``"int64"``: codes are int64 arrays; products use float BLAS only where every
  partial sum provably stays below 2**24 (float32) or 2**53 (float64), else int64.
- ``"float64"`` and ``"float32"``: codes are held as float arrays of integers. A graph
  may use one when every value the arithmetic forms (every code, partial sum of a
  product, scaled term and pooling sum) is an integer below 2**53 (float64) or 2**24
  (float32) in magnitude, and every power-of-two scaling stays inside the format's
  exponent range (:func:`float_bounds`). Then additions, products, BLAS matrix
  products, scaling by powers of two, floor/round and clipping are all exact.
``"auto"`` (the default) takes the narrowest exact one: float32, float64, else int64.
Tests run every arithmetic a graph allows on every model and configuration and require
equal codes on every tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from qflow.numerics import Overflow, kernel, requantize, to_codes

from . import transformer
from .emulator_transformer import BUILDERS as TRANSFORMER_BUILDERS
from .infer import FLOAT32, FLOAT64, accumulator_frac, aligned_bias, aligned_weights, float_bounds
from .ir import Node, QGraph, QGraphError

#: bytes (per chunk) of the largest tensor or im2col buffer: small enough to stay in the
#: L2 cache and let numpy reuse its buffers, large enough to amortize per-node overhead
CHUNK_BYTES = 1 << 19
#: float formats, narrowest first
FLOAT_FORMATS = (FLOAT32, FLOAT64)
ARITHMETICS = ("auto", "float32", "float64", "int64")


def _product_dtype(weight_obj: np.ndarray, max_abs_input: int):
    """The narrowest dtype in which every partial sum of x @ w.T is an exact integer
    (int64 arithmetic: a BLAS product where it is exact, else int64)."""
    rows = np.abs(weight_obj.reshape(weight_obj.shape[0], -1)).sum(axis=1)
    bound = int(rows.max()) * max_abs_input if rows.size else 0
    for fmt in FLOAT_FORMATS:
        if bound < 2**fmt.bits:
            return fmt.dtype
    return np.int64


@dataclass
class _Plan:
    """Precomputed steps: (function, input slots, output slot, slots dead afterwards)."""

    steps: list
    slots: dict[str, int]
    output: int

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        regs = [None] * len(self.slots)
        regs[0] = codes
        for fn, ins, out, dead in self.steps:
            regs[out] = fn(*[regs[i] for i in ins])
            for i in dead:
                regs[i] = None  # frees the buffer for the next allocation (cache-warm)
        return regs[self.output]

    def keep_all(self, codes: np.ndarray) -> dict[str, np.ndarray]:
        regs = [None] * len(self.slots)
        regs[0] = codes
        for fn, ins, out, _ in self.steps:
            regs[out] = fn(*[regs[i] for i in ins])
        return {name: regs[i].astype(np.int64) for name, i in self.slots.items()}


class Emulator:
    """Runs a QGraph. Constants are aligned and the execution plan built once.

    >>> # emulator = Emulator(QGraph.load("model.qgraph")); codes = emulator.run(x)
    """

    def __init__(self, graph: QGraph, arithmetic: str = "auto"):
        if arithmetic not in ARITHMETICS:
            raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
        self.graph = graph.validate()
        for node in graph.nodes:
            if node.op in TRANSFORMER_BUILDERS:
                transformer.check_node(graph, node)
        bounds = float_bounds(graph)
        allowed = [f for f in FLOAT_FORMATS if bounds.fits(f)]
        if arithmetic == "auto":
            fmt = allowed[0] if allowed else None
        elif arithmetic == "int64":
            fmt = None
        else:
            fmt = next((f for f in allowed if np.dtype(f.dtype).name == arithmetic), None)
            if fmt is None:
                raise QGraphError(f"the {arithmetic} arithmetic is not exact for this graph "
                                  f"({bounds.describe()}): use a wider one")
        self.dtype = np.dtype(fmt.dtype if fmt else np.int64).type
        self.arithmetic = np.dtype(self.dtype).name
        self.float_mode = fmt is not None
        self._chunk = _chunk_size(graph, np.dtype(self.dtype).itemsize)
        self._prepared = {node.name: _PREPARE[node.op](self, node)
                          for node in graph.nodes if node.op in _PREPARE}
        self._plans: dict[bool, _Plan] = {}
        self._input_casts: dict[np.dtype, object] = {}  # by the input's dtype

    def _type(self, name: str):
        return self.graph.tensors[name].type

    def run(self, x) -> np.ndarray:
        """Real-valued input (batch first) -> int64 output codes."""
        x = np.asarray(x)
        self._check_shape(x)
        first = self._input_casts.get(x.dtype)
        if first is None:
            first = self._input_casts[x.dtype] = self._input_cast(x.dtype)
        return self._run_chunked(x, first)

    def run_codes(self, codes: np.ndarray, *, keep: bool = False):
        """Input codes (batch first) -> output codes; with ``keep`` also every tensor."""
        codes = np.asarray(codes, dtype=np.int64)
        self._check_shape(codes)
        if keep:
            return self._plan(True).keep_all(codes.astype(self.dtype))
        return self._run_chunked(codes, lambda c: c.astype(self.dtype, copy=False))

    def to_real(self, codes: np.ndarray) -> np.ndarray:
        return np.ldexp(codes.astype(np.float64), -self.graph.output_type.fractional)

    def _check_shape(self, x: np.ndarray) -> None:
        expected = tuple(self.graph.tensors[self.graph.input].shape)
        if tuple(x.shape[1:]) != expected:
            raise QGraphError(f"input has per-sample shape {tuple(x.shape[1:])}, the graph "
                              f"expects {expected}")

    def _run_chunked(self, x: np.ndarray, first) -> np.ndarray:
        """Input cast ``first`` and the plan, one cache-sized chunk at a time."""
        plan = self._plan(False)
        step = self._chunk
        if len(x) <= step:
            return plan(first(x)).astype(np.int64)
        out = None
        for i in range(0, len(x), step):
            y = plan(first(x[i:i + step]))
            if out is None:
                out = np.empty((len(x), *y.shape[1:]), np.int64)
            out[i:i + len(y)] = y  # converts while copying: no int64 temporary
        return out

    def _input_cast(self, in_dtype: np.dtype):
        """A function: chunk of real values (of ``in_dtype``) -> codes in the arithmetic's
        dtype."""
        t = self.graph.input_type
        dtype = self.dtype
        if not self.float_mode:
            return lambda c: to_codes(c, t)
        round_ = _IN_PLACE_ROUNDING.get(t.rounding.value)
        if (t.fractional < 0 or in_dtype.kind not in "fiu" or round_ is None
                or t.overflow not in (Overflow.SAT, Overflow.SAT_SYM)):
            # scaling down can underflow to zero, other modes need the kernel: to_codes
            return lambda c: to_codes(c, t, as_float=True).astype(dtype, copy=False)
        # clamp in real units, then scale by 2**f (f >= 0): the same as scaling first (the
        # scaling is exact and monotone, the bounds are exact), but nothing can overflow;
        # a float32 input is clamped and scaled in float32, exactly
        work = (np.float32 if dtype is np.float32 and in_dtype.kind == "f"
                and in_dtype.itemsize <= 4 else np.float64)
        scale = work(2.0**t.fractional)
        low = t.qmin if t.overflow is Overflow.SAT else kernel.sat_sym_low(t.width, t.signed)
        low, high = work(low / 2.0**t.fractional), work(t.qmax / 2.0**t.fractional)
        check = in_dtype.kind == "f"

        def first(c: np.ndarray) -> np.ndarray:
            if check and not np.isfinite(c).all():
                raise ValueError("cannot cast non-finite values (NaN or inf) to a fixed-point "
                                 "type")
            scaled = np.clip(c, low, high, out=np.empty(c.shape, work))
            scaled *= scale
            round_(scaled, out=scaled)
            return scaled if work is dtype else scaled.astype(dtype)

        return first

    def _plan(self, keep: bool) -> _Plan:
        plan = self._plans.get(keep)
        if plan is None:
            plan = self._plans[keep] = _build_plan(self, keep)
        return plan


def emulate(graph: QGraph, x) -> np.ndarray:
    """Run ``graph`` on real-valued input ``x``; return int64 output codes."""
    return Emulator(graph).run(x)


# -- the execution plan ----------------------------------------------------------------
def _build_plan(em: Emulator, keep: bool) -> _Plan:
    """Steps for every node. Unless every tensor is kept: a ReLU whose cast clamps at 0
    anyway is skipped, a fresh buffer read by one node only is overwritten in place, and
    a cast's power-of-two scaling is folded into the constants of the product before it."""
    graph = em.graph
    consumers = graph.consumers()
    skip = set() if keep or not em.float_mode else _relus_done_by_their_cast(graph)
    alias = {}  # skipped ReLU output -> the tensor it stands for
    slots = {graph.input: 0}
    # a buffer may be overwritten if the emulator made it (not the caller) and only the
    # node at hand reads it; views (reshape) inherit that from a source read only by them
    owned: dict[str, bool] = {graph.input: False}

    def sole_reader(name: str) -> bool:
        return (not keep and name != graph.output and len(consumers.get(name, [])) == 1)

    folds = {} if keep or not em.float_mode else _cast_folds(em, consumers, skip)
    steps = []
    for node in graph.nodes:
        if node.name in skip:
            alias[node.output] = source = alias.get(node.inputs[0], node.inputs[0])
            owned[node.output] = owned[source] and sole_reader(node.inputs[0])
            continue
        inputs = [alias.get(name, name) for name in node.inputs]
        in_place = owned[node.inputs[0]] and sole_reader(node.inputs[0]) and \
            (len(inputs) == 1 or inputs[1] != inputs[0])
        fn = _BUILD[node.op](em, node, in_place, folds.get(node.name, 1.0))
        slots[node.output] = len(slots)
        owned[node.output] = in_place if node.op == "reshape" else True
        steps.append([fn, tuple(slots[name] for name in inputs), slots[node.output], ()])
    # free each buffer after its last reader
    last: dict[int, int] = {}
    for k, (_, ins, _, _) in enumerate(steps):
        for i in ins:
            last[i] = k
    out = slots[alias.get(graph.output, graph.output)]
    for i, k in last.items():
        if i != out and not keep:
            steps[k][3] = (*steps[k][3], i)
    return _Plan([tuple(s) for s in steps], slots, out)


def _cast_folds(em: Emulator, consumers, skip) -> dict[str, float]:
    """Cast nodes whose power-of-two scaling moves into the dense/conv2d before them.

    (x @ w + b) * 2**s = x @ (w * 2**s) + b * 2**s exactly: every product and partial
    sum is the exact one times 2**s, an integer below the format's bound times a power
    of two inside its exponent range. The cast then only clamps and rounds.
    """
    folds = {}
    producers = {n.output: n for n in em.graph.nodes}
    for node in em.graph.nodes:
        if node.op != "cast" or not _casts_in_place(em._type(node.output)):
            continue
        producer = producers.get(node.inputs[0])
        if producer is not None and producer.name in skip:  # look through a skipped ReLU
            if len(consumers[producer.inputs[0]]) != 1:
                continue
            producer = producers.get(producer.inputs[0])
        if (producer is None or producer.op not in ("dense", "conv2d")
                or producer.output == em.graph.output or len(consumers[producer.output]) != 1):
            continue
        shift = em._type(node.output).fractional - em._type(node.inputs[0]).fractional
        folds[producer.name] = 2.0**shift
        folds[node.name] = 0.0  # marks the cast: its input is already scaled
    return folds


# -- helpers ---------------------------------------------------------------------------
_IN_PLACE_ROUNDING = {"RND_CONV": np.rint, "TRN": np.floor, "TRN_ZERO": np.trunc}


def _cast_in_place(scaled: np.ndarray, t) -> np.ndarray:
    """Codes of ``scaled = value * 2**f`` (a float array) in type ``t``, overwriting it.

    The common modes (RND_CONV, TRN, TRN_ZERO with SAT or SAT_SYM) are done in place:
    clamp, then round, exactly as ``kernel.quantize_scaled`` does (clamping first is
    exact for monotone roundings that fix integers); fresh buffers would cost page
    faults. Other modes go through the kernel.
    """
    round_ = _IN_PLACE_ROUNDING.get(t.rounding.value)
    if round_ is None or t.overflow not in (Overflow.SAT, Overflow.SAT_SYM):
        return kernel.quantize_scaled(scaled, t.width, t.signed, t.rounding, t.overflow, np)
    low = t.qmin if t.overflow is Overflow.SAT else kernel.sat_sym_low(t.width, t.signed)
    np.clip(scaled, low, t.qmax, out=scaled)
    return round_(scaled, out=scaled)


def _relus_done_by_their_cast(graph: QGraph) -> set[str]:
    """ReLU nodes whose only consumer is an in-place cast to an unsigned saturating type:
    the cast's clamp to [0, qmax] maps negative values to code 0, as ReLU first would, so
    the ReLU pass can be skipped (not when every tensor is kept)."""
    consumers = graph.consumers()
    skip = set()
    for node in graph.nodes:
        users = consumers.get(node.output, [])
        if node.op != "relu" or node.output == graph.output or len(users) != 1:
            continue
        t = graph.tensors[users[0].output].type
        if users[0].op == "cast" and not t.signed and _casts_in_place(t):
            skip.add(node.name)
    return skip


def _casts_in_place(t) -> bool:
    return (t.rounding.value in _IN_PLACE_ROUNDING
            and t.overflow in (Overflow.SAT, Overflow.SAT_SYM))


def _chunk_size(graph: QGraph, itemsize: int) -> int:
    """Samples per pass, from the largest per-sample tensor or im2col buffer."""
    peak = 1
    for node in graph.nodes:
        per_sample = int(np.prod(graph.tensors[node.output].shape))
        if node.op == "conv2d":
            per_sample *= int(np.prod(node.consts["weight"].shape[1:]))
        peak = max(peak, per_sample)
    return max(64, CHUNK_BYTES // (peak * itemsize))


def _windows(x: np.ndarray, kernel, stride, padding, dilation, pad_value) -> np.ndarray:
    """(N, C, H, W) -> (N, C, Ho, Wo, kh, kw) views of the padded input."""
    ph, pw = padding
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    kh, kw = kernel
    dh, dw = dilation
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    win = sliding_window_view(x, span, axis=(2, 3))[..., ::dh, ::dw]
    return win[:, :, ::stride[0], ::stride[1]]


# -- preparation: aligned constants ----------------------------------------------------
def _prepare_weighted(em: Emulator, node: Node) -> dict:
    in_t, out_t = em._type(node.inputs[0]), em._type(node.output)
    c = node.consts
    frac = accumulator_frac(in_t.fractional, c["weight_frac"], c.get("bias_frac"))
    if frac != out_t.fractional:
        raise QGraphError(f"node {node.name!r} (op {node.op!r}): output type has "
                          f"{out_t.fractional} fractional bits, the products need {frac}")
    w = aligned_weights(c["weight"], c["weight_frac"], in_t.fractional, frac)
    dtype = em.dtype if em.float_mode else _product_dtype(w, max(-in_t.qmin, in_t.qmax))
    bias = None
    if "bias" in c:
        bias = aligned_bias(c["bias"], c["bias_frac"], frac).astype(em.dtype)
    return {"weight": w.astype(dtype), "dtype": dtype, "bias": bias}


def _prepare_scale_shift(em: Emulator, node: Node) -> dict:
    in_t, out_t = em._type(node.inputs[0]), em._type(node.output)
    c = node.consts
    frac = out_t.fractional
    return {
        "scale": aligned_weights(c["scale"], c["scale_frac"], in_t.fractional,
                                 frac).astype(em.dtype),
        "shift": aligned_bias(c["shift"], c["shift_frac"], frac).astype(em.dtype),
    }


_PREPARE = {"dense": _prepare_weighted, "conv2d": _prepare_weighted,
            "scale_shift": _prepare_scale_shift}


# -- step builders: (emulator, node, may overwrite input 0, folded scale) -> function ----
def _build_dense(em: Emulator, node: Node, in_place: bool, fold: float):
    p = em._prepared[node.name]
    codes = em.dtype
    wt = np.ascontiguousarray((p["weight"] * p["dtype"](fold)).T)  # (K, M): a plain GEMM
    bias = None if p["bias"] is None else p["bias"] * codes(fold)
    # the bias repeated for a whole chunk: a same-shape add is several times faster than
    # a broadcast one (made on first use, sliced for smaller batches)
    tiled = [] if bias is None else [bias]
    chunk = em._chunk

    def dense(x: np.ndarray) -> np.ndarray:
        acc = np.matmul(x if x.dtype == wt.dtype else x.astype(wt.dtype), wt)
        if acc.dtype != codes:
            acc = acc.astype(codes)
        if bias is not None:
            n = len(acc)
            tile = 16 < n <= chunk and acc.ndim == 2  # (tokens, features) inputs broadcast
            if tile and len(tiled) == 1:
                tiled.append(np.tile(bias, (chunk, 1)))
            acc += tiled[1][:n] if tile else bias
        return acc

    return dense


def _build_conv2d(em: Emulator, node: Node, in_place: bool, fold: float):
    p = em._prepared[node.name]
    a = node.attrs
    codes = em.dtype
    w = p["weight"] * p["dtype"](fold)
    bias = None if p["bias"] is None else (p["bias"] * codes(fold)).reshape(1, -1, 1, 1)
    out_ch, in_per_group, kh, kw = w.shape
    groups = a["groups"]
    per_group_out = out_ch // groups
    wts = [np.ascontiguousarray(w[g * per_group_out:(g + 1) * per_group_out]
                                .reshape(per_group_out, -1).T) for g in range(groups)]

    def conv2d(x: np.ndarray) -> np.ndarray:
        win = _windows(x.astype(p["dtype"], copy=False), (kh, kw), a["stride"],
                      a["padding"], a["dilation"], 0)
        n, _, ho, wo = win.shape[:4]
        outs = []
        for g in range(groups):
            cols = win[:, g * in_per_group:(g + 1) * in_per_group]  # N, Cg, Ho, Wo, kh, kw
            cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(n, ho, wo, -1)
            out = np.matmul(cols, wts[g])
            outs.append(out if out.dtype == codes else out.astype(codes))
        acc = outs[0] if groups == 1 else np.concatenate(outs, axis=-1)
        acc = np.ascontiguousarray(acc.transpose(0, 3, 1, 2))
        if bias is not None:
            acc += bias
        return acc

    return conv2d


def _channel_shape(ndim: int) -> tuple[int, ...]:
    return (1, -1) + (1,) * (ndim - 2)


def _build_scale_shift(em: Emulator, node: Node, in_place: bool, fold: float):
    p = em._prepared[node.name]
    ndim = 1 + len(em.graph.tensors[node.output].shape)
    scale, shift = (p[k].reshape(_channel_shape(ndim)) for k in ("scale", "shift"))

    def scale_shift(x: np.ndarray) -> np.ndarray:
        y = np.multiply(x, scale, out=x if in_place else None)
        y += shift
        return y

    return scale_shift


def _build_relu(em: Emulator, node: Node, in_place: bool, fold: float):
    zero = em.dtype(0)
    return lambda x: np.maximum(x, zero, out=x if in_place else None)


def _build_add(em: Emulator, node: Node, in_place: bool, fold: float):
    shapes = [tuple(em.graph.tensors[name].shape) for name in node.inputs]
    if shapes[0] != shapes[1]:  # a constant of the per-sample shape is add_const
        raise QGraphError(f"node {node.name!r} (op 'add'): inputs of shapes {shapes[0]} and "
                          f"{shapes[1]}: add takes tensors of the same shape")
    frac = em._type(node.output).fractional
    fa, fb = (em._type(name).fractional for name in node.inputs)
    ka, kb = em.dtype(1 << (frac - fa)), em.dtype(1 << (frac - fb))
    return lambda a, b: a * ka + b * kb


def _build_concat(em: Emulator, node: Node, in_place: bool, fold: float):
    frac = em._type(node.output).fractional
    scales = [em.dtype(1 << (frac - em._type(name).fractional)) for name in node.inputs]
    axis = 1 + int(node.attrs["axis"])  # the attribute excludes the batch dim

    def concat(*xs: np.ndarray) -> np.ndarray:
        return np.concatenate([x if k == 1 else x * k for x, k in zip(xs, scales, strict=True)],
                              axis=axis)

    return concat


def _build_maxpool2d(em: Emulator, node: Node, in_place: bool, fold: float):
    a = node.attrs
    if a["ceil_mode"]:
        raise QGraphError(f"node {node.name!r} (op maxpool2d): ceil_mode is not supported")
    low = -np.inf if em.float_mode else np.iinfo(np.int64).min
    return lambda x: _windows(x, a["kernel"], a["stride"], a["padding"], a["dilation"],
                             low).max(axis=(-2, -1))


def _build_avgpool2d(em: Emulator, node: Node, in_place: bool, fold: float):
    a = node.attrs
    recip = em.dtype(int(node.consts["reciprocal"]))
    return lambda x: _windows(x, a["kernel"], a["stride"], (0, 0), (1, 1),
                             0).sum(axis=(-2, -1)) * recip


def _build_global_avgpool2d(em: Emulator, node: Node, in_place: bool, fold: float):
    recip = em.dtype(int(node.consts["reciprocal"]))
    return lambda x: x.sum(axis=(-2, -1), keepdims=True) * recip


def _build_reshape(em: Emulator, node: Node, in_place: bool, fold: float):
    shape = tuple(node.attrs["shape"])
    return lambda x: x.reshape(x.shape[0], *shape)


def _build_cast(em: Emulator, node: Node, in_place: bool, fold: float):
    t = em._type(node.output)
    from_frac = em._type(node.inputs[0]).fractional
    if not em.float_mode:
        return lambda x: requantize(x, from_frac, t)
    # scaling by a power of two is exact (float_bounds checks the exponent range); with
    # fold == 0 the product before already did it
    scale = em.dtype(2.0 ** (t.fractional - from_frac))
    dtype = em.dtype
    if not _casts_in_place(t):
        return lambda x: _cast_in_place(x * scale, t).astype(dtype, copy=False)
    round_ = _IN_PLACE_ROUNDING[t.rounding.value]
    low = t.qmin if t.overflow is Overflow.SAT else kernel.sat_sym_low(t.width, t.signed)
    low, high = dtype(low), dtype(t.qmax)

    def cast(x: np.ndarray) -> np.ndarray:
        # as _cast_in_place, with the mode's functions and bounds looked up once
        if fold == 0.0:
            y = x if in_place else x.copy()
        else:
            y = np.multiply(x, scale, out=x if in_place else None)
        np.clip(y, low, high, out=y)
        return round_(y, out=y)

    return cast


def _build_sign(em: Emulator, node: Node, in_place: bool, fold: float):
    # x >= 0 is exact in every arithmetic (codes are integers; a float -0.0 compares
    # equal to 0 and gives +1, as sign(0) = +1 asks)
    one, minus_one = em.dtype(1), em.dtype(-1)
    return lambda x: np.where(x >= 0, one, minus_one)


_BUILD = {
    "dense": _build_dense,
    "conv2d": _build_conv2d,
    "scale_shift": _build_scale_shift,
    "relu": _build_relu,
    "add": _build_add,
    "maxpool2d": _build_maxpool2d,
    "avgpool2d": _build_avgpool2d,
    "global_avgpool2d": _build_global_avgpool2d,
    "reshape": _build_reshape,
    "concat": _build_concat,
    "cast": _build_cast,
    "sign": _build_sign,
    **TRANSFORMER_BUILDERS,  # softmax, layernorm, gelu, matmul and the token ops
}
