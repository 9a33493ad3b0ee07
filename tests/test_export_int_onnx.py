"""Integer ONNX export: ONNX Runtime equals the QGraph emulator bit for bit, on every zoo
model and configuration and on hand-built graphs that take the wide routes; every
rounding x overflow mode of ``cast``; refusals and bad files raise QflowError."""

import collections

import numpy as np
import onnx
import pytest
from zoo_fixtures import CONFIGS, MODEL_NAMES, frozen
from zoo_fixtures import test_inputs as zoo_inputs

from qflow.errors import QflowError
from qflow.export.int_onnx import (
    exact_in,
    export_arithmetics,
    export_int_onnx,
    export_routes,
    run_int_onnx,
)
from qflow.export.int_onnx_ops import MAX_FAN_IN
from qflow.graph import infer
from qflow.graph.emulator import Emulator
from qflow.graph.ir import Node, QGraph, TensorInfo
from qflow.numerics import FixedType, Overflow, Rounding, requantize, to_codes
from qflow.numerics.corners import corner_inputs

CELLS = [(m, c) for m in MODEL_NAMES for c in CONFIGS]


def _op_counts(path) -> collections.Counter:
    model = onnx.load(path)
    assert {n.domain for n in model.graph.node} <= {""}, "non-default op domain"
    assert [o.domain for o in model.opset_import] == [""]
    return collections.Counter(n.op_type for n in model.graph.node)


def _mismatches(got: np.ndarray, want: np.ndarray) -> tuple[int, int]:
    assert got.shape == want.shape and got.dtype == np.int64
    diff = np.abs(got - want).reshape(len(got), -1)
    return int((diff != 0).any(axis=1).sum()), int(diff.max(initial=0))


def _check_exact(graph: QGraph, path, codes: np.ndarray, optimized: bool = False) -> None:
    got = run_int_onnx(path, codes, optimized=optimized)
    bad, max_diff = _mismatches(got, Emulator(graph).run_codes(codes))
    assert bad == 0, f"{bad} of {len(codes)} samples differ (max {max_diff} LSB)"


# -- the zoo ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arithmetic", ["auto", "int64"])
@pytest.mark.parametrize(("model_name", "config_name"), CELLS)
def test_zoo_model_equals_emulator(model_name, config_name, arithmetic, tmp_path):
    _, graph = frozen(model_name, config_name)
    path = export_int_onnx(graph, tmp_path / "model.int.onnx", arithmetic)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    counts = _op_counts(path)
    assert not {"Gemm", "Relu", "QuantizeLinear"} & set(counts)
    routes = export_routes(path)
    if arithmetic == "int64":
        assert export_arithmetics(path) == {"int64"}
        assert not {"Conv", "Floor", "Round"} & set(counts)
    else:  # every product the bounds allow in float32 takes the float kernels
        float_products = [n.name for n in graph.nodes if n.op in ("dense", "conv2d")
                          and exact_in(graph, n, "float32")]
        assert all("(float32, sums below" in routes[n] for n in float_products)
        assert counts["Conv"] + counts["MatMul"] >= len(float_products)
        assert all(routes[n.name].endswith("(int64)") or "Integer" in routes[n.name]
                   or "int64" in routes[n.name] for n in graph.nodes
                   if n.op in ("dense", "conv2d") and n.name not in float_products)
    x = zoo_inputs(model_name, 2000)
    x = np.concatenate([x, corner_inputs(graph.input_type, x.shape[1:], 256)])
    _check_exact(graph, path, to_codes(x, graph.input_type))
    # as ONNX Runtime runs the file by default: its fusions and blocked layouts
    _check_exact(graph, path, to_codes(x, graph.input_type), optimized=True)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_8bit_config_uses_integer_kernels(model_name, tmp_path):
    _, graph = frozen(model_name, "8bit")
    counts = _op_counts(export_int_onnx(graph, tmp_path / "m.onnx", "int64"))
    ops = collections.Counter(n.op for n in graph.nodes)
    # products of two activations (attention) are integer kernels too
    assert counts["MatMulInteger"] == ops["dense"] + ops["matmul"] > 0
    assert counts["ConvInteger"] == ops["conv2d"]
    assert counts["MatMul"] == 0


