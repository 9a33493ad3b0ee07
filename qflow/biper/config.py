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
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import yaml

from qflow.config import LayerOverride, QFXConfig, method_key_checked
from qflow.errors import ConfigError
from qflow.yamlfile import load_json_text, load_yaml

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


def _under_fixed(message: str) -> str:
    """A QFX config error's message, placed under ``config.fixed``."""
    if message.startswith("config."):
        return "config.fixed." + message.removeprefix("config.")
    return "config.fixed: " + message.removeprefix("config: ")


@dataclass(frozen=True, kw_only=True)
class BinaryOverride:
    """Per-layer BiPer settings: ``binary`` (make a weight layer binary or keep it
    fixed-point; ``None`` keeps the default) and ``omega0`` (its own frequency)."""

    binary: bool | None = None
    omega0: float | None = None

    def __post_init__(self) -> None:
        if self.binary is not None and not isinstance(self.binary, bool):
            raise ConfigError(f"binary: expected true or false, got {self.binary!r}")
        if self.omega0 is not None:
            object.__setattr__(self, "omega0", _number(self.omega0, "omega0", positive=True))

    @classmethod
    def parse(cls, value, path: str) -> BinaryOverride:
        if isinstance(value, BinaryOverride):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping with binary and/or omega0, "
                              f"got {type(value).__name__}")
        unknown = sorted(set(value) - {"binary", "omega0"})
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r} (allowed: binary, omega0)")
        try:
            return cls(**value)
        except ConfigError as exc:
            raise ConfigError(f"{path}.{exc}") from None

    def to_dict(self) -> dict:
        return {k: v for k, v in (("binary", self.binary), ("omega0", self.omega0))
                if v is not None}


@dataclass(frozen=True, kw_only=True)
class BiPerConfig:
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
        if not isinstance(self.fixed, QFXConfig):
            raise ConfigError(f"config.fixed: expected a QFXConfig, got "
                              f"{type(self.fixed).__name__}")
        if not isinstance(self.overrides, Mapping):
            raise ConfigError(f"config.overrides: expected a mapping of layer patterns, got "
                              f"{type(self.overrides).__name__}")
        overrides = {}
        for pattern, value in self.overrides.items():
            LayerOverride(pattern=pattern)  # a string and a valid regex, or ConfigError
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

    def check_overrides(self, layers: list[str]) -> None:
        """Every override must reach one of ``layers`` (the model's weight layers)."""
        for pattern in self.overrides:
            if not any(LayerOverride(pattern=pattern).matches(name) for name in layers):
                raise ConfigError(f"override pattern {pattern!r} matches no weight layer "
                                  f"(those are: {', '.join(layers) or 'none'})")

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
        fixed = self.fixed.to_dict()
        fixed.pop("method")
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
        data = method_key_checked(data, cls.METHOD)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"config: unknown key {unknown[0]!r} (allowed: "
                              f"{', '.join(sorted(names))})")
        kwargs = dict(data)
        if "version" in kwargs:
            version = kwargs["version"]
            if isinstance(version, bool) or not isinstance(version, int):
                raise ConfigError(f"config.version: expected an integer, got {version!r}")
        if "estimator" in kwargs and not isinstance(kwargs["estimator"], str):
            raise ConfigError(f"config.estimator: expected 'biper' or 'ste', got "
                              f"{kwargs['estimator']!r}")
        if "fixed" in kwargs:
            fixed = kwargs["fixed"]
            if not isinstance(fixed, dict):
                raise ConfigError(f"config.fixed: expected a mapping, got "
                                  f"{type(fixed).__name__}")
            try:
                kwargs["fixed"] = QFXConfig.from_dict(fixed)
            except ConfigError as exc:
                raise ConfigError(_under_fixed(str(exc))) from None
        if "overrides" in kwargs and not isinstance(kwargs["overrides"], dict):
            raise ConfigError(f"config.overrides: expected a mapping of layer patterns, got "
                              f"{type(kwargs['overrides']).__name__}")
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> BiPerConfig:
        """Parse a JSON config (malformed JSON is a one-line ConfigError).

        >>> BiPerConfig.from_json('{"method": "biper", "omega0": 5}').omega0
        5.0
        """
        return cls.from_dict(load_json_text(text, error=ConfigError))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str | bytes) -> BiPerConfig:
        """Parse a YAML recipe (an empty document is the default config).

        >>> BiPerConfig.from_yaml("estimator: ste\\nfixed: {weight: {bits: 6}}").fixed.weight.bits
        6
        """
        data = load_yaml(text, error=ConfigError)
        return cls.from_dict({} if data is None else data)
