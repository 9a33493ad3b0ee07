"""HAWQ bit allocation: the Pareto frontier by dynamic programming, the budgeted choice
by an integer linear program.

Each layer i takes one width b from its candidates, at a sensitivity Ω_i(b)
(:mod:`qflow.hawq.sensitivity`) and costs c_k(i, b) per budgeted quantity k:

    size   n_i · b                      weight bits (biases are not counted)
    bops   MACs_i · b · a_i             bit operations, a_i the width of the layer's input
    dsp    DSP slices                   from qflow's resource estimate of the layer at b
    lut    LUTs                         (:mod:`qflow.hawq.resources`)
    latency  cycles                     the layer's share of the estimate's latency

The choice minimizes Σ Ω_i(b_i) subject to Σ c_k(i, b_i) ≤ B_k for every budget, exactly,
with ``scipy.optimize.milp`` (binary x_ib, one width per layer). ``size`` and ``bops``
budgets are fractions of the same model with every layer at 8 bits (``size=0.6``: at
most 60 % of the 8-bit weight bits); ``dsp``, ``lut`` and ``latency`` budgets are counts
for the whole design, the layers HAWQ does not choose for included (``base``).

The frontier over one cost (the trade-off the choice sits on) comes from a
dynamic program that keeps, layer by layer, the least Ω for every reachable cost and
drops dominated points.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qflow.errors import ConfigError

#: what a budget can bound: fractions of the 8-bit model's, counts from the FPGA estimate
#: (DSP slices, LUTs, latency in clock cycles)
FRACTIONS = ("size", "bops")
RESOURCES = ("dsp", "lut", "latency")
QUANTITIES = FRACTIONS + RESOURCES
REFERENCE_BITS = 8


@dataclass(frozen=True)
class LayerCosts:
    """One layer's candidates: choice -> Ω, and what its costs are made of: ``weights``
    values, ``macs`` products per sample, an input of ``input_bits`` bits. A choice is a
    weight width, or a (weight width, input width) pair when HAWQ chooses the input
    width too (``act_widths``)."""

    name: str
    omega: dict[int, float]
    weights: int
    macs: int
    input_bits: int
    #: quantity (``dsp``, ``lut``, ``latency``) -> width -> the layer's estimated use
    resources: dict = field(default_factory=dict)

    @property
    def widths(self) -> list:
        """The candidate choices, in order."""
        return sorted(self.omega)

    def cost(self, quantity: str, choice: int | tuple[int, int]) -> int:
        """The layer's ``quantity`` at a choice: a weight width, or (weight width, input
        width) when the input width is chosen too.

        >>> layer = LayerCosts("fc", {4: 0.0}, weights=10, macs=10, input_bits=8)
        >>> layer.cost("bops", 4), layer.cost("bops", (4, 6))
        (320, 240)
        """
        bits, act = choice if isinstance(choice, tuple) else (choice, self.input_bits)
        if quantity == "size":
            return self.weights * bits
        if quantity == "bops":
            return self.macs * bits * act
        if quantity in self.resources:
            return self.resources[quantity][choice]
        raise ValueError(f"unknown quantity {quantity!r} for layer {self.name!r}")


def tie(layers: list[LayerCosts], groups: list[list[str]]) -> list[LayerCosts]:
    """``layers`` with the layers of each group (names) merged into one, named after its
    first member, that takes one choice for all: Ω and every cost summed, over the
    choices every member allows; a one-line ConfigError when they share none.

    >>> a = LayerCosts("a", {4: 1.0, 8: 0.0}, weights=2, macs=3, input_bits=8)
    >>> b = LayerCosts("b", {4: 2.0, 8: 0.5}, weights=5, macs=1, input_bits=4)
    >>> [ab] = tie([a, b], [["a", "b"]])
    >>> ab.name, ab.omega, ab.cost("size", 4)
    ('a', {4: 3.0, 8: 0.5}, 28)
    >>> ab.cost("bops", 4) == a.cost("bops", 4) + b.cost("bops", 4)
    True
    """
    by_name = {layer.name: layer for layer in layers}
    grouped = {name for group in groups for name in group}
    out = []
    for layer in layers:
        group = next((g for g in groups if g[0] == layer.name), None)
        if group is None:
            if layer.name not in grouped:
                out.append(layer)
            continue
        members = [by_name[n] for n in group]
        common = set.intersection(*(set(m.omega) for m in members))
        if not common:
            raise ConfigError(f"tied layers {', '.join(group)} allow no common width (their "
                              "pinned widths differ)")
        paired = isinstance(next(iter(common)), tuple)
        resources = {q: {c: sum(m.resources[q][c] for m in members) for c in common}
                     for q in members[0].resources}
        out.append(LayerCosts(
            layer.name, {c: sum(m.omega[c] for m in members) for c in sorted(common)},
            weights=sum(m.weights for m in members),
            # bops: Σ macs_i · b · a_i; with chosen input widths a is the choice's
            macs=sum(m.macs if paired else m.macs * m.input_bits for m in members),
            input_bits=members[0].input_bits if paired else 1, resources=resources))
    return out


def untie(choices: dict, groups: list[list[str]]) -> dict:
    """The choice of each merged group (:func:`tie`) given to every member."""
    out = dict(choices)
    for group in groups:
        for name in group[1:]:
            out[name] = choices[group[0]]
    return out


def reference_cost(layers: list[LayerCosts], quantity: str) -> int:
    """The cost of the model with every layer at 8 bits (what a budget is a fraction of)."""
    return sum(layer.cost(quantity, REFERENCE_BITS) for layer in layers)


def pareto_front(layers: list[LayerCosts], quantity: str) -> list[tuple[int, float, dict]]:
    """(cost, ΣΩ, widths) of every configuration no other beats on both, by cost.

    >>> a = LayerCosts("a", {2: 4.0, 8: 0.0}, weights=1, macs=1, input_bits=8)
    >>> b = LayerCosts("b", {2: 1.0, 8: 0.0}, weights=1, macs=1, input_bits=8)
    >>> [(c, o) for c, o, _ in pareto_front([a, b], "size")]
    [(4, 5.0), (10, 1.0), (16, 0.0)]
    """
    front: list[tuple[int, float, dict]] = [(0, 0.0, {})]
    for layer in layers:
        merged: dict[int, tuple[float, dict]] = {}
        for cost, total, widths in front:
            for b in layer.widths:
                c, o = cost + layer.cost(quantity, b), total + layer.omega[b]
                if c not in merged or o < merged[c][0]:
                    merged[c] = (o, {**widths, layer.name: b})
        front, best = [], float("inf")
        for c in sorted(merged):
            o, widths = merged[c]
            if o < best:
                front.append((c, o, widths))
                best = o
    return front


def limits(layers: list[LayerCosts], budgets: dict[str, float],
           base: dict[str, int] | None = None) -> dict[str, float]:
    """The most the chosen layers may use of each budgeted quantity: a fraction of the
    8-bit cost, or a count less what the other layers use (``base``)."""
    base = base or {}
    return {q: f * reference_cost(layers, q) if q in FRACTIONS else f - base.get(q, 0)
            for q, f in budgets.items()}


def choose(layers: list[LayerCosts], budgets: dict[str, float],
           base: dict[str, int] | None = None, where: str = "") -> dict[str, int]:
    """The widths of least ΣΩ within every budget (:func:`limits`); a one-line
    ConfigError naming the smallest feasible budget when none fits (:func:`check_budgets`,
    ``where`` saying under which settings).

    >>> a = LayerCosts("a", {2: 4.0, 8: 0.0}, weights=1, macs=1, input_bits=8)
    >>> b = LayerCosts("b", {2: 1.0, 8: 0.0}, weights=1, macs=1, input_bits=8)
    >>> choose([a, b], {"size": 10 / 16})
    {'a': 8, 'b': 2}
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    check_budgets(layers, budgets, base, where)
    bounds = limits(layers, budgets, base)
    index = [(i, b) for i, layer in enumerate(layers) for b in layer.widths]
    omega = np.array([layers[i].omega[b] for i, b in index])
    one_each = np.zeros((len(layers), len(index)))
    for j, (i, _) in enumerate(index):
        one_each[i, j] = 1
    constraints = [LinearConstraint(one_each, 1, 1)]
    for quantity in budgets:
        row = np.array([[layers[i].cost(quantity, b) for i, b in index]], dtype=float)
        constraints.append(LinearConstraint(row, -np.inf, bounds[quantity]))
    # the objective is scaled to order 1: milp's tolerances are absolute
    scale = float(np.abs(omega).max()) or 1.0
    result = milp(omega / scale, constraints=constraints, integrality=np.ones(len(index)),
                  bounds=Bounds(0, 1))
    if not result.success:  # the checks above make this unreachable for feasible budgets
        raise ConfigError(f"no width allocation within {_budget_text(budgets)}: "
                          f"{result.message}")
    chosen = {}
    for j, (i, b) in enumerate(index):
        if result.x[j] > 0.5:
            chosen[layers[i].name] = b
    return chosen


