"""Resource and latency estimates of qflow's transformer and token layers (io_parallel).

The layers are the C++ of ``hls/qflow_softmax.h``, ``qflow_layernorm.h``, ``qflow_gelu.h``,
``qflow_matmul.h`` and the token headers, every loop unrolled (the functions are
pipelined as a whole, as hls4ml's io_parallel layers are), with the intermediate widths
the exporter writes into their configs (:mod:`.transformer_graph`). Assumptions, in
``docs/resources.md`` too:

- a product of two non-constant operands takes DSP slices (:func:`dsp_per_product`),
  or LUTs (a·b) when one operand has at most ``LUT_MULTIPLIER_MAX_BITS`` bits; a product
  by a constant (log2 e, the quadratic's 174 and GELU's 591) is shifts and adds, one
  adder of the result's width per extra signed digit;
- an adder, subtractor or comparator of w bits costs w LUTs; a shifter by a variable
  amount of up to 2^s − 1 bits costs w·s LUTs (a barrel shifter of s mux levels);
- the one division per row (softmax: 2^K / S, LayerNorm: 2^K / s) is a restoring
  divider that computes one quotient bit per stage: K + 1 stages of a subtractor as
  wide as the divisor, ``DIVIDER_CYCLES_PER_BIT`` cycle each;
- LayerNorm's square root is the 31 restoring steps of the spec, each a 63-bit
  compare-and-subtract and a mux, ``ISQRT_CYCLES_PER_STEP`` cycle each; its
  leading-zero count is a priority encoder over the variance's bits;
- the rows of a layer run in parallel (full unrolling: one divider and one square root
  per row); the constants (gamma, beta, the position table) are wired in, no BRAM;
- the reuse factor R folds only ``ActivationMatMul`` (its C++ is pipelined with II = R and
  allocates ceil(rows·cols·depth / R) multipliers, as hls4ml's Latency Dense); softmax,
  LayerNorm, GELU and the token layers are fully parallel at any R, as their C++ is.
"""

from __future__ import annotations

import math

import numpy as np

from qflow.graph import transformer as tr
from qflow.graph.ir import Node
from qflow.numerics.transformer import (
    EXP_FRAC_BITS,
    GELU_CURVE_CODE,
    ISQRT_STEPS,
    LOG2E_CODE,
    POW2_CURVE_CODE,
)

from .estimate import (
    LUT_MULTIPLIER_MAX_BITS,
    MULTIPLIER_STAGES,
    LayerEstimate,
    _adder_depth,
    _Context,
    _output_registers,
    code_width,
    csd_terms,
    dsp_per_product,
)
from .onnx_graph import token_transpose
from .transformer_graph import requant_transposes, row_geometry

#: cycles per quotient bit of the row divider, per step of the square root
DIVIDER_CYCLES_PER_BIT = 1
ISQRT_CYCLES_PER_STEP = 1
#: the square root's operand width (62-bit radicand and a carry)
ISQRT_WIDTH = 63


def _bits(n: int) -> int:
    return max(int(n).bit_length(), 1)


def _product(ctx: _Context, est: LayerEstimate, count: int, a_bits: int, a_signed: bool,
             b_bits: int, b_signed: bool) -> None:
    """``count`` products of two non-constant operands: DSPs, or LUTs when narrow."""
    if count <= 0:
        return
    if min(a_bits, b_bits) <= LUT_MULTIPLIER_MAX_BITS:
        est.lut += count * a_bits * b_bits
        kind = "lut"
    else:
        est.dsp += count * dsp_per_product(a_bits, a_signed, b_bits, b_signed, ctx.primitive)
        kind = "dsp"
    est.multipliers += count
    if est.multiplier_kind in ("none", "shift-add") or kind == "dsp":
        est.multiplier_kind = kind
    est.activation_width, est.weight_width = (max(est.activation_width, a_bits),
                                              max(est.weight_width, b_bits))


def _constant_product(est: LayerEstimate, count: int, constant: int, width: int) -> None:
    """``count`` products by a constant: one adder of ``width`` bits per extra digit."""
    est.lut += count * max(int(csd_terms([constant])[0]) - 1, 0) * width
    if est.multiplier_kind == "none":
        est.multiplier_kind = "shift-add"


def _divider(est: LayerEstimate, count: int, quotient_bits: int, divisor_bits: int) -> int:
    """``count`` restoring dividers; returns the cycles of one."""
    est.lut += count * quotient_bits * (divisor_bits + 1)
    est.ff += count * quotient_bits * divisor_bits  # one register stage per quotient bit
    return quotient_bits * DIVIDER_CYCLES_PER_BIT


