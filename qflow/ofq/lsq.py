"""LSQ weight layers: LSQLinear and LSQConv2d, the baseline that OFQ is compared with.

LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020) quantizes each output
row r of a weight W with a learned scale s_r (a parameter, ``weight_scale``):

    k   = round(clamp(W / s_r, −Q_N, Q_P))              Q_N = 2^(b−1), Q_P = 2^(b−1) − 1
    W_q = s_r · k                                       mid-tread: 2^b levels, 0 among them

Rounding is straight-through (``∂k/∂(W/s) = 1`` inside the clamp range, 0 outside), so
``∂W_q/∂W`` is 1 for weights inside the range and 0 for clamped ones, and ``∂W_q/∂s``
is ``k − W/s`` inside the range and ``k`` outside, times the gradient scale
``g = 1/sqrt(N·Q_P)`` (N: the weights of a row). The scale is initialized to
``2·mean|W_r|/sqrt(Q_P)``. The layer uses |s_r|, so a scale that a step makes negative
still quantizes (a zero scale gives a zero row).

These are the learned scales whose weights oscillate between two levels (a weight near
a rounding threshold is pushed back and forth by the scale and by its own gradient);
OFQ's StatsQ replaces them with a statistic. The layer deploys exactly like StatsQ
(:mod:`qflow.ofq.layers`): the integer codes k, then a ``scale_shift`` with each row's
fixed-point multiplier m_r (``multiplier_codes`` of |s_r|: ``multiplier_bits`` bits,
its own binary point per row) and the bias, then a ``cast``; eval mode computes exactly
that, in float64.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qflow.quantizers import FixedQuantizer

from .layers import _Conv2dForm, _LinearForm, _rows, _StatsQLayer


def lsq_range(bits: int) -> tuple[int, int]:
    """(Q_N, Q_P): the codes are the integers from −Q_N to Q_P.

    >>> lsq_range(2), lsq_range(4)
    ((2, 1), (8, 7))
    """
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def lsq_initial_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Esser et al.'s initial step size, per output row: 2·mean|W_r|/sqrt(Q_P).

    >>> lsq_initial_scale(torch.tensor([[1.0, -3.0], [0.5, 0.5]]), 2).tolist()  # Q_P = 1
    [4.0, 1.0]
    """
    w = weight.detach()
    return 2 * w.abs().reshape(w.shape[0], -1).mean(dim=1) / math.sqrt(lsq_range(bits)[1])


def lsq_index(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer code k of every weight (as float, in the weight's dtype; no gradient);
    ``scale`` holds the row scales s_r (their magnitude is used).

    >>> w = torch.tensor([[0.3, -0.9, 0.05, 2.0], [1.0, 1.0, 1.0, 1.0]])
    >>> lsq_index(w, torch.tensor([0.5, 0.0]), 2).tolist()
    [[1.0, -2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    """
    low, high = lsq_range(bits)
    w = weight.detach()
    s = _rows(scale.detach().to(w.dtype).abs(), w)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    k = torch.round(torch.clamp(w / safe, -low, high))
    return torch.where(s > 0, k, torch.zeros_like(k))


def lsq_levels(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """W_q = |s_r| · k with LSQ's gradients (straight-through rounding, the scale's
    gradient scaled by 1/sqrt(N·Q_P)).

    >>> w = torch.tensor([[0.3, -0.9, 0.05, 2.0]], requires_grad=True)
    >>> s = torch.tensor([0.5], requires_grad=True)
    >>> lsq_levels(w, s, 2).tolist()
    [[0.5, -1.0, 0.0, 0.5]]
    >>> lsq_levels(w, s, 2).sum().backward()
    >>> w.grad.tolist()                 # 0 for the clamped weight (2.0 / 0.5 > Q_P = 1)
    [[1.0, 1.0, 1.0, 0.0]]
    >>> round(s.grad.item(), 6)         # (0.4 − 0.2 − 0.1 + 1) · 1/sqrt(4·1)
    0.55
    """
    low, high = lsq_range(bits)
    per_row = weight[0].numel() if weight.dim() else 1
    grad_scale = 1 / math.sqrt(per_row * high)
    s = scale.abs()
    s = s * grad_scale + (s - s * grad_scale).detach()  # the value s, the gradient · g
    s = _rows(s, weight).to(weight.dtype)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    v = torch.clamp(weight / safe, -low, high)
    k = v + (torch.round(v) - v).detach()
    return torch.where(s > 0, k * s, torch.zeros_like(weight))


class _LSQLayer(_StatsQLayer):
    """Shared behaviour of LSQLinear and LSQConv2d: StatsQ's deployment and eval with
    LSQ's codes, scales and training levels."""

    def _setup(self, fixed, name: str, *, bits: int, multiplier_bits: int,
               bias_quant: FixedQuantizer | None = None, input_quant=None) -> None:
        super()._setup(fixed, name, bits=bits, multiplier_bits=multiplier_bits,
                       bias_quant=bias_quant, input_quant=input_quant)
        self.weight_scale = nn.Parameter(
            lsq_initial_scale(self.weight, self.bits).to(self.weight.dtype))

    def deployed_codes(self) -> torch.Tensor:
        """The integer codes k in [−2^(b−1), 2^(b−1) − 1], as float64."""
        return lsq_index(self.weight.detach().to(torch.float64),
                         self.weight_scale.detach().to(torch.float64), self.bits)

    def odd_codes(self) -> torch.Tensor:
        raise AttributeError("LSQ codes are not odd: use deployed_codes()")

    def _train_weight(self) -> torch.Tensor:
        return lsq_levels(self.weight, self.weight_scale, self.bits)

    def row_scales(self) -> torch.Tensor:
        """Each row's step |s_r| (float64)."""
        return self.weight_scale.detach().to(torch.float64).abs()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lsq"


class LSQLinear(_LinearForm, _LSQLayer, nn.Linear):
    """``nn.Linear`` with LSQ weights (see the module docstring).

    >>> import torch
    >>> from qflow.config import QFXConfig
    >>> layer = LSQLinear.from_float(torch.nn.Linear(6, 3), QFXConfig(), "fc", bits=2)
    >>> layer.eval()(torch.randn(4, 6)).shape
    torch.Size([4, 3])
    >>> set(layer.weight_codes().flatten().tolist()) <= {-2, -1, 0, 1}
    True
    """


class LSQConv2d(_Conv2dForm, _LSQLayer, nn.Conv2d):
    """``nn.Conv2d`` (zero padding) with LSQ weights."""


LSQ_TYPES = (LSQConv2d, LSQLinear)
