"""Layer sensitivity for HAWQ: Hessian traces by Hutchinson's estimator, and Ω.

For the loss L of the float model on a fixed batch of training data, the Hessian block of
layer i's weights W_i (n_i values) has the trace Tr(H_i) = E[v_iᵀ (H v)_i] for a random
vector v with independent Rademacher (±1) entries: the cross terms E[v_iᵀ H_ij v_j]
vanish for j ≠ i, but they add to the variance, so each probe draws v_i for one layer at
a time and takes the product with that layer's block only, by double backward
(H_ii v_i = ∂(∇_i L · v_i)/∂W_i): one backward pass per layer and probe. Probes are drawn until the
running mean of every layer's estimate changes by less than ``tol`` relative to its
magnitude (|m_k − m_{k−1}| ≤ tol · |m_{k−1}|, with ``abs`` so that a negative trace
converges too) **and** its standard error (the probes' standard deviation / √k) is at
most ``rel_error`` of |m_k|, at least ``min_probes`` and at most ``max_probes`` of them.
The change of the running mean alone stops too early: one probe near the mean makes it
small (on a 4-6-3 network it stopped after 610 probes with the first layer's trace 26 %
off and a standard error of 27 %). The probes come from a generator seeded by ``seed``,
so the result is deterministic.

HAWQ-V2's sensitivity of layer i at weight width b is

    Ω_i(b) = Tr(H_i) / n_i · ‖Q_b(W_i) − W_i‖²

with Q_b the quantizer QFX gives that layer's weight at width b (per-channel binary
points set from the weight, :class:`qflow.quantizers.FixedQuantizer`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qflow import distributed
from qflow.config import QFXConfig
from qflow.dyadic.config import MAX_MULTIPLIER_BITS
from qflow.dyadic.layers import symmetric_codes, symmetric_scale
from qflow.quantizers import FixedQuantizer
from qflow.quantizers.scaled import InputScale

#: the layers HAWQ allocates widths to (the weight layers QFX quantizes)
WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's linear and convolution layers by module name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}


@dataclass(frozen=True)
class TraceEstimate:
    """Per-layer Hessian traces and how they were estimated."""

    traces: dict[str, float]
    #: the standard error of each trace (the probes' sample standard deviation / √probes)
    errors: dict[str, float]
    probes: int
    converged: bool
    samples: int
    #: with ``activations``: the trace of the Hessian with respect to each layer's input
    #: (over the batch), its standard error, and the input's size (values in the batch)
    act_traces: dict[str, float] = dataclasses.field(default_factory=dict)
    act_errors: dict[str, float] = dataclasses.field(default_factory=dict)
    act_sizes: dict[str, int] = dataclasses.field(default_factory=dict)


def hutchinson_traces(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                      tol: float = 1e-2, rel_error: float = 0.05, min_probes: int = 16,
                      max_probes: int = 1000,
                      seed: int = 0, progress: Callable[[int, float], None] | None = None,
                      activations: bool = False) -> TraceEstimate:
    """Hutchinson estimates of Tr(H_i) for every weight layer of ``model`` (eval mode,
    cross-entropy on the batch ``x``, ``y``); ``progress(probes, largest relative
    standard error)`` is called after each probe. With ``activations``, also the trace
    of the Hessian with respect to every weight layer's input on the batch (its first
    call's), probed and stopped the same way.

    In a data-parallel group (:mod:`qflow.distributed`) each process takes its share of
    the batch and every probe's products are summed over the group (the Hessian of the
    whole batch's mean loss is the sum of the shares'); the probes, their count and the
    result are the same in every process, and the weight traces are one process's (up
    to float rounding).

    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> est = hutchinson_traces(model, torch.randn(16, 3), torch.randint(0, 2, (16,)),
    ...                         max_probes=50)
    >>> sorted(est.traces), est.probes <= 50, sorted(est.errors) == sorted(est.traces)
    (['0', '2'], True, True)
    """
    if not 0 < tol < 1 or not 0 < rel_error < 1:
        raise ValueError(f"tol and rel_error must be in (0, 1), got {tol}, {rel_error}")
    layers = weight_layers(model)
    was_training = model.training
    model.eval()
    params = [m.weight for m in layers.values()]
    inputs: dict[str, torch.Tensor] = {}
    handles = _keep_inputs(layers, inputs) if activations else []
    total = int(x.shape[0])
    device = next(iter(model.parameters())).device  # the probes run where the model is
    x, y = x.to(device), y.to(device)
    if distributed.active():  # this process's share; the products are summed below
        x = x.tensor_split(distributed.world_size())[distributed.rank()]
        y = y.tensor_split(distributed.world_size())[distributed.rank()]
    try:
        logits = model(x.clone().requires_grad_(activations))
        loss = F.cross_entropy(logits, y, reduction="sum") / total
        for h in handles:
            h.remove()
        if activations:
            missing = [n for n in layers if n not in inputs]
            if missing:
                raise ValueError(f"layer {missing[0]} is not called by the forward pass: "
                                 "no activation trace")
            params = params + [inputs[n] for n in layers]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        generator = torch.Generator().manual_seed(seed)
        sums = torch.zeros(len(params), dtype=torch.float64)
        squares = torch.zeros(len(params), dtype=torch.float64)
        means = None
        converged = False
        probes = 0
        while probes < max_probes:
            samples = torch.zeros(len(params), dtype=torch.float64)
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                # one layer at a time: H_ii v_i alone, no cross-layer terms in the variance
                v = torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1
                (hv,) = torch.autograd.grad(g, p, grad_outputs=v, retain_graph=True)
                samples[i] = float((v * hv).sum())
            distributed.sum_(samples)
            sums += samples
            squares += samples * samples
            probes += 1
            new = sums / probes
            change = 1.0 if means is None else float(
                ((new - means).abs() / means.abs().clamp_min(1e-30)).max())
            means = new
            error = float((_standard_errors(sums, squares, probes)
                           / means.abs().clamp_min(1e-30)).max())
            if progress is not None:
                progress(probes, error)
            if probes >= min_probes and change <= tol and error <= rel_error:
                converged = True
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    names = list(layers)
    n = len(names)
    means, standard = means.tolist(), _standard_errors(sums, squares, probes).tolist()
    traces = dict(zip(names, means[:n], strict=True))
    errors = dict(zip(names, standard[:n], strict=True))
    if not activations:
        return TraceEstimate(traces, errors, probes, converged, total)
    sizes = distributed.sum_(torch.tensor([float(inputs[k].numel()) for k in names],
                                          dtype=torch.float64))
    return TraceEstimate(traces, errors, probes, converged, total,
                         act_traces=dict(zip(names, means[n:], strict=True)),
                         act_errors=dict(zip(names, standard[n:], strict=True)),
                         act_sizes={k: int(v) for k, v in zip(names, sizes.tolist(),
                                                               strict=True)})


def _standard_errors(sums: torch.Tensor, squares: torch.Tensor, n: int) -> torch.Tensor:
    if n < 2:
        return torch.full_like(sums, float("inf"))
    mean = sums / n
    variance = ((squares - n * mean * mean) / (n - 1)).clamp_min(0)
    return (variance / n).sqrt()


def quantization_errors(model: nn.Module, config: QFXConfig, widths: tuple[int, ...], *,
                        symmetric: bool = False) -> dict[str, dict[int, float]]:
    """‖Q_b(W_i) − W_i‖² for every weight layer and candidate width b, Q_b the QFX weight
    quantizer of that layer (``config``'s weight spec at width b), or with ``symmetric``
    the dyadic layers' symmetric per-channel quantizer (:mod:`qflow.dyadic.layers`)."""
    errors: dict[str, dict[int, float]] = {}
    for name, layer in weight_layers(model).items():
        w = layer.weight.detach().to(torch.float64)
        errors[name] = {}
        for b in widths:
            if symmetric:
                levels = symmetric_codes(w, b) * symmetric_scale(w, b).reshape(
                    -1, *([1] * (w.dim() - 1)))
                errors[name][b] = float(((levels - w) ** 2).sum())
                continue
            spec = dataclasses.replace(config.spec_for(name, "weight"), bits=b)
            quant = FixedQuantizer(spec, channels=w.shape[0], ndim=w.dim()).to(torch.float64)
            with torch.no_grad():
                errors[name][b] = float(((quant(w) - w) ** 2).sum())
    return errors


def activation_errors(model: nn.Module, x: torch.Tensor, widths: tuple[int, ...]
                      ) -> dict[str, dict[int, float]]:
    """‖Q_a(x_i) − x_i‖² for every weight layer's input x_i on the batch ``x`` (its first
    call's) and candidate width a, Q_a a dyadic layer's input quantizer with the batch's
    range (:class:`~qflow.quantizers.scaled.InputScale`: unsigned when x_i has no
    negative value, scale range / (2^a − 1), else signed with scale
    max|x_i| / (2^(a−1) − 1); ties to even).

    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> errors = activation_errors(model, torch.tensor([[0.0, 0.4], [1.0, 0.9]]), (2,))
    >>> round(errors["0"][2], 6)   # scale 1/3: 0.4 -> 1/3, 0.9 -> 1
    0.014444
    """
    inputs: dict[str, torch.Tensor] = {}
    layers = weight_layers(model)
    handles = _keep_inputs(layers, inputs)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    errors: dict[str, dict[int, float]] = {}
    for name in layers:
        v = inputs[name].detach().to(torch.float64)
        errors[name] = {}
        for a in widths:  # a fresh quantizer takes its sign and range from v
            q = InputScale(a, MAX_MULTIPLIER_BITS)(v)
            errors[name][a] = float(((q - v) ** 2).sum())
    return errors


def _keep_inputs(layers: dict[str, nn.Module], inputs: dict[str, torch.Tensor]) -> list:
    """Forward pre-hooks that put each layer's first input (of its first call) in
    ``inputs``; the handles, to remove."""
    def keep(name):
        def hook(module, args):
            inputs.setdefault(name, args[0])
        return hook

    return [m.register_forward_pre_hook(keep(n)) for n, m in layers.items()]


def omega(traces: dict[str, float], errors: dict[str, dict[int, float]],
          sizes: dict[str, int]) -> dict[str, dict[int, float]]:
    """Ω_i(b) = Tr(H_i) / n_i · ‖Q_b(W_i) − W_i‖² for every layer and width."""
    return {name: {b: traces[name] / sizes[name] * e for b, e in errors[name].items()}
            for name in errors}
