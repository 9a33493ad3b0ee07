"""Transformer ops as QGraph ops: ``softmax``, ``layernorm``, ``gelu``, ``matmul`` and the token
ops ``transpose``, ``slice``, ``add_const``, ``mean``, in the emulator (every arithmetic a
graph allows, against the numpy twins applied node by node) and in every exporter, each
0 mismatching samples: integer ONNX under ONNX Runtime (the attention blocks, single-op
graphs of random types, the extreme rows), TVM (cpu run through ``qflow verify``; arm64
and cuda compiled), hls4ml C simulation (three compiles: the extreme rows, the one-head
block through ``qflow verify`` on an Ultra96 export directory, the two-head block); the
refusals (QONNX, io_stream, shapes hls4ml cannot lay out, wrong declared types) and the
estimate rows."""

import collections
import json

import numpy as np
import onnx
import pytest
from binary_graphs import mismatches
from export_dirs import export_dir, verify_rows
from transformer_graphs import (
    ACT,
    PROBS,
    TMaker,
    attention_block,
    extreme_codes,
    ops_graph,
    sample_codes,
    two_head_block,
)

from qflow.errors import QflowError
from qflow.export import ExportOptions, export, export_onnx
from qflow.export.hls import HlsExportError
from qflow.export.hls.estimate import estimate_resources
from qflow.export.hls.onnx_graph import hls_graph
from qflow.export.int_onnx import export_int_onnx, export_routes, run_int_onnx
from qflow.export.qonnx import export_qonnx
from qflow.graph import Emulator, QGraph, QGraphError
from qflow.graph.ir import OP_SPECS
from qflow.numerics import FixedType, Overflow, Rounding, requantize
from qflow.numerics import transformer as nt
from qflow.targets import load_target

GRAPHS = {"attention": attention_block, "two_heads": two_head_block, "ops": ops_graph}
#: the arithmetics each graph allows (the two-head block's mean needs a 31-bit type)
ALLOWED = {"attention": ("float32", "float64", "int64"),
           "two_heads": ("float64", "int64"), "ops": ("float32", "float64", "int64")}
NEW_OPS = ("softmax", "layernorm", "gelu", "matmul", "transpose", "slice", "add_const", "mean")


def _real(graph: QGraph, codes: np.ndarray) -> np.ndarray:
    return np.ldexp(codes.astype(np.float64), -graph.input_type.fractional)


# -- the ops in the emulator ---------------------------------------------------------------
def test_op_specs():
    assert {op: OP_SPECS[op] for op in NEW_OPS} == {
        "softmax": (1, (), ("axis",)),
        "layernorm": (1, ("gamma", "beta"), ("axis", "gamma_type", "beta_type")),
        "gelu": (1, (), ()), "matmul": (2, (), ("transpose_b",)),
        "transpose": (1, (), ("perm",)), "slice": (1, (), ("axis", "start", "stop")),
        "add_const": (1, ("value",), ("value_frac",)),
        "mean": (1, ("reciprocal",), ("axis", "reciprocal_frac"))}


def _twin(graph: QGraph, node, t: dict) -> np.ndarray:
    """The node's output from the numpy twins (or numpy itself), given every tensor."""
    x, info = t[node.inputs[0]], graph.tensors[node.inputs[0]]
    out_t = graph.tensors[node.output].type
    axis = 1 + node.attrs.get("axis", 0)
    if node.op == "softmax":
        return nt.fixed_softmax(x, info.type, out_t, axis)
    if node.op == "layernorm":
        return nt.fixed_layernorm(x, info.type, node.consts["gamma"],
                                  FixedType.parse(node.attrs["gamma_type"]),
                                  node.consts["beta"], FixedType.parse(node.attrs["beta_type"]),
                                  out_t, axis)
    if node.op == "gelu":
        return nt.fixed_gelu(x, info.type, out_t)
    if node.op == "matmul":
        b = t[node.inputs[1]]
        codes, acc = nt.fixed_matmul(x, info.type, np.swapaxes(b, -1, -2) if node.attrs[
            "transpose_b"] else b, graph.tensors[node.inputs[1]].type)
        assert acc == out_t
        return codes
    if node.op == "transpose":
        return x.transpose(0, *(1 + p for p in node.attrs["perm"]))
    if node.op == "slice":
        return np.take(x, range(node.attrs["start"], node.attrs["stop"]), axis=axis)
    if node.op == "add_const":
        f = out_t.fractional
        return (x << (f - info.type.fractional)) + (node.consts["value"][None] << (
            f - node.attrs["value_frac"]))
    if node.op == "mean":
        return x.sum(axis=axis) * int(node.consts["reciprocal"])
    if node.op == "cast":
        return requantize(x, info.type.fractional, out_t)
    return t[node.output]  # dense, add, concat: the emulator's own ops


