"""BiPer through qflow's method seam: its config, its gradients (against autograd of the
formulas they stand for), its two stages, and QAT eval equal to the frozen graph's
emulator code for code (binary-cnn, binary-mlp, a plain nn.Sequential, the STE baseline)."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

import qflow
from qflow.biper import BinaryConv2d, BinaryLinear, binary_layers, regularization, start_stage
from qflow.biper.functions import BinaryActivation, ClippedSign, PeriodicSign, sign
from qflow.cli import quantize as quantize_cli
from qflow.cli.main import main
from qflow.config import QFXConfig, QuantSpec
from qflow.errors import ConfigError
from qflow.graph import Emulator
from qflow.graph.from_torch import FreezeError
from qflow.methods import config_from_dict, config_from_json, config_from_yaml, method_of
from qflow.numerics.corners import corner_inputs
from qflow.runs import freeze_run, load_run
from qflow.train import calibrate, evaluate, fit
from qflow.zoo import DATASETS, MODELS


@pytest.fixture(scope="module")
def digits():
    return DATASETS["digits"]()


# -- config -----------------------------------------------------------------------------
def test_config_round_trips_through_dict_json_and_yaml():
    config = qflow.BiPerConfig(
        omega0=12.5, estimator="ste", tau1=0.0, stage1_epochs=2, stage2_epochs=None,
        fixed=QFXConfig.with_bits(6),
        overrides={"fc[12]": {"binary": False}, "blocks.0.conv": {"omega0": 5}})
    data = config.to_dict()
    assert data["method"] == "biper" and data["fixed"]["weight"]["bits"] == 6
    assert data["overrides"] == {"fc[12]": {"binary": False}, "blocks.0.conv": {"omega0": 5.0}}
    assert method_of(config).name == "biper"
    assert config_from_dict(data) == config
    assert config_from_json(config.to_json()) == config
    assert config_from_yaml(config.to_yaml()) == config
    assert hash(config_from_yaml(config.to_yaml())) == hash(config)
    assert config_from_yaml("method: biper\n") == qflow.BiPerConfig()
    partial = config_from_yaml("method: biper\nfixed: {activation: {bits: 4}}\n")
    assert partial.fixed.activation.bits == 4 and partial.fixed.weight.bits == 8


@pytest.mark.parametrize(("data", "words"), [
    ({"omega": 20}, "unknown key 'omega'"),
    ({"estimator": "xnor"}, "config.estimator"),
    ({"omega0": 0}, "config.omega0"),
    ({"omega0": "20"}, "config.omega0"),
    ({"tau1": -0.1}, "config.tau1"),
    ({"tau2": True}, "config.tau2"),
    ({"stage1_epochs": -1}, "config.stage1_epochs"),
    ({"stage2_epochs": 1.5}, "config.stage2_epochs"),
    ({"version": 2}, "config version 2"),
    ({"fixed": {"weight": {"bits": 99}}}, "bit width 99"),
    ({"fixed": {"nosuch": 1}}, "config.fixed: unknown key 'nosuch'"),
    ({"fixed": 8}, "config.fixed: expected a mapping"),
    ({"overrides": [1]}, "config.overrides: expected a mapping"),
    ({"overrides": {"fc(": {"binary": True}}}, "not a valid regex"),
    ({"overrides": {"fc1": {"bits": 2}}}, "unknown key 'bits'"),
    ({"overrides": {"fc1": {"binary": "yes"}}}, "binary: expected true or false"),
    ({"overrides": {"fc1": {"omega0": -3}}}, "omega0"),
    ({"overrides": {"fc1": True}}, "expected a mapping with binary"),
    ({"method": "qfx"}, "this is a biper config, not 'qfx'"),
])
def test_bad_configs_are_one_line_config_errors(data, words):
    with pytest.raises(ConfigError) as info:
        qflow.BiPerConfig.from_dict(data)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_an_unknown_config_type_still_lists_the_methods():
    with pytest.raises(ConfigError) as info:
        qflow.quantize_(nn.Sequential(nn.Linear(3, 2)), {"method": "biper"})
    assert "biper (BiPerConfig)" in str(info.value) and "qfx (QFXConfig)" in str(info.value)


def test_phases_tag_and_description():
    method = method_of(qflow.BiPerConfig())
    phases = method.phases(qflow.BiPerConfig(stage1_epochs=0, tau2=0.0), 4)
    assert [(p.name, p.epochs) for p in phases] == [("stage 1", 0), ("stage 2", 4)]
    assert phases[0].regularizer is not None and phases[1].regularizer is None
    ste = qflow.BiPerConfig(estimator="ste")
    assert all(p.regularizer is None for p in method.phases(ste, 3))
    assert method.tag(ste) == "ste-w1a1"
    assert "4-bit" in method.describe(qflow.BiPerConfig().replace_bits(4))


# -- gradients against autograd of the formulas -------------------------------------------
def _approx_sign(u):
    """Forward sign(u); autograd's gradient of the piecewise polynomial is max(0, 2-2|u|)."""
    poly = torch.where(u.abs() <= 1, 2 * u - u * u.abs(), torch.sign(u))
    return poly + (sign(u) - poly).detach()


