"""Binary networks: the ``sign`` op and +-1-weight dense/conv2d layers, in the emulator
(every arithmetic, against numpy) and in every exporter (0 mismatching samples): integer
ONNX under ONNX Runtime, QONNX under qonnx's executor, TVM (cpu run; arm64 and cuda
compiled), hls4ml C simulation (XNOR/popcount layers, and ap_fixed<2,2> operands for
padded convolutions), each through ``qflow verify``'s own code on an export directory;
the FPGA estimate counts binary products in LUTs, never DSPs."""

import collections
import json

import numpy as np
import onnx
import pytest
from binary_graphs import INPUT, Maker, binary_cnn, binary_mlp, mismatches, sample_inputs
from export_dirs import export_dir, verify_rows

from qflow.export import ExportOptions, export
from qflow.export.hls import HlsExportError
from qflow.export.hls.binary import XNOR, ceillog2, xnor_problem, xnor_tensors
from qflow.export.hls.estimate import estimate_resources
from qflow.export.hls.onnx_graph import hls_graph
from qflow.export.int_onnx import export_int_onnx, export_routes, run_int_onnx
from qflow.export.qonnx import export_qonnx, run_qonnx
from qflow.graph import Emulator, QGraph, infer
from qflow.graph.ir import OP_SPECS, Node
from qflow.numerics import FixedType, to_codes
from qflow.targets import load_target

ARITHMETICS = ("float32", "float64", "int64")


# -- the op ------------------------------------------------------------------------------
def _sign_graph(t: FixedType, shape=(7,)) -> QGraph:
    m = Maker(t, shape)
    m.add("sign")
    return m.graph()


def test_sign_spec_and_type():
    assert OP_SPECS["sign"] == (1, (), ())
    assert infer.BIPOLAR.to_ap().startswith("ap_fixed<2,2")
    assert (infer.BIPOLAR.qmin, infer.BIPOLAR.qmax, infer.BIPOLAR.fractional) == (-2, 1, 0)
    assert infer.float_bounds(_sign_graph(FixedType.parse("ap_fixed<4,2>"))).peak <= 8


@pytest.mark.parametrize("arithmetic", ARITHMETICS)
@pytest.mark.parametrize("spec", ["ap_fixed<8,3,AP_RND_CONV,AP_SAT>", "ap_ufixed<5,2>",
                                  "ap_fixed<20,4>", "ap_fixed<2,2>"])
def test_sign_equals_numpy(arithmetic, spec):
    t = FixedType.parse(spec)
    graph = _sign_graph(t)
    codes = np.random.default_rng(0).integers(t.qmin, t.qmax, (300, 7), endpoint=True)
    codes[:3] = np.array([0, t.qmin, t.qmax])[:, None]
    got = Emulator(graph, arithmetic).run_codes(codes)
    assert got.dtype == np.int64
    assert np.array_equal(got, np.where(codes >= 0, 1, -1))
    assert (got[0] == 1).all()  # sign(0) = +1


@pytest.mark.parametrize("arithmetic", ARITHMETICS)
def test_sign_of_zero_after_negative_products_is_plus_one(arithmetic):
    """A zero formed as (-s) * 0 is -0.0 in float arithmetics: still +1."""
    m = Maker(FixedType.parse("ap_fixed<6,3>"), (4,))
    m.add("scale_shift", scale=[-3, -1, 2, -5], scale_frac=[0, 1, 0, 2],
          shift=[0, 0, 0, 0], shift_frac=[0, 0, 0, 0])
    m.add("sign")
    graph = m.graph()
    codes = np.zeros((5, 4), np.int64)
    codes[1:] = np.random.default_rng(1).integers(-32, 32, (4, 4))
    got = Emulator(graph, arithmetic).run_codes(codes)
    assert (got[0] == 1).all()
    scaled = codes * np.array([-3, -1, 2, -5]) * np.array([4, 2, 4, 1])
    assert np.array_equal(got, np.where(scaled >= 0, 1, -1))


