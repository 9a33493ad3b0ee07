"""Models written the way users write them: ``F.relu``, ``torch.flatten``,
``x.view(x.size(0), -1)``, ``out + identity``, ``torch.cat``, ``F.max_pool2d``,
``x.mean((2, 3))`` in ``forward``. ``quantize_`` turns these into qflow modules named
after where they are; QAT eval equals the emulator and every artifact (integer ONNX,
QONNX, TVM, hls4ml C simulation) bit for bit; what has no exact form is refused."""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qflow
from qflow.api import describe
from qflow.config import LayerOverride, QFXConfig, QuantSpec, SpecOverride
from qflow.errors import ConfigError, QflowError
from qflow.graph import Emulator, QGraph
from qflow.graph.from_torch import FreezeError
from qflow.graph.ir import Node, QGraphError, TensorInfo
from qflow.nn import QAdaptiveAvgPool2d, QAdd, QAvgPool2d, QCat, QMaxPool2d, QReLU
from qflow.numerics import FixedType, to_codes
from qflow.numerics.corners import corner_inputs
from qflow.train import fit

CONFIGS = {
    "8bit": QFXConfig(),
    "4bit_trn_wrap": dataclasses.replace(
        QFXConfig.with_bits(4),
        activation=QuantSpec(bits=4, rounding="TRN", overflow="WRAP"),
        intermediate=QuantSpec(bits=10, signed=True, rounding="TRN", overflow="WRAP")),
}


# -- the models ------------------------------------------------------------------------------
class FlattenNet(nn.Module):
    """conv -> F.relu -> torch.flatten -> fc -> torch.relu -> fc."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


class ViewNet(nn.Module):
    """conv -> x.relu() -> F.avg_pool2d -> x.view(x.size(0), -1) -> fc."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = F.avg_pool2d(self.conv(x).relu(), 2)
        return self.fc(x.view(x.size(0), -1))


class Block(nn.Module):
    """A residual block with a 1x1 projection shortcut: out = F.relu(out + identity)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        identity = self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNetish(nn.Module):
    """stem (F.relu in place) -> Block -> F.max_pool2d -> x.mean((2, 3)) -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(Block(4, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)), inplace=True)
        x = F.max_pool2d(self.layer1(x), 2)
        return self.fc(x.mean((2, 3)))


