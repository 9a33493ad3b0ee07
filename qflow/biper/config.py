"""BiPer configuration: a frozen, keyword-only dataclass with a JSON/YAML round trip.

Parsing is by allow-list, as for :class:`qflow.QFXConfig`: every key must be a field,
every value must have the field's type; anything else is a one-line ConfigError.

>>> from qflow.biper.config import BiPerConfig
>>> cfg = BiPerConfig(omega0=10.0, overrides={"blocks.0.conv": {"binary": False}})
>>> cfg.overrides["blocks.0.conv"]
BinaryOverride(binary=False, omega0=None)
>>> BiPerConfig.from_yaml(cfg.to_yaml()) == cfg
True
>>> BiPerConfig.from_dict({"estimator": "xnor"})
Traceback (most recent call last):
qflow.errors.ConfigError: config.estimator: expected 'biper' or 'ste', got 'xnor'
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from qflow.config import LayerOverride, QFXConfig
from qflow.errors import ConfigError
from qflow.method_config import FixedMethodConfig, LayerSettings, override_patterns

BIPER_CONFIG_VERSION = 1
ESTIMATORS = ("biper", "ste")


def _number(value, path: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ConfigError(f"{path}: expected a finite number {'> 0' if positive else '>= 0'}, "
                          f"got {value!r}")
    return value


def _epochs(value, path: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: expected an integer >= 0 or null, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class BinaryOverride(LayerSettings):
    """Per-layer BiPer settings: ``binary`` (make a weight layer binary or keep it
    fixed-point; ``None`` keeps the default) and ``omega0`` (its own frequency)."""

    binary: bool | None = None
    omega0: float | None = None

    def __post_init__(self) -> None:
        if self.binary is not None and not isinstance(self.binary, bool):
            raise ConfigError(f"binary: expected true or false, got {self.binary!r}")
        if self.omega0 is not None:
            object.__setattr__(self, "omega0", _number(self.omega0, "omega0", positive=True))


@dataclass(frozen=True, kw_only=True)
class BiPerConfig(FixedMethodConfig):
    """BiPer binary networks (binary weights and activations, two-stage training).

    Every ``nn.Conv2d`` / ``nn.Linear`` except the first and the last weight layer (in
    forward order) becomes binary; everything else is quantized by QFX with ``fixed``.

    - ``omega0``: the frequency ω₀ of the periodic weight function sin(ω₀·w);
    - ``estimator``: ``"biper"`` (sin(ω₀·w), gradient ω₀·cos(ω₀·w)) or ``"ste"`` (the
      sign straight-through baseline: sign(w), clipped identity gradient, no sine, no
      regularizer);
    - ``tau1``, ``tau2``: weight of the regularizer τ·mean(sin²(ω₀·w)) in stage 1 and
      stage 2 (0 disables it);
    - ``stage1_epochs``, ``stage2_epochs``: epochs of each stage (``None``: the QAT
      epochs given on the command line);
    - ``fixed``: the QFX config of the model input, the first and last weight layers and
      every non-binary tensor (BatchNorm scale and shift, adds, activations, pooling);
    - ``overrides``: layer-name pattern (a name or a regular expression, as in QFX) ->
      ``{"binary": bool, "omega0": float}``, applied in order.
    """

    version: int = BIPER_CONFIG_VERSION
    omega0: float = 20.0
    estimator: str = "biper"
    tau1: float = 0.037
    tau2: float = 0.0468
    stage1_epochs: int | None = None
    stage2_epochs: int | None = None
    fixed: QFXConfig = field(default_factory=QFXConfig)
    overrides: dict = field(default_factory=dict)
    #: the method name in recipes and registries (qflow.methods)
    METHOD: ClassVar[str] = "biper"

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or self.version != BIPER_CONFIG_VERSION:
            raise ConfigError(f"config version {self.version!r} is not supported "
                              f"(this qflow reads {BIPER_CONFIG_VERSION})")
        object.__setattr__(self, "omega0", _number(self.omega0, "config.omega0", positive=True))
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"config.estimator: expected 'biper' or 'ste', "
                              f"got {self.estimator!r}")
        for name in ("tau1", "tau2"):
            object.__setattr__(self, name, _number(getattr(self, name), f"config.{name}"))
        for name in ("stage1_epochs", "stage2_epochs"):
            _epochs(getattr(self, name), f"config.{name}")
        overrides = {}
        for pattern, value in override_patterns(self):
            overrides[pattern] = BinaryOverride.parse(value, f"config.overrides[{pattern!r}]")
        object.__setattr__(self, "overrides", overrides)

    def __hash__(self) -> int:
        return hash(self.to_json())

    # -- per layer -----------------------------------------------------------------
    def layer_settings(self, layer: str, binary: bool) -> tuple[bool, float]:
        """(binary, ω₀) of weight layer ``layer`` whose default is ``binary``, after
        every matching override in order."""
        omega0 = self.omega0
        for pattern, override in self.overrides.items():
            if LayerOverride(pattern=pattern).matches(layer):
                binary = binary if override.binary is None else override.binary
                omega0 = omega0 if override.omega0 is None else override.omega0
        return binary, omega0

    def stage_epochs(self, qat_epochs: int) -> tuple[int, int]:
        """Epochs of stage 1 and stage 2 (``None`` fields take ``qat_epochs``)."""
        first = qat_epochs if self.stage1_epochs is None else self.stage1_epochs
        second = qat_epochs if self.stage2_epochs is None else self.stage2_epochs
        return first, second

    def replace_bits(self, bits: int | None = None, *, weight_bits: int | None = None,
                     act_bits: int | None = None) -> BiPerConfig:
        """A copy whose ``fixed`` (non-binary) word lengths are changed, as
        :meth:`QFXConfig.replace_bits`; binary layers stay binary."""
        fixed = self.fixed.replace_bits(bits, weight_bits=weight_bits, act_bits=act_bits)
        return self if fixed == self.fixed else dataclasses.replace(self, fixed=fixed)

    # -- serialization -------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data, led by ``method: biper``; ``fixed`` is a QFX config's data."""
        fixed = self.fixed_dict()
        return {"method": self.METHOD, "version": self.version, "omega0": self.omega0,
                "estimator": self.estimator, "tau1": self.tau1, "tau2": self.tau2,
                "stage1_epochs": self.stage1_epochs, "stage2_epochs": self.stage2_epochs,
                "fixed": fixed,
                "overrides": {p: o.to_dict() for p, o in self.overrides.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> BiPerConfig:
        """Build from plain data; missing keys keep their defaults and ``fixed`` given in
        part keeps QFX's defaults for the rest. A ``method`` key, when present, must say
        ``biper``."""
        kwargs = cls.checked_kwargs(data)
        if "estimator" in kwargs and not isinstance(kwargs["estimator"], str):
            raise ConfigError(f"config.estimator: expected 'biper' or 'ste', got "
                              f"{kwargs['estimator']!r}")
        return cls(**kwargs)
