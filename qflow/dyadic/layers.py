"""Dyadic weight layers: DyadicLinear and DyadicConv2d (HAWQ-V3's integer-only layers).

A dyadic layer quantizes its input and its weights with scales that are not powers of
two, and deploys both as fixed-point multipliers (dyadic numbers M · 2^(−F)):

    s_in    = r / Q_a        r: the input's static range; Q_a = 2^(a−1) − 1 signed,
                             2^a − 1 unsigned (a: ``act_bits``)
    m_in    = 1/s_in as a B-bit multiplier        (``multiplier_codes``, B = multiplier_bits)
    q       = cast(x · m_in, int a-bit)           RND_CONV, SAT: the input codes
    s_w,r   = max|W_r| / (2^(b−1) − 1)            per output row r, from the weights
    k       = round(W / s_w,r)                    codes in ±(2^(b−1) − 1)
    acc     = Σ q · k                             integers
    m_r     = (s_w,r / m_in) as a B-bit multiplier
    y       = cast(acc · m_r + bias_q)            the layer's QFX output format

which freezes to ``scale_shift`` (m_in) → ``cast`` (the a-bit integer type) →
``conv2d``/``dense`` (the codes k) → ``scale_shift`` (m_r, the bias as the shift) →
``cast``, the nodes every exporter already takes. Eval mode computes exactly this in
float64 (every product has fewer than 53 significant bits), so QAT eval equals the
frozen graph code for code.

Training computes x_q = cast(x · m_in) / m_in and W_q = s_w,r · k with straight-through
gradients (1 inside the code range, 0 where the input clips), then the float layer, the
bias and the output cast. The range r is the maximum |x| (the maximum x when unsigned)
of the first batch seen, in training or calibration, then an exponential moving average
over training batches (``range_momentum``); eval mode never changes it.
"""

from __future__ import annotations

import torch
from torch import nn

from qflow.nn.functional import exact_dtype
from qflow.numerics import FixedType
from qflow.ofq.layers import _Conv2dForm, _LinearForm, _rows, _StatsQLayer, multiplier_codes
from qflow.ops import fixed as fixed_ops
from qflow.quantizers import FixedQuantizer

#: the smallest input range kept (an input that is all zeros at calibration)
MIN_RANGE = 2.0**-16


def symmetric_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """max|W_r| / (2^(b−1) − 1) per output row (dimension 0), detached.

    >>> symmetric_scale(torch.tensor([[1.0, -3.0], [0.75, 0.25]]), 3).tolist()
    [1.0, 0.25]
    """
    w = weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(dim=1) / (2 ** (bits - 1) - 1)


