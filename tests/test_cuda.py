"""QAT on a GPU: every method's model gives the same eval outputs on CUDA as on the CPU
(the exact eval path runs in float64 on the device), and training steps run there.

These tests need a CUDA device; without one each is skipped and says so.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qflow
from qflow.train import calibrate, fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch.cuda.is_available() is False)")


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def _vit():
    from qflow.zoo import MODELS

    return MODELS["tiny-vit"].factory()


CASES = [("qfx", _cnn, lambda: qflow.QFXConfig.with_bits(4)),
         ("biper", _cnn, qflow.BiPerConfig),
         ("dyadic", _cnn, lambda: qflow.DyadicConfig(weight_bits=4, act_bits=4)),
         ("ofq", _vit, lambda: qflow.OFQConfig(weight_bits=2, act_quantizer="lsq_token"))]


@pytest.mark.parametrize("name, build, config", CASES, ids=[c[0] for c in CASES])
def test_cuda_eval_equals_cpu_eval_after_training_there(name, build, config):
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    model = qflow.quantize_(build(), config())
    calibrate(model, x)
    model.cuda()
    fit(model, x, y, epochs=2, batch_size=16, progress=False)  # on the GPU
    on_cpu = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        cuda_out = model.eval()(x.cuda()).cpu()
        cpu_out = on_cpu(x)
    assert int((cuda_out != cpu_out).sum()) == 0