def _normalized(x):
    var = x.var(dim=tuple(range(1, x.dim())), keepdim=True, correction=0)
    return x / torch.sqrt(var + 1e-5)


@pytest.mark.parametrize("shape", [(6, 3, 5, 5), (7, 11)])
def test_activation_surrogate_gradient_equals_autograd_of_the_formula(shape):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 0.7 + 0.1).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    y = BinaryActivation.apply(x)
    assert torch.equal(y, sign(x))
    (mine,) = torch.autograd.grad(y, x, g)
    (reference,) = torch.autograd.grad(_approx_sign(_normalized(x)), x, g)
    assert torch.allclose(mine, reference, rtol=1e-10, atol=1e-12)
    u = _normalized(x).abs()
    assert (u < 1).any() and (u > 1).any()  # the sample reaches both sides of the clip


def test_periodic_weight_gradient_is_omega_cos():
    torch.manual_seed(1)
    w = (torch.randn(40, dtype=torch.float64) * 0.2).requires_grad_()
    g = torch.randn(40, dtype=torch.float64)
    y = PeriodicSign.apply(w, 20.0)
    assert torch.equal(y, sign(torch.sin(20.0 * w)))
    (mine,) = torch.autograd.grad(y, w, g)
    (reference,) = torch.autograd.grad(torch.sin(20.0 * w), w, g)
    assert torch.allclose(mine, reference, rtol=1e-12)
    (ste,) = torch.autograd.grad(ClippedSign.apply(w * 8), w, g)
    (clip,) = torch.autograd.grad(torch.clamp(w * 8, -1, 1), w, g)
    assert torch.equal(ste, clip) and (ste == 0).any()


def test_sign_of_zero_is_plus_one():
    x = torch.tensor([-1.5, -0.0, 0.0, 1e-30, -1e-30])
    assert sign(x).tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0]
    layer = BinaryLinear.from_float(nn.Linear(4, 3), QFXConfig(), "fc")
    with torch.no_grad():
        layer.weight.zero_()  # sin(0) = 0: every weight code is +1
    assert layer.weight_signs().eq(1).all()


def _float_binary_layer(layer, bn, x):
    """The float formula a stage-2 binary layer with an absorbed BatchNorm trains:
    bn(α · linear(sign(x / s), sign(sin(ω₀·w)))) with the surrogate gradients."""
    s = torch.sin(layer.omega0 * layer.weight)
    weight = s + (sign(s) - s).detach()
    return bn(nn.functional.linear(_approx_sign(_normalized(x)), weight) * layer.alpha)


