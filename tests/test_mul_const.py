"""Products by a constant in a forward (a CNN's ``x * 0.5`` and ``x / 3``, attention's
``(q @ k.transpose(1, 2)) * self.scale``): ``quantize_`` makes them ``QMulConst`` layers and
``freeze`` a ``scale_shift`` (the constant on every channel, shift 0) + ``cast``. The
emulator equals the QAT model's eval output, and every artifact (integer ONNX, QONNX, TVM
cpu, hls4ml C simulation) the emulator, on every sample; the refusals name the node."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from binary_graphs import ACT, Maker
from export_dirs import export_dir, verify_rows
from torch import nn
from zoo_fixtures import dataset

import qflow
from qflow.config import LayerOverride, QFXConfig, SpecOverride
from qflow.errors import ConfigError
from qflow.export.hls import HlsExportError
from qflow.export.hls.onnx_graph import hls_graph
from qflow.export.int_onnx import export_int_onnx, run_int_onnx
from qflow.graph import Emulator
from qflow.nn import QMulConst
from qflow.numerics import to_codes
from qflow.targets import load_target
from qflow.train import calibrate, fit


class HalfCNN(nn.Module):
    """A CNN as users write it: ``* 0.5``, ``/ 3`` and ``0.25 *`` in its forward."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x)) * 0.5
        x = F.max_pool2d(x, 2)
        x = F.relu(self.conv2(x) / 3) + 0.25 * x
        return self.fc(torch.flatten(x, 1))


class ScaledAttention(nn.Module):
    """One attention head on 2x2 patches (16 tokens), scores scaled by head_dim ** -0.5."""

    def __init__(self, dim: int = 16, head_dim: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 2, stride=2)
        self.q, self.k, self.v = (nn.Linear(dim, head_dim) for _ in range(3))
        self.proj = nn.Linear(head_dim, dim)
        self.head = nn.Linear(dim, 10)
        self.scale = head_dim ** -0.5

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = (q @ k.transpose(1, 2)) * self.scale
        x = x + self.proj(F.softmax(scores, dim=-1) @ v)
        return self.head(x.mean(1))


MODELS = {"cnn": HalfCNN, "attention": ScaledAttention}


def _inputs() -> np.ndarray:
    """The digits test set, uniform noise beyond its range, all zeros and all ones."""
    data = dataset("digits")
    noise = np.random.default_rng(0).uniform(-0.3, 1.3, (200, 1, 8, 8)).astype(np.float32)
    return np.concatenate([data.x_test, noise, np.zeros((1, 1, 8, 8), np.float32),
                           np.ones((1, 1, 8, 8), np.float32)])


@functools.cache
def _trained(name: str):
    """(model, graph): quantized at 8 bits, calibrated, one short epoch, frozen."""
    data = dataset("digits")
    torch.manual_seed(0)
    model = qflow.quantize_(MODELS[name](), QFXConfig.with_bits(8))
    calibrate(model, data.x_train[:256])
    fit(model, data.x_train[:256], data.y_train[:256], epochs=1, lr=1e-3, progress=False)
    model.eval()
    return model, qflow.freeze(model, torch.as_tensor(data.x_test[:4]))


def _mismatching_samples(model: nn.Module, codes: np.ndarray, graph, x) -> int:
    with torch.no_grad():
        values = model(torch.as_tensor(x)).to(torch.float64).numpy()
    scaled = np.ldexp(values, graph.output_type.fractional)
    assert np.array_equal(scaled, np.rint(scaled)), "model outputs off the output grid"
    return int((scaled.astype(np.int64) != codes).any(axis=1).sum())