# -- hand-built graphs -------------------------------------------------------------------------
class _Maker:
    """Builds a QGraph node by node, with exact types from ``qflow.graph.infer``."""

    def __init__(self, input_type: FixedType, shape):
        self.tensors = {"x": TensorInfo("x", tuple(shape), input_type)}
        self.nodes, self.last = [], "x"

    def add(self, op, shape, out_type=None, inputs=None, attrs=None, **consts):
        name = f"{op}{len(self.nodes)}"
        inputs = inputs or [self.last]
        node = Node(op, name, inputs, name, attrs or {},
                    {k: np.asarray(v, dtype=np.int64) for k, v in consts.items()})
        if out_type is None:
            t = [self.tensors[i].type for i in inputs]
            out_type = {"dense": infer.infer_weighted, "conv2d": infer.infer_weighted,
                        "scale_shift": infer.infer_scale_shift}[op](node, t[0]) \
                if op in ("dense", "conv2d", "scale_shift") else \
                infer.infer_add(*t) if op == "add" else \
                infer.infer_relu(t[0]) if op == "relu" else t[0]
        self.tensors[name] = TensorInfo(name, tuple(shape), out_type)
        self.nodes.append(node)
        self.last = name
        return name

    def pool(self, op, shape, count, **attrs):
        recip = round(2**18 / count)
        t = infer.infer_pool_sum(self.tensors[self.last].type, count, recip, 18)
        return self.add(op, shape, t, attrs={**attrs, "reciprocal_frac": 18}, reciprocal=recip)

    def cast(self, t: FixedType):
        return self.add("cast", self.tensors[self.last].shape, t)

    def graph(self) -> QGraph:
        return QGraph("x", self.last, self.tensors, self.nodes).validate()


def _fx(spec: str) -> FixedType:
    return FixedType.parse(spec)