class CatNet(nn.Module):
    """Two conv branches joined by torch.cat (one signed, one after a ReLU), max pooling,
    a three-way torch.cat with a negative dim, global pooling, fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 2, 1)
        self.d = nn.Conv2d(8, 2, 3, padding=1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.cat([self.a(x), F.relu(self.b(x))], dim=1)
        y = F.max_pool2d(y, 2)
        z = torch.cat((y, F.relu(self.c(y)), self.d(y)), -3)
        z = F.adaptive_avg_pool2d(z, 1)
        return self.fc(torch.flatten(z, 1))


MODELS = {"flatten": FlattenNet, "view": ViewNet, "resnet": ResNetish, "cat": CatNet}
#: the modules quantize_ adds: layer name -> type
NEW_MODULES = {
    "flatten": {"relu": QReLU, "relu_1": QReLU},
    "view": {"relu": QReLU, "avgpool": QAvgPool2d},
    "resnet": {"relu": QReLU, "maxpool": QMaxPool2d, "gap": QAdaptiveAvgPool2d,
               "layer1.0.add": QAdd, "layer1.0.relu_1": QReLU},
    "cat": {"relu": QReLU, "relu_1": QReLU, "cat": QCat, "maxpool": QMaxPool2d,
            "relu_2": QReLU, "cat_1": QCat, "gap": QAdaptiveAvgPool2d},
}


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generated 1x8x8 inputs, labels from a fixed random projection (3 classes)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    w = np.random.default_rng(99).normal(size=(64, 3))
    return x, (x.reshape(n, -1) @ w).argmax(axis=1).astype(np.int64)


def _build(name: str, config_name: str = "8bit", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return qflow.quantize_(MODELS[name](), CONFIGS[config_name])


@functools.cache
def _trained(name: str, config_name: str = "8bit"):
    """(model, graph): quantized, trained briefly, frozen."""
    model = _build(name, config_name)
    x, y = _data(512, 0)
    fit(model, x, y, epochs=2, lr=3e-3, batch_size=64, progress=False)
    graph = qflow.freeze(model, torch.as_tensor(x[:4]))
    return model, graph


def _inputs(graph: QGraph, n: int = 1000) -> np.ndarray:
    x, _ = _data(n, 1)
    x = np.concatenate([x.astype(np.float64), 3 * x[: n // 4].astype(np.float64)])
    return np.concatenate([x, corner_inputs(graph.input_type, x.shape[1:], 256)])


def _qat_codes(model: nn.Module, graph: QGraph, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        y = model.eval()(torch.as_tensor(x)).numpy()
    scaled = np.ldexp(y, graph.output_type.fractional)
    assert np.array_equal(scaled, np.rint(scaled)), "QAT output is off the output grid"
    return scaled.astype(np.int64)


def _mismatches(got: np.ndarray, want: np.ndarray) -> int:
    assert got.shape == want.shape, (got.shape, want.shape)
    return int((got != want).reshape(len(got), -1).any(axis=1).sum())


# -- conversion --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_functional_ops_become_named_qflow_modules(name):
    model = MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every forward here traces
        assert qflow.quantize_(model, QFXConfig()) is model
    original = {n for n, _ in MODELS[name]().named_modules()}
    added = {n: type(m) for n, m in model.named_modules()
             if n not in original and n != "qflow_input" and hasattr(m, "qflow_name")}
    assert added == NEW_MODULES[name]
    for layer in NEW_MODULES[name]:
        assert model.get_submodule(layer).qflow_name == layer
    assert isinstance(model, MODELS[name])  # the same object, a subclass of its class
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 3)


class Spelled(nn.Module):
    """Two conv branches a, b; ``op(a, b)``; flattened."""

    def __init__(self, op):
        super().__init__()
        self.conv_a = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(1, 4, 1)
        self.op = op

    def forward(self, x):
        return torch.flatten(self.op(self.conv_a(x), self.conv_b(x)), 1)


#: how users write each op -> (the op, the module it becomes)
SPELLINGS = {
    "F.relu": (lambda a, b: F.relu(a), QReLU),
    "F.relu(inplace=True)": (lambda a, b: F.relu(a, inplace=True), QReLU),
    "torch.relu": (lambda a, b: torch.relu(a), QReLU),
    "torch.relu_": (lambda a, b: torch.relu_(a), QReLU),
    "Tensor.relu": (lambda a, b: a.relu(), QReLU),
    "Tensor.relu_": (lambda a, b: a.relu_(), QReLU),
    "a + b": (lambda a, b: a + b, QAdd),
    "torch.add": (lambda a, b: torch.add(a, b), QAdd),
    "Tensor.add": (lambda a, b: a.add(b), QAdd),
    "Tensor.add_": (lambda a, b: a.add_(b), QAdd),
    "torch.cat dim=1": (lambda a, b: torch.cat([a, b], dim=1), QCat),
    "torch.concat dim=-3": (lambda a, b: torch.concat((a, b), -3), QCat),
    "F.max_pool2d": (lambda a, b: F.max_pool2d(a, 2), QMaxPool2d),
    "torch.max_pool2d": (lambda a, b: torch.max_pool2d(a, 3, 1, 1), QMaxPool2d),
    "F.avg_pool2d": (lambda a, b: F.avg_pool2d(a, 2, stride=2), QAvgPool2d),
    "F.adaptive_avg_pool2d": (lambda a, b: F.adaptive_avg_pool2d(a, (1, 1)), QAdaptiveAvgPool2d),
    "Tensor.mean((2, 3))": (lambda a, b: a.mean((2, 3)), QAdaptiveAvgPool2d),
    "torch.mean(dim=(-2, -1), keepdim)": (lambda a, b: torch.mean(a, dim=(-2, -1), keepdim=True),
                                          QAdaptiveAvgPool2d),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_every_spelling_converts_and_freezes_exactly(spelling):
    op, kind = SPELLINGS[spelling]
    torch.manual_seed(0)
    model = qflow.quantize_(Spelled(op), QFXConfig())
    new = [m for n, m in model.named_children() if n not in ("conv_a", "conv_b", "qflow_input")]
    assert [type(m) for m in new] == [kind]
    x, _ = _data(64, 5)
    model(torch.as_tensor(x))  # training mode: initializes the quantizers
    graph = qflow.freeze(model, torch.as_tensor(x[:4]))
    xs = _inputs(graph, 200)
    assert _mismatches(Emulator(graph).run(xs), _qat_codes(model, graph, xs)) == 0


def test_names_follow_the_owner_and_avoid_existing_attributes():
    model = _build("resnet")
    block = model.layer1[0]
    # Block already has a module called ``relu``: the functional one is ``relu_1``
    assert isinstance(block.relu, QReLU) and block.relu.qflow_name == "layer1.0.relu"
    assert isinstance(block.relu_1, QReLU) and isinstance(block.add, QAdd)
    assert isinstance(block, Block) and type(block) is not Block
    assert "self.add(" in type(block).qflow_traced_forward
    assert type(model.layer1) is nn.Sequential  # nothing functional: left as it is


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_qat_eval_equals_emulator(name, config_name):
    model, graph = _trained(name, config_name)
    x = _inputs(graph)
    want = _qat_codes(model, graph, x)
    ran = []
    for arithmetic in ("float32", "float64", "int64"):
        try:
            emulator = Emulator(graph, arithmetic)
        except QGraphError:
            continue
        bad = _mismatches(emulator.run(x), want)
        print(f"{name} {config_name} {arithmetic}: {bad} of {len(x)} samples differ")
        assert bad == 0
        ran.append(arithmetic)
    assert "int64" in ran and len(want) > 1000


def test_functional_relu_output_is_in_the_activation_format():
    model, graph = _trained("resnet")
    rows = {(r.layer, r.tensor): r for r in describe(model)}
    reference = rows[("layer1.0.relu", "output")]  # the nn.ReLU module
    for layer in ("relu", "layer1.0.relu_1"):
        row = rows[(layer, "output")]
        assert (row.width, row.signed, row.rounding, row.overflow) == (
            8, False, reference.rounding, reference.overflow)
        t = model.get_submodule(layer).out_quant.fixed_type()
        node = next(n for n in graph.nodes if n.op == "cast" and n.source == layer)
        assert graph.tensors[node.output].type == t and t.width == 8 and not t.signed
    assert rows[("layer1.0.add", "output")].width == 16  # intermediate
    concat = _trained("cat")[0]
    cat_rows = {(r.layer, r.tensor): r for r in describe(concat)}
    assert cat_rows[("cat", "output")].width == cat_rows[("cat_1", "output")].width == 8


def test_graph_has_concat_nodes_with_cast_inputs():
    _, graph = _trained("cat")
    concats = [n for n in graph.nodes if n.op == "concat"]
    assert [len(n.inputs) for n in concats] == [2, 3]
    for node in concats:
        out = graph.tensors[node.output].type
        assert all(graph.tensors[i].type == out for i in node.inputs)
        assert graph.tensors[node.output].shape[0] == sum(
            graph.tensors[i].shape[0] for i in node.inputs)


def test_state_dict_names_are_deterministic_and_a_checkpoint_loads():
    trained, _ = _trained("resnet")
    fresh = _build("resnet", seed=7)
    assert list(fresh.state_dict()) == list(trained.state_dict())
    assert "layer1.0.relu_1.out_quant.integer_bits" in fresh.state_dict()
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.as_tensor(_data(64, 3)[0], dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), trained.eval()(x))


def test_deepcopy_keeps_the_converted_forward():
    model, graph = _trained("cat")
    clone = copy.deepcopy(model)
    assert type(clone) is type(model) and clone.cat is not model.cat
    x = _inputs(graph, 200)
    assert np.array_equal(_qat_codes(clone, graph, x), _qat_codes(model, graph, x))
    with torch.no_grad():
        clone.fc.weight.add_(1.0)  # the copy owns its parameters
    assert not torch.equal(clone.fc.weight, model.fc.weight)
    frozen = qflow.freeze(clone, torch.as_tensor(x[:4]))
    assert _mismatches(Emulator(frozen).run(x), _qat_codes(clone, frozen, x)) == 0


def test_hooks_and_direct_submodule_calls_keep_working():
    model = ResNetish()
    calls = []
    model.layer1[0].register_forward_hook(lambda m, a, out: calls.append(out.shape))
    qflow.quantize_(model, QFXConfig())
    model(torch.randn(3, 1, 8, 8))
    assert calls == [(3, 8, 8, 8)]
    block = model.layer1[0].eval()
    out = block(torch.rand(2, 4, 8, 8, dtype=torch.float64)).detach().numpy()
    t = block.relu_1.out_quant.fixed_type()  # the block's output is the functional ReLU's
    assert np.array_equal(np.ldexp(to_codes(out, t).astype(np.float64), -t.fractional), out)


def test_input_quantizer_runs_for_positional_and_keyword_input():
    model, graph = _trained("flatten")
    x = _inputs(graph, 64)[:64]
    with torch.no_grad():
        by_keyword = model.eval()(x=torch.as_tensor(x)).numpy()
    assert np.array_equal(np.ldexp(by_keyword, graph.output_type.fractional),
                          Emulator(graph).run(x))


def test_overrides_reach_the_new_modules_by_name():
    config = QFXConfig(overrides=(
        LayerOverride(pattern="layer1.0.relu_1", activation=SpecOverride(bits=4)),
        LayerOverride(pattern="layer1\\.0\\.add", intermediate=SpecOverride(bits=12)),
        LayerOverride(pattern="gap", activation=SpecOverride(bits=6)),
    ))
    torch.manual_seed(0)
    model = qflow.quantize_(ResNetish(), config)
    block = model.layer1[0]
    assert block.relu_1.out_quant.spec.bits == 4
    assert block.relu.out_quant.spec.bits == 8 and model.relu.out_quant.spec.bits == 8
    assert block.add.out_quant.spec.bits == 12 and model.gap.out_quant.spec.bits == 6
    missing = QFXConfig(overrides=(
        LayerOverride(pattern="layer1.0.relu_9", activation=SpecOverride(bits=4)),))
    with pytest.raises(ConfigError, match=r"layer1\.0\.relu_1"):  # the names it could reach
        qflow.quantize_(ResNetish(), missing)


def test_fold_batchnorm_on_a_functional_model():
    torch.manual_seed(0)
    model = qflow.quantize_(ResNetish(), QFXConfig(fold_batchnorm=True))
    assert isinstance(model.bn, nn.Identity) and isinstance(model.layer1[0].bn2, nn.Identity)
    assert model.stem.folded_bn is not None
    x, y = _data(256, 0)
    fit(model, x, y, epochs=1, lr=3e-3, progress=False)
    graph = qflow.freeze(model, torch.as_tensor(x[:4]))
    assert not any(n.op == "scale_shift" for n in graph.nodes)
    xs = _inputs(graph, 300)
    assert _mismatches(Emulator(graph).run(xs), _qat_codes(model, graph, xs)) == 0


def test_qgraph_with_concat_saves_and_loads(tmp_path):
    _, graph = _trained("cat")
    loaded = QGraph.load(graph.save(tmp_path / "cat.qgraph"))
    x = _inputs(graph, 100)
    assert np.array_equal(Emulator(loaded).run(x), Emulator(graph).run(x))


def _concat_graph(types: list[FixedType]) -> QGraph:
    tensors = {"x": TensorInfo("x", (2, 3), types[0])}
    nodes, names = [], []
    for i, t in enumerate(types):
        tensors[f"c{i}"] = TensorInfo(f"c{i}", (2, 3), t)
        nodes.append(Node("cast", f"c{i}", ["x"], f"c{i}"))
        names.append(f"c{i}")
    from qflow.graph.infer import infer_concat

    out = infer_concat(types)
    tensors["cat"] = TensorInfo("cat", (2 * len(types), 3), out)
    nodes.append(Node("concat", "cat", names, "cat", {"axis": 0}))
    return QGraph("x", "cat", tensors, nodes).validate()


def test_concat_of_different_types_aligns_codes(tmp_path):
    from qflow.export.int_onnx import export_int_onnx, run_int_onnx

    a = FixedType(signed=True, integer=2, fractional=3)
    b = FixedType(signed=False, integer=4, fractional=1)
    c = FixedType(signed=True, integer=0, fractional=6, rounding="TRN", overflow="WRAP")
    graph = _concat_graph([a, b, c])
    out = graph.output_type
    assert (out.fractional, out.signed) == (6, True) and out.int_width >= 5
    x = corner_inputs(a, (2, 3), 400)
    codes = to_codes(x, a)
    got = Emulator(graph, "int64").run_codes(codes)
    for i, t in enumerate((a, b, c)):  # every part is its cast, moved to 2**-6
        part = got[:, 2 * i:2 * i + 2]
        want = Emulator(graph, "int64").run_codes(codes, keep=True)[f"c{i}"]
        assert np.array_equal(part, want << (6 - t.fractional))
    for arithmetic in ("float32", "float64"):
        assert np.array_equal(Emulator(graph, arithmetic).run_codes(codes), got)
    path = export_int_onnx(graph, tmp_path / "cat.int.onnx")
    assert _mismatches(run_int_onnx(path, codes), got) == 0
    with pytest.raises(QGraphError, match="at least one input"):
        QGraph("x", "cat", graph.tensors, [*graph.nodes[:-1], Node(
            "concat", "cat", [], "cat", {"axis": 0})]).validate()


# -- artifacts of the concat model ----------------------------------------------------------
def test_int_onnx_and_qonnx_equal_the_emulator(tmp_path):
    pytest.importorskip("qonnx")
    from qflow.export.int_onnx import export_int_onnx, export_routes, run_int_onnx
    from qflow.export.qonnx import export_qonnx, run_qonnx

    _, graph = _trained("cat")
    x = _inputs(graph)
    want = Emulator(graph).run(x)
    path = export_int_onnx(graph, tmp_path / "model.int.onnx")
    assert export_routes(path)["cat"].startswith("Concat(")
    bad = _mismatches(run_int_onnx(path, to_codes(x, graph.input_type)), want)
    print(f"integer ONNX: {bad} of {len(x)} samples differ")
    assert bad == 0
    path = export_qonnx(graph, tmp_path / "model.qonnx.onnx")
    bad = _mismatches(run_qonnx(path, x), want)
    print(f"QONNX: {bad} of {len(x)} samples differ")
    assert bad == 0


def test_tvm_cpu_build_equals_the_emulator(tmp_path):
    pytest.importorskip("tvm")
    from qflow.export import ExportOptions, export
    from qflow.export.tvm import run_tvm
    from qflow.targets import load_target

    _, graph = _trained("cat")
    artifacts = export(graph, tmp_path, load_target("cpu"), ExportOptions())
    x = _inputs(graph)
    bad = _mismatches(run_tvm(tmp_path / artifacts["tvm"], graph, x), Emulator(graph).run(x))
    print(f"TVM cpu: {bad} of {len(x)} samples differ")
    assert bad == 0


@pytest.fixture(scope="module")
def hls_project(tmp_path_factory):
    """The concat model's hls4ml project, built once (io_stream: the two- and three-way
    concatenations stream pixel by pixel)."""
    pytest.importorskip("hls4ml")
    from qflow.export import ExportOptions
    from qflow.export.hls import export_hls
    from qflow.targets import load_target

    _, graph = _trained("cat")
    out = tmp_path_factory.mktemp("cat-hls")
    export_hls(graph, out, load_target("ultra96"), ExportOptions(io_type="io_stream"))
    return out, graph


@pytest.mark.slow
def test_hls_csim_equals_the_emulator(hls_project):
    import json

    from qflow.export.hls import run_csim

    out, graph = hls_project
    layers = {row["layer"]: row for row in json.loads((out / "report.json").read_text())[
        "layers"]}
    assert layers["cat"]["class"] == "Concatenate" and layers["cat_1"]["class"] == "Concatenate"
    x = _inputs(graph, 500)
    bad = _mismatches(run_csim(out / "hls", graph, x), Emulator(graph).run(x))
    print(f"hls4ml C simulation: {bad} of {len(x)} samples differ")
    assert bad == 0


# -- refusals ----------------------------------------------------------------------------------
class Inner(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.op = op

    def forward(self, x):
        return self.op(self, self.fc(x))


class Outer(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.inner = Inner(op)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(x))


REFUSED = {
    "sigmoid": (lambda m, y: torch.sigmoid(y),
                r"no exact fixed-point form for 'sigmoid' in inner \(call_function "
                r"torch\.sigmoid\)"),
    "product": (lambda m, y: y * y,
                r"no exact fixed-point form for 'mul' in inner \(call_function operator\.mul\)"),
    "scalar_add": (lambda m, y: y + 1.0,
                   r"'add' in inner \(call_function operator\.add\): its second operand is "
                   r"a Python float \(1\.0\)"),
    "parameter_add_in_place": (lambda m, y: y.add_(m.scale),
                               r"'add_' in inner \(call_method add_\): its second operand "
                               r"is the parameter .*'scale'"),
    "gelu_form": (lambda m, y: F.gelu(y, approximate="cubic"),
                  r"'gelu' in inner \(call_function torch\.nn\.functional\.gelu\): "
                  r"approximate='cubic'"),
    "mean_batch": (lambda m, y: y.mean(0),
                   r"'mean' in inner \(call_method mean\): a mean over dims 0"),
    "cat_batch": (lambda m, y: torch.cat([y, y]), r"'cat' in inner .*along dim 0"),
    "in_place_mul": (lambda m, y: y.mul_(2), r"no exact fixed-point form for 'mul_' in inner"),
    "in_place_relu_read_twice": (lambda m, y: F.relu(y, inplace=True) + y,
                                 r"'relu' in inner .*also read elsewhere"),
    "slice_batch": (lambda m, y: y[:2], r"'getitem' in inner \(call_function operator\.getitem\): "
                                        r"indexing with .* selects along the batch dim"),
    "max_pool_indices": (lambda m, y: F.max_pool2d(y, 2, return_indices=True)[0],
                         r"no exact fixed-point form for 'max_pool2d_with_indices' in inner"),
}


def _snapshot(model: nn.Module):
    return (type(model), [(n, type(m)) for n, m in model.named_modules()],
            list(model.state_dict()), hasattr(model, "qflow_input"))


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_ops_name_the_node_and_leave_the_model_unchanged(case):
    op, pattern = REFUSED[case]
    model = Outer(op)
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=pattern) as info:
        qflow.quantize_(model, QFXConfig())
    assert "\n" not in str(info.value) and str(info.value).startswith("quantize_: ")
    assert _snapshot(model) == before


def test_in_place_relu_on_the_forward_input_is_refused():
    class InPlaceOnInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(F.relu(x, inplace=True))

    with pytest.raises(ConfigError, match="in place on an input of the forward"):
        qflow.quantize_(nn.Sequential(nn.Linear(4, 4), InPlaceOnInput()), QFXConfig())


def test_forward_that_depends_on_the_training_mode_is_refused():
    class ModeDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = F.relu(self.fc(x))
            return y + y if self.training else y

    model = ModeDependent()
    with pytest.raises(ConfigError, match="differs between training and evaluation"):
        qflow.quantize_(model, QFXConfig())
    assert type(model) is ModeDependent and isinstance(model.fc, nn.Linear)


def test_concat_along_a_spatial_dim_is_refused_when_it_runs():
    class SpatialCat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return torch.cat([y, y], dim=-1)  # W of an N, C, H, W tensor

    model = qflow.quantize_(SpatialCat(), QFXConfig())
    with pytest.raises(QflowError, match="dim -1 of 4-D tensors is not supported"):
        model(torch.randn(2, 1, 4, 4))


def test_untraceable_model_swaps_modules_warns_and_freeze_reports():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.fc2 = nn.Linear(4, 2)

        def forward(self, x):
            y = F.relu(self.fc1(x))
            if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                y = y * 1.0
            return self.fc2(y)

    model = Branchy()
    with pytest.warns(UserWarning, match="cannot trace the forward of the model"):
        qflow.quantize_(model, QFXConfig())
    assert type(model) is Branchy
    assert type(model.fc1).__name__ == "QLinear" and type(model.fc2).__name__ == "QLinear"
    assert model(torch.randn(3, 4)).shape == (3, 2)
    with pytest.raises(FreezeError, match="cannot trace"):
        qflow.freeze(model, torch.randn(3, 4))


def test_custom_leaf_module_with_a_functional_forward_is_converted():
    class Flatten(nn.Module):  # the pre-nn.Flatten idiom
        def forward(self, x):
            return x.view(x.size(0), -1)

    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    model = nn.Sequential(nn.Conv2d(1, 2, 3), Flatten(), nn.Linear(72, 3))
    qflow.quantize_(model, QFXConfig())
    assert type(model[2]) is Flatten and model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ConfigError, match=r"'sigmoid' in 1 \(call_function torch\.sigmoid\)"):
        qflow.quantize_(nn.Sequential(nn.Linear(3, 3), Swish()), QFXConfig())