# -- the layers and their QGraph nodes ----------------------------------------------------
def test_cnn_products_become_named_layers_and_scale_shift_nodes():
    model, graph = _trained("cnn")
    layers = {m.qflow_name: m for m in model.modules() if isinstance(m, QMulConst)}
    assert sorted(layers) == ["div", "mul", "mul_1"]
    values = {n: float(m.quantized_value()) for n, m in layers.items()}
    assert values["mul"] == 0.5 and values["mul_1"] == 0.25  # powers of two: exact
    third = layers["div"].value_quant.fixed_type()
    assert values["div"] == 85 / 256 and abs(values["div"] - 1 / 3) <= third.lsb / 2
    nodes = {n.name: n for n in graph.nodes}
    for name, code in (("mul", 64), ("div", 85), ("mul_1", 64)):
        node = nodes[name]
        channels = graph.tensors[node.inputs[0]].shape[0]
        assert node.op == "scale_shift" and channels == 8
        assert node.consts["scale"].tolist() == [code] * channels, name
        assert math.ldexp(code, -int(node.consts["scale_frac"][0])) == values[name]
        assert not node.consts["shift"].any()
        assert nodes[f"{name}_cast"].op == "cast"
        assert nodes[f"{name}_cast"].inputs == [name]


def test_attention_scale_is_a_uniform_scale_shift_on_the_scores():
    model, graph = _trained("attention")
    layer = model.mul
    assert isinstance(layer, QMulConst) and layer.qflow_name == "mul"
    t = layer.value_quant.fixed_type()
    assert str(t) == "ap_fixed<8,0,AP_RND_CONV,AP_SAT>"
    assert float(layer.quantized_value()) == 91 / 256 != model.scale
    assert abs(91 / 256 - 8 ** -0.5) <= t.lsb / 2
    node = next(n for n in graph.nodes if n.name == "mul")
    assert node.op == "scale_shift" and graph.tensors[node.output].shape == (16, 16)
    assert node.consts["scale"].tolist() == [91] * 16
    assert node.consts["scale_frac"].tolist() == [8] * 16
    readers = [n for n in graph.nodes if node.name in n.inputs]
    assert [n.op for n in readers] == ["cast"]


# -- QAT eval == emulator -----------------------------------------------------------------
@pytest.mark.parametrize("arithmetic", ["auto", "int64"])
@pytest.mark.parametrize("name", list(MODELS))
def test_qat_eval_equals_the_emulator(name, arithmetic):
    model, graph = _trained(name)
    x = _inputs()
    bad = _mismatching_samples(model, Emulator(graph, arithmetic).run(x), graph, x)
    print(f"{name}, {arithmetic}: {bad} of {len(x)} samples differ")
    assert len(x) > 700 and bad == 0


# -- every artifact == emulator ----------------------------------------------------------
ARTIFACTS = {("cnn", "cpu"): {"int_onnx", "qonnx", "tvm"},
             ("cnn", "ultra96"): {"int_onnx", "qonnx", "hls_csim"},
             ("attention", "cpu"): {"int_onnx", "tvm"},
             ("attention", "ultra96"): {"int_onnx", "hls_csim"}}


@pytest.mark.parametrize(("name", "target"), list(ARTIFACTS))
def test_export_and_verify_every_artifact(tmp_path, name, target):
    """``qflow export`` and ``qflow verify`` on the frozen model: integer ONNX (and QONNX
    where it has a form), TVM cpu, hls4ml C simulation (io_parallel), 0 mismatching
    samples each."""
    pytest.importorskip("tvm" if target == "cpu" else "hls4ml")
    _, graph = _trained(name)
    io_type = "io_parallel" if target == "ultra96" else None
    out = export_dir(tmp_path, graph, load_target(target), io_type)
    rows = verify_rows(out, _inputs())
    assert set(rows) == ARTIFACTS[(name, target)]
    if target == "ultra96":  # the products are hls4ml BatchNormalization layers
        report = json.loads(next(out.rglob("report.json")).read_text())
        classes = {r["layer"]: r["class"] for r in report["layers"]}
        muls = ["mul", "div", "mul_1"] if name == "cnn" else ["mul"]
        assert all(classes[m] == "BatchNormalization" for m in muls), classes


# -- spellings, overrides, gradient, state -----------------------------------------------
class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 8)
        self.out = nn.Linear(8, 3)
        self.gain, self.d = 3, 16

    def forward(self, x):
        y = self.fc(x.flatten(1))
        y = 0.5 * (y * 2)
        y = torch.mul(y, 1.5) / 4
        y = torch.div(y.mul(0.75), 8)
        y = y.div(-2.0) * self.gain
        y = torch.true_divide(y, math.sqrt(self.d))
        return self.out(y)


