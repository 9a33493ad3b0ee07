"""Dyadic: integer-only quantization with scales that are not powers of two (HAWQ-V3).

``qflow.quantize_(model, DyadicConfig(weight_bits=4, act_bits=4))`` gives every weight
layer symmetric per-channel weights and a static input scale (:mod:`qflow.dyadic.layers`);
both deploy as fixed-point multipliers b / 2^c, so the frozen graph is ``scale_shift`` →
``cast`` → ``conv2d``/``dense`` → ``scale_shift`` → ``cast`` and QAT eval equals it code
for code. HAWQ allocates widths for it with ``requant: dyadic``. See ``docs/dyadic.md``.

This module imports without torch (the config and the method's registration); the
layers and the handler load on first use.

>>> import qflow
>>> from qflow.methods import method_of
>>> config = qflow.DyadicConfig(weight_bits=4, act_bits=6)
>>> method_of(config).tag(config)
'dyadic-w4a6'
>>> method_of(config).describe(config)
'dyadic (weights 4-bit per channel, inputs 6-bit, 16-bit multipliers), edges 8-bit'
"""

from __future__ import annotations

import importlib

from qflow.methods import Method, Phase, register_method

from .config import DyadicConfig, DyadicOverride

_LAZY = {"quantize_dyadic": ".quantize", "dyadic_layers": ".quantize",
         "DyadicConv2d": ".layers", "DyadicLinear": ".layers"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _quantize(model, config: DyadicConfig):
    from .quantize import quantize_dyadic

    return quantize_dyadic(model, config)


def _phases(config: DyadicConfig, epochs: int) -> list[Phase]:
    """One QAT phase at a third of the float learning rate, as QFX."""
    return [Phase("QAT", epochs, lr_scale=1 / 3)]


def _describe(config: DyadicConfig) -> str:
    return (f"dyadic (weights {config.weight_bits}-bit per channel, inputs "
            f"{config.act_bits}-bit, {config.multiplier_bits}-bit multipliers), "
            f"edges {config.fixed.activation.bits}-bit")


register_method(Method(name="dyadic", config_type=DyadicConfig, quantize=_quantize,
                       phases=_phases,
                       tag=lambda c: f"dyadic-w{c.weight_bits}a{c.act_bits}",
                       describe=_describe))

__all__ = ["DyadicConfig", "DyadicConv2d", "DyadicLinear", "DyadicOverride",
           "dyadic_layers", "quantize_dyadic"]
