"""The hls4ml form of the transformer ops and token ops, and of dense layers on tokens.

Each QGraph node becomes one node of qflow's own layers (ONNX domain ``qflow``, named
after the QGraph node), whose attributes carry everything the C++ needs: the geometry in
hls4ml's memory order and, for the integer ops, every shift and every intermediate's
C++ type, sized from the spec's bounds (the ``*Widths`` of
:mod:`qflow.numerics.transformer`). The per-layer config sets ``result_t`` (and
``accum_t``, ``scale_t``) to the QGraph's types and ``convert.py`` reads them back:

================= ===========================================================================
QGraph op          hls4ml layer
================= ===========================================================================
softmax            ``FixedSoftmax`` (:mod:`.softmax`, ``hls/qflow_softmax.h``)
layernorm          ``FixedLayerNorm`` (:mod:`.layernorm`), gamma and beta codes in its config
gelu               ``FixedGELU`` (:mod:`.gelu`)
matmul             ``ActivationMatMul`` (:mod:`.matmul`), two inputs, per-sample matrices
transpose          ``FixedTranspose`` (:mod:`.transpose`), per-sample matrices; a transpose
                   there and back around a per-feature scale_shift and cast (a frozen
                   multiplier per output feature): BatchNormalization and cast on the
                   tokens, no transpose (:func:`token_feature_requant`)
slice              ``FixedSlice`` (:mod:`.token_slice`)
add_const          ``FixedAddConst`` (:mod:`.add_const`), the constant's codes in its config
mean               ``FixedMean`` (:mod:`.token_mean`), rank 1 or 2
dense on tokens    a channels-last ``Conv`` of width 1 → hls4ml's pointwise ``Conv1D``: hls4ml
(rank-2 input)     converts a MatMul on a rank-2 input with n_in and n_out taken over the whole
                   tensor (every output wrong), so the token-wise product is stated as the
                   1-wide convolution it is, bias included
================= ===========================================================================

Only io_parallel: in io_stream each of these refuses with a one-line error naming the
node (rows, matrices and token tables would need stream buffers of their own).
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from qflow.graph import transformer as tr
from qflow.graph.infer import type_for_range
from qflow.graph.ir import Node, QGraphError
from qflow.numerics import FixedType
from qflow.numerics.transformer import EXP_FRAC_BITS, GELU_CLIP_CODE

from .onnx_graph import (
    CHANNELS_LAST,
    QFLOW_DOMAIN,
    ZERO_BIAS_TYPE,
    HlsExportError,
    _emit_cast,
    _emit_scale_shift,
    _weights,
    channels_last,
    pool_sum_type,
    weight_type,
)


def _fail(node: Node, reason: str):
    raise HlsExportError(f"node {node.name!r} ({node.op}): {reason}")


def _rule(node: Node, check, *args):
    try:
        return check(node, *args)
    except QGraphError as exc:
        _fail(node, str(exc).split("): ", 1)[-1])


def _bits(n: int) -> int:
    return max(int(n).bit_length(), 1)


def int_type(bits: int, signed: bool) -> str:
    """The C++ integer type of ``bits`` bits (sign included when ``signed``)."""
    return f"ap_int<{bits}>" if signed else f"ap_uint<{bits}>"


def code_type(t: FixedType) -> str:
    """The C++ integer type of the codes of ``t``."""
    return int_type(t.width, t.signed)


def value_type(bits: int, frac: int, signed: bool = True) -> str:
    """The C++ fixed-point type of a ``bits``-bit integer read at ``frac`` fractional bits."""
    return f"ap_{'' if signed else 'u'}fixed<{bits}, {bits - frac}>"


def hls_axis(rank: int, axis: int) -> int:
    """Where QGraph axis ``axis`` (per sample) lies in hls4ml's channels-last order."""
    return {0: rank - 1, 1: 0, 2: 1}[axis] if rank == 3 else axis


