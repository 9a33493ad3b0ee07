"""HAWQ from a float model and data to a QFX (or dyadic) config: sensitivity, costs,
choice.

:func:`allocate` measures every weight layer's Hessian trace on ``config.samples``
training samples (:mod:`qflow.hawq.sensitivity`), its Ω at every candidate width, its
weights, products per sample and input width (one forward pass with hooks, which also
gives the forward order for the first/last rule), chooses the widths of least ΣΩ within
the budgets (:mod:`qflow.hawq.choice`) and writes them as per-layer weight overrides
(:meth:`HAWQConfig.with_widths`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qflow.config import QFXConfig
from qflow.dyadic.config import DyadicConfig

from . import choice
from .choice import (
    FRACTIONS,
    RESOURCES,
    LayerCosts,
    choose,
    pareto_front,
    reference_cost,
    total,
)
from .config import HAWQConfig
from .resources import ResourceCosts, resource_costs
from .sensitivity import hutchinson_traces, omega, quantization_errors, weight_layers


@dataclass(frozen=True)
class Allocation:
    """What :func:`allocate` chose: the config to train (QFX, or dyadic with ``requant:
    dyadic``), the widths, and the figures behind them (plain data, the run's
    ``hawq.json``)."""

    config: QFXConfig | DyadicConfig
    widths: dict[str, int]
    report: dict

    def describe(self) -> str:
        """One line: the widths chosen and the budgets' use."""
        counts: dict[int, int] = {}
        for b in self.widths.values():
            counts[b] = counts.get(b, 0) + 1
        spread = ", ".join(f"{n}×{b}-bit" for b, n in sorted(counts.items()))
        used = [f"{q} {c['fraction']:.3f} of 8-bit (budget {c['budget']:g})"
                for q, c in self.report["costs"].items() if c["budget"] is not None]
        used += [f"{_resource_name(q)} {c['chosen']:,}{' cycles' if q == 'latency' else ''} "
                 f"(budget {c['budget']:,}, estimated for {c['target']} at reuse factor "
                 f"{c['reuse_factor']}: export with --reuse {c['reuse_factor']})"
                 for q, c in self.report["resources"].items() if c["budget"] is not None]
        return f"HAWQ weight widths: {spread}; {', '.join(used)}"


def _resource_name(quantity: str) -> str:
    return quantity if quantity == "latency" else quantity.upper()


def _shapes(model: nn.Module, x: torch.Tensor) -> tuple[list[str], dict[str, int]]:
    """(weight layers in forward order, products per sample of each) from one forward."""
    layers = weight_layers(model)
    order: list[str] = []
    macs: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            if name not in macs:
                order.append(name)
                per_output = module.weight[0].numel()  # fan-in (in/groups · kernel)
                macs[name] = int(output[0].numel()) * per_output
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return order, macs


@dataclass(frozen=True)
class _Layout:
    """The weight layers and what their costs need, before any sensitivity."""

    model: nn.Module
    config: HAWQConfig
    names: list[str]  # forward order, then layers the forward never calls
    order: list[str]  # forward order
    macs: dict[str, int]
    pinned: dict[str, int | None]

    def allowed(self) -> dict[str, list[int]]:
        """Every layer's candidate widths: its pinned one, or the config's."""
        return {n: [self.pinned[n]] if self.pinned[n] is not None else list(self.config.widths)
                for n in self.names}

    def costs(self, omega_of: Callable[[str, int], float],
              resources: ResourceCosts | None = None) -> list[LayerCosts]:
        modules = weight_layers(self.model)
        other_bits = self.config.fixed.activation.bits
        # a dyadic layer requantizes its own input, the first one's too
        first_bits = other_bits if self.config.requant == "dyadic" else \
            self.config.fixed.input.bits
        out = []
        for n, allowed in self.allowed().items():
            out.append(LayerCosts(n, {b: omega_of(n, b) for b in allowed},
                                  weights=modules[n].weight.numel(), macs=self.macs.get(n, 0),
                                  input_bits=first_bits if self.order[:1] == [n] else other_bits,
                                  resources={} if resources is None else resources.layers[n]))
        return out

    def resource_costs(self, x: torch.Tensor) -> ResourceCosts | None:
        """DSP and LUT costs when a budget bounds them (calibrated on ``x``), else None."""
        if not any(q in RESOURCES for q in self.config.budget):
            return None
        return resource_costs(self.model, x, self.config, self.allowed())


def _layout(model: nn.Module, x: torch.Tensor, config: HAWQConfig) -> _Layout:
    order, macs = _shapes(model, x)
    names = order + [n for n in weight_layers(model) if n not in macs]
    config.check_overrides(names)
    ends = order[:1] + order[-1:]
    pinned = {n: config.pinned_width(n, n in ends) for n in names}
    return _Layout(model, config, names, order, macs, pinned)


