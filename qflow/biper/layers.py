"""Binary weight layers: BinaryConv2d and BinaryLinear.

A binary layer computes, in eval mode, exactly what its frozen form computes:

    acc = conv(sign(x), ±1 weights)            integers (the popcount form)
    y   = cast(acc · m + b)                    m, b: per-channel fixed-point scale, shift

``m`` and ``b`` fold the per-channel scale α, the layer's bias and the BatchNorm that
directly follows the layer (absorbed into it, ``norm``): with ``z = α·acc + bias`` the
float output and ``μ, σ²`` its BatchNorm statistics, ``m = α·γ/√(σ² + ε)`` and
``b = β + (bias − μ)·γ/√(σ² + ε)`` (``m = α``, ``b = bias`` without a BatchNorm). They
are cast by the scale and shift quantizers of ``config.fixed`` (``norm_scale`` and
``bias`` formats, as QFX's BatchNorm), ``y`` by its ``activation`` quantizer. Eval runs
in float64, where every one of these values is exact.

Training (float32) uses the batch statistics of ``z`` (as QFX's BatchNorm does) and:

- stage 1: weights ``sin(ω₀·w)`` (real valued), α unused (1);
- stage 2: weights ``α·sign(sin(ω₀·w))``, gradient ``ω₀·cos(ω₀·w)``; α is a parameter
  per output channel, warm-started at the mean of ``|sin(ω₀·w)|`` over the channel;
- activations ``sign`` with the surrogate gradient of :class:`~.functions.BinaryActivation`.

The ``"ste"`` estimator replaces ``sin(ω₀·w)`` by ``w`` and the periodic gradient by the
clipped identity. The stage is a buffer (saved and loaded with the state dict); only a
stage-2 layer has binary weights and can be frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qflow.errors import ConfigError
from qflow.nn.elementwise import TrainingBatchNorm
from qflow.nn.functional import batch_moments, exact_dtype, update_running_stats
from qflow.nn.layers import conv2d_like
from qflow.quantizers import FixedQuantizer

from .functions import BinaryActivation, ClippedSign, PeriodicSign, sign

STAGES = (1, 2)


class _BinaryLayer:
    """Shared behaviour of BinaryConv2d and BinaryLinear (mixed in before the torch class)."""

    def _setup(self, fixed, name: str, *, omega0: float, estimator: str,
               norm: nn.modules.batchnorm._BatchNorm | None, norm_name: str | None) -> None:
        channels = self.weight.shape[0]
        if norm is not None and norm.num_features != channels:
            raise ConfigError(f"cannot absorb the {norm.num_features}-channel BatchNorm "
                              f"{norm_name} into {name} with {channels} outputs")
        self.qflow_name = name
        self.omega0 = float(omega0)
        self.estimator = estimator
        self.norm = norm
        self.norm_name = norm_name
        # an absorbed BatchNorm divides α out again (but for its ε): its gradient there
        # is float rounding, which Adam would turn into full-size steps of a random walk
        self.alpha = nn.Parameter(torch.ones(channels), requires_grad=norm is None)
        self.register_buffer("stage", torch.tensor(2))
        owner = norm_name or name
        self.scale_quant = FixedQuantizer(fixed.spec_for(owner, "norm_scale"), channels=channels)
        self.shift_quant = (FixedQuantizer(fixed.spec_for(owner, "bias"), channels=channels)
                            if norm is not None or self.bias is not None else None)
        self.out_quant = FixedQuantizer(fixed.spec_for(name, "activation"), per_sample=True)
        self._sync_stage()
        self.warm_start_alpha()

    # ``stage`` is the state (a buffer); ``_stage`` mirrors it for the forward pass.
    def _sync_stage(self) -> None:
        self._stage = int(self.stage)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if "stage" in self._buffers:  # not while from_float loads the float weights
            self._sync_stage()

    @property
    def current_stage(self) -> int:
        """1 (real weights ``sin(ω₀·w)``, or ``w`` for STE) or 2 (binary weights)."""
        return self._stage

    def set_stage(self, stage: int) -> None:
        """Switch to ``stage`` (1 or 2); see :func:`qflow.biper.start_stage` for the
        switch with α's warm start."""
        if stage not in STAGES:
            raise ValueError(f"BiPer stage must be 1 or 2, got {stage!r}")
        self.stage.fill_(stage)
        self._sync_stage()

    def latent_function(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stage-1 weights: ``sin(ω₀·w)`` (BiPer) or ``w`` (STE)."""
        w = self.weight if dtype is None else self.weight.to(dtype)
        return torch.sin(w * self.omega0) if self.estimator == "biper" else w

    @torch.no_grad()
    def warm_start_alpha(self) -> None:
        """α ← the mean of ``|sin(ω₀·w)|`` (``|w|`` for STE) over each output channel."""
        magnitude = self.latent_function().abs()
        self.alpha.copy_(magnitude.reshape(magnitude.shape[0], -1).mean(dim=1))

    def weight_signs(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The deployed weight codes, ±1 (sign(0) = +1), computed in ``dtype``."""
        return sign(self.latent_function(dtype))

    @torch.no_grad()
    def weight_codes(self) -> torch.Tensor:
        """The deployed weight codes ±1 as int8 (in either stage: stage 1 trains the real
        weights whose signs these are). Used by :mod:`qflow.oscillation`."""
        return self.weight_signs(torch.float64).to(torch.int8)

    def _weights(self, dtype: torch.dtype) -> torch.Tensor:
        if self._stage == 1:
            return self.latent_function(dtype)
        if not self.training:
            return self.weight_signs(dtype)
        if self.estimator == "biper":
            return PeriodicSign.apply(self.weight, self.omega0).to(dtype)
        return ClippedSign.apply(self.weight).to(dtype)

    def _alpha(self, dtype: torch.dtype) -> torch.Tensor:
        if self._stage == 1:
            return self.weight.new_ones(self.weight.shape[0], dtype=dtype)
        return self.alpha.to(dtype)

    def _float_forward(self, x, weight):
        raise NotImplementedError

    # -- the folded scale and shift ---------------------------------------------------
    def scale_shift(self, dtype: torch.dtype = torch.float64):
        """Float ``(m, b)`` per channel from the running statistics (eval mode)."""
        alpha = self._alpha(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        norm = self.norm
        if norm is None:
            return alpha, bias
        mean, var = norm.running_mean.to(dtype), norm.running_var.to(dtype)
        gain = torch.rsqrt(var + norm.eps)
        if norm.affine:
            gain = norm.weight.to(dtype) * gain
        shift = -mean * gain if bias is None else (bias - mean) * gain
        if norm.affine:
            shift = norm.bias.to(dtype) + shift
        return alpha * gain, shift

    def quantized_scale_shift(self, dtype: torch.dtype = torch.float64):
        """The fixed-point ``(m, b)`` the eval forward and the frozen graph use (``b`` is
        None when the layer has neither a bias nor a BatchNorm)."""
        scale, shift = self.scale_shift(dtype)
        return self.scale_quant(scale), None if shift is None else self.shift_quant(shift)

    def _training_output(self, acc: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (acc.dim() - 2)
        alpha = self._alpha(acc.dtype)
        norm = self.norm
        if norm is None:
            self.scale_quant.cover_(alpha)  # a clipped per-channel scale is never better
            y = acc * self.scale_quant(alpha).reshape(shape)
            if self.bias is not None:
                y = y + self.shift_quant(self.bias).reshape(shape)
            return y
        # BatchNorm of z = α·acc + bias from acc's batch statistics: μ_z = α·μ + bias,
        # σ_z² = α²·σ², so m = α·γ·r and b = β − α·μ·γ·r with r = 1/√(α²σ² + ε) (the
        # bias cancels). It is a BatchNorm of acc with weight γ·sign(α) and
        # 1/std = |α|·r, whose fused backward gives acc's gradient (TrainingBatchNorm).
        with torch.no_grad():
            mean, var, count = batch_moments(acc, synced=True)  # a group's whole batch
            if norm.track_running_stats:
                bias = 0.0 if self.bias is None else self.bias.detach()
                a = alpha.detach()
                update_running_stats(norm, a * mean + bias, a * a * var, count)
        r = torch.rsqrt(alpha * alpha * var + norm.eps)
        gamma = norm.weight if norm.affine else torch.ones_like(mean)
        scale = alpha * gamma * r
        shift = norm.bias - mean * scale if norm.affine else -mean * scale
        self.scale_quant.cover_(scale)  # α·γ/σ grows as σ shrinks: keep it covered
        with torch.no_grad():
            invstd = alpha.abs() * r
            weight = gamma * torch.sign(alpha)
        return TrainingBatchNorm.apply(
            acc, self.scale_quant(scale).reshape(shape), self.shift_quant(shift).reshape(shape),
            (scale.detach(), weight, mean, invstd, norm.eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = exact_dtype(x, self)
        x = x.to(dtype)
        binary_x = BinaryActivation.apply(x) if self.training else sign(x)
        acc = self._float_forward(binary_x, self._weights(dtype))
        if self.training:
            return self.out_quant(self._training_output(acc))
        scale, shift = self.quantized_scale_shift(dtype)
        shape = (1, -1) + (1,) * (acc.dim() - 2)
        y = acc * scale.reshape(shape)
        return self.out_quant(y if shift is None else y + shift.reshape(shape))

    def extra_repr(self) -> str:
        norm = f", norm={self.norm_name}" if self.norm is not None else ""
        return (f"{super().extra_repr()}, estimator={self.estimator}, omega0={self.omega0:g}, "
                f"stage={self._stage}{norm}")


class BinaryLinear(_BinaryLayer, nn.Linear):
    """``nn.Linear`` with binary activations and weights (see the module docstring).

    >>> import torch
    >>> from qflow.config import QFXConfig
    >>> layer = BinaryLinear.from_float(torch.nn.Linear(6, 3), QFXConfig(), "fc").eval()
    >>> y = layer(torch.randn(4, 6))
    >>> y.shape, layer.current_stage
    (torch.Size([4, 3]), 2)
    >>> sorted(set(layer.weight_signs().flatten().tolist()))
    [-1.0, 1.0]
    """

    @classmethod
    def from_float(cls, module: nn.Linear, fixed, name: str, *, omega0: float = 20.0,
                   estimator: str = "biper", norm=None, norm_name: str | None = None):
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None)
        layer.load_state_dict(module.state_dict())
        layer._setup(fixed, name, omega0=omega0, estimator=estimator, norm=norm,
                     norm_name=norm_name)
        return layer

    def _float_forward(self, x, weight):
        return F.linear(x, weight)


class BinaryConv2d(_BinaryLayer, nn.Conv2d):
    """``nn.Conv2d`` (zero padding) with binary activations and weights."""

    @classmethod
    def from_float(cls, module: nn.Conv2d, fixed, name: str, *, omega0: float = 20.0,
                   estimator: str = "biper", norm=None, norm_name: str | None = None):
        layer = conv2d_like(cls, module, name)
        layer.load_state_dict(module.state_dict())
        layer._setup(fixed, name, omega0=omega0, estimator=estimator, norm=norm,
                     norm_name=norm_name)
        return layer

    def _float_forward(self, x, weight):
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)


BINARY_TYPES = (BinaryConv2d, BinaryLinear)