def _softmax(ctx: _Context, node: Node) -> LayerEstimate:
    """Per row: max tree, per element the exp (constant product, quadratic, shift), a sum
    tree, one divider, per element the product E·rec and the cast."""
    est = LayerEstimate(node.name, node.op)
    x = ctx.graph.tensors[node.inputs[0]]
    out_t = ctx.type_of(node.output)
    widths = tr.softmax_rule(node, x, out_t)
    geo = row_geometry(x.shape, int(node.attrs["axis"]))
    rows, n, elements = geo["outer"] * geo["inner"], geo["length"], geo["n_in"]
    w, k = x.type.width, widths.reciprocal_frac
    scaled_bits, sum_bits = _bits(widths.max_scaled), _bits(widths.max_sum)
    exp_bits, rec_bits = EXP_FRAC_BITS + 1, k - EXP_FRAC_BITS + 1
    est.lut += rows * (n - 1) * w  # the row maximum
    est.lut += elements * w  # d = max - q
    _constant_product(est, elements, LOG2E_CODE, scaled_bits)
    _product(ctx, est, elements, 10, False, 11, False)  # rho * (1024 - rho)
    _constant_product(est, elements, POW2_CURVE_CODE, 27)
    est.lut += elements * (2 * exp_bits + exp_bits * 5)  # two subtractions, shift by n < 32
    est.lut += rows * (n - 1) * sum_bits  # the row sum
    divide = _divider(est, rows, k + 1, sum_bits)
    _product(ctx, est, elements, exp_bits, False, rec_bits, False)  # E * rec
    est.lut += elements * 2 * out_t.width  # the cast: rounding and saturation
    est.products = 2 * elements
    est.weight_bits = 0
    _output_registers(ctx, est, node.output)
    est.latency_cycles = (2 * _adder_depth(n) + 2 * MULTIPLIER_STAGES["dsp"] + 2 + divide)
    return est


