"""The cheaper training paths give the same values and gradients as the general ones:
per-tensor casts with a Python-float scale (``qflow.ops.fixed._ScalarCast``), the
training BatchNorm (autograd's gradients up to float rounding) and
power-of-two average pooling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qflow.config import QFXConfig, QuantSpec
from qflow.nn import QAvgPool2d, QBatchNorm2d
from qflow.nn.elementwise import _reciprocal
from qflow.nn.functional import batchnorm_scale_shift, channel_moments
from qflow.numerics import Overflow, Rounding
from qflow.ops import cast_trainable, native
from qflow.ops import fixed as ops_fixed
from qflow.quantizers import FixedQuantizer


def _inputs(n: int, dtype, f: int, seed: int = 0) -> torch.Tensor:
    """Random values plus the awkward ones: ties, range bounds, zeros of both signs, inf."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    step = 2.0**-f
    special = [0.0, -0.0, step / 2, -step / 2, 1.5 * step, -2.5 * step, 2.0**-30, -(2.0**-30),
               7 * step, 7.25 * step, 7.5 * step, 8 * step, 15 * step, 15.5 * step, 16 * step,
               -8 * step, -8.5 * step, -9 * step, 1e30, -1e30, math.inf, -math.inf]
    x[: len(special)] = torch.tensor(special, dtype=torch.float64)
    return x.to(dtype)


def _run(path: str, x0, i0, g, **kw):
    x = x0.clone().requires_grad_()
    i = i0.clone().requires_grad_()
    if path == "general":  # the tensor-scale path that every other type takes
        args = (kw["width"], kw["signed"], kw["rounding"], kw["overflow"], 0, kw["grad_scale"])
        y = ops_fixed._TrainableCast.apply(x, i, None, *args)
    else:
        y = cast_trainable(x, i, **kw)
    y.backward(g)
    return y.detach(), x.grad, i.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("rounding", [Rounding.RND_CONV, Rounding.TRN, Rounding.RND])
@pytest.mark.parametrize("overflow", [Overflow.SAT, Overflow.SAT_SYM])
@pytest.mark.parametrize("n", [40, 70_000])
def test_scalar_scale_path_equals_general_path(dtype, signed, rounding, overflow, n):
    width, integer = 4, 1.4  # round(1.4) = 1 -> f = 4 - signed - 1 >= 2
    f = width - int(signed) - 1
    x0 = _inputs(n, dtype, f)
    g = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=dtype)
    i0 = torch.tensor(integer)
    kw = dict(width=width, signed=signed, rounding=rounding, overflow=overflow, grad_scale=0.3)
    y_fast, gx_fast, gi_fast = _run("cast_trainable", x0, i0, g, **kw)
    y_ref, gx_ref, gi_ref = _run("general", x0, i0, g, **kw)
    assert torch.equal(y_fast, y_ref)
    assert not torch.signbit(y_fast[y_fast == 0]).any()  # +0.0, as integer codes give
    assert torch.equal(gx_fast, gx_ref)
    # The native loop sums the same terms in another order (and partly in float64)
    torch.testing.assert_close(gi_fast, gi_ref)
    assert math.isfinite(float(gi_fast))  # an infinite x contributes its saturated y


def test_native_loops_are_built_here():
    assert native.status().startswith("native:"), native.status()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("rounding", [Rounding.RND_CONV, Rounding.TRN])
def test_native_loops_equal_torch_operations(monkeypatch, dtype, signed, rounding):
    """Same values and input gradient bit for bit; the integer-bit gradient to rounding.

    (NaN inputs are left out: torch's own hardtanh_backward passes the gradient of a
    NaN on some code paths and not on others.)
    """
    n, f = 50_001, 3 - int(signed)  # an odd length: the loops' scalar tails run too
    x0 = _inputs(n, dtype, f)
    x0[-4:] = torch.tensor([0.875, -1.0, 1.0, -0.0], dtype=dtype)
    g = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=dtype)
    kw = dict(width=4, signed=signed, rounding=rounding, overflow=Overflow.SAT, grad_scale=0.7)
    i0 = torch.tensor(1.0)
    fused = _run("cast_trainable", x0, i0, g, **kw)
    monkeypatch.setattr(native, "_load", lambda: (None, "torch: test"))
    plain = _run("cast_trainable", x0, i0, g, **kw)
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])
    assert not torch.signbit(fused[0][fused[0] == 0]).any()
    torch.testing.assert_close(fused[2], plain[2], rtol=1e-5, atol=0.0)


