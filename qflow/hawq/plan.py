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
from dataclasses import dataclass, field

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from qflow.config import LayerOverride, QFXConfig
from qflow.dyadic.config import DyadicConfig
from qflow.errors import ConfigError

from . import choice
from .choice import (
    FRACTIONS,
    RESOURCES,
    LayerCosts,
    choose,
    pareto_front,
    reference_cost,
    tie,
    total,
    untie,
)
from .config import HAWQConfig
from .resources import ResourceCosts, resource_costs
from .sensitivity import (
    activation_errors,
    hutchinson_traces,
    omega,
    quantization_errors,
    weight_layers,
)


@dataclass(frozen=True)
class Allocation:
    """What :func:`allocate` chose: the config to train (QFX, or dyadic with ``requant:
    dyadic``), the widths, and the figures behind them (plain data, the run's
    ``hawq.json``)."""

    config: QFXConfig | DyadicConfig
    widths: dict[str, int]
    report: dict
    #: the input widths chosen (``act_widths``), else empty
    act_widths: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: the widths chosen and the budgets' use."""
        spread = _spread(self.widths)
        if self.act_widths:
            spread += f"; input widths: {_spread(self.act_widths)}"
        used = [f"{q} {c['fraction']:.3f} of 8-bit (budget {c['budget']:g})"
                for q, c in self.report["costs"].items() if c["budget"] is not None]
        used += [f"{_resource_name(q)} {c['chosen']:,}{' cycles' if q == 'latency' else ''} "
                 f"(budget {c['budget']:,}, estimated for {c['target']} at reuse factor "
                 f"{c['reuse_factor']}: export with --reuse {c['reuse_factor']})"
                 for q, c in self.report["resources"].items() if c["budget"] is not None]
        return f"HAWQ weight widths: {spread}; {', '.join(used)}"


def _spread(widths: dict[str, int]) -> str:
    counts: dict[int, int] = {}
    for b in widths.values():
        counts[b] = counts.get(b, 0) + 1
    return ", ".join(f"{n}×{b}-bit" for b, n in sorted(counts.items()))


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
    pinned_act: dict[str, int | None]
    #: the layer names of each tied group (``config.tied``)
    groups: list[list[str]]

    def allowed(self) -> dict[str, list]:
        """Every layer's candidate choices: weight widths (its pinned one, or the
        config's), or with ``act_widths`` (weight width, input width) pairs."""
        out = {}
        for n in self.names:
            weights = [self.pinned[n]] if self.pinned[n] is not None else list(
                self.config.widths)
            if self.config.act_widths is None:
                out[n] = weights
                continue
            acts = [self.pinned_act[n]] if self.pinned_act[n] is not None else list(
                self.config.act_widths)
            out[n] = [(b, a) for b in weights for a in acts]
        return out

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
    pinned_act = {n: config.pinned_act_width(n in ends) for n in names}
    return _Layout(model, config, names, order, macs, pinned, pinned_act,
                   _tied_groups(config, names))