@pytest.mark.parametrize("name", list(GRAPHS))
def test_emulator_equals_the_numpy_twins(name):
    graph = GRAPHS[name]()
    codes = sample_codes(graph)
    kept = Emulator(graph, "int64").run_codes(codes, keep=True)
    for node in graph.nodes:
        assert np.array_equal(_twin(graph, node, kept), kept[node.output]), node.name
    assert tuple(a for a in ("float32", "float64", "int64") if _allows(graph, a)) == ALLOWED[name]
    for arithmetic in ALLOWED[name]:
        em = Emulator(graph, arithmetic)
        other = em.run_codes(codes, keep=True)
        assert all(np.array_equal(other[k], v) for k, v in kept.items()), arithmetic
        assert np.array_equal(em.run_codes(codes), kept[graph.output])
    assert len(np.unique(kept[graph.output])) > 100


def _allows(graph: QGraph, arithmetic: str) -> bool:
    try:
        Emulator(graph, arithmetic)
    except QGraphError:
        return False
    return True


def test_the_extreme_rows_reach_every_op():
    """Equal rows (uniform probabilities, zero variance: beta), one huge logit (the max
    element gets the largest code), all-negative rows, the most negative codes."""
    graph = ops_graph()
    codes = extreme_codes(ACT, graph.tensors[graph.input].shape)
    kept = Emulator(graph).run_codes(codes, keep=True)
    probs, norm = kept["softmax_rows"], kept["layernorm_rows"]
    equal = (codes == codes[..., :1]).all(axis=-1)
    assert equal.sum() > 50
    assert (probs[equal] == 32).all()  # 1/8 at 8 fractional bits
    beta = next(n for n in graph.nodes if n.name == "layernorm_rows").consts["beta"]
    # a constant row normalises to 0: the output is beta cast to the output type
    assert (norm[equal] == requantize(np.broadcast_to(beta, norm[equal].shape), 7, ACT)).all()
    huge = (codes.max(-1) == ACT.qmax) & ((codes == ACT.qmin).sum(-1) == codes.shape[-1] - 1)
    assert huge.sum() > 10 and (probs[huge].max(-1) == PROBS.qmax).all()
    assert ((codes < 0).all(-1)).sum() > 20 and (codes == ACT.qmin).all(-1).sum() > 10
    assert (probs.max(-1) > 0).all()  # the largest element never gets code 0


def test_checks_name_the_node(tmp_path):
    m = TMaker(ACT, (4, 6))
    m.op("softmax", out_type=PROBS, attrs={"axis": 1}, name="sm")
    graph = m.graph()
    graph.tensors["sm"].type = FixedType.parse("ap_fixed<8,1,AP_RND,AP_SAT>")
    with pytest.raises(QGraphError, match=r"node 'sm' \(op 'softmax'\): .*unsigned"):
        Emulator(graph)
    m = TMaker(ACT, (4, 6))
    m.op("matmul", [m.last, m.last], attrs={"transpose_b": True}, name="mm")
    graph = m.graph()
    graph.tensors["mm"].type = FixedType.parse("ap_fixed<14,4>")  # 10 fraction bits, too narrow
    with pytest.raises(QGraphError, match=r"node 'mm' \(op 'matmul'\): .*does not hold"):
        Emulator(graph)
    with pytest.raises(QflowError, match=r"^int ONNX export: node 'mm' \(op 'matmul'\)"):
        export_int_onnx(graph, tmp_path / "model.int.onnx")
    with pytest.raises(QGraphError, match=r"node 'bad' \(op 'slice'\): slice \[2, 9\)"):
        TMaker(ACT, (4, 6)).op("slice", attrs={"axis": 1, "start": 2, "stop": 9}, name="bad")
    m = TMaker(ACT, (4, 6))  # add does not broadcast: a constant is add_const
    m.op("mean", attrs={"axis": 0, "reciprocal_frac": 2}, reciprocal=1, name="mean")
    m.add("add", inputs=["input", "mean"], name="sum")
    with pytest.raises(QGraphError, match=r"node 'sum' \(op 'add'\): .*same shape"):
        Emulator(m.graph()).run_codes(np.zeros((1, 4, 6), np.int64))


