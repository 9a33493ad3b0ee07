"""Resource and latency estimates of hls4ml projects (qflow.export.hls.estimate): the
formulas on hand-made graphs, and the K-hot saving on the zoo's digits-cnn."""

import json
import math

import numpy as np
import pytest
from zoo_fixtures import frozen

from qflow.errors import QflowError
from qflow.export.hls.estimate import (
    BRAM36_BITS,
    MULTIPLIER_STAGES,
    bram36_for,
    csd_terms,
    estimate_resources,
)
from qflow.graph.infer import infer_weighted
from qflow.graph.ir import Node, QGraph, TensorInfo
from qflow.numerics import FixedType
from qflow.targets import load_target

ULTRA96 = load_target("ultra96")
PYNQ = load_target("pynq-z2")
U8 = FixedType(signed=False, integer=0, fractional=8)


def dense_graph(weight, in_type=U8, weight_frac=4, out_type=None) -> QGraph:
    """x -> dense -> y, the output type exact as freeze would infer it (unless given)."""
    weight = np.asarray(weight, dtype=np.int64)
    node = Node("dense", "fc", ["x"], "y", consts={
        "weight": weight, "weight_frac": np.full(weight.shape[0], weight_frac, dtype=np.int64)})
    out_type = out_type or infer_weighted(node, in_type)
    tensors = {"x": TensorInfo("x", (weight.shape[1],), in_type),
               "y": TensorInfo("y", (weight.shape[0],), out_type)}
    return QGraph("x", "y", tensors, [node]).validate()


def estimate(graph, target=ULTRA96, io_type="io_parallel", reuse=1, strategy="Latency"):
    return estimate_resources(graph, target, io_type=io_type, reuse_factor=reuse,
                              strategy=strategy)


# 2 outputs x 4 inputs; one zero; 11 = 16 - 4 - 1 needs three signed powers of two
TINY = [[3, -5, 7, 9], [11, 13, 0, -15]]


def test_tiny_dense_from_first_principles():
    graph = dense_graph(TINY)
    acc = graph.tensors["y"].type.width
    fc = estimate(graph).layers[0]
    n_in, n_out, zeros = 4, 2, 1
    # weights span [-15, 13]: 4 magnitude bits + sign; input ufixed<8,0>: 8 bits
    assert (fc.activation_width, fc.weight_width) == (8, 5)
    assert fc.products == n_in * n_out
    assert fc.multipliers == n_in * n_out - zeros  # reuse 1: one multiplier per nonzero weight
    # 8-bit unsigned (9 signed) x 5-bit signed fits one 27x18 DSP48E2 each
    assert fc.multiplier_kind == "dsp" and fc.dsp == fc.multipliers
    # adder tree: (nonzero products - outputs) additions of the accumulator width
    assert fc.lut == (n_in * n_out - zeros - n_out) * acc
    # a pipeline register per product plus the partitioned output array
    assert fc.ff == fc.multipliers * acc + n_out * acc
    assert fc.weight_bits == n_in * n_out * 5
    assert fc.bram36 == 0  # Latency strategy: constants in the fabric
    # input register + DSP stages + ceil(log2(4) adder levels / 2 per cycle), II = reuse = 1
    assert fc.ii == 1
    assert fc.latency_cycles == 1 + 1 + MULTIPLIER_STAGES["dsp"] + math.ceil(2 / 2)


def test_multipliers_follow_reuse():
    rng = np.random.default_rng(0)
    weight = rng.integers(40, 100, size=(16, 24)) * rng.choice([-1, 1], size=(16, 24))
    graph = dense_graph(weight)
    products = 16 * 24
    for reuse in (1, 2, 3, 4, 8, 16, 384):
        fc = estimate(graph, reuse=reuse).layers[0]
        assert fc.multipliers == math.ceil(products / reuse), reuse
        assert fc.dsp == fc.multipliers
        assert fc.ii == reuse
    # hls4ml's multiplier limit drops the zero weights, reuse by reuse
    assert estimate(dense_graph(TINY), reuse=2).layers[0].multipliers == math.ceil(8 / 2) - 1 // 2


def test_resource_strategy_puts_weights_in_bram():
    fc = estimate(dense_graph(TINY), reuse=4, strategy="Resource").layers[0]
    # R = 4 words of 8 / 4 = 2 weights of 5 bits: one block
    assert fc.reuse == 4 and fc.bram36 == 1
    assert bram36_for(1024, 36) == 1 and bram36_for(1025, 36) == 2
    assert bram36_for(4096, 72) == 8 == math.ceil(4096 * 72 / BRAM36_BITS)


