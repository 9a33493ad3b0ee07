"""StatsQ weight layers: StatsQLinear and StatsQConv2d.

StatsQ (OFQ, ICML 2023) quantizes each output row r of a weight W with a scale taken
from the weights' statistics, recomputed at every step and never learned:

    s_r = 2 · mean(|W_r|)                               (detached)
    k   = clamp(floor(W · 2^(b−1) / s_r), −2^(b−1), 2^(b−1) − 1)
    W_q = s_r · (k + ½) / 2^(b−1)                       mid-rise: 2^b levels, none at 0

with the identity (straight-through) gradient ``∂W_q/∂W = 1``. A row whose weights are
all zero (s_r = 0) quantizes to zero.

The level k + ½ is the odd integer c = 2k + 1 at scale s_r / 2^b, so a layer deploys as
an integer dense or convolution with the odd codes c, followed by a per-row fixed-point
multiplier m_r and the bias:

    acc = Σ x · c                                       integers (x: the input codes)
    y   = cast(acc · m_r + bias_q)                      a ``scale_shift``, then a ``cast``

``m_r`` is s_r / 2^b rounded to the nearest B-bit signed fixed-point number with its
own binary point F_r per row (``multiplier_codes``): the code M_r = round(s_r/2^b · 2^F_r)
lies in [2^(B−2), 2^(B−1)) (B − 1 significant bits), m_r = M_r · 2^(−F_r); B is the
config's ``multiplier_bits``. ``bias_q`` is the bias cast by the QFX ``bias`` format of
``fixed`` and ``y`` by its ``activation`` format.

Eval mode computes exactly this, in float64 (every value is a dyadic rational whose
significant bits stay below 53: the odd codes and the input codes give an integer sum,
multiplied by the B-bit M_r), so that the frozen graph equals the eval output code for
code. Training (float32) uses the float s_r / 2^b instead of its fixed-point rounding
m_r: the difference is at most one part in 2^(B−1) of each row's scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qflow.nn.functional import exact_dtype
from qflow.nn.layers import conv2d_like
from qflow.numerics import FixedType
from qflow.ops import fixed as fixed_ops
from qflow.quantizers import FixedQuantizer
from qflow.quantizers.scaled import InputScale, multiplier_codes

__all__ = ["STATSQ_TYPES", "StatsQConv2d", "StatsQLinear", "multiplier_codes", "statsq_index",
           "statsq_levels", "statsq_scale"]


def statsq_scale(weight: torch.Tensor) -> torch.Tensor:
    """s = 2 · mean(|W|) per output row (dimension 0), detached.

    >>> statsq_scale(torch.tensor([[1.0, -3.0], [0.5, 0.5]])).tolist()
    [4.0, 1.0]
    """
    w = weight.detach()
    return 2 * w.abs().reshape(w.shape[0], -1).mean(dim=1)


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def statsq_index(weight: torch.Tensor, bits: int, scale: torch.Tensor | None = None):
    """The level index k of every weight (as float), in the weight's dtype.

    >>> statsq_index(torch.tensor([[1.0, -3.0, 0.2, 2.9]]), 2).tolist()  # s = 3.55
    [[0.0, -2.0, 0.0, 1.0]]
    """
    n = 2 ** (bits - 1)
    w = weight.detach()
    s = statsq_scale(w) if scale is None else scale.to(w.dtype)
    s = _rows(s, w)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    k = torch.floor(w * n / safe).clamp(-n, n - 1)
    return torch.where(s > 0, k, torch.zeros_like(k))


def statsq_levels(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The quantized weight s · (k + ½) / 2^(b−1) with the identity gradient.

    >>> w = torch.tensor([[1.0, -3.0, 0.2, 2.9]], requires_grad=True)
    >>> q = statsq_levels(w, 2)
    >>> [round(v, 4) for v in q.tolist()[0]]
    [0.8875, -2.6625, 0.8875, 2.6625]
    >>> q.sum().backward(); w.grad.tolist()
    [[1.0, 1.0, 1.0, 1.0]]
    """
    s = statsq_scale(weight)
    k = statsq_index(weight, bits, s)
    levels = _rows(s, weight) * (k + 0.5) / 2 ** (bits - 1)
    return weight + (levels.to(weight.dtype) - weight).detach()