def _random_codes(t: FixedType, shape, count, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(t.qmin, t.qmax, (count, *shape), endpoint=True)
    codes[0], codes[1] = t.qmin, t.qmax
    codes[2:count // 4] = np.where(rng.random(codes[2:count // 4].shape) < 0.5, t.qmin, t.qmax)
    return codes


def _wide_conv_graph():
    rng = np.random.default_rng(1)
    m = _Maker(_fx("ap_fixed<12,5,AP_RND,AP_SAT>"), (4, 9, 7))
    m.add("conv2d", (6, 5, 9), attrs={"stride": [2, 1], "padding": [1, 2], "dilation": [1, 2],
                                      "groups": 2},
          weight=rng.integers(-700, 700, (6, 2, 3, 2)), weight_frac=[3, 4, 5, 6, 3, 4],
          bias=rng.integers(-5000, 5000, 6), bias_frac=[8] * 6)
    m.cast(_fx("ap_fixed<10,4,AP_RND_CONV,AP_SAT>"))
    m.add("maxpool2d", (6, 6, 5), attrs={"kernel": [2, 3], "stride": [1, 2], "padding": [1, 1],
                                         "dilation": [1, 1], "ceil_mode": False})
    m.add("relu", (6, 6, 5))
    m.cast(_fx("ap_ufixed<8,3,AP_RND_INF,AP_SAT>"))
    m.pool("avgpool2d", (6, 2, 3), 9, kernel=[3, 3], stride=[2, 1])  # overlapping windows
    m.cast(_fx("ap_ufixed<16,4,AP_RND_ZERO,AP_SAT_SYM>"))
    m.add("reshape", (36,), attrs={"shape": [36]})
    m.add("dense", (5,), weight=rng.integers(-3000, 3000, (5, 36)), weight_frac=[9, 10, 11, 9, 9],
          bias=rng.integers(-9, 9, 5), bias_frac=[2] * 5)
    return m.graph()


def _narrow_graph():
    rng = np.random.default_rng(2)
    m = _Maker(_fx("ap_fixed<8,2,AP_RND_CONV,AP_SAT>"), (2, 7, 7))
    m.add("conv2d", (2, 7, 7), attrs={"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
                                      "groups": 1},
          weight=rng.integers(0, 256, (2, 2, 3, 3)), weight_frac=[9, 8])  # uint8 weights
    m.add("scale_shift", (2, 7, 7), scale=[300, -200], scale_frac=[8, 9], shift=[77, -5],
          shift_frac=[6, 3])
    m.cast(_fx("ap_fixed<9,3,AP_RND_MIN_INF,AP_SAT_ZERO>"))
    m.add("add", (2, 7, 7), inputs=[m.last, "x"])
    m.cast(_fx("ap_ufixed<7,3,AP_TRN_ZERO,AP_WRAP>"))
    m.pool("avgpool2d", (2, 3, 3), 4, kernel=[2, 2], stride=[2, 2])  # tiles, crops a row
    m.cast(_fx("ap_fixed<8,3,AP_RND,AP_WRAP>"))
    m.pool("global_avgpool2d", (2, 1, 1), 9)
    m.cast(_fx("ap_fixed<8,2,AP_TRN,AP_SAT>"))
    m.add("reshape", (2,), attrs={"shape": [2]})
    m.add("dense", (3,), weight=rng.integers(-128, 128, (3, 2)), weight_frac=[7, 6, 5],
          bias=[1, -2, 3], bias_frac=[4, 4, 4])
    m.add("scale_shift", (3,), scale=[3, 5, -7], scale_frac=[1, 2, 0], shift=[1, 1, 1],
          shift_frac=[0, 0, 0])
    return m.graph()


def _unsigned_wide_conv_graph():
    rng = np.random.default_rng(3)
    m = _Maker(_fx("ap_ufixed<16,6,AP_TRN,AP_SAT>"), (3, 6, 6))
    m.add("conv2d", (4, 6, 6), attrs={"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
                                      "groups": 1},
          weight=rng.integers(-128, 128, (4, 3, 3, 3)), weight_frac=[7, 7, 7, 7])
    m.cast(_fx("ap_fixed<20,8,AP_RND_CONV,AP_WRAP>"))
    return m.graph()


def _fusion_graph():
    """Every case of ``int_onnx_fuse``: ReLUs its cast does (or not: two readers, a signed
    cast), cast scalings moved into a convolution, a BatchNorm, a pool and a dense layer
    under several roundings and overflows, power-of-two pools in float32."""
    rng = np.random.default_rng(4)
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
    m = _Maker(_fx("ap_fixed<8,3,AP_RND_CONV,AP_SAT>"), (2, 8, 8))
    m.add("conv2d", (4, 8, 8), attrs=conv, weight=rng.integers(-128, 128, (4, 2, 3, 3)),
          weight_frac=[7, 7, 6, 7], bias=rng.integers(-99, 99, 4), bias_frac=[9] * 4)
    m.add("relu", (4, 8, 8))
    first = m.cast(_fx("ap_ufixed<8,3,AP_RND_CONV,AP_SAT>"))  # ReLU skipped, conv scaled
    m.add("conv2d", (4, 8, 8), attrs=conv, weight=rng.integers(-128, 128, (4, 4, 3, 3)),
          weight_frac=[7] * 4)
    m.add("scale_shift", (4, 8, 8), scale=[300, -200, 511, 77], scale_frac=[8, 9, 9, 7],
          shift=[77, -5, 3, 0], shift_frac=[6, 3, 2, 2])
    m.cast(_fx("ap_fixed<8,3,AP_RND_MIN_INF,AP_SAT_SYM>"))  # BatchNorm scaled
    shared = m.add("relu", (4, 8, 8))
    m.cast(_fx("ap_ufixed<6,2,AP_TRN,AP_SAT>"))  # not skipped: the ReLU has two readers
    m.add("add", (4, 8, 8), inputs=[m.last, shared])
    m.add("relu", (4, 8, 8))
    m.cast(_fx("ap_fixed<7,3,AP_RND,AP_SAT>"))  # not skipped: a signed cast
    m.add("add", (4, 8, 8), inputs=[m.last, first])
    m.cast(_fx("ap_ufixed<8,4,AP_RND_ZERO,AP_SAT>"))
    m.pool("avgpool2d", (4, 4, 4), 4, kernel=[2, 2], stride=[2, 2])
    m.cast(_fx("ap_fixed<8,3,AP_RND_CONV,AP_WRAP>"))  # float32 pool, scaled
    m.pool("avgpool2d", (4, 2, 2), 4, kernel=[2, 2], stride=[2, 2])
    m.cast(_fx("ap_fixed<8,3,AP_TRN_ZERO,AP_SAT_ZERO>"))
    m.pool("global_avgpool2d", (4, 1, 1), 4)
    m.cast(_fx("ap_fixed<8,2,AP_RND_INF,AP_SAT>"))
    m.add("reshape", (4,), attrs={"shape": [4]})
    m.add("dense", (3,), weight=rng.integers(-128, 128, (3, 4)), weight_frac=[7, 6, 5],
          bias=[1, -2, 3], bias_frac=[4, 4, 4])
    m.cast(_fx("ap_fixed<8,4,AP_TRN,AP_SAT>"))  # dense scaled
    return m.graph()


@pytest.mark.parametrize("arithmetic", ["auto", "int64"])
@pytest.mark.parametrize("make", [_wide_conv_graph, _narrow_graph, _unsigned_wide_conv_graph,
                                  _fusion_graph])
def test_hand_built_graph_equals_emulator(make, arithmetic, tmp_path):
    graph = make()
    path = export_int_onnx(graph, tmp_path / "g.onnx", arithmetic)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    shape = graph.tensors["x"].shape
    for optimized in (False, True):
        _check_exact(graph, path, _random_codes(graph.input_type, shape, 3000), optimized)
        x = corner_inputs(graph.input_type, shape, 600)
        _check_exact(graph, path, to_codes(x, graph.input_type), optimized)


def test_fusions_take_the_planned_routes(tmp_path):
    graph = _fusion_graph()
    path = export_int_onnx(graph, tmp_path / "g.onnx")
    routes, counts = export_routes(path), _op_counts(path)
    skipped = [n for n, r in routes.items() if r.startswith("none: the cast after it")]
    assert skipped == ["relu1"]  # relu5 has two readers, relu9 a signed cast
    assert counts["Max"] == 2
    scaled = {n: r.rsplit(" for ", 1)[1] for n, r in routes.items() if ", times 2**" in r}
    assert scaled == {"conv2d0": "cast2", "scale_shift4": "cast5", "avgpool2d13": "cast14",
                      "avgpool2d15": "cast16", "global_avgpool2d17": "cast18",
                      "dense20": "cast21"}, routes
    assert all("(done by the node before)" in routes[c] for c in scaled.values())
    assert routes["avgpool2d13"].startswith("AveragePool(float32)")
    assert routes["global_avgpool2d17"].startswith("GlobalAveragePool(float32)")
    # the scaled tensors are not named as QGraph tensors: their values are not those codes
    produced = {o for n in onnx.load(path).graph.node for o in n.output}
    assert not set(scaled) & produced and "relu1" not in produced


def test_wide_operands_take_the_exact_wide_routes(tmp_path):
    graph = _wide_conv_graph()
    counts = _op_counts(export_int_onnx(graph, tmp_path / "g.onnx", "int64"))
    routes = export_routes(tmp_path / "g.onnx")
    assert counts["MatMulInteger"] == 0 and counts["MatMul"] == 1  # 12-bit weights: int64
    assert counts["ConvInteger"] == 4  # 12-bit input x 11-bit weights: 2 x 2 limbs
    assert routes["dense8"] == "MatMul(int64)" and "limbs 2" in routes["conv2d0"]
    assert "MaxPool" in counts and counts["AveragePool"] == 0


def test_large_fan_in_is_split_into_channel_chunks(tmp_path):
    rng = np.random.default_rng(4)
    channels = MAX_FAN_IN // 9 + 50
    m = _Maker(_fx("ap_ufixed<8,0>"), (channels, 3, 3))
    m.add("conv2d", (2, 1, 1), attrs={"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1],
                                      "groups": 1},
          weight=rng.integers(-128, 128, (2, channels, 3, 3)), weight_frac=[7, 7])
    m.add("reshape", (2,), attrs={"shape": [2]})
    m.add("dense", (1,), weight=rng.integers(-128, 128, (1, 2)), weight_frac=[7])
    graph = m.graph()
    path = export_int_onnx(graph, tmp_path / "g.onnx", "int64")
    assert _op_counts(path)["ConvInteger"] == 2
    _check_exact(graph, path, _random_codes(graph.input_type, (channels, 3, 3), 40))


# -- cast: every rounding x overflow mode vs numerics.requantize ------------------------------
#: (input type, output type without modes): right shifts of 1, 7, 16, 60 and 62 bits, a
#: 1-bit signed output, no shift, left shifts below and beyond the output width
CAST_CASES = [
    ("ap_fixed<10,5>", "ap_fixed<6,2>"),
    ("ap_fixed<20,10>", "ap_ufixed<6,3>"),
    ("ap_fixed<40,20>", "ap_fixed<8,4>"),
    ("ap_fixed<62,2>", "ap_fixed<1,1>"),
    ("ap_ufixed<62,0>", "ap_fixed<4,4>"),
    ("ap_fixed<30,10>", "ap_fixed<8,-12>"),
    ("ap_fixed<12,12>", "ap_fixed<9,3>"),
    ("ap_fixed<16,16>", "ap_fixed<4,-6>"),
    ("ap_ufixed<5,5>", "ap_ufixed<12,8>"),
]


def _cast_codes(src: FixedType, dst: FixedType, count=4000, seed=0) -> np.ndarray:
    """Random codes, exact ties, codes around the output range and far outside it."""
    rng = np.random.default_rng(seed)
    shift = src.fractional - dst.fractional
    parts = [np.array([src.qmin, src.qmax, 0, 1, -1]), rng.integers(src.qmin, src.qmax, count,
                                                                    endpoint=True)]
    if shift > 0:  # Python ints: k << shift may leave int64 before the clip below
        k = rng.integers(dst.qmin - 4, dst.qmax + 4, count, endpoint=True).astype(object)
        parts += [(k << shift) + (1 << (shift - 1)), (k << shift) + rng.integers(-2, 3, count)]
    else:
        parts.append(rng.integers(dst.qmin - 4, dst.qmax + 4, count, endpoint=True)
                     >> min(-shift, 62))
    codes = np.concatenate([p.astype(object) for p in parts])
    return np.clip(codes, src.qmin, src.qmax).astype(np.int64)


@pytest.mark.parametrize("arithmetic", ["auto", "int64"])
@pytest.mark.parametrize("overflow", list(Overflow))
@pytest.mark.parametrize("rounding", list(Rounding))
def test_cast_equals_requantize(rounding, overflow, arithmetic, tmp_path):
    """``auto`` casts in float32 (codes below 24 bits), float64 (below 53) or int64."""
    for i, (src_spec, dst_spec) in enumerate(CAST_CASES):
        src = _fx(src_spec)
        dst = _fx(dst_spec[:-1] + f",AP_{rounding.value},AP_{overflow.value}>")
        m = _Maker(src, (1,))
        m.cast(dst)
        graph = m.graph()
        path = export_int_onnx(graph, tmp_path / f"cast{i}.onnx", arithmetic)
        width = max(src.width, dst.width)
        held = ("int64" if arithmetic == "int64" or width >= 53
                else "float32" if width < 24 else "float64")
        assert export_routes(path)[graph.nodes[0].name].endswith(
            f"({held})" if held != "int64" else overflow.value), export_routes(path)
        codes = _cast_codes(src, dst, seed=i)
        got = run_int_onnx(path, codes[:, None])[:, 0]
        want = requantize(codes, src.fractional, dst)
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, (f"{src} -> {dst}: {bad.size} of {codes.size} codes differ, "
                               f"e.g. {codes[bad[0]]} -> {got[bad[0]]}, want {want[bad[0]]}")


# -- refusals and bad files ----------------------------------------------------------------------
def _one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, msg


def test_refuses_what_it_cannot_export_exactly(tmp_path):
    m = _Maker(_fx("ap_fixed<8,3>"), (1, 4, 4))
    m.add("maxpool2d", (1, 2, 2), attrs={"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0],
                                         "dilation": [1, 1], "ceil_mode": True})
    with pytest.raises(QflowError) as excinfo:
        export_int_onnx(m.graph(), tmp_path / "a.onnx")
    _one_line_error(excinfo, "'maxpool2d0'", "maxpool2d", "ceil_mode")

    m = _Maker(_fx("ap_fixed<60,3>"), (1, 4, 4))
    m.add("maxpool2d", (1, 2, 2), attrs={"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0],
                                         "dilation": [1, 1], "ceil_mode": False})
    with pytest.raises(QflowError) as excinfo:
        export_int_onnx(m.graph(), tmp_path / "b.onnx")
    _one_line_error(excinfo, "maxpool2d", "double")

    m = _Maker(_fx("ap_fixed<8,3>"), (4,))
    m.add("dense", (2,), _fx("ap_fixed<8,3>"), weight=np.full((2, 4), 100), weight_frac=[0, 0])
    with pytest.raises(QflowError) as excinfo:  # declared type narrower than the products
        export_int_onnx(m.graph(), tmp_path / "c.onnx")
    _one_line_error(excinfo, "'dense0'", "dense", "does not hold")
    assert not list(tmp_path.iterdir()), "a refused export left a file behind"


def test_bad_files_and_inputs_raise_qflow_error(tmp_path):
    _, graph = frozen("jet-mlp", "8bit")
    path = export_int_onnx(graph, tmp_path / "model.int.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["model.int.onnx"]  # no temporary left
    codes = to_codes(zoo_inputs("jet-mlp", 8), graph.input_type)
    data = path.read_bytes()
    for name, content in [("truncated.onnx", data[: len(data) // 2]),
                          ("cut.onnx", data[:-7]), ("garbage.onnx", b"\x08\x07garbage" * 9),
                          ("empty.onnx", b"")]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(QflowError) as excinfo:
            run_int_onnx(bad, codes)
        _one_line_error(excinfo, str(bad))
    with pytest.raises(QflowError) as excinfo:
        run_int_onnx(tmp_path / "missing.onnx", codes)
    _one_line_error(excinfo, "missing.onnx")
    for wrong in (codes[:, :-1], codes[:, :, None], codes[0], codes.astype(np.float64),
                  codes * 1000):
        with pytest.raises(QflowError) as excinfo:
            run_int_onnx(path, wrong)
        _one_line_error(excinfo, str(path))
    assert np.array_equal(run_int_onnx(path, codes), Emulator(graph).run_codes(codes))
