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
an op outside it or with operand types the reasoning does not cover (a float ``MatMul``,
a float ``Div``), rather than compiling something approximate.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

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
    "Clip": (INTEGER_TYPES, "integer maximum then minimum"),
    "ReduceSum": (INTEGER_TYPES, "int64 sum, bounded at export"),
    "ReduceMax": (INTEGER_TYPES, "integer maximum"),
    "Abs": (INTEGER_TYPES, "int64 magnitude of codes far below 2**63"),
    "Gather": (INTEGER_TYPES, "a power of two read from a table (shift by a tensor amount)"),
    "Transpose": (ANY_TYPE, "data movement"),
    "MaxPool": (frozenset({TensorProto.DOUBLE}), "maximum of exact doubles (codes <= 53 "
                                                 "bits); no fast-math in the LLVM target"),
    "Cast": (ANY_TYPE, "integer <-> exact double, int64 -> uint8 of in-range codes"),
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

_registered = False


def check_exact(model: onnx.ModelProto) -> None:
    """Refuse a model TVM might not compute exactly: a QflowError naming node and op."""
    types = _element_types(model)
    for node in model.graph.node:
        where = f"TVM export: node {node.name or node.output[0]!r} (op {node.op_type!r})"
        if node.domain not in ("", "ai.onnx"):
            raise QflowError(f"{where}: custom op domain {node.domain!r} is not supported")
        if node.op_type not in EXACT_OPS:
            raise QflowError(f"{where}: no exact TVM lowering for this op")
        allowed, _ = EXACT_OPS[node.op_type]
        elem = types.get(node.input[0]) if node.input else None
        if allowed is not ANY_TYPE and elem not in allowed:
            name = TensorProto.DataType.Name(elem) if elem else "unknown"
            raise QflowError(f"{where}: operand type {name} is not computed exactly here")


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