def _reference(graph: QGraph, codes: np.ndarray) -> np.ndarray:
    """The binary layers computed directly: 2 * matches - K on the {0, 1} encodings."""
    tensors = Emulator(graph, "int64").run_codes(codes, keep=True)
    for node in graph.nodes:
        if node.op != "dense" or not node.name.startswith("bin"):
            continue
        x, w = tensors[node.inputs[0]], node.consts["weight"]
        bits_x, bits_w = (x > 0).astype(np.int64), (w > 0).astype(np.int64)
        matches = bits_x @ bits_w.T + (1 - bits_x) @ (1 - bits_w).T
        acc = 2 * matches - w.shape[1] + node.consts.get("bias", 0)
        assert np.array_equal(acc, tensors[node.output]), node.name
    return tensors[graph.output]


@pytest.mark.parametrize("arithmetic", ARITHMETICS)
@pytest.mark.parametrize("build", [binary_mlp, binary_cnn])
def test_binary_network_in_every_arithmetic(build, arithmetic):
    graph = build()
    codes = to_codes(sample_inputs(graph), graph.input_type)
    want = _reference(graph, codes)
    em = Emulator(graph, arithmetic)
    assert em.arithmetic == arithmetic
    assert mismatches(em.run_codes(codes), want) == 0
    kept = em.run_codes(codes, keep=True)
    signs = [n.output for n in graph.nodes if n.op == "sign"]
    for name in signs:
        assert set(np.unique(kept[name])) == {-1, 1}
        src = kept[graph.nodes[[n.output for n in graph.nodes].index(name)].inputs[0]]
        assert np.array_equal(kept[name], np.where(src >= 0, 1, -1))
        assert (src == 0).any(), f"{name}: no zero input, sign(0) untested"
    assert len(np.unique(want)) > 20


# -- the exporters ---------------------------------------------------------------------
#: the graphs every exporter is checked on: 'same' convolutions (padded), 'valid' ones
#: (unpadded) with the last sign after the flatten, and the 'valid' CNN as built
GRAPHS = {
    "mlp": binary_mlp,
    "cnn_same": lambda: binary_cnn(padding=1),
    "cnn_valid": lambda: binary_cnn(padding=0, flatten_first=True),
    "cnn_valid_sign_flatten": lambda: binary_cnn(padding=0),
}
BINARY_LAYERS = {"mlp": ["bin0", "bin1", "bin2"], "cnn_same": ["bin_a", "bin_b", "bin_fc"],
                 "cnn_valid": ["bin_a", "bin_b", "bin_fc"],
                 "cnn_valid_sign_flatten": ["bin_a", "bin_b", "bin_fc"]}
EXPORTED = ("mlp", "cnn_same", "cnn_valid")


@pytest.mark.parametrize("arithmetic", ["auto", "int64"])
@pytest.mark.parametrize("name", EXPORTED)
def test_int_onnx_equals_emulator(tmp_path, name, arithmetic):
    """int64: binary layers on the 8-bit integer kernels; auto: on float32 kernels (sums
    of +-1 products are small)."""
    graph = GRAPHS[name]()
    path = export_int_onnx(graph, tmp_path / "model.int.onnx", arithmetic)
    ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    assert "Sign" not in ops  # ONNX Sign gives 0 at 0
    routes = export_routes(path)
    for node in graph.nodes:
        if node.op == "sign":
            assert routes[node.name].startswith("Where(Less(")
    for layer in BINARY_LAYERS[name]:
        if arithmetic == "int64":
            assert routes[layer] in ("MatMulInteger(u8,u8)", "ConvInteger(u8,u8)"), routes[layer]
        else:
            assert routes[layer].startswith(("MatMul(float32", "Conv(float32")), routes[layer]
    codes = to_codes(sample_inputs(graph), graph.input_type)
    bad = mismatches(run_int_onnx(path, codes), Emulator(graph).run_codes(codes))
    print(f"{name}: int ONNX {bad} of {len(codes)} samples differ")
    assert bad == 0