SPELLED = {"mul": 2.0, "mul_1": 0.5, "mul_2": 1.5, "div": 0.25, "mul_3": 0.75,
           "div_1": 0.125, "div_2": -0.5, "mul_4": 3.0, "div_3": 0.25}


def test_every_spelling_converts_and_freezes_exactly():
    torch.manual_seed(0)
    model = qflow.quantize_(Spellings(), QFXConfig.with_bits(8))
    layers = {m.qflow_name: m for m in model.modules() if isinstance(m, QMulConst)}
    assert {n: float(m.quantized_value()) for n, m in layers.items()} == SPELLED
    x = _inputs()
    calibrate(model, x[:256])
    model.eval()
    graph = qflow.freeze(model, torch.as_tensor(x[:4]))
    assert [n.name for n in graph.nodes if n.op == "scale_shift"] == list(SPELLED)
    bad = _mismatching_samples(model, Emulator(graph).run(x), graph, x)
    print(f"spellings: {bad} of {len(x)} samples differ")
    assert bad == 0


def test_overrides_reach_the_constant_and_the_output_by_name():
    config = dataclasses.replace(QFXConfig.with_bits(8), overrides=(LayerOverride(
        pattern="mul", weight=SpecOverride(bits=12), intermediate=SpecOverride(bits=10)),))
    model = qflow.quantize_(ScaledAttention(), config)
    assert str(model.mul.value_quant.fixed_type()) == "ap_fixed<12,0,AP_RND_CONV,AP_SAT>"
    assert float(model.mul.quantized_value()) == 1448 / 4096
    assert model.mul.out_quant.spec.bits == 10


def test_a_constant_that_rounds_to_zero_in_its_type_is_refused():
    config = QFXConfig(overrides=(LayerOverride(
        pattern="mul", weight=SpecOverride(integer_bits=8)),))
    with pytest.raises(ConfigError, match=r"^mul: x \* 0\.35\d+: the constant is 0 in its "
                                          r"type ap_fixed<8,9"):
        qflow.quantize_(ScaledAttention(), config)


def test_gradient_passes_the_quantized_constant():
    layer = QMulConst.from_config(QFXConfig.with_bits(8), "mul", 3, divide=True)
    x = torch.linspace(-1, 1, 9, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 85 / 256))
    assert not layer.value_quant.integer_bits.requires_grad


def test_state_dict_holds_the_quantizers_and_loads():
    model, _ = _trained("attention")
    state = model.state_dict()
    assert {k for k in state if k.startswith("mul.")} == {
        f"mul.{q}_quant.{b}" for q in ("value", "out")
        for b in ("integer_bits", "initialized", "signed")}
    torch.manual_seed(1)
    again = qflow.quantize_(ScaledAttention(), QFXConfig.with_bits(8))
    again.load_state_dict(state)
    x = torch.as_tensor(_inputs()[:64])
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))


