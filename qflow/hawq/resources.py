"""FPGA resource costs for HAWQ budgets: every layer's DSP, LUT and latency at every width.

For each candidate width b, a copy of the float model is quantized with every weight
layer at b (:meth:`HAWQConfig.uniform`: QFX, or dyadic layers), calibrated on training
samples, frozen, and estimated by qflow's resource model
(:func:`qflow.export.hls.estimate.estimate_resources`, ``docs/resources.md``) for the
target under its default io type and strategy. A weight layer's dense or conv2d node
gives its cost at b (its multipliers depend on its own weight width and on its input,
whose width does not change); every other node (BatchNorm ``scale_shift``, casts,
pooling, ...) is the same at every b and makes up ``base``.

A layer's latency is its own under io_parallel (the layers run in turn) and its pipeline
depth (latency − II) under io_stream, where the estimate's total is Σ (latency − II) plus
the largest II, and an II does not depend on the weight width; ``base`` holds the rest
of the total, so that ``base`` plus the chosen layers' latencies is the estimate's total.

The reuse factor folds the multipliers, so the costs are taken at the config's reuse
factor; ``auto`` tries 1, 2, 4, ... and keeps the smallest at which the budgets can be met
(the export's ``--reuse auto`` keeps the smallest at which the design fits the board,
which may be smaller than a tighter budget's: export HAWQ's choice with the reuse factor
it reports). The estimate counts the weights' codes (zero products, shift-and-add
constants), so the costs are those of the float model's weights quantized; QAT moves
codes and the exported model's estimate can differ a little (the run says so).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from qflow.errors import ConfigError

from .choice import RESOURCES, LayerCosts, check_budgets
from .config import HAWQConfig

#: the reuse factors ``auto`` tries (the export's)
AUTO_REUSE = tuple(2**k for k in range(13))


@dataclass(frozen=True)
class ResourceCosts:
    """Per layer, per width, per resource; what the other layers use; the settings."""

    layers: dict[str, dict[str, dict[int, int]]]
    base: dict[str, int]
    settings: dict


def _graphs(model: nn.Module, x: torch.Tensor, config: HAWQConfig, widths) -> dict:
    from qflow.api import quantize_
    from qflow.graph.from_torch import freeze
    from qflow.train import calibrate

    graphs = {}
    for b in widths:
        q = quantize_(copy.deepcopy(model), config.uniform(b))
        calibrate(q, x)
        q.eval()
        graphs[b] = freeze(q, x[:2])
    return graphs


def resource_costs(model: nn.Module, x, config: HAWQConfig,
                   allowed: dict[str, list[int]]) -> ResourceCosts:
    """The DSP, LUT and latency costs of every layer at its ``allowed`` widths (see the
    module docstring), at ``config.reuse_factor`` (an int) or, for ``auto``, the smallest
    reuse factor at which every budget can be met; when none, the first at which the
    latency budget fails (latency only grows with the reuse factor), else the largest."""
    from qflow.export.hls.estimate import estimate_resources
    from qflow.targets import load_target

    target = load_target(config.target)
    if target.kind != "fpga":
        wanted = next(q for q in config.budget if q in RESOURCES)
        raise ConfigError(f"--target {target.name}: a {wanted} budget needs an FPGA target "
                          f"({target.name} is a {target.kind} target)")
    x = torch.as_tensor(x).float()
    names = list(allowed)
    graphs = _graphs(model, x, config, sorted({b for ws in allowed.values() for b in ws}))
    io_type, strategy = target.defaults["io_type"], target.defaults["strategy"]
    tries = AUTO_REUSE if config.reuse_factor == "auto" else (int(config.reuse_factor),)
    wanted = {q: v for q, v in config.budget.items() if q in RESOURCES}
    for reuse in tries:
        layers = {n: {q: {} for q in RESOURCES} for n in names}
        base = dict.fromkeys(RESOURCES, 0)
        for b, graph in graphs.items():
            estimate = estimate_resources(graph, target, io_type=io_type, reuse_factor=reuse,
                                          strategy=strategy)
            by_node = {e.node: e for e in estimate.layers}
            chosen_latency = 0
            for node in graph.nodes:
                e = by_node[node.name]
                use = {"dsp": int(e.dsp), "lut": int(e.lut),
                       "latency": _latency_share(e, io_type)}
                if node.op in ("dense", "conv2d") and node.source in layers:
                    for q in RESOURCES:
                        layers[node.source][q][b] = use[q]
                    chosen_latency += use["latency"]
                elif b == min(graphs):
                    base["dsp"] += use["dsp"]
                    base["lut"] += use["lut"]
            if b == min(graphs):
                base["latency"] = int(estimate.totals["latency_cycles"]) - chosen_latency
        costs = ResourceCosts(layers, base, {"target": target.name, "io_type": io_type,
                                             "strategy": strategy, "reuse_factor": reuse})
        if not wanted or _feasible(costs, allowed, wanted):
            return costs
        if "latency" in wanted and not _feasible(costs, allowed, {"latency": wanted["latency"]}):
            return costs  # latency only grows with the reuse factor: the least is here
    return costs


def _latency_share(e, io_type: str) -> int:
    """A weight layer's part of the design's latency: its own latency under io_parallel
    (layers run one after another); under io_stream (a dataflow pipeline whose slowest
    layer sets the pace) its pipeline depth, latency − II, since its II does not depend
    on its weight width (the estimate's total: Σ (latency − II) + the largest II)."""
    return int(e.latency_cycles) - (int(e.ii) if io_type == "io_stream" else 0)


def _feasible(costs: ResourceCosts, allowed: dict[str, list[int]], wanted) -> bool:
    probe = [LayerCosts(n, dict.fromkeys(ws, 0.0), weights=0, macs=0, input_bits=0,
                        resources=costs.layers[n]) for n, ws in allowed.items()]
    try:
        check_budgets(probe, wanted, costs.base)
    except ConfigError:
        return False
    return True
