"""The emulator's float32 arithmetic: taken only when the graph's exact types and constants
prove every value it forms is an integer below 2**24 in magnitude, and then equal to the
int64 arithmetic bit for bit (every tensor, the chunked fast path, the float32 input cast)."""

import numpy as np
import pytest
from zoo_fixtures import CONFIGS, MODEL_NAMES, frozen, test_inputs

from qflow.graph import Emulator, Node, QGraph, QGraphError, TensorInfo
from qflow.graph.emulator import FLOAT_FORMATS
from qflow.graph.infer import aligned_bias, float_bounds, infer_weighted
from qflow.numerics import FixedType, to_codes
from qflow.numerics.corners import corner_inputs

FLOAT32 = FLOAT_FORMATS[0]
CELLS = [(m, c) for m in MODEL_NAMES for c in CONFIGS]
U8 = FixedType(signed=False, integer=0, fractional=8, rounding="RND_CONV", overflow="SAT")


def _inputs(model_name, graph, count=3000):
    x = test_inputs(model_name, count - 256)
    corners = corner_inputs(graph.input_type, x.shape[1:], 256).astype(np.float32)
    return np.concatenate([x, corners])


@pytest.mark.parametrize(("model_name", "config_name"), CELLS)
def test_float32_equals_int64_where_taken(model_name, config_name):
    _, graph = frozen(model_name, config_name)
    fits = float_bounds(graph).fits(FLOAT32)
    assert (Emulator(graph).arithmetic == "float32") == fits
    if not fits:
        with pytest.raises(QGraphError, match="float32 arithmetic is not exact"):
            Emulator(graph, "float32")
        return
    fast, exact = Emulator(graph, "float32"), Emulator(graph, "int64")
    x = _inputs(model_name, graph)
    assert len(x) > 2 * fast._chunk or fast._chunk > 1000  # several chunks where it matters
    codes = to_codes(x, graph.input_type)
    a, b = fast.run_codes(codes, keep=True), exact.run_codes(codes, keep=True)
    for name in b:
        assert np.array_equal(a[name], b[name]), f"tensor {name} differs"
    # the fast plan (folded casts, skipped ReLUs, in-place steps, chunks), float32 input
    expected = b[graph.output]
    assert np.array_equal(fast.run(x), expected)
    assert np.array_equal(fast.run(x.astype(np.float64)), expected)
    assert np.array_equal(fast.run_codes(codes), expected)


def test_zoo_choices():
    """The 8-bit MLP's 21-bit accumulators take float32; the 8-bit CNN's batch-norm
    products are wider than 24 bits and must not."""
    assert Emulator(frozen("digits-mlp", "8bit")[1]).arithmetic == "float32"
    _, cnn = frozen("digits-cnn", "8bit")
    assert max(t.type.width for t in cnn.tensors.values()) > 24
    assert Emulator(cnn).arithmetic == "float64"
    with pytest.raises(QGraphError, match="float32 arithmetic is not exact"):
        Emulator(cnn, "float32")


def _dense_graph(weight, out_type=None, bias=None) -> QGraph:
    """x (U8 codes, K) -> dense -> ReLU -> cast to U8 (the output)."""
    weight = np.asarray(weight, dtype=np.int64)
    consts = {"weight": weight, "weight_frac": np.zeros(len(weight), np.int64)}
    if bias is not None:
        consts |= {"bias": np.asarray(bias, np.int64), "bias_frac": np.zeros(len(weight),
                                                                          np.int64)}
    fc = Node("dense", "fc", ["x"], "fc", consts=consts)
    acc = out_type or infer_weighted(fc, U8)
    relu_t = FixedType(signed=False, integer=acc.int_width, fractional=acc.fractional)
    m = len(weight)
    tensors = {"x": TensorInfo("x", (weight.shape[1],), U8), "fc": TensorInfo("fc", (m,), acc),
               "relu": TensorInfo("relu", (m,), relu_t), "y": TensorInfo("y", (m,), U8)}
    nodes = [fc, Node("relu", "relu", ["fc"], "relu"), Node("cast", "y", ["relu"], "y")]
    return QGraph("x", "y", tensors, nodes)


def _reference_accumulator(graph, codes):
    """Exact integer dense product (numpy integer matmul: no BLAS, no floats)."""
    fc = graph.nodes[0]
    acc = codes @ fc.consts["weight"].T  # weight_frac 0: the products have 8 fraction bits
    if "bias" not in fc.consts:
        return acc
    frac = graph.tensors["fc"].type.fractional
    return acc + aligned_bias(fc.consts["bias"], fc.consts["bias_frac"], frac).astype(np.int64)