def _copy_parameters(layer: nn.Module, module: nn.Module) -> None:
    with torch.no_grad():
        layer.weight.copy_(module.weight)
        if module.bias is not None:
            layer.bias.copy_(module.bias)


class _StatsQLayer:
    """Shared behaviour of StatsQLinear and StatsQConv2d (mixed in before the torch class)."""

    def _setup(self, fixed, name: str, *, bits: int, multiplier_bits: int,
               bias_quant: FixedQuantizer | None = None,
               input_quant: InputScale | None = None) -> None:
        self.qflow_name = name
        self.bits = int(bits)
        self.multiplier_bits = int(multiplier_bits)
        channels = self.weight.shape[0]
        self.bias_quant = bias_quant if bias_quant is not None else FixedQuantizer(
            fixed.spec_for(name, "bias"), channels=channels)
        self.out_quant = FixedQuantizer(fixed.spec_for(name, "activation"), per_sample=True)
        #: the input as integer codes at a non-power-of-two scale (None: the input as it
        #: comes, a QFX fixed-point tensor)
        self.input_quant = input_quant

    # -- the deployed form -------------------------------------------------------------
    def odd_codes(self) -> torch.Tensor:
        """The deployed weight codes 2k + 1 (odd integers in [−2^b + 1, 2^b − 1]), as
        float64, from the float64 weight."""
        return 2 * statsq_index(self.weight.detach().to(torch.float64), self.bits) + 1

    def deployed_codes(self) -> torch.Tensor:
        """The integer weight codes the frozen layer multiplies by (float64)."""
        return self.odd_codes()

    def _train_weight(self) -> torch.Tensor:
        """The quantized weight of the training forward pass, with its gradient."""
        return statsq_levels(self.weight, self.bits)

    @torch.no_grad()
    def weight_codes(self) -> torch.Tensor:
        """The integer codes as int16. Used by :mod:`qflow.oscillation`."""
        return self.deployed_codes().to(torch.int16)

    def row_scales(self) -> torch.Tensor:
        """Each row's weight scale (float64): the value of one code step, s_r / 2^b."""
        return statsq_scale(self.weight.to(torch.float64)) / 2**self.bits

    def _token_inputs(self) -> bool:
        return self.input_quant is not None and self.input_quant.tokens

    def multiplier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes M, fractions F) of each row's multiplier m = M · 2^(−F): the row scale,
        divided by the input multiplier when the input comes as codes at one scale (per
        token, the tokens have their own: :meth:`token_multiplier`)."""
        scales = self.row_scales()
        if self.input_quant is not None and not self._token_inputs():
            scales = scales / self.input_quant.multiplier_value()
        return multiplier_codes(scales, 0, self.multiplier_bits)

    def multiplier_values(self) -> torch.Tensor:
        codes, frac = self.multiplier()
        return torch.ldexp(codes.to(torch.float64), -frac)

    def token_multiplier(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(codes, fractions) of 1/m_in[t], one B-bit multiplier per token, that the
        accumulator is multiplied by before the row multiplier; None without per-token
        input scales."""
        if not self._token_inputs():
            return None
        return multiplier_codes(1 / self.input_quant.multiplier_values(), 0,
                                self.multiplier_bits)

    def token_type(self) -> FixedType | None:
        """The type the accumulator times 1/m_in[t] is rounded to (RND_CONV) before the
        row multiplier, so that the row product stays exact in float64: signed, integer
        bits for the largest value the input and weight codes allow, and as many
        fractional bits as leave room (53 bits) for the row multipliers with their
        spread of binary points and the bias (at most the exact product's); None without
        per-token input scales."""
        tokens = self.token_multiplier()
        if tokens is None:
            return None
        codes, fracs = tokens
        in_t = self.input_quant.input_type()
        weights = self.deployed_codes().abs().reshape(self.weight.shape[0], -1)
        peak = max(-in_t.qmin, in_t.qmax) * float(weights.sum(1).max()) * float(
            torch.ldexp(codes.to(torch.float64), -fracs).max())
        integer = max(int(peak).bit_length(), 1)
        row_fracs = self.multiplier()[1]
        spread = int(row_fracs.max() - row_fracs.min()) if row_fracs.numel() else 0
        room = 53 - 2 - self.multiplier_bits - spread - 1 - integer  # 1: the sign, 2: the bias
        fractional = max(min(room, int(fracs.max())), 0)
        return FixedType(signed=True, integer=integer, fractional=fractional,
                         rounding="RND_CONV", overflow="SAT")

    def quantized_bias(self, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
        return None if self.bias is None else self.bias_quant(self.bias.to(dtype))

    def _float_forward(self, x, weight):
        raise NotImplementedError

    def _channel_shape(self, y: torch.Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = exact_dtype(x, self)
        x = x.to(dtype)
        inputs = self.input_quant
        if self.training:
            y = self._float_forward(x if inputs is None else inputs(x),
                                    self._train_weight().to(dtype))
            bias = self.quantized_bias(dtype)
            return self.out_quant(y if bias is None else y + bias.reshape(self._channel_shape(y)))
        acc = self._float_forward(x if inputs is None else inputs.codes(x),
                                  self.deployed_codes().to(dtype))
        tokens = self.token_multiplier()
        if tokens is not None:  # exact in float64 (the freeze checks the widths), rounded
            acc = fixed_ops.cast(acc * torch.ldexp(tokens[0].to(dtype), -tokens[1]).reshape(
                -1, 1), self.token_type())
        shape = self._channel_shape(acc)
        y = acc * self.multiplier_values().reshape(shape)
        bias = self.quantized_bias(dtype)
        return self.out_quant(y if bias is None else y + bias.reshape(shape))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight_bits={self.bits}, "
                f"multiplier_bits={self.multiplier_bits}")


class _LinearForm:
    """An ``nn.Linear`` weight layer: construction from the float layer, the product,
    the output features on the last axis."""

    @classmethod
    def from_float(cls, module: nn.Linear, fixed, name: str, *, bits: int = 4,
                   multiplier_bits: int = 16, bias_quant: FixedQuantizer | None = None,
                   **settings):
        """The layer of ``module``'s weights and bias; ``settings``: a subclass's own
        keyword arguments of ``_setup``."""
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None)
        _copy_parameters(layer, module)
        layer._setup(fixed, name, bits=bits, multiplier_bits=multiplier_bits,
                     bias_quant=bias_quant, **settings)
        return layer

    def _float_forward(self, x, weight):
        return F.linear(x, weight)

    def _channel_shape(self, y):
        return (-1,)  # the output features are the last axis


