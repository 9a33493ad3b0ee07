"""Resource and latency estimates of the hls4ml project of a QGraph, without vendor tools.

The estimate follows how hls4ml 1.3 (Vivado/Vitis backends) lays a network out: how many
multipliers a layer gets from its reuse factor, whether a product needs a DSP slice, fabric
logic or only shifts and adds, where the weights live and how many cycles a layer takes.
It is an order-of-magnitude model for comparing designs and checking a budget before a
synthesis run, not a substitute for one. Every formula, constant and assumption is in
``docs/resources.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from rich.table import Table

from qflow.errors import QflowError
from qflow.graph.infer import type_for_range
from qflow.graph.ir import Node, QGraph
from qflow.numerics import FixedType
from qflow.targets import IO_TYPES, STRATEGIES, TargetSpec

from .binary import is_binary_layer, xnor_tensors

#: multiplier operand widths (signed) of one DSP slice, by primitive
DSP_OPERAND_BITS = {"DSP48E2": (27, 18), "DSP48E1": (25, 18)}
#: a product whose narrower operand has at most this many bits is built from LUTs
LUT_MULTIPLIER_MAX_BITS = 4
#: a constant with at most this many signed powers of two becomes shifts and adds (Latency)
SHIFT_ADD_MAX_TERMS = 2
#: one BRAM36 block: 36 Kib, as (depth, width) aspect ratios of its read port
BRAM36_BITS = 36 * 1024
BRAM36_SHAPES = ((512, 72), (1024, 36), (2048, 18), (4096, 9), (8192, 4), (16384, 2),
                 (32768, 1))
#: a FIFO of at most this many bits, or this deep, stays in shift-register LUTs
#: (Vitis HLS config_storage defaults auto_srl_max_bits and auto_srl_max_depth)
FIFO_SRL_MAX_BITS = 1024
FIFO_SRL_MAX_DEPTH = 2
#: bits one SRLC32E LUT holds
SRL_BITS_PER_LUT = 32
#: utilisation above which a warning is given even when the design fits
UTILISATION_WARNING = 0.8
#: largest fully unrolled multiply loop Vivado HLS accepts (hls4ml issue #1013)
UNROLL_LIMIT = 4096
#: pipeline stages of one product, by multiplier kind
MULTIPLIER_STAGES = {"dsp": 3, "lut": 1, "shift-add": 1, "xnor": 1, "none": 0}
#: adder-tree levels that fit in one clock cycle at 100-200 MHz
ADDER_LEVELS_PER_CYCLE = 2

MULTIPLIER_KINDS = ("dsp", "lut", "shift-add", "xnor", "none")
#: ops whose hardware the reuse factor folds (hls4ml's Dense, Conv, BatchNormalization
#: and qflow's ActivationMatMul); every other layer is fully parallel at any reuse factor
FOLDED_OPS = ("dense", "conv2d", "scale_shift", "matmul")
RESOURCES = ("dsp", "lut", "ff", "bram36")


@dataclass
class LayerEstimate:
    """One QGraph node as hls4ml would build it."""

    node: str
    op: str
    multiplier_kind: str = "none"
    products: int = 0  # logical products of one pass (a dense layer, one output pixel)
    multipliers: int = 0  # physical multipliers after the reuse factor
    activation_width: int = 0  # bits of the multiplied data operand
    weight_width: int = 0  # bits of the weight (or scale) operand, one binary point
    reuse: int = 1
    dsp: int = 0
    lut: int = 0
    ff: int = 0
    weight_bits: int = 0  # stored constants: weights (or scales) and biases
    bram36: int = 0
    fifo_bits: int = 0  # io_stream output FIFO
    latency_cycles: int = 0
    ii: int = 1  # cycles between two inputs this layer accepts


@dataclass
class ResourceEstimate:
    """Per-layer estimates, totals, the target's budget and warnings."""

    layers: list[LayerEstimate]
    totals: dict
    budget: dict
    warnings: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    #: DSP, LUT, FF and BRAM36 of the layers the reuse factor does not fold (FOLDED_OPS)
    unfolded: dict = field(default_factory=dict)
    #: facts worth a line that are not warnings (what OFQ's QKR costs)
    notes: list[str] = field(default_factory=list)

    def fits_at_some_reuse(self) -> bool:
        """Whether the layers the reuse factor does not fold are within every budget (if
        not, no reuse factor makes the design fit)."""
        return all(self.unfolded.get(k, 0) <= self.budget.get(k, 0) for k in RESOURCES)

    def _share(self, used: int, key: str) -> float:
        have = self.budget.get(key, 0)
        return used / have if have else (math.inf if used else 0.0)

    def utilisation(self) -> dict[str, float]:
        """Fraction of the budget each resource uses (``inf`` for a zero budget)."""
        out = {}
        for key in RESOURCES:
            have = self.budget.get(key, 0)
            used = self.totals[key]
            out[key] = used / have if have else (math.inf if used else 0.0)
        return out

    def fits(self) -> bool:
        """Whether every resource is within the target's budget."""
        return all(used <= 1 for used in self.utilisation().values())

    def verdict(self) -> str:
        """One line saying whether the design fits the board, and by what margin."""
        target = self.settings.get("target", "the target")
        util = self.utilisation()
        if self.fits():
            key = max(util, key=util.get)
            return (f"fits {target}: the largest share is {key.upper()} at "
                    f"{_pct(util[key])} of the board")
        over = ", ".join(f"{k.upper()} {_pct(v)}" for k, v in util.items() if v > 1)
        line = f"does NOT fit {target}: {over} of the board"
        if not self.fits_at_some_reuse():
            fixed = ", ".join(f"{k.upper()} {_pct(self._share(self.unfolded[k], k))}"
                              for k in RESOURCES
                              if self.unfolded.get(k, 0) > self.budget.get(k, 0))
            line += (f"; at any reuse factor: the layers it does not fold alone need "
                     f"{fixed}")
        return line

    def to_json(self) -> dict:
        util = {k: (round(v, 4) if math.isfinite(v) else None)
                for k, v in self.utilisation().items()}
        return {"settings": dict(self.settings), "layers": [asdict(x) for x in self.layers],
                "totals": dict(self.totals), "budget": dict(self.budget),
                "unfolded": dict(self.unfolded), "fits_at_some_reuse": self.fits_at_some_reuse(),
                "utilisation": util, "fits": self.fits(), "verdict": self.verdict(),
                "warnings": list(self.warnings), "notes": list(self.notes)}

    def table(self) -> Table:
        s = self.settings
        table = Table(title=f"Estimated resources on {s.get('target', '?')} ({s.get('io_type')}, "
                            f"{s.get('strategy')}, reuse {s.get('reuse_factor')})")
        for name in ("node", "op", "multiplier", "products", "mults", "act×w bits", "DSP",
                     "LUT", "FF", "weight bits", "BRAM36", "cycles", "II"):
            table.add_column(name, justify="left" if name in ("node", "op", "multiplier")
                             else "right")
        for x in self.layers:
            widths = f"{x.activation_width}×{x.weight_width}" if x.products else ""
            table.add_row(x.node, x.op, x.multiplier_kind, _n(x.products), _n(x.multipliers),
                          widths, _n(x.dsp), _n(x.lut), _n(x.ff), _n(x.weight_bits),
                          _n(x.bram36), _n(x.latency_cycles), _n(x.ii))
        t = self.totals
        table.add_section()
        table.add_row("total", "", "", "", "", "", _n(t["dsp"]), _n(t["lut"]), _n(t["ff"]),
                      _n(t["weight_bits"]), _n(t["bram36"]),
                      f"{t['latency_cycles']} ({t['latency_us']:.3g} µs)", _n(t["ii"]))
        util = self.utilisation()
        table.add_row("budget", "", "", "", "", "",
                      *(f"{self.budget.get(k, 0)} ({_pct(util[k])})" for k in ("dsp", "lut", "ff")),
                      "", f"{self.budget.get('bram36', 0)} ({_pct(util['bram36'])})", "", "")
        return table