def test_training_forward_and_gradients_equal_the_float_formula():
    """With 24-bit scale, shift and output formats (quantization error ~1e-6), the fused
    training path equals autograd through the float formula, values and gradients."""
    torch.manual_seed(2)
    wide = QuantSpec(bits=24, signed=True, integer_bits=5)
    fixed = QFXConfig(norm_scale=dataclasses.replace(wide, per_channel=True), bias=wide,
                      activation=wide)
    bn = nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    layer = BinaryLinear.from_float(nn.Linear(10, 6, bias=False), fixed, "fc",
                                    norm=copy.deepcopy(bn), norm_name="bn").train()
    x = torch.randn(32, 10, requires_grad=True)
    g = torch.randn(32, 6)
    # α is not trained where a BatchNorm is absorbed (it divides α out but for its ε)
    assert not layer.alpha.requires_grad
    params = [layer.weight, layer.norm.weight, layer.norm.bias]
    y = layer(x)
    mine = torch.autograd.grad(y, [x, *params], g)
    y_ref = _float_binary_layer(layer, bn, x)
    reference = torch.autograd.grad(y_ref, [x, layer.weight, bn.weight, bn.bias], g)
    assert torch.allclose(y, y_ref, atol=1e-4)
    for a, b in zip(mine, reference, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)
    assert torch.allclose(layer.norm.running_mean, bn.running_mean, atol=1e-5)


# -- quantize_, stages and freeze ------------------------------------------------------------
def _plain_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32),
                         nn.Linear(32, 32), nn.BatchNorm1d(32),
                         nn.Linear(32, 24, bias=False), nn.ReLU(),
                         nn.Linear(24, 10))


def test_quantize_makes_inner_layers_binary_and_absorbs_their_batchnorm():
    model = qflow.quantize_(_plain_mlp(), qflow.BiPerConfig())
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["QInput", "Flatten", "QLinear", "QBatchNorm1d", "BinaryLinear",
                     "Identity", "BinaryLinear", "QReLU", "QLinear"]
    assert model[4].norm is not None and model[6].norm is None
    assert all(layer.current_stage == 2 for layer in binary_layers(model))
    calibrate(model, torch.rand(16, 1, 8, 8))
    rows = {(r.layer, r.tensor) for r in qflow.describe(model)}
    assert {("3", "scale"), ("3", "output"), ("5", "scale")} <= rows


def test_overrides_choose_binary_layers_and_their_frequency():
    config = qflow.BiPerConfig(overrides={"1": {"binary": True, "omega0": 7},
                                          "3": {"binary": False}})
    model = qflow.quantize_(_plain_mlp(), config)
    assert isinstance(model[2], BinaryLinear) and model[2].omega0 == 7.0
    assert type(model[4]).__name__ == "QLinear" and type(model[5]).__name__ == "QBatchNorm1d"
    assert isinstance(model[6], BinaryLinear) and model[6].omega0 == 20.0
    untouched = _plain_mlp()
    with pytest.raises(ConfigError, match="'fc9' matches no weight layer"):
        qflow.quantize_(untouched, qflow.BiPerConfig(overrides={"fc9": {"binary": True}}))
    assert type(untouched[1]) is nn.Linear and not hasattr(untouched, "qflow_input")


def test_alpha_starts_at_the_mean_magnitude_and_warm_starts_in_stage_2():
    torch.manual_seed(3)
    model = qflow.quantize_(_plain_mlp(), qflow.BiPerConfig())
    layer = model[4]
    expected = torch.sin(20.0 * layer.weight).abs().mean(dim=1)
    assert torch.allclose(layer.alpha, expected)
    with torch.no_grad():
        layer.weight.mul_(0.5)
        layer.alpha.fill_(3.0)
    start_stage(model, 2)
    assert torch.allclose(layer.alpha, torch.sin(20.0 * layer.weight).abs().mean(dim=1))
    ste = qflow.quantize_(_plain_mlp(), qflow.BiPerConfig(estimator="ste"))
    assert torch.allclose(ste[4].alpha, ste[4].weight.abs().mean(dim=1))


