"""Dyadic requantization: the layers' integer identity (recomputed here from the
definition), QAT eval == frozen graph on a model written as users write them, the input
range's life cycle, the config, and HAWQ with ``requant: dyadic`` through export and
verify on onnx, cpu and ultra96."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qflow
from qflow.cli.main import main
from qflow.dyadic import DyadicConfig, DyadicConv2d, DyadicLinear
from qflow.errors import ConfigError
from qflow.graph import Emulator
from qflow.graph.from_torch import FreezeError
from qflow.numerics import cast
from qflow.train import calibrate, fit


def _multiplier(value: float, bits: int) -> tuple[int, int]:
    """The B-bit multiplier (code M in [2^(B−2), 2^(B−1)), fraction F) nearest ``value``,
    ties to even, from the definition."""
    _, exponent = math.frexp(value)  # value = m · 2^exponent, m in [½, 1)
    frac = bits - 1 - exponent
    code = round(value * 2.0**frac)  # Python's round: ties to even
    if code == 2 ** (bits - 1):
        code, frac = code // 2, frac - 1
    return code, frac


def _expected(layer, x: np.ndarray) -> np.ndarray:
    """The layer's eval output from its float weights and input range, in numpy: input
    codes, symmetric weight codes, integer accumulation, per-row multiplier, bias, cast."""
    bits, act, mbits = layer.bits, layer.act_bits, layer.multiplier_bits
    signed = bool(layer.input_quant.signed)
    steps = 2 ** (act - 1) - 1 if signed else 2**act - 1
    m_code, m_frac = _multiplier(steps / float(layer.input_quant.range), mbits)
    m_in = m_code * 2.0**-m_frac
    low, high = (-(2 ** (act - 1)), 2 ** (act - 1) - 1) if signed else (0, 2**act - 1)
    q = np.clip(np.rint(x * m_in), low, high)
    w = layer.weight.detach().double().numpy()
    rows = w.reshape(w.shape[0], -1)
    limit = 2 ** (bits - 1) - 1
    s_w = np.abs(rows).max(axis=1) / limit
    k = np.clip(np.rint(w / s_w.reshape((-1,) + (1,) * (w.ndim - 1))), -limit, limit)
    if isinstance(layer, nn.Conv2d):
        acc = F.conv2d(torch.from_numpy(q), torch.from_numpy(k), None, layer.stride,
                       layer.padding).numpy()
        shape = (1, -1, 1, 1)
    else:
        acc = q @ k.T
        shape = (1, -1)
    assert np.all(np.abs(acc) < 2**40) and np.array_equal(acc, np.rint(acc))
    m_rows = np.array([c * 2.0**-f for c, f in (_multiplier(s / m_in, mbits) for s in s_w)])
    bias = layer.quantized_bias().detach().numpy()
    return cast(acc * m_rows.reshape(shape) + bias.reshape(shape),
                layer.out_quant.fixed_type())


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bits,act_bits", [(2, 8), (4, 4), (8, 6)])
def test_layer_eval_is_the_integer_requantization(kind, bits, act_bits):
    g = torch.Generator().manual_seed(bits * 10 + act_bits)
    if kind == "linear":
        float_layer, cls = nn.Linear(12, 5), DyadicLinear
        x = torch.randn(16, 12, generator=g)
    else:
        float_layer, cls = nn.Conv2d(3, 4, 3, padding=1), DyadicConv2d
        x = torch.randn(4, 3, 6, 6, generator=g)
    with torch.no_grad():
        float_layer.weight.mul_(torch.rand(float_layer.weight.shape[0], *(
            [1] * (float_layer.weight.dim() - 1)), generator=g) * 3)
    layer = cls.from_float(float_layer, qflow.QFXConfig(), "layer", bits=bits,
                           act_bits=act_bits, multiplier_bits=12)
    layer.eval()(x)  # calibrates the input range and the output format
    y = layer(x).detach().numpy()
    assert np.array_equal(y, _expected(layer, x.double().numpy()))
    codes, _ = layer.multiplier()
    # the scales are not powers of two: the multipliers use their bits
    assert any(int(c) & (int(c) - 1) for c in codes.tolist())


class _UserNet(nn.Module):
    """Unnamed Sequential blocks and functional ops in forward, as users write them."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6),
                                      nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Linear(6 * 4 * 4, 16), nn.Linear(16, 10))

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.head[1](F.relu(self.head[0](x)))


def test_user_model_eval_equals_the_frozen_graph_code_for_code():
    torch.manual_seed(0)
    x = torch.rand(96, 1, 8, 8)
    y = torch.randint(0, 10, (96,))
    model = qflow.quantize_(_UserNet(), DyadicConfig(weight_bits=4, act_bits=5,
                                                     overrides={"head.1": {"weight_bits": 8}}))
    assert [type(m).__name__ for m in model.modules() if "Dyadic" in type(m).__name__] == [
        "DyadicConv2d", "DyadicLinear", "DyadicLinear"]
    assert model.head[1].bits == 8 and model.features[0].bits == 4
    calibrate(model, x)
    fit(model, x, y, epochs=2, batch_size=32, progress=False)
    model.eval()
    graph = qflow.freeze(model, x[:2])
    with torch.no_grad():
        expected = model(x).numpy()
    out_type = graph.output_type
    got = Emulator(graph).run(x.numpy()) * 2.0**-out_type.fractional
    assert int((got != expected).any(axis=1).sum()) == 0
    ops = [n.op for n in graph.nodes if n.source == "head.0"]
    assert ops == ["scale_shift", "cast", "dense", "scale_shift", "cast"]