def row_geometry(shape: tuple[int, ...], axis: int) -> dict[str, int]:
    """(outer, length, inner) of rows along ``axis`` in hls4ml's memory order."""
    hls_shape, at = channels_last(tuple(shape)), hls_axis(len(shape), axis)
    return {"n_in": int(np.prod(shape)), "outer": int(np.prod(hls_shape[:at])),
            "length": int(hls_shape[at]), "inner": int(np.prod(hls_shape[at + 1:]))}


def cast_bits(bits: int, frac: int, out_t: FixedType) -> int:
    """Bits of the integer a final cast reads: ``bits`` (its bound), widened by sign or
    zero extension until the bit below the output's LSB lies inside it, where ap_fixed's
    conversion looks for the rounding (a narrower source trips an ap_types assertion)."""
    return max(bits, frac - out_t.fractional + 2)


def _parallel(w, node: Node) -> None:
    """Refuse io_stream, and a node whose declared output disagrees with its op."""
    if w.io_type != "io_parallel":
        _fail(node, f"is exported to hls4ml in io_parallel only, not {w.io_type}")
    _rule(node, lambda n: tr.check_node(w.graph, n))


def _add(w, node: Node, op: str, inputs=None, **attrs) -> None:
    w.nodes.append(helper.make_node(op, w.names(inputs or node.inputs), [node.output],
                                    name=node.name, domain=QFLOW_DOMAIN, **attrs))


def emit_softmax(w, node: Node) -> None:
    _parallel(w, node)
    x, out_t = w.graph.tensors[node.inputs[0]], w.type(node.output)
    widths = _rule(node, tr.softmax_rule, x, out_t)
    k = widths.reciprocal_frac
    prod_bits = cast_bits(k + 1, k, out_t)
    _add(w, node, "FixedSoftmax", **row_geometry(x.shape, int(node.attrs["axis"])),
         arg_right=max(widths.arg_shift, 0), arg_left=max(-widths.arg_shift, 0),
         reciprocal_frac=k, code_t=code_type(x.type),
         diff_t=int_type(_bits(x.type.qmax - x.type.qmin), False),
         scaled_t=int_type(_bits(widths.max_scaled), False),
         arg_t=int_type(max(_bits(widths.max_scaled), _bits(widths.max_arg), 11), False),
         exp_t=int_type(EXP_FRAC_BITS + 1, False), sum_t=int_type(_bits(widths.max_sum), False),
         rec_t=int_type(k - EXP_FRAC_BITS + 1, False), prod_t=int_type(prod_bits, False),
         value_t=value_type(prod_bits, k, signed=False))
    w.layer(node.name, node.name, result=out_t)


def emit_layernorm(w, node: Node) -> None:
    _parallel(w, node)
    x, out_t = w.graph.tensors[node.inputs[0]], w.type(node.output)
    widths = _rule(node, tr.layernorm_rule, x, out_t)
    n = widths.row_length
    gamma, gamma_t, beta, beta_t = _rule(node, tr.layernorm_params, n)
    t = x.type
    largest = max(-t.qmin, t.qmax)
    value_frac = widths.norm_frac + gamma_t.fractional
    result_bits = cast_bits(_bits(widths.max_result) + 1, value_frac, out_t)
    k = widths.reciprocal_frac
    _add(w, node, "FixedLayerNorm", **row_geometry(x.shape, int(node.attrs["axis"])),
         var_bits=_bits(widths.max_moment), reciprocal_frac=k, norm_frac=widths.norm_frac,
         beta_shift=widths.beta_shift, code_t=code_type(t),
         sum_t=int_type(_bits(n * largest) + 1, True),
         squares_t=int_type(_bits(n * largest * largest), False),
         moment_t=int_type(_bits(widths.max_moment) + 2, True),
         var_t=int_type(_bits(widths.max_moment), False),
         centred_t=int_type(_bits(n * (t.qmax - t.qmin)) + 1, True),
         rec_t=int_type(k - 29, False), norm_t=int_type(_bits(widths.max_norm) + 1, True),
         gamma_t=code_type(gamma_t), beta_t=code_type(beta_t),
         affine_t=int_type(result_bits, True),
         value_t=value_type(result_bits, value_frac),
         gamma=np.broadcast_to(gamma, (n,)).tolist(), beta=np.broadcast_to(beta, (n,)).tolist())
    w.layer(node.name, node.name, result=out_t)