def test_stage_switch_changes_the_weights_and_loads_with_the_state(digits):
    model = qflow.quantize_(_plain_mlp(), qflow.BiPerConfig())
    x = torch.as_tensor(digits.x_test[:64])
    calibrate(model, x)
    layer = model[4]
    start_stage(model, 1)
    assert [m.current_stage for m in binary_layers(model)] == [1, 1]
    assert not layer.out_quant.is_initialized  # formats restart from the first batch
    assert model.qflow_input.quant.is_initialized  # but not the input's
    layer.eval()
    assert torch.equal(layer._weights(torch.float64),
                       torch.sin(20.0 * layer.weight.double()))
    with pytest.raises(FreezeError, match="stage 1") as info:
        qflow.freeze(model, x[:2])
    assert "\n" not in str(info.value)
    state = model.state_dict()
    fresh = qflow.quantize_(_plain_mlp(), qflow.BiPerConfig())
    fresh.load_state_dict(state)
    assert fresh[4].current_stage == 1
    start_stage(model, 2)
    assert torch.equal(layer._weights(torch.float64), sign(torch.sin(20.0 * layer.weight.double())))


def test_regularizer_is_tau_times_the_mean_sine_square():
    model = qflow.quantize_(_plain_mlp(), qflow.BiPerConfig(overrides={"5": {"omega0": 3}}))
    expected = sum(torch.sin(m.omega0 * m.weight).square().mean() for m in (model[4], model[6]))
    assert torch.allclose(regularization(model, 0.25), 0.25 * expected)
    regularization(model, 0.25).backward()
    assert model[4].weight.grad is not None


# -- training and exactness ------------------------------------------------------------------
def _train(model, config, data, *, epochs=1, samples=512, lr=3e-3):
    calibrate(model, data.x_train[:256])
    for index, phase in enumerate(method_of(config).phases(config, epochs), start=1):
        phase.prepare(model)
        fit(model, data.x_train[:samples], data.y_train[:samples], epochs=phase.epochs,
            lr=lr * phase.lr_scale, seed=index, progress=False, regularizer=phase.regularizer)
    return model.eval()


def _mismatches(model, x) -> int:
    graph = qflow.freeze(model, torch.as_tensor(x[:2]))
    assert any(n.op == "sign" for n in graph.nodes)
    for node in graph.nodes:
        if node.op in ("dense", "conv2d") and node.inputs[0].endswith("_sign"):
            assert set(np.unique(node.consts["weight"])) <= {-1, 1}
            assert not node.consts["weight_frac"].any()
    x = np.concatenate([x, corner_inputs(graph.input_type, x.shape[1:], 128)])
    emulated = Emulator(graph).run(x)
    with torch.no_grad():
        out = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
    scaled = np.ldexp(out.astype(np.float64), graph.output_type.fractional)
    assert np.array_equal(scaled, np.rint(scaled))
    return int((scaled != emulated).reshape(len(x), -1).any(axis=1).sum())


@pytest.mark.parametrize(("build", "estimator"), [
    (MODELS["binary-cnn"].factory, "biper"),
    (MODELS["binary-mlp"].factory, "biper"),
    (_plain_mlp, "biper"),
    (MODELS["binary-mlp"].factory, "ste"),
])
def test_qat_eval_equals_the_emulator(digits, build, estimator):
    torch.manual_seed(0)
    config = qflow.BiPerConfig(estimator=estimator)
    model = _train(qflow.quantize_(build(), config), config, digits, samples=384)
    assert _mismatches(model, digits.x_test) == 0


def test_two_stage_fit_learns_and_the_frozen_model_agrees(digits):
    torch.manual_seed(0)
    config = qflow.BiPerConfig()
    model = _train(qflow.quantize_(MODELS["binary-mlp"].factory(), config), config, digits,
                   epochs=3, samples=len(digits.x_train))
    accuracy = evaluate(model, digits.x_test, digits.y_test)
    assert accuracy > 60.0  # chance is 10 %
    graph = qflow.freeze(model, torch.as_tensor(digits.x_test[:2]))
    decided = Emulator(graph).run(digits.x_test).argmax(axis=1)
    assert 100.0 * float((decided == digits.y_test).mean()) == pytest.approx(accuracy)