def _n(value: int) -> str:
    return f"{value:,}" if value else "-"


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.0f}%" if math.isfinite(fraction) else "n/a"


# -- operands ----------------------------------------------------------------------------

def csd_terms(codes) -> np.ndarray:
    """Minimal number of signed powers of two per integer (non-adjacent form weight).

    >>> csd_terms([0, 1, 3, 7, -6, 85, 96]).tolist()
    [0, 1, 2, 2, 2, 4, 2]
    """
    x = np.abs(np.asarray(codes, dtype=np.int64)).astype(np.uint64)
    half = x >> np.uint64(1)
    three_halves = x + half
    changed = half ^ three_halves
    return (np.bitwise_count(three_halves & changed)
            + np.bitwise_count(half & changed)).astype(np.int64)


def aligned_codes(codes, fracs) -> np.ndarray:
    """Codes on one common binary point (the exporter's one type per tensor)."""
    codes = np.asarray(codes, dtype=np.int64)
    fracs = np.asarray(fracs, dtype=np.int64).reshape(-1)
    shift = (fracs.max() - fracs).reshape((-1,) + (1,) * (codes.ndim - 1))
    return codes << shift if codes.ndim else codes << shift.reshape(())


def code_width(codes) -> int:
    """Bits of the narrowest integer type holding every code (sign bit when needed)."""
    codes = np.asarray(codes)
    if codes.size == 0:
        return 1
    return type_for_range(int(codes.min()), int(codes.max()), 0).width