def _tied_groups(config: HAWQConfig, names: list[str]) -> list[list[str]]:
    """The layers of every ``config.tied`` group, checked: two or more each, none in two."""
    groups, seen = [], {}
    for i, patterns in enumerate(config.tied):
        group = [n for n in names if any(LayerOverride(pattern=p).matches(n) for p in patterns)]
        if len(group) < 2:
            raise ConfigError(f"config.tied[{i}] matches {len(group)} weight layer"
                              f"{'' if len(group) == 1 else 's'} ({', '.join(group) or 'none'}): "
                              "a tied group needs two or more")
        for n in group:
            if n in seen:
                raise ConfigError(f"layer {n} is in tied groups {seen[n]} and {i}")
            seen[n] = i
        groups.append(group)
    return groups


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
    choice.check_budgets(tie(layout.costs(lambda n, b: 0.0, resources), layout.groups),
                         config.budget,
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
    from qflow.train import rows_tensor

    x = rows_tensor(x[: config.samples], torch.float32)  # only what is used
    y = rows_tensor(y[: config.samples], torch.long)
    layout = _layout(model, x, config)
    names, pinned = layout.names, layout.pinned
    modules = weight_layers(model)
    started = time.perf_counter()
    if progress:
        progress(f"HAWQ: Hessian traces of {len(names)} layers on {len(x)} samples")
    activations = config.act_widths is not None
    columns = (TextColumn("Hessian probes"), BarColumn(), MofNCompleteColumn(),
               TextColumn("largest relative error {task.fields[error]:.3f} (stop at "
                          f"{config.rel_error:g})"), TimeElapsedColumn())
    with Progress(*columns, disable=progress is None, transient=False) as bar:
        task = bar.add_task("probes", total=config.max_probes, error=float("inf"))
        est = hutchinson_traces(
            model, x, y, tol=config.tol, rel_error=config.rel_error,
            max_probes=config.max_probes, seed=config.seed, activations=activations,
            progress=lambda probes, error: bar.update(task, completed=probes, error=error))
        bar.update(task, total=est.probes)
    seconds = time.perf_counter() - started
    widths_needed = set(config.widths) | {b for b in pinned.values() if b is not None}
    errors = quantization_errors(model, config.fixed, tuple(sorted(widths_needed)),
                                 symmetric=config.requant == "dyadic")
    sizes = {n: modules[n].weight.numel() for n in names}
    omegas = omega(est.traces, errors, sizes)
    if activations:  # Ω_i(b, a) = Ω_i(b) + Tr(H_x,i) / |x_i| · ‖Q_a(x_i) − x_i‖²
        acts_needed = set(config.act_widths) | {config.fixed.activation.bits}
        act_omegas = omega(est.act_traces, activation_errors(model, x, tuple(sorted(
            acts_needed))), est.act_sizes)

        def omega_of(name, choice):
            return omegas[name][choice[0]] + act_omegas[name][choice[1]]
    else:
        def omega_of(name, choice):
            return omegas[name][choice]
    resources = layout.resource_costs(x[:256])
    base = None if resources is None else resources.base
    costs = layout.costs(omega_of, resources)
    chosen = untie(choose(tie(costs, layout.groups), config.budget, base, _where(resources)),
                   layout.groups)
    choices = {n: chosen[n] for n in names}
    report = _report(config, costs, choices, est, seconds, pinned, resources, layout.groups)
    widths = {n: c[0] if activations else c for n, c in choices.items()}
    act_widths = {n: c[1] for n, c in choices.items()} if activations else {}
    return Allocation(config.with_widths({n: choices[n] for n in names}), widths, report,
                      act_widths)


def _uniform_choice(layer: LayerCosts, bits: int, act: int | None):
    """The choice of ``layer`` in the uniform configuration at ``bits`` (inputs at
    ``act`` when HAWQ chooses them): that one when allowed, else the pinned one."""
    wanted = bits if act is None else (bits, act)
    if wanted in layer.omega:
        return wanted
    if act is not None:  # a pinned weight width: keep it, with the uniform input width
        same = [c for c in layer.widths if c[1] == act]
        return same[0] if same else layer.widths[0]
    return layer.widths[0]


def _report(config: HAWQConfig, costs: list[LayerCosts], choices: dict, est,
            seconds: float, pinned: dict, resources: ResourceCosts | None,
            groups: list[list[str]]) -> dict:
    quantities = list(dict.fromkeys([*(q for q in config.budget if q in FRACTIONS), "size",
                                     "bops"]))
    refs = {q: reference_cost(costs, q) for q in quantities}
    activations = config.act_widths is not None
    act = config.fixed.activation.bits if activations else None

    def fraction(q, w):
        return total(costs, w, q) / refs[q] if refs[q] else 0.0

    def label(choice) -> str:
        return f"w{choice[0]}a{choice[1]}" if isinstance(choice, tuple) else str(choice)

    uniform = []
    for b in config.widths:
        w = {c.name: _uniform_choice(c, b, act) for c in costs}
        uniform.append({"bits": b, "omega": sum(c.omega[w[c.name]] for c in costs),
                        **{q: fraction(q, w) for q in quantities}})
    widths = {n: c[0] if activations else c for n, c in choices.items()}
    quantity = next(q for q in (*config.budget, "size") if q in FRACTIONS)
    front = pareto_front(tie(costs, groups), quantity)
    counts = {}
    if resources is not None:
        counts = {q: {"chosen": total(costs, choices, q) + resources.base[q],
                      "other_layers": resources.base[q], "budget": config.budget.get(q),
                      **resources.settings} for q in RESOURCES}
    layers = []
    for c in costs:
        row = {"name": c.name, "weights": c.weights, "macs": c.macs,
               "input_bits": c.input_bits, "trace": est.traces[c.name],
               "trace_error": est.errors[c.name], "pinned": pinned[c.name],
               "omega": {label(b): o for b, o in c.omega.items()}, "bits": widths[c.name]}
        if activations:
            row.update(input_bits=choices[c.name][1], input_trace=est.act_traces[c.name],
                       input_trace_error=est.act_errors[c.name])
        layers.append(row)
    report = {
        "budget": dict(config.budget),
        "widths": widths,
        "omega": sum(c.omega[choices[c.name]] for c in costs),
        "costs": {q: {"chosen": total(costs, choices, q), "reference_8bit": refs[q],
                      "fraction": fraction(q, choices), "budget": config.budget.get(q)}
                  for q in quantities},
        "resources": counts,
        "hutchinson": {"probes": est.probes, "converged": est.converged,
                       "samples": est.samples, "seconds": round(seconds, 3)},
        "layers": layers,
        "pareto": {"quantity": quantity,
                   "points": [[cost / refs[quantity], o] for cost, o, _ in front]},
        "uniform": uniform,
    }
    if activations:
        report["act_widths"] = {n: c[1] for n, c in choices.items()}
    if groups:
        report["tied"] = groups
    return report
