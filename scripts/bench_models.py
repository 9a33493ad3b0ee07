"""What the benchmark scripts share: a briefly trained QFX 8-bit zoo model, frozen, and
batches of its test data. (Not a benchmark itself.)"""

from __future__ import annotations

import copy

import numpy as np
import torch

import qflow
from qflow.train import fit
from qflow.zoo import DATASETS, MODELS


def quick_quantized(model_name: str):
    """(data, float model, QGraph): one float epoch, then QFX 8-bit and one QAT epoch on
    512 samples, enough for every quantizer to be initialized. Seeded."""
    zoo = MODELS[model_name]
    data = DATASETS[zoo.data]()
    torch.manual_seed(0)
    float_model = zoo.factory()
    fit(float_model, data.x_train, data.y_train, epochs=1, progress=False)
    qmodel = qflow.quantize_(copy.deepcopy(float_model))
    fit(qmodel, data.x_train[:512], data.y_train[:512], epochs=1, progress=False)
    graph = qflow.freeze(qmodel, torch.as_tensor(data.x_test[:4]))
    return data, float_model, graph


def batch_of_test_inputs(data, count: int) -> np.ndarray:
    """``count`` test inputs: the test split repeated as often as needed."""
    reps = -(-count // len(data.x_test))
    return np.concatenate([data.x_test] * reps)[:count]