def emit_gelu(w, node: Node) -> None:
    _parallel(w, node)
    x, out_t = w.graph.tensors[node.inputs[0]], w.type(node.output)
    widths = _rule(node, tr.gelu_rule, x, out_t)
    left, right = max(-widths.arg_shift, 0), max(widths.arg_shift, 0)
    # |q * (1 + erf)| <= 2**(W - 1) * 2**37
    product_bits = cast_bits(x.type.width + 40, widths.product_frac, out_t)
    _add(w, node, "FixedGELU", n_in=int(np.prod(x.shape)), arg_right=right, arg_left=left,
         arg_limit=widths.arg_limit, code_t=code_type(x.type),
         mag_t=int_type(x.type.width, False),
         arg_t=int_type(max(x.type.width, _bits(widths.arg_limit << left),
                            _bits(GELU_CLIP_CODE)), False),
         prod_t=int_type(product_bits, True),
         value_t=value_type(product_bits, widths.product_frac))
    w.layer(node.name, node.name, result=out_t)


def emit_matmul(w, node: Node) -> None:
    _parallel(w, node)
    a, b = (w.graph.tensors[name] for name in node.inputs)
    if len(a.shape) != 2:
        _fail(node, f"operands of shape {a.shape}: only per-sample matrices (rank 2) are "
                    "exported to hls4ml")
    rows, depth, cols = _rule(node, tr.matmul_dims, a, b)
    out_t = w.type(node.output)
    _add(w, node, "ActivationMatMul", rows=rows, depth=depth, cols=cols,
         transpose_b=int(bool(node.attrs["transpose_b"])))
    w.layer(node.name, node.name, accum=out_t, result=out_t)


def token_feature_requant(graph, node: Node) -> tuple[Node, Node, Node] | None:
    """(scale_shift, cast, transpose back) when ``node`` transposes tokens (T, D) to
    (D, T) only for a per-row (per-feature) requantization: its one reader a scale_shift,
    whose one reader a cast, whose one reader the [1, 0] transpose back to (T, D). That
    is how a dense layer on tokens with a multiplier per output feature freezes (OFQ's
    StatsQ and LSQ layers). Element-wise ops commute with the transposes, so the chain is
    exported as a BatchNormalization on (T, D), scaling hls4ml's last axis, and a cast:
    no value moves. None for any other transpose."""
    if node.op != "transpose" or len(graph.tensors[node.inputs[0]].shape) != 2:
        return None
    readers = graph.consumers()
    chain = [node]
    for op in ("scale_shift", "cast", "transpose"):
        tensor = chain[-1].output
        nxt = readers.get(tensor, [])
        if tensor == graph.output or len(nxt) != 1 or nxt[0].op != op:
            return None
        chain.append(nxt[0])
    if not all(_swaps_axes(t) for t in (node, chain[-1])):
        return None
    return chain[1], chain[2], chain[3]


def requant_transposes(graph) -> set[str]:
    """Names of the transposes, opening and closing, of every
    :func:`token_feature_requant` chain of ``graph`` (not exported)."""
    names = set()
    for node in graph.nodes:
        chain = token_feature_requant(graph, node)
        if chain is not None:
            names.update((node.name, chain[2].name))
    return names


def _swaps_axes(node: Node) -> bool:
    perm = node.attrs.get("perm")
    return isinstance(perm, (list, tuple)) and [int(p) for p in perm] == [1, 0]


def _emit_feature_requant(w, node: Node, chain: tuple[Node, Node, Node]) -> None:
    scale_shift, cast, back = chain
    _parallel(w, back)
    w.extra_shapes[scale_shift.output] = w.shape(node.inputs[0])
    _emit_scale_shift(w, scale_shift, source=node.inputs[0], features_last=True)
    _emit_cast(w, cast, output=back.output)
    w.fused.update((scale_shift.name, cast.name, back.name))


