"""The model zoo and built-in data sets, looked up by name.

>>> from qflow.zoo import MODELS
>>> sorted(MODELS)
['digits-cnn', 'digits-mlp', 'jet-mlp']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import data, models
from .data import Dataset


@dataclass(frozen=True)
class ZooModel:
    factory: Callable[[], nn.Module]
    data: str  # default data set
    epochs: int  # default float training epochs
    lr: float = 3e-3


MODELS: dict[str, ZooModel] = {
    "digits-mlp": ZooModel(models.digits_mlp, "digits", epochs=40),
    "digits-cnn": ZooModel(models.digits_cnn, "digits", epochs=30),
    "jet-mlp": ZooModel(models.jet_mlp, "jets", epochs=12),
}

DATASETS: dict[str, Callable[[], Dataset]] = {
    "digits": data.digits,
    "jets": data.jets,
}

__all__ = ["DATASETS", "MODELS", "Dataset", "ZooModel"]
