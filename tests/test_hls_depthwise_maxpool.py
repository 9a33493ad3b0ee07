"""Depthwise convolutions and padded max pooling in the hls4ml export, bit for bit.

- the MobileNet depthwise-separable block (3×3 conv, a depthwise 3×3 conv with
  ``groups`` = channels, a 1×1 conv, BatchNorm, global average): hls4ml's
  DepthwiseConv2D, its types set from the QGraph and read back;
- conv → ReLU → ``MaxPool2d(3, stride=2, padding=1)`` (the ResNet stem) and a padded max
  pool on signed values (conv → BatchNorm → depthwise conv with bias → max pool, no ReLU),
  where zero padding would win over negative windows: qflow's FixedMaxPool layer, in
  which padded positions never take part;
- ``hls/qflow_max_pool.h`` on its own, compiled with g++ for window geometries the models
  do not reach (output rows cut by the bottom edge, windows larger than the image, ...);
- the resource estimate of both layers and what stays refused.

Each model is exported for the Ultra96 in io_parallel and io_stream once per module
(fixtures) and its C simulation run on the digits test set plus 512 corner cases,
sample by sample against the emulator.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hls_models import (
    CORNERS,
    IO_TYPES,
    ULTRA96,
    Cell,
    csim_mismatches,
    export_cell,
    hls_type,
    inputs,
    train_and_freeze,
)
from torch import nn

from qflow.export.hls import HlsExportError
from qflow.export.hls.convert import UNSET_PRECISION
from qflow.export.hls.estimate import dsp_per_product, estimate_resources
from qflow.export.hls.max_pool import pooled_size
from qflow.export.hls.onnx_graph import hls_graph
from qflow.graph import Emulator
from qflow.graph.ir import Node, QGraph, TensorInfo
from qflow.numerics import FixedType, to_codes

ROOT = Path(__file__).resolve().parent.parent

#: name -> factory; every model reads 1×8×8 digits
MODELS = {
    "mobilenet-block": lambda: nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)),
    "maxpool-padding": lambda: nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),  # 8×8 -> 4×4
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10)),
    # no ReLU before the pool: negative values meet the padding (and a depthwise
    # convolution with a bias feeds it)
    "signed-maxpool-padding": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 10)),
}


@functools.cache
def frozen(name: str) -> QGraph:
    return train_and_freeze(MODELS[name])


def depthwise_nodes(graph: QGraph) -> list[Node]:
    return [n for n in graph.nodes if n.op == "conv2d" and n.attrs["groups"] > 1]


def padded_pools(graph: QGraph) -> list[Node]:
    return [n for n in graph.nodes if n.op == "maxpool2d" and any(n.attrs["padding"])]


CELLS = [(m, io) for m in MODELS for io in IO_TYPES]


@pytest.fixture(scope="module", params=CELLS, ids=[f"{m}-{io}" for m, io in CELLS])
def cell(request, tmp_path_factory) -> Cell:
    """One export and one C simulation per (model, io type) for the whole module."""
    name, io_type = request.param
    return export_cell(name, io_type, frozen(name), tmp_path_factory)


def test_csim_equals_emulator(cell):
    mismatches = csim_mismatches(cell)
    assert len(cell.x) >= CORNERS + 500
    assert mismatches == (0, 0)


def test_layers_are_hls4ml_depthwise_and_qflow_max_pool_with_their_types(cell):
    report = cell.report
    assert UNSET_PRECISION[:-1] not in json.dumps(report["layers"])
    form = hls_graph(cell.graph, cell.io_type)
    rows = {row["layer"]: row for row in report["layers"]}
    for onnx_name, precisions in form.precisions.items():
        row = rows[form.layer_names[onnx_name]]
        assert {k: hls_type(v) for k, v in row["types"].items()} == {
            k: hls_type(v) for k, v in precisions.items()}, row["layer"]
    by_node: dict[str, list[str]] = {}
    for row in rows.values():
        by_node.setdefault(row["qgraph_node"], []).append(row["class"])
    depthwise, pools = depthwise_nodes(cell.graph), padded_pools(cell.graph)
    assert bool(depthwise) == (cell.name != "maxpool-padding")
    assert bool(pools) == (cell.name != "mobilenet-block")
    for node in depthwise:
        assert by_node[node.name] == ["DepthwiseConv2D"]
        row = next(r for r in rows.values() if r["qgraph_node"] == node.name)
        # every type of the layer is the QGraph's: the accumulator is the exact sum
        assert set(row["types"]) == {"weight", "bias", "accum", "result"}
        out_t = cell.graph.tensors[node.output].type
        assert hls_type(row["types"]["accum"]) == hls_type(out_t.to_hls4ml())
    for node in pools:
        assert by_node[node.name] == ["FixedMaxPool"]
    # hls4ml inserts only data movers (io_stream: ZeroPadding2D before padded convs)
    inserted = {row["class"] for row in rows.values() if not row["qgraph_node"]}
    assert inserted <= {"ZeroPadding2D", "Clone"}


def _zero_padded_max(x: np.ndarray, node: Node) -> np.ndarray:
    """Max pooling of codes ``x`` (N, C, H, W) with zeros in the padding."""
    (kh, kw), (sh, sw), (ph, pw) = (node.attrs[k] for k in ("kernel", "stride", "padding"))
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, c, h, w = padded.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = np.full((n, c, oh, ow), np.iinfo(np.int64).min)
    for i in range(kh):
        for j in range(kw):
            out = np.maximum(out, padded[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw])
    return out


def test_negative_values_meet_the_padding():
    """In the signed model zero padding would change the pool's output on most samples:
    the C simulation above being exact proves that padding never wins there."""
    graph = frozen("signed-maxpool-padding")
    (pool,) = padded_pools(graph)
    assert graph.tensors[pool.inputs[0]].type.signed
    x = inputs(graph)
    tensors = Emulator(graph, arithmetic="int64").run_codes(to_codes(x, graph.input_type),
                                                            keep=True)
    exact, zero_padded = tensors[pool.output], _zero_padded_max(tensors[pool.inputs[0]], pool)
    differs = (exact != zero_padded).reshape(len(x), -1).any(axis=1)
    print(f"zero padding would change {differs.sum()} of {len(x)} samples")
    assert differs.sum() > len(x) // 4, differs.sum()


# -- the resource estimate -----------------------------------------------------------

def _estimate(graph: QGraph, io_type: str):
    return estimate_resources(graph, ULTRA96, io_type=io_type, reuse_factor=1,
                              strategy="Latency")


@pytest.mark.parametrize("io_type", IO_TYPES)
def test_estimate_counts_one_multiplier_per_channel_per_tap_of_a_depthwise_conv(io_type):
    graph = frozen("mobilenet-block")
    (node,) = depthwise_nodes(graph)
    rows = {x.node: x for x in _estimate(graph, io_type).layers}
    row = rows[node.name]
    weight = node.consts["weight"]
    channels, _, kh, kw = weight.shape
    assert weight.shape[1] == 1 and channels == 8
    zeros = int((weight == 0).sum())
    assert row.products == channels * kh * kw == 72  # not kh·kw·C·C = 576
    assert row.multipliers == row.products - zeros
    # the pointwise 1×1 conv that follows: C_in·C_out products
    pointwise = next(n for n in graph.nodes if n.op == "conv2d" and n.name != node.name
                     and n.consts["weight"].shape[2:] == (1, 1))
    assert rows[pointwise.name].products == 8 * 16
    # the existing width rule: 8-bit activations × the weight code width, one DSP48E2 each
    a_type = graph.tensors[node.inputs[0]].type
    assert row.activation_width == a_type.width
    assert row.multiplier_kind == "dsp"
    assert row.dsp == row.multipliers * dsp_per_product(
        a_type.width, a_type.signed, row.weight_width, bool((weight < 0).any()), "DSP48E2")
    # cycles: one output pixel per step (io_parallel), one padded input pixel (io_stream)
    assert row.ii == (64 if io_type == "io_parallel" else 10 * 10)
    assert row.latency_cycles > row.ii


@pytest.mark.parametrize("io_type", IO_TYPES)
def test_estimate_counts_the_comparators_of_a_padded_max_pool(io_type):
    graph = frozen("maxpool-padding")
    (node,) = padded_pools(graph)
    row = next(x for x in _estimate(graph, io_type).layers if x.node == node.name)
    chans, h, w = graph.tensors[node.inputs[0]].shape
    width = graph.tensors[node.output].type.width
    assert (chans, h, w) == (8, 8, 8) and row.dsp == 0 and row.products == 0
    if io_type == "io_parallel":
        # padded positions are never compared: windows at the border hold 2×2, 2×3, 3×2
        # values, the others 3×3; one comparator fewer than values per output
        values = [len([1 for i in range(3) for j in range(3)
                       if 0 <= 2 * oh - 1 + i < h and 0 <= 2 * ow - 1 + j < w])
                  for oh in range(4) for ow in range(4)]
        assert sorted(set(values)) == [4, 6, 9]
        assert row.lut == chans * sum(v - 1 for v in values) * width
        assert row.ii == 1
    else:
        # one pixel per cycle; the last 3 input rows in registers
        assert row.ii == h * w
        assert row.ff >= 3 * w * chans * graph.tensors[node.inputs[0]].type.width
        assert row.lut >= chans * 8 * width


def test_report_estimate_has_the_new_layers(cell):
    rows = {row["node"]: row for row in cell.report["estimate"]["layers"]}
    for node in depthwise_nodes(cell.graph):
        c = node.consts["weight"].shape[0]
        assert rows[node.name]["products"] == c * 9
    for node in padded_pools(cell.graph):
        assert rows[node.name]["lut"] > 0 and rows[node.name]["latency_cycles"] > 0


# -- the max pool header on its own ----------------------------------------------------

#: (H, W, C, kernel, stride, padding, signed): output rows cut by the bottom edge (4×4,
#: k3 s1 p1: rows 2 and 3 both end on input row 3), windows wider than the image, strides
#: that leave input rows unread, non-square kernels, strides and padding
GEOMETRIES = [
    (8, 8, 3, (3, 3), (2, 2), (1, 1), True),
    (8, 8, 2, (3, 3), (2, 2), (1, 1), False),
    (4, 4, 2, (3, 3), (1, 1), (1, 1), True),
    (5, 5, 1, (2, 2), (2, 2), (1, 1), True),
    (7, 6, 2, (3, 3), (3, 3), (1, 1), True),
    (6, 6, 1, (5, 5), (1, 1), (2, 2), True),
    (5, 7, 2, (3, 2), (2, 1), (1, 1), True),
    (6, 5, 1, (3, 3), (1, 2), (1, 0), True),
    (2, 2, 2, (3, 3), (1, 1), (1, 1), True),
    (1, 4, 1, (2, 3), (1, 2), (1, 1), True),
    (9, 9, 2, (4, 4), (3, 2), (2, 1), False),
]
SAMPLES = 64


def _hls4ml_templates() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("hls4ml")
    assert spec is not None and spec.submodule_search_locations, "hls4ml is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "templates" / "vivado"


def _pool_graph(h, w, c, kernel, stride, padding, signed) -> QGraph:
    t = FixedType.from_width(8, 3, signed=signed)
    out = (c, pooled_size(h, kernel[0], stride[0], padding[0], padding[0]),
           pooled_size(w, kernel[1], stride[1], padding[1], padding[1]))
    node = Node("maxpool2d", "pool", ["x"], "pool", attrs={
        "kernel": list(kernel), "stride": list(stride), "padding": list(padding),
        "dilation": [1, 1], "ceil_mode": False})
    tensors = {"x": TensorInfo("x", (c, h, w), t), "pool": TensorInfo("pool", out, t)}
    return QGraph("x", "pool", tensors, [node]).validate()


def test_max_pool_header_equals_the_emulator_on_many_geometries(tmp_path):
    gxx = shutil.which("g++")
    assert gxx, "g++ is needed to compile hls/qflow_max_pool.h"
    templates = _hls4ml_templates()
    macro = " ".join(
        f"GEOMETRY({h},{w},{c},{k[0]},{k[1]},{s[0]},{s[1]},{p[0]},{p[1]},"
        f"{pooled_size(h, k[0], s[0], p[0], p[0])},{pooled_size(w, k[1], s[1], p[1], p[1])},"
        f"{int(sg)})" for h, w, c, k, s, p, sg in GEOMETRIES)
    exe = tmp_path / "max_pool"
    done = subprocess.run(
        [gxx, "-std=c++14", "-O1", "-w", "-isystem", str(templates / "ap_types"),
         "-I", str(templates / "nnet_utils"), "-I", str(ROOT / "hls"),
         f"-DMAX_POOL_GEOMETRIES={macro}", str(ROOT / "tests" / "cpp" / "max_pool.cpp"),
         "-o", str(exe)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rng = np.random.default_rng(0)
    graphs, codes = [], []
    with open(tmp_path / "in.bin", "wb") as fh:
        for h, w, c, k, s, p, sg in GEOMETRIES:
            graph = _pool_graph(h, w, c, k, s, p, sg)
            t = graph.input_type
            q = rng.integers(t.qmin, t.qmax + 1, size=(SAMPLES, c, h, w))
            if sg:  # every value negative in a quarter of the samples
                q[: SAMPLES // 4] = np.maximum(-np.abs(q[: SAMPLES // 4]) - 1, t.qmin)
            graphs.append(graph)
            codes.append(q)
            fh.write(np.array([SAMPLES], np.int64).tobytes())
            fh.write(np.ascontiguousarray(q.transpose(0, 2, 3, 1), np.int64).tobytes())
    done = subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.split("\n")
    got = np.fromfile(tmp_path / "out.bin", np.int64)
    at, bad = 0, []
    for i, (graph, q) in enumerate(zip(graphs, codes, strict=True)):
        # the stream code reads every input pixel and writes every output pixel, once
        assert lines[i].split()[-1] == "0", (GEOMETRIES[i], lines[i])
        want = Emulator(graph, arithmetic="int64").run_codes(q)
        n = want.size
        for io_type in IO_TYPES:
            out = got[at:at + n].reshape(want.shape[0], *want.shape[2:], want.shape[1])
            at += n
            mismatching = int((out.transpose(0, 3, 1, 2) != want)
                              .reshape(SAMPLES, -1).any(axis=1).sum())
            if mismatching:
                bad.append((GEOMETRIES[i], io_type, mismatching))
    assert at == got.size
    assert bad == []


# -- what stays refused ----------------------------------------------------------------

def _conv_graph(channels: int, out_channels: int, groups: int) -> QGraph:
    t = FixedType.from_width(8, 3, signed=True)
    weight = np.arange(out_channels * (channels // groups) * 9, dtype=np.int64).reshape(
        out_channels, channels // groups, 3, 3) % 7 - 3
    node = Node("conv2d", "conv", ["x"], "conv", attrs={
        "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": groups},
        consts={"weight": weight, "weight_frac": np.full(out_channels, 4, np.int64)})
    acc = FixedType.from_width(24, 12, signed=True)
    tensors = {"x": TensorInfo("x", (channels, 6, 6), t),
               "conv": TensorInfo("conv", (out_channels, 6, 6), acc)}
    return QGraph("x", "conv", tensors, [node])


def _one_line(excinfo, *words: str) -> None:
    text = str(excinfo.value)
    assert "\n" not in text
    for word in words:
        assert word in text, (word, text)


def test_grouped_convolutions_other_than_depthwise_are_refused():
    hls_graph(_conv_graph(4, 4, 4))  # depthwise: exported
    for channels, out_channels, groups in ((4, 4, 2), (4, 8, 4)):
        with pytest.raises(HlsExportError) as excinfo:
            hls_graph(_conv_graph(channels, out_channels, groups))
        _one_line(excinfo, "'conv'", "conv2d", f"groups={groups}")


def test_depthwise_under_the_resource_strategy_is_refused():
    for io_type in IO_TYPES:
        with pytest.raises(HlsExportError) as excinfo:
            hls_graph(_conv_graph(4, 4, 4), io_type, "Resource")
        _one_line(excinfo, "'conv'", "conv2d", "Resource")


def test_max_pool_padding_beyond_half_the_kernel_is_refused():
    graph = _pool_graph(6, 6, 1, (3, 3), (1, 1), (1, 1), True)
    ops = {n.op_type for n in hls_graph(graph).model.graph.node}
    assert ops == {"FixedMaxPool"}
    graph.nodes[0].attrs["padding"] = [2, 1]
    with pytest.raises(HlsExportError) as excinfo:
        hls_graph(graph)
    _one_line(excinfo, "'pool'", "maxpool2d", "padding")
