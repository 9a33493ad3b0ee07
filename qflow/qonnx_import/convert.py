"""QONNX graph -> QGraph, node by node.

Every activation tensor of the QONNX graph becomes a QGraph tensor. A ``Quant`` node is a
fixed-point type when its scale is a power of two (per tensor, or per output channel on
a weight): on the graph input it is the input type, on an activation a ``cast``, on an
initializer a constant's codes; then the QGraph tensor's real values are the QONNX
tensor's exact values. Other scales become fixed-point multipliers (:mod:`.scaled`).
Zero points must be 0 and rounding modes ones that ap_fixed has. ``Gemm`` / ``MatMul`` /
``Conv`` with quantized weights (and a quantized bias) are ``dense`` / ``conv2d``;
``Relu``, ``Add``, ``MaxPool``, averages, ``Flatten`` / ``Reshape`` map one to one.
Anything else is refused, naming the node.

The QGraph's arithmetic is integer and exact; qonnx's executor computes the same graph
in float32, which agrees wherever float32 holds the values exactly (``qflow verify``
compares the two and reports any difference).
"""

from __future__ import annotations

import math

import numpy as np
from onnx import helper, numpy_helper

from qflow.errors import QflowError
from qflow.graph import infer
from qflow.graph.ir import Node, QGraph, TensorInfo
from qflow.numerics import FixedType, Overflow, Rounding, to_codes

from . import scaled

#: QONNX rounding_mode -> the ap_fixed rounding that computes the same integers
ROUNDING = {"ROUND": Rounding.RND_CONV, "HALF_EVEN": Rounding.RND_CONV,
            "FLOOR": Rounding.TRN, "DOWN": Rounding.TRN_ZERO,
            "HALF_UP": Rounding.RND_INF, "HALF_DOWN": Rounding.RND_ZERO}
QUANT_DOMAIN = "qonnx.custom_op.general"
#: fraction bits of an average's reciprocal, as the QGraph's own pooling layers have them
RECIPROCAL_FRAC = 18


class QonnxError(QflowError):
    """A QONNX graph (or one of its nodes) that has no exact QGraph form."""


class _Constant:
    """An initializer after its ``Quant``: integer codes and the fraction per channel
    (axis 0), or a plain float array (``codes`` None) before any ``Quant``."""

    def __init__(self, value: np.ndarray, codes: np.ndarray | None = None,
                 fracs: np.ndarray | None = None, scale: np.ndarray | None = None):
        self.value, self.codes, self.fracs = value, codes, fracs
        #: per channel, when the scale is not a power of two (``fracs`` are then 0)
        self.scale = scale


