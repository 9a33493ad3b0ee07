"""BiPer: binary neural networks with a periodic weight function (CVPR 2024).

``qflow.quantize_(model, BiPerConfig())`` makes every weight layer but the first and the
last binary (weights ±1, activations sign(x), per-channel scale α folded with the
following BatchNorm); the rest is QFX fixed point. Training runs in two stages (the
method's two phases, :func:`start_stage`); ``qflow.freeze`` turns a stage-2 model into
``sign`` → ``conv2d``/``dense`` (±1 weights) → ``scale_shift`` → ``cast`` nodes. See
``docs/biper.md``.

This module imports without torch (the config and the method's registration); the
layers and the handler load on first use.

>>> import qflow
>>> from qflow.methods import method_of
>>> config = qflow.BiPerConfig()
>>> method = method_of(config)
>>> method.tag(config), method.describe(config)
('biper-w1a1', 'BiPer (ω₀ 20), binary weights and activations, first/last layers 8-bit')
>>> [(p.name, p.epochs) for p in method.phases(config, 5)]
[('stage 1', 5), ('stage 2', 5)]
"""

from __future__ import annotations

import functools
import importlib

from qflow.methods import Method, Phase, register_method

from .config import BinaryOverride, BiPerConfig

#: learning rate of each stage, relative to the float training's
STAGE_LR_SCALES = (1 / 3, 1 / 3)

_LAZY = {
    "quantize_biper": ".quantize",
    "start_stage": ".quantize",
    "regularization": ".quantize",
    "binary_layers": ".quantize",
    "reestimate_statistics": ".quantize",
    "BinaryConv2d": ".layers",
    "BinaryLinear": ".layers",
    "quantization_error": ".qe",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _quantize(model, config: BiPerConfig):
    from .quantize import quantize_biper

    return quantize_biper(model, config)


def _start_stage(model, *, stage: int) -> None:
    from .quantize import start_stage

    start_stage(model, stage)


def _regularizer(model, *, tau: float):
    from .quantize import regularization

    return regularization(model, tau)


def phases(config: BiPerConfig, epochs: int) -> list[Phase]:
    """Stage 1 then stage 2, ``epochs`` each unless the config sets them; the
    regularizer τ·mean(sin²(ω₀·w)) joins the loss in BiPer stages whose τ is > 0."""
    stage_epochs = config.stage_epochs(epochs)
    taus = (config.tau1, config.tau2) if config.estimator == "biper" else (0.0, 0.0)
    return [Phase(f"stage {stage}", count, lr_scale=lr_scale,
                  prepare=functools.partial(_start_stage, stage=stage),
                  regularizer=functools.partial(_regularizer, tau=tau) if tau > 0 else None)
            for stage, count, lr_scale, tau in zip((1, 2), stage_epochs, STAGE_LR_SCALES, taus,
                                                   strict=True)]


def _tag(config: BiPerConfig) -> str:
    return f"{config.estimator}-w1a1"


def _describe(config: BiPerConfig) -> str:
    name = f"BiPer (ω₀ {config.omega0:g})" if config.estimator == "biper" else "sign-STE"
    w, a = config.fixed.weight.bits, config.fixed.activation.bits
    fixed = f"{w}-bit" if w == a else f"weights {w}-bit, activations {a}-bit"
    return f"{name}, binary weights and activations, first/last layers {fixed}"


def finish(model, x_train) -> None:
    """What follows stage 2 (``Method.finish``, run by ``qflow quantize``):
    :func:`~qflow.biper.quantize.reestimate_statistics` over the training data."""
    from .quantize import reestimate_statistics

    reestimate_statistics(model, x_train)


register_method(Method(name="biper", config_type=BiPerConfig, quantize=_quantize,
                       phases=phases, tag=_tag, describe=_describe, finish=finish))

__all__ = ["BiPerConfig", "BinaryConv2d", "BinaryLinear", "BinaryOverride", "binary_layers",
           "finish", "phases", "quantization_error", "quantize_biper", "reestimate_statistics",
           "regularization", "start_stage"]
