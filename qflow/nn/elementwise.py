"""Fixed-point element-wise layers: input, BatchNorm, ReLU, residual add, a product by a
constant, pooling.

Each layer ends in a fixed-point cast, so no float value reaches the next layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from qflow import distributed
from qflow.config import QFXConfig
from qflow.errors import ConfigError
from qflow.numerics import FixedType, Overflow, cast
from qflow.ops.fixed import keeps_output
from qflow.quantizers import FixedQuantizer

from .functional import (
    batch_statistics,
    batchnorm_scale_shift,
    exact_dtype,
    scale_shift_from_invstd,
)

_CLAMPS = (Overflow.SAT, Overflow.SAT_SYM, Overflow.SAT_ZERO)

#: Type of the constant 1/n that average pooling multiplies by (exact when n is a power of two).
RECIPROCAL_TYPE = FixedType(signed=False, integer=0, fractional=18, rounding="RND_CONV",
                            overflow="SAT")


class QInput(nn.Module):
    """Casts the model input to the ``input`` spec (sign and binary point from the data)."""

    def __init__(self, config: QFXConfig, name: str = "input"):
        super().__init__()
        self.qflow_name = name
        self.quant = FixedQuantizer(config.spec_for(name, "input"), per_sample=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(x.to(exact_dtype(x, self)))


class _QBatchNorm:
    """BatchNorm as a per-channel fixed-point scale and shift, then a fixed-point cast."""

    @classmethod
    def from_float(cls, module, config: QFXConfig, name: str):
        layer = cls(module.num_features, eps=module.eps, momentum=module.momentum,
                    affine=module.affine, track_running_stats=module.track_running_stats)
        layer.load_state_dict(module.state_dict())
        layer.qflow_name = name
        channels = module.num_features
        layer.scale_quant = FixedQuantizer(config.spec_for(name, "norm_scale"), channels=channels)
        layer.shift_quant = FixedQuantizer(config.spec_for(name, "bias"), channels=channels)
        layer.out_quant = FixedQuantizer(config.spec_for(name, "intermediate"), per_sample=True)
        return layer

    def quantized_scale_shift(self, x: torch.Tensor):
        dtype = exact_dtype(x, self)
        mean, var = batch_statistics(self, x)
        scale, shift = batchnorm_scale_shift(self, mean, var, dtype)
        return self.scale_quant(scale), self.shift_quant(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(exact_dtype(x, self))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if not self.training:
            scale, shift = self.quantized_scale_shift(x)
            return self.out_quant(x * scale.reshape(shape) + shift.reshape(shape))
        # Training: the same expression, with the gradient through the batch statistics
        # taken from torch's fused BatchNorm backward (see _TrainingBatchNorm): far
        # cheaper than autograd through the mean and variance.
        with torch.no_grad():
            mean, var = batch_statistics(self, x)
        invstd = torch.rsqrt(var + self.eps)
        scale, shift = scale_shift_from_invstd(self, mean, invstd, x.dtype)
        # γ/σ grows as the weights before it shrink: keep its range covered
        self.scale_quant.cover_(scale)
        weight = None if self.weight is None else self.weight.detach()
        scale_q = self.scale_quant(scale).reshape(shape)
        shift_q = self.shift_quant(shift).reshape(shape)
        y = _TrainingBatchNorm.apply(x, scale_q, shift_q,
                                     (scale.detach(), weight, mean, invstd, self.eps))
        # The cast saves its input for backward: recompute it from x (which the BatchNorm
        # keeps anyway) instead of keeping a second full-size tensor alive per layer.
        inputs = (x.detach(), scale_q.detach(), shift_q.detach())
        with _recomputed_when_saved(y, lambda: _TrainingBatchNorm.scale_shift(*inputs)):
            return self.out_quant(y)


class _TrainingBatchNorm(torch.autograd.Function):
    """``x * scale_q + shift_q`` for per-channel quantized ``scale_q = Q(scale)`` and
    ``shift_q = Q(shift)`` made from the batch statistics of ``x`` (passed in ``bn``
    as ``(scale, weight, mean, invstd, eps)``, without their gradient).

    The gradient is autograd's for that expression with the statistics as functions of
    ``x`` and straight-through quantizers: ``dL/dscale_q = sum(g * x)`` and
    ``dL/dshift_q = sum(g)`` per channel, and ``dL/dx`` is an ordinary BatchNorm's
    (the path through the statistics included) plus ``g * (scale_q - scale)``. The
    fused BatchNorm backward gives both: its weight and bias gradients are
    ``sum(g * (x - mean)) * invstd`` and ``sum(g)``, so
    ``sum(g * x) = dL/dweight / invstd + mean * dL/dbias``, equal to the direct sum up
    to float rounding.
    """

    @staticmethod
    def forward(ctx, x, scale_q, shift_q, bn):
        scale, weight, mean, invstd, eps = bn
        if weight is None:  # the fused backward gives its sums only with a weight
            weight = torch.ones_like(mean)
        ctx.eps = eps
        ctx.save_for_backward(x, scale_q, scale, weight, mean, invstd)
        return _TrainingBatchNorm.scale_shift(x, scale_q, shift_q)

    @staticmethod
    def scale_shift(x, scale_q, shift_q):
        """The forward's values; the same operations give the same floats again."""
        return torch.mul(x, scale_q).add_(shift_q)

    @staticmethod
    def backward(ctx, grad):
        x, scale_q, scale, weight, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        synced = distributed.active()  # the statistics came from the group's whole batch
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps,
            [need[0] and not synced, True, True])
        if need[0] and synced:
            grad_x = _synced_input_grad(grad, x, weight, mean, invstd, grad_weight, grad_bias)
        shape = scale_q.shape
        grad_scale = (grad_weight / invstd + mean * grad_bias).reshape(shape) if need[1] else None
        grad_shift = grad_bias.reshape(shape) if need[2] else None
        if need[0]:
            grad_x.addcmul_(grad, scale_q - scale.reshape(shape))  # no full-size temporary
        return grad_x, grad_scale, grad_shift, None


