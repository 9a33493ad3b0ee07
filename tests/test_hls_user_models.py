"""hls4ml export of models written the way users write them, bit for bit.

- an unnamed ``nn.Sequential`` (children ``0``, ``1``, ...: names hls4ml cannot take);
- Conv2d → ReLU → Flatten → Linear (channels-last flattening, no Transpose layer);
- a global average pool over 6×6 and ``AvgPool2d(3)`` windows (1/n not a power of two:
  qflow's FixedAvgPool layer, the window sum times the reciprocal code);
- a QGraph whose names clash with the names qflow and hls4ml derive from them.

Each model is exported for the Ultra96 in io_parallel and io_stream once per module
(fixtures), its C simulation run on the digits test set plus 512 corner cases and
compared with the emulator sample by sample.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import pytest
from hls_models import (
    CORNERS,
    IO_TYPES,
    Cell,
    csim_mismatches,
    export_cell,
    hls_type,
    train_and_freeze,
)
from torch import nn

from qflow.config import QFXConfig
from qflow.export.hls import HlsExportError
from qflow.export.hls.convert import UNSET_PRECISION
from qflow.export.hls.names import IDENTIFIER, Namer, escape
from qflow.export.hls.onnx_graph import hls_graph, hwc_order
from qflow.graph.ir import Node, QGraph, TensorInfo

#: name -> factory; every model reads 1×8×8 digits
MODELS = {
    "sequential-mlp": lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)),
    "conv-flatten-linear": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)),
    # 8×8 → 6×6 → global average over 36 values
    "global-avg-6x6": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 10)),
    # 3×3 windows at stride 1 (8×8 → 6×6), then stride 2 (6×6 → 2×2, the last row and
    # column read by no window)
    "avgpool3": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3, stride=1),
        nn.AvgPool2d(3, stride=2), nn.Flatten(), nn.Linear(16, 10)),
}
#: the average pools at 12 bits: at 8 bits the cast after a pool hides a reciprocal one
#: code off (1/9 as 29128 instead of 29127 changes no output here), at 12 it does not
CONFIGS = {"global-avg-6x6": QFXConfig.with_bits(12), "avgpool3": QFXConfig.with_bits(12)}


@functools.cache
def frozen(name: str) -> QGraph:
    return train_and_freeze(MODELS[name], CONFIGS.get(name, QFXConfig()))


def renamed(graph: QGraph, names: dict[str, str]) -> QGraph:
    """``graph`` with its nodes and tensors renamed (same computation)."""
    def n(name):
        return names.get(name, name)

    tensors = {n(k): TensorInfo(n(k), t.shape, t.type) for k, t in graph.tensors.items()}
    nodes = [Node(x.op, n(x.name), [n(i) for i in x.inputs], n(x.output), x.attrs, x.consts,
                  x.source) for x in graph.nodes]
    return QGraph(n(graph.input), n(graph.output), tensors, nodes, graph.meta).validate()


@functools.cache
def clashing() -> QGraph:
    """The unnamed MLP with names that collide with what qflow and hls4ml derive."""
    graph = frozen("sequential-mlp")
    assert [x.name for x in graph.nodes] == ["0", "1", "2", "2_cast", "3"]
    return renamed(graph, {
        "0": "features.0/Flatten",  # characters C++ and hls4ml do not take
        "1": "fc",
        "2": "fc_bias",  # the name of fc's bias layer
        "2_cast": "Fc",  # fc, but for case
        "3": "Dense_fc",  # the name hls4ml gives fc's Dense layer
    })


CELLS = [(m, io) for m in (*MODELS, "clashing-names") for io in IO_TYPES]


@pytest.fixture(scope="module", params=CELLS, ids=[f"{m}-{io}" for m, io in CELLS])
def cell(request, tmp_path_factory) -> Cell:
    """One export and one C simulation per (model, io type) for the whole module."""
    name, io_type = request.param
    graph = clashing() if name == "clashing-names" else frozen(name)
    return export_cell(name, io_type, graph, tmp_path_factory)


def test_csim_equals_emulator(cell):
    mismatches = csim_mismatches(cell)
    assert len(cell.x) >= CORNERS + 500
    assert mismatches == (0, 0)


def test_every_layer_is_read_back_and_maps_to_its_qgraph_node(cell):
    form = hls_graph(cell.graph, cell.io_type)
    report = cell.report
    rows = {row["layer"]: row for row in report["layers"]}
    assert UNSET_PRECISION[:-1] not in json.dumps(report["layers"])
    for onnx_name, precisions in form.precisions.items():
        row = rows[form.layer_names[onnx_name]]  # every layer asked for is there
        assert set(row["types"]) == set(precisions)
        for key, text in precisions.items():
            assert hls_type(row["types"][key]) == hls_type(text), (row["layer"], key)
    # the way back to the QGraph: every node has its layers, every layer its node
    nodes = {n.name for n in cell.graph.nodes}
    mapped = {row["qgraph_node"] for row in rows.values()}
    assert mapped - {""} == nodes | {cell.graph.input}
    inserted = [row for row in rows.values() if not row["qgraph_node"]]
    assert all(row["class"] in ("ZeroPadding2D", "Clone") for row in inserted)
    # every name hls4ml reads is an identifier, distinct ignoring case
    assert all(IDENTIFIER.match(name) for name in rows)
    assert len({name.lower() for name in rows}) == len(rows)
    model = onnx.load(cell.out / "model.hls4ml.onnx")
    names = [n.name for n in model.graph.node] + [t.name for t in model.graph.initializer]
    names += [t for n in model.graph.node for t in (*n.input, *n.output)]
    assert all(IDENTIFIER.match(name) for name in names)


def _average_pools(graph: QGraph) -> list[Node]:
    """Every average pool whose 1/n is not a power of two."""
    out = []
    for node in graph.nodes:
        if node.op == "global_avgpool2d":
            window = int(np.prod(graph.tensors[node.inputs[0]].shape[1:]))
        elif node.op == "avgpool2d":
            window = int(np.prod(node.attrs["kernel"]))
        else:
            continue
        if window & (window - 1):
            out.append(node)
    return out


def test_average_pools_are_fixed_avg_pool_layers_with_their_multipliers(cell):
    report = cell.report
    pools = _average_pools(cell.graph)
    assert bool(pools) == cell.name.startswith(("global-avg", "avgpool"))
    classes = {row["qgraph_node"]: row["class"] for row in report["layers"]}
    assert sorted(n for n, c in classes.items() if c == "FixedAvgPool") == sorted(
        n.name for n in pools)
    estimate = {row["node"]: row for row in report["estimate"]["layers"]}
    for node in pools:
        row = estimate[node.name]
        c, h, w = cell.graph.tensors[node.output].shape
        # one reciprocal product per output of a pass: the whole layer in io_parallel,
        # one pixel (all channels) in io_stream
        per_pass = c if cell.io_type == "io_stream" else c * h * w
        assert row["products"] == row["multipliers"] == per_pass
        assert row["weight_width"] == int(node.consts["reciprocal"]).bit_length()
        assert row["multiplier_kind"] == "dsp" and row["dsp"] == per_pass
        in_shape = cell.graph.tensors[node.inputs[0]].shape
        passes = in_shape[1] * in_shape[2] if cell.io_type == "io_stream" else 1
        assert row["ii"] == passes and row["latency_cycles"] > passes + 3
    assert report["estimate"]["totals"]["dsp"] >= sum(
        estimate[n.name]["dsp"] for n in pools)


# -- without C simulation --------------------------------------------------------------

def test_names_are_escaped_and_kept_apart():
    assert [escape(n) for n in ("fc1", "0", "1_weight", "a.b", "x-y")] == [
        "fc1", "q_0", "q_1_weight", "q_a_b", "q_x_y"]
    namer = Namer()
    assert namer("fc", ("Dense_{}",)) == "fc"
    assert namer("Dense_fc") == "Dense_fc_2"  # hls4ml's name for fc's layer is taken
    assert namer("FC") == "FC_2"  # hls4ml compares lower-cased names
    assert namer("q_0") == "q_0" and namer("0") == "q_0_2"
    assert namer("input") == "input_2"  # hls4ml's reserved name
    assert namer("fc", ("Dense_{}",)) == "fc"  # the same string, the same name


def test_unnamed_sequential_had_digit_names():
    graph = frozen("sequential-mlp")
    form = hls_graph(graph)
    assert {n.name for n in graph.nodes} == {"0", "1", "2", "2_cast", "3"}
    assert set(form.layer_names.values()) == {
        "qflow_input", "q_0", "Dense_q_1", "bn_q_1_bias", "q_2", "q_2_cast_act",
        "Dense_q_3", "bn_q_3_bias"}
    assert form.sources["Dense_q_1"] == form.sources["bn_q_1_bias"] == "1"


def test_flatten_reorders_dense_weights_instead_of_transposing():
    graph = frozen("conv-flatten-linear")
    model = hls_graph(graph).model
    assert "Transpose" not in {n.op_type for n in model.graph.node}
    dense = next(n for n in graph.nodes if n.op == "dense")
    weight = next(t for t in model.graph.initializer if t.name == f"q_{dense.name}_weight")
    columns = onnx.numpy_helper.to_array(weight).T  # MatMul holds (in, out)
    chw = np.ldexp(dense.consts["weight"].astype(np.float64),
                   -dense.consts["weight_frac"][:, None])  # (out, C·H·W), the QGraph's order
    assert np.array_equal(columns, chw[:, hwc_order((4, 8, 8))])
    assert hwc_order((2, 1, 3)).tolist() == [0, 3, 1, 4, 2, 5]


def _with_after_flatten(graph: QGraph, op: str) -> QGraph:
    """A copy of conv-flatten-linear with a ``relu`` between the flatten and the dense."""
    flat = next(n for n in graph.nodes if n.op == "reshape")
    nodes, tensors = [], dict(graph.tensors)
    for node in graph.nodes:
        if node.op == "dense":
            tensors["after"] = TensorInfo("after", graph.tensors[flat.output].shape,
                                          graph.tensors[flat.output].type)
            nodes.append(Node(op, "after", [flat.output], "after"))
            node = Node(node.op, node.name, ["after"], node.output, node.attrs, node.consts)
        nodes.append(node)
    return QGraph(graph.input, graph.output, tensors, nodes, graph.meta).validate()


def test_what_hls4ml_cannot_flatten_exactly_is_refused():
    graph = frozen("conv-flatten-linear")
    relu_between = _with_after_flatten(graph, "relu")
    # io_parallel: the relu keeps the (H, W, C) order, the dense reorders its weights
    assert "Transpose" not in {n.op_type for n in hls_graph(relu_between).model.graph.node}
    # io_stream: hls4ml hands the element-wise layer the unflattened stream
    with pytest.raises(HlsExportError, match=r"node '2' \(reshape\).*io_stream.*'after' \(relu\)"):
        hls_graph(relu_between, "io_stream")
    # a flattened C×H×W tensor that is the graph's output would need a transpose
    flat = next(n for n in graph.nodes if n.op == "reshape")
    head = QGraph(graph.input, flat.output, graph.tensors,
                  graph.nodes[:graph.nodes.index(flat) + 1], graph.meta)
    with pytest.raises(HlsExportError, match=r"node '2' \(reshape\): flattening a 4x8x8"):
        hls_graph(head)
