"""The integer ONNX model in TVM Relax: converters qflow adds to the Relax ONNX frontend,
and the exactness check every model passes before it is imported.

TVM 0.27's Relax ONNX frontend imports ``MatMulInteger`` (int32 accumulation), integer
``Div``/``Mod``, ``Clip``, ``Where`` and the other integer ops ``model.int.onnx`` uses,
but has no ``ConvInteger``. :func:`register_converters` adds it to the frontend's
convert map (idempotent). It widens both uint8 operands to int32, subtracts the zero
points and runs an int32 ``conv2d`` with int32 accumulation: the exporter bounds every
ConvInteger's fan-in (``MAX_FAN_IN``) so that no partial sum can overflow int32, in any
order of summation.

Why each op of the integer ONNX stays exact under TVM is the table :data:`EXACT_OPS`;
:func:`check_exact` refuses, with a one-line error naming the node and op, a model with
an op outside it or with operand types the reasoning does not cover (a float ``Div``),
rather than compiling something approximate. Float operands (:data:`FLOAT_EXACT_OPS`)
are accepted only in a model whose exporter proved, node by node, that every value is an
integer (or its power-of-two fraction) below the format's exact bound (the
``qflow.arithmetics`` metadata of :mod:`qflow.export.int_onnx`): then TVM's float
kernels compute exactly in any summation order. TVM lowers ``conv2d`` directly (no
Winograd or FFT transform, whose fractional coefficients would round), the LLVM target
has no fast-math, and ``qflow verify`` checks the build.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qflow.errors import QflowError

INTEGER_TYPES = frozenset({TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16,
                           TensorProto.UINT16, TensorProto.INT32, TensorProto.UINT32,
                           TensorProto.INT64, TensorProto.UINT64})
BYTE_TYPES = frozenset({TensorProto.INT8, TensorProto.UINT8})
ANY_TYPE = None  # the op is exact whatever its operand type (data movement, comparisons)

#: ONNX op -> (element types its first input may have, or ANY_TYPE; why TVM is exact)
EXACT_OPS: dict[str, tuple[frozenset | None, str]] = {
    "ConvInteger": (BYTE_TYPES, "qflow's converter: int32 conv2d, fan-in bounded at export"),
    "MatMulInteger": (BYTE_TYPES, "int32 matmul, fan-in bounded at export"),
    "MatMul": (INTEGER_TYPES, "int64 matmul; the export bounds every partial sum below 2**63"),
    "Div": (INTEGER_TYPES, "exact divisions (remainder subtracted first), or a positive "
                           "divisor with the floor correction after it: floor and "
                           "truncation both give the floor"),
    "Mod": (INTEGER_TYPES, "fmod=0 becomes floor_mod, ONNX's sign-of-divisor remainder"),
    "Add": (INTEGER_TYPES, "int64 wrapping arithmetic; the export bounds the values"),
    "Sub": (INTEGER_TYPES, "int64 wrapping arithmetic; the export bounds the values"),
    "Mul": (INTEGER_TYPES, "int64 wrapping arithmetic; the export bounds the values"),
    "Max": (INTEGER_TYPES, "integer maximum"),
    "GreaterOrEqual": (ANY_TYPE, "comparison"),
    "Clip": (INTEGER_TYPES, "integer maximum then minimum"),
    "ReduceSum": (INTEGER_TYPES, "int64 sum, bounded at export"),
    "ReduceMax": (INTEGER_TYPES, "integer maximum"),
    "Abs": (INTEGER_TYPES, "int64 magnitude of codes far below 2**63"),
    "Gather": (INTEGER_TYPES, "a power of two read from a table (shift by a tensor amount)"),
    "Transpose": (ANY_TYPE, "data movement"),
    "MaxPool": (frozenset({TensorProto.DOUBLE}), "maximum of exact doubles (codes <= 53 "
                                                 "bits); no fast-math in the LLVM target"),
    "Cast": (ANY_TYPE, "integer <-> exact float, float32 <-> float64, int64 -> uint8 of "
                       "in-range codes"),
    "Equal": (ANY_TYPE, "comparison"),
    "Greater": (ANY_TYPE, "comparison"),
    "Less": (ANY_TYPE, "comparison"),
    "And": (ANY_TYPE, "boolean logic"),
    "Or": (ANY_TYPE, "boolean logic"),
    "Not": (ANY_TYPE, "boolean logic"),
    "Where": (ANY_TYPE, "selection"),
    "Reshape": (ANY_TYPE, "data movement"),
    "Concat": (ANY_TYPE, "data movement"),
    "Slice": (ANY_TYPE, "data movement"),
    "Identity": (ANY_TYPE, "data movement"),
}

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE})
#: ONNX op -> why it is exact on float codes that the exporter bounded
FLOAT_EXACT_OPS: dict[str, str] = {
    "Conv": "direct conv2d; every partial sum an integer below 2**24 (times a power of "
            "two where a cast's scaling was moved into the weights)",
    "MatMul": "every partial sum an integer below 2**24 (times a power of two, as Conv)",
    "Add": "sums of integers (and power-of-two fractions) below the exact bound",
    "Sub": "differences of exact values below the exact bound",
    "Mul": "products by integers times powers of two, below the exact bound",
    "Max": "maximum", "Clip": "maximum then minimum", "Abs": "magnitude",
    "Floor": "exact", "Ceil": "exact", "Round": "half to even (nearbyint), exact",
    "Mod": "fmod of exact values by a power of two is exact",
    "ReduceSum": "sums of integers below the exact bound",
    "MaxPool": "maximum of exact values",
    "AveragePool": "a window sum below the exact bound over a power-of-two count (the "
                   "exporter emits it for no other)",
    "GlobalAveragePool": "as AveragePool",
}
#: the metadata key of the arithmetics the exporter proved exact, node by node
ARITHMETICS_KEY = "qflow.arithmetics"

_registered = False


def check_exact(model: onnx.ModelProto) -> None:
    """Refuse a model TVM might not compute exactly: a QflowError naming node and op."""
    types = _element_types(model)
    meta = {p.key: p.value for p in model.metadata_props}
    proven = set(meta.get(ARITHMETICS_KEY, "").split(",")) & {"float32", "float64"}
    for node in model.graph.node:
        where = f"TVM export: node {node.name or node.output[0]!r} (op {node.op_type!r})"
        if node.domain not in ("", "ai.onnx"):
            raise QflowError(f"{where}: custom op domain {node.domain!r} is not supported")
        elem = types.get(node.input[0]) if node.input else None
        if proven and elem in FLOAT_TYPES and node.op_type in FLOAT_EXACT_OPS:
            continue
        if node.op_type not in EXACT_OPS:
            raise QflowError(f"{where}: no exact TVM lowering for this op")
        allowed, _ = EXACT_OPS[node.op_type]
        if allowed is not ANY_TYPE and elem not in allowed:
            name = TensorProto.DataType.Name(elem) if elem else "unknown"
            raise QflowError(f"{where}: operand type {name} is not computed exactly here")


def pools_as_sums(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each float ``GlobalAveragePool``, and each ``AveragePool`` whose
    windows tile the input, as ``ReduceSum`` times 1/count (a copy; the rest untouched).

    The same values: the export emits these pools only over power-of-two counts, where
    sum / count and sum * (1/count) are the same exact float. In a build for any batch
    size TVM's pooling operators, fused with the requantization after them, run about 2x
    slower than this form (digits-cnn at batch 256: 7.2 vs 3.7 ms a call).
    """
    model = copy.deepcopy(model)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    values = (*inferred.value_info, *inferred.input, *inferred.output)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    nodes, added = [], []

    def const(name: str, value, dtype) -> str:
        added.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    for node in model.graph.node:
        shape = shapes.get(node.input[0]) if node.input else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        name = node.name or node.output[0]
        if (node.op_type not in ("GlobalAveragePool", "AveragePool") or not shape
                or len(shape) != 4 or not all(shape[1:])
                or types.get(node.input[0]) not in FLOAT_TYPES):
            nodes.append(node)
            continue
        channels, height, width = shape[1:]
        kernel = ([height, width] if node.op_type == "GlobalAveragePool"
                  else list(attrs.get("kernel_shape", [])))
        count = int(np.prod(kernel))
        if (len(kernel) != 2 or count & (count - 1)  # 1/count would round
                or list(attrs.get("strides", kernel)) != kernel or any(attrs.get("pads", []))):
            nodes.append(node)
            continue
        windows = [height // kernel[0], width // kernel[1]]
        x = node.input[0]
        if [windows[0] * kernel[0], windows[1] * kernel[1]] != [height, width]:
            x = f"{name}/crop"  # ONNX drops the windows that do not fit
            nodes.append(helper.make_node(
                "Slice", [node.input[0], const(f"{name}/crop_start", [0, 0], np.int64),
                          const(f"{name}/crop_end", [windows[0] * kernel[0],
                                                     windows[1] * kernel[1]], np.int64),
                          const(f"{name}/crop_axes", [2, 3], np.int64)], [x]))
        tiles = [0, channels, windows[0], kernel[0], windows[1], kernel[1]]
        nodes += [
            helper.make_node("Reshape", [x, const(f"{name}/tiles", tiles, np.int64)],
                             [f"{name}/windows"]),
            helper.make_node("ReduceSum", [f"{name}/windows",
                                           const(f"{name}/axes", [3, 5], np.int64)],
                             [f"{name}/sum"], keepdims=0),
            helper.make_node("Mul", [f"{name}/sum", const(
                f"{name}/inverse_count", 1.0 / count,
                helper.tensor_dtype_to_np_dtype(types[node.input[0]]))], list(node.output))]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(added)
    return model


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type, from shape inference and the initializers."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {t.name: t.data_type for t in inferred.initializer}
    for value in (*inferred.input, *inferred.value_info, *inferred.output):
        types[value.name] = value.type.tensor_type.elem_type
    return types


def register_converters() -> None:
    """Add qflow's converters to TVM's Relax ONNX frontend (idempotent)."""
    global _registered
    if _registered:
        return
    from tvm.relax.frontend.onnx import onnx_frontend

    added = {"ConvInteger": _conv_integer_converter(onnx_frontend.OnnxOpConverter)}
    builtin = onnx_frontend._get_convert_map

    def convert_map() -> dict:
        table = builtin()
        for op, converter in added.items():
            table.setdefault(op, converter)  # a future TVM's own converter wins
        return table

    onnx_frontend._get_convert_map = convert_map
    _registered = True


def _conv_integer_converter(base: type) -> type:
    """The ConvInteger converter class (built here: it subclasses a TVM class)."""
    from tvm import relax

    def widened(bb, value, zero_point, per_channel_shape):
        value = relax.op.astype(value, "int32")
        if zero_point is None:
            return value
        zero_point = bb.normalize(relax.op.astype(zero_point, "int32"))
        if len(zero_point.ty.shape) == 1:  # one zero point per output channel
            zero_point = relax.op.reshape(zero_point, per_channel_shape)
        return relax.op.subtract(value, zero_point)

    class ConvInteger(base):
        """ONNX ConvInteger (opset 10): (x - x_zero_point) * (w - w_zero_point) in int32."""

        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            operands = list(inputs) + [None] * (4 - len(inputs))
            x, w, x_zero, w_zero = operands[:4]
            spatial = len(attr["kernel_shape"]) if "kernel_shape" in attr else 2
            if spatial != 2:
                raise QflowError(f"TVM export: ConvInteger over {spatial} spatial dimensions "
                                 "is not supported (2 only)")
            auto_pad = attr.get("auto_pad", b"NOTSET")
            if auto_pad not in (b"NOTSET", "NOTSET"):
                raise QflowError("TVM export: ConvInteger with auto_pad is not supported")
            return relax.op.nn.conv2d(
                widened(bb, x, x_zero, [1, -1, 1, 1]), widened(bb, w, w_zero, [-1, 1, 1, 1]),
                strides=attr.get("strides", [1, 1]), padding=attr.get("pads", [0, 0, 0, 0]),
                dilation=attr.get("dilations", [1, 1]), groups=attr.get("group", 1),
                out_dtype="int32")

    return ConvInteger