def _is_binary_or_ternary(codes: np.ndarray) -> bool:
    """Codes in {-1, 0, 1}·2^k for one k: a product is a sign choice and a shift."""
    nonzero = np.abs(codes[codes != 0])
    return nonzero.size > 0 and bool((nonzero == nonzero[0]).all()) and int(
        nonzero[0]).bit_count() == 1


def dsp_primitive(target: TargetSpec) -> str:
    """DSP48E1 on 7-series / Zynq-7000 parts (xc7...), DSP48E2 on UltraScale(+)."""
    return "DSP48E1" if target.part.lower().startswith("xc7") else "DSP48E2"


def dsp_per_product(a_width: int, a_signed: bool, b_width: int, b_signed: bool,
                    primitive: str) -> int:
    """DSP slices of one a×b product, tiling the signed multiplier in its better orientation.

    >>> dsp_per_product(21, True, 11, True, "DSP48E2")
    1
    >>> dsp_per_product(32, True, 32, True, "DSP48E2"), dsp_per_product(8, False, 8, True,
    ...                                                                   "DSP48E1")
    (4, 1)
    """
    big, small = DSP_OPERAND_BITS[primitive]
    a = a_width + (not a_signed)  # an unsigned operand needs a sign bit in the DSP
    b = b_width + (not b_signed)
    return min(math.ceil(a / big) * math.ceil(b / small), math.ceil(b / big) * math.ceil(a / small))


@dataclass
class _Context:
    graph: QGraph
    target: TargetSpec
    io_type: str
    strategy: str
    reuse: int
    primitive: str
    #: tensors in hls4ml's 1-bit binary type (``binary.xnor_tensors``)
    xnor: frozenset = frozenset()

    def type_of(self, tensor: str) -> FixedType:
        return self.graph.tensors[tensor].type

    def width_of(self, tensor: str) -> int:
        """Bits of one value as the project stores it (1 in hls4ml's binary type)."""
        return 1 if tensor in self.xnor else self.type_of(tensor).width

    def shape_of(self, tensor: str) -> tuple[int, ...]:
        return self.graph.tensors[tensor].shape

    @property
    def stream(self) -> bool:
        return self.io_type == "io_stream"


def _adder_depth(terms: int) -> int:
    levels = math.ceil(math.log2(terms)) if terms > 1 else 0
    return math.ceil(levels / ADDER_LEVELS_PER_CYCLE)


def _choose_multiplier(codes: np.ndarray, est: LayerEstimate,
                       constants_in_fabric: bool) -> tuple[str, float]:
    """Multiplier kind of a layer and its mean signed-digit terms per nonzero constant."""
    nonzero = codes[codes != 0]
    if nonzero.size == 0:
        return "none", 0.0
    terms = csd_terms(nonzero)
    if _is_binary_or_ternary(nonzero):
        return "shift-add", 1.0
    # Constant operands only under Latency: HLS strength-reduces a product by a constant
    # with few signed digits to shifts and adds; weights read from a memory are unknown.
    if constants_in_fabric and int(terms.max()) <= SHIFT_ADD_MAX_TERMS:
        return "shift-add", float(terms.mean())
    if min(est.activation_width, est.weight_width) <= LUT_MULTIPLIER_MAX_BITS:
        return "lut", float(terms.mean())
    return "dsp", float(terms.mean())


def _multiplier_cost(ctx: _Context, est: LayerEstimate, kind: str, mean_terms: float,
                     a_type: FixedType, w_signed: bool, acc_width: int) -> None:
    """Fill dsp and lut of ``est`` for its physical multipliers."""
    est.multiplier_kind = kind
    if kind == "dsp":
        est.dsp = est.multipliers * dsp_per_product(a_type.width, a_type.signed,
                                                    est.weight_width, w_signed, ctx.primitive)
    elif kind == "lut":
        est.lut += est.multipliers * est.activation_width * est.weight_width
    elif kind == "shift-add":
        # one accumulator-wide adder per extra signed digit; a single digit is wiring
        est.lut += round(est.multipliers * max(mean_terms - 1.0, 0.0) * acc_width)


# -- memories ----------------------------------------------------------------------------