def test_khot_weights_are_shift_add_under_latency_only():
    weight = [[3, -6, 12, 0], [1, 96, -34, 5]]  # every weight ±2^a ± 2^b
    assert csd_terms(weight).max() == 2
    graph = dense_graph(weight, weight_frac=7)
    latency = estimate(graph).layers[0]
    assert latency.multiplier_kind == "shift-add" and latency.dsp == 0
    # weights read from memory are unknown to the synthesis tool: real multipliers
    resource = estimate(graph, reuse=2, strategy="Resource").layers[0]
    assert resource.multiplier_kind == "dsp" and resource.dsp > 0


@pytest.mark.parametrize("strategy", ["Latency", "Resource"])
def test_binary_weights_need_no_dsp(strategy):
    rng = np.random.default_rng(1)
    weight = rng.choice([-1, 1], size=(32, 64))
    graph = dense_graph(weight, in_type=FixedType(signed=True, integer=4, fractional=12),
                        weight_frac=0)
    fc = estimate(graph, strategy=strategy, reuse=4).layers[0]
    assert fc.multiplier_kind == "shift-add" and fc.dsp == 0
    assert fc.weight_width == 2


def test_narrow_products_go_to_luts():
    weight = [[3, -5, 7, -7], [5, 6, -3, 1]]  # 4-bit signed weights: under the threshold
    graph = dense_graph(weight, in_type=FixedType(signed=False, integer=0, fractional=16))
    fc = estimate(graph, strategy="Resource", reuse=1).layers[0]
    assert fc.multiplier_kind == "lut" and fc.dsp == 0
    assert fc.lut >= fc.multipliers * 16 * 4


def test_over_budget_warning_on_pynq():
    rng = np.random.default_rng(2)
    weight = rng.integers(-127, 128, size=(256, 1024))
    weight[weight == 0] = 1
    wide = FixedType(signed=True, integer=24, fractional=16)
    graph = dense_graph(weight, in_type=FixedType(signed=True, integer=4, fractional=12),
                        out_type=wide)
    est = estimate(graph, target=PYNQ)
    assert est.settings["dsp_primitive"] == "DSP48E1"
    assert est.totals["dsp"] == 256 * 1024 > est.budget["dsp"] == 220
    assert any(w.startswith("dsp:") and "exceeds" in w for w in est.warnings)
    assert any("unrolled" in w for w in est.warnings)  # 262,144 products in one stage
    util = est.utilisation()
    assert not est.fits() and est.to_json()["fits"] is False
    assert est.verdict().startswith("does NOT fit pynq-z2: DSP ")
    assert f"DSP {100 * util['dsp']:.0f}%" in est.verdict()


def test_a_small_design_fits_and_says_by_what_margin():
    graph = dense_graph([[3, -5, 7, -7], [5, 6, -3, 1]])
    est = estimate(graph)
    util = est.utilisation()
    largest = max(util, key=util.get)
    assert est.fits() and est.to_json()["fits"] is True
    assert est.verdict() == (f"fits {est.settings['target']}: the largest share is "
                             f"{largest.upper()} at {100 * util[largest]:.0f}% of the board")


def test_to_json_round_trips_and_table_renders():
    import io

    from rich.console import Console

    est = estimate(dense_graph(TINY), io_type="io_stream")
    data = est.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["totals"]["dsp"] == 7 and data["budget"]["dsp"] == 360
    assert data["layers"][0]["node"] == "fc"
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(est.table())
    text = console.export_text()
    assert "total" in text and "budget" in text and "%" in text


def test_bad_settings_are_refused():
    graph = dense_graph(TINY)
    with pytest.raises(QflowError, match="io_type"):
        estimate(graph, io_type="io_serial")
    with pytest.raises(QflowError, match="strategy"):
        estimate(graph, strategy="Fast")
    with pytest.raises(QflowError, match="reuse_factor"):
        estimate(graph, reuse=0)
    with pytest.raises(QflowError, match="not an FPGA"):
        estimate(graph, target=load_target("cpu"))


WEIGHT_OPS = ("dense", "conv2d")


def _dsp(est, ops=None) -> int:
    return sum(x.dsp for x in est.layers if ops is None or x.op in ops)