class _Recompute:
    """A tensor saved for backward as the function that makes it again."""

    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make


@contextlib.contextmanager
def _recomputed_when_saved(tensor: torch.Tensor, make):
    """Inside, autograd saves ``tensor`` as ``make`` (called without gradient when the
    backward pass reads it; it must give the same values) instead of keeping it."""

    # the tensor's identity, not the tensor: autograd keeps the hooks with what they saved
    identity = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)

    def pack(saved: torch.Tensor):
        same = (saved.data_ptr(), saved.shape, saved.stride(), saved.dtype) == identity
        return _Recompute(make) if same else saved

    def unpack(packed):
        if isinstance(packed, _Recompute):
            with torch.no_grad():
                return packed.make()
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _synced_input_grad(grad, x, weight, mean, invstd, grad_weight, grad_bias):
    """BatchNorm's input gradient when the statistics are over a data-parallel group's
    whole batch: w·r·(g − Σg/N − x̂·Σ(g·x̂)/N), x̂ = (x − μ)·r, the sums over every
    process (this one's sums are the fused backward's bias and weight gradients)."""
    n = x.numel() // x.shape[1]
    sums = distributed.sum_(torch.cat([grad_bias, grad_weight, grad_bias.new_tensor([n])]))
    channels = mean.numel()
    count = sums[-1]
    mean_dy, mean_dy_xhat = sums[:channels] / count, sums[channels:2 * channels] / count
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
    return (grad - mean_dy.reshape(shape) - xhat * mean_dy_xhat.reshape(shape)) * (
        weight * invstd).reshape(shape)


#: public name of the training BatchNorm function, for methods whose layers fold a
#: BatchNorm into their own scale and shift (BiPer's binary layers)
TrainingBatchNorm = _TrainingBatchNorm