# -- integer ONNX and TVM ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(GRAPHS))
def test_int_onnx_equals_emulator(tmp_path, name):
    graph = GRAPHS[name]()
    path = export_int_onnx(graph, tmp_path / "model.int.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    assert "BitShift" not in ops and "Softmax" not in ops and not any(
        op.startswith(("Sqrt", "Exp", "Erf", "Pow")) for op in ops)
    routes = export_routes(path)
    for node in graph.nodes:
        if node.op in ("softmax", "layernorm", "gelu"):
            assert "int64" in routes[node.name], routes[node.name]
        if node.op == "matmul":  # 8-bit operands (probabilities unsigned), else int64
            narrow = max(graph.tensors[i].type.width for i in node.inputs) <= 8
            assert routes[node.name] == ("MatMulInteger(u8,u8)" if narrow else "MatMul(int64)")
    codes = sample_codes(graph)
    bad = mismatches(run_int_onnx(path, codes), Emulator(graph).run_codes(codes))
    print(f"{name}: int ONNX {bad} of {len(codes)} samples differ")
    assert bad == 0


def _random_type(rng, signed=None, widths=(2, 16)) -> FixedType:
    signed = bool(rng.integers(2)) if signed is None else signed
    width = int(rng.integers(widths[0], widths[1] + 1))
    return FixedType.from_width(width, int(rng.integers(-3, width + 3)), signed=signed,
                                rounding=list(Rounding)[rng.integers(7)],
                                overflow=list(Overflow)[rng.integers(4)])


def _one_op_graph(op: str, rng) -> QGraph:
    """One op on random input and output types (any rounding and overflow mode)."""
    tin = _random_type(rng, widths=(2, 20))
    shape = (int(rng.integers(1, 7)), int(rng.integers(1, 9)))
    m = TMaker(tin, shape)
    axis = int(rng.integers(2))
    if op == "softmax":
        frac = int(rng.integers((shape[axis] - 1).bit_length(), 25))
        integer = int(rng.integers(max(1 - frac, -3), 3))
        overflow = list(Overflow)[rng.integers(4)] if integer >= 1 else Overflow.SAT
        m.op("softmax", out_type=FixedType(signed=False, integer=integer, fractional=frac,
                                           rounding=list(Rounding)[rng.integers(7)],
                                           overflow=overflow), attrs={"axis": axis})
    elif op == "layernorm":
        gamma_t, beta_t = _random_type(rng, widths=(2, 12)), _random_type(rng, widths=(2, 12))
        count = shape[axis] if rng.integers(2) else 1
        m.op("layernorm", out_type=_random_type(rng), attrs={
            "axis": axis, "gamma_type": gamma_t.to_ap(), "beta_type": beta_t.to_ap()},
            gamma=rng.integers(gamma_t.qmin, gamma_t.qmax, count, endpoint=True),
            beta=rng.integers(beta_t.qmin, beta_t.qmax, count, endpoint=True))
    elif op == "gelu":
        m.op("gelu", out_type=_random_type(rng, widths=(2, 24)))
    else:
        m.add("cast", out_type=_random_type(rng, widths=(2, 12)), name="b")
        m.op("matmul", ["input", "b"], attrs={"transpose_b": True})
    return m.graph()


@pytest.mark.parametrize("op", ["softmax", "layernorm", "gelu", "matmul"])
def test_int_onnx_on_random_types_and_extremes(tmp_path, op):
    rng = np.random.default_rng(["softmax", "layernorm", "gelu", "matmul"].index(op))
    for k in range(25):
        graph = _one_op_graph(op, rng)
        t, shape = graph.input_type, graph.tensors[graph.input].shape
        codes = np.concatenate([
            rng.integers(t.qmin, t.qmax, (200, *shape), endpoint=True),
            np.where(rng.random((60, *shape)) < 0.5, t.qmin, t.qmax),
            *(np.full((1, *shape), c) for c in (t.qmin, t.qmax, 0, min(1, t.qmax)))])
        path = export_int_onnx(graph, tmp_path / f"{k}.onnx")
        bad = mismatches(run_int_onnx(path, codes), Emulator(graph).run_codes(codes))
        assert bad == 0, (op, k, graph.summary())


