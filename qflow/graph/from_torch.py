"""``freeze``: a QFX model (eval mode) -> QGraph with integer constants and exact types."""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from qflow.api import QUANTIZED_TYPES
from qflow.biper.layers import BINARY_TYPES, BinaryConv2d, BinaryLinear
from qflow.dyadic.layers import DYADIC_TYPES, DyadicConv2d, DyadicLinear
from qflow.errors import QflowError
from qflow.nn import (
    QAdaptiveAvgPool2d,
    QAdd,
    QAvgPool2d,
    QBatchNorm1d,
    QBatchNorm2d,
    QCat,
    QConv2d,
    QInput,
    QLinear,
    QMaxPool2d,
    QMulConst,
    QReLU,
)
from qflow.nn.elementwise import RECIPROCAL_TYPE, _reciprocal
from qflow.numerics import FixedType
from qflow.ofq.layers import STATSQ_TYPES, StatsQConv2d, StatsQLinear
from qflow.ofq.lsq import LSQ_TYPES, LSQConv2d, LSQLinear
from qflow.quantizers import FixedQuantizer

from . import from_torch_transformer as transformer_freeze
from . import infer
from .ir import Node, QGraph, TensorInfo


class FreezeError(QflowError):
    """The model holds something that has no exact integer form."""


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, QUANTIZED_TYPES + BINARY_TYPES + STATSQ_TYPES + LSQ_TYPES
                                 + DYADIC_TYPES)
                or super().is_leaf_module(m, qualname))


_RAW = object()  # the float model input, before the input quantizer


def _to_codes(values: torch.Tensor, fracs: np.ndarray, where: str) -> np.ndarray:
    """Integer codes of quantized values, one fraction per output channel (axis 0)."""
    v = values.detach().to(torch.float64).cpu().numpy()
    shape = (-1,) + (1,) * (v.ndim - 1)
    scaled = np.ldexp(v, fracs.reshape(shape) if v.ndim else int(fracs.reshape(-1)[0]))
    codes = np.rint(scaled)
    if not np.array_equal(codes, scaled):
        raise FreezeError(f"{where}: quantized values are not on their fixed-point grid")
    return codes.astype(np.int64)


def _fracs(quant: FixedQuantizer, channels: int) -> np.ndarray:
    fracs = np.array([t.fractional for t in quant.fixed_types()], dtype=np.int64)
    return np.broadcast_to(fracs, (channels,)).copy() if fracs.size == 1 else fracs


class _Builder:
    def __init__(self, model: nn.Module):
        self.model = model
        self.tensors: dict[str, TensorInfo] = {}
        self.nodes: list[Node] = []
        self.names: set[str] = set()
        self.input: str | None = None  # the graph input, once the input quantizer is seen

    def unique(self, name: str) -> str:
        base, i = name.replace(".", "_"), 1
        name = base
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def add(self, op, name, inputs, shape, out_type, *, attrs=None, consts=None, source=""):
        name = self.unique(name)
        self.tensors[name] = TensorInfo(name, tuple(int(s) for s in shape), out_type)
        self.nodes.append(Node(op, name, list(inputs), name, attrs or {}, consts or {}, source))
        return name

    def type_of(self, tensor: str):
        return self.tensors[tensor].type

    def shape_of(self, tensor: str):
        return self.tensors[tensor].shape

    def cast(self, name, src, quant: FixedQuantizer, source):
        return self.add("cast", f"{name}_cast", [src], self.shape_of(src), quant.fixed_type(),
                        source=source)


def _per_sample_shape(fx_node: fx.Node) -> tuple[int, ...]:
    meta = fx_node.meta.get("tensor_meta")
    if meta is None:
        raise FreezeError(f"node {fx_node.name}: output is not a single tensor")
    return tuple(meta.shape[1:])


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _freeze_weighted(b: _Builder, name, module, src, shape):
    x_dummy = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        weight_q, bias_q = module.quantized_parameters(x_dummy)
    channels = weight_q.shape[0]
    weight_frac = _fracs(module.weight_quant, channels)
    consts = {"weight": _to_codes(weight_q, weight_frac, f"{name}.weight"),
              "weight_frac": weight_frac}
    if bias_q is not None:
        bias_frac = _fracs(module.bias_quant, channels)
        consts["bias"] = _to_codes(bias_q, bias_frac, f"{name}.bias")
        consts["bias_frac"] = bias_frac
    if isinstance(module, QConv2d):
        op, attrs = "conv2d", _conv_attrs(module)
    else:
        op, attrs = "dense", {}
    probe = Node(op, name, [src], name, attrs, consts)
    out_type = infer.infer_weighted(probe, b.type_of(src))
    return b.add(op, name, [src], shape, out_type, attrs=attrs, consts=consts, source=name)