def test_khot_digits_cnn_saves_dsps():
    """K-hot (K=2) digits-cnn against the 8-bit model on ultra96, Latency strategy, reuse 1."""
    _, ordinary = frozen("digits-cnn", "8bit")
    _, khot = frozen("digits-cnn", "khot2")
    for io_type in ("io_parallel", "io_stream"):
        base, new = estimate(ordinary, io_type=io_type), estimate(khot, io_type=io_type)
        print(f"digits-cnn {io_type}: DSP 8-bit {_dsp(base)}, K-hot {_dsp(new)} "
              f"(conv/dense: {_dsp(base, WEIGHT_OPS)} -> {_dsp(new, WEIGHT_OPS)})")
        # every conv/dense product of the K-hot model is shifts and adds
        assert _dsp(new, WEIGHT_OPS) == 0 < _dsp(base, WEIGHT_OPS)
        assert all(x.multiplier_kind == "shift-add" for x in new.layers if x.op in WEIGHT_OPS)
    # io_stream: BatchNorm handles one pixel at a time, the conv products dominate
    base, new = estimate(ordinary, io_type="io_stream"), estimate(khot, io_type="io_stream")
    assert _dsp(new) <= 0.2 * _dsp(base)


def pool_graph(op: str, count_hw: tuple[int, int], channels: int = 4, kernel=None,
               stride=None) -> QGraph:
    """x (C, H, W) ufixed<8,0> -> average pool -> y, the reciprocal as freeze rounds it."""
    from qflow.graph.infer import infer_pool_sum
    from qflow.nn.elementwise import RECIPROCAL_TYPE
    from qflow.numerics import cast

    h, w = count_hw
    window = h * w if kernel is None else kernel[0] * kernel[1]
    recip = int(np.ldexp(float(cast(1.0 / window, RECIPROCAL_TYPE)[()]), 18))
    attrs = {"reciprocal_frac": 18}
    out_shape = (channels, 1, 1)
    if op == "avgpool2d":
        attrs |= {"kernel": list(kernel), "stride": list(stride)}
        out_shape = (channels, (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1)
    node = Node(op, "pool", ["x"], "y", attrs, {"reciprocal": np.array(recip, np.int64)})
    tensors = {"x": TensorInfo("x", (channels, h, w), U8),
               "y": TensorInfo("y", out_shape, infer_pool_sum(U8, window, recip, 18))}
    return QGraph("x", "y", tensors, [node]).validate()


def test_average_pool_reciprocal_multipliers():
    """A global average over 6×6 (1/36 is not a power of two: qflow's FixedAvgPool) gets
    one reciprocal multiplier per output of a pass; over 4×4 the reciprocal is a shift."""
    graph = pool_graph("global_avgpool2d", (6, 6))
    recip = int(graph.nodes[0].consts["reciprocal"])
    assert recip == 7282  # round(2^18 / 36), 13 bits
    par = estimate(graph).layers[0]
    # the window sum of 36 values up to 255/256: 255 · 36 = 9180 needs 14 bits
    assert (par.activation_width, par.weight_width) == (14, 13)
    assert par.products == par.multipliers == 4  # io_parallel: every output at once
    assert par.multiplier_kind == "dsp" and par.dsp == 4  # 15 × 14 signed bits: one DSP48E2
    assert par.ii == 1
    assert par.latency_cycles == 1 + 1 + math.ceil(6 / 2) + MULTIPLIER_STAGES["dsp"]
    stream = estimate(graph, io_type="io_stream").layers[0]
    assert stream.multipliers == 4 and stream.dsp == 4  # one pixel (4 channels) per step
    assert stream.ii == 36
    assert stream.latency_cycles == 36 + 1 + math.ceil(6 / 2) + MULTIPLIER_STAGES["dsp"]
    assert stream.ff >= 4 * 14  # the four running sums
    # 3×3 windows at stride 1 on 6×6: 4 · 4 · 4 outputs in io_parallel, 4 per pixel in
    # io_stream, which keeps the last 3 rows (3 · 6 · 4 values of 8 bits) in registers
    win = pool_graph("avgpool2d", (6, 6), kernel=(3, 3), stride=(1, 1))
    par, stream = (estimate(win, io_type=io).layers[0] for io in ("io_parallel", "io_stream"))
    assert (par.multipliers, par.dsp, stream.multipliers, stream.dsp) == (64, 64, 4, 4)
    assert stream.ff >= 3 * 6 * 4 * 8
    # a power-of-two window: hls4ml's Pooling2D, the reciprocal a shift, no DSP
    shift = estimate(pool_graph("global_avgpool2d", (4, 4))).layers[0]
    assert shift.multiplier_kind == "shift-add" and shift.dsp == 0 and shift.lut == 4 * 15 * 12