def test_verify_tvm_cpu_export(tmp_path):
    """The cpu target's export directory (integer ONNX and the TVM build; no QONNX, with
    a warning naming the first transformer node) under verify."""
    pytest.importorskip("tvm")
    graph = two_head_block()
    messages = []
    out = export_dir(tmp_path, graph, load_target("cpu"), messages=messages)
    assert any("no QONNX artifact: node 'pos' (op 'add_const')" in m for m in messages)
    assert set(verify_rows(out, _real(graph, sample_codes(graph)))) == {"int_onnx", "tvm"}


@pytest.mark.parametrize("target", ["arm64", "cuda"])
def test_tvm_cross_builds_compile(tmp_path, target):
    pytest.importorskip("tvm")
    out = tmp_path / target
    out.mkdir()
    artifacts = export(attention_block(), out, load_target(target))
    assert artifacts.get("tvm", artifacts.get("tvm_arm64")) == "tvm"  # tvm_arm64: linked
    build = json.loads((out / "tvm" / "build.json").read_text())
    files = [build["library"]] if build["library"] else build["objects"]
    assert files and all((out / "tvm" / f).stat().st_size > 0 for f in files)


# -- refusals ------------------------------------------------------------------------------
def test_qonnx_is_refused_naming_the_node(tmp_path):
    graph = ops_graph()
    with pytest.raises(QflowError) as info:
        export_qonnx(graph, tmp_path / "model.qonnx.onnx")
    message = str(info.value)
    assert "\n" not in message and "node 'softmax_rows' (op 'softmax')" in message
    messages = []
    artifacts = export_onnx(graph, tmp_path, options=ExportOptions(progress=messages.append))
    assert artifacts == {"int_onnx": "model.int.onnx"}
    assert not (tmp_path / "model.qonnx.onnx").exists() and len(messages) == 1


def test_hls_refusals_are_one_line_naming_the_node():
    with pytest.raises(HlsExportError) as info:
        hls_graph(attention_block(), "io_stream")
    assert "\n" not in str(info.value) and "node 'pos' (add_const)" in str(info.value)
    assert "io_parallel only" in str(info.value)
    m = TMaker(ACT, (2, 3, 4))
    m.op("matmul", [m.last, m.last], attrs={"transpose_b": True}, name="stacked")
    with pytest.raises(HlsExportError, match=r"^node 'stacked' \(matmul\): .*rank 2"):
        hls_graph(m.graph())


# -- hls4ml --------------------------------------------------------------------------------
LAYER_CLASSES = {"softmax": "FixedSoftmax", "layernorm": "FixedLayerNorm", "gelu": "FixedGELU",
                 "matmul": "ActivationMatMul", "transpose": "FixedTranspose",
                 "slice": "FixedSlice", "mean": "FixedMean", "add_const": "FixedAddConst",
                 "dense": "PointwiseConv1D"}


def _check_layers(graph: QGraph, rows: list[dict]) -> None:
    """Every transformer node is its qflow layer (a dense layer on tokens hls4ml's pointwise
    Conv1D), with the QGraph's result type read back."""
    layers = {r["qgraph_node"]: r for r in rows
              if r["qgraph_node"] and not r["layer"].startswith("bn_")}  # a dense's bias
    for node in graph.nodes:
        tokens = len(graph.tensors[node.inputs[0]].shape) == 2
        if node.op in LAYER_CLASSES and (node.op != "dense" or tokens):
            row = layers[node.name]
            assert row["class"] == LAYER_CLASSES[node.op], node.name
            # hls4ml prints the type with its saturation bits: fixed<8,3,RND_CONV,SAT,0>
            assert row["types"]["result"].startswith(
                graph.tensors[node.output].type.to_hls4ml()[:-1] + ","), row