def _qonnx_model(graph, tmp_path):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes

    path = export_qonnx(graph, tmp_path / "model.qonnx.onnx")
    wrapper = ModelWrapper(str(path)).transform(InferShapes()).transform(InferDataTypes())
    return path, wrapper


@pytest.mark.parametrize("name", EXPORTED)
def test_qonnx_equals_emulator(tmp_path, name):
    pytest.importorskip("qonnx")
    graph = GRAPHS[name]()
    path, wrapper = _qonnx_model(graph, tmp_path)
    bipolar = {n.name: n.output[0] for n in wrapper.graph.node if n.op_type == "BipolarQuant"}
    signs = [n.name for n in graph.nodes if n.op == "sign"]
    weights = [f"{layer}/weight_quant" for layer in BINARY_LAYERS[name]]
    assert sorted(bipolar) == sorted(signs + weights)
    # qonnx reads every sign and every binary weight tensor as BIPOLAR
    assert {str(wrapper.get_tensor_datatype(t)) for t in bipolar.values()} == {"BIPOLAR"}
    x = sample_inputs(graph)
    bad = mismatches(run_qonnx(path, x), Emulator(graph).run(x))
    print(f"{name}: QONNX {bad} of {len(x)} samples differ")
    assert bad == 0


def test_qonnx_sign_of_a_float64_model(tmp_path):
    """A 29-bit accumulator makes the model float64: its BipolarQuant reads float64."""
    pytest.importorskip("qonnx")
    m = Maker(INPUT, (6,), 3)
    m.add("dense", (5,), weight=m.rng.integers(-2**19, 2**19, (5, 6)),
          weight_frac=np.full(5, 12), name="wide")
    m.add("sign", name="s")
    m.add("dense", (4,), weight=m.binary_weights((4, 5)), weight_frac=np.zeros(4), name="b")
    m.cast()
    graph = m.graph()
    path = export_qonnx(graph, tmp_path / "model.qonnx.onnx")
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert meta["qflow.dtype"] == "float64"
    x = sample_inputs(graph)
    assert mismatches(run_qonnx(path, x), Emulator(graph).run(x)) == 0


@pytest.mark.parametrize("name", EXPORTED)
def test_verify_tvm_cpu_export(tmp_path, name):
    """The cpu target's export directory (QONNX, integer ONNX, TVM build) under verify."""
    pytest.importorskip("tvm")
    graph = GRAPHS[name]()
    out = export_dir(tmp_path, graph, load_target("cpu"))
    assert set(verify_rows(out, sample_inputs(graph))) == {"qonnx", "int_onnx", "tvm"}


@pytest.mark.parametrize("target", ["arm64", "cuda"])
def test_tvm_cross_builds_compile(tmp_path, target):
    pytest.importorskip("tvm")
    graph = binary_cnn(padding=1)
    out = tmp_path / target
    out.mkdir()
    artifacts = export(graph, out, load_target(target))
    assert artifacts.get("tvm", artifacts.get("tvm_arm64")) == "tvm"  # tvm_arm64: linked
    build = json.loads((out / "tvm" / "build.json").read_text())
    files = [build["library"]] if build["library"] else build["objects"]
    assert files and all((out / "tvm" / f).stat().st_size > 0 for f in files)


# -- hls4ml ----------------------------------------------------------------------------
def _precisions(form) -> dict[str, dict[str, str]]:
    """QGraph node -> {hls4ml layer class key: precision} of its main layer."""
    return {form.sources[form.layer_names[k]]: v for k, v in form.precisions.items()
            if not form.layer_names[k].startswith("bn_")}


