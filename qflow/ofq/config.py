"""OFQ configuration: a frozen, keyword-only dataclass with a JSON/YAML round trip.

Parsing is by allow-list, as for :class:`qflow.QFXConfig`: every key must be a field,
every value must have the field's type; anything else is a one-line ConfigError.

>>> from qflow.ofq.config import OFQConfig
>>> cfg = OFQConfig(weight_bits=2, overrides={"head": {"weight_bits": 4}})
>>> cfg.overrides["head"]
StatsQOverride(statsq=None, weight_bits=4)
>>> OFQConfig.from_yaml(cfg.to_yaml()) == cfg
True
>>> OFQConfig.from_dict({"weight_bits": 1})
Traceback (most recent call last):
qflow.errors.ConfigError: config.weight_bits: expected an integer from 2 to 8, got 1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
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

#: 2: the ``qkr`` field (version-1 data, written before it, reads as ``qkr: false``);
#: 3: ``act_quantizer`` (earlier data reads as ``qfx``, what it was trained with)
OFQ_CONFIG_VERSION = 3
#: StatsQ weight widths (the sign included: 2^b levels)
MIN_WEIGHT_BITS, MAX_WEIGHT_BITS = 2, 8
#: widths of the fixed-point multiplier that deploys each row's scale
MIN_MULTIPLIER_BITS, MAX_MULTIPLIER_BITS = 4, 24
#: the weight quantizers: OFQ's StatsQ, or the learned-scale LSQ baseline
WEIGHT_QUANTIZERS = ("statsq", "lsq")
#: the input quantizers of the StatsQ/LSQ layers: QFX power-of-two fixed point, or a
#: learned LSQ scale (per tensor, or per token) deployed as a fixed-point multiplier
ACT_QUANTIZERS = ("qfx", "lsq", "lsq_token")


#: the training fields (CGA and distillation), in to_dict's order
_TRAINING_FIELDS = ("cga_epochs", "cga_br", "distill", "distill_alpha", "distill_temperature")


def _number(value, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    return float(value)


def _check_training(config) -> None:
    """Check (and make floats of) the CGA and distillation fields of an OFQConfig."""
    if config.cga_epochs is not None:
        checked_integer(config.cga_epochs, "config.cga_epochs", 0, 10**6)
    br = _number(config.cga_br, "config.cga_br")
    if not 0 <= br < 0.5:
        raise ConfigError(f"config.cga_br: expected a number in [0, 0.5), got {br!r}")
    if not isinstance(config.distill, bool):
        raise ConfigError(f"config.distill: expected true or false, got {config.distill!r}")
    alpha = _number(config.distill_alpha, "config.distill_alpha")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"config.distill_alpha: expected a number in [0, 1], got {alpha!r}")
    temperature = _number(config.distill_temperature, "config.distill_temperature")
    if not 0 < temperature <= 100:
        raise ConfigError(f"config.distill_temperature: expected a number in (0, 100], got "
                          f"{temperature!r}")
    for name, value in (("cga_br", br), ("distill_alpha", alpha),
                        ("distill_temperature", temperature)):
        object.__setattr__(config, name, value)


@dataclass(frozen=True, kw_only=True)
class StatsQOverride(LayerSettings):
    """Per-layer OFQ settings: ``statsq`` (quantize a weight layer's weights with StatsQ,
    or keep them QFX fixed point; ``None`` keeps the default) and ``weight_bits`` (its
    own StatsQ width)."""

    statsq: bool | None = None
    weight_bits: int | None = None

    def __post_init__(self) -> None:
        if self.statsq is not None and not isinstance(self.statsq, bool):
            raise ConfigError(f"statsq: expected true or false, got {self.statsq!r}")
        if self.weight_bits is not None:
            checked_integer(self.weight_bits, "weight_bits", MIN_WEIGHT_BITS, MAX_WEIGHT_BITS)


@dataclass(frozen=True, kw_only=True)
class OFQConfig(FixedMethodConfig):
    """OFQ (oscillation-free quantization, ICML 2023): StatsQ weights.

    Every ``nn.Conv2d`` / ``nn.Linear`` except the first and the last weight layer (in
    forward order) gets StatsQ weights; everything else is quantized by QFX with
    ``fixed`` (so the first and last layers' weights have ``fixed.weight.bits``, 8 by
    default, and activations and intermediates are QFX power-of-two fixed point).

    - ``weight_bits``: StatsQ width b (2 to 8): 2^b mid-rise levels per output row;
    - ``multiplier_bits``: width B (4 to 24) of the signed fixed-point multiplier that
      deploys each row's scale s/2^b; each row has its own binary point (the
      multiplier is normalized: its code lies in [2^(B−2), 2^(B−1)));
    - ``weight_quantizer``: ``"statsq"`` (OFQ) or ``"lsq"`` (the baseline: a learned
      per-row scale, mid-tread codes k in [−2^(b−1), 2^(b−1) − 1]; ``qflow.ofq.lsq``),
      for the layers that the first/last rule and ``overrides`` give ``statsq: true``;
    - ``act_quantizer``: the inputs of the StatsQ (LSQ) layers: ``"qfx"`` keeps them
      QFX power-of-two fixed point; ``"lsq"`` quantizes each to ``fixed.activation.bits``
      integer codes at a learned per-tensor scale (LSQ, Esser et al.), deployed as a
      fixed-point multiplier of ``multiplier_bits`` (:mod:`qflow.quantizers.scaled`);
      ``"lsq_token"`` learns one scale per token position for inputs of tokens (batch,
      T, features), deployed as one multiplier per token on the input and one for its
      inverse on the accumulator (other inputs: one scale, as ``"lsq"``);
    - ``qkr``: query-key reparameterization (:mod:`qflow.ofq.qkr`): every attention whose
      scores are ``q @ kᵀ`` of two linear layers gets one C × C layer per head in their
      place, quantized like the other layers (a model without one is left as it is);
    - ``fixed``: the QFX config of the model input, the first and last weight layers,
      the StatsQ layers' bias and output, and every other tensor (BatchNorms are kept
      as their own layers: OFQ quantizes with ``fold_batchnorm`` off);
    - ``overrides``: layer-name pattern (a name or a regular expression, as in QFX) ->
      ``{"statsq": bool, "weight_bits": int}``, applied in order;
    - ``cga_epochs``: epochs of confidence-guided annealing after QAT (``None``: a third
      of the QAT epochs, rounded up; 0: none); ``cga_br``: its boundary range BR, in
      quantization steps (weights farther than BR from a rounding threshold are frozen,
      :mod:`qflow.ofq.cga`);
    - ``distill``: QAT and CGA distil from the float model, with the loss
      (1 − α)·CE + α·T²·KL; α = ``distill_alpha``, T = ``distill_temperature``.
    """

    version: int = OFQ_CONFIG_VERSION
    weight_bits: int = 4
    multiplier_bits: int = 16
    weight_quantizer: str = "statsq"
    act_quantizer: str = "qfx"
    qkr: bool = True
    fixed: QFXConfig = field(default_factory=QFXConfig)
    overrides: dict = field(default_factory=dict)
    cga_epochs: int | None = None
    cga_br: float = 0.005
    distill: bool = True
    distill_alpha: float = 0.5
    distill_temperature: float = 1.0
    #: the method name in recipes and registries (qflow.methods)
    METHOD: ClassVar[str] = "ofq"

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or self.version != OFQ_CONFIG_VERSION:
            raise ConfigError(f"config version {self.version!r} is not supported "
                              f"(this qflow reads {OFQ_CONFIG_VERSION})")
        checked_integer(self.weight_bits, "config.weight_bits", MIN_WEIGHT_BITS, MAX_WEIGHT_BITS)
        checked_integer(self.multiplier_bits, "config.multiplier_bits", MIN_MULTIPLIER_BITS,
                 MAX_MULTIPLIER_BITS)
        if not isinstance(self.weight_quantizer, str) or \
                self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise ConfigError(f"config.weight_quantizer: expected one of "
                              f"{', '.join(WEIGHT_QUANTIZERS)}, got {self.weight_quantizer!r}")
        if not isinstance(self.act_quantizer, str) or self.act_quantizer not in ACT_QUANTIZERS:
            raise ConfigError(f"config.act_quantizer: expected one of "
                              f"{', '.join(ACT_QUANTIZERS)}, got {self.act_quantizer!r}")
        if not isinstance(self.qkr, bool):
            raise ConfigError(f"config.qkr: expected true or false, got {self.qkr!r}")
        overrides = {}
        for pattern, value in override_patterns(self):
            overrides[pattern] = StatsQOverride.parse(value, f"config.overrides[{pattern!r}]")
        object.__setattr__(self, "overrides", overrides)
        _check_training(self)

    def __hash__(self) -> int:
        return hash(self.to_json())

    # -- per layer -----------------------------------------------------------------
    def layer_settings(self, layer: str, statsq: bool) -> tuple[bool, int]:
        """(StatsQ or not, its width) of weight layer ``layer`` whose default is
        ``statsq``, after every matching override in order."""
        bits = self.weight_bits
        for pattern, override in self.overrides.items():
            if LayerOverride(pattern=pattern).matches(layer):
                statsq = statsq if override.statsq is None else override.statsq
                bits = bits if override.weight_bits is None else override.weight_bits
        return statsq, bits

    def replace_bits(self, bits: int | None = None, *, weight_bits: int | None = None,
                     act_bits: int | None = None) -> OFQConfig:
        """A copy with the command line's word lengths: ``bits`` and ``weight_bits``
        set the StatsQ width (``weight_bits`` wins), ``act_bits`` the activations and
        input of ``fixed``; the first and last layers' weights keep their width."""
        statsq = weight_bits if weight_bits is not None else bits
        changed = self
        if statsq is not None and statsq != self.weight_bits:
            checked_integer(statsq, "--bits/--weight-bits (OFQ StatsQ width)", MIN_WEIGHT_BITS,
                     MAX_WEIGHT_BITS)
            changed = dataclasses.replace(changed, weight_bits=statsq)
        if act_bits is not None:
            fixed = self.fixed.replace_bits(act_bits=act_bits)
            if fixed != self.fixed:
                changed = dataclasses.replace(changed, fixed=fixed)
        return changed

    # -- serialization -------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data, led by ``method: ofq``; ``fixed`` is a QFX config's data."""
        fixed = self.fixed_dict()
        return {"method": self.METHOD, "version": self.version,
                "weight_bits": self.weight_bits, "multiplier_bits": self.multiplier_bits,
                "weight_quantizer": self.weight_quantizer,
                "act_quantizer": self.act_quantizer, "qkr": self.qkr,
                "fixed": fixed,
                "overrides": {p: o.to_dict() for p, o in self.overrides.items()},
                **{k: getattr(self, k) for k in _TRAINING_FIELDS}}

    @classmethod
    def from_dict(cls, data: dict) -> OFQConfig:
        """Build from plain data; missing keys keep their defaults and ``fixed`` given in
        part keeps QFX's defaults for the rest. A ``method`` key, when present, must say
        ``ofq``. Version-1 data (before ``qkr``) reads as ``qkr: false`` and data before
        version 3 as ``act_quantizer: qfx``: the model it was written for."""
        if isinstance(data, Mapping) and data.get("version") == 1 and "qkr" not in data:
            data = {**data, "version": 2, "qkr": False}
        if isinstance(data, Mapping) and data.get("version") == 2 and \
                "act_quantizer" not in data:
            data = {**data, "version": OFQ_CONFIG_VERSION, "act_quantizer": "qfx"}
        kwargs = cls.checked_kwargs(data)
        return cls(**kwargs)
