"""The golden model: a QGraph run on numpy integer codes, batched and vectorized.

Two arithmetics give the same codes:
- ``"int64"``: codes are int64 arrays; products use float BLAS only where every
  partial sum provably stays below 2**24 (float32) or 2**53 (float64), else int64.
- ``"float64"`` (the default when the graph allows it): codes are held as float64
  arrays of integers. Every tensor is at most 52 bits wide and every partial sum of
  a product is below 2**53, so additions, products by powers of two, BLAS matrix
  products, floor/round and clipping are all exact; it is several times faster.
Tests run both on every model and configuration and require equal codes.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from qflow.numerics import Overflow, kernel, requantize, to_codes

from .infer import accumulator_frac, aligned_bias, aligned_weights
from .ir import Node, QGraph, QGraphError

#: float dtypes by the magnitude below which their integer sums are exact
_EXACT_DTYPES = ((2**24, np.float32), (2**53, np.float64))
#: values (per chunk) of the largest tensor or im2col buffer: small enough that numpy reuses
#: its buffers instead of faulting in fresh pages, large enough to amortize per-node overhead
CHUNK_VALUES = 1 << 16
_FLOAT_MAX_WIDTH = 52  # widest tensor the float64 arithmetic holds with room for a tie bit
ARITHMETICS = ("auto", "float64", "int64")


def _product_dtype(weight_obj: np.ndarray, max_abs_input: int):
    """The narrowest dtype in which every partial sum of x @ w.T is an exact integer.

    A partial sum is bounded by sum_j |w_j| * max|x|; below 2**24 (float32) or 2**53
    (float64) BLAS arithmetic is exact. Otherwise int64 (no BLAS, but exact).
    """
    rows = np.abs(weight_obj.reshape(weight_obj.shape[0], -1)).sum(axis=1)
    bound = int(rows.max()) * max_abs_input if rows.size else 0
    for limit, dtype in _EXACT_DTYPES:
        if bound < limit:
            return dtype
    return np.int64


def _matmul(x: np.ndarray, w: np.ndarray, codes_dtype) -> np.ndarray:
    """x (..., K) @ w (M, K).T, exact (x already in w's dtype), as ``codes_dtype``."""
    out = x @ w.T
    return out if out.dtype == codes_dtype else out.astype(codes_dtype)


class Emulator:
    """Runs a QGraph. Constants are aligned once, at construction.

    >>> # emulator = Emulator(QGraph.load("model.qgraph")); codes = emulator.run(x)
    """

    def __init__(self, graph: QGraph, arithmetic: str = "auto"):
        if arithmetic not in ARITHMETICS:
            raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
        self.graph = graph.validate()
        fits = max(t.type.width for t in graph.tensors.values()) <= _FLOAT_MAX_WIDTH
        if arithmetic == "float64" and not fits:
            raise QGraphError(f"a tensor is wider than {_FLOAT_MAX_WIDTH} bits: use int64")
        self.float_mode = arithmetic == "float64" or (arithmetic == "auto" and fits)
        self._chunk = _chunk_size(graph)
        self._relu_in_cast = _relus_done_by_their_cast(graph) if self.float_mode else set()
        self._prepared: dict[str, dict] = {}
        for node in graph.nodes:
            prepare = _PREPARE.get(node.op)
            if prepare is not None:
                self._prepared[node.name] = prepare(self, node)

    def _type(self, name: str):
        return self.graph.tensors[name].type

    def run(self, x) -> np.ndarray:
        """Real-valued input (batch first) -> int64 output codes."""
        x = np.asarray(x)
        self._check_shape(x)
        if not self.float_mode:
            return self.run_codes(to_codes(x, self.graph.input_type))
        t = self.graph.input_type
        if t.fractional < 0 or x.dtype.kind not in "fiu":
            # scaling down can underflow to zero: to_codes guards that
            return self._run_chunked(to_codes(x, t, as_float=True))
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ValueError("cannot cast non-finite values (NaN or inf) to a fixed-point type")
        scaled = np.multiply(x, 2.0**t.fractional, dtype=np.float64)  # one exact pass
        return self._run_chunked(_cast_in_place(scaled, t))

    def run_codes(self, codes: np.ndarray, *, keep: bool = False):
        """Input codes (batch first) -> output codes; with ``keep`` also every tensor."""
        codes = np.asarray(codes, dtype=np.int64)
        self._check_shape(codes)
        if self.float_mode:
            codes = codes.astype(np.float64)
        return self._run_chunk(codes, keep) if keep else self._run_chunked(codes)

    def _check_shape(self, x: np.ndarray) -> None:
        expected = tuple(self.graph.tensors[self.graph.input].shape)
        if tuple(x.shape[1:]) != expected:
            raise QGraphError(f"input has per-sample shape {tuple(x.shape[1:])}, the graph "
                              f"expects {expected}")

    def _run_chunked(self, codes: np.ndarray) -> np.ndarray:
        step = self._chunk
        if len(codes) <= step:
            return self._run_chunk(codes, False)
        return np.concatenate([self._run_chunk(codes[i:i + step], False)
                               for i in range(0, len(codes), step)])

    def _run_chunk(self, codes: np.ndarray, keep: bool):
        values = {self.graph.input: codes}
        for node in self.graph.nodes:
            args = [values[name] for name in node.inputs]
            if not keep and node.name in self._relu_in_cast:
                values[node.output] = args[0]  # its only consumer clamps at 0 anyway
                continue
            values[node.output] = _RUN[node.op](self, node, *args)
        if keep:
            return {k: v.astype(np.int64) for k, v in values.items()}
        return values[self.graph.output].astype(np.int64)

    def to_real(self, codes: np.ndarray) -> np.ndarray:
        return np.ldexp(codes.astype(np.float64), -self.graph.output_type.fractional)


_IN_PLACE_ROUNDING = {"RND_CONV": np.rint, "TRN": np.floor, "TRN_ZERO": np.trunc}


def _cast_in_place(scaled: np.ndarray, t) -> np.ndarray:
    """Codes (float64) of ``scaled = value * 2**f`` in type ``t``, overwriting ``scaled``.

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
    consumers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    skip = set()
    for node in graph.nodes:
        users = consumers.get(node.output, [])
        if node.op != "relu" or node.output == graph.output or len(users) != 1:
            continue
        t = graph.tensors[users[0].output].type
        if (users[0].op == "cast" and not t.signed and t.rounding.value in _IN_PLACE_ROUNDING
                and t.overflow in (Overflow.SAT, Overflow.SAT_SYM)):
            skip.add(node.name)
    return skip


def _chunk_size(graph: QGraph) -> int:
    """Samples per pass, from the largest per-sample tensor or im2col buffer."""
    peak = 1
    for node in graph.nodes:
        per_sample = int(np.prod(graph.tensors[node.output].shape))
        if node.op == "conv2d":
            per_sample *= int(np.prod(node.consts["weight"].shape[1:]))
        peak = max(peak, per_sample)
    return max(64, CHUNK_VALUES // peak)


def emulate(graph: QGraph, x) -> np.ndarray:
    """Run ``graph`` on real-valued input ``x``; return int64 output codes."""
    return Emulator(graph).run(x)


# -- preparation: aligned constants ----------------------------------------------------
def _prepare_weighted(em: Emulator, node: Node) -> dict:
    in_t, out_t = em._type(node.inputs[0]), em._type(node.output)
    c = node.consts
    frac = accumulator_frac(in_t.fractional, c["weight_frac"], c.get("bias_frac"))
    if frac != out_t.fractional:
        raise QGraphError(f"node {node.name!r} (op {node.op!r}): output type has "
                          f"{out_t.fractional} fractional bits, the products need {frac}")
    w = aligned_weights(c["weight"], c["weight_frac"], in_t.fractional, frac)
    dtype = _product_dtype(w, max(abs(in_t.qmin), abs(in_t.qmax)))
    if em.float_mode:
        if dtype is np.int64:
            raise QGraphError(f"node {node.name!r}: partial sums may reach 2**53; "
                              "use the int64 arithmetic")
        dtype = np.float64
    codes = np.float64 if em.float_mode else np.int64
    bias = None
    if "bias" in c:
        bias = aligned_bias(c["bias"], c["bias_frac"], frac).astype(codes)
    return {"weight": w.astype(dtype), "dtype": dtype, "bias": bias}


def _prepare_scale_shift(em: Emulator, node: Node) -> dict:
    in_t, out_t = em._type(node.inputs[0]), em._type(node.output)
    c = node.consts
    frac = out_t.fractional
    codes = np.float64 if em.float_mode else np.int64
    return {
        "scale": aligned_weights(c["scale"], c["scale_frac"], in_t.fractional, frac).astype(codes),
        "shift": aligned_bias(c["shift"], c["shift_frac"], frac).astype(codes),
    }


_PREPARE = {"dense": _prepare_weighted, "conv2d": _prepare_weighted,
            "scale_shift": _prepare_scale_shift}


# -- execution -------------------------------------------------------------------------
def _run_dense(em: Emulator, node: Node, x: np.ndarray) -> np.ndarray:
    p = em._prepared[node.name]
    acc = _matmul(x.astype(p["dtype"], copy=False), p["weight"], x.dtype)
    if p["bias"] is not None:
        acc += p["bias"]  # acc is a fresh array
    return acc


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


def _run_conv2d(em: Emulator, node: Node, x: np.ndarray) -> np.ndarray:
    p = em._prepared[node.name]
    a = node.attrs
    w = p["weight"]
    out_ch, in_per_group, kh, kw = w.shape
    groups = a["groups"]
    win = _windows(x.astype(p["dtype"], copy=False), (kh, kw), a["stride"], a["padding"],
                   a["dilation"], 0)
    n, _, ho, wo = win.shape[:4]
    outs = []
    per_group_out = out_ch // groups
    for g in range(groups):
        cols = win[:, g * in_per_group:(g + 1) * in_per_group]  # N, Cg, Ho, Wo, kh, kw
        cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(n, ho, wo, -1)
        wg = w[g * per_group_out:(g + 1) * per_group_out].reshape(per_group_out, -1)
        outs.append(_matmul(cols, wg, x.dtype))
    acc = np.concatenate(outs, axis=-1).transpose(0, 3, 1, 2)
    if p["bias"] is not None:
        acc = acc + p["bias"].reshape(1, -1, 1, 1)
    return np.ascontiguousarray(acc)


def _channel_shape(x: np.ndarray) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.ndim - 2)


def _run_scale_shift(em: Emulator, node: Node, x: np.ndarray) -> np.ndarray:
    p = em._prepared[node.name]
    shape = _channel_shape(x)
    return x * p["scale"].reshape(shape) + p["shift"].reshape(shape)


def _run_relu(em: Emulator, node: Node, x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def _run_add(em: Emulator, node: Node, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    frac = em._type(node.output).fractional
    fa, fb = (em._type(name).fractional for name in node.inputs)
    return a * (1 << (frac - fa)) + b * (1 << (frac - fb))


def _run_maxpool2d(em: Emulator, node: Node, x: np.ndarray) -> np.ndarray:
    a = node.attrs
    if a["ceil_mode"]:
        raise QGraphError(f"node {node.name!r} (op maxpool2d): ceil_mode is not supported")
    low = -np.inf if x.dtype == np.float64 else np.iinfo(np.int64).min
    win = _windows(x, a["kernel"], a["stride"], a["padding"], a["dilation"], low)
    return win.max(axis=(-2, -1))


def _run_avgpool2d(em: Emulator, node: Node, x: np.ndarray) -> np.ndarray:
    a = node.attrs
    win = _windows(x, a["kernel"], a["stride"], (0, 0), (1, 1), 0)
    return win.sum(axis=(-2, -1)) * int(node.consts["reciprocal"])


def _run_global_avgpool2d(em: Emulator, node: Node, x: np.ndarray) -> np.ndarray:
    return x.sum(axis=(-2, -1), keepdims=True) * int(node.consts["reciprocal"])


def _run_reshape(em: Emulator, node: Node, x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], *node.attrs["shape"])


def _run_cast(em: Emulator, node: Node, x: np.ndarray) -> np.ndarray:
    t = em._type(node.output)
    from_frac = em._type(node.inputs[0]).fractional
    if x.dtype != np.float64:
        return requantize(x, from_frac, t)
    # scaling by a power of two is exact; rounding and overflow are exact on floats
    return _cast_in_place(x * 2.0 ** (t.fractional - from_frac), t)


_RUN = {
    "dense": _run_dense,
    "conv2d": _run_conv2d,
    "scale_shift": _run_scale_shift,
    "relu": _run_relu,
    "add": _run_add,
    "maxpool2d": _run_maxpool2d,
    "avgpool2d": _run_avgpool2d,
    "global_avgpool2d": _run_global_avgpool2d,
    "reshape": _run_reshape,
    "cast": _run_cast,
}