def test_hls_form_xnor_where_exact_ap_fixed_where_padded():
    """Unpadded binary layers read hls4ml's {0, 1} type (XNOR); padded convolutions read
    ap_fixed<2,2> (zero padding would read as -1); the sign chooses per its readers."""
    valid = _precisions(hls_graph(binary_cnn(padding=0)))
    for node in ("sign_a", "sign_b", "sign_c", "reshape13"):
        assert valid[node] == {"result": XNOR}, node
    for node in ("bin_a", "bin_b", "bin_fc"):
        assert valid[node]["weight"] == XNOR
    # the bias of bin_b (integers in [-4, 3]) joins the match count halved: 1 fraction bit
    assert valid["bin_b"]["bias"] == "fixed<3,2,TRN,WRAP>"
    same = _precisions(hls_graph(binary_cnn(padding=1)))
    for node in ("sign_a", "sign_b"):
        assert same[node] == {"result": "fixed<2,2,TRN,WRAP>"}, node
    for node in ("bin_a", "bin_b"):
        assert same[node]["weight"] == "fixed<2,2,TRN,WRAP>"
    assert same["sign_c"] == {"result": XNOR} and same["bin_fc"]["weight"] == XNOR
    model = hls_graph(binary_mlp()).model
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["FixedSign"] == 3 and ops["BipolarQuant"] == 3


def test_read_back_refuses_a_binary_weight_that_lost_its_type():
    import hls4ml
    from hls4ml.model.types import FixedPrecisionType

    from qflow.export.hls import custom
    from qflow.export.hls.convert import _hls_config, check_layer_types

    custom.register()
    form = hls_graph(binary_mlp())
    model = hls4ml.converters.convert_from_onnx_model(
        form.model, backend="Vitis", hls_config=_hls_config(form, 1, "Latency"))
    rows = {r["layer"]: r for r in check_layer_types(model, form)}
    assert rows["Dense_bin0"]["types"]["weight"] == XNOR
    assert rows["sign0"]["class"] == "FixedSign" and rows["sign0"]["types"]["result"] == XNOR
    layer = next(lay for lay in model.get_layers() if lay.name == "Dense_bin0")
    layer.get_attr("weight_t").precision = FixedPrecisionType(2, 2)
    with pytest.raises(HlsExportError, match=r"Dense_bin0.*weight_t"):
        check_layer_types(model, form)


def _with(graph: QGraph, name: str, **changes) -> Node:
    node = next(n for n in graph.nodes if n.name == name)
    return Node(node.op, node.name, node.inputs, node.output,
                {**node.attrs, **changes.pop("attrs", {})}, {**node.consts, **changes})


def test_xnor_conditions():
    graph = binary_cnn(padding=0)
    conv = next(n for n in graph.nodes if n.name == "bin_b")
    assert xnor_problem(conv) == ""
    assert "padding" in xnor_problem(_with(graph, "bin_b", attrs={"padding": [1, 1]}))
    assert "fractional" in xnor_problem(_with(graph, "bin_b", bias_frac=np.ones(8, np.int64)))
    # 2·matches − n + bias must fit ap_int<ceillog2(54) + 2> = ap_int<8>: [-128, 127]
    assert ceillog2(54) == 6
    assert xnor_problem(_with(graph, "bin_b", bias=np.full(8, 127 - 54))) == ""
    assert "too large" in xnor_problem(_with(graph, "bin_b", bias=np.full(8, 128 - 54)))
    weight = conv.consts["weight"].copy()
    weight[0, 0, 0, 0] = 3
    assert "not all" in xnor_problem(_with(graph, "bin_b", weight=weight))
    # a sign that is the graph output, or read by another op, stays ap_fixed<2,2>
    m = Maker(INPUT, (6,))
    m.add("sign")
    assert xnor_tensors(m.graph()) == frozenset()
    m.add("relu")
    assert xnor_tensors(m.graph()) == frozenset()


def test_io_stream_refuses_a_sign_of_a_flattened_image_naming_the_node():
    """hls4ml's io_stream hands the next layer the unflattened stream: only dense layers
    may read a flattened image there (io_parallel exports it)."""
    with pytest.raises(HlsExportError) as info:
        hls_graph(GRAPHS["cnn_valid"](), "io_stream")
    message = str(info.value)
    assert "\n" not in message and "reshape12" in message and "'sign_c' (sign)" in message


