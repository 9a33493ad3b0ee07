"""OFQ: oscillation-free quantization for low-bit vision transformers (ICML 2023).

``qflow.quantize_(model, OFQConfig(weight_bits=2))`` gives every weight layer but the
first and the last StatsQ weights (per-row scale 2·mean|W|, mid-rise levels, identity
gradient; :mod:`qflow.ofq.layers`); the rest is QFX fixed point. ``qflow.freeze`` turns a
StatsQ layer into ``dense``/``conv2d`` (odd integer weights) → ``scale_shift`` (per-row
fixed-point multiplier, bias) → ``cast`` nodes. Confidence-guided annealing,
query-key reparameterization and distillation are not implemented yet. See
``docs/ofq.md``.

This module imports without torch (the config and the method's registration); the
layers and the handler load on first use.

>>> import qflow
>>> from qflow.methods import method_of
>>> config = qflow.OFQConfig(weight_bits=2)
>>> method = method_of(config)
>>> method.tag(config)
'ofq-w2a8'
>>> method.describe(config)
'OFQ (StatsQ weights 2-bit, multiplier 16-bit), activations 8-bit, first/last layers 8-bit'
>>> [(p.name, p.epochs) for p in method.phases(config, 5)]
[('QAT', 5)]
"""

from __future__ import annotations

import importlib

from qflow.methods import Method, Phase, register_method

from .config import OFQConfig, StatsQOverride

#: learning rate of the QAT phase, relative to the float training's (as QFX's)
QAT_LR_SCALE = 1 / 3

_LAZY = {
    "quantize_ofq": ".quantize",
    "statsq_layers": ".quantize",
    "StatsQConv2d": ".layers",
    "StatsQLinear": ".layers",
    "statsq_levels": ".layers",
    "multiplier_codes": ".layers",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _quantize(model, config: OFQConfig):
    from .quantize import quantize_ofq

    return quantize_ofq(model, config)


def phases(config: OFQConfig, epochs: int) -> list[Phase]:
    """One QAT phase of ``epochs`` (annealing is not implemented yet)."""
    return [Phase("QAT", epochs, lr_scale=QAT_LR_SCALE)]


def _tag(config: OFQConfig) -> str:
    return f"ofq-w{config.weight_bits}a{config.fixed.activation.bits}"


def _describe(config: OFQConfig) -> str:
    return (f"OFQ (StatsQ weights {config.weight_bits}-bit, multiplier "
            f"{config.multiplier_bits}-bit), activations {config.fixed.activation.bits}-bit, "
            f"first/last layers {config.fixed.weight.bits}-bit")


register_method(Method(name="ofq", config_type=OFQConfig, quantize=_quantize,
                       phases=phases, tag=_tag, describe=_describe))

__all__ = ["OFQConfig", "StatsQConv2d", "StatsQLinear", "StatsQOverride", "multiplier_codes",
           "phases", "quantize_ofq", "statsq_layers", "statsq_levels"]
