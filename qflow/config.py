"""QFX configuration: frozen, keyword-only dataclasses with a JSON/YAML round trip.

Parsing is by allow-list: every key must be a field of the dataclass it lands in, every
value must have the field's type. Nothing is evaluated or unpickled.

>>> from qflow.config import QFXConfig, LayerOverride, SpecOverride
>>> cfg = QFXConfig.with_bits(4, overrides=(
...     LayerOverride(pattern="fc3", weight=SpecOverride(bits=8)),))
>>> cfg.spec_for("fc3", "weight").bits, cfg.spec_for("fc1", "weight").bits
(8, 4)
>>> QFXConfig.from_json(cfg.to_json()) == cfg
True
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import yaml

from qflow.errors import ConfigError
from qflow.numerics.types import Overflow, Rounding, parse_overflow, parse_rounding
from qflow.yamlfile import load_json_text, load_yaml

CONFIG_VERSION = 1
MIN_BITS, MAX_BITS = 1, 32
ROLES = ("input", "weight", "bias", "activation", "intermediate", "norm_scale")


def _check_bits(bits: int, where: str) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(
            f"{where}: bit width {bits} is impossible (must be {MIN_BITS}..{MAX_BITS})")


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How one kind of tensor is quantized.

    ``bits`` is the word length W (sign included). ``integer_bits`` is the starting
    number of integer bits (sign excluded); ``None`` picks it from the data (weights at
    creation, activations on the first training batch). When ``trainable`` the integer
    bits are learned (the binary point moves, W stays). ``signed=None`` decides the sign
    from the data. ``khot`` > 0 (weights only) restricts each code to a sum of at most
    ``khot`` signed powers of two.
    """

    bits: int = 8
    signed: bool | None = None
    integer_bits: int | None = None
    rounding: Rounding = Rounding.RND_CONV
    overflow: Overflow = Overflow.SAT
    per_channel: bool = False
    trainable: bool = True
    khot: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "rounding", parse_rounding(self.rounding))
            object.__setattr__(self, "overflow", parse_overflow(self.overflow))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        _check_bits(self.bits, "bits")
        if self.integer_bits is not None and abs(self.integer_bits) > 64:
            raise ConfigError(f"integer_bits {self.integer_bits} is out of range (-64..64)")
        if not 0 <= self.khot <= self.bits:
            raise ConfigError(f"khot {self.khot} must be between 0 (off) and bits ({self.bits})")


@dataclass(frozen=True, kw_only=True)
class SpecOverride:
    """Fields to change in a :class:`QuantSpec` for matching layers; ``None`` keeps the base."""

    bits: int | None = None
    signed: bool | None = None
    integer_bits: int | None = None
    rounding: Rounding | None = None
    overflow: Overflow | None = None
    per_channel: bool | None = None
    trainable: bool | None = None
    khot: int | None = None

    def __post_init__(self) -> None:
        try:
            if self.rounding is not None:
                object.__setattr__(self, "rounding", parse_rounding(self.rounding))
            if self.overflow is not None:
                object.__setattr__(self, "overflow", parse_overflow(self.overflow))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.bits is not None:
            _check_bits(self.bits, "bits")
        if self.khot is not None and not 0 <= self.khot <= (self.bits or MAX_BITS):
            raise ConfigError(f"khot {self.khot} must be between 0 (off) and bits")
        if self.integer_bits is not None and abs(self.integer_bits) > 64:
            raise ConfigError(f"integer_bits {self.integer_bits} is out of range (-64..64)")

    def apply(self, base: QuantSpec) -> QuantSpec:
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True, kw_only=True)
class LayerOverride:
    """Per-layer changes. ``pattern`` is a module name (``"fc1"``, ``"block.conv2"``) or a
    regular expression matched against the whole name (``"fc[12]"``)."""

    pattern: str
    input: SpecOverride | None = None
    weight: SpecOverride | None = None
    bias: SpecOverride | None = None
    activation: SpecOverride | None = None
    intermediate: SpecOverride | None = None
    norm_scale: SpecOverride | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise ConfigError(f"override pattern must be a string, not "
                              f"{type(self.pattern).__name__}")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ConfigError(
                f"override pattern {self.pattern!r} is not a valid regex: {exc}") from None
        except (RecursionError, OverflowError):
            raise ConfigError(f"override pattern {self.pattern[:40]!r}... is too complex a "
                              "regex") from None

    def matches(self, name: str) -> bool:
        return name == self.pattern or re.fullmatch(self.pattern, name) is not None