def _csim_mismatches(tmp_path, graph: QGraph, target: str, codes: np.ndarray) -> int:
    """Mismatching samples of the hls4ml C simulation (io_parallel) against the emulator,
    after checking that every layer's types read back."""
    pytest.importorskip("hls4ml")
    from qflow.export.hls import run_csim
    from qflow.export.hls.convert import convert

    project = convert(graph, tmp_path / "hls", part=load_target(target).part, clock_mhz=100,
                      io_type="io_parallel", reuse_factor=1, strategy="Latency",
                      log=tmp_path / "hls4ml.log")
    _check_layers(graph, project.layers)
    return mismatches(run_csim(tmp_path / "hls", graph, _real(graph, codes)),
                      Emulator(graph).run_codes(codes))


def test_hls_csim_of_the_extreme_rows(tmp_path):
    """Each op reading the input rows directly: equal, one huge logit, all negative,
    zero variance, the most negative codes, random."""
    graph = ops_graph()
    codes = np.concatenate([extreme_codes(ACT, graph.tensors[graph.input].shape, 3),
                            sample_codes(graph, 200)])
    bad = _csim_mismatches(tmp_path, graph, "ultra96", codes)
    print(f"ops: hls4ml C simulation {bad} of {len(codes)} samples differ")
    assert bad == 0


def test_hls_csim_at_other_widths(tmp_path):
    """The same ops on 13-bit inputs, 16-bit probabilities and a 4-bit GELU."""
    act = FixedType.parse("ap_fixed<13,5,AP_RND_CONV,AP_SAT>")
    graph = ops_graph(seed=5, act=act, probs=FixedType.parse("ap_ufixed<16,0,AP_RND,AP_SAT>"),
                      gelu=FixedType.parse("ap_fixed<4,2,AP_TRN,AP_SAT>"))
    codes = np.concatenate([extreme_codes(act, graph.tensors[graph.input].shape, 4),
                            sample_codes(graph, 200)])
    bad = _csim_mismatches(tmp_path, graph, "ultra96", codes)
    print(f"ops at other widths: hls4ml C simulation {bad} of {len(codes)} samples differ")
    assert bad == 0


def test_hls_csim_verify_export(tmp_path):
    """The Ultra96 export directory of the one-head block under verify: integer ONNX and
    the hls4ml C simulation; every layer's types read back; the estimate's rows."""
    pytest.importorskip("hls4ml")
    graph = attention_block()
    out = export_dir(tmp_path, graph, load_target("ultra96"), "io_parallel")
    report = json.loads((out / "report.json").read_text())
    _check_layers(graph, report["layers"])
    estimate = {x["node"]: x for x in report["estimate"]["layers"]}
    assert estimate["softmax_h0"]["latency_cycles"] > nt.EXP_FRAC_BITS  # the divider
    assert estimate["ln1"]["latency_cycles"] > nt.ISQRT_STEPS  # the square root
    assert set(verify_rows(out, _real(graph, sample_codes(graph)))) == {"int_onnx", "hls_csim"}


def test_hls_csim_two_heads(tmp_path):
    graph = two_head_block()
    codes = sample_codes(graph)
    bad = _csim_mismatches(tmp_path, graph, "pynq-z2", codes)
    print(f"two heads: hls4ml C simulation {bad} of {len(codes)} samples differ")
    assert bad == 0


# -- the resource estimate -----------------------------------------------------------------
def test_estimate_rows():
    est = estimate_resources(two_head_block(), load_target("ultra96"), io_type="io_parallel",
                             reuse_factor=1, strategy="Latency")
    rows = {x.node: x for x in est.layers}
    k = nt.softmax_widths(FixedType.parse("ap_fixed<8,4>"), PROBS, 5).reciprocal_frac
    # one divider per row: K + 1 quotient bits, one cycle each
    assert rows["softmax_h0"].latency_cycles >= k + 1
    assert rows["ln1"].latency_cycles >= nt.ISQRT_STEPS + 59 + 1
    for name in ("softmax_h0", "ln1", "gelu", "scores_h0"):
        assert rows[name].dsp > 0 and rows[name].lut > 0, name
    assert rows["kT_h0"].lut == 0 and rows["q_cast_h0"].dsp == 0  # wires
    assert rows["pos"].weight_bits > 0 and rows["ln1"].weight_bits > 0
    assert rows["q"].ii == 5  # a dense layer on tokens: one pass per token
    stream = estimate_resources(two_head_block(), load_target("ultra96"), io_type="io_stream",
                                reuse_factor=1, strategy="Latency")
    assert any("io_parallel only" in w for w in stream.warnings)
