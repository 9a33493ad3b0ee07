"""OFQ's handler (what ``qflow.quantize_`` runs for an ``OFQConfig``)."""

from __future__ import annotations

import dataclasses

from torch import fx, nn

from qflow.api import quantize_qfx, replace_module
from qflow.errors import ConfigError
from qflow.quantizers.scaled import InputScale

from . import qkr
from .config import OFQConfig
from .layers import STATSQ_TYPES, StatsQConv2d, StatsQLinear
from .lsq import LSQ_TYPES, LSQConv2d, LSQLinear

_WEIGHT_TYPES = {nn.Conv2d: StatsQConv2d, nn.Linear: StatsQLinear}
#: the layer types of each ``weight_quantizer``, by the float type they replace
_QUANTIZER_TYPES = {"statsq": _WEIGHT_TYPES, "lsq": {nn.Conv2d: LSQConv2d, nn.Linear: LSQLinear}}


def quantize_ofq(model: nn.Module, config: OFQConfig) -> nn.Module:
    """Make ``model`` an OFQ QAT model, in place; returns ``model``.

    With ``config.qkr``, every attention whose scores are ``q @ kᵀ`` of two linear
    layers first gets one C × C layer per head in their place (:mod:`qflow.ofq.qkr`).
    The model is quantized by QFX with ``config.fixed`` (BatchNorm folding off: a
    BatchNorm stays a ``scale_shift`` layer of its own), then every QFX weight layer
    except the first and the last (in the order the forward pass calls them, found with
    torch.fx), as changed by ``config.overrides``, becomes a
    :class:`~qflow.ofq.layers.StatsQLinear` or :class:`~qflow.ofq.layers.StatsQConv2d`
    with the weights, bias and bias format of the QFX layer it replaces (an
    :class:`~qflow.ofq.lsq.LSQLinear` / :class:`~qflow.ofq.lsq.LSQConv2d` with
    ``weight_quantizer: lsq``); with ``act_quantizer: lsq`` each of them quantizes its
    input at a learned scale (:class:`~qflow.quantizers.scaled.InputScale`). An error
    leaves the model as it was.

    >>> import torch
    >>> from torch import nn
    >>> import qflow
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
    ...                       nn.Linear(16, 3))
    >>> model = qflow.quantize_(model, qflow.OFQConfig(weight_bits=2))
    >>> [type(m).__name__ for m in model]
    ['QInput', 'QLinear', 'QReLU', 'StatsQLinear', 'QReLU', 'QLinear']
    >>> model.eval()(torch.rand(2, 8)).shape
    torch.Size([2, 3])
    """
    # planned on a reparameterized copy: an error leaves the model as it was
    plan = _plan(qkr.reparameterized(model) if config.qkr else model, config)
    heads = qkr.reparameterize_qk(model) if config.qkr else {}
    fixed = dataclasses.replace(config.fixed, fold_batchnorm=False)
    quantize_qfx(model, fixed)
    types = _QUANTIZER_TYPES[config.weight_quantizer]
    for name, bits in plan:
        qlayer = model.get_submodule(name)
        inputs = None
        if config.act_quantizer in ("lsq", "lsq_token"):
            inputs = InputScale(fixed.spec_for(name, "activation").bits,
                                config.multiplier_bits, learned=True,
                                per_token=config.act_quantizer == "lsq_token")
        layer = types[_float_type(qlayer)].from_float(
            qlayer, fixed, name, bits=bits, multiplier_bits=config.multiplier_bits,
            bias_quant=qlayer.bias_quant, input_quant=inputs)
        replace_module(model, name, layer)
    for name, head_dim in heads.items():  # the estimate counts their extra products
        model.get_submodule(name).qkr_head_dim = head_dim
    model.qflow_config = config
    return model


def _float_type(module: nn.Module) -> type:
    return nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear


def _plan(model: nn.Module, config: OFQConfig) -> list[tuple[str, int]]:
    """(name, StatsQ width) of the layers to quantize with StatsQ (nothing changed)."""
    try:
        graph = fx.Tracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        reason = str(exc).strip().splitlines()
        raise ConfigError("ofq: finding the first and last weight layers needs a model "
                          f"that torch.fx can trace: {reason[0] if reason else exc!r}") from None
    modules = dict(model.named_modules())
    order: list[str] = []
    for node in graph.nodes:
        if (node.op == "call_module" and type(modules[node.target]) in _WEIGHT_TYPES
                and node.target not in order):
            order.append(node.target)
    config.check_overrides(order)
    plan = []
    for position, name in enumerate(order):
        statsq, bits = config.layer_settings(name, 0 < position < len(order) - 1)
        if statsq:
            plan.append((name, bits))
    return plan



def statsq_layers(model: nn.Module) -> list[StatsQConv2d | StatsQLinear]:
    """The StatsQ layers of ``model``, in registration order."""
    return [m for m in model.modules() if isinstance(m, STATSQ_TYPES)]


def lsq_layers(model: nn.Module) -> list[LSQConv2d | LSQLinear]:
    """The LSQ layers of ``model`` (``weight_quantizer: lsq``), in registration order."""
    return [m for m in model.modules() if isinstance(m, LSQ_TYPES)]
