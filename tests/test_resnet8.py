"""resnet8, the deployment benchmark model (MLPerf Tiny's ResNet-8 on 3x32x32 images):
exported for ultra96 in io_stream and for the CPU, verified on every artifact with the C
simulation in two worker processes; verify's default input count for large models."""

import copy

import numpy as np
import pytest
import torch
from export_dirs import export_dir

import qflow
from qflow.export.int_onnx import export_routes
from qflow.graph.ir import Node, QGraph, TensorInfo
from qflow.numerics import FixedType
from qflow.targets import load_target
from qflow.train import fit
from qflow.verify.check import (
    DEFAULT_CORNERS,
    DEFAULT_SAMPLES,
    MAX_DEFAULT_MACS,
    default_inputs,
    macs_per_sample,
    verify_directory,
)
from qflow.zoo import DATASETS, MODELS

pytest.importorskip("hls4ml")


@pytest.fixture(scope="module")
def resnet8_graph():
    data = DATASETS["images32"]()
    torch.manual_seed(0)
    model = MODELS["resnet8"].factory()
    fit(model, data.x_train[:512], data.y_train[:512], epochs=1, progress=False)
    qmodel = qflow.quantize_(copy.deepcopy(model))
    fit(qmodel, data.x_train[:256], data.y_train[:256], epochs=1, progress=False)
    return qflow.freeze(qmodel.eval(), torch.as_tensor(data.x_test[:4])), data


def _conv_macs(graph: QGraph) -> int:
    """The convolutions' and dense layer's products, counted from the layer shapes."""
    total = 0
    for node in graph.nodes:
        if node.op in ("conv2d", "dense"):
            _, *fan_in = node.consts["weight"].shape
            total += (int(np.prod(graph.tensors[node.output].shape)) * int(np.prod(fan_in)))
    return total


def test_resnet8_is_the_mlperf_tiny_shape(resnet8_graph):
    graph, _ = resnet8_graph
    convs = [n for n in graph.nodes if n.op == "conv2d"]
    assert graph.tensors[graph.input].shape == (3, 32, 32)
    assert [n.consts["weight"].shape[0] for n in convs] == [16, 16, 16, 32, 32, 32, 64, 64, 64]
    assert sum(n.op == "add" for n in graph.nodes) == 3
    # 12.5 M products: stem 0.44 M, stacks 4.72 + 3.67 + 3.67 M, the dense layer 640
    assert 12_000_000 < _conv_macs(graph) < 13_000_000
    assert macs_per_sample(graph) >= _conv_macs(graph)


def test_default_inputs_shrink_for_a_large_model(resnet8_graph):
    graph, _ = resnet8_graph
    samples, corners = default_inputs(graph)
    total = MAX_DEFAULT_MACS // macs_per_sample(graph)
    assert (samples + corners, corners) == (total, total // 4)
    assert 200 < total < DEFAULT_SAMPLES  # resnet8: a few hundred inputs, not 2,256
    tiny = QGraph(input="x", output="y", tensors={
        "x": TensorInfo("x", (4,), FixedType.parse("ap_fixed<8,4>")),
        "y": TensorInfo("y", (2,), FixedType.parse("ap_fixed<20,12>"))}, nodes=[
        Node("dense", "fc", ["x"], "y", consts={"weight": np.ones((2, 4), np.int64),
                                               "weight_frac": np.array([4, 4])})])
    assert macs_per_sample(tiny) == 8
    assert default_inputs(tiny) == (DEFAULT_SAMPLES, DEFAULT_CORNERS)


def test_resnet8_ultra96_stream_and_cpu_verify_exactly(resnet8_graph, tmp_path):
    graph, data = resnet8_graph
    messages = []
    for target, io_type in (("ultra96", "io_stream"), ("cpu", None)):
        out = export_dir(tmp_path, graph, load_target(target), io_type=io_type)
        report = verify_directory(out, corners=24, workers=2, progress=messages.append,
                                  x=data.x_test[:40])
        rows = {r["artifact"]: r for r in report["results"] if r["role"] == "artifact"}
        print(target, {k: (r["mismatching_samples"], r["seconds"]) for k, r in rows.items()})
        assert report["passed"], report["summary"]
        assert all(r["samples"] == 64 and r["mismatching_samples"] == 0 for r in rows.values())
        routes = export_routes(out / "model.int.onnx")
        assert all(routes[n.name].startswith("Conv(float32") for n in graph.nodes
                   if n.op == "conv2d")
    assert {"hls_csim", "int_onnx", "qonnx", "tvm"} <= {
        m.split(":")[0] for m in messages if ":" in m}
    # the C simulation ran in worker processes and said how far it was
    assert any("running them in 2 worker processes" in m for m in messages), messages
    assert any("hls_csim: C simulation: 64 of 64 samples" in m for m in messages), messages