def test_freeze_refuses_products_beyond_float64():
    """QAT eval multiplies in float64: a 32-bit input times a 24-bit multiplier (about
    55 bits) could round there, so freeze refuses rather than deploy it."""
    fixed = qflow.QFXConfig.from_dict({"input": {"bits": 32}})
    model = qflow.quantize_(nn.Sequential(nn.Linear(4, 3)),
                            DyadicConfig(multiplier_bits=24, fixed=fixed))
    x = torch.rand(8, 4)
    calibrate(model, x)
    with pytest.raises(FreezeError, match=r"0: a 32-bit tensor times a 24-bit multiplier "
                                          r"needs 5[4-9] bits, more than float64's 53"):
        qflow.freeze(model.eval(), x[:2])
    model = qflow.quantize_(nn.Sequential(nn.Linear(4, 3)),
                            DyadicConfig(multiplier_bits=16, fixed=fixed))
    calibrate(model, x)
    graph = qflow.freeze(model.eval(), x[:2])  # 32 + 15 bits: exact
    assert max(graph.tensors[n.output].type.width for n in graph.nodes
               if n.op == "scale_shift") <= 53
    # HAWQ-V3's 32-bit multipliers on 8-bit inputs and 4-bit weights fit: eval == graph
    model = qflow.quantize_(nn.Sequential(nn.Linear(4, 3)),
                            DyadicConfig(multiplier_bits=32, weight_bits=4, act_bits=4))
    calibrate(model, x)
    graph = qflow.freeze(model.eval(), x[:2])
    codes, _ = model[1].multiplier()
    assert int(codes.max()) >= 2**30  # 31 significant bits used
    with torch.no_grad():
        expected = model(x).numpy() / graph.output_type.lsb
    assert int((qflow.emulate(graph, x.numpy()) != expected).any(axis=1).sum()) == 0


def test_input_range_follows_training_and_stays_fixed_in_eval():
    layer = DyadicLinear.from_float(nn.Linear(4, 2), qflow.QFXConfig(), "fc", bits=4,
                                    act_bits=4, range_momentum=0.5)
    layer.eval()(torch.tensor([[0.0, 1.0, 2.0, 0.5]]))  # calibration: unsigned, range 2
    inputs = layer.input_quant
    assert not bool(inputs.signed) and float(inputs.range) == 2.0
    layer(torch.full((1, 4), 10.0))
    assert float(inputs.range) == 2.0  # eval never moves it
    layer.train()(torch.full((1, 4), 4.0))
    assert float(inputs.range) == 3.0  # ½ · 2 + ½ · 4
    assert str(layer.input_type()) == "ap_ufixed<4,4,AP_RND_CONV,AP_SAT>"


def test_config_round_trip_and_errors():
    cfg = DyadicConfig(weight_bits=3, act_bits=6, overrides={"fc.*": {"dyadic": False}})
    assert DyadicConfig.from_json(cfg.to_json()) == cfg
    assert cfg.replace_bits(4).weight_bits == cfg.replace_bits(4).act_bits == 4
    assert cfg.replace_bits(act_bits=5).weight_bits == 3
    for data, message in [
        ({"weight_bits": 17}, "config.weight_bits: expected an integer from 2 to 16"),
        ({"multiplier_bits": 33}, "config.multiplier_bits: expected an integer from 4 to 32"),
        ({"range_momentum": 1.0}, "config.range_momentum: expected a number in [0, 1)"),
        ({"overrides": {"fc": {"bits": 4}}}, "unknown key 'bits'"),
        ({"method": "qfx"}, "this is a dyadic config"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
            DyadicConfig.from_dict(data)
    with pytest.raises(ConfigError, match="matches no weight layer"):
        qflow.quantize_(nn.Sequential(nn.Linear(2, 2)), DyadicConfig(overrides={"fc": {}}))


@pytest.fixture(scope="module")
def hawq_dyadic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hawq_dyadic")
    recipe = root / "recipe.yaml"
    recipe.write_text("method: hawq\nrequant: dyadic\nbudget: {size: 0.6}\n")
    run = root / "run"
    assert main(["quantize", "--recipe", str(recipe), "--model", "digits-cnn", "--epochs",
                 "3", "--qat-epochs", "1", "--quiet", "--out", str(run)]) == 0
    return run


def test_hawq_dyadic_run_holds_a_dyadic_config(hawq_dyadic_run):
    report = json.loads((hawq_dyadic_run / "hawq.json").read_text())
    config = json.loads((hawq_dyadic_run / "config.json").read_text())
    assert config["method"] == "dyadic"
    assert {p: o["weight_bits"] for p, o in config["overrides"].items()} == report["widths"]
    assert report["costs"]["size"]["fraction"] <= 0.6
    from matplotlib.image import imread

    image = imread(hawq_dyadic_run / "pareto.png")  # the Pareto-front figure decodes
    assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0


@pytest.mark.parametrize("target", ["onnx", "cpu", "ultra96"])
def test_dyadic_run_exports_and_verifies(hawq_dyadic_run, tmp_path, target):
    out = tmp_path / target
    assert main(["export", str(hawq_dyadic_run), "--target", target, "--out", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] and report["mismatching_samples"] == 0
    rows = [r for r in report["results"] if r["role"] != "reference"]
    wanted = {"onnx": "qonnx", "cpu": "tvm", "ultra96": "hls_csim"}[target]
    assert {r["artifact"] for r in rows} >= {"QAT model (torch eval)", "int_onnx", wanted}
    for row in rows:
        assert (row["status"], row["mismatching_samples"]) == ("ok", 0), row
        assert row["samples"] == report["samples"] > 500, row
