"""int8 convolution and dense layers on x86 VNNI for CPU builds: the integer products of
an 8-bit layer computed as integers, four at a time per lane.

The integer ONNX computes a convolution or dense layer in float32 where every partial
sum is an exact integer (:mod:`qflow.export.int_onnx`); a float kernel then spends a
32-bit multiply-add per product. When the layer's input codes fit 8 bits (unsigned, or
signed and offset by 128) and each output channel's weights are an int8 code times a
power of two, this module replaces the ``conv2d`` (``matmul``) in the Relax module by a
hand-written kernel on those codes: ``vpdpbusd`` sums four u8 × s8 products into each
int32 lane without intermediate saturation (unlike ``vpmaddubsw``, the AVX2 route, whose
int16 pair sums saturate), 16 lanes per instruction.

The convolution kernel (:func:`conv_kernel`):

- packs each sample's input once: codes as uint8 (plus the offset), four input channels
  side by side per pixel, the padding as code 0 (the offset), the columns split by
  stride phase, so that one 64-byte load holds four channels of 16 output columns;
- for a tile of output channels and 16 (8, 4) columns of one output row, accumulates
  in int32 registers over input-channel quads and taps, each filter's four weights
  broadcast;
- writes ``(acc - 128 * sum(w)) * 2**e`` per output channel as float32 (the correction
  only for offset inputs).

The dense kernel (:func:`dense_kernel`) packs each sample's codes as uint8 and
accumulates up to 8 vectors of 16 (8, 4) output features at a time, each input quad
broadcast; a dense layer is planned as a 1 x 1 convolution of its transposed weights.

Exactness: ``|acc|`` is at most ``255 * sum|w|`` per channel, checked below 2**24, so
the int32 sums cannot overflow and their float32 conversion is exact; times ``2**e``
is the layer's exact value, which the integer ONNX's float32 route has proved
representable. The bias and the requantization stay where they were, after it.
``qflow verify`` runs the build.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qflow.export.int_onnx_ops import _u8_operand
from qflow.numerics import FixedType

#: CPU flags the kernel's instructions need (512-, 256- and 128-bit ``vpdpbusd``)
CPU_FLAGS = ("avx512_vnni", "avx512vl", "avx512bw")
#: function attribute that marks the kernels: the tile schedule leaves them alone
KERNEL_ATTR = "qflow.int8_kernel"
#: output columns per vector (int32 lanes), largest first; the width must divide
LANES = (16, 8, 4)
#: int32 accumulator bytes per tile: 8 zmm or 16 ymm registers
TILE_BYTES = 512
#: input columns packed per vector step (four channels each: one 64-byte store)
PACK_COLUMNS = 16
PACK_LANES = 64
#: smallest fixed batch whose dense layers take the int8 kernel: below it the products
#: take less time than calling the kernel and its epilogue apart (jet-mlp's --batch 1
#: build, side by side: 0.0110 ms with the kernels, 0.0106 without)
DENSE_MIN_BATCH = 8
SUM_LIMIT = 2**24  # float32 holds every integer below it


@dataclass(frozen=True)
class Int8Layer:
    """How one convolution (or dense layer, as 1 x 1 filters) runs on int8 codes."""

    codes: np.ndarray  # int8 [OC, C, K, K]: the weights over 2**e
    scales: np.ndarray  # float32 [OC]: 2**e per output channel
    correction: np.ndarray  # int32 [OC]: offset * sum(w) per output channel
    offset: int  # added to every input code (0 or 128)
    nodes: tuple[str, ...] = ()  # the integer ONNX's nodes with these weights


def host_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Does this machine's CPU have the kernel's instructions (Linux; False elsewhere)?"""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return all(flag in flags for flag in CPU_FLAGS)


def weight_key(weights: np.ndarray) -> str:
    """The key a layer's float32 weights are found by in the Relax module."""
    data = np.ascontiguousarray(weights, dtype=np.float32)
    return hashlib.sha256(repr(data.shape).encode() + data.tobytes()).hexdigest()