def _layernorm(ctx: _Context, node: Node) -> LayerEstimate:
    """Per row: sums of q and q², the moments, a priority encoder, the normalising shift,
    the 31-step square root, one divider; per element the centred value, its shift and
    product with the reciprocal, the product with gamma, beta and the cast."""
    est = LayerEstimate(node.name, node.op)
    x = ctx.graph.tensors[node.inputs[0]]
    out_t = ctx.type_of(node.output)
    widths = tr.layernorm_rule(node, x, out_t)
    _, gamma_t, _, beta_t = tr.layernorm_params(node, widths.row_length)
    geo = row_geometry(x.shape, int(node.attrs["axis"]))
    rows, n, elements = geo["outer"] * geo["inner"], geo["length"], geo["n_in"]
    w, k = x.type.width, widths.reciprocal_frac
    moment_bits = _bits(widths.max_moment)
    rec_bits, norm_bits = k - 29, _bits(widths.max_norm) + 1
    result_bits = _bits(widths.max_result) + 1
    _product(ctx, est, elements, w, x.type.signed, w, x.type.signed)  # q * q
    est.lut += rows * (n - 1) * (2 * moment_bits)  # the two row sums
    _product(ctx, est, rows, moment_bits // 2 + 1, True, moment_bits // 2 + 1, True)  # T * T
    est.lut += rows * moment_bits * (2 + int(csd_terms([n])[0]))  # N * sum q^2 - T^2
    est.lut += rows * (moment_bits + ISQRT_WIDTH * 6)  # priority encoder, shift by 2t
    est.lut += rows * ISQRT_STEPS * 2 * ISQRT_WIDTH  # compare-subtract and mux per step
    est.ff += rows * ISQRT_STEPS * ISQRT_WIDTH
    divide = _divider(est, rows, k + 1, 31)
    est.lut += elements * (2 * _bits(n * (x.type.qmax - x.type.qmin)) + ISQRT_WIDTH * 5)
    _product(ctx, est, elements, ISQRT_WIDTH - 1, False, rec_bits, False)  # |c| << t times rec
    _product(ctx, est, elements, norm_bits, True, gamma_t.width, gamma_t.signed)  # z * gamma
    est.lut += elements * (result_bits + 2 * out_t.width)  # beta, rounding, saturation
    est.products = 3 * elements + rows
    est.weight_bits = n * (gamma_t.width + beta_t.width)
    _output_registers(ctx, est, node.output)
    est.latency_cycles = (_adder_depth(n) + 3 * MULTIPLIER_STAGES["dsp"] + 2
                          + ISQRT_STEPS * ISQRT_CYCLES_PER_STEP + divide)
    return est


def _gelu(ctx: _Context, node: Node) -> LayerEstimate:
    """Per element: |q|, the shift and clip, 591·gap², the sign choice, q·h and the cast."""
    est = LayerEstimate(node.name, node.op)
    x = ctx.graph.tensors[node.inputs[0]]
    out_t = ctx.type_of(node.output)
    tr.gelu_rule(node, x, out_t)
    elements, w = int(np.prod(x.shape)), x.type.width
    est.lut += elements * (w + 2 * 14 + 38)  # |q|, clip and gap, 2^37 - tail
    _product(ctx, est, elements, 14, False, 14, False)  # gap * gap
    _constant_product(est, elements, GELU_CURVE_CODE, 36)
    _product(ctx, est, elements, w, x.type.signed, 38, False)  # q * h
    est.lut += elements * 2 * out_t.width
    est.products = 2 * elements
    _output_registers(ctx, est, node.output)
    est.latency_cycles = 2 * MULTIPLIER_STAGES["dsp"] + 2
    return est


def _matmul(ctx: _Context, node: Node) -> LayerEstimate:
    """rows·cols·depth products of two activations, an adder tree per output."""
    est = LayerEstimate(node.name, node.op)
    a, b = (ctx.graph.tensors[name] for name in node.inputs)
    rows, depth, cols = tr.matmul_dims(node, a, b)
    acc = ctx.type_of(node.output).width
    count = rows * cols * depth
    est.reuse = ctx.reuse
    physical = math.ceil(count / est.reuse)
    _product(ctx, est, physical, a.type.width, a.type.signed, b.type.width, b.type.signed)
    est.products = count
    est.lut += math.ceil(rows * cols * max(depth - 1, 0) / est.reuse) * acc
    est.ff += physical * acc
    _output_registers(ctx, est, node.output)
    est.ii = est.reuse
    est.latency_cycles = est.reuse + 1 + MULTIPLIER_STAGES[est.multiplier_kind] + _adder_depth(
        depth)
    return est


def _moves(ctx: _Context, node: Node) -> LayerEstimate:
    """transpose and slice: wires; the output registers of io_parallel. A patch
    embedding's transpose is part of the in-place Reshape before it, and the transposes
    around a per-feature requantization are not exported: nothing at all."""
    est = LayerEstimate(node.name, node.op)
    producer = next((n for n in ctx.graph.nodes if n.output == node.inputs[0]), None)
    if producer is not None and token_transpose(ctx.graph, producer) is node:
        return est
    if node.name in requant_transposes(ctx.graph):
        return est
    _output_registers(ctx, est, node.output)
    return est


def _mean(ctx: _Context, node: Node) -> LayerEstimate:
    """A sum tree along the axis and one product by the reciprocal per output."""
    est = LayerEstimate(node.name, node.op)
    x = ctx.graph.tensors[node.inputs[0]]
    geo = row_geometry(x.shape, int(node.attrs["axis"]))
    outputs, n = geo["outer"] * geo["inner"], geo["length"]
    recip = int(np.asarray(node.consts["reciprocal"]).reshape(-1)[0])
    sum_bits = x.type.width + _bits(n)
    est.lut += outputs * (n - 1) * sum_bits
    _constant_product(est, outputs, recip, ctx.type_of(node.output).width)
    est.products = outputs
    est.weight_width = code_width([recip])
    _output_registers(ctx, est, node.output)
    est.latency_cycles = _adder_depth(n) + 2
    return est


def _add_const(ctx: _Context, node: Node) -> LayerEstimate:
    """One adder of the output width per element; the constants wired in."""
    est = LayerEstimate(node.name, node.op)
    elements = int(np.prod(ctx.shape_of(node.output)))
    est.lut = elements * ctx.type_of(node.output).width
    est.weight_bits = elements * code_width(node.consts["value"])
    _output_registers(ctx, est, node.output)
    est.latency_cycles = 1
    return est


ESTIMATORS = {
    "softmax": _softmax,
    "layernorm": _layernorm,
    "gelu": _gelu,
    "matmul": _matmul,
    "transpose": _moves,
    "slice": _moves,
    "mean": _mean,
    "add_const": _add_const,
}


def qkr_note(graph) -> str | None:
    """What OFQ's query-key reparameterization costs, in multiplications per sample: each
    head's C × C dense layer (T·C² for T tokens) and its scores against the C-wide input
    (T²·C), where separate q and k of head width d take 2·T·d·C and T²·d. None without
    QKR layers (dense nodes with a ``qkr_head_dim``)."""
    heads = [n for n in graph.nodes if n.op == "dense" and n.attrs.get("qkr_head_dim")]
    if not heads:
        return None
    qkr = plain = 0
    widths = set()
    for node in heads:
        tokens, features = graph.tensors[node.inputs[0]].shape[-2:]
        d = int(node.attrs["qkr_head_dim"])
        widths.add((features, d))
        qkr += tokens * features * features + tokens * tokens * features
        plain += 2 * tokens * d * features + tokens * tokens * d
    shapes = ", ".join(f"{c}×{c} (head width {d})" for c, d in sorted(widths))
    return (f"QKR: {len(heads)} heads as {shapes} products: {qkr:,} multiplications per "
            f"sample for the attention scores, where separate q and k take {plain:,} "
            f"({qkr - plain:+,})")