class QBatchNorm1d(_QBatchNorm, nn.BatchNorm1d):
    """Fixed-point BatchNorm1d (after a linear layer)."""


class QBatchNorm2d(_QBatchNorm, nn.BatchNorm2d):
    """Fixed-point BatchNorm2d (after a convolution)."""


class QReLU(nn.ReLU):
    """ReLU followed by a cast to the ``activation`` spec (unsigned unless set otherwise)."""

    @classmethod
    def from_float(cls, module: nn.ReLU, config: QFXConfig, name: str) -> QReLU:
        layer = cls()
        layer.qflow_name = name
        layer.out_quant = FixedQuantizer(config.spec_for(name, "activation"), per_sample=True)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(exact_dtype(x, self))
        quant = self.out_quant
        if quant.is_initialized and not quant.is_signed and quant.spec.overflow in _CLAMPS:
            # An unsigned saturating cast already maps every negative value to code 0
            # (and passes no gradient there), exactly as ReLU then the cast would.
            return quant(x)
        return quant(F.relu(x))


class QAdd(nn.Module):
    """Residual add of two fixed-point tensors (exact), then a cast to ``intermediate``."""

    @classmethod
    def from_float(cls, module: nn.Module, config: QFXConfig, name: str) -> QAdd:
        layer = cls()
        layer.qflow_name = name
        layer.out_quant = FixedQuantizer(config.spec_for(name, "intermediate"), per_sample=True)
        return layer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dtype = exact_dtype(a, self)
        total = a.to(dtype) + b.to(dtype)
        if not (a.dtype == b.dtype == dtype and keeps_output(a) and keeps_output(b)):
            return self.out_quant(total)
        # The cast saves the sum: recompute it from the operands, which the casts that
        # made them keep for their own backward, instead of keeping it as well.
        operands = (a.detach(), b.detach())
        with _recomputed_when_saved(total, lambda: torch.add(*operands)):
            return self.out_quant(total)


