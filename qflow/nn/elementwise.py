"""Fixed-point element-wise layers: input, BatchNorm, ReLU, residual add, pooling.

Each layer ends in a fixed-point cast, so no float value reaches the next layer.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from qflow.config import QFXConfig
from qflow.errors import ConfigError
from qflow.numerics import FixedType, Overflow, cast
from qflow.quantizers import FixedQuantizer

from .functional import (
    batch_statistics,
    batchnorm_scale_shift,
    exact_dtype,
    update_running_stats,
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
        self.quant = FixedQuantizer(config.spec_for(name, "input"))

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
        layer.out_quant = FixedQuantizer(config.spec_for(name, "intermediate"))
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
        # Training: x * Q(scale) + Q(shift) written as torch's fused BatchNorm plus the
        # quantization errors x * (Q(scale) - scale) + (Q(shift) - shift). The value is
        # the same up to float32 rounding (training need not be bit-exact; evaluation
        # above is), the gradients are the same (two sums up to rounding: see
        # _ErrorCorrectedBatchNorm), and the fused kernel's backward through the batch
        # statistics is much cheaper than autograd's through mean and var.
        with torch.no_grad():  # _ErrorCorrectedBatchNorm differentiates it
            normalized, mean, invstd = torch.native_batch_norm(
                x, self.weight, self.bias, None, None, True, 0.0, self.eps)
        var = (invstd ** -2 - self.eps).clamp_min(0)
        update_running_stats(self, mean, var, x.numel() // x.shape[1])
        scale, shift = batchnorm_scale_shift(self, mean, var, x.dtype)
        scale_error = self.scale_quant(scale) - scale
        shift_error = self.shift_quant(shift) - shift
        return self.out_quant(_ErrorCorrectedBatchNorm.apply(
            x, self.weight, self.bias, scale_error.reshape(shape), shift_error.reshape(shape),
            (normalized, mean, invstd, self.eps)))


class _ErrorCorrectedBatchNorm(torch.autograd.Function):
    """``normalized + x * scale_error + shift_error``, with ``normalized`` torch's fused
    training BatchNorm of ``x`` (computed by the caller, passed in ``bn``).

    The values are those of that expression (the same operations in the same order), made
    in place on ``normalized``. The gradients are those autograd would give, with the
    per-channel sums over the batch taken from the fused BatchNorm backward, which makes
    them anyway: ``sum(grad * x) = sum(grad * (x - mean)) + mean * sum(grad)``, which are
    ``dL/dweight / invstd + mean * dL/dbias``. That saves two passes over the data and
    changes the two sums (the gradients of the integer bits of the scale and shift
    quantizers) only by float rounding, about 1e-6 relative.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale_error, shift_error, bn):
        normalized, mean, invstd, eps = bn
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, invstd, scale_error)
        return normalized.add_(x * scale_error).add_(shift_error)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd, scale_error = ctx.saved_tensors
        need = ctx.needs_input_grad
        sums = weight is not None  # the fused backward gives the sums only with a weight
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps,
            [need[0], need[1] or sums, need[2] or sums])
        shape = scale_error.shape
        dims = [0, *range(2, x.dim())]  # every dimension but the channel's
        grad_s = grad_t = None
        if need[3]:
            grad_s = (grad_w / invstd + mean * grad_b).reshape(shape) if sums else \
                (grad * x).sum(dims, keepdim=True)
        if need[4]:
            grad_t = grad_b.reshape(shape) if sums else grad.sum(dims, keepdim=True)
        if need[0]:
            grad_x.add_(grad * scale_error)
        return (grad_x, grad_w if need[1] else None, grad_b if need[2] else None, grad_s,
                grad_t, None)


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
        layer.out_quant = FixedQuantizer(config.spec_for(name, "activation"))
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
        layer.out_quant = FixedQuantizer(config.spec_for(name, "intermediate"))
        return layer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dtype = exact_dtype(a, self)
        return self.out_quant(a.to(dtype) + b.to(dtype))


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
        layer.out_quant = FixedQuantizer(config.spec_for(name, "activation"))
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
        layer.out_quant = FixedQuantizer(config.spec_for(name, "activation"))
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
