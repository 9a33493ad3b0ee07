"""Weight oscillation in quantization-aware training: which integer codes keep jumping back.

A quantized weight oscillates when its latent (float) value hovers at a rounding
threshold and its integer code flips back and forth between two neighbouring levels
(Nagel et al., "Overcoming Oscillations in Quantization-Aware Training", ICML 2022;
Liu et al., "Oscillation-free Quantization for Low-bit Vision Transformers", ICML 2023).
:class:`OscillationTracker` measures it for every method, from the codes each quantized
layer deploys (its ``weight_codes()``: QFX fixed-point codes of QLinear and QConv2d,
BiPer's ±1). After every optimizer step, per weight:

- ``q_t``: the integer code; the direction ``d_t = sign(q_t − q_{t−1})`` (−1, 0 or +1);
- an oscillation happens at step ``t`` when ``d_t ≠ 0`` and ``d_t`` is opposite to the
  last nonzero direction (remembered across any number of steps without a change);
- the frequency ``f ← (1 − m)·f + m·[oscillated]``, ``m = 0.01`` (updated every step);
- the weight counts as oscillating while ``f > threshold`` (0.005 by default).

In steady state ``f`` is about the number of oscillations per step, so ``f > 0.005``
means "more often than once in 200 steps"; a single oscillation lifts ``f`` to ``m`` =
0.01, which decays below 0.005 after 69 quiet steps. The state is three tensors the
shape of each weight (last code, int8 last direction, float32 frequency), updated with
tensor operations only. See ``docs/oscillation.md``.

>>> import torch
>>> from qflow.biper.layers import BinaryLinear
>>> from qflow.config import QFXConfig
>>> layer = BinaryLinear.from_float(torch.nn.Linear(8, 4), QFXConfig(), "fc")
>>> tracker = OscillationTracker(layer)
>>> with torch.no_grad():
...     for _ in range(2):             # every sign flips, then flips back
...         _ = layer.weight.neg_()
...         tracker.update()
>>> summary = tracker.summary()
>>> summary["fraction"], summary["layers"]["fc"]["weights"]
(1.0, 32)
>>> tracker.epoch_record()
{'fraction': 1.0, 'layers': {'fc': 1.0}}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: EMA momentum of the oscillation frequency (Nagel et al. and the OFQ reference code)
MOMENTUM = 0.01
#: a weight oscillates while its frequency is above this (about once in 200 steps)
THRESHOLD = 0.005


@dataclass
class _LayerState:
    codes: torch.Tensor  # the codes after the last update (the layer's integer dtype)
    direction: torch.Tensor  # int8: the last nonzero direction, 0 before the first move
    frequency: torch.Tensor  # float32: the EMA of "oscillated"


def tracked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` with quantized weights (a ``weight_codes()`` method), by
    their qflow name (their module path where that is missing or taken)."""
    layers: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if not callable(getattr(module, "weight_codes", None)):
            continue
        name = getattr(module, "qflow_name", "") or path or type(module).__name__
        layers[path if name in layers else name] = module
    return layers


class OscillationTracker:
    """Per-weight oscillation frequency of every quantized layer of ``model``.

    Call :meth:`update` after each optimizer step (``qflow.train.fit`` does, given the
    tracker as ``oscillation``). The codes at construction are the starting point; a
    layer whose quantizer has no type yet starts at the first update that finds one.
    """

    def __init__(self, model: nn.Module, *, momentum: float = MOMENTUM,
                 threshold: float = THRESHOLD):
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        self.momentum = float(momentum)
        self.threshold = float(threshold)
        self.layers = tracked_layers(model)
        self.steps = 0
        self._state: dict[str, _LayerState] = {}
        self._observe(count=False)

    @torch.no_grad()
    def update(self) -> None:
        """Read every layer's codes and update the directions and frequencies."""
        self.steps += 1
        self._observe(count=True)

    def _observe(self, *, count: bool) -> None:
        m = self.momentum
        for name, layer in self.layers.items():
            codes = layer.weight_codes()
            if codes is None:
                continue
            state = self._state.get(name)
            if state is None or not count:
                self._state[name] = _LayerState(
                    codes, torch.zeros(codes.shape, dtype=torch.int8, device=codes.device),
                    torch.zeros(codes.shape, dtype=torch.float32, device=codes.device))
                continue
            if codes.shape != state.codes.shape:
                raise ValueError(f"{name}: the weight codes changed shape from "
                                 f"{tuple(state.codes.shape)} to {tuple(codes.shape)}")
            # compared, not subtracted: 32-bit codes cannot overflow
            direction = (codes > state.codes).to(torch.int8) - (codes < state.codes).to(torch.int8)
            oscillated = (direction * state.direction) == -1
            state.frequency.mul_(1.0 - m).add_(oscillated.to(torch.float32), alpha=m)
            state.direction = torch.where(direction != 0, direction, state.direction)
            state.codes = codes

    def frequencies(self) -> dict[str, torch.Tensor]:
        """Each tracked layer's per-weight frequency (the shape of its weight)."""
        return {name: state.frequency for name, state in self._state.items()}

    def oscillating(self) -> dict[str, torch.Tensor]:
        """Each tracked layer's mask of weights whose frequency is above the threshold."""
        return {name: f > self.threshold for name, f in self.frequencies().items()}

    def summary(self) -> dict:
        """Per layer the fraction of weights above the threshold, their mean frequency
        and their count; in total the fraction over all tracked weights (plain values,
        ready for JSON)."""
        layers, above, total = {}, 0, 0
        for name, f in self.frequencies().items():
            count = int((f > self.threshold).sum())
            layers[name] = {"fraction": count / f.numel() if f.numel() else 0.0,
                            "mean_frequency": float(f.mean()) if f.numel() else 0.0,
                            "weights": f.numel()}
            above, total = above + count, total + f.numel()
        return {"momentum": self.momentum, "threshold": self.threshold, "steps": self.steps,
                "weights": total, "fraction": above / total if total else 0.0,
                "layers": layers}

    def epoch_record(self) -> dict:
        """The summary's fractions only (what ``fit`` puts in each epoch's history row)."""
        summary = self.summary()
        return {"fraction": summary["fraction"],
                "layers": {name: s["fraction"] for name, s in summary["layers"].items()}}

    def describe(self) -> str:
        """One line: the fraction of oscillating weights and the threshold."""
        return (f"oscillating weights: {100 * self.summary()['fraction']:.1f} % "
                f"(threshold f > {self.threshold:g})")

    def state_dict(self) -> dict:
        """The tracker's state (tensors and plain values: ``torch.load`` with
        ``weights_only=True`` reads it back)."""
        return {"steps": self.steps, "momentum": self.momentum, "threshold": self.threshold,
                "layers": {name: {"codes": s.codes.clone(), "direction": s.direction.clone(),
                                  "frequency": s.frequency.clone()}
                           for name, s in self._state.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s result (same layers)."""
        unknown = set(state["layers"]) - set(self.layers)
        if unknown:
            raise ValueError(f"oscillation state of layers this model lacks: {sorted(unknown)}")
        self.steps = int(state["steps"])
        self.momentum, self.threshold = float(state["momentum"]), float(state["threshold"])
        self._state = {name: _LayerState(s["codes"].clone(), s["direction"].clone(),
                                         s["frequency"].clone())
                       for name, s in state["layers"].items()}