def method_key_checked(data, method: str) -> dict:
    """A copy of the config mapping ``data`` without its ``method`` key, which must name
    ``method`` when present (a recipe of another method read as this one)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    given = data.pop("method", method)
    if given != method:
        raise ConfigError(f"config.method: this is a {method} config, not {given!r}")
    return data


@dataclass(frozen=True, kw_only=True)
class QFXConfig:
    """QFX trainable fixed-point quantization of a whole model.

    Roles: ``input`` (the model input), ``weight``, ``bias``, ``activation`` (ReLU and
    pooling outputs, the tensors that feed the next weight layer), ``intermediate``
    (BatchNorm and residual-add outputs), ``norm_scale`` (BatchNorm's per-channel scale;
    its shift uses ``bias``). Linear and conv outputs are exact accumulators.
    ``fold_batchnorm`` folds a BatchNorm into the conv or linear layer before it instead.
    """

    version: int = CONFIG_VERSION
    # The input's range is the data's: its binary point is calibrated, not trained
    # (training it would also cost the first layer an input gradient).
    input: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8, trainable=False))
    weight: QuantSpec = field(
        default_factory=lambda: QuantSpec(bits=8, signed=True, per_channel=True))
    bias: QuantSpec = field(default_factory=lambda: QuantSpec(bits=16, signed=True))
    activation: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8))
    intermediate: QuantSpec = field(default_factory=lambda: QuantSpec(bits=16, signed=True))
    norm_scale: QuantSpec = field(
        default_factory=lambda: QuantSpec(bits=12, signed=True, per_channel=True)
    )
    fold_batchnorm: bool = False
    overrides: tuple[LayerOverride, ...] = ()
    #: the method name in recipes and registries (qflow.methods)
    METHOD: ClassVar[str] = "qfx"

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"config version {self.version} is not supported "
                              f"(this qflow reads {CONFIG_VERSION})")
        object.__setattr__(self, "overrides", tuple(self.overrides))
        # Each override must give a valid spec on its own (khot <= bits and so on).
        for i, override in enumerate(self.overrides):
            for role in ROLES:
                patch = getattr(override, role)
                if patch is None:
                    continue
                try:
                    patch.apply(getattr(self, role))
                except ConfigError as exc:
                    raise ConfigError(f"overrides[{i}].{role}: {exc}") from None

    @classmethod
    def with_bits(cls, bits: int | None = None, *, weight_bits: int | None = None,
                  act_bits: int | None = None, **fields) -> QFXConfig:
        """Default config with weight and/or activation (and input) word lengths changed."""
        return cls(**fields).replace_bits(bits, weight_bits=weight_bits, act_bits=act_bits)

    def replace_bits(self, bits: int | None = None, *, weight_bits: int | None = None,
                     act_bits: int | None = None) -> QFXConfig:
        """A copy with the word length of weights (``weight_bits``), of activations and
        input (``act_bits``), or of all three (``bits``) changed; ``None`` keeps it."""
        w = weight_bits if weight_bits is not None else bits
        a = act_bits if act_bits is not None else bits
        changes = {}
        if w is not None:
            changes["weight"] = dataclasses.replace(self.weight, bits=w)
        if a is not None:
            changes["activation"] = dataclasses.replace(self.activation, bits=a)
            changes["input"] = dataclasses.replace(self.input, bits=a)
        return dataclasses.replace(self, **changes)

    def spec_for(self, layer: str, role: str) -> QuantSpec:
        """The spec of ``role`` in layer ``layer``, after every matching override (in order)."""
        if role not in ROLES:
            raise ConfigError(f"unknown tensor role {role!r} (known: {', '.join(ROLES)})")
        spec = getattr(self, role)
        for override in self.overrides:
            patch = getattr(override, role)
            if patch is not None and override.matches(layer):
                spec = patch.apply(spec)
        return spec

    # -- serialization -------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data, led by ``method: qfx`` (the key recipes name their method with)."""
        return {"method": self.METHOD, **_to_plain(self)}

    @classmethod
    def from_dict(cls, data: dict) -> QFXConfig:
        """Build from plain data; a role given in part (``weight: {bits: 4}``) keeps the
        defaults of that role for the fields it leaves out. A ``method`` key, when
        present, must say ``qfx``."""
        data = method_key_checked(data, cls.METHOD)
        defaults = cls()
        partial = {}
        for role in ROLES:
            if role in data:
                given = data.pop(role)
                if not isinstance(given, dict):
                    raise ConfigError(f"config.{role}: expected a mapping, "
                                      f"got {type(given).__name__}")
                merged = {**_to_plain(getattr(defaults, role)), **given}
                partial[role] = _from_plain(QuantSpec, merged, f"config.{role}")
        config = _from_plain(cls, data, "config")
        return dataclasses.replace(config, **partial) if partial else config

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> QFXConfig:
        """Parse a JSON config; malformed, deep or duplicate-keyed JSON is a one-line
        :class:`ConfigError` (see :func:`qflow.yamlfile.load_json_text`).

        >>> QFXConfig.from_json('{"weight": {"bits": 4}}').weight.bits
        4
        >>> QFXConfig.from_json('{"weight": {"bits": 4, "bits": 6}}')
        Traceback (most recent call last):
        qflow.errors.ConfigError: duplicate key 'bits'
        """
        return cls.from_dict(load_json_text(text, error=ConfigError))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str | bytes) -> QFXConfig:
        """Parse a YAML recipe (an empty document is the default config). Malformed YAML,
        a duplicate key, non-string keys and nesting deeper than 100 levels are one-line
        :class:`ConfigError` s (see :func:`qflow.yamlfile.load_yaml`).

        >>> QFXConfig.from_yaml("weight: {bits: 4}\\nfold_batchnorm: true").weight.bits
        4
        >>> QFXConfig.from_yaml("weight:\\n  bits: 4\\n  bits: 6\\n")
        Traceback (most recent call last):
        qflow.errors.ConfigError: duplicate key 'bits' at line 3
        """
        data = load_yaml(text, error=ConfigError)
        return cls.from_dict({} if data is None else data)


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v is None and isinstance(value, SpecOverride | LayerOverride):
                continue  # absent means "inherit"
            out[f.name] = _to_plain(v)
        return out
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if isinstance(value, Rounding | Overflow):
        return value.value
    return value


def _from_plain(cls, data, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        allowed = ", ".join(sorted(names))
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (allowed: {allowed})")
    kwargs = {k: _parse_value(hints[k], v, f"{path}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(path) else f"{path}: {msg}") from None


def _parse_value(hint, value, path: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _parse_value(options[0], value, path)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        item = typing.get_args(hint)[0]
        return tuple(_parse_value(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _from_plain(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if hint in (Rounding, Overflow):
        parse = parse_rounding if hint is Rounding else parse_overflow
        try:
            return parse(str(value))
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    raise ConfigError(f"{path}: unsupported field type {hint!r}")