def _conv_attrs(module: nn.Conv2d) -> dict:
    return {"stride": _pair(module.stride), "padding": _pair(module.padding),
            "dilation": _pair(module.dilation), "groups": int(module.groups)}


def _freeze_binary(b: _Builder, name, module, src, shape):
    """A binary layer: ``sign`` -> ``conv2d``/``dense`` with ±1 weight codes (fraction
    0, no bias) -> ``scale_shift`` (α, bias and BatchNorm folded) -> ``cast``."""
    if module.current_stage != 2:
        raise FreezeError(f"{name}: a BiPer layer in stage 1 has real-valued weights; switch "
                          "it to stage 2 (qflow.biper.start_stage(model, 2)) and train it first")
    signs = b.add("sign", f"{name}_sign", [src], b.shape_of(src),
                  infer.infer_sign(b.type_of(src)), source=name)
    with torch.no_grad():
        weight = module.weight_signs(torch.float64)
        scale_q, shift_q = module.quantized_scale_shift(torch.float64)
    channels = weight.shape[0]
    consts = {"weight": _to_codes(weight, np.zeros(channels, np.int64), f"{name}.weight"),
              "weight_frac": np.zeros(channels, dtype=np.int64)}
    op, attrs = ("conv2d", _conv_attrs(module)) if isinstance(module, BinaryConv2d) else (
        "dense", {})
    probe = Node(op, name, [signs], name, attrs, consts)
    acc = b.add(op, name, [signs], shape, infer.infer_weighted(probe, b.type_of(signs)),
                attrs=attrs, consts=consts, source=name)
    scale_frac = _fracs(module.scale_quant, channels)
    consts = {"scale": _to_codes(scale_q, scale_frac, f"{name}.scale"), "scale_frac": scale_frac}
    if shift_q is None:
        consts.update(shift=np.zeros(channels, np.int64), shift_frac=np.zeros(channels, np.int64))
    else:
        shift_frac = _fracs(module.shift_quant, channels)
        consts.update(shift=_to_codes(shift_q, shift_frac, f"{name}.shift"), shift_frac=shift_frac)
    ss_name = f"{name}_scale_shift"
    probe = Node("scale_shift", ss_name, [acc], ss_name, {}, consts)
    ss_type = infer.infer_scale_shift(probe, b.type_of(acc))
    out = b.add("scale_shift", ss_name, [acc], shape, ss_type, consts=consts, source=name)
    return b.cast(name, out, module.out_quant, name)


def _freeze_input_codes(b: _Builder, name, module, src):
    """A layer's input as integer codes (``module.input_quant``): a ``scale_shift`` (the
    input multiplier on every channel, or each token's on its token, no shift) and a
    ``cast`` to the integer type."""
    codes, fracs = (t.cpu().numpy() for t in module.input_quant.multipliers())
    scaled, scaled_type = _scale_every_channel(b, f"{name}_input_scale", src, codes, fracs,
                                               source=name, needs="input codes need")
    _check_float64(name, module, b.type_of(src), scaled_type)
    return b.add("cast", f"{name}_input_codes", [scaled], b.shape_of(src),
                 module.input_quant.input_type(), source=name)


def _check_float64(name, module, given: FixedType, result: FixedType) -> None:
    """QAT eval computes a multiplier ``scale_shift`` (``given`` times a B-bit
    multiplier, then the shift) in float64: exact while ``result``, the type that holds
    every value it can take, has at most 53 bits; refuse the layer otherwise."""
    if result.width > 53:
        raise FreezeError(
            f"{name}: a {given.width}-bit tensor times a {module.multiplier_bits}-bit "
            f"multiplier needs {result.width} bits, more than float64's 53 significant "
            "bits: QAT eval would round; lower multiplier_bits or the widths")


