"""The dyadic method's handler (what ``qflow.quantize_`` runs for a ``DyadicConfig``)."""

from __future__ import annotations

import dataclasses

from torch import nn

from qflow.api import quantize_qfx, replace_module

from .config import DyadicConfig
from .layers import DYADIC_TYPES, DyadicConv2d, DyadicLinear


def quantize_dyadic(model: nn.Module, config: DyadicConfig) -> nn.Module:
    """Make ``model`` a dyadic QAT model, in place; returns ``model``.

    The model is quantized by QFX with ``config.fixed`` (BatchNorm folding off: a
    BatchNorm stays a ``scale_shift`` layer of its own), then every QFX weight layer that
    ``config.overrides`` leave dyadic becomes a :class:`~qflow.dyadic.layers.DyadicLinear`
    or :class:`~qflow.dyadic.layers.DyadicConv2d` with the weights, bias and bias format
    of the QFX layer it replaces. An override that reaches no weight layer is an error,
    raised before anything changes.

    >>> import torch
    >>> from torch import nn
    >>> import qflow
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> config = qflow.DyadicConfig(weight_bits=4, overrides={"2": {"dyadic": False}})
    >>> model = qflow.quantize_(model, config)
    >>> [type(m).__name__ for m in model]
    ['QInput', 'DyadicLinear', 'QReLU', 'QLinear']
    >>> model.eval()(torch.rand(2, 8)).shape
    torch.Size([2, 3])
    """
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    config.check_overrides(names)
    fixed = dataclasses.replace(config.fixed, fold_batchnorm=False)
    quantize_qfx(model, fixed)
    for name in names:
        dyadic, weight_bits, act_bits = config.layer_settings(name)
        if not dyadic:
            continue
        qlayer = model.get_submodule(name)
        kind = DyadicConv2d if isinstance(qlayer, nn.Conv2d) else DyadicLinear
        layer = kind.from_float(qlayer, fixed, name, bits=weight_bits,
                                multiplier_bits=config.multiplier_bits,
                                bias_quant=qlayer.bias_quant, act_bits=act_bits,
                                range_momentum=config.range_momentum)
        replace_module(model, name, layer)
    model.qflow_config = config
    return model


def dyadic_layers(model: nn.Module) -> list[DyadicConv2d | DyadicLinear]:
    """The dyadic layers of ``model``, in registration order."""
    return [m for m in model.modules() if isinstance(m, DYADIC_TYPES)]
