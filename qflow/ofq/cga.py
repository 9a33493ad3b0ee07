"""Confidence-guided annealing (CGA): OFQ's last training phase.

After QAT, a weight far from a rounding threshold is confidently at its level: CGA
freezes it, and lets only the weights near a threshold (the ones that can still
oscillate) settle, at a constant small learning rate. At every optimizer step, for every
StatsQ layer (:mod:`qflow.ofq.layers`) with width b and n = 2^(b−1):

    s_r = 2 · mean(|W_r|)              the row's current StatsQ scale (before the step)
    u   = W · n / s_r                  the pre-rounding value, in quantization steps s_r/n
    d   = |u − t|, t the nearest of the thresholds −n+1, …, n−1
    frozen  ⇔  d > BR                  (BR = ``OFQConfig.cga_br``, 0.005 by default)

The thresholds are where the level index k = floor(u) (clamped to [−n, n−1]) changes;
a weight beyond the outer levels is at distance ≥ 1 and frozen. A row whose weights are
all zero (s_r = 0) is frozen. u is computed in float64 from the weights as they are
after the backward pass. A frozen weight's gradient is set to zero before
``optimizer.step()`` and its value is written back right after it, so neither Adam's
moments nor weight decay move it; the scale s_r is recomputed from the weights at the
next step (it moves only through the weights that are not frozen).

>>> import torch
>>> from qflow.config import QFXConfig
>>> from qflow.ofq.layers import StatsQLinear
>>> layer = StatsQLinear.from_float(torch.nn.Linear(2, 1), QFXConfig(), "fc", bits=2)
>>> with torch.no_grad():
...     _ = layer.weight.copy_(torch.tensor([[1.0, 1.002]]))
>>> threshold_distance(layer.weight, 2)   # s = 2.002, u = 0.999 and 1.001
tensor([[0.0010, 0.0010]], dtype=torch.float64)
>>> frozen_mask(layer.weight, 2, 0.005).tolist()
[[False, False]]
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import statsq_scale
from .quantize import statsq_layers

#: default boundary range BR, in quantization steps (the OFQ paper's and reference code's)
DEFAULT_BR = 0.005


def threshold_distance(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Distance (float64, in quantization steps s_r / 2^(b−1)) of every weight's
    pre-rounding value to the nearest StatsQ rounding threshold; ``inf`` in a zero row."""
    n = 2 ** (bits - 1)
    w = weight.detach().to(torch.float64)
    s = statsq_scale(w).reshape(-1, *([1] * (w.dim() - 1)))
    u = w * n / torch.where(s > 0, s, torch.ones_like(s))
    nearest = torch.round(u).clamp(-n + 1, n - 1)
    distance = (u - nearest).abs()
    return torch.where(s > 0, distance, torch.full_like(distance, float("inf")))


def frozen_mask(weight: torch.Tensor, bits: int, br: float = DEFAULT_BR) -> torch.Tensor:
    """True where CGA freezes a weight: farther than ``br`` from every threshold."""
    return threshold_distance(weight, bits) > br


class ConfidenceGuidedAnnealing:
    """CGA over every StatsQ layer of ``model``: a :class:`qflow.train.StepHook` for
    :func:`qflow.train.fit` (its history rows get ``"cga"``: the fraction of StatsQ
    weights frozen at the epoch's last step, the mean over its steps, and per layer).

    >>> import torch, qflow
    >>> from torch import nn
    >>> model = qflow.quantize_(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8),
    ...                                       nn.Linear(8, 2)), qflow.OFQConfig(weight_bits=2))
    >>> cga = ConfidenceGuidedAnnealing(model)
    >>> list(cga.layers), cga.br
    (['1'], 0.005)
    """

    key = "cga"

    def __init__(self, model: nn.Module, br: float = DEFAULT_BR) -> None:
        if not 0 <= br < 0.5:
            raise ValueError(f"br must be in [0, 0.5), got {br}")
        self.br = float(br)
        self.layers = {layer.qflow_name: layer for layer in statsq_layers(model)}
        self._masks: dict[str, torch.Tensor] = {}
        self._saved: dict[str, torch.Tensor] = {}
        self._last: dict[str, float] = {}
        self._sum, self._steps = 0.0, 0

    @torch.no_grad()
    def before_step(self) -> None:
        """Find the frozen weights, zero their gradients and remember their values."""
        frozen = total = 0
        for name, layer in self.layers.items():
            mask = frozen_mask(layer.weight, layer.bits, self.br)
            if layer.weight.grad is not None:
                layer.weight.grad.masked_fill_(mask, 0.0)
            self._masks[name] = mask
            self._saved[name] = layer.weight.detach().clone()
            count = int(mask.sum())
            self._last[name] = count / mask.numel()
            frozen, total = frozen + count, total + mask.numel()
        self._sum += frozen / total if total else 0.0
        self._steps += 1

    @torch.no_grad()
    def after_step(self) -> None:
        """Write the frozen weights' values back (the optimizer may have moved them)."""
        for name, layer in self.layers.items():
            layer.weight.copy_(torch.where(self._masks[name], self._saved[name], layer.weight))
        self._masks.clear()
        self._saved.clear()

    def fraction(self) -> float:
        """Fraction of all StatsQ weights frozen at the last step (0 before any)."""
        total = sum(layer.weight.numel() for layer in self.layers.values())
        if not self._last or not total:
            return 0.0
        return sum(self._last[n] * layer.weight.numel()
                   for n, layer in self.layers.items()) / total

    def epoch_record(self) -> dict:
        """This epoch's figures (then starts the next epoch's mean)."""
        record = {"frozen_fraction": self.fraction(),
                  "mean_frozen_fraction": self._sum / self._steps if self._steps else 0.0,
                  "layers": dict(self._last)}
        self._sum, self._steps = 0.0, 0
        return record

    def summary(self) -> dict:
        """The figures at the last step: BR, the overall and per-layer frozen fractions."""
        return {"br": self.br, "frozen_fraction": self.fraction(),
                "layers": {name: {"weights": layer.weight.numel(),
                                  "frozen_fraction": self._last.get(name, 0.0)}
                           for name, layer in self.layers.items()}}

    def describe(self) -> str:
        """One line for the console."""
        return (f"CGA: {100 * self.fraction():.1f} % of {len(self.layers)} StatsQ layers' "
                f"weights frozen at the last step (BR {self.br:g})")