def test_statistics_are_reestimated_from_what_eval_mode_gives_each_layer(digits):
    torch.manual_seed(0)
    config = qflow.BiPerConfig()
    model = _train(qflow.quantize_(MODELS["binary-mlp"].factory(), config), config, digits,
                   samples=256)
    x = torch.as_tensor(digits.x_train[:256])  # one batch: the statistics are its own
    method_of(config).finish(model, x)  # what qflow quantize runs after stage 2
    layer = model.fc2
    seen = []
    hook = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    z = nn.functional.linear(sign(seen[0]), layer.weight_signs()) * layer.alpha.double()
    assert torch.allclose(layer.norm.running_mean.double(), z.mean(0), atol=1e-5)
    assert torch.allclose(layer.norm.running_var.double(), z.var(0), rtol=1e-4)
    assert not model.training


def test_model_image_size_is_free():
    model = qflow.quantize_(MODELS["binary-cnn"].factory(), qflow.BiPerConfig())
    x = torch.rand(3, 1, 28, 28)
    calibrate(model, x)
    graph = qflow.freeze(model.eval(), x[:2])
    with torch.no_grad():
        out = model(x).numpy()
    assert np.array_equal(Emulator(graph).run(x.numpy()) * graph.output_type.lsb, out)


def test_cli_writes_a_biper_run_that_loads_and_freezes(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["quantize", "--method", "biper", "--model", "binary-mlp", "--epochs", "1",
                 "--qat-epochs", "1", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "run.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert info["method"] == "biper"
    assert [r["phase"] for r in metrics["qat_history"]] == ["stage 1", "stage 2"]
    assert json.loads((out / "config.json").read_text())["method"] == "biper"
    model, _ = load_run(out)
    assert [m.current_stage for m in binary_layers(model)] == [2, 2]
    graph, _ = freeze_run(out)
    assert sum(n.op == "sign" for n in graph.nodes) == 2


def test_a_run_interrupted_in_stage_2_resumes_to_the_same_checkpoint(tmp_path, monkeypatch):
    """Resuming replays both stages' prepare, then loads the saved state (stage, α,
    formats, statistics): the result equals an uninterrupted run's, tensor for tensor."""
    args = ["quantize", "--method", "biper", "--model", "binary-mlp", "--epochs", "1",
            "--qat-epochs", "2", "--quiet", "--out"]
    assert main([*args, str(tmp_path / "whole")]) == 0
    real_fit = quantize_cli.fit

    def interrupted_fit(*fit_args, checkpoint=None, description="", **kwargs):
        def save_then_stop(state):
            checkpoint(state)
            if description == "stage 2":
                raise KeyboardInterrupt

        return real_fit(*fit_args, checkpoint=save_then_stop, description=description,
                        **kwargs)

    monkeypatch.setattr(quantize_cli, "fit", interrupted_fit)
    assert main([*args, str(tmp_path / "run")]) == 130
    monkeypatch.setattr(quantize_cli, "fit", real_fit)
    assert main([*args, str(tmp_path / "run"), "--resume"]) == 0
    whole, resumed = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
                      for name in ("whole", "run"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_conv_layer_freezes_to_sign_conv_scale_shift_cast():
    model = qflow.quantize_(MODELS["binary-cnn"].factory(), qflow.BiPerConfig())
    x = torch.rand(4, 1, 8, 8)
    calibrate(model, x)
    graph = qflow.freeze(model.eval(), x[:2])
    ops = [n.op for n in graph.nodes if n.source == "group1.0.conv"]
    assert ops == ["sign", "conv2d", "scale_shift", "cast"]
    assert isinstance(model.group1[0].conv, BinaryConv2d)
    assert isinstance(model.group1[0].bn, nn.Identity)
