"""BiPer's handler (what ``qflow.quantize_`` runs for a ``BiPerConfig``) and its stages."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

from qflow.api import quantize_qfx, replace_module
from qflow.errors import ConfigError
from qflow.nn import QBatchNorm1d, QBatchNorm2d, QConv2d, QInput, QLinear
from qflow.quantizers import FixedQuantizer

from .config import BiPerConfig
from .functions import sine_penalty
from .layers import BINARY_TYPES, BinaryConv2d, BinaryLinear

_WEIGHT_TYPES = {nn.Conv2d: BinaryConv2d, nn.Linear: BinaryLinear}
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class _Binary:
    """One weight layer to make binary, the BatchNorm it absorbs and the ReLU whose
    place its sign takes (if any)."""

    name: str
    omega0: float
    norm: str | None
    relu: str | None


def quantize_biper(model: nn.Module, config: BiPerConfig) -> nn.Module:
    """Make ``model`` a BiPer QAT model, in place; returns ``model``.

    Every ``nn.Conv2d`` and ``nn.Linear`` except the first and the last weight layer (in
    the order the forward pass calls them, found with torch.fx), as changed by
    ``config.overrides``, becomes a :class:`~qflow.biper.layers.BinaryConv2d` or
    :class:`~qflow.biper.layers.BinaryLinear`; a BatchNorm that directly and only follows
    such a layer is absorbed into it (its place becomes ``nn.Identity``). Everything else
    is quantized by QFX with ``config.fixed`` (:func:`qflow.api.quantize_qfx`), the model
    input included. An ``nn.ReLU`` module whose output goes only to a binary layer gives
    its place to the layer's sign (``nn.Identity``): the sign of a ReLU output is +1
    everywhere, so a float model's ``conv(relu(x))`` becomes ``binconv(sign(x))``.

    The model is left in stage 2 (binary weights, α warm-started): the form that
    freezes; :func:`start_stage` switches stages. An error leaves the model as it was.

    >>> import torch
    >>> from torch import nn
    >>> import qflow
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.BatchNorm1d(16),
    ...                       nn.Linear(16, 3))
    >>> model = qflow.quantize_(model, qflow.BiPerConfig())
    >>> [type(m).__name__ for m in model]
    ['QInput', 'QLinear', 'BinaryLinear', 'Identity', 'QLinear']
    >>> model.eval()(torch.rand(2, 8)).shape
    torch.Size([2, 3])
    """
    plan = _plan(model, config)
    modules = dict(model.named_modules())
    layers = {}
    for item in plan:
        module = modules[item.name]
        norm = copy.deepcopy(modules[item.norm]) if item.norm else None
        layers[item.name] = _WEIGHT_TYPES[type(module)].from_float(
            module, config.fixed, item.name, omega0=item.omega0, estimator=config.estimator,
            norm=norm, norm_name=item.norm)
    quantize_qfx(model, config.fixed)
    for item in plan:
        replace_module(model, item.name, layers[item.name])
        for absorbed in (item.norm, item.relu):
            if absorbed:
                replace_module(model, absorbed, nn.Identity())
    model.qflow_config = config
    return model


def _plan(model: nn.Module, config: BiPerConfig) -> list[_Binary]:
    """The binary layers of ``model`` (checked, nothing changed yet)."""
    try:
        graph = fx.Tracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        reason = str(exc).strip().splitlines()
        raise ConfigError("biper: finding the first and last weight layers needs a model "
                          f"that torch.fx can trace: {reason[0] if reason else exc!r}") from None
    modules = dict(model.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    weights = [name for name in calls if type(modules[name]) in _WEIGHT_TYPES]
    config.check_overrides(weights)
    plan = []
    for position, name in enumerate(weights):
        default = 0 < position < len(weights) - 1
        binary, omega0 = config.layer_settings(name, default)
        if binary:
            plan.append(_Binary(name, omega0, _absorbed_norm(name, calls, modules),
                                _replaced_relu(name, calls, modules)))
    return plan


def _absorbed_norm(name: str, calls: dict[str, list[fx.Node]], modules) -> str | None:
    """The BatchNorm that directly and only follows layer ``name``, if any."""
    if len(calls[name]) != 1:
        return None
    users = list(calls[name][0].users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    target = users[0].target
    norm = modules[target]
    if (type(norm) not in _NORM_TYPES or len(calls[target]) != 1
            or not norm.track_running_stats or users[0].args[:1] != (calls[name][0],)):
        return None
    return target


def _replaced_relu(name: str, calls: dict[str, list[fx.Node]], modules) -> str | None:
    """The ``nn.ReLU`` module that directly and only feeds layer ``name``, if any."""
    if len(calls[name]) != 1:
        return None
    source = calls[name][0].args[0] if calls[name][0].args else None
    if not isinstance(source, fx.Node) or source.op != "call_module":
        return None
    if (type(modules[source.target]) is not nn.ReLU or len(source.users) != 1
            or len(calls[source.target]) != 1):
        return None
    return source.target



# -- stages ---------------------------------------------------------------------------
def binary_layers(model: nn.Module) -> list[BinaryConv2d | BinaryLinear]:
    """The binary layers of ``model``, in registration order."""
    return [m for m in model.modules() if isinstance(m, BINARY_TYPES)]


def start_stage(model: nn.Module, stage: int) -> None:
    """Switch every binary layer of ``model`` to ``stage`` (the two phases' ``prepare``).

    Stage 1 (real weights ``sin(ω₀·w)``): the absorbed BatchNorms' running statistics
    restart, and so do the fixed-point formats picked from data (every quantizer but the
    model input's, whose range is the data's): the values a binary network computes
    differ from the float model's, so its formats start from its first training batch.
    Stage 2 (binary weights): α starts at the mean of ``|sin(ω₀·w)|`` per output channel
    (``|w|`` for the STE estimator); formats and statistics carry over.

    >>> import torch, qflow
    >>> from torch import nn
    >>> model = qflow.quantize_(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8),
    ...                                       nn.Linear(8, 2)), qflow.BiPerConfig())
    >>> start_stage(model, 1); model[2].current_stage
    1
    """
    layers = binary_layers(model)
    if stage == 1:
        for layer in layers:
            layer.set_stage(1)
            if layer.norm is not None:
                layer.norm.reset_running_stats()
        _restart_formats(model)
    elif stage == 2:
        for layer in layers:
            layer.warm_start_alpha()
            layer.set_stage(2)
    else:
        raise ValueError(f"BiPer stage must be 1 or 2, got {stage!r}")


def _restart_formats(model: nn.Module) -> None:
    inputs = {id(q) for m in model.modules() if isinstance(m, QInput) for q in m.modules()}
    for quant in model.modules():
        if not isinstance(quant, FixedQuantizer) or id(quant) in inputs:
            continue
        spec = quant.spec
        if spec.integer_bits is None or spec.signed is None:
            quant.initialized.fill_(False)
            quant._sync_flags()


def regularization(model: nn.Module, tau: float) -> torch.Tensor:
    """BiPer's regularizer ``τ · Σ_layers mean(sin²(ω₀·w))`` over the binary layers
    (each with its own ω₀), to add to the loss.

    >>> import torch, qflow
    >>> from torch import nn
    >>> model = qflow.quantize_(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8),
    ...                                       nn.Linear(8, 2)), qflow.BiPerConfig())
    >>> penalty = regularization(model, 0.037)
    >>> penalty.requires_grad, 0 <= float(penalty.detach()) <= 2 * 0.037
    (True, True)
    """
    terms = [sine_penalty(layer.weight, layer.omega0) for layer in binary_layers(model)]
    return tau * torch.stack(terms).sum() if terms else torch.zeros(())


class _LayerReachedError(Exception):
    """Stops a forward pass once the layer whose statistics are gathered has run."""


def _stop(module, args, output):
    raise _LayerReachedError


def reestimate_statistics(model: nn.Module, x, *, batch_size: int = 256,
                          max_samples: int = 2048) -> None:
    """Recompute every BatchNorm's running statistics over ``x`` (training data, at most
    ``max_samples`` of it), one BatchNorm at a time in forward order, from the inputs
    the eval-mode model gives it.

    Training normalizes each layer's input with batch statistics, evaluation with the
    running ones. A binary layer's sign turns the small difference into flipped
    activations, which shift the statistics of the next layer, and so on: running
    statistics gathered in training can misplace the sign thresholds of deep layers in
    evaluation (on 28x28 MNIST, eval accuracy fell 20 points below training mode's).
    Re-estimated in forward order, each layer's statistics are those of what it sees in
    evaluation. The method's ``finish`` step (after stage 2) runs this; the model is left
    in eval mode.

    >>> import torch, qflow
    >>> from torch import nn
    >>> model = qflow.quantize_(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8),
    ...                         nn.BatchNorm1d(8), nn.Linear(8, 2)), qflow.BiPerConfig())
    >>> reestimate_statistics(model, torch.randn(64, 4))
    >>> int(model[2].norm.num_batches_tracked), model.training
    (1, False)
    """
    from qflow.train import rows_tensor

    x = rows_tensor(x[:max_samples], torch.float32)  # only what is used
    owners = _statistics_in_forward_order(model, x[:2])
    model.eval()
    for owner, norm in owners:
        momentum = norm.momentum
        norm.reset_running_stats()
        switched = norm if owner is not norm and not isinstance(owner, BINARY_TYPES) else owner
        switched.train()  # this BatchNorm alone takes batch statistics and records them
        stop = owner.register_forward_hook(_stop)  # nothing after it needs to run
        try:
            with torch.no_grad():
                for start in range(0, len(x), batch_size):
                    batch = x[start:start + batch_size]
                    norm.momentum = len(batch) / (start + len(batch))  # average by samples
                    with contextlib.suppress(_LayerReachedError):
                        model(batch)
        finally:
            stop.remove()
            switched.eval()
            norm.momentum = momentum


def _statistics_in_forward_order(model: nn.Module, example: torch.Tensor):
    """(module that computes with it, BatchNorm) pairs, in the order a forward pass
    reaches them."""
    owners = {}
    for module in model.modules():
        if isinstance(module, QBatchNorm1d | QBatchNorm2d):
            owners[module] = module
        elif isinstance(module, BINARY_TYPES) and module.norm is not None:
            owners[module] = module.norm
        elif isinstance(module, QConv2d | QLinear) and module.folded_bn is not None:
            owners[module] = module.folded_bn
    order = []
    hooks = [m.register_forward_pre_hook(lambda m, args: order.append(m)) for m in owners]
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    seen = dict.fromkeys(order)
    return [(m, owners[m]) for m in seen if owners[m].track_running_stats]
