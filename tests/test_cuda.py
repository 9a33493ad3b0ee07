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


def test_hawq_traces_on_cuda_equal_the_cpu_ones():
    from qflow.hawq.sensitivity import hutchinson_traces

    torch.manual_seed(0)
    model = _cnn().eval()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    cpu = hutchinson_traces(model, x, y, min_probes=8, max_probes=8)
    gpu = hutchinson_traces(copy.deepcopy(model).cuda(), x, y, min_probes=8, max_probes=8)
    for name, trace in cpu.traces.items():
        assert gpu.traces[name] == pytest.approx(trace, rel=1e-4)


def test_a_cuda_export_verifies_on_the_gpu(tmp_path):
    tvm = pytest.importorskip("tvm")
    if not tvm.device("cuda", 0).exist:
        pytest.skip("this TVM runtime has no CUDA device (the apache-tvm wheel is CPU-only)")
    from qflow.cli.main import main

    run, out = tmp_path / "run", tmp_path / "cuda"
    assert main(["quantize", "--epochs", "2", "--qat-epochs", "1", "--quiet", "--device",
                 "cuda", "--out", str(run)]) == 0
    assert main(["export", str(run), "--target", "cuda", "--out", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
