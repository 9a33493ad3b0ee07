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

Training computes x_q = s_in · clamp(round(x / s_in)) and W_q = s_w,r · k with
straight-through gradients (1 inside the code range, 0 where the input clips), then the
float layer, the bias and the output cast. The range r is the maximum |x| (the maximum x
when unsigned) of the first batch seen, in training or calibration, then an exponential
moving average over training batches (``range_momentum``); eval mode never changes it
(:class:`qflow.quantizers.scaled.InputScale`).
"""

from __future__ import annotations

import torch
from torch import nn

from qflow.numerics import FixedType
from qflow.ofq.layers import _Conv2dForm, _LinearForm, _rows, _StatsQLayer
from qflow.quantizers import FixedQuantizer
from qflow.quantizers.scaled import InputScale


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


class _DyadicLayer(_StatsQLayer):
    """Shared behaviour of DyadicLinear and DyadicConv2d: a static input scale
    (:class:`~qflow.quantizers.scaled.InputScale`), symmetric weights, the per-row
    multipliers (StatsQ's deployment, :mod:`qflow.ofq.layers`)."""

    def _setup(self, fixed, name: str, *, bits: int, multiplier_bits: int,
               bias_quant: FixedQuantizer | None = None, act_bits: int = 8,
               range_momentum: float = 0.99) -> None:
        super()._setup(fixed, name, bits=bits, multiplier_bits=multiplier_bits,
                       bias_quant=bias_quant,
                       input_quant=InputScale(act_bits, multiplier_bits,
                                              momentum=range_momentum))

    @property
    def act_bits(self) -> int:
        return self.input_quant.bits

    def input_type(self) -> FixedType:
        """The integer type of the input codes q."""
        return self.input_quant.input_type()

    def deployed_codes(self) -> torch.Tensor:
        """The integer weight codes k in ±(2^(b−1) − 1), as float64."""
        return symmetric_codes(self.weight.detach().to(torch.float64), self.bits)

    def odd_codes(self) -> torch.Tensor:
        raise AttributeError("dyadic codes are not odd: use deployed_codes()")

    def _train_weight(self) -> torch.Tensor:
        w = self.weight
        levels = _rows(symmetric_scale(w, self.bits), w) * symmetric_codes(w, self.bits)
        return w + (levels.to(w.dtype) - w).detach()

    def row_scales(self) -> torch.Tensor:
        """s_w,r = max|W_r| / (2^(b−1) − 1) (float64)."""
        return symmetric_scale(self.weight.to(torch.float64), self.bits)

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