def _codes(k: int, n: int = 3000) -> np.ndarray:
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (n, k))
    codes[:4] = [[255] * k, [0] * k, [255, 0] * (k // 2), [0, 255] * (k // 2)]
    return codes


@pytest.mark.parametrize(("weight", "arithmetic"), [(257, "float32"), (258, "float64")])
def test_accumulator_width_decides(weight, arithmetic):
    """64 inputs of up to 255 times weights +-w: a signed 23-bit accumulator (w = 257,
    sums up to 2**22 - 64) takes float32; one more bit (w = 258) must not."""
    graph = _dense_graph(np.full((3, 64), weight) * [[1], [-1], [1]])
    assert graph.tensors["fc"].type.width == (23 if weight == 257 else 24)
    em = Emulator(graph)
    assert em.arithmetic == arithmetic
    codes = _codes(64)
    values = em.run_codes(codes, keep=True)
    assert np.abs(values["fc"]).max() == 64 * 255 * weight
    assert np.array_equal(values["fc"], _reference_accumulator(graph, codes))
    assert np.array_equal(em.run_codes(codes), Emulator(graph, "int64").run_codes(codes))
    if arithmetic != "float32":
        with pytest.raises(QGraphError, match="float32 arithmetic is not exact"):
            Emulator(graph, "float32")


def test_partial_sums_decide_not_declared_types():
    """A graph whose declared accumulator type is narrower than its products (a
    hand-edited file) is refused float32 from the constants themselves: the sums of
    64 * 255 * 70000 > 2**24 would round in float32."""
    narrow = FixedType(signed=True, integer=11, fractional=8)
    graph = _dense_graph(np.full((2, 64), 70_000) * [[1], [-1]], out_type=narrow)
    assert float_bounds(graph).peak > 2**30 and float_bounds(graph).width == 20
    assert Emulator(graph).arithmetic == "float64"
    codes = _codes(64)
    values = Emulator(graph).run_codes(codes, keep=True)
    assert np.array_equal(values["fc"], _reference_accumulator(graph, codes))


def test_bias_and_folded_cast():
    """Bias added to the product and the cast's scaling folded into the constants: equal
    to the exact integer reference, with ReLU, at every batch size around the chunk."""
    rng = np.random.default_rng(2)
    weight = rng.integers(-200, 200, (16, 64))
    graph = _dense_graph(weight, bias=rng.integers(-2**12, 2**12, 16))  # times 2**8
    em = Emulator(graph)
    assert em.arithmetic == "float32"
    codes = _codes(64, 2 * em._chunk + 7)
    acc = _reference_accumulator(graph, codes)
    acc_t, y_t = graph.tensors["fc"].type, graph.output_type
    expected = to_codes(np.ldexp(np.maximum(acc, 0).astype(np.float64), -acc_t.fractional), y_t)
    for n in (0, 1, 17, em._chunk - 1, em._chunk, em._chunk + 1, len(codes)):
        assert np.array_equal(em.run_codes(codes[:n]), expected[:n]), n


def test_float32_input_cast_edges():
    """Rounding ties, values beyond float32's range once scaled, subnormals and -0.0 cast
    in float32 as the float64 cast does; non-finite values are refused."""
    _, graph = frozen("digits-mlp", "8bit")
    fast, exact = Emulator(graph, "float32"), Emulator(graph, "int64")
    t = graph.input_type
    rng = np.random.default_rng(3)
    n, shape = 4096, graph.tensors[graph.input].shape
    ties = (rng.integers(t.qmin - 4, t.qmax + 4, (n, *shape)) + 0.5) * t.lsb
    special = np.array([3e38, -3e38, 1e-45, -1e-45, -0.0, t.max_value + t.lsb / 2,
                        t.min_value - t.lsb / 2, np.nextafter(np.float32(t.lsb / 2), 1)])
    edges = rng.choice(special, (n, *shape))
    x = np.concatenate([ties, edges]).astype(np.float32)
    kept = x.copy()
    assert np.array_equal(fast.run(x), exact.run(x))
    assert np.array_equal(x, kept), "the input was modified"
    half = ties.astype(np.float16)
    assert np.array_equal(fast.run(half), exact.run(half))
    assert np.array_equal(fast.run(np.ones((3, *shape), np.int32)),
                          exact.run(np.ones((3, *shape), np.int32)))
    for bad in (np.nan, np.inf, -np.inf):
        y = x[:5].copy()
        y[3, 0] = bad
        with pytest.raises(ValueError, match="non-finite"):
            fast.run(y)


def test_run_codes_leaves_input_alone():
    _, graph = frozen("digits-mlp", "8bit")
    codes = to_codes(test_inputs("digits-mlp", 100), graph.input_type)
    kept = codes.copy()
    for arithmetic in ("float32", "float64", "int64"):
        Emulator(graph, arithmetic).run_codes(codes)
        assert np.array_equal(codes, kept)