class Converter:
    """Builds the QGraph of one cleaned QONNX ``ModelWrapper``; see the module docstring."""

    def __init__(self, model):
        self.model = model
        self.graph = model.graph
        self.constants: dict[str, _Constant] = {
            init.name: _Constant(numpy_helper.to_array(init).astype(np.float64))
            for init in self.graph.initializer}
        self.tensors: dict[str, TensorInfo] = {}
        self.nodes: list[Node] = []
        self.names: dict[str, str] = {}  # QONNX tensor -> QGraph tensor
        self.input: str | None = None
        # non-power-of-two scales (:mod:`.scaled`): QONNX tensor -> the real value of one
        # LSB of its QGraph tensor's type, and -> a pending per-channel (scale, shift)
        self.factor: dict[str, float] = {}
        self.pending: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.exact = True  # no multiplier stands for a ratio of scales
        self.consumers: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    # -- helpers ------------------------------------------------------------------------------
    def _shape(self, name: str) -> tuple[int, ...]:
        shape = self.model.get_tensor_shape(name)
        if shape is None:
            raise QonnxError(f"tensor {name!r}: no shape (qonnx's InferShapes found none)")
        return tuple(int(s) for s in shape[1:])

    def _add(self, op: str, node, inputs: list[str], out_type: FixedType, *, attrs=None,
             consts=None) -> str:
        name = node.name or node.output[0]
        name = name.replace(".", "_").replace("/", "_")
        while name in self.tensors:
            name += "_"
        shape = getattr(node, "shape", None) or self._shape(node.output[0])
        self.tensors[name] = TensorInfo(name, tuple(shape), out_type)
        self.nodes.append(Node(op, name, inputs, name, attrs or {}, consts or {},
                               source=node.name))
        self.names[node.output[0]] = name
        return name

    def _activation(self, node, index: int) -> str:
        name = node.input[index]
        if name not in self.names:
            what = "a constant" if name in self.constants else "not computed by a quantized node"
            raise QonnxError(f"node {node.name} ({node.op_type}): input {name!r} is {what}; "
                             "qflow imports graphs whose activations are all quantized")
        return self.names[name]

    def _quantized_constant(self, node, index: int, what: str) -> _Constant:
        name = node.input[index]
        constant = self.constants.get(name)
        if constant is None or constant.codes is None:
            raise QonnxError(f"node {node.name} ({node.op_type}): its {what} {name!r} is not a "
                             "quantized constant (a Quant of an initializer)")
        return constant

    def _type_of(self, tensor: str) -> FixedType:
        return self.tensors[tensor].type

    # -- the graph ------------------------------------------------------------------------------
    def convert(self) -> QGraph:
        if len(self.graph.input) != 1 or len(self.graph.output) != 1:
            raise QonnxError(f"the graph has {len(self.graph.input)} inputs and "
                             f"{len(self.graph.output)} outputs; qflow imports one of each")
        for node in self.graph.node:
            handler = HANDLERS.get(node.op_type)
            if handler is None:
                raise QonnxError(f"node {node.name}: op {node.op_type} has no exact QGraph form "
                                 f"here (qflow imports {', '.join(sorted(HANDLERS))})")
            handler(self, node)
        if self.input is None:
            raise QonnxError("the graph input is not quantized: its first node must be a "
                             "Quant (or BipolarQuant) of the input")
        output = self.graph.output[0].name
        if output not in self.names:
            raise QonnxError(f"the graph output {output!r} is not computed by a quantized node")
        result = self.names[output]
        if output in self.pending or self.factor.get(output, 1.0) != 1.0:
            result = self._real_output(output)
        graph = QGraph(input=self.input, output=result, tensors=self.tensors,
                       nodes=self.nodes, meta={"imported_from": "qonnx", "exact": self.exact})
        return graph.validate("imported QONNX graph")

    def _real_output(self, output: str) -> str:
        """An output whose scale is not a power of two, in real units rounded to
        ``OUTPUT_FRACTION_BITS`` fraction bits (ties to even, saturating)."""
        node = next(n for n in self.graph.node if output in n.output)
        real = self._materialized(_Renamed(node, f"{node.name}_out"), output, 1.0)
        wide = self._type_of(real)
        t = FixedType(signed=True, integer=max(wide.integer, 1),
                      fractional=scaled.OUTPUT_FRACTION_BITS, rounding=Rounding.RND_CONV,
                      overflow=Overflow.SAT)
        return self._add("cast", _Renamed(node, f"{node.name}_output", self.tensors[real].shape),
                         [real], t)

    # -- ops ----------------------------------------------------------------------------------
    def quant(self, node) -> None:
        attrs = _attributes(node)
        scale, zero_point, bits = (self._float_input(node, i, what) for i, what in
                                   ((1, "scale"), (2, "zero point"), (3, "bit width")))
        mode = str(attrs.get("rounding_mode", "ROUND")).upper()
        signed, narrow = bool(attrs.get("signed", 1)), bool(attrs.get("narrow", 0))
        label = f"node {node.name} (Quant)"
        _check_quantizer(label, zero_point, bits, mode, signed, narrow)
        fracs = _power_of_two_fractions(scale)
        width = int(bits.item())
        overflow = Overflow.SAT_SYM if narrow else Overflow.SAT
        source = node.input[0]
        if source in self.constants:  # a weight or a bias: its codes
            self._quantize_constant(node, scale, fracs, width, signed, narrow, ROUNDING[mode])
            return
        if scale.size != 1:
            raise QonnxError(f"{label}: a per-channel scale on an activation is not imported")
        if fracs is None:  # integer codes, the scale kept beside them
            t = FixedType(signed=signed, integer=width - int(signed), fractional=0,
                          rounding=ROUNDING[mode], overflow=overflow)
            self._requantize(node, float(scale.item()), t)
            return
        t = FixedType(signed=signed, integer=width - int(fracs[0]) - int(signed),
                      fractional=int(fracs[0]), rounding=ROUNDING[mode], overflow=overflow)
        if source == self.graph.input[0].name and self.input is None:
            self.input = self._declare_input(source, t)
            self.names[node.output[0]] = self.input
            return
        if source in self.pending or self.factor.get(source, 1.0) != 1.0:
            self._requantize(node, 1.0, t)
            return
        self._add("cast", node, [self._activation(node, 0)], t)

    def _requantize(self, node, unit: float, t: FixedType) -> None:
        """A ``Quant`` of a tensor whose scale is not a power of two, or that has a
        pending affine map, or of the graph input to a scale that is not one: a
        ``scale_shift`` into units of ``unit`` (the target scale, or 1 for a power-of-two
        target, whose LSB ``t`` says), then the cast to ``t``."""
        source = node.input[0]
        if source == self.graph.input[0].name and self.input is None:
            raw = scaled.raw_input_type(unit, t.width, t.signed)
            self.input = self._declare_input(source, raw)
            self.names[source] = self.input
        src = self._materialized(node, source, unit)
        self._add("cast", node, [src], t)
        if unit != 1.0:
            self.factor[node.output[0]] = unit

    def _materialized(self, node, source: str, target: float) -> str:
        """The QGraph tensor of ``source``'s real value in units of ``target`` (a
        ``scale_shift``), unless it already is."""
        src = self.names[source]
        scale, shift = self.pending.get(source, (None, None))
        factor = self.factor.get(source, 1.0)
        channels = self.tensors[src].shape[0] if self.tensors[src].shape else 1
        if scale is None:
            scale, shift = np.full(channels, factor), np.zeros(channels)
            if factor == target:
                return src
        self.exact = False
        consts = scaled.affine_consts(scale, shift, self._type_of(src).fractional, target)
        return self._scale_shift(_Renamed(node, f"{node.name}_scale", self.tensors[src].shape),
                                 src, consts)

    def _scale_shift(self, node, src: str, consts: dict) -> str:
        """A ``scale_shift`` node of ``src`` with ``consts``, its type inferred."""
        probe = Node("scale_shift", node.name, [src], node.name, {}, consts)
        return self._add("scale_shift", node, [src],
                         infer.infer_scale_shift(probe, self._type_of(src)), consts=consts)

    def bipolar_quant(self, node) -> None:
        """+1 where x >= 0, else -1, times a power-of-two scale: a constant's codes ±1, or
        ``sign`` (then a ``scale_shift`` by the scale when it is not 1)."""
        label = f"node {node.name} (BipolarQuant)"
        scale = self._float_input(node, 1, "scale")
        fracs = _power_of_two_fractions(scale)
        if fracs is None:
            raise QonnxError(f"{label}: scale {scale.ravel()[0]:.9g} is not a power of two "
                             "(binary layers are imported with power-of-two scales only)")
        source = node.input[0]
        if source in self.constants:
            value = self.constants[source].value
            per_channel, exponents = _channel_fractions(fracs, value, label)
            self._set_constant(node, np.where(value >= 0, 1, -1), per_channel, exponents)
            return
        if source == self.graph.input[0].name:
            raise QonnxError(f"{label}: a sign of the graph input has no input type; quantize "
                             "the input with a Quant first")
        if fracs.size != 1:
            raise QonnxError(f"{label}: a per-channel scale on an activation is not imported")
        src = self._activation(node, 0)
        if int(fracs[0]) == 0:
            self._add("sign", node, [src], infer.infer_sign(self._type_of(src)))
            return
        signs = self._add("sign", _Renamed(node, f"{node.name}_sign"), [src],
                          infer.infer_sign(self._type_of(src)))
        channels = self.tensors[signs].shape[0]
        consts = {"scale": np.ones(channels, np.int64),
                  "scale_frac": np.full(channels, int(fracs[0]), np.int64),
                  "shift": np.zeros(channels, np.int64), "shift_frac": np.zeros(channels, np.int64)}
        self._scale_shift(node, signs, consts)

    def _declare_input(self, name: str, t: FixedType) -> str:
        self.tensors[name] = TensorInfo(name, self._shape(name), t)
        return name

    def _float_input(self, node, index: int, what: str) -> np.ndarray:
        constant = self.constants.get(node.input[index]) if index < len(node.input) else None
        if constant is None:
            raise QonnxError(f"node {node.name} ({node.op_type}): its {what} must be a constant")
        return constant.value

    def _quantize_constant(self, node, scale, fracs, width, signed, narrow, rounding) -> None:
        value = self.constants[node.input[0]].value
        label = f"node {node.name} (Quant)"
        if fracs is None:  # integer codes, the real scale per channel beside them
            ones = np.ones(scale.size, dtype=np.int64)
            per_channel, _ = _channel_fractions(ones, value, label)
            channel_scale = np.broadcast_to(scale.reshape(-1), per_channel.shape).astype(float)
            shaped = channel_scale.reshape((-1,) + (1,) * (value.ndim - 1)) if value.ndim \
                else channel_scale.reshape(())
            top = 2 ** (width - 1) - 1 if signed else 2 ** width - 1
            low = (-top if narrow else -top - 1) if signed else 0
            codes = scaled.exact_codes(value, shaped, rounding, low, top)
            self.constants[node.output[0]] = _Constant(
                codes * np.broadcast_to(shaped, value.shape), codes,
                np.zeros_like(per_channel), channel_scale.copy())
            return
        t = FixedType(signed=signed, integer=width - int(signed), fractional=0,
                      rounding=rounding, overflow=Overflow.SAT_SYM if narrow else Overflow.SAT)
        per_channel, exponents = _channel_fractions(fracs, value, label)
        self._set_constant(node, to_codes(np.ldexp(value, exponents), t), per_channel, exponents)

    def _set_constant(self, node, codes: np.ndarray, per_channel: np.ndarray,
                      exponents: np.ndarray) -> None:
        """The output of a quantizer of a constant: its codes, fraction per channel and
        exact value."""
        self.constants[node.output[0]] = _Constant(np.ldexp(codes.astype(np.float64), -exponents),
                                                   codes.astype(np.int64), per_channel)

    def weighted(self, node, op: str, weight: _Constant, bias: _Constant | None, attrs) -> None:
        src = self._activation(node, 0)
        consts = {"weight": weight.codes, "weight_frac": weight.fracs}
        if node.input[0] in self.pending:
            raise QonnxError(f"node {node.name} ({node.op_type}): its input is not quantized "
                             "(a Quant must come between two layers)")
        channels = weight.codes.shape[0]
        if bias is not None and bias.codes.size != channels:
            raise QonnxError(f"node {node.name} ({node.op_type}): bias of {bias.codes.size} "
                             f"values for {channels} outputs")
        factor = self.factor.get(node.input[0], 1.0)
        # a scale that is not a power of two: acc · S_c + B_c, applied at the next Quant
        multiplied = factor != 1.0 or weight.scale is not None or (
            bias is not None and bias.scale is not None)
        if bias is not None and not multiplied:
            consts.update(bias=bias.codes.reshape(-1),
                          bias_frac=np.broadcast_to(bias.fracs, (channels,)).copy())
        probe = Node(op, node.name, [src], node.name, attrs, consts)
        self._add(op, node, [src], infer.infer_weighted(probe, self._type_of(src)),
                  attrs=attrs, consts=consts)
        if multiplied:
            scale = factor * (weight.scale if weight.scale is not None else np.ones(channels))
            shift = np.zeros(channels) if bias is None else bias.value.reshape(-1)
            self.pending[node.output[0]] = (scale, shift.astype(np.float64))

    def gemm(self, node) -> None:
        attrs = _attributes(node)
        if attrs.get("transA", 0) or (attrs.get("alpha", 1.0), attrs.get("beta", 1.0)) != (1, 1):
            raise QonnxError(f"node {node.name} (Gemm): transA, alpha and beta must be 0, 1, 1")
        weight = self._quantized_constant(node, 1, "weight")
        if not attrs.get("transB", 0):
            weight = _transposed(weight)
        bias = self._quantized_constant(node, 2, "bias") if len(node.input) > 2 and \
            node.input[2] else None
        self.weighted(node, "dense", weight, bias, {})

    def matmul(self, node) -> None:
        self.weighted(node, "dense", _transposed(self._quantized_constant(node, 1, "weight")),
                      None, {})

    def conv(self, node) -> None:
        attrs = _attributes(node)
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if attrs.get("auto_pad", "NOTSET") != "NOTSET":
            raise QonnxError(f"node {node.name} (Conv): auto_pad is not imported (give pads)")
        if len(pads) != 4 or pads[:2] != pads[2:]:
            raise QonnxError(f"node {node.name} (Conv): pads {pads} must be 2-d and symmetric")
        weight = self._quantized_constant(node, 1, "weight")
        bias = self._quantized_constant(node, 2, "bias") if len(node.input) > 2 and \
            node.input[2] else None
        self.weighted(node, "conv2d", weight, bias, {
            "stride": [int(s) for s in attrs.get("strides", [1, 1])], "padding": pads[:2],
            "dilation": [int(d) for d in attrs.get("dilations", [1, 1])],
            "groups": int(attrs.get("group", 1))})

    def relu(self, node) -> None:
        source = node.input[0]
        src = self._activation(node, 0)
        if source in self.pending and np.any(self.pending[source][1] != 0):
            # relu(acc · S + B) needs the shift first: in the units of the Quant after it
            unit = self._next_quant_unit(node.output[0])
            if unit is None:
                raise QonnxError(f"node {node.name} (Relu): after a layer whose scale is not a "
                                 "power of two, a Quant must follow")
            src = self._materialized(node, source, unit)
            self._add("relu", node, [src], infer.infer_relu(self._type_of(src)))
            if unit != 1.0:
                self.factor[node.output[0]] = unit
            return
        self._add("relu", node, [src], infer.infer_relu(self._type_of(src)))
        self._carry(node)

    def _next_quant_unit(self, tensor: str) -> float | None:
        """The units the ``Quant`` that ``tensor`` flows into (through pooling, reshapes
        and ReLUs) needs its input in: its scale, or 1 for a power-of-two scale."""
        while True:
            readers = self.consumers.get(tensor, [])
            if len(readers) != 1:
                return None
            reader = readers[0]
            if reader.op_type == "Quant":
                value = self.constants.get(reader.input[1])
                if value is None or value.value.size != 1:
                    return None
                fracs = _power_of_two_fractions(value.value)
                return 1.0 if fracs is not None else float(value.value.item())
            if reader.op_type not in ("Relu", "MaxPool", "Reshape", "Flatten"):
                return None
            tensor = reader.output[0]

    def _carry(self, node) -> None:
        """A scale-commuting op (ReLU without a shift, pooling, a reshape): its output keeps
        its input's scale and pending map (a flattening spreads each channel's over its
        positions)."""
        source, out = node.input[0], node.output[0]
        if source in self.factor:
            self.factor[out] = self.factor[source]
        if source in self.pending:
            scale, shift = self.pending[source]
            before, after = self._shape(source), self._shape(out)
            if before[0] != after[0]:
                if len(after) != 1:
                    raise QonnxError(f"node {node.name} ({node.op_type}): only a flattening "
                                     "follows a layer whose scale is not a power of two")
                repeat = math.prod(before[1:])
                scale, shift = np.repeat(scale, repeat), np.repeat(shift, repeat)
            self.pending[out] = (scale, shift)

    def add(self, node) -> None:
        a, b = self._activation(node, 0), self._activation(node, 1)
        if any(t in self.pending or t in self.factor for t in node.input[:2]):
            raise QonnxError(f"node {node.name} (Add): adding tensors whose scales are not "
                             "powers of two is not imported yet")
        if self._shape(node.input[0]) != self._shape(node.input[1]):
            raise QonnxError(f"node {node.name} (Add): broadcasting is not imported")
        self._add("add", node, [a, b], infer.infer_add(self._type_of(a), self._type_of(b)))

    def reshape(self, node) -> None:
        src = self._activation(node, 0)
        shape = list(self._shape(node.output[0]))
        if math.prod(shape) != math.prod(self._shape(node.input[0])):
            raise QonnxError(f"node {node.name} ({node.op_type}): changes the batch size")
        self._add("reshape", node, [src], self._type_of(src), attrs={"shape": shape})
        self._carry(node)

    def maxpool(self, node) -> None:
        attrs = _attributes(node)
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if len(pads) != 4 or pads[:2] != pads[2:]:
            raise QonnxError(f"node {node.name} (MaxPool): pads {pads} must be symmetric")
        kernel = [int(k) for k in attrs["kernel_shape"]]
        src = self._activation(node, 0)
        self._add("maxpool2d", node, [src], self._type_of(src), attrs={
            "kernel": kernel, "stride": [int(s) for s in attrs.get("strides", kernel)],
            "padding": pads[:2], "dilation": [int(d) for d in attrs.get("dilations", [1, 1])],
            "ceil_mode": bool(attrs.get("ceil_mode", 0))})
        self._carry(node)