def _freeze_statsq(b: _Builder, name, module, src, shape):
    """A StatsQ, LSQ or dyadic layer: its input codes when it has them (a ``scale_shift``
    and a ``cast``: dyadic layers, OFQ's LSQ activations), ``conv2d``/``dense`` with the
    integer weight codes (StatsQ: the odd 2k + 1, LSQ and dyadic: k; fraction 0, no
    bias) -> ``scale_shift`` (per-row multiplier codes with their own fractions, the bias
    as the shift) -> ``cast`` to the layer's output type. A dense layer on tokens
    (features last) is transposed around the ``scale_shift``, which scales the first
    per-sample axis."""
    if module.input_quant is not None:
        src = _freeze_input_codes(b, name, module, src)
    with torch.no_grad():
        weight = module.deployed_codes()
        scale, scale_frac = (t.cpu().numpy() for t in module.multiplier())
        bias_q = module.quantized_bias(torch.float64)
    channels = weight.shape[0]
    consts = {"weight": _to_codes(weight, np.zeros(channels, np.int64), f"{name}.weight"),
              "weight_frac": np.zeros(channels, dtype=np.int64)}
    op, attrs = ("conv2d", _conv_attrs(module)) if isinstance(module, nn.Conv2d) else (
        "dense", {})
    if getattr(module, "qkr_head_dim", None):  # OFQ's QKR: the estimate reports its cost
        attrs = {"qkr_head_dim": int(module.qkr_head_dim)}
    probe = Node(op, name, [src], name, attrs, consts)
    acc = b.add(op, name, [src], shape, infer.infer_weighted(probe, b.type_of(src)),
                attrs=attrs, consts=consts, source=name)
    tokens = module.token_multiplier()
    if tokens is not None:  # per-token input scales: each token's 1/m_in first
        codes, fracs = (t.cpu().numpy() for t in tokens)
        given = b.type_of(acc)
        acc, acc_type = _scale_every_channel(b, f"{name}_token_scale", acc, codes, fracs,
                                             source=name, needs="per-token scales need")
        _check_float64(name, module, given, acc_type)
        acc = b.add("cast", f"{name}_token_codes", [acc], b.shape_of(acc),
                    module.token_type(), source=name)
    rank = len(shape)
    turned = isinstance(module, nn.Linear) and rank > 1
    if turned:  # (..., features) -> (features, ...)
        perm = [rank - 1, *range(rank - 1)]
        acc = transformer_freeze._op(b, "transpose", f"{name}_features_first", [acc],
                                     tuple(shape[p] for p in perm), attrs={"perm": perm},
                                     source=name)
    consts = {"scale": scale.astype(np.int64), "scale_frac": scale_frac.astype(np.int64)}
    if bias_q is None:
        consts.update(shift=np.zeros(channels, np.int64), shift_frac=np.zeros(channels, np.int64))
    else:
        shift_frac = _fracs(module.bias_quant, channels)
        consts.update(shift=_to_codes(bias_q, shift_frac, f"{name}.bias"), shift_frac=shift_frac)
    ss_name = f"{name}_scale_shift"
    probe = Node("scale_shift", ss_name, [acc], ss_name, {}, consts)
    ss_type = infer.infer_scale_shift(probe, b.type_of(acc))
    _check_float64(name, module, b.type_of(acc), ss_type)
    out = b.add("scale_shift", ss_name, [acc], b.shape_of(acc), ss_type, consts=consts,
                source=name)
    out = b.cast(name, out, module.out_quant, name)
    if turned:  # back to (..., features)
        perm = [*range(1, rank), 0]
        out = transformer_freeze._op(b, "transpose", f"{name}_features_last", [out], shape,
                                     attrs={"perm": perm}, source=name)
    return out


def _freeze_batchnorm(b: _Builder, name, module, src, shape):
    channels = module.num_features
    dummy = torch.zeros((1, channels) + (1,) * (len(shape) - 1), dtype=torch.float64)
    with torch.no_grad():
        scale_q, shift_q = module.quantized_scale_shift(dummy)
    scale_frac = _fracs(module.scale_quant, channels)
    shift_frac = _fracs(module.shift_quant, channels)
    consts = {"scale": _to_codes(scale_q, scale_frac, f"{name}.scale"), "scale_frac": scale_frac,
              "shift": _to_codes(shift_q, shift_frac, f"{name}.shift"), "shift_frac": shift_frac}
    probe = Node("scale_shift", name, [src], name, {}, consts)
    out_type = infer.infer_scale_shift(probe, b.type_of(src))
    out = b.add("scale_shift", name, [src], shape, out_type, consts=consts, source=name)
    return b.cast(name, out, module.out_quant, name)


