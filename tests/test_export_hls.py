"""hls4ml export: the project's C simulation (g++) equals the emulator, bit for bit, for
every zoo model in io_parallel and io_stream; every layer type is read back; what hls4ml
cannot do exactly is refused; the project's own testbench compiles and runs."""

import json
import subprocess

import numpy as np
import onnx
import pytest
from zoo_fixtures import CONFIGS, MODEL_NAMES, TRANSFORMER_MODELS, frozen, test_inputs

from qflow.export import ExportOptions
from qflow.export.hls import HlsExportError, export_hls, run_csim
from qflow.export.hls.convert import check_layer_types
from qflow.export.hls.onnx_graph import hls_graph
from qflow.graph import Emulator
from qflow.graph.ir import Node, QGraph
from qflow.numerics.corners import corner_inputs
from qflow.targets import load_target
from qflow.verify.check import compare

pytest.importorskip("hls4ml")

#: (model, config, io type): every zoo model in both io types at 8 bits (the transformer
#: layers are io_parallel only: test_transformer_graph_ops checks the refusal); WRAP/TRN casts
#: (qflow's FixedCast layer) on every model; K-hot, SAT/RND_CONV and 4-bit on the MLPs
CELLS = sorted(
    {(m, "8bit", io) for m in MODEL_NAMES for io in ("io_parallel", "io_stream")
     if io == "io_parallel" or m not in TRANSFORMER_MODELS}
    | {(m, "wrap_trn", "io_parallel") for m in ("digits-mlp", "jet-mlp")}
    | {("digits-cnn", "wrap_trn", "io_stream"), ("jet-mlp", "khot2", "io_parallel"),
       ("digits-mlp", "sat_rndconv", "io_stream"), ("digits-mlp", "4bit", "io_parallel")})
assert {c for _, c, _ in CELLS} <= set(CONFIGS)


def _export(graph, out, io_type="io_parallel", target="ultra96"):
    return export_hls(graph, out, load_target(target), ExportOptions(io_type=io_type))


@pytest.mark.slow
@pytest.mark.parametrize(("model_name", "config_name", "io_type"), CELLS)
def test_csim_equals_emulator(tmp_path, model_name, config_name, io_type):
    _, graph = frozen(model_name, config_name)
    artifacts = _export(graph, tmp_path, io_type)
    assert artifacts["hls_csim"] == "hls"
    x = np.concatenate([test_inputs(model_name, 2000).astype(np.float64),
                        corner_inputs(graph.input_type, graph.tensors[graph.input].shape, 512)])
    bad, max_diff = compare(Emulator(graph).run(x), run_csim(tmp_path / "hls", graph, x))
    print(f"{model_name} {config_name} {io_type}: {bad} of {len(x)} samples differ")
    assert (bad, max_diff) == (0, 0)


def test_every_layer_type_comes_from_the_qgraph(tmp_path):
    _, graph = frozen("digits-mlp", "wrap_trn")
    _export(graph, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    layers = {row["layer"]: row for row in report["layers"]}
    # the WRAP/TRN casts go through qflow's FixedCast layer, not hls4ml's Quant
    casts = [n for n in graph.nodes if n.op == "cast"]
    assert casts and all(layers[n.name]["class"] == "FixedCast" for n in casts)
    for node in casts:
        t = graph.tensors[node.output].type
        assert layers[node.name]["types"]["result"].startswith(
            f"{'fixed' if t.signed else 'ufixed'}<{t.width},{t.int_width},{t.rounding},"
            f"{t.overflow}")
    assert "fixed<16,6,TRN,WRAP" not in json.dumps(report["layers"])
    assert report["estimate"]["totals"]["dsp"] >= 0
    assert (tmp_path / "hls" / "firmware" / "nnet_utils" / "qflow_fixed_cast.h").is_file()


def test_read_back_refuses_a_changed_type():
    import hls4ml

    from qflow.export.hls import custom

    _, graph = frozen("digits-mlp", "8bit")
    custom.register()
    form = hls_graph(graph)
    config = {"Model": {"Precision": "fixed<16,6>", "ReuseFactor": 1, "Strategy": "Latency"},
              "LayerName": {k: {"Precision": dict(v)} for k, v in form.precisions.items()}}
    model = hls4ml.converters.convert_from_onnx_model(form.model, backend="Vitis",
                                                      hls_config=config)
    assert check_layer_types(model, form)
    layer = next(lay for lay in model.get_layers() if lay.name.startswith("Dense_"))
    from hls4ml.model.types import FixedPrecisionType

    layer.get_attr("accum_t").precision = FixedPrecisionType(16, 6)
    with pytest.raises(HlsExportError, match="accum_t"):
        check_layer_types(model, form)


def _with_pool(graph: QGraph, kernel: int, reciprocal_frac: int = 18) -> QGraph:
    """A copy of the CNN whose 2×2 average pool is replaced by a 3×3 one (1/9 is not a
    power of two: hls4ml divides, qflow multiplies by a rounded reciprocal)."""
    nodes = []
    for node in graph.nodes:
        if node.op == "avgpool2d":
            attrs = dict(node.attrs, kernel=[kernel, kernel], reciprocal_frac=reciprocal_frac)
            node = Node(node.op, node.name, node.inputs, node.output, attrs,
                        {"reciprocal": np.array(round(2**18 / kernel**2), np.int64)},
                        node.source)
        nodes.append(node)
    return QGraph(graph.input, graph.output, graph.tensors, nodes, graph.meta)


def test_inexact_pooling_goes_to_qflows_layer():
    """hls4ml's division by 9 is not qflow's multiplication by round(2^18/9)·2^-18: the
    3×3 pool becomes FixedAvgPool (its C simulation: tests/test_hls_user_models.py)."""
    _, graph = frozen("digits-cnn", "8bit")
    form = hls_graph(_with_pool(graph, 3))
    pool = next(n for n in form.model.graph.node if n.op_type == "FixedAvgPool")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in pool.attribute}
    assert attrs["reciprocal"] == 29127 and list(attrs["kernel_shape"]) == [3, 3]
    assert form.precisions[pool.name]["scale"] == "ufixed<15,-3,TRN,WRAP>"
    assert set(form.precisions[pool.name]) == {"accum", "scale", "result"}
    # the 2×2 one stays hls4ml's (exact: 1/4 is a power of two)
    assert "FixedAvgPool" not in {n.op_type for n in hls_graph(graph).model.graph.node}
    # a reciprocal whose fraction does not match the output type is refused
    with pytest.raises(HlsExportError, match=r"\(avgpool2d\): output fraction"):
        hls_graph(_with_pool(graph, 3, reciprocal_frac=17))


def test_project_testbench_compiles_with_gpp_and_runs(tmp_path):
    _, graph = frozen("jet-mlp", "8bit")
    _export(graph, tmp_path)
    hls = tmp_path / "hls"
    assert (hls / "tb_data" / "tb_input_features.dat").is_file()
    # the C simulation reads the weights from text files: say where they are
    subprocess.run(["g++", "-std=c++14", "-O1", "-Ifirmware", "-Ifirmware/ap_types",
                    '-DWEIGHTS_DIR="firmware/weights"', "qflow_model_test.cpp",
                    "firmware/qflow_model.cpp", "-o", "tb"],
                   cwd=hls, check=True, capture_output=True, timeout=600)
    run = subprocess.run(["./tb"], cwd=hls, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "INFO: Saved inference results" in run.stdout, run.stdout
    assert (hls / "tb_data" / "csim_results.log").is_file()