class _Conv2dForm:
    """An ``nn.Conv2d`` weight layer (explicit zero padding only): construction from the
    float layer, the convolution, the output channels on axis 1."""

    @classmethod
    def from_float(cls, module: nn.Conv2d, fixed, name: str, *, bits: int = 4,
                   multiplier_bits: int = 16, bias_quant: FixedQuantizer | None = None,
                   **settings):
        """The layer of ``module``'s weights and bias; ``settings``: a subclass's own
        keyword arguments of ``_setup``."""
        layer = conv2d_like(cls, module, name)
        _copy_parameters(layer, module)
        layer._setup(fixed, name, bits=bits, multiplier_bits=multiplier_bits,
                     bias_quant=bias_quant, **settings)
        return layer

    def _float_forward(self, x, weight):
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def _channel_shape(self, y):
        return (1, -1) + (1,) * (y.dim() - 2)


class StatsQLinear(_LinearForm, _StatsQLayer, nn.Linear):
    """``nn.Linear`` with StatsQ weights (see the module docstring).

    >>> import torch
    >>> from qflow.config import QFXConfig
    >>> layer = StatsQLinear.from_float(torch.nn.Linear(6, 3), QFXConfig(), "fc", bits=2)
    >>> layer.eval()(torch.randn(4, 6)).shape
    torch.Size([4, 3])
    >>> sorted(set(layer.weight_codes().flatten().tolist())) <= [-3, -1, 1, 3]
    True
    """


class StatsQConv2d(_Conv2dForm, _StatsQLayer, nn.Conv2d):
    """``nn.Conv2d`` (zero padding) with StatsQ weights."""


STATSQ_TYPES = (StatsQConv2d, StatsQLinear)
