"""QONNX export: bit-exact against the emulator under qonnx's own executor.

qonnx's executor runs every node in its own ONNX Runtime session, but ``run_qonnx``
feeds each chunk as one batch, so the cost is per call rather than per sample. Sample
counts per zoo cell: the MLPs run 6000 test inputs + 2048 corner cases, the CNN 2000 +
1024 (about 2-4 s per CNN cell on a loaded 2-core machine).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("qonnx")
onnx = pytest.importorskip("onnx")

import zoo_fixtures as zoo  # noqa: E402

from qflow.errors import QflowError  # noqa: E402
from qflow.export.qonnx import export_qonnx, run_qonnx  # noqa: E402
from qflow.graph import infer  # noqa: E402
from qflow.graph.emulator import Emulator  # noqa: E402
from qflow.graph.ir import Node, QGraph, TensorInfo  # noqa: E402
from qflow.numerics import FixedType, Overflow, Rounding, requantize, to_codes  # noqa: E402
from qflow.numerics.corners import corner_inputs  # noqa: E402

#: model -> (test samples, corner samples) per cell
SAMPLES = {"digits-cnn": (2000, 1024)}
DEFAULT_SAMPLES = (6000, 2048)


def _mismatch(got: np.ndarray, ref: np.ndarray) -> tuple[int, int]:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64)).reshape(len(ref), -1)
    per_sample = diff.max(axis=1) if diff.size else np.zeros(len(ref))
    return int((per_sample > 0).sum()), int(per_sample.max(initial=0))


def _meta(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("model_name", zoo.TRANSFORMER_MODELS)
def test_transformer_models_are_refused_naming_a_node(model_name, tmp_path):
    _, graph = zoo.frozen(model_name, "8bit")
    with pytest.raises(QflowError) as info:
        export_qonnx(graph, tmp_path / "model.qonnx.onnx")
    assert "\n" not in str(info.value) and "node 'transpose' (op 'transpose')" in str(info.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("config_name", list(zoo.CONFIGS))
@pytest.mark.parametrize("model_name", [m for m in zoo.MODEL_NAMES
                                        if m not in zoo.TRANSFORMER_MODELS])
def test_zoo_bit_exact(model_name, config_name, tmp_path):
    _, graph = zoo.frozen(model_name, config_name)
    path = export_qonnx(graph, tmp_path / "model.qonnx.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    n_test, n_corner = SAMPLES.get(model_name, DEFAULT_SAMPLES)
    shape = tuple(graph.tensors[graph.input].shape)
    x = np.concatenate([zoo.test_inputs(model_name, n_test).astype(np.float64),
                        corner_inputs(graph.input_type, shape, n_corner)])
    assert len(x) >= 200
    ref = Emulator(graph).run(x)
    got = run_qonnx(path, x)
    bad, max_diff = _mismatch(got, ref)
    meta = _meta(path)
    assert bad == 0, (f"{model_name}/{config_name} ({meta['qflow.dtype']}): {bad} of {len(x)} "
                      f"samples differ, max {max_diff} LSB")
    assert meta["qflow.dtype"] in ("float32", "float64")
    for name, info in graph.tensors.items():
        assert FixedType.parse(meta[f"qflow.type.{name}"]) == info.type


def test_export_structure(tmp_path):
    _, graph = zoo.frozen("digits-cnn", "wrap_trn")
    path = export_qonnx(graph, tmp_path / "m.onnx")
    model = onnx.load(str(path))
    names = {n.name for n in model.graph.node}
    assert {n.name for n in graph.nodes} <= names
    quants = [n for n in model.graph.node if n.op_type == "Quant"]
    assert all(n.domain == "qonnx.custom_op.general" for n in quants)
    casts = [n for n in graph.nodes if n.op == "cast"]
    by_name = {n.name: n for n in quants}
    for node in casts:
        doc = by_name[node.name].doc_string
        assert graph.tensors[node.output].type.to_ap() in doc
    assert graph.input_type.to_ap() in by_name[graph.input].doc_string
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves nothing behind
    export_qonnx(graph, path)  # overwriting works
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


# -- the cast route on tiny hand-built graphs --------------------------------------------
def _cast_graph(tin: FixedType, tout: FixedType, features: int) -> QGraph:
    tensors = {"input": TensorInfo("input", (features,), tin),
               "c": TensorInfo("c", (features,), tout)}
    return QGraph("input", "c", tensors, [Node("cast", "c", ["input"], "c")]).validate()


TIN = FixedType(signed=True, integer=5, fractional=6)  # ap_fixed<12,6>: ±32, 1/64 steps
#: output types: right shifts by 4 (signed and unsigned), 1-bit types, a left shift
TOUTS = [(True, 1, 2), (False, 1, 2), (True, 0, 0), (False, 0, 1), (True, 0, 7)]
#: 24-bit inputs: t ± 1/2 is exact in float32 for a 16-bit shift, needs float64 for 24
WIDE_CASES = [(FixedType(signed=True, integer=3, fractional=20, overflow="SAT"), (True, 2, 4)),
              (FixedType(signed=True, integer=-1, fractional=24, overflow="SAT"), (False, 1, 0))]


def _codes_with_ties(t: FixedType, shift: int, rng) -> np.ndarray:
    """Extremes, exact ties and their neighbours for a right shift, random codes."""
    ties = rng.integers(t.qmin >> shift, t.qmax >> shift, 600) * 2**shift + 2 ** (shift - 1)
    codes = np.concatenate([[t.qmin, t.qmax, 0, 1, -1], ties, ties - 1, ties + 1,
                            rng.integers(t.qmin, t.qmax, 1000)])
    codes = np.clip(codes, t.qmin, t.qmax)
    return np.concatenate([codes, np.zeros((-len(codes)) % 64, np.int64)]).reshape(-1, 64)


@pytest.mark.parametrize("overflow", list(Overflow))
@pytest.mark.parametrize("rounding", list(Rounding))
def test_cast_node_every_mode(rounding, overflow, tmp_path):
    """A cast node against ``requantize``: every code of a 12-bit input (exact ties, values
    up to 16x beyond the output range), then 24-bit inputs (ties, extremes, random)."""
    rng = np.random.default_rng(2)
    all_codes = np.arange(TIN.qmin, TIN.qmax + 1, dtype=np.int64).reshape(64, 64)
    cases = [(TIN, all_codes, params) for params in TOUTS]
    cases += [(tin, _codes_with_ties(tin, tin.fractional - params[2], rng), params)
              for tin, params in WIDE_CASES]
    for tin, codes, (signed, integer, frac) in cases:
        tout = FixedType(signed=signed, integer=integer, fractional=frac, rounding=rounding,
                         overflow=overflow)
        graph = _cast_graph(tin, tout, 64)
        x = np.ldexp(codes.astype(np.float64), -tin.fractional)  # the input Quant: identity
        path = export_qonnx(graph, tmp_path / "cast.onnx")
        got = run_qonnx(path, x)
        expected = requantize(codes, tin.fractional, tout)
        bad, max_diff = _mismatch(got, expected)
        assert bad == 0, f"{tin.to_ap()} -> {tout.to_ap()}: {bad} rows differ, max {max_diff}"
        np.testing.assert_array_equal(Emulator(graph).run(x), expected)


def _input_graph(t: FixedType, features: int) -> QGraph:
    return QGraph("input", "input", {"input": TensorInfo("input", (features,), t)},
                  []).validate()


def _awkward_reals(t: FixedType, rng) -> np.ndarray:
    """Exact ties, values a hair off ties, far out of range, tiny and huge, random."""
    lsb = t.lsb
    k = np.arange(t.qmin - 3, t.qmax + 4)
    if len(k) > 600:  # wide types: the edges and a random sample of codes
        k = np.concatenate([k[:100], k[-100:], rng.choice(k, 400)])
    k = k.astype(np.float64)
    eps = [0.0, 2.0**-60, -(2.0**-60), 2.0**-30, -(2.0**-30)]
    ties = np.concatenate([(k + 0.5 + e) * lsb for e in eps] + [k * lsb])
    specials = np.array([0.0, -0.0, 5e-324, -5e-324, 1e-300, -1e-300, (0.5 - 2.0**-54) * lsb,
                         -(0.5 - 2.0**-54) * lsb, (0.5 + 2.0**-53) * lsb, 1e6, -1e6, 1e300,
                         -1e300, 2.0**40 * lsb + 0.5 * lsb, -(2.0**40) * lsb - 0.5 * lsb])
    span = (t.qmax - t.qmin + 1) * lsb
    noise = rng.uniform(t.min_value - 64 * span, t.max_value + 64 * span, 2000)
    values = np.concatenate([ties, specials, noise])
    pad = (-len(values)) % 16
    return np.concatenate([values, np.zeros(pad)]).reshape(-1, 16)


@pytest.mark.parametrize("overflow", list(Overflow))
@pytest.mark.parametrize("rounding", list(Rounding))
def test_input_quant_every_mode(rounding, overflow, tmp_path):
    """The input Quant route on arbitrary float64 reals, against ``to_codes``."""
    rng = np.random.default_rng(1)
    for signed, integer, frac in [(True, 2, 3), (False, 1, 4), (True, 0, 0), (True, 7, 12)]:
        t = FixedType(signed=signed, integer=integer, fractional=frac, rounding=rounding,
                      overflow=overflow)
        x = _awkward_reals(t, rng)
        path = export_qonnx(_input_graph(t, 16), tmp_path / "in.onnx")
        got = run_qonnx(path, x)
        bad, max_diff = _mismatch(got, to_codes(x, t))
        assert bad == 0, f"{t.to_ap()}: {bad} rows differ, max {max_diff} LSB"


# -- convolution splitting, pooling variants --------------------------------------------
def _wide_conv_graph(rng) -> QGraph:
    tin = FixedType(signed=True, integer=3, fractional=10, rounding="RND_CONV",
                    overflow="SAT")  # 14 bits
    w = rng.integers(-(2**15), 2**15, (3, 4, 3, 3))
    consts = {"weight": w.astype(np.int64), "weight_frac": np.array([10, 12, 11]),
              "bias": rng.integers(-(2**20), 2**20, 3).astype(np.int64),
              "bias_frac": np.array([14, 20, 9])}
    attrs = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
    node = Node("conv2d", "conv", ["input"], "conv", attrs, consts)
    tensors = {"input": TensorInfo("input", (4, 6, 6), tin),
               "conv": TensorInfo("conv", (3, 6, 6), infer.infer_weighted(node, tin))}
    return QGraph("input", "conv", tensors, [node]).validate()


def test_wide_conv_is_split_exactly(tmp_path):
    rng = np.random.default_rng(0)
    graph = _wide_conv_graph(rng)
    path = export_qonnx(graph, tmp_path / "conv.onnx")
    model = onnx.load(str(path))
    assert _meta(path)["qflow.dtype"] == "float64"
    assert sum(n.op_type == "Conv" for n in model.graph.node) > 1
    t = graph.input_type
    x = np.concatenate([rng.uniform(t.min_value * 1.1, t.max_value * 1.1, (300, 4, 6, 6)),
                        corner_inputs(t, (4, 6, 6), 256)])
    bad, max_diff = _mismatch(run_qonnx(path, x), Emulator(graph).run(x))
    assert bad == 0, f"{bad} samples differ, max {max_diff} LSB"


def _pool_graph(rng) -> QGraph:
    """conv (groups, dilation) -> maxpool (padding) -> add -> avgpool k3/s1 (slices) ->
    avgpool k2/s2 (crop + ReduceSum) -> scale_shift -> relu -> reshape -> dense -> cast."""
    ts: dict[str, TensorInfo] = {}
    nodes: list[Node] = []

    def add(op, name, inputs, shape, out_type, attrs=None, consts=None):
        ts[name] = TensorInfo(name, shape, out_type)
        nodes.append(Node(op, name, inputs, name, attrs or {}, consts or {}))

    tin = FixedType(signed=True, integer=1, fractional=6, rounding="RND", overflow="SAT_ZERO")
    ts["input"] = TensorInfo("input", (4, 9, 9), tin)
    conv = Node("conv2d", "conv", ["input"], "conv",
                {"stride": [1, 1], "padding": [2, 2], "dilation": [2, 2], "groups": 2},
                {"weight": rng.integers(-128, 128, (4, 2, 3, 3)).astype(np.int64),
                 "weight_frac": np.array([7, 8, 7, 9])})
    add("conv2d", "conv", ["input"], (4, 9, 9), infer.infer_weighted(conv, tin),
        conv.attrs, conv.consts)
    add("maxpool2d", "mp", ["conv"], (4, 5, 5), ts["conv"].type,
        {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1],
         "ceil_mode": False})
    add("add", "sum", ["mp", "mp"], (4, 5, 5), infer.infer_add(ts["mp"].type, ts["mp"].type))
    recip9, recip4 = round(2**18 / 9), 2**16
    add("avgpool2d", "ap1", ["sum"], (4, 3, 3), infer.infer_pool_sum(ts["sum"].type, 9,
                                                                     recip9, 18),
        {"kernel": [3, 3], "stride": [1, 1], "reciprocal_frac": 18},
        {"reciprocal": np.array(recip9, dtype=np.int64)})
    add("cast", "ap1_cast", ["ap1"], (4, 3, 3),
        FixedType(signed=True, integer=5, fractional=6, rounding="TRN_ZERO", overflow="SAT"))
    add("avgpool2d", "ap2", ["ap1_cast"], (4, 1, 1),
        infer.infer_pool_sum(ts["ap1_cast"].type, 4, recip4, 18),
        {"kernel": [2, 2], "stride": [2, 2], "reciprocal_frac": 18},
        {"reciprocal": np.array(recip4, dtype=np.int64)})
    ss = Node("scale_shift", "bn", ["ap2"], "bn", {},
              {"scale": rng.integers(-500, 500, 4).astype(np.int64),
               "scale_frac": np.array([8, 9, 8, 7]),
               "shift": rng.integers(-5000, 5000, 4).astype(np.int64),
               "shift_frac": np.array([12, 12, 13, 12])})
    add("scale_shift", "bn", ["ap2"], (4, 1, 1), infer.infer_scale_shift(ss, ts["ap2"].type),
        consts=ss.consts)
    add("cast", "bn_cast", ["bn"], (4, 1, 1),
        FixedType(signed=True, integer=3, fractional=8, rounding="RND_MIN_INF",
                  overflow="SAT_SYM"))
    add("relu", "relu", ["bn_cast"], (4, 1, 1), infer.infer_relu(ts["bn_cast"].type))
    add("reshape", "flat", ["relu"], (4,), ts["relu"].type, {"shape": [4]})
    fc = Node("dense", "fc", ["flat"], "fc", {},
              {"weight": rng.integers(-128, 128, (3, 4)).astype(np.int64),
               "weight_frac": np.array([7, 7, 7]),
               "bias": rng.integers(-1000, 1000, 3).astype(np.int64),
               "bias_frac": np.array([10, 10, 10])})
    add("dense", "fc", ["flat"], (3,), infer.infer_weighted(fc, ts["flat"].type),
        consts=fc.consts)
    add("cast", "out", ["fc"], (3,),
        FixedType(signed=True, integer=2, fractional=4, rounding="RND_INF", overflow="WRAP"))
    return QGraph("input", "out", ts, nodes).validate()


def test_pooling_and_conv_variants(tmp_path):
    rng = np.random.default_rng(3)
    graph = _pool_graph(rng)
    path = export_qonnx(graph, tmp_path / "pool.onnx")
    t = graph.input_type
    x = np.concatenate([rng.uniform(t.min_value * 1.2, t.max_value * 1.2, (400, 4, 9, 9)),
                        corner_inputs(t, (4, 9, 9), 256)])
    emulator = Emulator(graph)
    bad, max_diff = _mismatch(run_qonnx(path, x), emulator.run(x))
    assert bad == 0, f"{bad} samples differ, max {max_diff} LSB"
    assert len(np.unique(emulator.run(x))) > 8  # the test is not vacuous


# -- refusals and bad input --------------------------------------------------------------
def test_too_wide_cast_is_refused(tmp_path):
    tin = FixedType(signed=True, integer=3, fractional=4)
    tout = FixedType(signed=True, integer=10, fractional=20, rounding="RND", overflow="SAT")
    with pytest.raises(QflowError) as info:
        export_qonnx(_cast_graph(tin, tout, 4), tmp_path / "wide.onnx")
    message = str(info.value)
    assert "'c'" in message and "cast" in message and "\n" not in message
    assert not list(tmp_path.iterdir())


def test_conv_on_wide_input_is_refused(tmp_path):
    tin = FixedType(signed=True, integer=7, fractional=8, rounding="RND_CONV", overflow="SAT")
    bn = Node("scale_shift", "bn", ["input"], "bn", {},
              {"scale": np.array([4095]), "scale_frac": np.array([12]),
               "shift": np.array([1]), "shift_frac": np.array([20])})
    wide = infer.infer_scale_shift(bn, tin)
    assert wide.width > 24
    conv = Node("conv2d", "conv", ["bn"], "conv",
                {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1},
                {"weight": np.ones((1, 1, 1, 1), dtype=np.int64),
                 "weight_frac": np.array([0])})
    tensors = {"input": TensorInfo("input", (1, 2, 2), tin),
               "bn": TensorInfo("bn", (1, 2, 2), wide),
               "conv": TensorInfo("conv", (1, 2, 2), infer.infer_weighted(conv, wide))}
    graph = QGraph("input", "conv", tensors, [bn, conv]).validate()
    with pytest.raises(QflowError, match=r"node 'conv' \(op 'conv2d'\)"):
        export_qonnx(graph, tmp_path / "conv.onnx")


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    _, graph = zoo.frozen("jet-mlp", "8bit")
    path = tmp_path_factory.mktemp("qonnx") / "jet.onnx"
    return graph, export_qonnx(graph, path)


def test_truncated_file_is_refused(small_export, tmp_path):
    _, path = small_export
    data = path.read_bytes()
    x = np.zeros((2, 16))
    for size in (0, 10, len(data) // 2, len(data) - 7):
        bad = tmp_path / f"cut{size}.onnx"
        bad.write_bytes(data[:size])
        with pytest.raises(QflowError, match=str(bad.name)):
            run_qonnx(bad, x)
    with pytest.raises(QflowError, match="not found"):
        run_qonnx(tmp_path / "missing.onnx", x)


def test_wrong_input_is_refused(small_export):
    _, path = small_export
    with pytest.raises(QflowError, match=path.name):
        run_qonnx(path, np.zeros((3, 15)))
    with pytest.raises(QflowError, match=path.name):
        run_qonnx(path, np.full((1, 16), math.nan))
    assert run_qonnx(path, np.zeros((0, 16))).shape == (0, 5)


def test_chunks_and_float32_input(small_export, monkeypatch):
    graph, path = small_export
    import qflow.export.qonnx as module

    monkeypatch.setattr(module, "CHUNK", 70)
    x = zoo.test_inputs("jet-mlp", 250)  # float32, like real data: converted exactly
    np.testing.assert_array_equal(run_qonnx(path, x), Emulator(graph).run(x))