def plan_int8_layers(model: onnx.ModelProto) -> dict[str, Int8Layer]:
    """Weight key (:func:`weight_key`) -> how the ``Conv`` or ``MatMul`` of the integer
    ONNX with those weights runs on int8 codes. Layers that do not qualify are left
    out, and so are all that share their weights."""
    meta = {p.key: p.value for p in model.metadata_props}
    initializers = {i.name: i for i in model.graph.initializer}
    graph_input = meta.get("qflow.input_tensor")
    input_casts = {n.output[0] for n in model.graph.node
                   if n.op_type == "Cast" and n.input[0] == model.graph.input[0].name}
    plan: dict[str, Int8Layer | None] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul") or node.input[1] not in initializers:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1])):
            continue
        name = graph_input if node.input[0] in input_casts else node.input[0]
        offset = _input_offset(meta.get(f"qflow.type.{name}"))
        weights = numpy_helper.to_array(initializers[node.input[1]])
        # a dense layer's [K, O] weights are O filters of K channels, 1 x 1
        filters = weights.T.reshape(*weights.T.shape, 1, 1) if node.op_type == "MatMul" \
            else weights
        conv = _int8_layer(filters, offset) if offset is not None and filters.ndim == 4 else None
        key = weight_key(weights)
        if key not in plan:
            plan[key] = None if conv is None else dataclasses.replace(conv, nodes=(node.name,))
        elif _same(plan[key], conv):
            plan[key] = dataclasses.replace(plan[key], nodes=(*plan[key].nodes, node.name))
        else:  # the Relax module is matched by weights: one that does not qualify keeps
            plan[key] = None  # every layer with its weights on the float route
    return {key: conv for key, conv in plan.items() if conv is not None}


def _input_offset(declared: str | None) -> int | None:
    """The offset that maps the codes of type ``declared`` onto uint8, or None (the
    integer ONNX's rule for its 8-bit operands)."""
    if declared is None:
        return None
    t = FixedType.parse(declared)
    return _u8_operand(t.qmin, t.qmax)


def _int8_layer(weights: np.ndarray, offset: int) -> Int8Layer | None:
    """The int8 form of float32 ``weights`` [OC, C, K, K], or None when a channel's
    weights are not an int8 code times a power of two or its sums could pass 2**24."""
    if weights.ndim != 4 or weights.dtype != np.float32 or weights.shape[2] != weights.shape[3]:
        return None
    flat = weights.astype(np.float64).reshape(len(weights), -1)
    exponents = np.zeros(len(weights), np.int64)
    for c, row in enumerate(flat):
        nonzero = row[row != 0]
        if nonzero.size:  # the largest power of two that divides every weight
            exponents[c] = min(_lowest_bit(float(v)) for v in nonzero)
    codes = np.ldexp(flat, -exponents[:, None])
    if not (np.all(codes == np.round(codes)) and codes.min(initial=0) >= -128
            and codes.max(initial=0) <= 127):
        return None
    if (255 * np.abs(codes).sum(axis=1)).max(initial=0) >= SUM_LIMIT:
        return None
    scales = np.ldexp(np.float32(1), exponents).astype(np.float32)
    if not np.all(np.isfinite(scales)) or np.any(scales == 0):
        return None
    return Int8Layer(codes=codes.reshape(weights.shape).astype(np.int8), scales=scales,
                    correction=(offset * codes.sum(axis=1)).astype(np.int32), offset=offset)


def _lowest_bit(value: float) -> int:
    """The exponent of the lowest set bit of nonzero ``value``: value / 2**it is odd."""
    mantissa, exponent = math.frexp(value)
    bits = int(abs(mantissa) * 2**53)  # exact: a float's mantissa has at most 53 bits
    return exponent - 53 + (bits & -bits).bit_length() - 1


def _same(a: Int8Layer | None, b: Int8Layer | None) -> bool:
    return a is not None and b is not None and a.offset == b.offset


