"""HAWQ: Hessian-aware mixed precision (weight widths per layer within budgets).

``qflow quantize --method hawq --budget size=0.6`` trains the float model, measures every
weight layer's Hessian trace (:mod:`qflow.hawq.sensitivity`), chooses the widths
(:mod:`qflow.hawq.choice`, :mod:`qflow.hawq.plan`) and runs QFX QAT with them. In
Python: :func:`allocate` gives the :class:`qflow.QFXConfig` to pass to
``qflow.quantize_``; ``quantize_`` with a :class:`HAWQConfig` itself is refused (the
widths come from data).
"""

from __future__ import annotations

from qflow.errors import ConfigError
from qflow.methods import Method, register_method

from .config import HAWQConfig, parse_budget

_LAZY = {"Allocation": ".plan", "allocate": ".plan"}  # torch: imported on first use


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'qflow.hawq' has no attribute {name!r}")


def _quantize(model, config: HAWQConfig):
    raise ConfigError("hawq: the widths are chosen from data: qflow.hawq.allocate(model, x, y, "
                      "config).config is the QFXConfig to quantize_ with (qflow quantize "
                      "--method hawq does both)")


def _check(model, config: HAWQConfig, sample) -> None:
    from qflow.api import quantize_qfx

    from .plan import check_budgets

    check_budgets(model, sample, config)
    quantize_qfx(model, config.fixed)


def _phases(config: HAWQConfig, epochs: int):
    from qflow.methods import method_of

    return method_of(config.fixed).phases(config.fixed, epochs)


def _resolve(config: HAWQConfig, float_model, data, progress=None):
    from .plan import allocate

    plan = allocate(float_model, data.x_train, data.y_train, config, progress=progress)
    return plan.config, plan.report, plan.describe()


def _tag(config: HAWQConfig) -> str:
    budget = "-".join(f"{k}{v:g}" for k, v in config.budget.items())
    return f"hawq-{budget}-a{config.fixed.activation.bits}"


def _describe(config: HAWQConfig) -> str:
    budget = ", ".join(f"{k} ≤ {v:g} of 8-bit" if k in ("size", "bops") else
                       f"{k.upper()} ≤ {v:,} on {config.target}"
                       for k, v in config.budget.items())
    return (f"HAWQ ({budget}; weight widths {', '.join(map(str, config.widths))}), "
            f"activations {config.fixed.activation.bits}-bit")


register_method(Method(name="hawq", config_type=HAWQConfig, quantize=_quantize,
                       phases=_phases, tag=_tag, describe=_describe, check=_check,
                       resolve=_resolve))

__all__ = ["Allocation", "HAWQConfig", "allocate", "parse_budget"]