def bram36_for(depth: int, width: int) -> int:
    """BRAM36 blocks of a depth×width memory: the best aspect ratio, at least bits / 36 Kib.

    >>> bram36_for(512, 72), bram36_for(1, 2000), bram36_for(4096, 8)
    (1, 28, 1)
    """
    if depth <= 0 or width <= 0:
        return 0
    tiled = min(math.ceil(depth / d) * math.ceil(width / w) for d, w in BRAM36_SHAPES)
    return max(tiled, math.ceil(depth * width / BRAM36_BITS))


def _weight_memory(ctx: _Context, est: LayerEstimate, n_in: int, n_out: int) -> None:
    """Resource strategy: weights reshaped to R words of ceil(n_in·n_out/R) weights each."""
    if ctx.strategy != "Resource":
        return
    block = math.ceil(n_in * n_out / est.reuse)
    est.bram36 += bram36_for(est.reuse, block * est.weight_width)


def _fifo(ctx: _Context, est: LayerEstimate, tensor: str) -> None:
    """io_stream: one FIFO per layer output, one word (all channels) per pixel, deep enough
    for the whole tensor (hls4ml's default depth)."""
    if not ctx.stream:
        return
    shape = ctx.shape_of(tensor)
    width_bits = ctx.width_of(tensor) * (shape[0] if shape else 1)
    depth = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    est.fifo_bits = depth * width_bits
    if est.fifo_bits > FIFO_SRL_MAX_BITS and depth > FIFO_SRL_MAX_DEPTH:
        est.bram36 += bram36_for(depth, width_bits)
    else:
        est.lut += math.ceil(est.fifo_bits / SRL_BITS_PER_LUT)


def _output_registers(ctx: _Context, est: LayerEstimate, tensor: str) -> None:
    """io_parallel arrays between layers are fully partitioned: one register per bit.
    io_stream keeps one pixel (all channels) in registers; the rest is in the FIFO."""
    shape = ctx.shape_of(tensor)
    elements = shape[0] if (ctx.stream and len(shape) > 1) else int(np.prod(shape))
    est.ff += elements * ctx.width_of(tensor)


# -- per-op estimators ---------------------------------------------------------------------

def _closest_valid_reuse(n_in: int, n_out: int, reuse: int) -> int:
    """hls4ml's Resource strategy moves R to the nearest value its kernels accept."""
    total = n_in * n_out
    valid = sorted(r for r in _divisors(total)
                   if (r < n_in or r % n_in == 0)
                   and (r >= n_in or math.ceil(total / min(n_in, r)) % n_out == 0))
    return min(valid, key=lambda r: (abs(r - reuse), r))