class QMulConst(nn.Module):
    """``x * c`` for a Python number ``c`` written in a forward (attention's
    ``scores * self.scale``, a CNN's ``x * 0.5``; ``x / c`` is ``x * (1/c)``): the constant
    in fixed point, the product exact, then a cast to ``intermediate``.

    The constant has the ``weight`` spec's word length, sign, rounding and overflow, one
    binary point (per tensor, not trained): the finest under which it does not overflow,
    unless the spec fixes the integer bits. A power of two such as 0.25 is exact.

    >>> import torch
    >>> from qflow.config import QFXConfig
    >>> mul = QMulConst.from_config(QFXConfig.with_bits(8), "mul", 8 ** -0.5)
    >>> mul.quantized_value().item(), str(mul.value_quant.fixed_type())
    (0.35546875, 'ap_fixed<8,0,AP_RND_CONV,AP_SAT>')
    >>> QMulConst.from_config(QFXConfig.with_bits(8), "div", 4, divide=True).quantized_value()
    tensor(0.2500, dtype=torch.float64)
    """

    def __init__(self, value: float, written: str = ""):
        super().__init__()
        self.written = written or f"x * {value!r}"
        self.register_buffer("value", torch.tensor(float(value), dtype=torch.float64),
                             persistent=False)

    @classmethod
    def from_config(cls, config: QFXConfig, name: str, constant: float,
                    divide: bool = False) -> QMulConst:
        """The layer of ``x * constant`` (``x / constant`` when ``divide``)."""
        written = f"x {'/' if divide else '*'} {constant!r}"
        if isinstance(constant, bool) or not isinstance(constant, int | float):
            raise ConfigError(f"{name}: {written}: the constant must be a Python int or float")
        if not math.isfinite(constant) or constant == 0:
            raise ConfigError(f"{name}: {written}: the constant must be finite and nonzero")
        value = 1.0 / constant if divide else float(constant)
        if not math.isfinite(value) or value == 0:
            raise ConfigError(f"{name}: {written}: 1/{constant!r} is not a finite nonzero float")
        layer = cls(value, written)
        layer.qflow_name = name
        spec = config.spec_for(name, "weight")
        layer.value_quant = FixedQuantizer(dataclasses.replace(
            spec, per_channel=False, trainable=False, khot=0))
        layer.value_quant.initialize(layer.value)  # not trained: the fewest integer bits
        if float(layer.quantized_value()) == 0.0:
            raise ConfigError(f"{name}: {written}: the constant is 0 in its type "
                              f"{layer.value_quant.fixed_type()} (the weight spec of {name})")
        layer.out_quant = FixedQuantizer(config.spec_for(name, "intermediate"), per_sample=True)
        return layer

    def quantized_value(self) -> torch.Tensor:
        """The constant the layer multiplies by (float64, on its fixed-point grid)."""
        with torch.no_grad():
            return self.value_quant(self.value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = exact_dtype(x, self)
        return self.out_quant(x.to(dtype) * self.quantized_value().to(dtype))

    def extra_repr(self) -> str:
        return self.written


@functools.lru_cache(maxsize=64)
def _reciprocal(count: int) -> float:
    return float(cast(1.0 / count, RECIPROCAL_TYPE)[()])


class QAvgPool2d(nn.AvgPool2d):
    """Average pooling as an exact window sum times a fixed-point 1/n, then a cast to
    ``activation``. Padding is not supported (the divisor would vary at the borders)."""

    @classmethod
    def from_float(cls, module: nn.AvgPool2d, config: QFXConfig, name: str) -> QAvgPool2d:
        if module.padding not in (0, (0, 0)) or module.divisor_override is not None:
            raise ConfigError(f"{name}: average pooling with padding or a divisor override "
                              "is not supported")
        layer = cls(module.kernel_size, module.stride, 0, module.ceil_mode)
        if module.ceil_mode:
            raise ConfigError(f"{name}: average pooling with ceil_mode is not supported")
        layer.qflow_name = name
        layer.out_quant = FixedQuantizer(config.spec_for(name, "activation"), per_sample=True)
        return layer

    def window_size(self) -> int:
        k = self.kernel_size
        return k * k if isinstance(k, int) else k[0] * k[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(exact_dtype(x, self))
        n = self.window_size()
        if _reciprocal(n) * n == 1.0:
            # 1/n is exact (n a power of two): torch's average is the same sum, scaled by
            # the same power of two, in one pass less each way
            return self.out_quant(F.avg_pool2d(x, self.kernel_size, self.stride, 0))
        total = F.avg_pool2d(x, self.kernel_size, self.stride, 0, divisor_override=1)
        return self.out_quant(total.mul_(_reciprocal(n)))  # not saved by avg_pool2d: in place


class QAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """Global average pooling (output size 1) as an exact sum times a fixed-point 1/n."""

    @classmethod
    def from_float(cls, module: nn.AdaptiveAvgPool2d, config: QFXConfig, name: str):
        size = module.output_size
        if size not in (1, (1, 1)):
            raise ConfigError(f"{name}: adaptive average pooling to {size} is not supported "
                              "(only global pooling, output size 1)")
        layer = cls(1)
        layer.qflow_name = name
        layer.out_quant = FixedQuantizer(config.spec_for(name, "activation"), per_sample=True)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(exact_dtype(x, self))
        total = x.sum(dim=(-2, -1), keepdim=True)
        return self.out_quant(total.mul_(_reciprocal(x.shape[-2] * x.shape[-1])))  # in place


class QMaxPool2d(nn.MaxPool2d):
    """Max pooling: exact on fixed-point values, so it keeps its input type."""

    @classmethod
    def from_float(cls, module: nn.MaxPool2d, config: QFXConfig, name: str) -> QMaxPool2d:
        layer = cls(module.kernel_size, module.stride, module.padding, module.dilation,
                    ceil_mode=module.ceil_mode)
        layer.qflow_name = name
        return layer