def _scale_every_channel(b: _Builder, name, src, code, frac, *, source: str, needs: str):
    """A ``scale_shift`` node ``name`` of ``src`` by fixed-point numbers code · 2^−frac
    along the first per-sample axis (one number: the same on every channel; one per
    channel otherwise), no shift; returns (its output, its type). ``needs`` words the
    error for a tensor without that axis."""
    in_shape = b.shape_of(src)
    if not in_shape:
        raise FreezeError(f"node {source}: {needs} a per-sample axis")
    channels, zeros = in_shape[0], np.zeros(in_shape[0], dtype=np.int64)
    code, frac = np.asarray(code, np.int64).reshape(-1), np.asarray(frac, np.int64).reshape(-1)
    if code.size not in (1, channels):
        raise FreezeError(f"node {source}: {code.size} scales for an axis of {channels}")
    consts = {"scale": np.broadcast_to(code, (channels,)).copy(),
              "scale_frac": np.broadcast_to(frac, (channels,)).copy(),
              "shift": zeros, "shift_frac": zeros.copy()}
    probe = Node("scale_shift", name, [src], name, {}, consts)
    out_type = infer.infer_scale_shift(probe, b.type_of(src))
    return b.add("scale_shift", name, [src], in_shape, out_type, consts=consts,
                 source=source), out_type


def _freeze_mul_const(b: _Builder, name, module: QMulConst, src, shape):
    """``x * c``: a ``scale_shift`` with the constant's code on every channel (the first
    per-sample axis) and a zero shift, then the cast to the layer's output type."""
    with torch.no_grad():
        value = module.quantized_value().reshape(1)
    frac = _fracs(module.value_quant, 1)
    code = _to_codes(value, frac, f"{name}.constant")
    out, _ = _scale_every_channel(b, name, src, int(code[0]), int(frac[0]), source=name,
                                  needs="a product by a constant needs")
    return b.cast(name, out, module.out_quant, name)


def _freeze_relu(b: _Builder, name, module, src, shape):
    out = b.add("relu", name, [src], shape, infer.infer_relu(b.type_of(src)), source=name)
    return b.cast(name, out, module.out_quant, name) if module is not None else out


def _freeze_add(b: _Builder, name, module, srcs, shape):
    ta, tb = (b.type_of(s) for s in srcs)
    out = b.add("add", name, srcs, shape, infer.infer_add(ta, tb), source=name)
    return b.cast(name, out, module.out_quant, name) if module is not None else out


def _freeze_concat(b: _Builder, name, module: QCat, srcs, shape):
    """Every input cast to the layer's type (unless it has it already), then concatenated."""
    axis = module.channel_dim(len(shape) + 1) - 1  # per-sample: the batch dim excluded
    t = module.out_quant.fixed_type()
    inputs = [src if b.type_of(src) == t else b.add(
        "cast", f"{name}_cast{i}", [src], b.shape_of(src), t, source=name)
        for i, src in enumerate(srcs)]
    out_type = infer.infer_concat([b.type_of(s) for s in inputs])
    return b.add("concat", name, inputs, shape, out_type, attrs={"axis": axis}, source=name)


def _reciprocal_code(count: int) -> int:
    return int(math.ldexp(_reciprocal(count), RECIPROCAL_TYPE.fractional))


def _freeze_avgpool(b: _Builder, name, module, src, shape):
    kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
    count = kernel[0] * kernel[1]
    recip = _reciprocal_code(count)
    attrs = {"kernel": kernel, "stride": stride, "reciprocal_frac": RECIPROCAL_TYPE.fractional}
    out_type = infer.infer_pool_sum(b.type_of(src), count, recip, RECIPROCAL_TYPE.fractional)
    out = b.add("avgpool2d", name, [src], shape, out_type, attrs=attrs,
                consts={"reciprocal": np.array(recip, dtype=np.int64)}, source=name)
    return b.cast(name, out, module.out_quant, name)