def layer_costs(model: nn.Module, sample, config: HAWQConfig) -> list[LayerCosts]:
    """Every weight layer's size and BOPs costs (its Ω left at 0: no sensitivity is
    measured), from one forward pass of ``sample``."""
    return _layout(model, torch.as_tensor(sample).float(), config).costs(lambda n, b: 0.0)


def check_budgets(model: nn.Module, sample, config: HAWQConfig) -> None:
    """Refuse, before any training, overrides that reach no layer and budgets no width
    allocation meets (one-line ConfigError naming the smallest feasible budget; DSP and
    LUT from the untrained model's estimate)."""
    sample = torch.as_tensor(sample).float()
    layout = _layout(model, sample, config)
    resources = layout.resource_costs(sample)
    choice.check_budgets(layout.costs(lambda n, b: 0.0, resources), config.budget,
                         None if resources is None else resources.base,
                         _where(resources))


def _where(resources: ResourceCosts | None) -> str:
    if resources is None:
        return ""
    s = resources.settings
    return f" on {s['target']} at reuse factor {s['reuse_factor']}"


def allocate(model: nn.Module, x, y, config: HAWQConfig, *,
             progress: Callable[[str], None] | None = None) -> Allocation:
    """Choose per-layer weight widths for the float ``model`` on training data ``x``, ``y``.

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32),
    ...                       nn.ReLU(), nn.Linear(32, 4))
    >>> x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 4, (64,))
    >>> plan = allocate(model, x, y, HAWQConfig(budget={"size": 0.7}, max_probes=20))
    >>> plan.widths["1"], plan.widths["5"]          # first and last: pinned at 8 bits
    (8, 8)
    >>> plan.report["costs"]["size"]["fraction"] <= 0.7
    True
    """
    x = torch.as_tensor(x)[: config.samples].float()
    y = torch.as_tensor(y)[: config.samples].long()
    layout = _layout(model, x, config)
    names, pinned = layout.names, layout.pinned
    modules = weight_layers(model)
    started = time.perf_counter()
    if progress:
        progress(f"HAWQ: Hessian traces of {len(names)} layers on {len(x)} samples")
    est = hutchinson_traces(model, x, y, tol=config.tol, rel_error=config.rel_error,
                            max_probes=config.max_probes, seed=config.seed)
    seconds = time.perf_counter() - started
    widths_needed = set(config.widths) | {b for b in pinned.values() if b is not None}
    errors = quantization_errors(model, config.fixed, tuple(sorted(widths_needed)),
                                 symmetric=config.requant == "dyadic")
    sizes = {n: modules[n].weight.numel() for n in names}
    omegas = omega(est.traces, errors, sizes)
    resources = layout.resource_costs(x[:256])
    base = None if resources is None else resources.base
    costs = layout.costs(lambda name, b: omegas[name][b], resources)
    widths = choose(costs, config.budget, base, _where(resources))
    report = _report(config, costs, widths, est, seconds, pinned, resources)
    return Allocation(config.with_widths({n: widths[n] for n in names}), widths, report)


def _report(config: HAWQConfig, costs: list[LayerCosts], widths: dict[str, int], est,
            seconds: float, pinned: dict, resources: ResourceCosts | None) -> dict:
    quantities = list(dict.fromkeys([*(q for q in config.budget if q in FRACTIONS), "size",
                                     "bops"]))
    refs = {q: reference_cost(costs, q) for q in quantities}

    def fraction(q, w):
        return total(costs, w, q) / refs[q] if refs[q] else 0.0

    uniform = []
    for b in config.widths:
        w = {c.name: (b if b in c.omega else c.widths[0]) for c in costs}
        uniform.append({"bits": b, "omega": sum(c.omega[w[c.name]] for c in costs),
                        **{q: fraction(q, w) for q in quantities}})
    quantity = next(q for q in (*config.budget, "size") if q in FRACTIONS)
    front = pareto_front(costs, quantity)
    counts = {}
    if resources is not None:
        counts = {q: {"chosen": total(costs, widths, q) + resources.base[q],
                      "other_layers": resources.base[q], "budget": config.budget.get(q),
                      **resources.settings} for q in RESOURCES}
    return {
        "budget": dict(config.budget),
        "widths": widths,
        "omega": sum(c.omega[widths[c.name]] for c in costs),
        "costs": {q: {"chosen": total(costs, widths, q), "reference_8bit": refs[q],
                      "fraction": fraction(q, widths), "budget": config.budget.get(q)}
                  for q in quantities},
        "resources": counts,
        "hutchinson": {"probes": est.probes, "converged": est.converged,
                       "samples": est.samples, "seconds": round(seconds, 3)},
        "layers": [{"name": c.name, "weights": c.weights, "macs": c.macs,
                    "input_bits": c.input_bits, "trace": est.traces[c.name],
                    "trace_error": est.errors[c.name], "pinned": pinned[c.name],
                    "omega": {str(b): o for b, o in c.omega.items()},
                    "bits": widths[c.name]} for c in costs],
        "pareto": {"quantity": quantity,
                   "points": [[cost / refs[quantity], o] for cost, o, _ in front]},
        "uniform": uniform,
    }