def _multithreshold(self: Converter, node) -> None:
    """``MultiThreshold`` where it is a quantizer: the same thresholds on every channel,
    evenly spaced by a power of two Δ at half steps ((k0 + t + ½)·Δ), 2^b − 1 of them
    from k0 = 0 (unsigned) or −2^(b−1) (signed), and out_scale = Δ, out_bias = k0·Δ. Then
    y = Δ · clamp(round(x / Δ)) with ties toward +inf (x ≥ a threshold counts it): a
    ``cast`` to ``ap_(u)fixed<b, ...>`` with RND and SAT."""
    label = f"node {node.name} (MultiThreshold)"
    attrs = _attributes(node)
    thresholds = self._float_input(node, 1, "thresholds")
    if thresholds.ndim != 2 or np.any(thresholds != thresholds[:1]):
        raise QonnxError(f"{label}: thresholds differ between channels: no fixed-point type "
                         "has this form")
    row = thresholds[0]
    steps = np.diff(row)
    step = float(steps[0]) if steps.size else 0.0
    fracs = _power_of_two_fractions(np.array([step])) if step > 0 else None
    count = row.size + 1
    width = count.bit_length() - 1
    first = row[0] / step - 0.5 if step > 0 else 0.5
    signed = first == -(count // 2)
    if (fracs is None or np.any(steps != step) or count & (count - 1) or width < 1
            or first != int(first) or not (first == 0 or signed)
            or float(attrs.get("out_scale", 1.0)) != step
            or float(attrs.get("out_bias", 0.0)) != first * step
            or attrs.get("data_layout", "NCHW") not in ("", "NCHW", "NC")):
        raise QonnxError(f"{label}: its thresholds, out_scale and out_bias are not those of a "
                         "fixed-point quantizer (evenly spaced by a power of two, 2^b - 1 of "
                         "them, out_scale the step, out_bias the first level)")
    frac = int(fracs[0])
    if node.input[0] in self.pending or node.input[0] in self.factor:
        raise QonnxError(f"{label}: its input's scale is not a power of two")
    self._add("cast", node, [self._activation(node, 0)], FixedType(
        signed=bool(signed), integer=width - frac - int(signed), fractional=frac,
        rounding=Rounding.RND, overflow=Overflow.SAT))


def _trunc(self: Converter, node) -> None:
    """``Trunc`` (qonnx's version 2, as brevitas's ``TruncAvgPool2d`` exports it): round to
    the input scale's grid (ties to even), then to the output scale's with its rounding
    mode and range; power-of-two scales only."""
    label = f"node {node.name} (Trunc)"
    if len(node.input) != 6:
        raise QonnxError(f"{label}: only qonnx's Trunc version 2 (six inputs) is imported")
    scale, zero_point, _, out_scale, out_bits = (
        self._float_input(node, i, what) for i, what in (
            (1, "scale"), (2, "zero point"), (3, "input bit width"), (4, "output scale"),
            (5, "output bit width")))
    attrs = _attributes(node)
    mode = str(attrs.get("rounding_mode", "FLOOR")).upper()
    signed, narrow = bool(attrs.get("signed", 0)), bool(attrs.get("narrow", 0))
    fracs, out_fracs = _power_of_two_fractions(scale), _power_of_two_fractions(out_scale)
    if fracs is None or out_fracs is None or fracs.size != 1 or out_fracs.size != 1:
        raise QonnxError(f"{label}: its scales must be powers of two, one per tensor")
    _check_quantizer(label, zero_point, out_bits, mode, signed, narrow)
    if node.input[0] in self.pending or node.input[0] in self.factor:
        raise QonnxError(f"{label}: its input's scale is not a power of two")
    src = self._activation(node, 0)
    given = self._type_of(src)
    if given.fractional > int(fracs[0]):  # first onto the input scale's grid
        grid = FixedType(signed=given.signed, integer=given.integer,
                         fractional=int(fracs[0]), rounding=Rounding.RND_CONV,
                         overflow=Overflow.SAT)
        src = self._add("cast", _Renamed(node, f"{node.name}_grid", self.tensors[src].shape),
                        [src], grid)
    width, frac = int(out_bits.item()), int(out_fracs[0])
    self._add("cast", node, [src], FixedType(
        signed=signed, integer=width - frac - int(signed), fractional=frac,
        rounding=ROUNDING[mode], overflow=Overflow.SAT_SYM if narrow else Overflow.SAT))


def _average_pool(self: Converter, node) -> None:
    """``AveragePool`` (no padding) and ``GlobalAveragePool`` over a power-of-two count."""
    src = self._activation(node, 0)
    attrs = _attributes(node)
    if node.op_type in ("GlobalAveragePool", "ReduceMean"):
        shape = self._shape(node.input[0])
        if node.op_type == "ReduceMean":
            axes = attrs.get("axes")
            if axes is None and len(node.input) > 1:
                axes = self._float_input(node, 1, "axes").astype(int).tolist()
            if len(shape) != 3 or sorted(int(a) % 4 for a in axes or ()) != [2, 3]:
                raise QonnxError(f"node {node.name} (ReduceMean): only the mean over the two "
                                 "spatial axes of an N, C, H, W tensor is imported")
        count = math.prod(shape[-2:])
        op, extra = "global_avgpool2d", {}
    else:
        if any(attrs.get("pads", [0, 0, 0, 0])) or attrs.get("ceil_mode", 0):
            raise QonnxError(f"node {node.name} (AveragePool): padding and ceil_mode are not "
                             "imported")
        kernel = [int(k) for k in attrs["kernel_shape"]]
        count = kernel[0] * kernel[1]
        op, extra = "avgpool2d", {"kernel": kernel,
                                  "stride": [int(v) for v in attrs.get("strides", kernel)]}
    recip = _reciprocal(node, count)
    out_type = infer.infer_pool_sum(self._type_of(src), count, recip, RECIPROCAL_FRAC)
    attrs = {**extra, "reciprocal_frac": RECIPROCAL_FRAC}
    consts = {"reciprocal": np.array(recip, dtype=np.int64)}
    if op == "global_avgpool2d" and len(self._shape(node.output[0])) == 1:  # keepdims=0
        pooled = self._add(op, _Renamed(node, f"{node.name}_pool", (shape[0], 1, 1)), [src],
                           out_type, attrs=attrs, consts=consts)
        self._add("reshape", node, [pooled], out_type, attrs={"shape": [shape[0]]})
    else:
        self._add(op, node, [src], out_type, attrs=attrs, consts=consts)
    self._carry(node)


class _Renamed:
    """A node seen under another name (a second QGraph node made from one QONNX node),
    with its own per-sample shape when it differs from the QONNX node's output."""

    def __init__(self, node, name: str, shape: tuple[int, ...] | None = None):
        self.name, self.output, self.op_type = name, [node.output[0]], node.op_type
        self.shape = shape


def _reciprocal(node, count: int) -> int:
    """The code of 1/count in the QGraph's reciprocal type (18 fraction bits), exact only
    for a power of two: another count would round, which the QONNX mean does not."""
    if count & (count - 1) or count > 1 << RECIPROCAL_FRAC:
        raise QonnxError(f"node {node.name} ({node.op_type}): averages {count} values; 1/{count} "
                         "has no exact fixed-point form (a power-of-two window has)")
    return (1 << RECIPROCAL_FRAC) // count


def _check_quantizer(label: str, zero_point, bits, mode: str, signed: bool,
                     narrow: bool) -> None:
    """What a ``Quant`` or ``Trunc`` needs for an ap_fixed type: zero point 0, one bit
    width from 2 to 32, an ap_fixed rounding mode, no unsigned narrow range."""
    if np.any(zero_point != 0):
        raise QonnxError(f"{label}: zero point {zero_point.ravel()[:4].tolist()} is not 0 "
                         "(asymmetric quantization is not imported yet)")
    if bits.size != 1 or bits.item() != int(bits.item()) or not 2 <= bits.item() <= 32:
        raise QonnxError(f"{label}: bit width {bits.ravel()[:4].tolist()} must be one "
                         "integer from 2 to 32")
    if mode not in ROUNDING:
        raise QonnxError(f"{label}: rounding_mode {mode} has no ap_fixed equivalent "
                         f"(imported: {', '.join(ROUNDING)})")
    if narrow and not signed:
        raise QonnxError(f"{label}: an unsigned narrow range (0 .. 2^b - 2) has no ap_fixed "
                         "type")


def _attributes(node) -> dict:
    """A node's attributes by name, strings decoded."""
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def _channel_fractions(fracs: np.ndarray, value: np.ndarray, label: str):
    """A constant's fraction per output channel (axis 0) from a per-tensor or per-channel
    scale, and the same broadcast to the constant's shape."""
    channels = value.shape[0] if value.ndim else 1
    if fracs.size not in (1, channels):
        raise QonnxError(f"{label}: its scale is not per tensor or per output channel")
    per_channel = np.broadcast_to(fracs.reshape(-1), (channels,)).astype(np.int64)
    exponents = per_channel.reshape((-1,) + (1,) * (value.ndim - 1)) if value.ndim else \
        per_channel.reshape(())
    return per_channel.copy(), np.broadcast_to(exponents, value.shape)


def _transposed(weight: _Constant) -> _Constant:
    """A (K, M) weight as (M, K): MatMul's layout to dense's; one fraction per column."""
    if weight.codes.ndim != 2:
        raise QonnxError("a MatMul weight must be 2-d")
    fracs = weight.fracs
    if np.unique(fracs).size != 1:
        raise QonnxError("a MatMul weight's scale must be per tensor (or per output column "
                         "through Gemm)")
    scale = weight.scale
    if scale is not None:
        if np.unique(scale).size != 1:
            raise QonnxError("a MatMul weight's scale must be per tensor")
        scale = np.full(weight.codes.shape[1], scale[0])
    return _Constant(weight.value.T, weight.codes.T.copy(),
                     np.full(weight.codes.shape[1], fracs[0], dtype=np.int64), scale)


def _power_of_two_fractions(scale: np.ndarray) -> np.ndarray | None:
    """The fractional bits f with scale = 2**-f, one per scale value; None unless every
    scale is a power of two."""
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    mantissa, exponent = np.frexp(scale)
    if not (np.all(scale > 0) and np.all(mantissa == 0.5)):
        return None
    return (1 - exponent).astype(np.int64)


HANDLERS = {
    "Quant": Converter.quant, "BipolarQuant": Converter.bipolar_quant,
    "Gemm": Converter.gemm, "MatMul": Converter.matmul,
    "Conv": Converter.conv, "Relu": Converter.relu, "Add": Converter.add,
    "Reshape": Converter.reshape, "Flatten": Converter.reshape, "MaxPool": Converter.maxpool,
    "AveragePool": _average_pool, "GlobalAveragePool": _average_pool,
    "ReduceMean": _average_pool, "Trunc": _trunc, "MultiThreshold": _multithreshold,
}
