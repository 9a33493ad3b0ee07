"""What the configs of methods built around a QFX ``fixed`` config share (BiPer, OFQ):
the JSON/YAML round trip, the common checks of ``from_dict``, hashing and the override
check. Each config keeps its own fields, validation and ``to_dict``.

>>> from qflow.biper import BiPerConfig
>>> BiPerConfig.from_json('{"method": "biper", "omega0": 5}').omega0
5.0
>>> BiPerConfig.from_yaml("") == BiPerConfig()
True
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import yaml

from qflow.config import LayerOverride, QFXConfig, method_key_checked
from qflow.errors import ConfigError
from qflow.yamlfile import load_json_text, load_yaml


def checked_integer(value, path: str, low: int, high: int) -> int:
    """``value`` if it is an integer (not a bool) in [low, high], else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{path}: expected an integer from {low} to {high}, got {value!r}")
    return value


def override_patterns(config, what: str = "layer patterns"):
    """Check a method config's ``fixed`` (a QFXConfig) and ``overrides`` (a mapping whose
    keys are valid layer patterns); its (pattern, value) pairs."""
    if not isinstance(config.fixed, QFXConfig):
        raise ConfigError(f"config.fixed: expected a QFXConfig, got "
                          f"{type(config.fixed).__name__}")
    if not isinstance(config.overrides, Mapping):
        raise ConfigError(f"config.overrides: expected a mapping of {what}, got "
                          f"{type(config.overrides).__name__}")
    for pattern, value in config.overrides.items():
        LayerOverride(pattern=pattern)  # a string and a valid regex, or ConfigError
        yield pattern, value


def under_fixed(message: str) -> str:
    """A QFX config error's message, placed under ``config.fixed``."""
    if message.startswith("config."):
        return "config.fixed." + message.removeprefix("config.")
    return "config.fixed: " + message.removeprefix("config: ")


class LayerSettings:
    """Mixin for a frozen dataclass of per-layer settings whose fields are all optional
    (``None``: keep the config's value): parsing from a mapping and back."""

    @classmethod
    def parse(cls, value, path: str):
        """``value`` (a mapping of field names, or an instance) as an instance; anything
        else is a one-line ConfigError under ``path``."""
        if isinstance(value, cls):
            return value
        keys = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping with {' and/or '.join(keys)}, "
                              f"got {type(value).__name__}")
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r} (allowed: "
                              f"{', '.join(keys)})")
        try:
            return cls(**value)
        except ConfigError as exc:
            raise ConfigError(f"{path}.{exc}") from None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}


class FixedMethodConfig:
    """Mixin for a frozen method config dataclass with ``METHOD``, ``version``, a QFX
    ``fixed`` config and ``overrides`` (layer pattern -> override); it provides
    ``from_dict`` through :meth:`_from_kwargs` and the JSON/YAML round trip."""

    METHOD = ""

    def to_dict(self) -> dict:
        raise NotImplementedError

    def check_overrides(self, layers: list[str]) -> None:
        """Every override must reach one of ``layers`` (the model's weight layers)."""
        for pattern in self.overrides:
            if not any(LayerOverride(pattern=pattern).matches(name) for name in layers):
                raise ConfigError(f"override pattern {pattern!r} matches no weight layer "
                                  f"(those are: {', '.join(layers) or 'none'})")

    @classmethod
    def checked_kwargs(cls, data: dict) -> dict:
        """``data``'s keys checked as fields (the ``method`` key must name this method),
        ``version`` an integer, ``fixed`` parsed as a QFX config (its errors placed
        under ``config.fixed``) and ``overrides`` a mapping."""
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
        if "fixed" in kwargs:
            fixed = kwargs["fixed"]
            if not isinstance(fixed, dict):
                raise ConfigError(f"config.fixed: expected a mapping, got "
                                  f"{type(fixed).__name__}")
            try:
                kwargs["fixed"] = QFXConfig.from_dict(fixed)
            except ConfigError as exc:
                raise ConfigError(under_fixed(str(exc))) from None
        if "overrides" in kwargs and not isinstance(kwargs["overrides"], dict):
            raise ConfigError(f"config.overrides: expected a mapping of layer patterns, got "
                              f"{type(kwargs['overrides']).__name__}")
        return kwargs

    def fixed_dict(self) -> dict:
        """``fixed`` as plain data, without its ``method`` key."""
        fixed = self.fixed.to_dict()
        fixed.pop("method")
        return fixed

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes):
        """Parse a JSON config (malformed JSON is a one-line ConfigError)."""
        return cls.from_dict(load_json_text(text, error=ConfigError))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str | bytes):
        """Parse a YAML recipe (an empty document is the default config)."""
        data = load_yaml(text, error=ConfigError)
        return cls.from_dict({} if data is None else data)