def _freeze_global_avgpool(b: _Builder, name, module, src, shape):
    h, w = b.shape_of(src)[-2:]
    recip = _reciprocal_code(h * w)
    out_type = infer.infer_pool_sum(b.type_of(src), h * w, recip, RECIPROCAL_TYPE.fractional)
    out = b.add("global_avgpool2d", name, [src], shape, out_type,
                attrs={"reciprocal_frac": RECIPROCAL_TYPE.fractional},
                consts={"reciprocal": np.array(recip, dtype=np.int64)}, source=name)
    return b.cast(name, out, module.out_quant, name)


def _freeze_maxpool(b: _Builder, name, module, src, shape):
    if module.ceil_mode:
        raise FreezeError(f"node {name}: max pooling with ceil_mode is not supported")
    attrs = {"kernel": _pair(module.kernel_size),
             "stride": _pair(module.stride or module.kernel_size),
             "padding": _pair(module.padding), "dilation": _pair(module.dilation),
             "ceil_mode": False}
    return b.add("maxpool2d", name, [src], shape, b.type_of(src), attrs=attrs, source=name)


def _freeze_reshape(b: _Builder, name, module, src, shape):
    return b.add("reshape", name, [src], shape, b.type_of(src), attrs={"shape": list(shape)},
                 source=name)


#: module type -> freezer(builder, name, module, input tensor, per-sample output shape)
MODULE_FREEZERS = {
    QLinear: _freeze_weighted,
    QConv2d: _freeze_weighted,
    BinaryLinear: _freeze_binary,
    BinaryConv2d: _freeze_binary,
    StatsQLinear: _freeze_statsq,
    StatsQConv2d: _freeze_statsq,
    LSQLinear: _freeze_statsq,
    LSQConv2d: _freeze_statsq,
    DyadicLinear: _freeze_statsq,
    DyadicConv2d: _freeze_statsq,
    QBatchNorm1d: _freeze_batchnorm,
    QBatchNorm2d: _freeze_batchnorm,
    QReLU: _freeze_relu,
    QMulConst: _freeze_mul_const,
    QAvgPool2d: _freeze_avgpool,
    QAdaptiveAvgPool2d: _freeze_global_avgpool,
    nn.MaxPool2d: _freeze_maxpool,
    QMaxPool2d: _freeze_maxpool,
    nn.Flatten: _freeze_reshape,
}
_ALIASES = (nn.Identity, nn.Dropout)
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_ALIAS_METHODS = {"contiguous"}
#: size arithmetic (``x.view(x.size(0), -1)``): no tensor, nothing to freeze
_META_METHODS = {"size", "dim", "numel"}
_META_ATTRS = {"shape", "ndim", "dtype", "device"}
_META = object()
_ADD_FUNCTIONS = {operator.add, torch.add}
_RELU_FUNCTIONS = {torch.relu, nn.functional.relu}