def smallest(layers: list[LayerCosts], quantity: str, base: dict[str, int] | None = None
             ) -> float:
    """The least budget of ``quantity`` any configuration meets (a fraction, or a count
    with ``base``): each layer at its cheapest allowed width."""
    least = sum(min(layer.cost(quantity, b) for b in layer.widths) for layer in layers)
    if quantity in FRACTIONS:
        return _ceil(least / reference_cost(layers, quantity))
    return least + (base or {}).get(quantity, 0)


def check_budgets(layers: list[LayerCosts], budgets: dict[str, float],
                  base: dict[str, int] | None = None, where: str = "") -> None:
    """A one-line ConfigError when a budget is below what every configuration needs,
    naming the smallest feasible budget (``where`` says under which settings)."""
    bounds = limits(layers, budgets, base)
    for quantity, value in budgets.items():
        least = sum(min(layer.cost(quantity, b) for b in layer.widths) for layer in layers)
        if least > bounds[quantity]:
            raise ConfigError(
                f"budget {quantity}={value:g} is infeasible: the smallest configuration "
                f"(every layer at its cheapest allowed width) needs "
                f"{quantity}={smallest(layers, quantity, base):g}{where}")


def total(layers: list[LayerCosts], widths: dict[str, int], quantity: str) -> int:
    """The cost of ``widths`` in ``quantity``."""
    return sum(layer.cost(quantity, widths[layer.name]) for layer in layers)


def _ceil(value: float, digits: int = 3) -> float:
    """``value`` rounded up at ``digits`` decimals (a feasible budget, not one just under)."""
    return float(np.ceil(value * 10**digits) / 10**digits)


def _budget_text(budgets: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in budgets.items())