def test_scalar_scale_path_with_flushed_denormals():
    x0 = _inputs(40_000, torch.float32, 3)
    g = torch.randn(40_000, generator=torch.Generator().manual_seed(2))
    i0 = torch.tensor(1.0)
    kw = dict(width=4, signed=False, rounding=Rounding.RND_CONV, overflow=Overflow.SAT,
              grad_scale=1.0)
    expected = _run("general", x0, i0, g, **kw)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        got = _run("cast_trainable", x0, i0, g, **kw)
    finally:
        torch.set_flush_denormal(False)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_quantizer_uses_scalar_path_only_where_it_applies():
    q = FixedQuantizer(QuantSpec(bits=4, signed=True, integer_bits=1))
    x = torch.randn(8, requires_grad=True)
    assert type(q(x).grad_fn).__name__ == "_ScalarCastBackward"
    wide = FixedQuantizer(QuantSpec(bits=4, signed=True, integer_bits=6))  # f < 0
    assert type(wide(x).grad_fn).__name__ == "_TrainableCastBackward"
    per_channel = FixedQuantizer(QuantSpec(bits=4, signed=True, per_channel=True,
                                           integer_bits=1), channels=8)
    assert type(per_channel(x).grad_fn).__name__ == "_ChannelCastBackward"
    trn = FixedQuantizer(QuantSpec(bits=4, signed=True, per_channel=True, integer_bits=1,
                                   rounding="TRN"), channels=8)
    assert type(trn(x).grad_fn).__name__ == "_TrainableCastBackward"
    wide = FixedQuantizer(QuantSpec(bits=4, signed=True, per_channel=True, integer_bits=6),
                          channels=8)
    assert type(wide(x).grad_fn).__name__ == "_TrainableCastBackward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("overflow", [Overflow.SAT, Overflow.SAT_SYM])