def emit_transpose(w, node: Node) -> None:
    _parallel(w, node)
    chain = token_feature_requant(w.graph, node)
    if chain is not None:
        return _emit_feature_requant(w, node, chain)
    shape = w.graph.tensors[node.inputs[0]].shape
    if len(shape) != 2:
        _fail(node, f"a tensor of shape {shape}: only per-sample matrices (rank 2) are "
                    "transposed in hls4ml")
    _rule(node, tr.transpose_perm, 2)
    _add(w, node, "FixedTranspose", rows=shape[0], cols=shape[1])
    w.layer(node.name, node.name, result=w.type(node.output))


def emit_slice(w, node: Node) -> None:
    _parallel(w, node)
    shape = w.graph.tensors[node.inputs[0]].shape
    axis, start, stop = _rule(node, tr.slice_bounds, shape)
    geometry = row_geometry(shape, axis)
    _add(w, node, "FixedSlice", outer=geometry["outer"], in_len=geometry["length"],
         start=start, out_len=stop - start, inner=geometry["inner"],
         shape=list(w.shape(node.output)))
    w.layer(node.name, node.name, result=w.type(node.output))


def emit_mean(w, node: Node) -> None:
    _parallel(w, node)
    x, out_t = w.graph.tensors[node.inputs[0]], w.type(node.output)
    if len(x.shape) > 2:
        _fail(node, f"a mean over a tensor of shape {x.shape}: only rank 1 or 2 (tokens) "
                    "is exported to hls4ml")
    axis = int(node.attrs["axis"])
    geometry = row_geometry(x.shape, axis)
    recip = int(np.asarray(node.consts["reciprocal"]).reshape(-1)[0])
    scale = weight_type(np.array([recip]), int(node.attrs["reciprocal_frac"]))
    _add(w, node, "FixedMean", outer=geometry["outer"], length=geometry["length"],
         inner=geometry["inner"], reciprocal=recip, scale_code_t=code_type(scale),
         shape=list(w.shape(node.output)))
    w.layer(node.name, node.name, result=out_t, accum=pool_sum_type(x.type, geometry["length"]),
            scale=scale)


def emit_add_const(w, node: Node) -> None:
    _parallel(w, node)
    x = w.graph.tensors[node.inputs[0]]
    value, value_frac = _rule(node, tr.add_const_value, x)
    if value.ndim == 3:
        value = value.transpose(1, 2, 0)  # hls4ml's channels-last order
    t = type_for_range(min(int(value.min()), 0), max(int(value.max()), 0), value_frac)
    _add(w, node, "FixedAddConst", n_in=int(value.size), value_t=t.to_ap(),
         value_code_t=code_type(t), value=value.reshape(-1).tolist())
    w.layer(node.name, node.name, result=w.type(node.output))


def emit_token_dense(w, node: Node) -> None:
    """A dense layer on a rank-2 (tokens × features) input: a channels-last 1-wide Conv."""
    x, in_t, out_t = node.inputs[0], w.type(node.inputs[0]), w.type(node.output)
    if w.io_type != "io_parallel":
        _fail(node, f"a dense layer on tokens is exported to hls4ml in io_parallel only, "
                    f"not {w.io_type}")
    if x in w.xnor:
        _fail(node, "a binary dense layer on tokens is not exported to hls4ml")
    weight, w_type, b_type, bias = _weights(node, in_t)
    inputs = [*w.names([x]), w.init(f"{node.name}_weight", weight[:, None, :])]
    if bias is not None:
        inputs.append(w.init(f"{node.name}_b", bias))
    w.nodes.append(helper.make_node(
        "Conv", inputs, [node.output], name=node.name, domain=CHANNELS_LAST, kernel_shape=[1],
        strides=[1], pads=[0, 0], dilations=[1], group=1))
    w.layer(node.name, node.name, hls_name="Conv1D_{}", weight=w_type,
            bias=b_type or ZERO_BIAS_TYPE, accum=out_t, result=out_t)


EMITTERS = {
    "softmax": emit_softmax,
    "layernorm": emit_layernorm,
    "gelu": emit_gelu,
    "matmul": emit_matmul,
    "transpose": emit_transpose,
    "slice": emit_slice,
    "mean": emit_mean,
    "add_const": emit_add_const,
}