def pack_weights(codes: np.ndarray, tile: int) -> np.ndarray:
    """int8 ``codes`` [OC, C, K, K] laid out [OC / tile, ICo, K, K, tile, 4]: the four
    weights of one filter over an input-channel quad side by side (zero past C)."""
    out_channels, channels, k, _ = codes.shape
    quads = -(-channels // 4)
    padded = np.zeros((out_channels, quads * 4, k, k), np.int8)
    padded[:, :channels] = codes
    return np.ascontiguousarray(padded.reshape(out_channels // tile, tile, quads, 4, k, k)
                                .transpose(0, 2, 4, 5, 1, 3))


def conv_kernel(in_shape, conv: Int8Layer, out_shape, strides, pads):
    """(kernel, tile) for one convolution: the kernel maps ``(x float32 [N, C, H, W],
    weights packed by tile, scales, corrections)`` to float32 ``[N, OC, OH, OW]`` for any
    batch size N; ``pads``: (top, left, bottom, right)."""
    from tvm.script import tirx as T

    channels, height, width = (int(v) for v in in_shape)
    out_channels, out_height, out_width = (int(v) for v in out_shape)
    stride_y, stride_x = strides
    top, left, bottom, right = pads
    quads, k, offset = -(-channels // 4), conv.codes.shape[2], conv.offset
    lanes = next(v for v in LANES if out_width % v == 0)
    tile = next(t for t in (16, 8, 4, 2, 1)
                if out_channels % t == 0 and t * lanes * 4 <= TILE_BYTES)
    padded_h = height + top + bottom
    phase_w = -(-(width + left + right) // stride_x)  # columns per stride phase
    size = quads * padded_h * stride_x * phase_w * 4
    instruction = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
    acc_t, bytes_t, ubytes_t = f"int32x{lanes}", f"int8x{4 * lanes}", f"uint8x{4 * lanes}"
    column_tiles, channel_tiles = out_width // lanes, out_channels // tile

    @T.prim_func(s_tir=True, check_well_formed=False)
    def kernel(x_handle: T.handle, w_handle: T.handle, s_handle: T.handle,
               c_handle: T.handle, out_handle: T.handle):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(x_handle, (n, channels, height, width), "float32")
        w = T.match_buffer(w_handle, (channel_tiles, quads, k, k, tile, 4), "int8")
        scale = T.match_buffer(s_handle, (out_channels,), "float32")
        correction = T.match_buffer(c_handle, (out_channels,), "int32")
        out = T.match_buffer(out_handle, (n, out_channels, out_height, out_width), "float32")
        packed = T.alloc_buffer((size,), "uint8")
        acc = T.alloc_buffer((tile, lanes), "int32", scope="local")
        for b in range(n):
            for j in range(size // PACK_LANES):  # padding and missing channels: code 0
                packed[T.ramp(j * PACK_LANES, 1, PACK_LANES)] = T.broadcast(
                    T.uint8(offset), PACK_LANES)
            for j in range(size % PACK_LANES):
                packed[size - size % PACK_LANES + j] = T.uint8(offset)
            for q, h, p in T.grid(quads, height, stride_x):
                # the columns of phase p inside the input: c * stride_x + p - left in [0, W)
                first = T.floordiv(left - p + stride_x - 1, stride_x)
                count = T.floordiv(width + left - p + stride_x - 1, stride_x) - first
                row = ((q * padded_h + h + top) * stride_x + p) * phase_w
                for block in range(count // PACK_COLUMNS):
                    start = first + block * PACK_COLUMNS
                    column = start * stride_x + p - left
                    # four channels of 16 columns, interleaved into 64 bytes
                    packed[T.ramp((row + start) * 4, 1, PACK_LANES)] = \
                        T.Shuffle([T.Cast(f"uint8x{PACK_COLUMNS}", T.Select(
                            q * 4 + i < channels,
                            x[b, T.min(q * 4 + i, channels - 1), h,
                              T.ramp(column, stride_x, PACK_COLUMNS)]
                            + T.broadcast(T.float32(offset), PACK_COLUMNS),
                            T.broadcast(T.float32(offset), PACK_COLUMNS))) for i in range(4)],
                                  [i * PACK_COLUMNS + j for j in range(PACK_COLUMNS)
                                   for i in range(4)])
                for c, i in T.grid(count % PACK_COLUMNS, 4):
                    if q * 4 + i < channels:
                        packed[(row + first + count - count % PACK_COLUMNS + c) * 4 + i] = T.Cast(
                            "uint8", x[b, q * 4 + i, h,
                                       (first + count - count % PACK_COLUMNS + c) * stride_x
                                       + p - left] + T.float32(offset))
            for o, y, ct in T.grid(channel_tiles, out_height, column_tiles):
                for j in T.unroll(tile):
                    acc[j, T.ramp(0, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                for q, ky, kx in T.grid(quads, k, k):
                    for j in T.unroll(tile):
                        acc[j, T.ramp(0, 1, lanes)] = T.call_llvm_pure_intrin(
                            acc_t, instruction, acc[j, T.ramp(0, 1, lanes)],
                            T.reinterpret(bytes_t, packed.vload(
                                [((((q * padded_h + y * stride_y + ky) * stride_x + kx % stride_x)
                                   * phase_w) + ct * lanes + kx // stride_x) * 4], ubytes_t)),
                            T.reinterpret(bytes_t, T.broadcast(T.reinterpret(
                                "int32", w.vload([o, q, ky, kx, j, 0], "int8x4")), lanes)))
                for j in T.unroll(tile):
                    for v in T.vectorized(lanes):
                        out[b, o * tile + j, y, ct * lanes + v] = T.Cast(
                            "float32", acc[j, v] - correction[o * tile + j]) * scale[o * tile + j]

    return kernel, tile


def dense_kernel(in_features: int, layer: Int8Layer):
    """(kernel, lanes) for one dense layer: the kernel maps ``(x float32 [N, K], weights
    packed by lanes, scales, corrections)`` to float32 ``[N, O]`` for any N. Per sample,
    the input codes packed once as uint8, then up to 8 vectors of output features
    accumulated at a time, each input quad broadcast."""
    from tvm.script import tirx as T

    out_features, offset = layer.codes.shape[0], layer.offset
    quads = -(-in_features // 4)
    lanes = next(v for v in LANES if out_features % v == 0)
    tile = next(t for t in (8, 4, 2, 1) if (out_features // lanes) % t == 0)
    instruction = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
    acc_t, bytes_t = f"int32x{lanes}", f"int8x{4 * lanes}"
    groups = out_features // lanes // tile

    @T.prim_func(s_tir=True, check_well_formed=False)
    def kernel(x_handle: T.handle, w_handle: T.handle, s_handle: T.handle,
               c_handle: T.handle, out_handle: T.handle):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(x_handle, (n, in_features), "float32")
        w = T.match_buffer(w_handle, (groups * tile, quads, 1, 1, lanes, 4), "int8")
        scale = T.match_buffer(s_handle, (out_features,), "float32")
        correction = T.match_buffer(c_handle, (out_features,), "int32")
        out = T.match_buffer(out_handle, (n, out_features), "float32")
        packed = T.alloc_buffer((quads * 4,), "uint8")
        acc = T.alloc_buffer((tile, lanes), "int32", scope="local")
        for i in range(in_features, quads * 4):  # the missing features: any code, as
            packed[i] = T.uint8(0)  # their weights are zero
        for b in range(n):
            for i in T.vectorized(in_features):  # one vector conversion, not one per code
                packed[i] = T.Cast("uint8", x[b, i] + T.float32(offset))
            for g in range(groups):
                for t in T.unroll(tile):
                    acc[t, T.ramp(0, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                for q in range(quads):
                    for t in T.unroll(tile):
                        acc[t, T.ramp(0, 1, lanes)] = T.call_llvm_pure_intrin(
                            acc_t, instruction, acc[t, T.ramp(0, 1, lanes)],
                            T.reinterpret(bytes_t, T.broadcast(T.reinterpret(
                                "int32", packed.vload([q * 4], "uint8x4")), lanes)),
                            w.vload([g * tile + t, q, 0, 0, 0, 0], bytes_t))
                for t in T.unroll(tile):
                    for v in T.vectorized(lanes):
                        out[b, (g * tile + t) * lanes + v] = T.Cast(
                            "float32", acc[t, v] - correction[(g * tile + t) * lanes + v]
                        ) * scale[(g * tile + t) * lanes + v]

    return kernel, lanes


def use_int8_kernels(mod, plan: dict[str, Int8Layer]):
    """``mod`` (a Relax module from the integer ONNX, before legalization) with every
    ``conv2d`` and ``matmul`` the plan covers replaced by a call of its int8 kernel;
    (module, the names of the integer ONNX's nodes that take one)."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def __init__(self, module):
            super().__init__(module)
            self.nodes: set[str] = set()

        def visit_call_(self, call):
            call = super().visit_call_(call)
            replaced = self._replace(call)
            return call if replaced is None else replaced

        def _replace(self, call):
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul":
                return self._dense(call)
            if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
                return None
            data, weight = call.args
            attrs = call.attrs
            if (not isinstance(weight, tvm.ir.expr.GenericConst) or attrs.data_layout != "NCHW"
                    or attrs.kernel_layout != "OIHW" or attrs.out_layout != "NCHW"
                    or int(attrs.groups) != 1 or any(int(d) != 1 for d in attrs.dilation)
                    or data.ty.dtype != "float32"
                    or call.ty.dtype != "float32"):
                return None
            conv = plan.get(weight_key(weight.value.numpy()))
            in_shape, out_shape = data.ty.shape, call.ty.shape
            if conv is None or in_shape is None or out_shape is None:
                return None
            try:
                static = [int(v) for v in (*in_shape.values[1:], *out_shape.values[1:])]
            except TypeError:
                return None
            if static[5] % LANES[-1]:  # output columns: no whole vector of them
                return None
            kernel, tile = conv_kernel(static[:3], conv, static[3:],
                                       [int(v) for v in attrs.strides],
                                       [int(v) for v in attrs.padding])
            return self._call(kernel, "qflow_int8_conv", call, conv, tile)

        def _dense(self, call):
            data, weight = call.args
            if (not isinstance(weight, tvm.ir.expr.GenericConst) or data.ty.dtype != "float32"
                    or call.ty.dtype != "float32" or data.ty.shape is None
                    or len(data.ty.shape.values) != 2 or len(weight.value.shape) != 2):
                return None
            layer = plan.get(weight_key(weight.value.numpy()))
            if layer is None or layer.codes.shape[0] % LANES[-1]:
                return None
            batch = data.ty.shape.values[0]
            if isinstance(batch, tvm.tirx.IntImm) and int(batch) < DENSE_MIN_BATCH:
                return None  # a few samples: the float layer fused with its epilogue is faster
            kernel, lanes = dense_kernel(int(weight.value.shape[0]), layer)
            return self._call(kernel, "qflow_int8_dense", call, layer, lanes)

        def _call(self, kernel, name, call, layer, tile):
            """``call`` replaced by one of ``kernel`` on the layer's constants."""
            # no global symbol: the build names it, as it does the legalized operators
            gvar = self.builder_.add_func(kernel.without_attr("global_symbol"), name)
            self.nodes.update(layer.nodes)
            constants = (pack_weights(layer.codes, tile), layer.scales, layer.correction)
            return relax.call_tir(gvar, [call.args[0], *map(relax.const, constants)], call.ty)

    rewriter = Rewriter(mod)
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.get(), sorted(rewriter.nodes)