def symmetric_codes(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """round(W / s_w,r) (ties to even), in the weight's dtype; a zero row gives zeros.

    >>> symmetric_codes(torch.tensor([[1.0, -3.0, 0.5], [0.0, 0.0, 0.0]]), 3).tolist()
    [[1.0, -3.0, 0.0], [0.0, 0.0, 0.0]]
    """
    w = weight.detach()
    s = _rows(symmetric_scale(w, bits).to(w.dtype), w)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    limit = 2 ** (bits - 1) - 1
    codes = torch.round(w / safe).clamp(-limit, limit)
    return torch.where(s > 0, codes, torch.zeros_like(codes))


def input_type(bits: int, signed: bool) -> FixedType:
    """The integer type of a dyadic layer's input codes.

    >>> str(input_type(4, False)), str(input_type(8, True))
    ('ap_ufixed<4,4,AP_RND_CONV,AP_SAT>', 'ap_fixed<8,8,AP_RND_CONV,AP_SAT>')
    """
    return FixedType(signed=signed, integer=bits - int(signed), fractional=0,
                     rounding="RND_CONV", overflow="SAT")


class _DyadicLayer(_StatsQLayer):
    """Shared behaviour of DyadicLinear and DyadicConv2d: the input codes, symmetric
    weights, the per-row multipliers (StatsQ's deployment, :mod:`qflow.ofq.layers`)."""

    def _setup(self, fixed, name: str, *, bits: int, multiplier_bits: int,
               bias_quant: FixedQuantizer | None = None, act_bits: int = 8,
               range_momentum: float = 0.99) -> None:
        super()._setup(fixed, name, bits=bits, multiplier_bits=multiplier_bits,
                       bias_quant=bias_quant)
        self.act_bits = int(act_bits)
        self.range_momentum = float(range_momentum)
        self.register_buffer("input_range", torch.zeros((), dtype=torch.float64))
        self.register_buffer("input_signed", torch.tensor(False))
        self.register_buffer("input_ready", torch.tensor(False))

    # -- the input ---------------------------------------------------------------------
    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        """Start the input range from ``x`` (first call), then follow it in training."""
        ready = bool(self.input_ready)
        if ready and not self.training:
            return
        if not ready:
            self.input_signed.fill_(bool(x.min() < 0))
        peak = x.abs().max() if bool(self.input_signed) else x.max().clamp_min(0)
        peak = peak.to(torch.float64)
        if ready:
            peak = self.range_momentum * self.input_range + (1 - self.range_momentum) * peak
        self.input_range.copy_(peak)
        self.input_ready.fill_(True)

    def input_type(self) -> FixedType:
        """The integer type of the input codes q."""
        return input_type(self.act_bits, bool(self.input_signed))

    def input_multiplier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(code M, fraction F) of the input multiplier m_in = M · 2^(−F) ≈ 1/s_in."""
        t = self.input_type()
        steps = t.qmax  # 2^(a−1) − 1 signed, 2^a − 1 unsigned
        scale = self.input_range.clamp_min(MIN_RANGE).to(torch.float64) / steps
        codes, frac = multiplier_codes((1 / scale).reshape(1), 0, self.multiplier_bits)
        return codes[0], frac[0]

    def input_multiplier_value(self) -> torch.Tensor:
        code, frac = self.input_multiplier()
        return torch.ldexp(code.to(torch.float64), -frac)

    # -- the weights and the output multipliers ----------------------------------------
    def deployed_codes(self) -> torch.Tensor:
        """The integer weight codes k in ±(2^(b−1) − 1), as float64."""
        return symmetric_codes(self.weight.detach().to(torch.float64), self.bits)

    def odd_codes(self) -> torch.Tensor:
        raise AttributeError("dyadic codes are not odd: use deployed_codes()")

    def _train_weight(self) -> torch.Tensor:
        w = self.weight
        levels = _rows(symmetric_scale(w, self.bits), w) * symmetric_codes(w, self.bits)
        return w + (levels.to(w.dtype) - w).detach()

    def multiplier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes M, fractions F) of each row's multiplier m_r ≈ s_w,r / m_in."""
        scale = symmetric_scale(self.weight.to(torch.float64), self.bits)
        return multiplier_codes(scale / self.input_multiplier_value(), 0, self.multiplier_bits)

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = exact_dtype(x, self)
        x = x.to(dtype)
        self._observe(x)
        m_in = self.input_multiplier_value().to(dtype)
        q = fixed_ops.cast(x * m_in, self.input_type())  # straight-through inside the range
        if self.training:
            y = self._float_forward(q / m_in, self._train_weight().to(dtype))
        else:
            acc = self._float_forward(q, self.deployed_codes().to(dtype))
            y = acc * self.multiplier_values().to(dtype).reshape(self._channel_shape(acc))
        bias = self.quantized_bias(dtype)
        return self.out_quant(y if bias is None else y + bias.reshape(self._channel_shape(y)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act_bits={self.act_bits}, dyadic"


class DyadicLinear(_LinearForm, _DyadicLayer, nn.Linear):
    """``nn.Linear`` with dyadic input and weights (see the module docstring).

    >>> import torch
    >>> from qflow.config import QFXConfig
    >>> layer = DyadicLinear.from_float(torch.nn.Linear(6, 3), QFXConfig(), "fc", bits=4)
    >>> layer.eval()(torch.randn(4, 6)).shape
    torch.Size([4, 3])
    >>> int(layer.weight_codes().abs().max()) <= 7, str(layer.input_type())
    (True, 'ap_fixed<8,8,AP_RND_CONV,AP_SAT>')
    """


class DyadicConv2d(_Conv2dForm, _DyadicLayer, nn.Conv2d):
    """``nn.Conv2d`` (zero padding) with dyadic input and weights."""


DYADIC_TYPES = (DyadicConv2d, DyadicLinear)
