"""QAT methods: one registry from a method's config type to what the method does.

A method is a frozen, keyword-only config dataclass (with a ``version`` field, a JSON/YAML
round trip and per-layer overrides) plus a :class:`Method` entry: the handler that swaps a
model's modules in place (what ``qflow.quantize_`` calls), the training phases that follow
quantization (one QAT phase for QFX; BiPer has two stages), and how runs are named and
described. ``qflow.quantize_(model, config)`` looks the config's type up here; the CLI's
``--method`` and a recipe's ``method:`` key look the name up.

>>> import qflow
>>> sorted(METHODS)  # doctest: +ELLIPSIS
[...'qfx'...]
>>> method_of(qflow.QFXConfig()).name
'qfx'
>>> config_from_dict({"method": "qfx", "weight": {"bits": 4}}).weight.bits
4
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qflow.errors import ConfigError
from qflow.yamlfile import load_json_text, load_yaml


@dataclass(frozen=True)
class Phase:
    """One training phase after quantization: ``epochs`` of :func:`qflow.train.fit` at
    ``lr_scale`` times the float learning rate. ``prepare(model)`` runs before it (a
    BiPer stage switch, say); ``regularizer(model)`` is added to the loss.
    ``lr_schedule`` is fit's ("cosine" or "constant"); ``step_hook(model)``, when given,
    makes the phase's :class:`qflow.train.StepHook` (OFQ's annealing); ``distill``, when
    given, is (α, T): the phase distils from the float model (fit's ``teacher``)."""

    name: str
    epochs: int
    lr_scale: float = 1.0
    prepare: Callable[[Any], None] | None = None
    regularizer: Callable[[Any], Any] | None = None
    lr_schedule: str = "cosine"
    step_hook: Callable[[Any], Any] | None = None
    distill: tuple[float, float] | None = None

    def fit_options(self, model, teacher=None) -> dict:
        """The keyword arguments of :func:`qflow.train.fit` that this phase sets, for
        ``model`` (its step hook is made here) and the float ``teacher`` (used only when
        the phase distils)."""
        options = {"regularizer": self.regularizer, "lr_schedule": self.lr_schedule,
                   "step_hook": None if self.step_hook is None else self.step_hook(model)}
        if self.distill is not None and teacher is not None:
            alpha, temperature = self.distill
            options.update(teacher=teacher, distill_alpha=alpha, temperature=temperature)
        return options


@dataclass(frozen=True)
class Method:
    """What a QAT method registers: its name, config type and behaviour."""

    name: str
    config_type: type
    #: swaps the supported modules of a model in place; returns the model
    quantize: Callable[[Any, Any], Any]
    #: (config, QAT epochs from the command line) -> the training phases after quantize_
    phases: Callable[[Any, int], list[Phase]]
    #: short tag for run directory names, e.g. "w8a8"
    tag: Callable[[Any], str]
    #: one line describing a config, e.g. "QFX, weights 8-bit, activations 8-bit"
    describe: Callable[[Any], str]
    #: (model, training inputs) -> None, run once after the last phase (BiPer
    #: re-estimates its BatchNorm statistics); None when a method needs nothing
    finish: Callable[[Any, Any], None] | None = None
    #: (a model copy, config, two input samples) -> None: what ``qflow quantize`` runs
    #: before training to refuse a model or config the method cannot use; None:
    #: ``quantize_`` on the copy
    check: Callable[[Any, Any, Any], None] | None = None
    #: (config, float model, data, progress) -> (the config ``quantize_`` gets, a report
    #: saved as ``<name>.json`` in the run, one line for the console), for a method that
    #: chooses its config from data after float training (HAWQ); None for the others
    resolve: Callable[..., tuple[Any, dict, str]] | None = None
    #: (that report, the run directory) -> None: writes the report's figures into the run
    #: (HAWQ's pareto.png); None when a method has none
    report_files: Callable[[dict, Any], None] | None = None
    extra: dict = field(default_factory=dict)


#: method name -> Method, in registration order
METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (its name and config type must be new)."""
    if method.name in METHODS or any(m.config_type is method.config_type
                                     for m in METHODS.values()):
        raise ValueError(f"method {method.name!r} or its config type is already registered")
    METHODS[method.name] = method
    return method


def _registered() -> str:
    return ", ".join(f"{m.name} ({m.config_type.__name__})" for m in METHODS.values())


def method_of(config) -> Method:
    """The method a config belongs to; a one-line ConfigError listing the registered
    methods for anything else."""
    for method in METHODS.values():
        if type(config) is method.config_type:
            return method
    raise ConfigError(f"quantize_ expects a method config, got {type(config).__name__}; "
                      f"registered methods: {_registered()}")


def method_named(name: str) -> Method:
    """The method called ``name``; a one-line ConfigError listing the known ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} (registered: {_registered()})")
    return METHODS[name]


def config_from_dict(data: dict, default: str = "qfx"):
    """A config of the method named by the mapping's ``method`` key (``default`` when it
    has none)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    name = data.get("method", default)
    if not isinstance(name, str):
        raise ConfigError(f"config.method: expected a method name, got {name!r}")
    return method_named(name).config_type.from_dict(data)


def config_from_yaml(text: str | bytes, where: str = "", default: str = "qfx"):
    """:func:`config_from_dict` of a YAML recipe."""
    data = load_yaml(text, where, error=ConfigError)
    return config_from_dict({} if data is None else data, default)


def config_from_json(text: str | bytes, where: str = "", default: str = "qfx"):
    """:func:`config_from_dict` of a JSON config (a run's ``config.json``)."""
    return config_from_dict(load_json_text(text, where, error=ConfigError), default)
