"""Quantized weight layers: QLinear and QConv2d, with BatchNorm folding as an option."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qflow.config import QFXConfig
from qflow.errors import ConfigError
from qflow.quantizers import FixedQuantizer

from .functional import batch_statistics, batchnorm_scale_shift, exact_dtype


def conv2d_like(cls: type, module: nn.Conv2d, name: str) -> nn.Conv2d:
    """A new ``cls`` (an ``nn.Conv2d`` subclass) shaped as ``module``, its parameters not
    copied; ``module`` must pad with explicit zeros (a one-line ConfigError otherwise)."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ConfigError(f"{name}: only explicit zero padding is supported (got "
                          f"padding={module.padding!r}, padding_mode={module.padding_mode!r})")
    return cls(module.in_channels, module.out_channels, module.kernel_size,
               stride=module.stride, padding=module.padding, dilation=module.dilation,
               groups=module.groups, bias=module.bias is not None)


class _QWeightLayer:
    """Shared behaviour of QLinear and QConv2d (mixed in before the torch class)."""

    def _setup_quantizers(self, config: QFXConfig, name: str) -> None:
        self.qflow_name = name
        out_channels = self.weight.shape[0]
        self.weight_quant = FixedQuantizer(
            config.spec_for(name, "weight"), channels=out_channels, ndim=self.weight.dim()
        )
        self.bias_quant = FixedQuantizer(config.spec_for(name, "bias"), channels=out_channels)
        self.folded_bn: nn.modules.batchnorm._BatchNorm | None = None

    def fold_batchnorm(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        """Fold ``bn`` (which follows this layer) into the quantized weight and bias."""
        if bn.num_features != self.weight.shape[0]:
            raise ConfigError(
                f"cannot fold {bn.num_features}-channel BatchNorm into {self.qflow_name} "
                f"with {self.weight.shape[0]} outputs"
            )
        self.folded_bn = bn

    def _float_forward(self, x, weight, bias):
        raise NotImplementedError

    @torch.no_grad()
    def weight_codes(self) -> torch.Tensor | None:
        """The integer codes of the deployed weight (eval mode: a folded BatchNorm with
        its running statistics), or None while the weight quantizer has no type yet
        (before the first forward pass). Used by :mod:`qflow.oscillation`."""
        if not self.weight_quant.is_initialized:
            return None
        weight = self.weight.detach().to(torch.float64)
        bn = self.folded_bn
        if bn is not None:
            scale, _ = batchnorm_scale_shift(bn, bn.running_mean, bn.running_var, torch.float64)
            weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        return self.weight_quant.codes(weight)

    def quantized_parameters(self, x: torch.Tensor):
        """The quantized weight and bias used for input ``x`` (BatchNorm folded in if set)."""
        dtype = exact_dtype(x, self)
        weight = self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        bn = self.folded_bn
        if bn is not None:
            if bn.training:
                # Batch statistics come from the float layer, with their gradient: treated
                # as constants, the weight and BatchNorm updates ignore the normalization
                # and QAT drifts away (digits-cnn lost 17 points in 5 epochs)
                mean, var = batch_statistics(bn, self._float_forward(x, weight, bias))
            else:
                mean, var = bn.running_mean, bn.running_var
            scale, shift = batchnorm_scale_shift(bn, mean, var, dtype)
            weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
            bias = shift if bias is None else shift + bias * scale
        weight_q = self.weight_quant(weight)
        bias_q = None if bias is None else self.bias_quant(bias)
        return weight_q, bias_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(exact_dtype(x, self))
        weight_q, bias_q = self.quantized_parameters(x)
        return self._float_forward(x, weight_q, bias_q)


class QLinear(_QWeightLayer, nn.Linear):
    """``nn.Linear`` with QFX fixed-point weight and bias; the output is the exact accumulator.

    >>> import torch
    >>> from qflow.config import QFXConfig
    >>> layer = QLinear.from_float(torch.nn.Linear(4, 2), QFXConfig.with_bits(4), "fc")
    >>> layer(torch.ones(3, 4)).shape
    torch.Size([3, 2])
    """

    @classmethod
    def from_float(cls, module: nn.Linear, config: QFXConfig, name: str) -> QLinear:
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None)
        layer.load_state_dict(module.state_dict())
        layer._setup_quantizers(config, name)
        return layer

    def _float_forward(self, x, weight, bias):
        return F.linear(x, weight, bias)


class QConv2d(_QWeightLayer, nn.Conv2d):
    """``nn.Conv2d`` (zero padding) with QFX fixed-point weight and bias."""

    @classmethod
    def from_float(cls, module: nn.Conv2d, config: QFXConfig, name: str) -> QConv2d:
        if module.padding_mode != "zeros":
            raise ConfigError(f"{name}: padding_mode {module.padding_mode!r} is not supported "
                              "(only 'zeros')")
        if isinstance(module.padding, str):
            raise ConfigError(f"{name}: string padding {module.padding!r} is not supported; "
                              "give explicit integers")
        layer = cls(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups,
            bias=module.bias is not None,
        )
        layer.load_state_dict(module.state_dict())
        layer._setup_quantizers(config, name)
        return layer

    def _float_forward(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
