"""The QONNX graph hls4ml's ONNX frontend reads, and the precision of every layer.

hls4ml wants a channels-last graph without Gemm, whose 4-D ops carry the
``qonnx.custom_op.channels_last`` domain. qflow writes that form directly from the
QGraph, one ONNX node (or node pair) per QGraph node, named after it, so that every
hls4ml layer keeps a QGraph name and its types can be set and read back by name:

================= ==========================================================================
QGraph op          ONNX node(s) → hls4ml layer
================= ==========================================================================
dense              MatMul(x, W) → Dense ``<node>``; Add(bias) → fused into it as its bias
conv2d             Conv (channels-last, W and bias as initializers) → Conv2D ``<node>``
scale_shift        BatchNormalization (mean 0, variance 1, ε 0: scale and shift exactly)
relu               Relu → Activation ``<node>``
add                Add of two tensors → Merge ``<node>``
maxpool2d          MaxPool (channels-last) → Pooling2D
avgpool2d          AveragePool, power-of-two window only (hls4ml divides; qflow multiplies
                   by 1/n, equal only for n = 2^k)
global_avgpool2d   AveragePool over the whole plane, power-of-two H·W only
reshape            Flatten (a Transpose first when channels-last order differs)
cast               Quant (scale 2^-f, zero point 0) when hls4ml can state the mode
                   (RND_CONV or TRN, with SAT, or SAT_SYM on a signed type); otherwise
                   qflow's ``FixedCast`` op, which hls4ml reads through the handler and
                   C++ template qflow registers (``qflow/export/hls/custom.py``)
================= ==========================================================================

Weights are float initializers holding the exact quantized values; one weight type per
layer has the finest fractional bits of any output channel, so per-channel binary points
stay exact (at the cost of a wider operand). The precisions come from the QGraph, never
from hls4ml's inference: :func:`layer_precisions` gives every layer's strings and
``convert.py`` checks them after conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qflow.errors import QflowError
from qflow.graph.infer import accumulator_frac, infer_weighted, type_for_range
from qflow.graph.ir import Node, QGraph
from qflow.numerics import FixedType, Overflow, Rounding

CHANNELS_LAST = "qonnx.custom_op.channels_last"
QONNX_DOMAIN = "qonnx.custom_op.general"
QFLOW_DOMAIN = "qflow"
INPUT_NAME = "qflow_input"

#: QGraph cast modes that hls4ml's Quant handler states exactly
_QUANT_ROUNDING = {Rounding.RND_CONV: "ROUND", Rounding.TRN: "FLOOR"}


class HlsExportError(QflowError):
    """A QGraph that cannot go to hls4ml exactly."""


@dataclass
class HlsGraph:
    """The ONNX model for hls4ml and what qflow expects of each hls4ml layer."""

    model: onnx.ModelProto
    #: ONNX node name -> {precision key -> hls4ml precision string} (hls4ml's config)
    precisions: dict[str, dict[str, str]] = field(default_factory=dict)
    #: ONNX node name -> name of the hls4ml layer it becomes
    layer_names: dict[str, str] = field(default_factory=dict)
    #: hls4ml layer name -> QGraph node it implements
    sources: dict[str, str] = field(default_factory=dict)
    #: per-sample input shape hls4ml sees (channels last)
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()


def channels_last(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(C, H, W) -> (H, W, C); other ranks are unchanged."""
    return (*shape[1:], shape[0]) if len(shape) == 3 else tuple(shape)


def weight_type(codes: np.ndarray, frac: int) -> FixedType:
    """The narrowest type holding ``codes`` with ``frac`` fractional bits (TRN/WRAP:
    the values are exact, nothing is ever rounded)."""
    lo, hi = int(codes.min(initial=0)), int(codes.max(initial=0))
    return type_for_range(min(lo, 0), max(hi, 0), frac)