#: (graph, io type): XNOR dense (with a separate bias) in io_stream; XNOR convolutions
#: (one with a halved bias) in io_parallel with the sign after the flatten and in io_stream
#: with it before; ap_fixed<2,2> padded convolutions and a shortcut in io_parallel
HLS_CELLS = [("mlp", "io_stream"), ("cnn_valid", "io_parallel"),
             ("cnn_valid_sign_flatten", "io_stream"), ("cnn_same", "io_parallel")]


@pytest.mark.parametrize(("name", "io_type"), HLS_CELLS)
def test_hls_csim_equals_emulator(tmp_path, name, io_type):
    """The Ultra96 export directory under verify: QONNX, integer ONNX and the hls4ml C
    simulation, every layer's types read back (XNOR ones by class)."""
    pytest.importorskip("hls4ml")
    graph = GRAPHS[name]()
    out = export_dir(tmp_path, graph, load_target("ultra96"), io_type)
    report = json.loads((out / "report.json").read_text())
    # each QGraph node's main layer (a dense bias is a second layer of the same node)
    layers = {row["qgraph_node"]: row for row in report["layers"]
              if row["qgraph_node"] and not row["layer"].startswith("bn_")}
    signs = [n.name for n in graph.nodes if n.op == "sign"]
    assert all(layers[s]["class"] == "FixedSign" for s in signs)
    xnor = xnor_tensors(graph)
    for layer in BINARY_LAYERS[name]:
        node = next(n for n in graph.nodes if n.name == layer)
        assert (layers[layer]["types"]["weight"] == XNOR) == (node.inputs[0] in xnor)
    estimate = {x["node"]: x for x in report["estimate"]["layers"]}
    assert all(estimate[layer]["dsp"] == 0 for layer in BINARY_LAYERS[name])
    assert set(verify_rows(out, sample_inputs(graph))) == {"qonnx", "int_onnx", "hls_csim"}


def test_every_fpga_target_exports_the_xnor_layers(tmp_path):
    """Conversion and the type read-back (no compile) on every FPGA target's part."""
    pytest.importorskip("hls4ml")
    from qflow.export.hls import export_hls

    graph = binary_cnn(padding=0)
    for target in ("ultra96", "pynq-z2", "zcu104", "kv260"):
        out = tmp_path / target
        out.mkdir()
        export_hls(graph, out, load_target(target), ExportOptions())
        rows = json.loads((out / "report.json").read_text())["layers"]
        assert sum(r["types"].get("weight") == XNOR for r in rows) == 3, target


# -- the resource estimate --------------------------------------------------------------
@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize(("target", "io_type", "strategy"), [
    ("ultra96", "io_parallel", "Latency"), ("ultra96", "io_stream", "Latency"),
    ("pynq-z2", "io_parallel", "Resource")])
def test_estimate_counts_binary_products_in_luts(name, target, io_type, strategy):
    graph = GRAPHS[name]()
    est = estimate_resources(graph, load_target(target), io_type=io_type, reuse_factor=2,
                             strategy=strategy)
    layers = {x.node: x for x in est.layers}
    xnor = xnor_tensors(graph)
    for layer in BINARY_LAYERS[name]:
        x = layers[layer]
        node = next(n for n in graph.nodes if n.name == layer)
        bits = 1 if node.inputs[0] in xnor else 2  # hls4ml's binary type, or ap_fixed<2,2>
        assert (x.multiplier_kind, x.dsp) == ("xnor", 0), x
        assert (x.activation_width, x.weight_width) == (bits, bits)
        # an XNOR (or sign choice) and a popcount-tree share per physical product
        assert x.lut >= x.multipliers * (2 * bits + 1) > 0
    others = sum(x.dsp for x in est.layers if x.node not in BINARY_LAYERS[name])
    assert est.totals["dsp"] == others
    # the same layers on 8-bit inputs would multiply: the saving is the sign's
    assert all(layers[n.name].multiplier_kind != "xnor" for n in graph.nodes
               if n.op in ("dense", "conv2d") and n.name not in BINARY_LAYERS[name])