# -- refusals --------------------------------------------------------------------------------
class Inner(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.weight = nn.Parameter(torch.ones(4))
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


_GENERIC = r"no exact fixed-point form for '{}' in inner \(call_function operator\.{}\)$"
REFUSED = {
    "zero": (lambda m, y: y * 0, r"'mul' in inner \(call_function operator\.mul\): product "
                                 r"by 0: the constant must be finite and nonzero$"),
    "nan": (lambda m, y: y * float("nan"), r"'mul' in inner .*product by nan"),
    "divide_by_inf": (lambda m, y: y / float("inf"), r"'truediv' in inner .*division by inf"),
    "two_tensors": (lambda m, y: y * y, _GENERIC.format("mul", "mul")),
    "parameter": (lambda m, y: y * m.weight, _GENERIC.format("mul", "mul")),
    "bool": (lambda m, y: y * True, _GENERIC.format("mul", "mul")),
    "reciprocal": (lambda m, y: 2 / y, _GENERIC.format("truediv", "truediv")),
    "size": (lambda m, y: y * y.shape[-1] ** -0.5,
             r"'mul' in inner .*the constant is a size computed in forward"),
    "rounding_mode": (lambda m, y: torch.div(y, 2, rounding_mode="floor"),
                      r"'div' in inner \(call_function torch\.div\): rounding_mode= is not "
                      r"supported$"),
    "in_place": (lambda m, y: y.mul_(2), r"no exact fixed-point form for 'mul_' in inner"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_name_the_node_and_leave_the_model_unchanged(case):
    op, pattern = REFUSED[case]
    model = Outer(op)
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ConfigError, match=pattern) as info:
        qflow.quantize_(model, QFXConfig.with_bits(8))
    assert "\n" not in str(info.value)
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert not hasattr(model, "qflow_input")


@pytest.mark.parametrize("value", [0, float("inf"), float("nan"), True])
def test_the_layer_refuses_a_constant_with_no_exact_product(value):
    with pytest.raises(ConfigError, match=r"^mul: x \* "):
        QMulConst.from_config(QFXConfig.with_bits(8), "mul", value)


# -- scale_shift on token tensors in each backend ---------------------------------------------
def _token_graph(scale):
    """input (4 tokens, 6 features) -> scale_shift along the tokens -> cast."""
    m = Maker(ACT, (4, 6))
    m.add("scale_shift", scale=scale, scale_frac=[6] * 4, shift=[5, 5, 5, 5],
          shift_frac=[3] * 4, name="scaled")
    m.cast()
    return m.graph()


@pytest.mark.parametrize("scale", [[45, 45, 45, 45], [45, -7, 0, 127]])
def test_token_scale_shift_in_the_emulator_integer_onnx_and_qonnx(tmp_path, scale):
    """The scale of token t multiplies row t of every sample, in each backend that can
    state a per-token scale (the emulator against numpy itself)."""
    pytest.importorskip("qonnx")
    from qflow.export.qonnx import export_qonnx, run_qonnx

    graph = _token_graph(scale)
    rng = np.random.default_rng(0)
    codes = rng.integers(-128, 128, (300, 4, 6))
    x = np.ldexp(codes.astype(np.float64), -ACT.fractional)
    frac = graph.tensors["scaled"].type.fractional
    want = (codes * np.array(scale)[:, None] * 2 ** (frac - ACT.fractional - 6)
            + 5 * 2 ** (frac - 3))
    got = Emulator(graph, "int64").run_codes(codes, keep=True)["scaled"]
    assert np.array_equal(got, want)
    out = Emulator(graph).run(x)
    onnx_codes = run_int_onnx(export_int_onnx(graph, tmp_path / "m.int.onnx"),
                              to_codes(x, ACT))
    qonnx_codes = run_qonnx(export_qonnx(graph, tmp_path / "m.qonnx.onnx"), x)
    bad = [int((c != out).reshape(len(x), -1).any(axis=1).sum())
           for c in (onnx_codes, qonnx_codes)]
    print(f"token scale {scale}: integer ONNX, QONNX {bad} of {len(x)} samples differ")
    assert bad == [0, 0]


def test_hls_exports_uniform_and_per_token_scales():
    model = hls_graph(_token_graph([45] * 4)).model
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    inits = {t.name: t for t in model.graph.initializer}
    assert [list(inits[name].dims) for name in bn.input[1:]] == [[6]] * 4  # the features
    # per token: the tokens turned to hls4ml's last axis and back around the product
    model = hls_graph(_token_graph([45, -7, 0, 127])).model
    ops = [(n.op_type, {a.name: a.i for a in n.attribute if a.name in ("rows", "cols")})
           for n in model.graph.node]
    at = ops.index(("BatchNormalization", {}))
    assert ops[at - 1:at + 2] == [("FixedTranspose", {"rows": 4, "cols": 6}),
                                  ("BatchNormalization", {}),
                                  ("FixedTranspose", {"rows": 6, "cols": 4})]
    inits = {t.name: t for t in model.graph.initializer}
    bn = model.graph.node[at]
    assert [list(inits[name].dims) for name in bn.input[1:]] == [[4]] * 4  # the tokens
    with pytest.raises(HlsExportError, match=r"^node 'scaled' \(scale_shift\): .*io_parallel"):
        hls_graph(_token_graph([45] * 4), "io_stream")
