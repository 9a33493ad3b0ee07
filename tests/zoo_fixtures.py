"""Quantized zoo models for exactness tests, built once per test session and cached.

The models are trained briefly (exactness does not depend on accuracy, but the
quantizers must have initialized and moved from their start) and frozen.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

import qflow
from qflow.config import LayerOverride, QFXConfig, QuantSpec, SpecOverride
from qflow.train import fit
from qflow.zoo import DATASETS, MODELS

#: the CI exactness matrix: name -> config
CONFIGS: dict[str, QFXConfig] = {
    "8bit": QFXConfig(),
    "4bit": QFXConfig.with_bits(4),
    "khot2": dataclasses.replace(
        QFXConfig.with_bits(6),
        weight=QuantSpec(bits=6, signed=True, per_channel=True, khot=2)),
    "bn_folded": QFXConfig(fold_batchnorm=True),
    "wrap_trn": dataclasses.replace(
        QFXConfig.with_bits(4),
        activation=QuantSpec(bits=4, rounding="TRN", overflow="WRAP"),
        intermediate=QuantSpec(bits=10, signed=True, rounding="TRN", overflow="WRAP")),
    "sat_rndconv": dataclasses.replace(
        QFXConfig.with_bits(6),
        activation=QuantSpec(bits=6, rounding="RND_CONV", overflow="SAT"),
        intermediate=QuantSpec(bits=12, signed=True, rounding="RND_CONV", overflow="SAT")),
}
#: the zoo models made for QFX (the binary ones are tested through BiPer in test_biper*.py;
#: tiny-vit-mnist is tiny-vit's architecture at 49 tokens, whose softmax rows need 6
#: fractional output bits, more than this matrix's 4-bit configs give: it is checked at 8
#: bits in test_transformer_qat.py; resnet8, the deployment benchmark, is exported and
#: verified on every target in test_resnet8.py: its C simulation is too slow for the
#: whole matrix)
MODEL_NAMES = tuple(sorted(name for name, zoo in MODELS.items()
                           if zoo.method == "qfx" and name not in ("tiny-vit-mnist",
                                                                   "resnet8")))
#: the zoo models with transformer ops, which QONNX cannot express (qflow refuses them,
#: naming the node) and hls4ml takes in io_parallel only
TRANSFORMER_MODELS = ("tiny-vit",)
#: softmax rows of 16 tokens need 4 fractional output bits; wrap_trn's 4-bit activations
#: under WRAP keep an integer bit (1.0 must fit) and so have 3: tiny-vit's softmax outputs
#: get 5 bits in that cell (quantize refuses the 4-bit form with a one-line error)
CELL_OVERRIDES = {("tiny-vit", "wrap_trn"): (LayerOverride(
    pattern=r".*\.softmax(_\d+)?", activation=SpecOverride(bits=5)),)}


def cell_config(model_name: str, config_name: str) -> QFXConfig:
    """The matrix's config for one model (``CONFIGS`` plus ``CELL_OVERRIDES``)."""
    config = CONFIGS[config_name]
    extra = CELL_OVERRIDES.get((model_name, config_name), ())
    return dataclasses.replace(config, overrides=(*config.overrides, *extra))


@functools.cache
def dataset(name: str):
    return DATASETS[name]()


@functools.cache
def quantized_model(model_name: str, config_name: str) -> torch.nn.Module:
    zoo = MODELS[model_name]
    data = dataset(zoo.data)
    torch.manual_seed(0)
    model = qflow.quantize_(zoo.factory(), cell_config(model_name, config_name))
    fit(model, data.x_train[:768], data.y_train[:768], epochs=1, lr=3e-3, progress=False)
    return model.eval()


@functools.cache
def frozen(model_name: str, config_name: str):
    """(model, qgraph) for one cell of the matrix."""
    model = quantized_model(model_name, config_name)
    data = dataset(MODELS[model_name].data)
    graph = qflow.freeze(model, torch.as_tensor(data.x_test[:4]))
    return model, graph


def test_inputs(model_name: str, count: int = 2000, seed: int = 0) -> np.ndarray:
    """Test data plus inputs drawn around the data range (float32, like real data)."""
    data = dataset(MODELS[model_name].data)
    rng = np.random.default_rng(seed)
    x = data.x_test[:count]
    extra = count - len(x)
    if extra > 0:
        lo, hi = float(data.x_test.min()), float(data.x_test.max())
        pad = 0.25 * (hi - lo)
        noise = rng.uniform(lo - pad, hi + pad, (extra, *x.shape[1:])).astype(np.float32)
        x = np.concatenate([x, noise])
    return x


test_inputs.__test__ = False  # a helper, not a test, though tests import it by this name
