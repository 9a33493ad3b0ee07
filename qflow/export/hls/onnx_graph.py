"""The QONNX graph hls4ml's ONNX frontend reads, and the precision of every layer.

hls4ml wants a channels-last graph without Gemm, whose 4-D ops carry the
``qonnx.custom_op.channels_last`` domain. qflow writes that form directly from the
QGraph, one ONNX node (or node pair) per QGraph node, named after it, so that every
hls4ml layer keeps a QGraph name and its types can be set and read back by name. The
names are then made safe for hls4ml (identifiers starting with a letter, distinct
ignoring case: ``0`` becomes ``q_0``; :mod:`.names`), and ``sources`` keeps the QGraph
node of every hls4ml layer:

================= ==========================================================================
QGraph op          ONNX node(s) → hls4ml layer
================= ==========================================================================
dense              MatMul(x, W) → Dense ``<node>``; Add(bias) → fused into it as its bias
conv2d             Conv (channels-last, W and bias as initializers) → Conv2D ``<node>``;
                   depthwise (groups = channels in = channels out) → DepthwiseConv2D;
                   binary layers in hls4ml's XNOR form take W through a BipolarQuant
                   (:mod:`.binary`)
scale_shift        BatchNormalization (mean 0, variance 1, ε 0: scale and shift exactly);
                   on tokens (T, D) hls4ml scales the features D, so only a scale and shift
                   equal for every token (a product by a constant) are exported, or one per
                   feature between two transposes (:mod:`.transformer_graph`)
relu               Relu → Activation ``<node>``
add                Add of two tensors → Merge ``<node>``
maxpool2d          MaxPool (channels-last) → Pooling2D when unpadded; padded: qflow's
                   ``FixedMaxPool`` op, in which padded positions never take part
avgpool2d          AveragePool (hls4ml's Pooling2D) when 1/n is an exact power of two (its
                   division then equals qflow's multiplication); otherwise qflow's
                   ``FixedAvgPool`` op: the window sum times the reciprocal code
global_avgpool2d   the same over the whole plane
reshape            Flatten of the channels-last data, in (H, W, C) order: the dense layers
                   that read it take their weight columns in that order (through relu,
                   cast and per-feature scale_shift, whose constants are reordered too);
                   no Transpose
reshape and       a patch embedding's (C, H, W) → (C, H·W) reshape read only by a [1, 0]
transpose          transpose: one in-place Reshape of the channels-last (H, W, C) data to
                   (H·W, C) tokens (:func:`token_transpose`); any other reshape to rank 2
                   or more is refused
concat             Concat on the last (channels-last) axis → Concatenate ``<node>``; more
                   than two inputs become a chain of two-input Concats
softmax, ...       the transformer and token ops, and dense layers on tokens (rank-2
                   inputs): qflow's own layers, :mod:`.transformer_graph`
sign               qflow's ``FixedSign`` op: hls4ml's binary {0, 1} type when every reader
                   is an XNOR layer, else ``ap_fixed<2,2>`` (:mod:`.binary`, :mod:`.sign`)
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
from qflow.graph.infer import accumulator_frac, infer_concat, infer_weighted, type_for_range
from qflow.graph.ir import Node, QGraph
from qflow.numerics import FixedType, Overflow, Rounding

from .binary import XNOR, popcount_type, xnor_bias, xnor_tensors
from .names import SAME, rename_graph

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
    def __init__(self, graph: QGraph, io_type: str = "io_parallel", strategy: str = "Latency"):
        self.graph = graph
        self.io_type = io_type
        self.strategy = strategy
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.out = HlsGraph(model=None)
        #: shapes of helper tensors that are not QGraph tensors
        self.extra_shapes: dict[str, tuple[int, ...]] = {}
        #: ONNX node name -> the name hls4ml gives its layer (``{}``: the node's name)
        self.templates: dict[str, str] = {}
        #: names in use: QGraph nodes and tensors, then every helper name given out
        self.taken: set[str] = {INPUT_NAME, *graph.tensors, *(n.name for n in graph.nodes)}
        #: flattened tensors left in channels-last order -> the (C, H, W) they came from;
        #: the dense layers that read them take their weight columns in that order
        self.hwc_flat: dict[str, tuple[int, int, int]] = {}
        #: tensors in hls4ml's binary {0, 1} type, read by XNOR layers (:mod:`.binary`)
        self.xnor = xnor_tensors(graph)
        #: outputs of constant-only nodes (the BipolarQuant of binary weights): no batch
        self.const_shapes: dict[str, tuple[int, ...]] = {}
        #: nodes exported together with an earlier one (a patch embedding's transpose)
        self.fused: set[str] = set()

    def bipolar_weight(self, node: Node, values: np.ndarray) -> str:
        """±1 weights as hls4ml's binary constant: an initializer read through a
        ``BipolarQuant`` of scale 1, which hls4ml folds into the constant with its binary
        type and quantizer (+1 -> 1, -1 -> 0)."""
        init = self.init(f"{node.name}_weight", values)
        scale = self.init(f"{node.name}_weight_scale", np.array(1.0, np.float32))
        out = self.fresh(f"{node.name}_weight_bipolar")
        self.nodes.append(helper.make_node("BipolarQuant", [init, scale], [out], name=out,
                                           domain=QONNX_DOMAIN))
        self.const_shapes[out] = tuple(values.shape)
        return out

    def fresh(self, name: str) -> str:
        """``name``, or ``name_2``, ``name_3``, ... when a QGraph name or an earlier helper
        already has it (a helper named after its node never aliases another node)."""
        candidate, i = name, 1
        while candidate in self.taken:
            i += 1
            candidate = f"{name}_{i}"
        self.taken.add(candidate)
        return candidate

    def names(self, tensors: list[str]) -> list[str]:
        """ONNX names of QGraph tensors (hls4ml reserves the name ``input``)."""
        return [INPUT_NAME if t == self.graph.input else t for t in tensors]

    def shape(self, tensor: str) -> tuple[int, ...]:
        return channels_last(self.graph.tensors[tensor].shape)

    def type(self, tensor: str) -> FixedType:
        return self.graph.tensors[tensor].type

    def init(self, name: str, value: np.ndarray) -> str:
        name = self.fresh(name)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def layer(self, name: str, source: str, *, hls_name: str = SAME,
              **precisions: FixedType | str) -> None:
        """Precisions for ONNX node ``name`` of QGraph node ``source``; ``hls_name`` is the
        name hls4ml gives the layer, ``{}`` standing for the node's name (``Dense_{}``).
        A precision is a type or ``XNOR`` (hls4ml's binary type, :mod:`.binary`).
        The names are made safe for hls4ml afterwards (:mod:`.names`)."""
        if name in self.out.precisions:
            raise HlsExportError(f"node {source!r}: ONNX node name {name!r} is used twice")
        if "{}" not in hls_name:
            hls_name = hls_name.replace(name, SAME, 1) if name in hls_name else hls_name
        self.out.precisions[name] = {k: t if isinstance(t, str) else t.to_hls4ml()
                                     for k, t in precisions.items()}
        self.out.layer_names[name] = hls_name.format(name)
        self.out.sources[hls_name.format(name)] = source
        self.templates[name] = hls_name


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
    if len(w.graph.tensors[node.inputs[0]].shape) == 2:  # tokens: a 1-wide convolution
        from .transformer_graph import emit_token_dense

        return emit_token_dense(w, node)
    x, in_t, out_t = node.inputs[0], w.type(node.inputs[0]), w.type(node.output)
    weight, w_type, b_type, bias = _weights(node, in_t)
    frac = accumulator_frac(in_t.fractional, node.consts["weight_frac"],
                            node.consts.get("bias_frac"))
    if frac != out_t.fractional:
        raise HlsExportError(f"node {node.name!r} (dense): accumulator fraction {frac} "
                             f"differs from its output type {out_t.to_ap()}")
    if x in w.hwc_flat:
        # the input was flattened in channels-last (H, W, C) order: take the weight
        # columns in that order, so that every product pairs the same value and weight
        weight = weight[:, hwc_order(w.hwc_flat[x])]
    # hls4ml makes a Dense of the MatMul and an ApplyAlpha (x · 1 + bias) of the bias Add;
    # the product sum gets its own exact type, the sum with the bias the QGraph's
    product = node.output if bias is None else w.fresh(f"{node.name}_product")
    product_t = out_t if bias is None else infer_weighted(
        Node(node.op, node.name, node.inputs, node.output, node.attrs,
             {"weight": node.consts["weight"], "weight_frac": node.consts["weight_frac"]}),
        in_t)
    w.extra_shapes[product] = w.shape(node.output)
    if x in w.xnor:  # hls4ml's XNOR/popcount Dense: accum_t counts the matches
        weights, w_type, accum_t = w.bipolar_weight(node, weight.T), XNOR, popcount_type(node)
    else:
        weights, accum_t = w.init(f"{node.name}_weight", weight.T), product_t
    w.nodes.append(helper.make_node("MatMul", [*w.names([x]), weights], [product],
                                    name=node.name))
    w.layer(node.name, node.name, hls_name="Dense_{}", weight=w_type,
            bias=ZERO_BIAS_TYPE, accum=accum_t, result=product_t)
    if bias is not None:
        add = w.fresh(f"{node.name}_bias")
        w.nodes.append(helper.make_node("Add", [product, w.init(f"{node.name}_b", bias)],
                                        [node.output], name=add))
        w.layer(add, node.name, hls_name="bn_{}", bias=b_type, result=out_t)


def _emit_conv2d(w: _Writer, node: Node) -> None:
    x, in_t, out_t = node.inputs[0], w.type(node.inputs[0]), w.type(node.output)
    a = node.attrs
    groups = int(a["groups"])
    depthwise = groups > 1 and _is_depthwise(w.graph, node)
    if groups != 1 and not depthwise:
        raise HlsExportError(f"node {node.name!r} (conv2d): groups={groups} is not exported to "
                             "hls4ml: only ordinary (groups=1) and depthwise (groups = input "
                             "channels = output channels) convolutions are")
    if depthwise and w.strategy == "Resource":
        # io_parallel: its kernel only asserts; io_stream: its weights are reordered for
        # the ordinary convolution's kernel and then read in depthwise order
        raise HlsExportError(f"node {node.name!r} (conv2d): hls4ml 1.3's depthwise "
                             "convolution is not exact under the Resource strategy: use Latency")
    if tuple(a["dilation"]) != (1, 1):
        raise HlsExportError(f"node {node.name!r} (conv2d): dilation is not supported by "
                             "hls4ml")
    weight, w_type, b_type, bias = _weights(node, in_t)
    # channels-last convolutions keep their weights as (out, kh, kw, in / groups); hls4ml
    # turns a depthwise one, (C, kh, kw, 1), into its DepthwiseConv2D weights (kh, kw, C)
    weight = weight.transpose(0, 2, 3, 1)
    accum_t = out_t
    if x in w.xnor:  # hls4ml's XNOR/popcount Conv2D: the bias joins the count halved
        bias, b_type = xnor_bias(node)
        inputs = [*w.names([x]), w.bipolar_weight(node, weight)]
        w_type, accum_t = XNOR, popcount_type(node)
    else:
        inputs = [*w.names([x]), w.init(f"{node.name}_weight", weight)]
    if bias is not None:
        inputs.append(w.init(f"{node.name}_b", bias))
    ph, pw = a["padding"]
    w.nodes.append(helper.make_node(
        "Conv", inputs, [node.output], name=node.name, domain=CHANNELS_LAST,
        kernel_shape=list(node.consts["weight"].shape[2:]), strides=list(a["stride"]),
        pads=[ph, pw, ph, pw], dilations=[1, 1], group=groups))
    w.layer(node.name, node.name,
            hls_name="DepthwiseConv2D_{}" if depthwise else "Conv2D_{}", weight=w_type,
            bias=b_type or ZERO_BIAS_TYPE, accum=accum_t, result=out_t)


def _is_depthwise(graph: QGraph, node: Node) -> bool:
    """A convolution with one group per input channel and one output channel per group:
    hls4ml's DepthwiseConv2D (depth multiplier 1). Each output channel is the exact sum
    over its own input channel's window, products and sums in ``accum_t`` (the QGraph's
    exact accumulator), the zero padding included as the QGraph pads."""
    channels = graph.tensors[node.inputs[0]].shape[0]
    out_channels = node.consts["weight"].shape[0]
    return int(node.attrs["groups"]) == channels == out_channels


def _emit_scale_shift(w: _Writer, node: Node, *, source: str | None = None,
                      features_last: bool = False) -> None:
    """BatchNormalization of ``source`` (default: the node's input). ``features_last``:
    the node scales the rows of a transposed (features, tokens) tensor and is exported on
    ``source``, the (tokens, features) tensor before the transpose, where the rows are
    hls4ml's last axis (:func:`.transformer_graph.token_feature_requant`)."""
    c = node.consts
    source = source or node.inputs[0]
    s_codes, s_frac = common_grid(c["scale"], c["scale_frac"])
    h_codes, h_frac = common_grid(c["shift"], c["shift_frac"])
    n = len(s_codes)
    if source in w.hwc_flat and n > 1:  # per-feature constants, (H, W, C) order
        order = hwc_order(w.hwc_flat[source])
        s_codes, h_codes = s_codes[order], h_codes[order]
    shape = w.graph.tensors[source].shape
    if len(shape) == 2:
        # tokens (T, D): the QGraph scales along T, hls4ml's BatchNormalization along its
        # last axis D; equal when every token has the same scale and shift (a product by
        # a constant), which is then repeated D times; otherwise (per-token input scales)
        # the tokens go to the last axis and back (FixedTranspose)
        if w.io_type == "io_stream":
            raise HlsExportError(f"node {node.name!r} (scale_shift): token tensors are "
                                 "exported in io_parallel only")
        if not features_last and (len(set(s_codes.tolist())) > 1
                                  or len(set(h_codes.tolist())) > 1):
            return _emit_token_scale_shift(w, node, source, (s_codes, s_frac),
                                           (h_codes, h_frac))
        if not features_last or n == 1:  # one value for every token: repeat it D times
            n = shape[1]
            s_codes, h_codes = np.repeat(s_codes[:1], n), np.repeat(h_codes[:1], n)
    _batchnorm(w, node, w.names([source])[0], node.output, (s_codes, s_frac),
               (h_codes, h_frac), domain=CHANNELS_LAST if len(shape) in (2, 3) else "")


def _batchnorm(w: _Writer, node: Node, source: str, output: str, scale, shift, *,
               domain: str) -> None:
    """The BatchNormalization (mean 0, variance 1, ε 0) of ONNX tensor ``source`` into
    ``output`` that multiplies by ``scale`` and adds ``shift`` ((codes, fraction) each,
    one per channel of hls4ml's last axis), with their types; named after ``node``."""
    n = len(scale[0])
    names = [w.init(f"{node.name}_{k}", v) for k, v in (
        ("scale", _real(*scale)), ("shift", _real(*shift)),
        ("mean", np.zeros(n)), ("var", np.ones(n)))]
    w.nodes.append(helper.make_node("BatchNormalization", [source, *names], [output],
                                    name=node.name, epsilon=0.0, domain=domain))
    w.layer(node.name, node.name, scale=weight_type(*scale), bias=weight_type(*shift),
            result=w.type(node.output))


def _emit_token_scale_shift(w: _Writer, node: Node, source: str, scale, shift) -> None:
    """A scale and shift per token of a (T, D) tensor: FixedTranspose to (D, T), the
    BatchNormalization on hls4ml's last axis (now the tokens), FixedTranspose back. Pure
    data movement around the one rounding-free product."""
    tokens, depth = w.graph.tensors[source].shape
    turned, scaled = w.fresh(f"{node.name}_tokens_last"), w.fresh(f"{node.name}_scaled")
    back = w.fresh(f"{node.name}_tokens_first")
    w.extra_shapes[turned] = w.extra_shapes[scaled] = (depth, tokens)
    w.nodes.append(helper.make_node("FixedTranspose", w.names([source]), [turned],
                                    name=turned, domain=QFLOW_DOMAIN, rows=tokens, cols=depth))
    w.layer(turned, node.name, result=w.type(source))
    _batchnorm(w, node, turned, scaled, scale, shift, domain=CHANNELS_LAST)
    w.nodes.append(helper.make_node("FixedTranspose", [scaled], [node.output], name=back,
                                    domain=QFLOW_DOMAIN, rows=depth, cols=tokens))
    w.layer(back, node.name, result=w.type(node.output))


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
    in_t, out_t = w.type(node.inputs[0]), w.type(node.output)
    if not _holds(out_t, in_t):
        raise HlsExportError(f"node {node.name!r} (maxpool2d): output type {out_t.to_ap()} "
                             f"does not hold the input type {in_t.to_ap()}")
    ph, pw = a["padding"]
    if ph or pw:
        # padding never wins: qflow's FixedMaxPool (max_pool.py, hls/qflow_max_pool.h);
        # hls4ml's Pooling2D pads with a constant (in io_stream not at all)
        kh, kw = a["kernel"]
        if 2 * ph > kh or 2 * pw > kw:
            raise HlsExportError(f"node {node.name!r} (maxpool2d): padding {ph, pw} exceeds "
                                 f"half the kernel {kh, kw}: a window may hold no value")
        w.nodes.append(helper.make_node(
            "FixedMaxPool", w.names(node.inputs), [node.output], name=node.name,
            domain=QFLOW_DOMAIN, kernel_shape=[kh, kw], strides=list(a["stride"]),
            pads=[ph, pw, ph, pw]))
        w.layer(node.name, node.name, result=out_t)
        return
    w.nodes.append(helper.make_node(
        "MaxPool", w.names(node.inputs), [node.output], name=node.name, domain=CHANNELS_LAST,
        kernel_shape=list(a["kernel"]), strides=list(a["stride"]), pads=[0, 0, 0, 0]))
    w.layer(node.name, node.name, accum=out_t, result=out_t)


def _holds(out_t: FixedType, in_t: FixedType) -> bool:
    """Whether every value of ``in_t`` is a value of ``out_t`` (a copy is exact)."""
    shift = out_t.fractional - in_t.fractional
    return shift >= 0 and out_t.qmin <= in_t.qmin << shift and in_t.qmax << shift <= out_t.qmax


def _pool_accumulator(in_t: FixedType, count: int, out_t: FixedType) -> FixedType:
    """hls4ml sums the window in ``accum_t`` and then divides it by the count, keeping
    accum_t's fractional bits: the sum needs log2(count) more integer bits, the quotient
    log2(count) more fractional bits (equal to out_t's: f_out = f_in + log2 count)."""
    frac = out_t.fractional
    lo, hi = in_t.qmin * count, in_t.qmax * count
    shift = frac - in_t.fractional
    return type_for_range(min(lo, 0) << shift, hi << shift, frac)


def _divides_exactly(node: Node, count: int) -> bool:
    """hls4ml's average (the sum divided by the count) equals the QGraph's (the sum times
    the reciprocal code) when the count is a power of two and its reciprocal exact."""
    recip, rfrac = int(node.consts["reciprocal"]), int(node.attrs["reciprocal_frac"])
    return _is_power_of_two(count) and recip * count == 2**rfrac


def pool_sum_type(in_t: FixedType, count: int) -> FixedType:
    """The type of a window sum of ``count`` values of type ``in_t``: every partial sum
    fits (the full ranges contain the partial ones), no fractional bit is added."""
    return type_for_range(min(in_t.qmin, 0) * count, max(in_t.qmax, 0) * count,
                          in_t.fractional)


def _emit_average(w: _Writer, node: Node, kernel: tuple[int, int],
                  stride: tuple[int, int]) -> None:
    in_t, out_t = w.type(node.inputs[0]), w.type(node.output)
    count = kernel[0] * kernel[1]
    if _divides_exactly(node, count):
        # hls4ml's Pooling2D: exact here (the GlobalAveragePool handler would read the
        # channel count from the channels-first position: a whole-plane AveragePool)
        w.nodes.append(helper.make_node(
            "AveragePool", w.names(node.inputs), [node.output], name=node.name,
            domain=CHANNELS_LAST, kernel_shape=list(kernel), strides=list(stride),
            pads=[0, 0, 0, 0]))
        w.layer(node.name, node.name, result=out_t,
                accum=_pool_accumulator(in_t, count, out_t))
        return
    # any other window: qflow's FixedAvgPool (avg_pool.py, hls/qflow_avg_pool.h), the sum
    # times the reciprocal code exactly as the QGraph computes it
    recip, rfrac = int(node.consts["reciprocal"]), int(node.attrs["reciprocal_frac"])
    if out_t.fractional != in_t.fractional + rfrac:
        raise HlsExportError(f"node {node.name!r} ({node.op}): output fraction "
                             f"{out_t.fractional} is not the input's plus the reciprocal's")
    w.nodes.append(helper.make_node(
        "FixedAvgPool", w.names(node.inputs), [node.output], name=node.name,
        domain=QFLOW_DOMAIN, kernel_shape=list(kernel), strides=list(stride),
        reciprocal=recip))
    w.layer(node.name, node.name, result=out_t, accum=pool_sum_type(in_t, count),
            scale=weight_type(np.array([recip]), rfrac))


def _emit_avgpool2d(w: _Writer, node: Node) -> None:
    _emit_average(w, node, tuple(node.attrs["kernel"]), tuple(node.attrs["stride"]))


def _emit_global_avgpool2d(w: _Writer, node: Node) -> None:
    _, h, wd = w.graph.tensors[node.inputs[0]].shape
    _emit_average(w, node, (h, wd), (h, wd))


def hwc_order(chw: tuple[int, int, int]) -> np.ndarray:
    """Positions in a (C, H, W)-flattened vector of the values of the (H, W, C)-flattened
    one: ``hwc_vector = chw_vector[hwc_order(chw)]``.

    >>> hwc_order((2, 1, 3)).tolist()
    [0, 3, 1, 4, 2, 5]
    """
    return np.arange(int(np.prod(chw))).reshape(chw).transpose(1, 2, 0).reshape(-1)


#: ops that act on each element alone (scale_shift: per feature, its constants reordered)
_ORDER_FREE = ("relu", "cast", "scale_shift", "sign")


def _read_by_dense_only(graph: QGraph, tensor: str) -> bool:
    """Whether every path from ``tensor`` goes through element-wise ops only to dense
    layers (never to the graph output or another op)."""
    readers = graph.consumers()
    todo = [tensor]
    while todo:
        t = todo.pop()
        if t == graph.output or not readers.get(t):
            return False
        for r in readers[t]:
            if r.op in _ORDER_FREE:
                todo.append(r.output)
            elif r.op != "dense":
                return False
    return True


def token_transpose(graph: QGraph, node: Node) -> Node | None:
    """The ``transpose`` that makes tokens of ``node``'s reshape, when the pair is a patch
    embedding's ``flatten(2).transpose(1, 2)``: a (C, H, W) tensor reshaped to (C, H·W),
    read only by a [1, 0] transpose to (H·W, C). In hls4ml's channels-last memory the
    (H, W, C) tensor already is the (H·W, C) token matrix, token-major, so the pair moves
    no value: it is exported as one in-place Reshape. None for any other reshape."""
    if node.op != "reshape" or node.output == graph.output:
        return None
    in_shape = tuple(graph.tensors[node.inputs[0]].shape)
    out_shape = tuple(graph.tensors[node.output].shape)
    if len(in_shape) != 3 or out_shape != (in_shape[0], in_shape[1] * in_shape[2]):
        return None
    readers = graph.consumers().get(node.output, [])
    if len(readers) != 1 or readers[0].op != "transpose":
        return None
    perm = readers[0].attrs.get("perm")
    return readers[0] if perm is not None and [int(p) for p in perm] == [1, 0] else None


def _emit_token_reshape(w: _Writer, node: Node, transpose: Node) -> None:
    """``node`` and ``transpose`` (:func:`token_transpose`) as one hls4ml Reshape of the
    channels-last (H, W, C) tensor to (H·W, C), named after the reshape; its result is
    the transpose's output tensor."""
    shape = w.shape(transpose.output)
    target = w.init(f"{node.name}_shape", np.array([-1, *shape], dtype=np.int64))
    w.nodes.append(helper.make_node("Reshape", [*w.names(node.inputs), target],
                                    [transpose.output], name=node.name))
    w.layer(node.name, node.name, result=w.type(transpose.output))
    w.fused.add(transpose.name)


def _emit_reshape(w: _Writer, node: Node) -> None:
    src = node.inputs[0]
    in_shape = w.graph.tensors[src].shape
    out_shape = w.graph.tensors[node.output].shape
    transpose = token_transpose(w.graph, node)
    if transpose is not None:
        return _emit_token_reshape(w, node, transpose)
    if len(out_shape) != 1:
        raise HlsExportError(f"node {node.name!r} (reshape): only flattening is exported to "
                             f"hls4ml, not a reshape to {out_shape}")
    readers = w.graph.consumers().get(node.output, [])
    if (w.io_type == "io_stream" and len(in_shape) == 3 and in_shape[1] * in_shape[2] > 1
            and (node.output == w.graph.output or any(r.op != "dense" for r in readers))):
        # hls4ml streams the input one pixel (C values) per word and the flattened tensor
        # as one word, but passes the stream on unchanged: only its Dense reads it right
        other = next((r for r in readers if r.op != "dense"), None)
        reader = f"read by {other.name!r} ({other.op})" if other else "the graph output"
        raise HlsExportError(f"node {node.name!r} (reshape): in io_stream a flattened "
                             f"{'x'.join(map(str, in_shape))} tensor must be read by dense "
                             f"layers only, not {reader}: use io_parallel")
    if len(in_shape) == 3 and in_shape[0] > 1 and in_shape[1] * in_shape[2] > 1:
        # channels-last data flattens in (H, W, C) order, the QGraph's in (C, H, W). No
        # value is moved: the dense layers that read the result take their weight columns
        # in (H, W, C) order (and per-feature scale_shift constants on the way, in the same
        # order). A Transpose layer is not used: hls4ml's io_parallel pass
        # RemoveTransposeBeforeFlatten removes one in front of a Dense, and in io_stream a
        # Flatten of its output is read with the wrong packing.
        if not _read_by_dense_only(w.graph, node.output):
            raise HlsExportError(
                f"node {node.name!r} (reshape): flattening a "
                f"{'x'.join(map(str, in_shape))} tensor is exported only when dense layers "
                "read the result (through relu, cast or scale_shift): hls4ml keeps "
                "channels-last order")
        w.hwc_flat[node.output] = tuple(in_shape)
    w.nodes.append(helper.make_node("Flatten", w.names([src]), [node.output], name=node.name,
                                    axis=1))
    w.layer(node.name, node.name,
            result=XNOR if node.output in w.xnor else w.type(node.output))


def _emit_concat(w: _Writer, node: Node) -> None:
    """Channel concatenation: hls4ml's Concatenate joins two tensors along the last
    (channels-last) axis, so n inputs become a chain of n - 1 Concat nodes, each with a
    result type that holds every value of its inputs (the last one the QGraph's type):
    hls4ml's copy into the result type is then exact."""
    ins = node.inputs
    out_t = w.type(node.output)
    rank = len(w.graph.tensors[ins[0]].shape)
    last = {3: 0, 2: 1, 1: 0}.get(rank)  # the axis hls4ml keeps last (channels, features)
    if int(node.attrs["axis"]) != last:
        raise HlsExportError(f"node {node.name!r} (concat): only concatenation along the "
                             f"channel or feature axis (axis {last} here) is exported to "
                             f"hls4ml, not axis {node.attrs['axis']}")
    needed = infer_concat([w.type(t) for t in ins])
    shift = out_t.fractional - needed.fractional
    if shift < 0 or out_t.qmin > needed.qmin << shift or out_t.qmax < needed.qmax << shift:
        raise HlsExportError(f"node {node.name!r} (concat): type {out_t.to_ap()} does not "
                             f"hold its inputs' values ({needed.to_ap()})")
    if len(ins) == 1:
        raise HlsExportError(f"node {node.name!r} (concat): a concatenation of one tensor "
                             "has no hls4ml layer")
    acc, acc_types, acc_shape = ins[0], [w.type(ins[0])], list(w.shape(ins[0]))
    for i, src in enumerate(ins[1:], 1):
        last = i == len(ins) - 1
        name = node.name if last else w.fresh(f"{node.name}_{i}")
        acc_types.append(w.type(src))
        acc_shape[-1] += w.shape(src)[-1]
        result = out_t if last else infer_concat(acc_types)
        if not last:
            w.extra_shapes[name] = tuple(acc_shape)
        w.nodes.append(helper.make_node("Concat", w.names([acc, src]), [name], name=name,
                                        axis=-1))
        w.layer(name, node.name, result=result)
        acc = name


def _emit_cast(w: _Writer, node: Node, *, output: str | None = None) -> None:
    """The cast of the node's input into ``output`` (default: the node's output)."""
    out_t = w.type(node.output)
    output = output or node.output
    mode = _quant_mode(out_t)
    if mode is None:
        w.nodes.append(helper.make_node(
            "FixedCast", w.names(node.inputs), [output], name=node.name, domain=QFLOW_DOMAIN,
            qflow_type=out_t.to_ap()))
        w.layer(node.name, node.name, result=out_t)
        return
    rounding, narrow = mode
    scale = w.init(f"{node.name}_scale", np.array(2.0 ** -out_t.fractional, np.float32))
    zero = w.init(f"{node.name}_zeropt", np.array(0.0, np.float32))
    bits = w.init(f"{node.name}_bitwidth", np.array(float(out_t.width), np.float32))
    w.nodes.append(helper.make_node(
        "Quant", [*w.names(node.inputs), scale, zero, bits], [output], name=node.name,
        domain=QONNX_DOMAIN, signed=int(out_t.signed), narrow=narrow, rounding_mode=rounding))
    # hls4ml turns the Quant into a linear Activation called <node>_act
    w.layer(node.name, node.name, hls_name="{}_act", result=out_t)


def _emit_sign(w: _Writer, node: Node) -> None:
    """qflow's FixedSign (:mod:`.sign`): hls4ml's binary type when every reader is an XNOR
    layer (:mod:`.binary`), else ``ap_fixed<2,2>`` holding ±1."""
    xnor = node.output in w.xnor
    w.nodes.append(helper.make_node("FixedSign", w.names(node.inputs), [node.output],
                                    name=node.name, domain=QFLOW_DOMAIN, xnor=int(xnor)))
    w.layer(node.name, node.name, result=XNOR if xnor else w.type(node.output))


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
    "concat": _emit_concat,
    "cast": _emit_cast,
    "sign": _emit_sign,
}