def _divisors(n: int) -> set[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return set(small) | {n // d for d in small}


def _weighted(ctx: _Context, node: Node) -> LayerEstimate:
    """dense and conv2d: one pass is a matrix-vector product of n_in·n_out weights."""
    est = LayerEstimate(node.name, node.op)
    a_type = ctx.type_of(node.inputs[0])
    out_shape = ctx.shape_of(node.output)
    acc_width = ctx.type_of(node.output).width
    weight = np.asarray(node.consts["weight"], dtype=np.int64)
    codes = aligned_codes(weight, node.consts["weight_frac"])
    n_out = weight.shape[0]
    # per output: (C_in / groups)·kh·kw products; a depthwise convolution (hls4ml's
    # DepthwiseConv2D) has one per channel per kernel tap, kh·kw·C in all
    n_in = int(np.prod(weight.shape[1:]))
    if node.op == "dense" and len(ctx.shape_of(node.inputs[0])) == 2:
        passes = out_shape[0]  # tokens: hls4ml's pointwise Conv1D, one pass per token
    elif node.op == "conv2d":
        out_pixels = int(np.prod(out_shape[1:]))
        in_shape = ctx.shape_of(node.inputs[0])
        pad = node.attrs["padding"]
        padded_pixels = (in_shape[1] + 2 * pad[0]) * (in_shape[2] + 2 * pad[1])
        # io_parallel walks the output pixels; io_stream reads every (padded) input pixel
        passes = padded_pixels if ctx.stream else out_pixels
    else:
        passes = 1
    est.reuse = (_closest_valid_reuse(n_in, n_out, ctx.reuse) if ctx.strategy == "Resource"
                 else ctx.reuse)
    if is_binary_layer(ctx.graph, node):
        return _binary(ctx, node, est, n_in, n_out, passes)
    zeros = int((codes == 0).sum())
    est.products = n_in * n_out
    est.multipliers = max(math.ceil(est.products / est.reuse) - zeros // est.reuse, 0)
    est.activation_width = a_type.width
    est.weight_width = code_width(codes)
    w_signed = bool((codes < 0).any())
    kind, mean_terms = _choose_multiplier(codes, est,
                                          constants_in_fabric=ctx.strategy == "Latency")
    _multiplier_cost(ctx, est, kind, mean_terms, a_type, w_signed, acc_width)
    has_bias = "bias" in node.consts
    bias_width = 0
    if has_bias:
        bias_width = code_width(aligned_codes(node.consts["bias"], node.consts["bias_frac"]))
    # adder tree: (terms - 1) additions per output, plus the bias
    adds = max(est.products - zeros - n_out, 0) + (n_out if has_bias else 0)
    est.lut += math.ceil(adds / est.reuse) * acc_width
    est.ff += est.multipliers * acc_width  # one pipeline register per product
    _output_registers(ctx, est, node.output)
    est.weight_bits = est.products * est.weight_width + n_out * bias_width
    _weight_memory(ctx, est, n_in, n_out)
    depth = 1 + MULTIPLIER_STAGES[kind] + _adder_depth(n_in + has_bias)
    est.ii = passes * est.reuse
    est.latency_cycles = est.ii + depth
    return est


def _binary(ctx: _Context, node: Node, est: LayerEstimate, n_in: int, n_out: int,
            passes: int) -> LayerEstimate:
    """A binary layer (±1 inputs × ±1 weights): no multiplier and no DSP. In hls4ml's XNOR
    form each product is one XNOR of two bits (a LUT) and each output a popcount of its
    n_in matches, then 2·m − n; padded convolutions use 2-bit operands (a conditional
    negation per product) and an ordinary adder tree. Summing n terms of a bits in a
    tree of adders that widen by one bit per level costs about n·(a + 1) LUTs."""
    a_bits = ctx.width_of(node.inputs[0])
    acc_width = ctx.type_of(node.output).width
    est.products = n_in * n_out
    est.multipliers = math.ceil(est.products / est.reuse)
    est.activation_width = est.weight_width = a_bits
    est.multiplier_kind = "xnor"
    est.lut = est.multipliers * a_bits  # the XNORs (sign choices)
    est.lut += est.multipliers * (a_bits + 1)  # the popcount (adder) trees
    est.lut += math.ceil(n_out / est.reuse) * acc_width  # 2·m − n (+ bias) per output
    est.ff = est.multipliers * a_bits
    _output_registers(ctx, est, node.output)
    bias_width = 0
    if "bias" in node.consts:
        bias_width = code_width(aligned_codes(node.consts["bias"], node.consts["bias_frac"]))
    est.weight_bits = est.products * a_bits + n_out * bias_width
    _weight_memory(ctx, est, n_in, n_out)
    est.ii = passes * est.reuse
    est.latency_cycles = est.ii + 1 + MULTIPLIER_STAGES["xnor"] + _adder_depth(n_in)
    return est


def _elements_per_pass(ctx: _Context, tensor: str) -> tuple[int, int]:
    """(elements handled together, passes): io_stream handles one pixel per pass."""
    shape = ctx.shape_of(tensor)
    if ctx.stream and len(shape) > 1:
        return shape[0], int(np.prod(shape[1:]))
    return int(np.prod(shape)), 1


def _scale_shift(ctx: _Context, node: Node) -> LayerEstimate:
    """hls4ml BatchNormalization: one product and one addition per element."""
    est = LayerEstimate(node.name, node.op)
    a_type = ctx.type_of(node.inputs[0])
    out_width = ctx.type_of(node.output).width
    scale = aligned_codes(node.consts["scale"], node.consts["scale_frac"])
    shift = aligned_codes(node.consts["shift"], node.consts["shift_frac"])
    per_pass, passes = _elements_per_pass(ctx, node.inputs[0])
    channels = scale.size
    est.reuse = ctx.reuse
    est.products = per_pass
    # every element multiplies by its channel's scale: repeat the codes per element
    element_scales = np.repeat(scale, per_pass // channels)
    zeros = int((element_scales == 0).sum())
    est.multipliers = max(math.ceil(per_pass / est.reuse) - zeros // est.reuse, 0)
    est.activation_width = a_type.width
    est.weight_width = code_width(scale)
    # hls4ml keeps scales in registers under both strategies: they are constants
    kind, mean_terms = _choose_multiplier(element_scales, est, constants_in_fabric=True)
    _multiplier_cost(ctx, est, kind, mean_terms, a_type, bool((scale < 0).any()), out_width)
    est.lut += math.ceil(per_pass / est.reuse) * out_width  # the shift (bias) adder
    est.ff += est.multipliers * out_width
    _output_registers(ctx, est, node.output)
    est.weight_bits = channels * (est.weight_width + code_width(shift))
    est.ii = passes * est.reuse
    est.latency_cycles = est.ii + 1 + MULTIPLIER_STAGES[kind]
    return est


def _elementwise(lut_per_element: int, ctx: _Context, node: Node) -> LayerEstimate:
    est = LayerEstimate(node.name, node.op)
    per_pass, passes = _elements_per_pass(ctx, node.output)
    est.lut = per_pass * lut_per_element
    _output_registers(ctx, est, node.output)
    est.ii = passes
    est.latency_cycles = passes + 1
    return est


def _relu(ctx: _Context, node: Node) -> LayerEstimate:
    # a sign test gating every bit: about one LUT per output bit
    return _elementwise(ctx.type_of(node.output).width, ctx, node)


def _add(ctx: _Context, node: Node) -> LayerEstimate:
    # one carry-chain adder of the output width per element
    return _elementwise(ctx.type_of(node.output).width, ctx, node)


def _cast(ctx: _Context, node: Node) -> LayerEstimate:
    """Folded into the producer's result type by hls4ml: logic, no cycles of its own."""
    t = ctx.type_of(node.output)
    rounds = t.rounding != "TRN" and ctx.type_of(node.inputs[0]).fractional > t.fractional
    saturates = t.overflow != "WRAP"
    est = _elementwise(t.width * (int(rounds) + int(saturates)), ctx, node)
    est.ff = 0  # the producer's output register holds the cast value
    est.latency_cycles, est.ii = 0, 1
    return est


def _sign(ctx: _Context, node: Node) -> LayerEstimate:
    """The sign is the input's top bit (inverted in the binary type): wiring, no LUT."""
    return _elementwise(0, ctx, node)


def _reshape(ctx: _Context, node: Node) -> LayerEstimate:
    """Flatten/reshape is a renaming of wires."""
    return LayerEstimate(node.name, node.op)


def _concat(ctx: _Context, node: Node) -> LayerEstimate:
    """Concatenation joins wires (the inputs are already in the result type)."""
    est = LayerEstimate(node.name, node.op)
    _, passes = _elements_per_pass(ctx, node.output)
    est.ii = passes
    est.latency_cycles = passes + 1 if ctx.stream else 0
    return est


def window_sum_type(in_t: FixedType, window: int) -> FixedType:
    """The exact type of a sum of ``window`` values of type ``in_t`` (the exporter's
    ``accum_t`` of an average pool)."""
    return type_for_range(min(in_t.qmin, 0) * window, max(in_t.qmax, 0) * window,
                          in_t.fractional)


def _pool(ctx: _Context, node: Node) -> LayerEstimate:
    """Window reductions: comparators (max) or adders (average), then a constant reciprocal.

    Average pools whose reciprocal is an exact power of two are hls4ml's Pooling2D (the
    division is a shift); any other is qflow's FixedAvgPool: one reciprocal multiplier
    per output of a pass, the window sum times the reciprocal code."""
    est = LayerEstimate(node.name, node.op)
    in_shape = ctx.shape_of(node.inputs[0])
    in_t = ctx.type_of(node.inputs[0])
    window = (in_shape[1] * in_shape[2] if node.op == "global_avgpool2d"
              else int(np.prod(node.attrs["kernel"])))
    out_per_pass, _ = _elements_per_pass(ctx, node.output)
    width = ctx.type_of(node.output).width
    if "reciprocal" in node.consts:
        recip = np.asarray(node.consts["reciprocal"]).reshape(-1)
        sum_t = window_sum_type(in_t, window)
        est.lut = out_per_pass * (window - 1) * sum_t.width  # the window adders
        est.products = est.multipliers = out_per_pass
        est.reuse = 1
        est.activation_width = sum_t.width
        est.weight_width = code_width(recip)
        kind, terms = _choose_multiplier(recip, est, constants_in_fabric=True)
        _multiplier_cost(ctx, est, kind, terms, sum_t, False, width)
        exact_shift = int(recip[0]) * window == 2 ** int(node.attrs["reciprocal_frac"])
        if kind != "shift-add":
            est.ff += est.multipliers * width  # one pipeline register per product
        if ctx.stream and not exact_shift:
            # FixedAvgPool in io_stream: the last pool_height rows in registers, or one
            # running sum per channel for a whole-plane window
            rows = (0 if node.op == "global_avgpool2d" or window == in_shape[1] * in_shape[2]
                    else node.attrs["kernel"][0])
            est.ff += (rows * in_shape[2] * in_shape[0] * in_t.width if rows
                       else in_shape[0] * sum_t.width)
    else:
        est.lut = out_per_pass * (window - 1) * width  # the window comparators
    _output_registers(ctx, est, node.output)
    passes = int(np.prod(in_shape[1:])) if ctx.stream else 1
    est.ii = passes
    est.latency_cycles = passes + 1 + _adder_depth(window) + MULTIPLIER_STAGES[
        est.multiplier_kind]
    return est


def covered(size: int, kernel: int, stride: int, pad: int, out: int) -> np.ndarray:
    """How many input rows (or columns) each output row's window covers inside the image.

    >>> covered(8, 3, 2, 1, 4).tolist()
    [2, 3, 3, 3]
    """
    starts = np.arange(out) * stride - pad
    return np.minimum(starts + kernel, size) - np.maximum(starts, 0)


def _maxpool(ctx: _Context, node: Node) -> LayerEstimate:
    """Unpadded: hls4ml's Pooling2D (as any pool). Padded: qflow's FixedMaxPool, whose
    comparators see only the values a window covers inside the image; in io_stream it
    keeps the last pool_height rows in registers and writes the output rows that the
    bottom edge cuts after the last input pixel, one pixel per cycle."""
    est = _pool(ctx, node)
    ph, pw = node.attrs["padding"]
    if not (ph or pw):
        return est
    chans, height, width_in = ctx.shape_of(node.inputs[0])
    _, out_h, out_w = ctx.shape_of(node.output)
    (kh, kw), (sh, sw) = node.attrs["kernel"], node.attrs["stride"]
    width = ctx.type_of(node.output).width
    if ctx.stream:
        # one output pixel's comparators, sized for a whole window
        est.lut = chans * (kh * kw - 1) * width
        est.ff += kh * width_in * chans * ctx.type_of(node.inputs[0]).width
        last_rows = np.minimum(np.arange(out_h) * sh - ph + kh - 1, height - 1)
        tail = max(int((last_rows == height - 1).sum()) - 1, 0)
        est.ii = height * width_in + tail * out_w
        est.latency_cycles = est.ii + 1 + _adder_depth(kh * kw)
    else:
        values = np.outer(covered(height, kh, sh, ph, out_h), covered(width_in, kw, sw, pw, out_w))
        est.lut = chans * int((values - 1).sum()) * width
    return est


ESTIMATORS = {
    "dense": _weighted,
    "conv2d": _weighted,
    "scale_shift": _scale_shift,
    "relu": _relu,
    "add": _add,
    "cast": _cast,
    "reshape": _reshape,
    "maxpool2d": _maxpool,
    "avgpool2d": _pool,
    "global_avgpool2d": _pool,
    "concat": _concat,
    "sign": _sign,
}


# -- the whole graph ---------------------------------------------------------------------

def _fifo_tensors(graph: QGraph) -> set[str]:
    """Tensors that become an io_stream FIFO: layer outputs after their cast, not reshapes."""
    consumers = graph.consumers()
    keep = set()
    for node in graph.nodes:
        users = consumers.get(node.output, [])
        folded = users and all(u.op == "cast" for u in users)
        if node.op != "reshape" and not folded:
            keep.add(node.output)
    return keep


def _check(target: TargetSpec, io_type: str, reuse_factor: int, strategy: str) -> None:
    if target.kind != "fpga":
        raise QflowError(f"target {target.name!r} is not an FPGA: no resources to estimate")
    if io_type not in IO_TYPES:
        raise QflowError(f"io_type must be one of {', '.join(IO_TYPES)}, not {io_type!r}")
    if strategy not in STRATEGIES:
        raise QflowError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if not (isinstance(reuse_factor, int) and reuse_factor >= 1):
        raise QflowError(f"reuse_factor must be an integer >= 1, not {reuse_factor!r}")


def _totals(layers: list[LayerEstimate], io_type: str, clock_mhz: float) -> dict:
    totals = {key: sum(getattr(x, key) for x in layers) for key in RESOURCES}
    totals["weight_bits"] = sum(x.weight_bits for x in layers)
    totals["fifo_bits"] = sum(x.fifo_bits for x in layers)
    if io_type == "io_stream":
        # layers overlap in a dataflow pipeline: the slowest pixel loop sets the pace and
        # every other layer adds only its pipeline depth
        slowest = max(layers, key=lambda x: x.ii)
        cycles = slowest.latency_cycles + sum(max(x.latency_cycles - x.ii, 0) for x in layers
                                              if x is not slowest)
    else:
        cycles = sum(x.latency_cycles for x in layers)
    totals["latency_cycles"] = int(cycles)
    totals["latency_us"] = cycles / clock_mhz
    totals["ii"] = max((x.ii for x in layers), default=1)
    return totals


def _budget_warnings(totals: dict, budget: dict) -> list[str]:
    out = []
    for key in RESOURCES:
        used, have = totals[key], budget.get(key, 0)
        if used > have:
            out.append(f"{key}: estimated {used:,} exceeds the {have:,} available "
                       f"({100 * used / have:.0f}%)" if have else
                       f"{key}: estimated {used:,} but the target has none")
        elif have and used > UTILISATION_WARNING * have:
            out.append(f"{key}: estimated {used:,} of {have:,} ({100 * used / have:.0f}%, "
                       f"above {100 * UTILISATION_WARNING:.0f}%: routing may fail)")
    return out


def estimate_resources(graph: QGraph, target: TargetSpec, *, io_type: str, reuse_factor: int,
                       strategy: str) -> ResourceEstimate:
    """Estimate DSP, LUT, FF, BRAM36 and latency of ``graph`` built by hls4ml for ``target``.

    ``io_type`` is ``io_parallel`` or ``io_stream``, ``strategy`` ``Latency`` or
    ``Resource``; one reuse factor applies to every layer. The model and its assumptions
    are in ``docs/resources.md``.

    >>> import numpy as np
    >>> from qflow.graph.ir import Node, QGraph, TensorInfo
    >>> from qflow.numerics import FixedType
    >>> from qflow.targets import load_target
    >>> x_t = FixedType(signed=False, integer=0, fractional=8)
    >>> weight = np.array([[3, -5, 11, 13]] * 2, dtype=np.int64)  # 2 outputs x 4 inputs
    >>> node = Node("dense", "fc", ["x"], "y", consts={
    ...     "weight": weight, "weight_frac": np.array([4, 4], dtype=np.int64)})
    >>> graph = QGraph("x", "y", {"x": TensorInfo("x", (4,), x_t),
    ...     "y": TensorInfo("y", (2,), FixedType(signed=True, integer=6, fractional=12))}, [node])
    >>> est = estimate_resources(graph, load_target("ultra96"), io_type="io_parallel",
    ...                          reuse_factor=2, strategy="Latency")
    >>> fc = est.layers[0]
    >>> fc.products, fc.multipliers, fc.multiplier_kind, fc.dsp
    (8, 4, 'dsp', 4)
    >>> est.totals["dsp"], est.warnings
    (4, [])
    """
    _check(target, io_type, reuse_factor, strategy)
    ctx = _Context(graph, target, io_type, strategy, reuse_factor, dsp_primitive(target),
                   xnor_tensors(graph))
    fifo_tensors = _fifo_tensors(graph) if ctx.stream else set()
    layers, warnings = [], []
    from .estimate_transformer import ESTIMATORS as TRANSFORMER_ESTIMATORS
    from .estimate_transformer import qkr_note

    for node in graph.nodes:
        if node.op in TRANSFORMER_ESTIMATORS:
            est = TRANSFORMER_ESTIMATORS[node.op](ctx, node)
            if ctx.stream:
                warnings.append(f"{node.name}: {node.op} is exported in io_parallel only")
        else:
            est = ESTIMATORS[node.op](ctx, node)
        if node.op in ("dense", "conv2d") and strategy == "Latency" and not ctx.stream and (
                est.multipliers > UNROLL_LIMIT):
            warnings.append(f"{node.name}: {est.multipliers:,} products unrolled in one "
                            f"pipeline stage (Vivado HLS stops unrolling above {UNROLL_LIMIT:,}); "
                            "raise the reuse factor or use the Resource strategy")
        if node.output in fifo_tensors:
            _fifo(ctx, est, node.output)
        layers.append(est)
    budget = {key: int(target.resources.get(key, 0)) for key in (*RESOURCES, "uram")}
    totals = _totals(layers, io_type, target.clock_mhz)
    warnings = _budget_warnings(totals, budget) + warnings
    fixed = [x for x in layers if x.op not in FOLDED_OPS]
    unfolded = {key: sum(getattr(x, key) for x in fixed) for key in RESOURCES}
    over = [k for k in RESOURCES if unfolded[k] > budget.get(k, 0)]
    if over:
        ops = ", ".join(sorted({x.op for x in fixed if any(getattr(x, k) for k in over)}))
        need = ", ".join(f"{k.upper()} {unfolded[k]:,}" for k in over)
        warnings.append(f"the reuse factor folds only {', '.join(FOLDED_OPS)} layers; the "
                        f"others ({ops}) are fully parallel and alone need {need}: over "
                        "the budget at every reuse factor")
    settings = {"target": target.name, "part": target.part, "clock_mhz": target.clock_mhz,
                "io_type": io_type, "strategy": strategy, "reuse_factor": reuse_factor,
                "dsp_primitive": ctx.primitive}
    notes = [note for note in (qkr_note(graph),) if note]
    return ResourceEstimate(layers, totals, budget, warnings, settings, unfolded, notes)
