"""OFQ with StatsQ weights: the config, StatsQ's levels and gradient, and the deployment
identity (odd integer codes with the fixed-point multiplier equal QAT eval, code for
code) on random layers, on tiny-vit in process and through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import qflow
from qflow.cli.main import main
from qflow.errors import ConfigError
from qflow.graph import emulate, freeze
from qflow.methods import config_from_dict, method_of
from qflow.ofq import OFQConfig
from qflow.ofq.layers import (
    StatsQConv2d,
    StatsQLinear,
    multiplier_codes,
    statsq_index,
    statsq_levels,
)
from qflow.ofq.lsq import LSQConv2d, LSQLinear
from qflow.oscillation import tracked_layers


# -- config --------------------------------------------------------------------------
def test_config_round_trip():
    cfg = OFQConfig(weight_bits=3, multiplier_bits=12,
                    fixed=qflow.QFXConfig.with_bits(6),
                    overrides={"head": {"statsq": True, "weight_bits": 8},
                               r"blocks\.0\..*": {"statsq": False}})
    assert OFQConfig.from_json(cfg.to_json()) == cfg
    assert OFQConfig.from_yaml(cfg.to_yaml()) == cfg
    assert config_from_dict(json.loads(cfg.to_json())) == cfg
    assert method_of(cfg).name == "ofq"
    assert OFQConfig.from_yaml("") == OFQConfig()
    assert cfg.layer_settings("head", False) == (True, 8)
    assert cfg.layer_settings("blocks.0.attn.q", True) == (False, 3)
    assert cfg.layer_settings("blocks.1.attn.q", True) == (True, 3)


def test_replace_bits_sets_the_statsq_width_and_activations():
    cfg = OFQConfig()
    assert cfg.replace_bits(2).weight_bits == 2
    assert cfg.replace_bits(2).fixed == cfg.fixed  # first/last layers stay 8-bit
    both = cfg.replace_bits(2, weight_bits=3, act_bits=6)
    assert both.weight_bits == 3 and both.fixed.activation.bits == 6
    assert both.fixed.weight.bits == 8
    with pytest.raises(ConfigError, match="StatsQ width"):
        cfg.replace_bits(1)


@pytest.mark.parametrize("data, message", [
    ({"weight_bits": 1}, "config.weight_bits: expected an integer from 2 to 8, got 1"),
    ({"weight_bits": 9}, "config.weight_bits: expected an integer from 2 to 8, got 9"),
    ({"weight_bits": "4"}, "config.weight_bits: expected an integer from 2 to 8, got '4'"),
    ({"weight_bits": True}, "config.weight_bits: expected an integer from 2 to 8, got True"),
    ({"multiplier_bits": 3}, "config.multiplier_bits: expected an integer from 4 to 24"),
    ({"version": 4}, "config version 4 is not supported"),
    ({"act_quantizer": "pact"},
     "config.act_quantizer: expected one of qfx, lsq, lsq_token, got 'pact'"),
    ({"wieght_bits": 2}, "config: unknown key 'wieght_bits'"),
    ({"method": "biper"}, "biper"),
    ({"fixed": {"weight": {"bits": 0}}}, "config.fixed.weight"),
    ({"fixed": 3}, "config.fixed: expected a mapping"),
    ({"overrides": {"fc": {"bits": 2}}}, r"config.overrides\['fc'\]: unknown key 'bits'"),
    ({"overrides": {"fc": {"weight_bits": 1}}}, r"config.overrides\['fc'\].weight_bits"),
    ({"overrides": {"fc": {"statsq": "yes"}}}, r"config.overrides\['fc'\].statsq"),
    ({"overrides": {"(": {"statsq": True}}}, "regular expression|pattern"),
    ({"overrides": []}, "config.overrides: expected a mapping"),
])
def test_config_errors_are_one_line(data, message):
    with pytest.raises(ConfigError, match=message) as info:
        OFQConfig.from_dict(data)
    assert "\n" not in str(info.value)


def test_override_reaching_no_layer_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="'fc9' matches no weight layer"):
        qflow.quantize_(model, OFQConfig(overrides={"fc9": {"statsq": True}}))
    assert [type(m) for m in model] == [nn.Linear] * 3  # left as it was


# -- StatsQ by hand ------------------------------------------------------------------
def test_statsq_levels_by_hand():
    w = torch.tensor([[0.375, -0.125, 0.625, -0.875],  # mean|w| = 0.5: s = 1
                      [4.0, 0.0, 0.0, 0.0],            # s = 2: 4 clamps to the top level
                      [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # s = 0: all zero
    # b = 2: w·2/s = 0.75, -0.25, 1.25, -1.75 -> k = 0, -1, 1, -2 -> s(k + ½)/2
    assert statsq_index(w, 2).tolist()[0] == [0, -1, 1, -2]
    assert statsq_levels(w, 2).tolist() == [[0.25, -0.25, 0.75, -0.75],
                                            [1.5, 0.5, 0.5, 0.5], [0, 0, 0, 0]]
    # b = 3: w·4/s = 1.5, -0.5, 2.5, -3.5 -> k = 1, -1, 2, -4 -> s(k + ½)/4
    assert statsq_levels(w, 3).tolist()[0] == [0.375, -0.125, 0.625, -0.875]
    assert statsq_levels(w, 3).tolist()[1] == [1.75, 0.25, 0.25, 0.25]


def test_statsq_gradient_is_the_identity():
    w = torch.tensor([[0.375, -0.125, 0.625, -0.875], [4.0, 0.0, 0.1, -0.2]],
                     requires_grad=True)
    g = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.25, 7.0, -1.0, 2.0]])
    statsq_levels(w, 2).backward(g)
    assert torch.equal(w.grad, g)  # clamped weights and the scale pass it unchanged too


def test_multiplier_codes_by_hand():
    # s/2^b = 1/4 -> M = 2^14 at F = 16; 3/16 -> 0.75·2^-2 -> M = 24576 at F = 17
    codes, frac = multiplier_codes(torch.tensor([1.0, 0.75, 0.0], dtype=torch.float64), 2, 16)
    assert codes.tolist() == [16384, 24576, 0] and frac.tolist() == [16, 17, 0]
    # rounding up to 2^(B-1) renormalizes: (1 - 2^-10)/4 at B = 4 -> 8 = 2^3 -> 4 at F - 1
    codes, frac = multiplier_codes(torch.tensor([1 - 2 ** -10], dtype=torch.float64), 2, 4)
    assert codes.tolist() == [4] and frac.tolist() == [4]


def test_layer_codes_are_odd_and_training_uses_float_levels():
    torch.manual_seed(0)
    layer = StatsQLinear.from_float(nn.Linear(16, 5), qflow.QFXConfig(), "fc", bits=3)
    codes = layer.weight_codes()
    assert codes.dtype == torch.int16 and bool((codes % 2 != 0).all())
    assert int(codes.abs().max()) <= 7
    levels = statsq_levels(layer.weight.detach().double(), 3)
    scale = 2 * layer.weight.detach().double().abs().mean(dim=1, keepdim=True)
    assert torch.allclose(levels, codes.double() * scale / 8)
    # eval: the same codes times the fixed-point multiplier
    m = layer.multiplier_values()
    assert torch.allclose(m, scale.flatten() / 8, rtol=2 ** -14)


# -- the deployment identity ---------------------------------------------------------
CASES = [("dense", (24,)), ("tokens", (6, 24)), ("conv", (3, 7, 7))]


@pytest.mark.parametrize("acts", ["qfx", "lsq", "lsq_token"])
@pytest.mark.parametrize("quantizer", ["statsq", "lsq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("multiplier_bits", [8, 16])
@pytest.mark.parametrize("kind, shape", CASES)
def test_deployment_identity_on_random_layers(quantizer, bits, multiplier_bits, kind, shape,
                                              acts):
    """The integer codes with the fixed-point multiplier (the frozen graph, run by the
    emulator) give exactly the QAT model's eval outputs; with learned (LSQ) activation
    scales the input codes come from one more multiplier and cast."""
    seed = 100 * bits + multiplier_bits + len(kind) + len(acts)
    torch.manual_seed(seed)
    bias = seed % 2 == 0
    if kind == "conv":
        layer = nn.Conv2d(3, 5, 3, padding=1, stride=1 + seed % 2, bias=bias)
    else:
        layer = nn.Linear(24, 9, bias=bias)
    with torch.no_grad():  # rows of very different scales
        layer.weight.mul_(torch.logspace(-2, 1, layer.weight.shape[0]).reshape(
            -1, *([1] * (layer.weight.dim() - 1))))
    model = qflow.quantize_(nn.Sequential(layer), OFQConfig(
        weight_bits=bits, multiplier_bits=multiplier_bits, weight_quantizer=quantizer,
        act_quantizer=acts, overrides={"0": {"statsq": True}}))
    types = {"statsq": (StatsQConv2d, StatsQLinear), "lsq": (LSQConv2d, LSQLinear)}[quantizer]
    assert isinstance(model[1], types[0] if kind == "conv" else types[1])
    if quantizer == "lsq":
        with torch.no_grad():  # learned scales: from a third to three times the init
            scale = model[1].weight_scale
            scale.mul_(torch.exp(torch.empty_like(scale).uniform_(-1.1, 1.1)))
    x = torch.randn(64, *shape) * 3
    model.train()
    model(x)  # initializes the formats from data
    if acts != "qfx":
        with torch.no_grad():  # a learned step away from its start (per token: apart)
            step = model[1].input_quant.step
            step.mul_(torch.linspace(0.3, 1.5, step.numel()).reshape(step.shape))
    model.eval()
    graph = freeze(model, x[:4])
    with torch.no_grad():
        y = model(x).numpy()
    ref = emulate(graph, x.numpy()) * graph.output_type.lsb
    assert int((y != ref).sum()) == 0
    ops = [n.op for n in graph.nodes]
    expected = ["conv2d" if kind == "conv" else "dense", "scale_shift", "cast"]
    if kind == "tokens":
        per_token = ["scale_shift", "cast"] if acts == "lsq_token" else []
        expected = ["dense", *per_token, "transpose", "scale_shift", "cast", "transpose"]
    if acts != "qfx":
        expected = ["scale_shift", "cast", *expected]
        assert graph.tensors[graph.nodes[1].output].type == model[1].input_quant.input_type()
        assert model[1].input_quant.tokens == (kind == "tokens" and acts == "lsq_token")
    assert ops == expected
    weight = next(n for n in graph.nodes if n.op in ("dense", "conv2d")).consts["weight"]
    assert np.array_equal(weight, model[1].weight_codes().numpy())
    if quantizer == "statsq":  # odd codes 2k + 1
        assert bool((weight % 2 != 0).all()) and int(np.abs(weight).max()) < 2 ** bits
    else:
        assert -(2 ** (bits - 1)) <= int(weight.min()) <= int(weight.max()) < 2 ** (bits - 1)
    scale = graph.nodes[len(ops) - 1 - ops[::-1].index("scale_shift")].consts["scale"]
    assert int(scale.max()) < 2 ** (multiplier_bits - 1)
    assert int(scale.min()) >= 2 ** (multiplier_bits - 2)


# -- tiny-vit --------------------------------------------------------------------------
def test_tiny_vit_two_bit_freezes_exactly():
    from qflow.train import fit
    from qflow.zoo import DATASETS, MODELS

    data = DATASETS["digits"]()
    torch.manual_seed(0)
    model = MODELS["tiny-vit"].factory()
    fit(model, data.x_train, data.y_train, epochs=1, lr=2e-3, progress=False)
    qflow.quantize_(model, OFQConfig(weight_bits=2))
    statsq = [n for n, m in model.named_modules() if isinstance(m, StatsQLinear)]
    assert len(statsq) == 12 and "head" not in statsq  # 6 per block; embed, head: QFX
    assert set(statsq) <= set(tracked_layers(model))
    fit(model, data.x_train, data.y_train, epochs=1, lr=2e-3 / 3, progress=False)
    x = torch.as_tensor(data.x_test, dtype=torch.float32)
    graph = freeze(model, x[:8])
    with torch.no_grad():
        y = model.eval()(x).numpy()
    ref = emulate(graph, x.numpy()) * graph.output_type.lsb
    assert int((~(y == ref).all(axis=1)).sum()) == 0


def test_cli_quantize_export_verify(tmp_path):
    run = tmp_path / "run"
    assert main(["quantize", "--method", "ofq", "--model", "tiny-vit", "--bits", "2",
                 "--epochs", "1", "--qat-epochs", "1", "--quiet", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "ofq" and config["weight_bits"] == 2
    export = tmp_path / "export"
    assert main(["export", str(run), "--target", "cpu", "--out", str(export)]) == 0
    assert main(["verify", str(export)]) == 0
    report = json.loads((export / "verify.json").read_text())
    assert report["passed"] and report["mismatching_samples"] == 0
    ran = [r for r in report["results"] if r["role"] != "reference"]
    assert ran and all(r["status"] == "ok" and r["mismatching_samples"] == 0 for r in ran), ran
    assert "QAT model (torch eval)" in {r["artifact"] for r in ran}
