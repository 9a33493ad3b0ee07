"""qflow.quantize_ and qflow.describe: module swaps, input quantizer, warnings,
BatchNorm folding, per-layer overrides, and a bit-exact check of QLinear against numpy."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from qflow.api import describe, quantize_
from qflow.config import LayerOverride, QFXConfig, QuantSpec, SpecOverride
from qflow.errors import ConfigError, QflowError
from qflow.nn import (
    Add,
    QAdaptiveAvgPool2d,
    QAdd,
    QAvgPool2d,
    QBatchNorm1d,
    QBatchNorm2d,
    QConv2d,
    QInput,
    QLinear,
    QMaxPool2d,
    QReLU,
)
from qflow.numerics import cast, from_codes, to_codes
from qflow.quantizers import FixedQuantizer

# The swap table of docs/qfx.md and qflow/nn/__init__.py, written out independently.
EXPECTED_SWAPS = {
    nn.Linear: QLinear,
    nn.Conv2d: QConv2d,
    nn.BatchNorm1d: QBatchNorm1d,
    nn.BatchNorm2d: QBatchNorm2d,
    nn.ReLU: QReLU,
    Add: QAdd,
    nn.AvgPool2d: QAvgPool2d,
    nn.AdaptiveAvgPool2d: QAdaptiveAvgPool2d,
    nn.MaxPool2d: QMaxPool2d,
}


def on_grid(values, t) -> bool:
    """True when every value is exactly a code of fixed-point type ``t`` (in range)."""
    values = np.asarray(values, dtype=np.float64)
    return bool(np.array_equal(from_codes(to_codes(values, t), t), values))


class Residual(nn.Module):
    """fc1 -> relu1 -> fc2, added to the (quantized) input, then relu2 -> head."""

    def __init__(self, n: int = 6):
        super().__init__()
        self.fc1 = nn.Linear(n, n)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(n, n)
        self.add = Add()
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(n, 3)

    def forward(self, x):
        y = self.fc2(self.relu1(self.fc1(x)))
        return self.head(self.relu2(self.add(x, y)))


def _every_supported_sequential() -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(2, 4, 3, padding=1)),
        ("bn2", nn.BatchNorm2d(4)),
        ("relu1", nn.ReLU()),
        ("maxpool", nn.MaxPool2d(2)),
        ("avgpool", nn.AvgPool2d(2)),
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("drop", nn.Dropout(0.1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(4, 5)),
        ("bn1", nn.BatchNorm1d(5)),
        ("relu2", nn.ReLU()),
        ("ident", nn.Identity()),
    ]))


# -- swaps ---------------------------------------------------------------------------------


def test_sequential_swaps_exactly_the_supported_modules():
    torch.manual_seed(0)
    model = _every_supported_sequential()
    before = {name: module for name, module in model.named_children()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every module here is supported or passthrough
        out = quantize_(model, QFXConfig())
    assert out is model
    names = [name for name, _ in model.named_children()]
    assert names == ["qflow_input", *before]
    assert isinstance(model[0], QInput)
    for name, old in before.items():
        new = getattr(model, name)
        expected = EXPECTED_SWAPS.get(type(old))
        if expected is None:
            assert new is old, name  # passthrough modules are kept as they are
        else:
            assert type(new) is expected, name
            assert new.qflow_name == name
    # parameters and buffers are carried over
    assert torch.equal(model.conv.weight, before["conv"].weight)
    assert torch.equal(model.fc.bias, before["fc"].bias)
    assert torch.equal(model.bn2.running_var, before["bn2"].running_var)
    out = model.train()(torch.rand(3, 2, 8, 8))
    assert out.shape == (3, 5)


def test_custom_module_with_residual_add():
    model = Residual()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_(model, QFXConfig())
    kinds = {name: type(m) for name, m in model.named_children()}
    assert kinds == {"fc1": QLinear, "relu1": QReLU, "fc2": QLinear, "add": QAdd,
                     "relu2": QReLU, "head": QLinear, "qflow_input": QInput}
    assert model(torch.randn(4, 6)).shape == (4, 3)


def test_nested_modules_are_swapped_by_dotted_name():
    model = nn.Sequential(OrderedDict([
        ("block", nn.Sequential(OrderedDict([("fc", nn.Linear(3, 3)), ("act", nn.ReLU())]))),
        ("head", nn.Linear(3, 2)),
    ]))
    cfg = QFXConfig(overrides=(LayerOverride(pattern="block.fc", weight=SpecOverride(bits=3)),))
    quantize_(model, cfg)
    assert isinstance(model.block.fc, QLinear) and model.block.fc.qflow_name == "block.fc"
    assert isinstance(model.block.act, QReLU)
    assert model.block.fc.weight_quant.spec.bits == 3
    assert model.head.weight_quant.spec.bits == 8


def test_subclasses_are_not_swapped_and_are_refused():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(3, 3), MyLinear(3, 2))
    with pytest.raises(ConfigError, match=r"1 \(MyLinear\)"):
        quantize_(model, QFXConfig())
    assert type(model[0]) is nn.Linear and type(model[1]) is MyLinear  # left untouched


# -- input quantizer ----------------------------------------------------------------------------


def _raw_input(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(16, 5, generator=g, dtype=torch.float64) * 2 - 1


def test_sequential_input_quantizer_is_first_and_quantizes():
    model = quantize_(nn.Sequential(nn.Flatten()), QFXConfig.with_bits(5))
    assert next(iter(model.named_children()))[0] == "qflow_input"
    x = _raw_input()
    y = model.eval()(x)
    t = model.qflow_input.quant.fixed_type()
    assert t.width == 5 and t.signed  # sign picked from the data
    assert not on_grid(x, t)  # the raw input is not on the grid, so the check has teeth
    assert on_grid(y.detach(), t)
    assert np.array_equal(y.detach().numpy(), cast(x.numpy(), t))


class _Passthrough(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()

    def forward(self, x):
        return self.flatten(x)


def test_custom_module_input_quantizer_runs_as_pre_hook():
    model = quantize_(_Passthrough(), QFXConfig.with_bits(5))
    assert isinstance(model.qflow_input, QInput)
    x = _raw_input(1)
    y = model.eval()(x)
    t = model.qflow_input.quant.fixed_type()
    assert t.width == 5
    assert not on_grid(x, t)
    assert on_grid(y.detach(), t)
    assert np.array_equal(y.detach().numpy(), cast(x.numpy(), t))


def test_custom_module_input_passed_by_keyword_is_quantized():
    # model(x=...) is an ordinary way to call a module whose forward takes ``x``; the input
    # quantizer must still run (the pre-hook should be registered with_kwargs).
    model = quantize_(_Passthrough(), QFXConfig.with_bits(5))
    x = _raw_input(2)
    y = model.eval()(x=x)
    t = model.qflow_input.quant.fixed_type()
    assert on_grid(y.detach(), t)
    assert np.array_equal(y.detach().numpy(), cast(x.numpy(), t))


def test_residual_model_adds_the_quantized_input():
    torch.manual_seed(1)
    model = quantize_(Residual(), QFXConfig())
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model.eval()(x)  # initialize
    seen = {}

    def spy(module, args):
        seen["a"] = args[0]

    model.add.register_forward_pre_hook(spy)
    model(x)
    t = model.qflow_input.quant.fixed_type()
    assert torch.equal(seen["a"], torch.from_numpy(cast(x.numpy(), t)))


# -- warnings and errors ------------------------------------------------------------------------


def test_unsupported_modules_are_refused_with_their_names():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2), nn.Sigmoid())
    with pytest.raises(ConfigError) as info:
        quantize_(model, QFXConfig())
    message = str(info.value)
    assert "\n" not in message
    assert "1 (Tanh)" in message and "3 (Sigmoid)" in message
    assert "0 (Linear)" not in message and "2 (Linear)" not in message
    assert type(model[0]) is nn.Linear and not hasattr(model, "qflow_input")  # untouched


def test_unsupported_module_in_custom_model_is_refused():
    class WithTanh(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.squash = nn.Tanh()

        def forward(self, x):
            return self.squash(self.fc(x))

    with pytest.raises(ConfigError, match=r"squash \(Tanh\)"):
        quantize_(WithTanh(), QFXConfig())


def test_supported_root_module_is_not_silently_left_float():
    # quantize_(nn.Linear(...)) cannot swap the root in place; it must say so (warning or
    # error) rather than return a float Linear that looks quantized.
    model = nn.Linear(4, 2)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            quantize_(model, QFXConfig())
    except QflowError:
        return
    assert any("Linear" in str(w.message) for w in record), [str(w.message) for w in record]


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(3, 2)), Residual])
def test_quantizing_twice_raises(make):
    model = quantize_(make(), QFXConfig())
    with pytest.raises(QflowError, match="already quantized"):
        quantize_(model, QFXConfig())


def test_config_must_be_a_qfxconfig():
    with pytest.raises(ConfigError):
        quantize_(nn.Sequential(nn.Linear(2, 2)), {"weight": {"bits": 4}})


# -- BatchNorm folding --------------------------------------------------------------------------


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm, g: torch.Generator) -> None:
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=g))


def _conv_linear_bn_model(g: torch.Generator) -> nn.Sequential:
    torch.manual_seed(int(torch.randint(0, 1000, (1,), generator=g)))
    model = nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(1, 4, 3, bias=False)), ("bn2", nn.BatchNorm2d(4)),
        ("relu", nn.ReLU()), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(4 * 4 * 4, 5)), ("bn1", nn.BatchNorm1d(5)),
    ]))
    _randomize_bn(model.bn2, g)
    _randomize_bn(model.bn1, g)
    return model


def test_fold_batchnorm_conv_and_linear():
    g = torch.Generator().manual_seed(0)
    model = _conv_linear_bn_model(g)
    bn2, bn1 = model.bn2, model.bn1
    reference = _conv_linear_bn_model(torch.Generator().manual_seed(0)).eval()
    cfg = QFXConfig.with_bits(16, fold_batchnorm=True,
                              bias=QuantSpec(bits=24, signed=True))
    quantize_(model, cfg)
    assert isinstance(model.conv, QConv2d) and model.conv.folded_bn is bn2
    assert isinstance(model.fc, QLinear) and model.fc.folded_bn is bn1
    assert type(model.bn2) is nn.Identity and type(model.bn1) is nn.Identity
    assert not any(isinstance(m, QBatchNorm1d | QBatchNorm2d) for m in model.modules())
    # The folded model computes the float conv -> BN -> ... -> linear -> BN closely
    # (16-bit formats); without the fold (scale and shift dropped) it would be far off.
    x = torch.rand(32, 1, 6, 6, generator=g)
    expected = reference(x).double()
    got = model.eval()(x)
    assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
    unfolded = reference[:5](x).double()  # linear output before bn1
    assert not torch.allclose(got, unfolded, atol=0.1)
    # a bias row exists for the folded bias-free conv
    rows = {(r.layer, r.tensor) for r in describe(model)}
    assert ("conv", "bias") in rows and ("fc", "bias") in rows


def test_fold_batchnorm_when_bn_is_declared_before_its_layer():
    # Declaration order is not execution order: the BatchNorm follows the linear layer in
    # forward() even though it is created first in __init__.
    class BnFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.bn(self.fc(x))

    model = BnFirst()
    bn = model.bn
    quantize_(model, QFXConfig(fold_batchnorm=True))
    assert model.fc.folded_bn is bn
    assert type(model.bn) is nn.Identity


@pytest.mark.parametrize("layers", [
    lambda: [nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4)],  # BN after ReLU
    lambda: [nn.BatchNorm1d(4), nn.Linear(4, 4)],  # BN on the input
    lambda: [nn.Conv2d(1, 2, 1), nn.MaxPool2d(1), nn.BatchNorm2d(2)],
])
def test_fold_batchnorm_rejects_bn_not_after_conv_or_linear(layers):
    model = nn.Sequential(*layers())
    with pytest.raises(ConfigError, match="fold_batchnorm"):
        quantize_(model, QFXConfig(fold_batchnorm=True))
    assert not hasattr(model, "qflow_input")  # nothing was changed
    assert all(not isinstance(m, QInput | QLinear | QConv2d) for m in model.modules())


def test_fold_batchnorm_rejects_layer_with_two_users():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            y = self.fc(x)
            return self.bn(y) + y

    with pytest.raises(ConfigError, match="fold_batchnorm"):
        quantize_(TwoUsers(), QFXConfig(fold_batchnorm=True))


# -- overrides ----------------------------------------------------------------------------------


def _mlp() -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(12, 10)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(10, 8)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(8, 3)),
    ]))


def test_per_layer_overrides_reach_the_right_layers():
    torch.manual_seed(2)
    cfg = QFXConfig(overrides=(
        LayerOverride(pattern="fc1", weight=SpecOverride(bits=4)),
        LayerOverride(pattern="relu[12]", activation=SpecOverride(bits=6, rounding="TRN")),
        LayerOverride(pattern="input", input=SpecOverride(bits=10)),
    ))
    model = quantize_(_mlp(), cfg)
    model.train()(torch.randn(32, 12))  # initialize every quantizer
    assert model.fc1.weight_quant.spec.bits == 4
    assert model.fc2.weight_quant.spec.bits == 8 and model.fc3.weight_quant.spec.bits == 8
    assert {t.width for t in model.fc1.weight_quant.fixed_types()} == {4}
    assert {t.width for t in model.fc2.weight_quant.fixed_types()} == {8}
    assert model.relu1.out_quant.fixed_type().width == 6
    assert str(model.relu2.out_quant.fixed_type().rounding) == "TRN"
    assert model.qflow_input.quant.fixed_type().width == 10
    # the quantized fc1 weights are 4-bit values; fc2's 8-bit ones are not
    w1 = model.eval().fc1.weight_quant(model.fc1.weight.double()).detach().numpy()
    for row, t in zip(w1, model.fc1.weight_quant.fixed_types(), strict=True):
        assert on_grid(row, t)
    w2 = model.fc2.weight_quant(model.fc2.weight.double()).detach().numpy()
    types2 = model.fc2.weight_quant.fixed_types()
    assert all(on_grid(row, t) for row, t in zip(w2, types2, strict=True))
    assert not all(on_grid(row, t.replace(fractional=t.fractional - 4))
                   for row, t in zip(w2, types2, strict=True))


@pytest.mark.parametrize(("override", "words"), [
    (LayerOverride(pattern="fc9", weight=SpecOverride(bits=4)),
     ["'fc9'", "weight", "fc1, fc2, fc3"]),
    # the name exists, but a ReLU has no weight: the override would do nothing
    (LayerOverride(pattern="relu1", weight=SpecOverride(bits=4)),
     ["'relu1'", "weight", "fc1, fc2, fc3"]),
    (LayerOverride(pattern="fc[12]", activation=SpecOverride(bits=4)),
     ["'fc[12]'", "activation", "relu1, relu2"]),
])
def test_override_reaching_no_layer_is_refused(override, words):
    model = _mlp()
    with pytest.raises(ConfigError) as info:
        quantize_(model, QFXConfig(overrides=(override,)))
    for word in words:
        assert word in str(info.value)
    assert type(model.fc1) is nn.Linear and not hasattr(model, "qflow_input")  # untouched


# -- describe -----------------------------------------------------------------------------------


def test_describe_rows_match_quantizer_types():
    torch.manual_seed(3)
    model = _mlp()
    with torch.no_grad():
        model.fc1.weight[0] *= 40  # channels of very different magnitude
        model.fc1.weight[1] *= 0.05
    model.fc3.bias = None
    cfg = QFXConfig(overrides=(LayerOverride(pattern="fc2", weight=SpecOverride(
        khot=2, rounding="RND", overflow="SAT_SYM")),))
    quantize_(model, cfg)
    model.train()(torch.randn(16, 12))
    rows = describe(model)
    got = {(r.layer, r.tensor) for r in rows}
    assert got == {("input", "input"), ("fc1", "weight"), ("fc1", "bias"), ("relu1", "output"),
                   ("fc2", "weight"), ("fc2", "bias"), ("relu2", "output"), ("fc3", "weight")}
    assert len(rows) == len(got)
    quantizers = {
        ("input", "input"): model.qflow_input.quant,
        ("fc1", "weight"): model.fc1.weight_quant, ("fc1", "bias"): model.fc1.bias_quant,
        ("relu1", "output"): model.relu1.out_quant,
        ("fc2", "weight"): model.fc2.weight_quant, ("fc2", "bias"): model.fc2.bias_quant,
        ("relu2", "output"): model.relu2.out_quant, ("fc3", "weight"): model.fc3.weight_quant,
    }
    for row in rows:
        q: FixedQuantizer = quantizers[(row.layer, row.tensor)]
        types = q.fixed_types()
        ints = [t.int_width for t in types]
        assert row.width == q.spec.bits == types[0].width
        assert (row.int_width_min, row.int_width_max) == (min(ints), max(ints))
        assert row.signed == types[0].signed
        assert row.rounding == str(q.spec.rounding) and row.overflow == str(q.spec.overflow)
        assert row.khot == q.spec.khot
    fc1 = next(r for r in rows if (r.layer, r.tensor) == ("fc1", "weight"))
    assert fc1.int_width_min < fc1.int_width_max
    assert fc1.int_width == f"{fc1.int_width_min}..{fc1.int_width_max}"
    fc2 = next(r for r in rows if (r.layer, r.tensor) == ("fc2", "weight"))
    assert (fc2.khot, fc2.rounding, fc2.overflow) == (2, "RND", "SAT_SYM")
    relu = next(r for r in rows if r.layer == "relu1")
    assert relu.signed is False and relu.int_width == str(relu.int_width_min)


# -- bit exactness ------------------------------------------------------------------------------


def test_qlinear_eval_equals_numpy_bit_for_bit():
    torch.manual_seed(4)
    model = nn.Sequential(OrderedDict([("fc", nn.Linear(16, 8))]))
    with torch.no_grad():
        model.fc.weight.mul_(torch.logspace(-2, 1, 8).reshape(-1, 1))  # per-channel ranges
    cfg = QFXConfig.with_bits(6, bias=QuantSpec(bits=10, signed=True))
    quantize_(model, cfg)
    x_train = torch.randn(64, 16) * 3
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):  # move the weights and integer bits off their start values
        opt.zero_grad()
        model.train()(x_train).square().mean().backward()
        opt.step()

    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(5)) * 3
    got = model.eval()(x)
    assert got.dtype == torch.float64

    layer = model.fc
    t_in = model.qflow_input.quant.fixed_type()
    w_types = layer.weight_quant.fixed_types()
    (t_b,) = layer.bias_quant.fixed_types()
    assert len({t.fractional for t in w_types}) > 1  # really per channel
    xq = cast(x.numpy().astype(np.float64), t_in)
    w = layer.weight.detach().numpy().astype(np.float64)
    wq = np.stack([cast(row, t) for row, t in zip(w, w_types, strict=True)])
    bq = cast(layer.bias.detach().numpy().astype(np.float64), t_b)
    expected = xq @ wq.T + bq  # exact: every partial sum is a short dyadic number
    assert np.array_equal(got.detach().numpy(), expected)
    # and the float layer is measurably different, so equality is not trivial
    assert not np.array_equal(x.double().numpy() @ w.T + layer.bias.detach().double().numpy(),
                              expected)
