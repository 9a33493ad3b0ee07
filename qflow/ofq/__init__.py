"""OFQ: oscillation-free quantization for low-bit vision transformers (ICML 2023).

``qflow.quantize_(model, OFQConfig(weight_bits=2))`` gives every weight layer but the
first and the last StatsQ weights (per-row scale 2·mean|W|, mid-rise levels, identity
gradient; :mod:`qflow.ofq.layers`); the rest is QFX fixed point. ``qflow.freeze`` turns a
StatsQ layer into ``dense``/``conv2d`` (odd integer weights) → ``scale_shift`` (per-row
fixed-point multiplier, bias) → ``cast`` nodes. Training is a QAT phase, then
confidence-guided annealing (:mod:`qflow.ofq.cga`), both distilling from the float model
by default. Query-key reparameterization (:mod:`qflow.ofq.qkr`) is on by default;
``act_quantizer="lsq"`` gives the StatsQ layers learned activation scales, deployed as
fixed-point multipliers (:mod:`qflow.quantizers.scaled`). See ``docs/ofq.md``.

This module imports without torch (the config and the method's registration); the
layers and the handler load on first use.

>>> import qflow
>>> from qflow.methods import method_of
>>> config = qflow.OFQConfig(weight_bits=2)
>>> method = method_of(config)
>>> method.tag(config)
'ofq-w2a8'
>>> method.describe(config)
'OFQ (StatsQ weights 2-bit, multiplier 16-bit, QKR), activations 8-bit, first/last layers 8-bit'
>>> [(p.name, p.epochs, p.lr_schedule) for p in method.phases(config, 5)]
[('QAT', 5, 'cosine'), ('CGA', 2, 'constant')]
"""

from __future__ import annotations

import functools
import importlib

from qflow.methods import Method, Phase, register_method

from .config import OFQConfig, StatsQOverride

#: learning rate of the QAT phase, relative to the float training's (as QFX's)
QAT_LR_SCALE = 1 / 3
#: CGA's constant learning rate, relative to the QAT phase's initial one: the OFQ
#: reference recipe's minimum (1e-5) over its base learning rate (5e-4)
CGA_LR_FRACTION = 1 / 50

_LAZY = {
    "quantize_ofq": ".quantize",
    "statsq_layers": ".quantize",
    "StatsQConv2d": ".layers",
    "StatsQLinear": ".layers",
    "statsq_levels": ".layers",
    "multiplier_codes": ".layers",
    "ConfidenceGuidedAnnealing": ".cga",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _quantize(model, config: OFQConfig):
    from .quantize import quantize_ofq

    return quantize_ofq(model, config)


def cga_epochs(config: OFQConfig, epochs: int) -> int:
    """Epochs of the phase after QAT: ``config.cga_epochs``, else a third of the QAT
    ``epochs`` rounded up."""
    return -(-epochs // 3) if config.cga_epochs is None else config.cga_epochs


def phases(config: OFQConfig, epochs: int) -> list[Phase]:
    """The QAT phase of ``epochs`` (cosine learning rate from a third of the float one),
    then, when it has epochs, CGA (:mod:`qflow.ofq.cga`) at a constant learning rate of
    ``CGA_LR_FRACTION`` of the QAT one. LSQ weights (the baseline) get the same second
    phase without freezing (``"constant lr"``): the same epochs and learning rates, so
    that CGA is the only difference. Both phases distil from the float model when
    ``config.distill``."""
    distill = (config.distill_alpha, config.distill_temperature) if config.distill else None
    qat = Phase("QAT", epochs, lr_scale=QAT_LR_SCALE, distill=distill)
    count = cga_epochs(config, epochs)
    if count == 0:
        return [qat]
    statsq = config.weight_quantizer == "statsq"
    return [qat, Phase("CGA" if statsq else "constant lr", count,
                       lr_scale=QAT_LR_SCALE * CGA_LR_FRACTION, lr_schedule="constant",
                       step_hook=functools.partial(_cga, config) if statsq else None,
                       distill=distill)]


def _cga(config: OFQConfig, model):
    from .cga import ConfidenceGuidedAnnealing

    return ConfidenceGuidedAnnealing(model, br=config.cga_br)


def _tag(config: OFQConfig) -> str:
    lsq = "-lsq" if config.weight_quantizer == "lsq" else ""
    acts = "-lsqact" if config.act_quantizer == "lsq" else ""
    return f"ofq{lsq}-w{config.weight_bits}a{config.fixed.activation.bits}{acts}"


def _describe(config: OFQConfig) -> str:
    quantizer = "LSQ" if config.weight_quantizer == "lsq" else "StatsQ"
    qkr = ", QKR" if config.qkr else ""
    learned = " at learned scales" if config.act_quantizer == "lsq" else ""
    return (f"OFQ ({quantizer} weights {config.weight_bits}-bit, multiplier "
            f"{config.multiplier_bits}-bit{qkr}), activations "
            f"{config.fixed.activation.bits}-bit{learned}, first/last layers "
            f"{config.fixed.weight.bits}-bit")


register_method(Method(name="ofq", config_type=OFQConfig, quantize=_quantize,
                       phases=phases, tag=_tag, describe=_describe))

__all__ = ["CGA_LR_FRACTION", "ConfidenceGuidedAnnealing", "OFQConfig", "StatsQConv2d",
           "StatsQLinear", "StatsQOverride", "cga_epochs", "multiplier_codes", "phases",
           "quantize_ofq", "statsq_layers", "statsq_levels"]
