"""The model zoo and built-in data sets, looked up by name.

>>> from qflow.zoo import MODELS
>>> sorted(MODELS)  # doctest: +NORMALIZE_WHITESPACE
['binary-cnn', 'binary-mlp', 'digits-cnn', 'digits-mlp', 'jet-mlp', 'resnet8', 'tiny-vit',
 'tiny-vit-mnist']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import data
from .data import Dataset


def _lazy(name: str) -> Callable[[], object]:
    """A factory that imports torch (via .models) only when called."""

    def build():
        from . import models

        return getattr(models, name)()

    build.__name__ = name
    return build


@dataclass(frozen=True)
class ZooModel:
    factory: Callable[[], object]  # returns a float torch.nn.Module
    data: str  # default data set
    epochs: int  # default float training epochs
    lr: float = 3e-3
    #: the QAT method the model is made for: what ``qflow quantize`` uses without --method
    method: str = "qfx"


MODELS: dict[str, ZooModel] = {
    "digits-mlp": ZooModel(_lazy("digits_mlp"), "digits", epochs=40),
    "digits-cnn": ZooModel(_lazy("digits_cnn"), "digits", epochs=30),
    "jet-mlp": ZooModel(_lazy("jet_mlp"), "jets", epochs=12),
    # made for BiPer; any image size (binary-cnn), 8x8 digits (binary-mlp)
    "binary-cnn": ZooModel(_lazy("binary_cnn"), "digits", epochs=20, method="biper"),
    "binary-mlp": ZooModel(_lazy("binary_mlp"), "digits", epochs=20, method="biper"),
    # 2x2 patches of the 8x8 digits: 16 tokens, dim 32, 2 heads, 2 blocks
    "tiny-vit": ZooModel(_lazy("tiny_vit"), "digits", epochs=60, lr=2e-3),
    # the same for 28x28 mnist5k: 4x4 patches, 49 tokens (a position embedding per token,
    # so one model per image size)
    "tiny-vit-mnist": ZooModel(_lazy("tiny_vit_mnist"), "mnist5k", epochs=30, lr=2e-3),
    # the MLPerf Tiny ResNet-8 (3x32x32), the deployment benchmark model: generated data,
    # speed and exactness figures, not accuracy
    "resnet8": ZooModel(_lazy("resnet8"), "images32", epochs=3),
}

DATASETS: dict[str, Callable[[], Dataset]] = {
    "digits": data.digits,
    "jets": data.jets,
    "mnist5k": data.mnist5k,
    "images32": data.images32,
}

__all__ = ["DATASETS", "MODELS", "Dataset", "ZooModel"]
