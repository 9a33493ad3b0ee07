"""HAWQ configuration: a frozen, keyword-only dataclass with a JSON/YAML round trip.

>>> from qflow.hawq.config import HAWQConfig
>>> cfg = HAWQConfig(budget={"size": 0.6}, overrides={"head": 8})
>>> HAWQConfig.from_yaml(cfg.to_yaml()) == cfg
True
>>> HAWQConfig.from_dict({"budget": {"size": 0}})
Traceback (most recent call last):
qflow.errors.ConfigError: config.budget.size: expected a fraction of the 8-bit ... got 0
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from qflow.config import LayerOverride, QFXConfig, SpecOverride
from qflow.dyadic.config import DyadicConfig
from qflow.errors import ConfigError
from qflow.method_config import FixedMethodConfig, checked_integer, override_patterns

from .choice import FRACTIONS, QUANTITIES, RESOURCES


def _pattern(name: str) -> str:
    """A layer name as an override pattern that matches it alone."""
    return name if re.escape(name) == name else re.escape(name)


def _dyadic_override(choice: int | tuple[int, int]) -> dict:
    if isinstance(choice, tuple):
        return {"weight_bits": choice[0], "act_bits": choice[1]}
    return {"weight_bits": choice}

#: 2: the ``requant`` field (version-1 data, written before it, reads as ``fixed``)
HAWQ_CONFIG_VERSION = 2
#: how the chosen widths are trained and deployed: QFX power-of-two fixed point, or
#: dyadic (non-power-of-two scales as fixed-point multipliers, :mod:`qflow.dyadic`)
REQUANT_MODES = ("fixed", "dyadic")
MIN_WIDTH, MAX_WIDTH = 2, 16
MAX_BUDGET = 4.0


def _number(value, path: str, low: float, high: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
        raise ConfigError(f"{path}: expected {what} in ({low:g}, {high:g}], got {value!r}")
    return float(value)


def _budget_value(name: str, value, path: str):
    if name in FRACTIONS:
        return _number(value, path, 0, MAX_BUDGET, "a fraction of the 8-bit model's")
    return checked_integer(value, path, 1, 10**9)


def parse_budget(text: str) -> tuple[str, float | int]:
    """``"size=0.6"`` -> ("size", 0.6), as the command line's ``--budget`` gives it.

    >>> parse_budget("bops=0.25"), parse_budget("dsp=200")
    (('bops', 0.25), ('dsp', 200))
    """
    name, sep, value = text.partition("=")
    if not sep or name not in QUANTITIES:
        raise ConfigError(f"--budget {text!r}: expected QUANTITY=VALUE with QUANTITY one "
                          f"of {', '.join(QUANTITIES)} (e.g. size=0.6, dsp=200)")
    try:
        number = float(value) if name in FRACTIONS else int(value)
    except ValueError:
        kind = "a number" if name in FRACTIONS else "an integer"
        raise ConfigError(f"--budget {text!r}: {value!r} is not {kind}") from None
    return name, _budget_value(name, number, f"--budget {name}")


@dataclass(frozen=True, kw_only=True)
class HAWQConfig(FixedMethodConfig):
    """HAWQ mixed precision: per-layer weight widths chosen by Hessian sensitivity within
    budgets, then QFX QAT with those widths.

    - ``widths``: the candidate weight widths (2 to 16), default 2, 3, 4, 6, 8;
    - ``budget``: quantity -> fraction of the same model with every weight layer at 8 bits:
      ``size`` (weight bits) and/or ``bops`` (products × weight bits × input bits); or a
      count for the whole design on ``target``: ``dsp``, ``lut``, ``latency`` (clock
      cycles; qflow's resource estimate, at ``reuse_factor``: an integer, or ``auto``:
      the smallest power of two at which the budgets can be met);
    - ``pin_first_last``: the first and last weight layers (forward order) keep
      ``fixed.weight.bits``; ``overrides``: layer pattern (a name or a regular
      expression) -> width, pinned too (applied after the first/last rule, in order);
    - ``fixed``: the QFX config of everything else (activations, input, biases) and the
      base of the chosen config;
    - ``requant``: ``"fixed"`` trains the chosen widths as QFX power-of-two fixed point;
      ``"dyadic"`` as :class:`qflow.DyadicConfig` layers (symmetric per-channel weight
      scales and static input scales that are not powers of two, deployed as
      fixed-point multipliers; the input codes have ``fixed.activation.bits``);
    - ``act_widths``: with ``requant: dyadic``, candidate input widths (2 to 16) that
      HAWQ chooses per layer too, from the Hessian trace with respect to each layer's
      input (the first and last layers keep ``fixed.activation.bits`` under
      ``pin_first_last``); ``None`` (default): every input at ``fixed.activation.bits``;
    - ``tied``: groups of layer patterns (names or regular expressions); the layers of
      a group take one width (and input width) together, e.g. the branches into one add
      when the hardware should see one format there (qflow's add aligns any two formats
      exactly, so exactness never needs it);
    - ``samples``: training samples in the Hessian batch; ``tol``, ``rel_error``,
      ``max_probes``: Hutchinson's stopping rule (:mod:`qflow.hawq.sensitivity`);
      ``seed``: its probes' seed.

    The chosen widths become a :class:`qflow.QFXConfig` (a :class:`qflow.DyadicConfig`
    with ``requant: dyadic``) with one weight override per layer: that is what ``qflow
    quantize --method hawq`` trains and saves as the run's ``config.json`` (re-run it
    with ``--recipe``, edit it like any recipe of that method).
    """

    version: int = HAWQ_CONFIG_VERSION
    widths: tuple = (2, 3, 4, 6, 8)
    budget: dict = field(default_factory=lambda: {"size": 0.5})
    target: str | None = None
    reuse_factor: int | str = "auto"
    pin_first_last: bool = True
    overrides: dict = field(default_factory=dict)
    fixed: QFXConfig = field(default_factory=QFXConfig)
    requant: str = "fixed"
    act_widths: tuple | None = None
    tied: tuple = ()
    samples: int = 512
    tol: float = 0.01
    rel_error: float = 0.05
    max_probes: int = 200
    seed: int = 0
    METHOD: ClassVar[str] = "hawq"

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or self.version != HAWQ_CONFIG_VERSION:
            raise ConfigError(f"config version {self.version!r} is not supported "
                              f"(this qflow reads {HAWQ_CONFIG_VERSION})")
        if isinstance(self.widths, (str, bytes)) or not isinstance(self.widths, (list, tuple)) \
                or not self.widths:
            raise ConfigError(f"config.widths: expected a list of widths, got {self.widths!r}")
        widths = tuple(sorted({checked_integer(b, "config.widths[]", MIN_WIDTH, MAX_WIDTH)
                               for b in self.widths}))
        object.__setattr__(self, "widths", widths)
        if not isinstance(self.budget, Mapping) or not self.budget:
            raise ConfigError(f"config.budget: expected a mapping of {' and/or '.join(QUANTITIES)} "
                              f"to fractions, got {self.budget!r}")
        budget = {}
        for name, value in self.budget.items():
            if name not in QUANTITIES:
                raise ConfigError(f"config.budget: unknown quantity {name!r} (known: "
                                  f"{', '.join(QUANTITIES)})")
            budget[name] = _budget_value(name, value, f"config.budget.{name}")
        object.__setattr__(self, "budget", budget)
        if self.target is not None and not isinstance(self.target, str):
            raise ConfigError(f"config.target: expected a target name, got {self.target!r}")
        needs = [q for q in budget if q in RESOURCES]
        if needs and self.target is None:
            raise ConfigError(f"config.budget.{needs[0]}: a {needs[0]} budget needs an FPGA "
                              "target (--target, e.g. ultra96)")
        if self.reuse_factor != "auto":
            checked_integer(self.reuse_factor, "config.reuse_factor", 1, 4096)
        if not isinstance(self.requant, str) or self.requant not in REQUANT_MODES:
            raise ConfigError(f"config.requant: expected one of {', '.join(REQUANT_MODES)}, "
                              f"got {self.requant!r}")
        if self.act_widths is not None:
            if isinstance(self.act_widths, (str, bytes)) or not isinstance(
                    self.act_widths, (list, tuple)) or not self.act_widths:
                raise ConfigError(f"config.act_widths: expected a list of widths or null, got "
                                  f"{self.act_widths!r}")
            if self.requant != "dyadic":
                raise ConfigError("config.act_widths: input widths per layer need requant: "
                                  "dyadic (each dyadic layer quantizes its own input)")
            object.__setattr__(self, "act_widths", tuple(sorted({
                checked_integer(a, "config.act_widths[]", MIN_WIDTH, MAX_WIDTH)
                for a in self.act_widths})))
        if isinstance(self.tied, (str, bytes)) or not isinstance(self.tied, (list, tuple)):
            raise ConfigError(f"config.tied: expected a list of groups (lists of layer "
                              f"patterns), got {self.tied!r}")
        groups = []
        for i, group in enumerate(self.tied):
            if isinstance(group, (str, bytes)) or not isinstance(group, (list, tuple)) or \
                    not group:
                raise ConfigError(f"config.tied[{i}]: expected a list of layer patterns, got "
                                  f"{group!r}")
            for pattern in group:
                LayerOverride(pattern=pattern)  # a string and a valid regex, or ConfigError
            groups.append(tuple(group))
        object.__setattr__(self, "tied", tuple(groups))
        if not isinstance(self.pin_first_last, bool):
            raise ConfigError(f"config.pin_first_last: expected true or false, got "
                              f"{self.pin_first_last!r}")
        for pattern, bits in override_patterns(self, "layer patterns to widths"):
            checked_integer(bits, f"config.overrides[{pattern!r}]", MIN_WIDTH, MAX_WIDTH)
        object.__setattr__(self, "overrides", dict(self.overrides))
        checked_integer(self.samples, "config.samples", 1, 10**6)
        checked_integer(self.max_probes, "config.max_probes", 1, 10**6)
        checked_integer(self.seed, "config.seed", 0, 2**31 - 1)
        object.__setattr__(self, "tol", _number(self.tol, "config.tol", 0, 0.5, "a number"))
        object.__setattr__(self, "rel_error", _number(self.rel_error, "config.rel_error", 0,
                                                      0.5, "a number"))

    def __hash__(self) -> int:
        return hash(self.to_json())

    def pinned_width(self, layer: str, first_or_last: bool) -> int | None:
        """The width ``layer`` is pinned to, or None when HAWQ chooses it."""
        width = self.fixed.spec_for(layer, "weight").bits if (
            first_or_last and self.pin_first_last) else None
        for pattern, bits in self.overrides.items():
            if LayerOverride(pattern=pattern).matches(layer):
                width = bits
        return width

    def pinned_act_width(self, first_or_last: bool) -> int | None:
        """The input width of a layer when HAWQ does not choose it (``act_widths`` unset,
        or a first or last layer under ``pin_first_last``): ``fixed.activation.bits``;
        None when HAWQ chooses it."""
        if self.act_widths is None or (first_or_last and self.pin_first_last):
            return self.fixed.activation.bits
        return None

    def with_widths(self, widths: dict) -> QFXConfig | DyadicConfig:
        """The config that trains ``widths`` (layer name -> weight width, or (weight
        width, input width)): ``fixed`` with one weight override per layer, or with
        ``requant: dyadic`` a DyadicConfig (input codes of ``fixed.activation.bits``
        unless given) with one override per layer.

        >>> HAWQConfig().with_widths({"fc1": 4}).overrides[-1].weight.bits
        4
        >>> HAWQConfig(requant="dyadic").with_widths({"fc1": 4, "fc2": (3, 6)}).overrides
        {'fc1': DyadicOverride(dyadic=None, weight_bits=4, act_bits=None), \
'fc2': DyadicOverride(dyadic=None, weight_bits=3, act_bits=6)}
        """
        if self.requant == "dyadic":
            return DyadicConfig(weight_bits=self.fixed.weight.bits,
                                act_bits=self.fixed.activation.bits, fixed=self.fixed,
                                overrides={_pattern(n): _dyadic_override(c)
                                           for n, c in widths.items()})
        return dataclasses.replace(self.fixed, overrides=(*self.fixed.overrides, *(
            LayerOverride(pattern=_pattern(n), weight=SpecOverride(bits=b))
            for n, b in widths.items())))

    def uniform(self, choice: int | tuple[int, int]) -> QFXConfig | DyadicConfig:
        """The config that trains every weight layer at one choice: a weight width, or
        (weight width, input width)."""
        bits, act = choice if isinstance(choice, tuple) else (choice, None)
        if self.requant == "dyadic":
            return DyadicConfig(weight_bits=bits, act_bits=act or self.fixed.activation.bits,
                                fixed=self.fixed)
        every = LayerOverride(pattern=".*", weight=SpecOverride(bits=bits))
        return dataclasses.replace(self.fixed, overrides=(*self.fixed.overrides, every))

    def replace_bits(self, bits: int | None = None, *, weight_bits: int | None = None,
                     act_bits: int | None = None) -> HAWQConfig:
        """A copy with the command line's activation width (``act_bits``) in ``fixed``;
        weight widths are HAWQ's to choose (``--bits`` and ``--weight-bits`` are refused)."""
        if weight_bits is not None or bits is not None:
            raise ConfigError(f"{'--weight-bits' if weight_bits is not None else '--bits'}: "
                              "HAWQ chooses the weight widths (set the candidates with a "
                              "recipe's widths, the budget with --budget); --act-bits sets "
                              "the activations")
        if act_bits is None:
            return self
        fixed = self.fixed.replace_bits(act_bits=act_bits)
        return self if fixed == self.fixed else dataclasses.replace(self, fixed=fixed)

    def to_dict(self) -> dict:
        return {"method": self.METHOD, "version": self.version, "widths": list(self.widths),
                "budget": dict(self.budget), "target": self.target,
                "reuse_factor": self.reuse_factor, "pin_first_last": self.pin_first_last,
                "overrides": dict(self.overrides), "fixed": self.fixed_dict(),
                "requant": self.requant,
                "act_widths": None if self.act_widths is None else list(self.act_widths),
                "tied": [list(g) for g in self.tied],
                "samples": self.samples, "tol": self.tol,
                "rel_error": self.rel_error, "max_probes": self.max_probes, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict) -> HAWQConfig:
        """Build from plain data; missing keys keep their defaults. A ``method`` key,
        when present, must say ``hawq``. Version-1 data (before ``requant``) reads as
        ``requant: fixed``, what it was trained with."""
        if isinstance(data, Mapping) and data.get("version") == 1 and "requant" not in data:
            data = {**data, "version": HAWQ_CONFIG_VERSION, "requant": "fixed"}
        return cls(**cls.checked_kwargs(data))