def _rename(w: _Writer) -> dict[str, str]:
    """Give every ONNX node, tensor and initializer a name hls4ml reads as it is
    (:mod:`.names`), and key what qflow expects of each layer by the new names; the
    QGraph node each hls4ml layer implements is kept (``sources``)."""
    source_of = {k: w.out.sources[w.out.layer_names[k]] for k in w.out.precisions}
    new = rename_graph(w.nodes, w.inits, [INPUT_NAME], w.templates)
    precisions, layer_names, sources = {}, {}, {}
    for old, value in w.out.precisions.items():
        name = new[old]
        hls = w.templates[old].format(name)
        precisions[name], layer_names[name], sources[hls] = value, hls, source_of[old]
    w.out.precisions, w.out.layer_names, w.out.sources = precisions, layer_names, sources
    return new


def hls_graph(graph: QGraph, io_type: str = "io_parallel",
              strategy: str = "Latency") -> HlsGraph:
    """The channels-last QONNX model hls4ml converts in ``io_type`` under ``strategy``,
    with every layer's precisions."""
    w = _Writer(graph, io_type, strategy)
    in_shape = w.shape(graph.input)
    w.layer(INPUT_NAME, graph.input, result=graph.input_type)
    from .transformer_graph import EMITTERS as TRANSFORMER_EMITTERS

    for node in graph.nodes:
        if node.name in w.fused:
            continue
        emitter = EMITTERS.get(node.op) or TRANSFORMER_EMITTERS.get(node.op)
        if emitter is None:
            raise HlsExportError(f"node {node.name!r}: op {node.op!r} has no hls4ml mapping")
        emitter(w, node)
        if node.op in _ORDER_FREE and node.inputs[0] in w.hwc_flat:
            w.hwc_flat[node.output] = w.hwc_flat[node.inputs[0]]
    out_shape = w.shape(graph.output)
    shapes = {name: w.shape(name) for name in graph.tensors} | w.extra_shapes
    shapes[INPUT_NAME] = in_shape
    new = _rename(w)  # names hls4ml reads safely, whatever the QGraph's names are
    shapes = {new[k]: v for k, v in shapes.items() if k in new}
    output = new[graph.output]

    def value_info(name: str, shape) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *shape])

    onnx_graph = helper.make_graph(
        w.nodes, "qflow_hls", [value_info(INPUT_NAME, in_shape)],
        [value_info(output, out_shape)], w.inits)
    model = helper.make_model(onnx_graph, opset_imports=[
        helper.make_opsetid("", 13), helper.make_opsetid(QONNX_DOMAIN, 1),
        helper.make_opsetid(CHANNELS_LAST, 1), helper.make_opsetid(QFLOW_DOMAIN, 1)],
        producer_name="qflow")
    model.metadata_props.extend(
        onnx.StringStringEntryProto(key=f"qflow.type.{name}", value=t.type.to_ap())
        for name, t in graph.tensors.items())
    consts = {new[k]: v for k, v in w.const_shapes.items()}
    model.graph.value_info.extend(
        helper.make_tensor_value_info(out, TensorProto.FLOAT, list(consts[out])) if out in consts
        else value_info(out, shapes[out]) for n in w.nodes for out in n.output if out != output)
    model.graph.value_info.extend(  # hls4ml reads constant shapes from value_info too
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in w.inits)
    w.out.model = model
    w.out.input_shape, w.out.output_shape = in_shape, out_shape
    return w.out
