"""Dyadic (integer-only, HAWQ-V3 style) configuration: a frozen, keyword-only dataclass
with a JSON/YAML round trip.

>>> from qflow.dyadic.config import DyadicConfig
>>> cfg = DyadicConfig(weight_bits=4, overrides={"fc3": {"weight_bits": 8}})
>>> cfg.layer_settings("fc3"), cfg.layer_settings("fc1")
((True, 8, 8), (True, 4, 8))
>>> DyadicConfig.from_yaml(cfg.to_yaml()) == cfg
True
>>> DyadicConfig.from_dict({"act_bits": 1})
Traceback (most recent call last):
qflow.errors.ConfigError: config.act_bits: expected an integer from 2 to 16, got 1
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from qflow.config import LayerOverride, QFXConfig
from qflow.errors import ConfigError
from qflow.method_config import (
    FixedMethodConfig,
    LayerSettings,
    checked_integer,
    override_patterns,
)

DYADIC_CONFIG_VERSION = 1
#: weight and input code widths (the sign included)
MIN_BITS, MAX_BITS = 2, 16
#: multiplier widths (HAWQ-V3's b / 2^c with b up to 32 bits). QAT eval computes the
#: products in float64: ``qflow.freeze`` refuses a layer whose products need more than
#: float64's 53 significant bits (a wide multiplier on a wide accumulator)
MIN_MULTIPLIER_BITS, MAX_MULTIPLIER_BITS = 4, 32


@dataclass(frozen=True, kw_only=True)
class DyadicOverride(LayerSettings):
    """Per-layer settings: ``dyadic`` (this weight layer dyadic, or kept QFX fixed
    point), ``weight_bits`` and ``act_bits`` (its own widths); ``None`` keeps the
    config's."""

    dyadic: bool | None = None
    weight_bits: int | None = None
    act_bits: int | None = None

    def __post_init__(self) -> None:
        if self.dyadic is not None and not isinstance(self.dyadic, bool):
            raise ConfigError(f"dyadic: expected true or false, got {self.dyadic!r}")
        for name in ("weight_bits", "act_bits"):
            value = getattr(self, name)
            if value is not None:
                checked_integer(value, name, MIN_BITS, MAX_BITS)


@dataclass(frozen=True, kw_only=True)
class DyadicConfig(FixedMethodConfig):
    """Integer-only quantization with scales that are not powers of two (HAWQ-V3's
    dyadic requantization), deployed exactly.

    Every ``nn.Conv2d`` / ``nn.Linear`` (unless ``overrides`` say ``dyadic: false``)
    becomes a dyadic layer (:mod:`qflow.dyadic.layers`):

    - ``weight_bits``: symmetric per-output-channel weights, scale max|W_r| / (2^(b−1) − 1)
      recomputed from the weights at every step, codes in ±(2^(b−1) − 1);
    - ``act_bits``: the layer's input as ``act_bits``-bit integer codes at a static
      scale (the input's range over training batches, an exponential moving average
      with ``range_momentum``; unsigned when the first batch has no negative value),
      fixed in eval mode and in the deployed model;
    - ``multiplier_bits``: width B (4 to 32) of the fixed-point multipliers b / 2^c
      that deploy the input scale (1/s_in) and each output channel's s_in · s_w,r;
      every multiplier has its own binary point (its code lies in [2^(B−2), 2^(B−1)));
    - ``fixed``: the QFX config of the model input, the layers' bias and output
      formats, BatchNorms (kept as their own layers) and every other tensor;
    - ``overrides``: layer-name pattern -> ``{"dyadic": bool, "weight_bits": int,
      "act_bits": int}``, applied in order.

    QAT eval computes the deployed integer arithmetic exactly (float64), so that
    QAT eval == emulator == every artifact.
    """

    version: int = DYADIC_CONFIG_VERSION
    weight_bits: int = 8
    act_bits: int = 8
    multiplier_bits: int = 16
    range_momentum: float = 0.99
    fixed: QFXConfig = field(default_factory=QFXConfig)
    overrides: dict = field(default_factory=dict)
    #: the method name in recipes and registries (qflow.methods)
    METHOD: ClassVar[str] = "dyadic"

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or self.version != DYADIC_CONFIG_VERSION:
            raise ConfigError(f"config version {self.version!r} is not supported "
                              f"(this qflow reads {DYADIC_CONFIG_VERSION})")
        checked_integer(self.weight_bits, "config.weight_bits", MIN_BITS, MAX_BITS)
        checked_integer(self.act_bits, "config.act_bits", MIN_BITS, MAX_BITS)
        checked_integer(self.multiplier_bits, "config.multiplier_bits", MIN_MULTIPLIER_BITS,
                        MAX_MULTIPLIER_BITS)
        momentum = self.range_momentum
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or \
                not 0 <= momentum < 1:
            raise ConfigError(f"config.range_momentum: expected a number in [0, 1), got "
                              f"{momentum!r}")
        object.__setattr__(self, "range_momentum", float(momentum))
        overrides = {}
        for pattern, value in override_patterns(self):
            overrides[pattern] = DyadicOverride.parse(value, f"config.overrides[{pattern!r}]")
        object.__setattr__(self, "overrides", overrides)

    def __hash__(self) -> int:
        return hash(self.to_json())

    def layer_settings(self, layer: str) -> tuple[bool, int, int]:
        """(dyadic or not, weight bits, input bits) of weight layer ``layer``, after
        every matching override in order."""
        dyadic, weight, act = True, self.weight_bits, self.act_bits
        for pattern, override in self.overrides.items():
            if LayerOverride(pattern=pattern).matches(layer):
                dyadic = dyadic if override.dyadic is None else override.dyadic
                weight = weight if override.weight_bits is None else override.weight_bits
                act = act if override.act_bits is None else override.act_bits
        return dyadic, weight, act

    def replace_bits(self, bits: int | None = None, *, weight_bits: int | None = None,
                     act_bits: int | None = None) -> DyadicConfig:
        """A copy with the command line's widths: ``bits`` sets the weight and input
        code widths, ``weight_bits`` and ``act_bits`` each one (they win over ``bits``).
        ``fixed`` (the power-of-two formats between layers) keeps its widths."""
        weight = weight_bits if weight_bits is not None else bits
        act = act_bits if act_bits is not None else bits
        changes = {}
        if weight is not None:
            changes["weight_bits"] = checked_integer(weight, "--bits/--weight-bits", MIN_BITS,
                                                     MAX_BITS)
        if act is not None:
            changes["act_bits"] = checked_integer(act, "--bits/--act-bits", MIN_BITS, MAX_BITS)
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict:
        """Plain data, led by ``method: dyadic``; ``fixed`` is a QFX config's data."""
        return {"method": self.METHOD, "version": self.version,
                "weight_bits": self.weight_bits, "act_bits": self.act_bits,
                "multiplier_bits": self.multiplier_bits,
                "range_momentum": self.range_momentum, "fixed": self.fixed_dict(),
                "overrides": {p: o.to_dict() for p, o in self.overrides.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> DyadicConfig:
        """Build from plain data; missing keys keep their defaults. A ``method`` key,
        when present, must say ``dyadic``."""
        return cls(**cls.checked_kwargs(data))