@pytest.mark.parametrize("shape", [(30,), (6, 5, 3, 3), (5, 4001)])
def test_per_channel_native_path_equals_general_path(dtype, signed, overflow, shape):
    """Per-channel casts through the native loops: values and input gradient bit for bit,
    integer-bit gradients up to float rounding (another summation order)."""
    n = math.prod(shape)
    x0 = _inputs(n, dtype, 2).reshape(shape)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=dtype)
    i0 = torch.tensor([1.4, 0.0, -2.0, 2.6, 1.0, -0.6, 3.0] * 5)[: shape[0]]
    i0 = i0.reshape((shape[0],) + (1,) * (len(shape) - 1))
    kw = dict(width=5, signed=signed, rounding=Rounding.RND_CONV, overflow=overflow,
              grad_scale=0.3)
    x = x0.clone().requires_grad_()
    i = i0.clone().requires_grad_()
    y = cast_trainable(x, i, **kw)
    assert type(y.grad_fn).__name__ == "_ChannelCastBackward"
    y.backward(g)
    y_ref, gx_ref, gi_ref = _run("general", x0, i0, g, **kw)
    assert torch.equal(y.detach(), y_ref) and torch.equal(x.grad, gx_ref)
    assert not torch.signbit(y[y == 0]).any()
    torch.testing.assert_close(i.grad, gi_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("affine", [True, False])
def test_training_batchnorm_matches_autograd_expression(affine):
    torch.manual_seed(0)
    bn = QBatchNorm2d.from_float(torch.nn.BatchNorm2d(6, affine=affine), QFXConfig(), "bn")
    bn.train()
    x0 = torch.randn(32, 6, 5, 5) * 2 + 0.5
    g = torch.randn(32, 6, 5, 5)
    bn(x0)  # picks the binary points; then one integer bit more so that nothing clips
    with torch.no_grad():  # (a clipped scale passes no gradient through the statistics)
        bn.scale_quant.integer_bits += 1
        bn.shift_quant.integer_bits += 1

    def reference(x):  # the documented expression, autograd through the batch statistics
        mean, var = channel_moments(x)
        scale, shift = batchnorm_scale_shift(bn, mean, var, torch.float32)
        shape = (1, -1, 1, 1)
        return bn.out_quant(x * bn.scale_quant(scale).reshape(shape)
                            + bn.shift_quant(shift).reshape(shape))

    results = []
    for fn in (bn, reference):
        bn.zero_grad()
        x = x0.clone().requires_grad_()
        y = fn(x)
        y.backward(g)
        grads = {k: p.grad.clone() for k, p in bn.named_parameters() if p.grad is not None}
        results.append((y.detach(), x.grad, grads))
    (y1, gx1, gp1), (y2, gx2, gp2) = results
    assert torch.equal(y1, y2)
    names = ["scale_quant.integer_bits", "shift_quant.integer_bits", "out_quant.integer_bits"]
    assert sorted(gp1) == sorted(gp2) == sorted(names + (["weight", "bias"] if affine else []))
    # The fused backward sums in another order: equal up to float rounding.
    torch.testing.assert_close(gx1, gx2, rtol=1e-4, atol=1e-6)
    for name in gp1:
        torch.testing.assert_close(gp1[name], gp2[name], rtol=1e-4, atol=1e-6)


def test_training_batchnorm_recomputes_the_tensor_its_cast_saves(monkeypatch):
    """The cast after a training BatchNorm saves its input; the layer hands autograd a
    recipe for it instead (the same operations again), so no second full-size tensor
    stays alive per layer, and the gradients are bit for bit those of keeping it."""
    import contextlib

    from qflow.nn import elementwise

    torch.manual_seed(0)
    bn = QBatchNorm2d.from_float(torch.nn.BatchNorm2d(6), QFXConfig(), "bn")
    bn.train()
    x0 = torch.randn(32, 6, 5, 5) * 2 + 0.5
    g = torch.randn(32, 6, 5, 5)
    bn(x0)
    made = []
    recipe = elementwise._Recompute.__init__

    def counting(self, make):
        made.append(make)
        recipe(self, make)

    def step():
        bn.zero_grad()
        x = x0.clone().requires_grad_()
        y = bn(x)
        y.backward(g)
        return y.detach(), x.grad, {k: p.grad.clone() for k, p in bn.named_parameters()}

    monkeypatch.setattr(elementwise._Recompute, "__init__", counting)
    recomputed = step()
    assert len(made) == 1  # the cast's input, and nothing else, became a recipe
    monkeypatch.setattr(elementwise, "_recomputed_when_saved",
                        lambda tensor, make: contextlib.nullcontext())
    kept = step()
    assert len(made) == 1
    assert torch.equal(recomputed[0], kept[0]) and torch.equal(recomputed[1], kept[1])
    assert recomputed[2].keys() == kept[2].keys()
    assert all(torch.equal(recomputed[2][k], kept[2][k]) for k in kept[2])


def test_residual_add_recomputes_its_sum_only_where_its_operands_are_kept(monkeypatch):
    """The cast after a residual add saves the sum; where both operands are outputs of
    casts that keep them, the add hands autograd a recipe instead (bit-identical
    gradients); otherwise it keeps the sum (a recipe would keep both operands alive)."""
    import contextlib

    from qflow.nn import QAdd, elementwise

    torch.manual_seed(0)
    add = QAdd.from_float(torch.nn.Identity(), QFXConfig(), "add")
    quant_a = FixedQuantizer(QuantSpec(bits=8), per_sample=True)
    quant_b = FixedQuantizer(QuantSpec(bits=8), per_sample=True)
    a0, b0, g = torch.randn(16, 4, 5, 5), torch.randn(16, 4, 5, 5) * 3, torch.randn(16, 4, 5, 5)
    made = []
    recipe = elementwise._Recompute.__init__
    monkeypatch.setattr(elementwise._Recompute, "__init__",
                        lambda self, make: (made.append(make), recipe(self, make))[1])

    def step(cast_b=True):
        for module in (add, quant_a, quant_b):
            module.zero_grad()
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = add(quant_a(a), quant_b(b) if cast_b else b * 1.0)
        y.backward(g)
        return [y.detach(), a.grad, b.grad] + [
            p.grad.clone() for m in (add, quant_a, quant_b) for p in m.parameters()
            if p.grad is not None]

    step()  # initializes the binary points
    made.clear()
    recomputed = step()
    assert len(made) == 1
    step(cast_b=False)  # b is no cast's kept output: the sum is kept, no recipe
    assert len(made) == 1
    monkeypatch.setattr(elementwise, "_recomputed_when_saved",
                        lambda tensor, make: contextlib.nullcontext())
    kept = step()
    assert len(recomputed) == len(kept) > 3
    assert all(torch.equal(r, k) for r, k in zip(recomputed, kept, strict=True))


def test_channel_moments_match_torch():
    x = torch.randn(64, 5, 7, 3, dtype=torch.float64) * 3 + 100
    mean, var = channel_moments(x)
    var_ref, mean_ref = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(var, var_ref, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("kernel", [2, 3])
def test_average_pooling_values_and_gradients(kernel):
    pool = QAvgPool2d.from_float(torch.nn.AvgPool2d(kernel), QFXConfig(), "pool").train()
    x0 = torch.randint(-40, 40, (8, 3, 6, 6)).float() / 16  # fixed-point inputs
    g = torch.randn(8, 3, 6 // kernel, 6 // kernel)
    n = kernel * kernel
    results = []
    for direct in (True, False):
        x = x0.clone().requires_grad_()
        if direct:
            y = pool(x)
        else:  # the window sum times the fixed-point 1/n, as the module is documented
            total = F.avg_pool2d(x, kernel, kernel, 0, divisor_override=1)
            y = pool.out_quant(total * _reciprocal(n))
        y.backward(g)
        results.append((y.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
