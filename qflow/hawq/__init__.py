"""HAWQ: Hessian-aware mixed precision (weight widths per layer within budgets).

``qflow quantize --method hawq --budget size=0.6`` trains the float model, measures every
weight layer's Hessian trace (:mod:`qflow.hawq.sensitivity`), chooses the widths
(:mod:`qflow.hawq.choice`, :mod:`qflow.hawq.plan`) and runs QFX QAT with them (dyadic
QAT with ``requant: dyadic``, :mod:`qflow.dyadic`). In Python: :func:`allocate` gives
the config to pass to
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
    from qflow.api import quantize_

    from .plan import check_budgets

    check_budgets(model, sample, config)
    quantize_(model, config.uniform(config.fixed.weight.bits))


def _phases(config: HAWQConfig, epochs: int):
    from qflow.methods import method_of

    trained = config.uniform(config.fixed.weight.bits)
    return method_of(trained).phases(trained, epochs)


def _resolve(config: HAWQConfig, float_model, data, progress=None):
    from .plan import allocate

    plan = allocate(float_model, data.x_train, data.y_train, config, progress=progress)
    if progress is not None:
        progress(layer_table(plan.report))
    return plan.config, plan.report, plan.describe()


def layer_table(report: dict) -> str:
    """The per-layer lines of a HAWQ report: trace, chosen width, weights, products.

    >>> print(layer_table({"layers": [{"name": "fc", "trace": 0.5, "bits": 4,
    ...                                "weights": 80, "macs": 80, "pinned": None}]}))
    layer  Hessian trace  bits  weights  products/sample
    fc         5.000e-01     4       80               80
    """
    inputs = "input_trace" in report["layers"][0] if report["layers"] else False
    rows = [("layer", "Hessian trace", "bits", "weights", "products/sample")
            + (("input trace", "input bits") if inputs else ())]
    for r in report["layers"]:
        pinned = " (pinned)" if r["pinned"] is not None else ""
        rows.append((r["name"], f"{r['trace']:.3e}", f"{r['bits']}{pinned}", f"{r['weights']:,}",
                     f"{r['macs']:,}") + ((f"{r['input_trace']:.3e}", str(r["input_bits"]))
                                          if inputs else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(
            zip(row, widths, strict=True))).rstrip() for row in rows)


def _report_files(report: dict, run) -> None:
    from .plot import pareto_figure

    pareto_figure(report, run / "pareto.png")


def _tag(config: HAWQConfig) -> str:
    budget = "-".join(f"{k}{v:g}" for k, v in config.budget.items())
    dyadic = "-dyadic" if config.requant == "dyadic" else ""
    return f"hawq{dyadic}-{budget}-a{config.fixed.activation.bits}"


def _describe(config: HAWQConfig) -> str:
    budget = ", ".join(f"{k} ≤ {v:g} of 8-bit" if k in ("size", "bops") else
                       f"latency ≤ {v:,} cycles on {config.target}" if k == "latency" else
                       f"{k.upper()} ≤ {v:,} on {config.target}"
                       for k, v in config.budget.items())
    dyadic = ", dyadic requantization" if config.requant == "dyadic" else ""
    if config.act_widths is not None:
        dyadic = f"; input widths {', '.join(map(str, config.act_widths))}{dyadic}"
    return (f"HAWQ ({budget}; weight widths {', '.join(map(str, config.widths))}{dyadic}), "
            f"activations {config.fixed.activation.bits}-bit")


register_method(Method(name="hawq", config_type=HAWQConfig, quantize=_quantize,
                       phases=_phases, tag=_tag, describe=_describe, check=_check,
                       resolve=_resolve, report_files=_report_files))

__all__ = ["Allocation", "HAWQConfig", "allocate", "layer_table", "parse_budget"]