def freeze(model: nn.Module, example_input: torch.Tensor) -> QGraph:
    """Freeze a quantized model (``qflow.quantize_`` + training) into a QGraph.

    The model is put in eval mode; ``example_input`` (a batch) fixes the shapes.

    >>> import torch, qflow
    >>> from qflow.graph import freeze, emulate
    >>> model = qflow.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
    >>> x = torch.rand(8, 4)
    >>> graph = freeze(model, x)
    >>> codes = emulate(graph, x.numpy())
    >>> with torch.no_grad():
    ...     bool((model(x).numpy() == codes * graph.output_type.lsb).all())
    True
    """
    if not hasattr(model, "qflow_input"):
        raise FreezeError("model is not quantized: call qflow.quantize_(model, config) first")
    model.eval()
    with torch.no_grad():
        model(example_input)  # initializes any quantizer that has not seen data yet
        try:
            graph = _Tracer().trace(model)
        except Exception as exc:
            raise FreezeError(f"cannot trace the model with torch.fx: {exc}") from None
        gm = fx.GraphModule(model, graph)
        ShapeProp(gm).propagate(example_input)
    modules = dict(model.named_modules())
    b = _Builder(model)
    env: dict[fx.Node, object] = {}
    in_quant: QInput = model.qflow_input
    input_shape = tuple(example_input.shape[1:])
    output = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if env:
                raise FreezeError(f"node {node.name}: models with several inputs are not supported")
            if "qflow_input" in modules and not any(
                n.op == "call_module" and n.target == "qflow_input" for n in graph.nodes
            ):
                env[node] = _declare_input(b, in_quant, input_shape)
            else:
                env[node] = _RAW
            continue
        if node.op == "output":
            output = env[node.args[0]]
            continue
        if node.op == "get_attr":  # a parameter read in a forward: a layer's constant
            env[node] = transformer_freeze.Param(_attribute(model, node.target), node.target)
            continue
        args = [env.get(a) if isinstance(a, fx.Node) else a for a in node.args]
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        label = f"node {node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"
        if node.op == "call_module" and isinstance(modules[node.target], QInput):
            if args[0] is not _RAW:
                raise FreezeError(f"{label}: the input quantizer must take the model input")
            env[node] = _declare_input(b, modules[node.target], input_shape)
            continue
        if _is_meta(node, env):
            env[node] = _META
            continue
        if any(env.get(a) is _RAW for a in tensor_args):
            raise FreezeError(f"{label}: uses the model input before the input quantizer")
        if node.op == "call_module" and isinstance(modules[node.target], QCat):
            tensors = node.args[0] if len(node.args) == 1 and isinstance(
                node.args[0], list | tuple) else node.args
            args = [env.get(a) for a in tensors]
        env[node] = _freeze_node(b, node, modules, args, label)
    if not isinstance(output, str) or b.input is None:
        raise FreezeError("the model output is not a single quantized tensor")
    meta = {"input_shape": list(input_shape), "frozen_from": type(model).__name__}
    return QGraph(b.input, output, b.tensors, b.nodes, meta).validate()


def _attribute(model: nn.Module, target: str) -> torch.Tensor:
    owner, _, attr = target.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _declare_input(b: _Builder, quant: QInput, shape) -> str:
    name = b.input = b.unique("input")
    b.tensors[name] = TensorInfo(name, tuple(shape), quant.quant.fixed_type())
    return name


def _is_meta(node: fx.Node, env) -> bool:
    """A size value (``x.size(0)``, ``x.shape[1]``, arithmetic on them), not a tensor."""
    if node.op == "call_method" and node.target in _META_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _META_ATTRS
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    if not found or any(env.get(a) is not _META for a in found):
        return False
    return node.op == "call_method" or (node.op == "call_function" and (
        getattr(node.target, "__module__", None) in ("_operator", "operator")
        or node.target in (len, int, tuple, list)))


def _freeze_node(b: _Builder, node: fx.Node, modules, args, label: str) -> str:
    shape = _per_sample_shape(node)
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, _ALIASES):
            return args[0]
        if isinstance(module, QAdd):
            return _freeze_add(b, node.target, module, args[:2], shape)
        if isinstance(module, QCat):
            return _freeze_concat(b, node.target, module, args, shape)
        frozen = transformer_freeze.freeze_module(b, node.target, module, args, shape)
        if frozen is not None:
            return frozen
        if any(isinstance(a, transformer_freeze.Param) for a in args):
            raise FreezeError(f"{label}: a parameter is passed to {type(module).__name__}")
        freezer = MODULE_FREEZERS.get(type(module))
        if freezer is None:
            raise FreezeError(f"{label}: module {type(module).__name__} has no integer form "
                              "(quantize it with qflow.quantize_ or remove it)")
        return freezer(b, node.target, module, args[0], shape)
    if any(isinstance(a, transformer_freeze.Param) for a in args):
        raise FreezeError(f"{label}: a parameter is used directly; only layers take them "
                          "(qflow.quantize_ makes x + parameter a QAddConst layer)")
    if transformer_freeze.is_move(node):
        return transformer_freeze.freeze_move(b, node, args[0], shape, label)
    if node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS:
        return _freeze_reshape(b, node.name, None, args[0], shape)
    if node.op == "call_method" and node.target in _RESHAPE_METHODS:
        return _freeze_reshape(b, node.name, None, args[0], shape)
    if node.op == "call_method" and node.target in _ALIAS_METHODS:
        return args[0]
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return _freeze_add(b, node.name, None, args[:2], shape)
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return _freeze_relu(b, node.name, None, args[0], shape)
    raise FreezeError(f"{label}: op is not supported by freeze")