#: the type of the all-zero bias hls4ml gives a Dense or Conv2D that has none
ZERO_BIAS_TYPE = weight_type(np.zeros(1, np.int64), 0)


def common_grid(codes: np.ndarray, fracs: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-channel codes moved onto one binary point: the finest of the channels."""
    fracs = np.asarray(fracs, dtype=np.int64)
    top = int(fracs.max())
    shape = (-1,) + (1,) * (codes.ndim - 1)
    shifted = codes.astype(object) * (2 ** (top - fracs).astype(object)).reshape(shape)
    if max(abs(int(shifted.min(initial=0))), int(shifted.max(initial=0))) >= 2**52:
        raise HlsExportError("per-channel weights on one binary point need more than 52 bits")
    return shifted.astype(np.int64), top


def _real(codes: np.ndarray, frac: int) -> np.ndarray:
    return np.ldexp(codes.astype(np.float64), -frac)


def _quant_mode(t: FixedType) -> tuple[str, int] | None:
    """(rounding_mode, narrow) when hls4ml's Quant handler yields exactly type ``t``."""
    if t.rounding not in _QUANT_ROUNDING:
        return None
    if t.overflow == Overflow.SAT:
        return _QUANT_ROUNDING[t.rounding], 0
    if t.overflow == Overflow.SAT_SYM and t.signed:
        return _QUANT_ROUNDING[t.rounding], 1
    return None


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class _Writer:
    def __init__(self, graph: QGraph):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.out = HlsGraph(model=None)
        #: shapes of helper tensors that are not QGraph tensors
        self.extra_shapes: dict[str, tuple[int, ...]] = {}

    def names(self, tensors: list[str]) -> list[str]:
        """ONNX names of QGraph tensors (hls4ml reserves the name ``input``)."""
        return [INPUT_NAME if t == self.graph.input else t for t in tensors]

    def shape(self, tensor: str) -> tuple[int, ...]:
        return channels_last(self.graph.tensors[tensor].shape)

    def type(self, tensor: str) -> FixedType:
        return self.graph.tensors[tensor].type

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def layer(self, name: str, source: str, *, hls_name: str | None = None,
              **precisions: FixedType) -> None:
        """Precisions for ONNX node ``name``; hls4ml calls the layer ``hls_name``."""
        self.out.precisions[name] = {k: t.to_hls4ml() for k, t in precisions.items()}
        self.out.layer_names[name] = hls_name or name
        self.out.sources[hls_name or name] = source


def _weights(node: Node, in_t: FixedType) -> tuple[np.ndarray, FixedType, FixedType | None,
                                                   np.ndarray | None]:
    """Weight values and type, bias values and type, all on common binary points."""
    c = node.consts
    w_codes, w_frac = common_grid(c["weight"], c["weight_frac"])
    w_type = weight_type(w_codes, w_frac)
    bias = b_type = None
    if "bias" in c:
        b_codes, b_frac = common_grid(c["bias"], c["bias_frac"])
        b_type = weight_type(b_codes, b_frac)
        bias = _real(b_codes, b_frac)
    return _real(w_codes, w_frac), w_type, b_type, bias


def _emit_dense(w: _Writer, node: Node) -> None:
    x, in_t, out_t = node.inputs[0], w.type(node.inputs[0]), w.type(node.output)
    weight, w_type, b_type, bias = _weights(node, in_t)
    frac = accumulator_frac(in_t.fractional, node.consts["weight_frac"],
                            node.consts.get("bias_frac"))
    if frac != out_t.fractional:
        raise HlsExportError(f"node {node.name!r} (dense): accumulator fraction {frac} "
                             f"differs from its output type {out_t.to_ap()}")
    # hls4ml makes a Dense of the MatMul and an ApplyAlpha (x · 1 + bias) of the bias Add;
    # the product sum gets its own exact type, the sum with the bias the QGraph's
    product = node.output if bias is None else f"{node.name}_product"
    product_t = out_t if bias is None else infer_weighted(
        Node(node.op, node.name, node.inputs, node.output, node.attrs,
             {"weight": node.consts["weight"], "weight_frac": node.consts["weight_frac"]}),
        in_t)
    w.extra_shapes[product] = w.shape(node.output)
    w.nodes.append(helper.make_node("MatMul", [*w.names([x]), w.init(f"{node.name}_weight",
                                                                     weight.T)],
                                    [product], name=node.name))
    w.layer(node.name, node.name, hls_name=f"Dense_{node.name}", weight=w_type,
            bias=ZERO_BIAS_TYPE, accum=product_t, result=product_t)
    if bias is not None:
        add = f"{node.name}_bias"
        w.nodes.append(helper.make_node("Add", [product, w.init(f"{node.name}_b", bias)],
                                        [node.output], name=add))
        w.layer(add, node.name, hls_name=f"bn_{add}", bias=b_type, result=out_t)


def _emit_conv2d(w: _Writer, node: Node) -> None:
    x, in_t, out_t = node.inputs[0], w.type(node.inputs[0]), w.type(node.output)
    a = node.attrs
    if a["groups"] != 1:
        raise HlsExportError(f"node {node.name!r} (conv2d): groups={a['groups']}: hls4ml's "
                             "ONNX frontend reads only ordinary convolutions")
    if tuple(a["dilation"]) != (1, 1):
        raise HlsExportError(f"node {node.name!r} (conv2d): dilation is not supported by "
                             "hls4ml")
    weight, w_type, b_type, bias = _weights(node, in_t)
    # channels-last convolutions keep their weights as (out, kh, kw, in)
    inputs = [*w.names([x]), w.init(f"{node.name}_weight", weight.transpose(0, 2, 3, 1))]
    if bias is not None:
        inputs.append(w.init(f"{node.name}_b", bias))
    ph, pw = a["padding"]
    w.nodes.append(helper.make_node(
        "Conv", inputs, [node.output], name=node.name, domain=CHANNELS_LAST,
        kernel_shape=list(node.consts["weight"].shape[2:]), strides=list(a["stride"]),
        pads=[ph, pw, ph, pw], dilations=[1, 1], group=1))
    w.layer(node.name, node.name, hls_name=f"Conv2D_{node.name}", weight=w_type,
            bias=b_type or ZERO_BIAS_TYPE, accum=out_t, result=out_t)


def _emit_scale_shift(w: _Writer, node: Node) -> None:
    c = node.consts
    s_codes, s_frac = common_grid(c["scale"], c["scale_frac"])
    h_codes, h_frac = common_grid(c["shift"], c["shift_frac"])
    n = len(s_codes)
    names = [w.init(f"{node.name}_{k}", v) for k, v in (
        ("scale", _real(s_codes, s_frac)), ("shift", _real(h_codes, h_frac)),
        ("mean", np.zeros(n)), ("var", np.ones(n)))]
    rank = len(w.graph.tensors[node.inputs[0]].shape)
    w.nodes.append(helper.make_node(
        "BatchNormalization", [*w.names(node.inputs), *names], [node.output], name=node.name,
        epsilon=0.0, domain=CHANNELS_LAST if rank == 3 else ""))
    out_t = w.type(node.output)
    w.layer(node.name, node.name, scale=weight_type(s_codes, s_frac),
            bias=weight_type(h_codes, h_frac), result=out_t)


def _emit_relu(w: _Writer, node: Node) -> None:
    w.nodes.append(helper.make_node("Relu", w.names(node.inputs), [node.output], name=node.name))
    w.layer(node.name, node.name, result=w.type(node.output))


def _emit_add(w: _Writer, node: Node) -> None:
    w.nodes.append(helper.make_node("Add", w.names(node.inputs), [node.output], name=node.name))
    w.layer(node.name, node.name, result=w.type(node.output))


def _emit_maxpool2d(w: _Writer, node: Node) -> None:
    a = node.attrs
    if tuple(a["dilation"]) != (1, 1) or a["ceil_mode"]:
        raise HlsExportError(f"node {node.name!r} (maxpool2d): dilation or ceil_mode is not "
                             "supported by hls4ml")
    ph, pw = a["padding"]
    if ph or pw:
        raise HlsExportError(f"node {node.name!r} (maxpool2d): padded max pooling is not "
                             "exact in hls4ml (it pads with zeros)")
    w.nodes.append(helper.make_node(
        "MaxPool", w.names(node.inputs), [node.output], name=node.name, domain=CHANNELS_LAST,
        kernel_shape=list(a["kernel"]), strides=list(a["stride"]), pads=[0, 0, 0, 0]))
    out_t = w.type(node.output)
    w.layer(node.name, node.name, accum=out_t, result=out_t)


def _pool_accumulator(in_t: FixedType, count: int, out_t: FixedType) -> FixedType:
    """hls4ml sums the window in ``accum_t`` and then divides it by the count, keeping
    accum_t's fractional bits: the sum needs log2(count) more integer bits, the quotient
    log2(count) more fractional bits (equal to out_t's: f_out = f_in + log2 count)."""
    frac = out_t.fractional
    lo, hi = in_t.qmin * count, in_t.qmax * count
    shift = frac - in_t.fractional
    return type_for_range(min(lo, 0) << shift, hi << shift, frac)


def _check_reciprocal(node: Node, count: int) -> None:
    recip, rfrac = int(node.consts["reciprocal"]), int(node.attrs["reciprocal_frac"])
    if not _is_power_of_two(count) or recip * count != 2**rfrac:
        raise HlsExportError(
            f"node {node.name!r} ({node.op}): averaging {count} values is not exact in "
            "hls4ml (it divides by the count; qflow multiplies by a rounded 1/n): only "
            "power-of-two windows are exported")


def _emit_avgpool2d(w: _Writer, node: Node) -> None:
    a = node.attrs
    count = int(np.prod(a["kernel"]))
    _check_reciprocal(node, count)
    w.nodes.append(helper.make_node(
        "AveragePool", w.names(node.inputs), [node.output], name=node.name, domain=CHANNELS_LAST,
        kernel_shape=list(a["kernel"]), strides=list(a["stride"]), pads=[0, 0, 0, 0]))
    out_t = w.type(node.output)
    w.layer(node.name, node.name, result=out_t,
            accum=_pool_accumulator(w.type(node.inputs[0]), count, out_t))


def _emit_global_avgpool2d(w: _Writer, node: Node) -> None:
    _, h, wd = w.graph.tensors[node.inputs[0]].shape
    count = h * wd
    _check_reciprocal(node, count)
    # an AveragePool over the whole plane: hls4ml's GlobalAveragePool handler reads the
    # channel count from the channels-first position
    w.nodes.append(helper.make_node(
        "AveragePool", w.names(node.inputs), [node.output], name=node.name,
        domain=CHANNELS_LAST, kernel_shape=[h, wd], strides=[h, wd], pads=[0, 0, 0, 0]))
    out_t = w.type(node.output)
    w.layer(node.name, node.name, result=out_t,
            accum=_pool_accumulator(w.type(node.inputs[0]), count, out_t))


def _emit_reshape(w: _Writer, node: Node) -> None:
    src = node.inputs[0]
    in_shape = w.graph.tensors[src].shape
    out_shape = w.graph.tensors[node.output].shape
    if len(out_shape) != 1:
        raise HlsExportError(f"node {node.name!r} (reshape): only flattening is exported to "
                             f"hls4ml, not a reshape to {out_shape}")
    if len(in_shape) == 3 and in_shape[0] > 1 and in_shape[1] * in_shape[2] > 1:
        # channels-last data flattens in (H, W, C) order; the QGraph flattens (C, H, W)
        moved = f"{node.name}_to_chw"
        w.extra_shapes[moved] = tuple(in_shape)
        w.nodes.append(helper.make_node("Transpose", w.names([src]), [moved], name=moved,
                                        perm=[0, 3, 1, 2]))
        w.layer(moved, node.name, result=w.type(src))
        src = moved
    w.nodes.append(helper.make_node("Flatten", w.names([src]), [node.output], name=node.name,
                                    axis=1))
    w.layer(node.name, node.name, result=w.type(node.output))


def _emit_cast(w: _Writer, node: Node) -> None:
    out_t = w.type(node.output)
    mode = _quant_mode(out_t)
    if mode is None:
        w.nodes.append(helper.make_node(
            "FixedCast", w.names(node.inputs), [node.output], name=node.name, domain=QFLOW_DOMAIN,
            qflow_type=out_t.to_ap()))
        w.layer(node.name, node.name, result=out_t)
        return
    rounding, narrow = mode
    scale = w.init(f"{node.name}_scale", np.array(2.0 ** -out_t.fractional, np.float32))
    zero = w.init(f"{node.name}_zeropt", np.array(0.0, np.float32))
    bits = w.init(f"{node.name}_bitwidth", np.array(float(out_t.width), np.float32))
    w.nodes.append(helper.make_node(
        "Quant", [*w.names(node.inputs), scale, zero, bits], [node.output], name=node.name,
        domain=QONNX_DOMAIN, signed=int(out_t.signed), narrow=narrow, rounding_mode=rounding))
    # hls4ml turns the Quant into a linear Activation called <node>_act
    w.layer(node.name, node.name, hls_name=f"{node.name}_act", result=out_t)


EMITTERS = {
    "dense": _emit_dense,
    "conv2d": _emit_conv2d,
    "scale_shift": _emit_scale_shift,
    "relu": _emit_relu,
    "add": _emit_add,
    "maxpool2d": _emit_maxpool2d,
    "avgpool2d": _emit_avgpool2d,
    "global_avgpool2d": _emit_global_avgpool2d,
    "reshape": _emit_reshape,
    "cast": _emit_cast,
}


def hls_graph(graph: QGraph) -> HlsGraph:
    """The channels-last QONNX model hls4ml converts, with every layer's precisions."""
    w = _Writer(graph)
    in_shape = w.shape(graph.input)
    w.layer(INPUT_NAME, graph.input, result=graph.input_type)
    for node in graph.nodes:
        emitter = EMITTERS.get(node.op)
        if emitter is None:
            raise HlsExportError(f"node {node.name!r}: op {node.op!r} has no hls4ml mapping")
        emitter(w, node)
    out_shape = w.shape(graph.output)

    def value_info(name: str, shape) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *shape])

    onnx_graph = helper.make_graph(
        w.nodes, "qflow_hls", [value_info(INPUT_NAME, in_shape)],
        [value_info(graph.output, out_shape)], w.inits)
    model = helper.make_model(onnx_graph, opset_imports=[
        helper.make_opsetid("", 13), helper.make_opsetid(QONNX_DOMAIN, 1),
        helper.make_opsetid(CHANNELS_LAST, 1), helper.make_opsetid(QFLOW_DOMAIN, 1)],
        producer_name="qflow")
    model.metadata_props.extend(
        onnx.StringStringEntryProto(key=f"qflow.type.{name}", value=t.type.to_ap())
        for name, t in graph.tensors.items())
    shapes = {name: w.shape(name) for name in graph.tensors} | w.extra_shapes
    shapes[INPUT_NAME] = in_shape
    model.graph.value_info.extend(
        value_info(out, shapes[out]) for n in w.nodes for out in n.output
        if out != graph.output)
    model.graph.value_info.extend(  # hls4ml reads constant shapes from value_info too
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in w.inits)
    w.out.model = model
    w.out.input_shape, w.out.output_shape = in_shape, out_shape
    return w.out
