"""QFX quantizers and modules: outputs on their fixed-point grids, K-hot codes, per-channel
formats, the documented gradient of cast_trainable, BatchNorm, pooling, training and
state-dict round trips."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qflow.api import quantize_
from qflow.config import LayerOverride, QFXConfig, QuantSpec, SpecOverride
from qflow.nn import (
    Add,
    QAdaptiveAvgPool2d,
    QAdd,
    QAvgPool2d,
    QBatchNorm2d,
    QLinear,
    QMaxPool2d,
    QReLU,
)
from qflow.numerics import FixedType, Overflow, Rounding, cast, from_codes, to_codes
from qflow.ops import cast_trainable
from qflow.quantizers import FixedQuantizer
from qflow.zoo.models import DigitsCNN

LN2 = math.log(2.0)


def on_grid(values, t: FixedType) -> bool:
    """Every value is exactly a code of ``t`` (so also inside its range)."""
    values = np.asarray(values, dtype=np.float64)
    return bool(np.array_equal(from_codes(to_codes(values, t), t), values))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- every quantizer output is on its grid -----------------------------------------------------

GRID_CASES = [
    # bits, signed, integer_bits, rounding, overflow, per_channel
    (8, True, None, "RND_CONV", "SAT", False),
    (8, True, None, "RND_CONV", "SAT", True),
    (4, True, 0, "TRN", "SAT", True),
    (4, False, 1, "RND", "SAT", False),
    (5, True, 1, "RND_ZERO", "SAT_SYM", True),
    (6, True, 0, "RND_INF", "SAT_ZERO", False),
    (3, True, 0, "RND_MIN_INF", "WRAP", True),
    (7, False, -1, "TRN_ZERO", "WRAP", False),
    (1, True, 0, "RND_CONV", "SAT", False),
    (1, False, 0, "TRN", "SAT", True),
    (16, None, None, "RND_CONV", "SAT", True),
]


@pytest.mark.parametrize(("bits", "signed", "integer_bits", "rounding", "overflow",
                          "per_channel"), GRID_CASES)
def test_quantizer_output_on_grid_and_in_range(bits, signed, integer_bits, rounding, overflow,
                                               per_channel):
    spec = QuantSpec(bits=bits, signed=signed, integer_bits=integer_bits, rounding=rounding,
                     overflow=overflow, per_channel=per_channel)
    q = FixedQuantizer(spec, channels=4, ndim=2)
    scales = torch.tensor([[0.05], [0.7], [3.0], [40.0]], dtype=torch.float64)
    x = torch.randn(4, 200, generator=_gen(bits), dtype=torch.float64) * scales
    y = q(x).detach().numpy()
    types = q.fixed_types()
    assert len(types) == (4 if per_channel else 1)
    for c in range(4):
        t = types[c] if per_channel else types[0]
        assert t.width == bits
        assert on_grid(y[c], t), (c, t)
        low = -t.qmax * t.lsb if (t.overflow is Overflow.SAT_SYM and t.signed
                                  and t.width > 1) else t.min_value
        assert y[c].min() >= low and y[c].max() <= t.max_value
        # the quantizer equals the numpy cast to its type (an independent code path)
        assert np.array_equal(y[c], cast(x[c].numpy(), t))
    # the raw data is not on those grids, so the check above can fail
    assert not all(on_grid(x[c].numpy(), types[c if per_channel else 0]) for c in range(4))


def test_quantizer_float32_training_path_is_on_grid():
    q = FixedQuantizer(QuantSpec(bits=8, signed=True, per_channel=True), channels=3, ndim=2)
    x = torch.randn(3, 50, generator=_gen(7)) * torch.tensor([[0.1], [1.0], [9.0]])
    y = q(x)
    assert y.dtype == torch.float32
    for row, t in zip(y.detach().double().numpy(), q.fixed_types(), strict=True):
        assert on_grid(row, t)


def test_quantizer_sign_and_start_from_first_tensor():
    q = FixedQuantizer(QuantSpec(bits=8))  # sign and integer bits from the data
    x = torch.tensor([0.0, 0.5, 2.9, 1.2], dtype=torch.float64)
    q(x)
    t = q.fixed_type()
    assert t.signed is False
    assert t.max_value >= 2.9  # holds the peak (2 integer bits: max 3.98...)
    assert t.integer == 2
    # a later, larger tensor does not re-initialize (SAT clamps it)
    y = q(torch.tensor([100.0], dtype=torch.float64))
    assert float(y.detach()[0]) == t.max_value


# -- K-hot ---------------------------------------------------------------------------------------


def signed_digits(n: int) -> int:
    """Fewest signed powers of two summing to ``n`` (the weight of its non-adjacent form)."""
    n, count = abs(int(n)), 0
    while n:
        if n & 1:
            n -= 2 - (n % 4)  # digit +1 when n % 4 == 1, -1 when n % 4 == 3
            count += 1
        n >>= 1
    return count


def test_signed_digits_helper():
    # by hand: 0 = {}, 1 = 1, 3 = 4 - 1, 5 = 4 + 1, 7 = 8 - 1, 11 = 8 + 4 - 1, 45 = 32+16-4+1
    assert [signed_digits(n) for n in (0, 1, 3, 5, 7, 11, 45, -7, 64)] == [0, 1, 2, 2, 2, 3, 4,
                                                                            2, 1]


@pytest.mark.parametrize("khot", [1, 2])
def test_khot_weight_codes_are_sums_of_k_signed_powers_of_two(khot):
    torch.manual_seed(khot)
    model = nn.Sequential(OrderedDict([("fc", nn.Linear(24, 6)), ("head", nn.Linear(6, 2))]))
    cfg = QFXConfig(overrides=(LayerOverride(pattern="fc", weight=SpecOverride(khot=khot)),))
    quantize_(model, cfg)
    model.train()(torch.randn(8, 24))  # training forward: integer bits are initialized
    model.eval()(torch.randn(8, 24))
    layer: QLinear = model.fc
    wq = layer.weight_quant(layer.weight.double()).detach().numpy()
    types = layer.weight_quant.fixed_types()
    all_codes = []
    for row, t in zip(wq, types, strict=True):
        assert on_grid(row, t)
        codes = to_codes(row, t)
        all_codes.extend(codes.tolist())
        assert max(signed_digits(c) for c in codes) <= khot, codes
    assert any(c != 0 for c in all_codes)
    # the plain 8-bit weights of the other layer are not K-hot, so the check can fail
    head = model.head.weight_quant
    plain = head(model.head.weight.double()).detach().numpy()
    plain_codes = [c for row, t in zip(plain, head.fixed_types(), strict=True)
                   for c in to_codes(row, t)]
    assert max(signed_digits(c) for c in plain_codes) > 2


@pytest.mark.parametrize("khot", [1, 2])
def test_khot_quantizer_no_grad_path(khot):
    q = FixedQuantizer(QuantSpec(bits=6, signed=True, integer_bits=0, khot=khot))
    x = torch.linspace(-1.2, 1.2, 97, dtype=torch.float64)
    with torch.no_grad():
        y = q(x).numpy()
    t = q.fixed_type()
    assert on_grid(y, t)
    assert max(signed_digits(c) for c in to_codes(y, t)) <= khot


# -- per-channel weights -------------------------------------------------------------------------


def test_per_channel_weights_have_per_channel_integer_bits():
    torch.manual_seed(5)
    model = nn.Sequential(OrderedDict([("fc", nn.Linear(16, 4))]))
    with torch.no_grad():
        model.fc.weight.mul_(torch.tensor([[0.01], [0.1], [1.0], [10.0]]))
    quantize_(model, QFXConfig())
    model.train()(torch.randn(4, 16))
    wq = model.fc.weight_quant
    assert wq.per_channel and tuple(wq.integer_bits.shape) == (4, 1)
    ints = [t.integer for t in wq.fixed_types()]
    assert ints == sorted(ints) and len(set(ints)) == 4, ints
    y = wq(model.fc.weight.double()).detach().numpy()
    types = wq.fixed_types()
    for row, t in zip(y, types, strict=True):
        assert on_grid(row, t)
    # the small channel keeps resolution the large channel's type does not have
    assert not on_grid(y[0], types[3])
    assert np.count_nonzero(y[0]) > 8


def test_per_tensor_weights_share_one_type():
    model = nn.Sequential(nn.Linear(8, 3))
    cfg = QFXConfig(weight=QuantSpec(bits=8, signed=True, per_channel=False))
    quantize_(model, cfg)
    model.train()(torch.randn(2, 8))
    assert model[1].weight_quant.integer_bits.shape == ()
    assert len(model[1].weight_quant.fixed_types()) == 1


# -- gradients of cast_trainable ---------------------------------------------------------------
# Hand example: width 4, signed, integer bits i = 0 -> f = 4 - 1 - 0 = 3 fractional bits,
# scale 2**3 = 8, codes [-8, 7], values [-1, 0.875].


def _leaf(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize(("overflow", "expected"), [
    # x = [-2, -1, -0.5, 0.3, 0.875, 0.9, 5]  ->  t = 8x = [-16, -8, -4, 2.4, 7, 7.2, 40]
    ("SAT", [0, 1, 1, 1, 1, 0, 0]),  # inside [-8, 7]; 7.2 is outside although it rounds to 7
    ("SAT_ZERO", [0, 1, 1, 1, 1, 0, 0]),
    ("SAT_SYM", [0, 0, 1, 1, 1, 0, 0]),  # symmetric range [-7, 7]
    ("WRAP", [1, 1, 1, 1, 1, 1, 1]),
])
def test_gradient_wrt_x(overflow, expected):
    x = _leaf([-2.0, -1.0, -0.5, 0.3, 0.875, 0.9, 5.0])
    i = torch.tensor(0.0, dtype=torch.float64)
    y = cast_trainable(x, i, width=4, signed=True, overflow=Overflow(overflow))
    y.sum().backward()
    assert x.grad.tolist() == expected


def test_gradient_wrt_x_float32_and_vector_jacobian():
    x = _leaf([-2.0, 0.3, 0.5, 5.0], dtype=torch.float32)
    i = torch.tensor(0.0)
    y = cast_trainable(x, i, width=4, signed=True)
    y.backward(torch.tensor([3.0, 5.0, 7.0, 11.0]))
    assert x.grad.tolist() == [0.0, 5.0, 7.0, 0.0]


def test_integer_bits_gradient_clipping_dominates():
    # x = [0.3, 2.0]: t = [2.4, 16], q = [2, 7]; 2.4 inside, 16 clipped.
    # dy/di = ln2 * 2**-f * (q - t) inside, ln2 * y outside:
    #   ln2 * ((2 - 2.4) / 8 + 0.875) = ln2 * 0.825 > 0
    i = _leaf(0.0)
    y = cast_trainable(torch.tensor([0.3, 2.0], dtype=torch.float64), i, width=4, signed=True)
    assert y.tolist() == [0.25, 0.875]
    y.sum().backward()
    assert float(i.grad) == pytest.approx(0.825 * LN2, rel=1e-12)
    assert float(i.grad) > 0


def test_integer_bits_gradient_rounding_dominates():
    # x = [0.3, 0.55]: t = [2.4, 4.4], q = [2, 4], both inside:
    #   ln2 * ((2 - 2.4) + (4 - 4.4)) / 8 = -0.1 * ln2 < 0
    i = _leaf(0.0)
    y = cast_trainable(torch.tensor([0.3, 0.55], dtype=torch.float64), i, width=4, signed=True)
    y.sum().backward()
    assert float(i.grad) == pytest.approx(-0.1 * LN2, rel=1e-9)
    assert float(i.grad) < 0


def test_integer_bits_gradient_outside_uses_y_for_negative_values():
    # x = -3: t = -24 clipped to q = -8, y = -1; dy/di = ln2 * y = -ln2
    i = _leaf(0.0)
    cast_trainable(torch.tensor([-3.0], dtype=torch.float64), i, width=4, signed=True).sum() \
        .backward()
    assert float(i.grad) == pytest.approx(-LN2, rel=1e-12)


def test_integer_bits_gradient_with_other_integer_bits_and_grad_scale():
    # i = 2 -> f = 4 - 1 - 2 = 1, scale 2; x = [0.3, 1.6]: t = [0.6, 3.2], q = [1, 3]
    #   dy/di = ln2 * ((1 - 0.6) + (3 - 3.2)) / 2 = 0.1 * ln2, times grad_scale 0.25
    i = _leaf(2.0)
    y = cast_trainable(torch.tensor([0.3, 1.6], dtype=torch.float64), i, width=4, signed=True,
                       grad_scale=0.25)
    assert y.tolist() == [0.5, 1.5]
    y.sum().backward()
    assert float(i.grad) == pytest.approx(0.1 * LN2 * 0.25, rel=1e-9)


def test_integer_bits_are_rounded_straight_through():
    x = torch.tensor([0.3, 2.0], dtype=torch.float64)
    for value, expected in ((0.4, [0.25, 0.875]), (0.6, [0.25, 1.75])):
        i = _leaf(value)
        y = cast_trainable(x, i, width=4, signed=True)
        assert y.tolist() == expected
    # same gradient as at the rounded value (i = 0, see the clipping example)
    i = _leaf(0.4)
    cast_trainable(x, i, width=4, signed=True).sum().backward()
    assert float(i.grad) == pytest.approx(0.825 * LN2, rel=1e-12)


def test_per_channel_integer_bits_gradient():
    # channel 0 = the clipping example (0.825 ln2); channel 1: x = [0.3, 0.1]:
    #   t = [2.4, 0.8], q = [2, 1] -> ln2 * (-0.4 + 0.2) / 8 = -0.025 ln2
    i = _leaf([[0.0], [0.0]])
    x = torch.tensor([[0.3, 2.0], [0.3, 0.1]], dtype=torch.float64)
    cast_trainable(x, i, width=4, signed=True).sum().backward()
    assert i.grad.shape == (2, 1)
    assert i.grad[0, 0].item() == pytest.approx(0.825 * LN2, rel=1e-12)
    assert i.grad[1, 0].item() == pytest.approx(-0.025 * LN2, rel=1e-9)


def test_descent_on_reconstruction_error_moves_the_binary_point():
    # L = sum((y - x)**2). Clipped x = 2: dL/dy = 2 (0.875 - 2) = -2.25, dy/di = 0.875 ln2
    #   -> dL/di = -1.96875 ln2: descent grows i (more range).
    # In-range x = 0.3: dL/dy = 2 (0.25 - 0.3) = -0.1, dy/di = -0.05 ln2
    #   -> dL/di = +0.005 ln2: descent shrinks i (more resolution).
    for value, grad in ((2.0, -1.96875 * LN2), (0.3, 0.005 * LN2)):
        x = torch.tensor([value], dtype=torch.float64)
        i = _leaf(0.0)
        loss = (cast_trainable(x, i, width=4, signed=True) - x).square().sum()
        loss.backward()
        assert float(i.grad) == pytest.approx(grad, rel=1e-9)
        with torch.no_grad():
            i -= 0.1 * i.grad
        assert (float(i.detach()) > 0) == (value == 2.0)


def test_fixed_quantizer_lsq_gradient_scale():
    # 1 / sqrt(n * qmax) with n = 2 values and qmax = 2**3 - 1 = 7 for a signed 4-bit type
    q = FixedQuantizer(QuantSpec(bits=4, signed=True, integer_bits=0))
    q(torch.tensor([0.3, 2.0], dtype=torch.float64)).sum().backward()
    # integer_bits is a float32 parameter, so its gradient is float32
    assert float(q.integer_bits.grad) == pytest.approx(0.825 * LN2 / math.sqrt(14), rel=1e-6)


def test_fixed_quantizer_not_trainable_has_no_gradient():
    q = FixedQuantizer(QuantSpec(bits=4, signed=True, integer_bits=0, trainable=False))
    x = _leaf([0.3, 2.0])
    q(x).sum().backward()
    assert q.integer_bits.grad is None
    assert x.grad.tolist() == [1.0, 0.0]


# -- BatchNorm and pooling ---------------------------------------------------------------------


def test_qbatchnorm2d_eval_equals_quantized_scale_and_shift():
    g = _gen(11)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3, generator=g))
        bn.running_var.copy_(torch.rand(3, generator=g) + 0.2)
        bn.weight.copy_(torch.randn(3, generator=g))
        bn.bias.copy_(torch.randn(3, generator=g))
    layer = QBatchNorm2d.from_float(bn, QFXConfig(), "bn").eval()
    x = torch.randint(-64, 64, (4, 3, 5, 5), generator=g).double() / 16
    y = layer(x).detach().numpy()

    w, b = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    mean = bn.running_mean.double().numpy()
    var = bn.running_var.double().numpy()
    scale = w / np.sqrt(var + bn.eps)
    shift = b - mean * scale
    s_types = layer.scale_quant.fixed_types()
    h_types = layer.shift_quant.fixed_types()
    assert len(s_types) == 3 and {t.width for t in s_types} == {12}  # norm_scale per channel
    assert {t.width for t in h_types} == {16}
    qs = np.array([cast(scale[c], s_types[c]) for c in range(3)])
    qh = np.array([cast(shift[c], h_types[c if len(h_types) == 3 else 0]) for c in range(3)])
    t_out = layer.out_quant.fixed_type()
    assert t_out.width == 16 and t_out.signed
    expected = cast(x.numpy() * qs.reshape(1, 3, 1, 1) + qh.reshape(1, 3, 1, 1), t_out)
    assert np.array_equal(y, expected)
    # the float BatchNorm differs (else the test would not see the quantization)
    assert not np.array_equal(bn.eval()(x.float()).detach().double().numpy(), expected)


def test_batchnorm_scale_grows_its_range_in_training_and_never_clips():
    """QAT shrinks the weights before a BatchNorm, so γ/σ grows past the range its
    binary point was calibrated for; training must widen it (a clipped scale made
    digits-cnn collapse to chance in long QAT), and eval must keep what training set."""
    g = _gen(7)
    bn = nn.BatchNorm2d(3)
    layer = QBatchNorm2d.from_float(bn, QFXConfig(), "bn").train()
    x = torch.randn(8, 3, 4, 4, generator=g)
    layer(x)  # calibrates the scale's binary point on γ/σ ≈ 1
    before = [t.integer for t in layer.scale_quant.fixed_types()]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 1.0, 1.0]))
    small = x * torch.tensor([1.0, 0.01, 1.0]).reshape(1, 3, 1, 1)  # channel 1: σ / 100
    layer(small)
    with torch.no_grad():
        scale = layer.weight / torch.sqrt(small.var(dim=(0, 2, 3), unbiased=False) + layer.eps)
    types = layer.scale_quant.fixed_types()
    assert types[1].integer > before[1]  # grown on the channel that needed it
    assert [t.integer for t in types][::2] == before[::2]  # the others untouched
    for c, t in enumerate(types):
        assert abs(cast(float(scale[c]), t) - float(scale[c])) <= 2.0 ** -t.fractional
    layer.eval()
    layer(small)
    assert [t.integer for t in layer.scale_quant.fixed_types()] == [t.integer for t in types]


def _activation_config(name: str, **spec) -> QFXConfig:
    return QFXConfig(overrides=(LayerOverride(pattern=name, activation=SpecOverride(**spec)),))


def test_qavgpool2d_2x2_equals_exact_mean_cast():
    g = _gen(12)
    layer = QAvgPool2d.from_float(nn.AvgPool2d(2), QFXConfig(), "pool").eval()
    x = torch.randint(0, 256, (2, 3, 6, 4), generator=g).double() / 64  # ufixed<8,2>
    y = layer(x).detach().numpy()
    mean = x.numpy().reshape(2, 3, 3, 2, 2, 2).mean(axis=(3, 5))  # exact: a sum over 4
    t = layer.out_quant.fixed_type()
    assert t.width == 8 and not t.signed
    assert np.array_equal(y, cast(mean, t))


def test_qavgpool2d_rejects_padding():
    from qflow.errors import ConfigError

    with pytest.raises(ConfigError):
        QAvgPool2d.from_float(nn.AvgPool2d(2, padding=1), QFXConfig(), "pool")


def test_qadaptiveavgpool2d_3x3_uses_the_reciprocal_type():
    # 1/9 as ufixed<18,0,RND_CONV,SAT> (docs/qfx.md): round(2**18 / 9) = round(29127.11)
    # = 29127, so the multiplier is 29127 / 2**18, not 1/9.
    recip = 29127 / 2**18
    cfg = _activation_config("gap", bits=24, signed=False, integer_bits=2)
    layer = QAdaptiveAvgPool2d.from_float(nn.AdaptiveAvgPool2d(1), cfg, "gap").eval()
    t = layer.out_quant.fixed_type()
    assert (t.width, t.integer, t.fractional) == (24, 2, 22)
    ones = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    # 9 * 29127 / 2**18 = 262143 / 262144 (18 fractional bits, representable in t): not 1.0
    assert float(layer(ones).detach()) == 262143 / 262144
    x = torch.randint(0, 64, (2, 4, 3, 3), generator=_gen(13)).double() / 16
    total = x.numpy().sum(axis=(2, 3), keepdims=True)
    assert np.array_equal(layer(x).detach().numpy(), cast(total * recip, t))


def test_qadaptiveavgpool2d_power_of_two_window_is_exact():
    layer = QAdaptiveAvgPool2d.from_float(nn.AdaptiveAvgPool2d(1), QFXConfig(), "gap").eval()
    x = torch.randint(0, 32, (2, 2, 4, 4), generator=_gen(14)).double() / 8
    y = layer(x).detach().numpy()
    assert np.array_equal(y, cast(x.numpy().mean(axis=(2, 3), keepdims=True),
                                  layer.out_quant.fixed_type()))


def test_qrelu_and_qadd_cast_to_their_roles():
    cfg = QFXConfig()
    relu = QReLU.from_float(nn.ReLU(), cfg, "relu").eval()
    add = QAdd.from_float(Add(), cfg, "add").eval()
    g = _gen(17)
    a = torch.randint(-512, 512, (6, 7), generator=g).double() / 64
    b = torch.randint(-512, 512, (6, 7), generator=g).double() / 128
    r = relu(a).detach().numpy()
    t_act = relu.out_quant.fixed_type()
    assert t_act.width == 8 and not t_act.signed  # activation: 8 bits, unsigned after ReLU
    assert np.array_equal(r, cast(np.maximum(a.numpy(), 0), t_act))
    s = add(a, b).detach().numpy()
    t_mid = add.out_quant.fixed_type()
    assert t_mid.width == 16 and t_mid.signed  # intermediate: 16 bits, signed
    assert np.array_equal(s, cast(a.numpy() + b.numpy(), t_mid))


def test_qmaxpool2d_keeps_values():
    layer = QMaxPool2d.from_float(nn.MaxPool2d(2), QFXConfig(), "pool").eval()
    assert not any(isinstance(m, FixedQuantizer) for m in layer.modules())
    x = torch.randint(-100, 100, (2, 3, 6, 6), generator=_gen(15)).double() / 32
    y = layer(x)
    assert torch.equal(y, F.max_pool2d(x, 2))
    assert set(y.flatten().tolist()) <= set(x.flatten().tolist())
    # in a model it sits on the input type's grid, unchanged
    model = quantize_(nn.Sequential(nn.MaxPool2d(2)), QFXConfig.with_bits(6))
    raw = torch.randn(2, 1, 4, 4, generator=_gen(16), dtype=torch.float64)
    out = model.eval()(raw).detach().numpy()
    assert on_grid(out, model.qflow_input.quant.fixed_type())
    assert np.array_equal(out, F.max_pool2d(model.qflow_input(raw), 2).detach().numpy())


# -- training and checkpoints ------------------------------------------------------------------


def _mlp():
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(10, 16)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(16, 4)),
    ]))


def test_training_step_changes_integer_bits():
    torch.manual_seed(17)
    model = quantize_(_mlp(), QFXConfig.with_bits(6))
    x = torch.randn(64, 10, generator=_gen(18)) * 3
    y = torch.randint(0, 4, (64,), generator=_gen(19))
    model.train()(x)  # initialize
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, FixedQuantizer)}
    assert set(quantizers) == {"qflow_input.quant", "fc1.weight_quant", "fc1.bias_quant",
                               "relu1.out_quant", "fc2.weight_quant", "fc2.bias_quant"}
    # the input's binary point is calibrated, not trained (the default input spec)
    calibrated = quantizers.pop("qflow_input.quant")
    assert not calibrated.integer_bits.requires_grad
    before = {n: q.integer_bits.detach().clone() for n, q in quantizers.items()}
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert calibrated.integer_bits.grad is None
    for name, q in quantizers.items():
        assert q.integer_bits.grad is not None, name
        assert bool((q.integer_bits.grad != 0).any()), name
    opt.step()
    for name, q in quantizers.items():
        assert not torch.equal(q.integer_bits.detach(), before[name]), name


@pytest.mark.parametrize("fold", [False, True])
def test_state_dict_round_trip_gives_identical_eval_outputs(tmp_path, fold):
    cfg = QFXConfig.with_bits(6, fold_batchnorm=fold)
    torch.manual_seed(20)
    model = quantize_(DigitsCNN(width=4), cfg)
    x = torch.rand(16, 1, 8, 8, generator=_gen(21))
    y = torch.randint(0, 10, (16,), generator=_gen(22))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model.train()(x), y).backward()
        opt.step()
    model.eval()
    x_test = torch.rand(8, 1, 8, 8, generator=_gen(23))
    expected = model(x_test)

    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    torch.manual_seed(99)  # different float weights in the fresh model
    fresh = quantize_(DigitsCNN(width=4), cfg).eval()
    fresh.load_state_dict(state)
    got = fresh(x_test)
    assert got.dtype == torch.float64
    assert torch.equal(got, expected)
    # the formats came along too
    for (name, a), (_, b) in zip(model.named_modules(), fresh.named_modules(), strict=True):
        if isinstance(a, FixedQuantizer):
            assert a.fixed_types() == b.fixed_types(), name


def test_checkpoint_holds_only_tensors():
    model = quantize_(_mlp(), QFXConfig())
    model.train()(torch.randn(4, 10))
    assert all(isinstance(v, torch.Tensor) for v in model.state_dict().values())
    keys = set(model.state_dict())
    assert {"qflow_input.quant.integer_bits", "fc1.weight_quant.integer_bits",
            "fc1.weight_quant.initialized", "relu1.out_quant.signed"} <= keys


def test_rounding_modes_reach_the_cast():
    # same data, RND_CONV vs TRN: 0.3 * 8 = 2.4 and 0.7 * 8 = 5.6 -> [2, 6] vs [2, 5]
    x = torch.tensor([0.3, 0.7], dtype=torch.float64)
    out = {}
    for mode in (Rounding.RND_CONV, Rounding.TRN):
        q = FixedQuantizer(QuantSpec(bits=4, signed=True, integer_bits=0, rounding=mode))
        out[mode] = q(x).tolist()
    assert out[Rounding.RND_CONV] == [0.25, 0.75]
    assert out[Rounding.TRN] == [0.25, 0.625]
