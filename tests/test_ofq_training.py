"""OFQ training: confidence-guided annealing (CGA) and distillation from the float model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qflow
from qflow.cli.main import main
from qflow.config import QFXConfig
from qflow.errors import ConfigError
from qflow.methods import method_of
from qflow.ofq import CGA_LR_FRACTION, OFQConfig
from qflow.ofq.cga import ConfidenceGuidedAnnealing, frozen_mask, threshold_distance
from qflow.ofq.layers import StatsQLinear
from qflow.train import distillation_loss, fit


def _reference_frozen(weight: torch.Tensor, bits: int, br: float) -> np.ndarray:
    """CGA's rule computed independently: per row, the pre-rounding value w / step with
    step = s / 2^(b−1), s = 2·mean|w|, against every threshold between two levels."""
    w = weight.detach().double().numpy()
    n = 2 ** (bits - 1)
    frozen = np.ones(w.shape, dtype=bool)
    for r in range(w.shape[0]):
        step = 2 * np.abs(w[r]).mean() / n
        u = w[r] / step
        for threshold in range(-n + 1, n):  # where floor(u) clamped to [−n, n−1] changes
            frozen[r] &= ~(np.abs(u - threshold) <= br)
    return frozen


def _layer_model(bits: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    return qflow.quantize_(model, OFQConfig(weight_bits=bits, distill=False))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("br", [0.005, 0.05, 0.2])
def test_frozen_mask_matches_the_rule(bits, br):
    torch.manual_seed(bits)
    layer = StatsQLinear.from_float(nn.Linear(40, 8), QFXConfig(), "fc", bits=bits)
    with torch.no_grad():  # put some weights right next to a threshold
        n = 2 ** (bits - 1)
        step = 2 * layer.weight.abs().mean(dim=1, keepdim=True) / n
        layer.weight[:, :5] = step * (1 + torch.tensor([-0.3, -0.01, 0.001, 0.02, 0.4]) * br)
    mask = frozen_mask(layer.weight, bits, br).numpy()
    np.testing.assert_array_equal(mask, _reference_frozen(layer.weight, bits, br))
    assert 0 < mask.mean() < 1
    distance = threshold_distance(layer.weight, bits)
    assert distance.dtype == torch.float64 and bool((distance >= 0).all())
    assert torch.equal(torch.from_numpy(mask), distance > br)


def test_zero_row_is_frozen():
    weight = torch.zeros(2, 4)
    weight[1] = torch.tensor([1.0, -1.0, 0.5, 0.25])
    mask = frozen_mask(weight, 2, 0.005)
    assert mask[0].all()


def test_cga_freezes_exactly_those_weights_under_adam():
    model = _layer_model()
    layer = model[3]
    assert isinstance(layer, StatsQLinear)
    cga = ConfidenceGuidedAnnealing(model, br=0.2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for _ in range(2):  # Adam moments for every weight first
        optimizer.zero_grad()
        F.cross_entropy(model.train()(x), y).backward()
        optimizer.step()
    before = layer.weight.detach().clone()
    expected = _reference_frozen(before, 2, 0.2)
    assert 0.1 < expected.mean() < 0.95
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    cga.before_step()
    grad = layer.weight.grad.numpy()
    assert (grad[expected] == 0).all() and (grad[~expected] != 0).any()
    optimizer.step()
    cga.after_step()
    after = layer.weight.detach()
    assert torch.equal(after[torch.from_numpy(expected)], before[torch.from_numpy(expected)])
    assert (after[torch.from_numpy(~expected)] != before[torch.from_numpy(~expected)]).all()
    record = cga.epoch_record()
    assert record["frozen_fraction"] == pytest.approx(expected.mean())
    assert record["layers"] == {"2": pytest.approx(expected.mean())}


def test_fit_with_cga_keeps_frozen_weights_bit_identical_and_lr_constant():
    model = _layer_model(seed=1)
    layer = model[3]
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    # the mask is recomputed at every step (the scale moves with the free weights): the
    # weights frozen at every step never moved, and some weights free at the start did
    start = layer.weight.detach().clone()
    first = torch.from_numpy(_reference_frozen(start, 2, 0.05))

    class Recording(ConfidenceGuidedAnnealing):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.masks = []

        def before_step(self):
            super().before_step()
            self.masks.append(self._masks["2"].clone())

    cga = Recording(model, br=0.05)
    history = fit(model, x, y, epochs=3, batch_size=16, lr=1e-2, lr_schedule="constant",
                  step_hook=cga, progress=False, weight_decay=1e-3)
    always = torch.stack(cga.masks).all(dim=0)
    assert always.any() and first.any()
    assert torch.equal(layer.weight.detach()[always], start[always])
    assert (layer.weight.detach()[~first] != start[~first]).any()
    assert [r["lr"] for r in history] == [1e-2] * 3
    assert all(0.5 < r["cga"]["frozen_fraction"] <= 1 for r in history)
    assert history[0]["cga"]["mean_frozen_fraction"] < 1
    assert len(cga.masks) == 12


def test_cosine_schedule_is_the_default_and_unknown_schedules_fail():
    x, y = torch.randn(32, 2), torch.randint(0, 2, (32,))
    history = fit(nn.Linear(2, 2), x, y, epochs=2, lr=1e-2, progress=False)
    assert history[-1]["lr"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        fit(nn.Linear(2, 2), x, y, epochs=1, lr_schedule="step", progress=False)


def test_distillation_loss_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[1.0, 2.0, 0.0], [0.5, -0.5, 2.5]])
    labels = torch.tensor([0, 2])
    alpha, t = 0.3, 2.0
    ce = -np.mean([np.log(np.exp(r[k]) / np.exp(r).sum())
                   for r, k in zip(logits.double().numpy(), labels.numpy(), strict=True)])
    kl = 0.0
    for s_row, t_row in zip(logits.double().numpy(), teacher.double().numpy(), strict=True):
        p = np.exp(t_row / t) / np.exp(t_row / t).sum()
        q = np.exp(s_row / t) / np.exp(s_row / t).sum()
        kl += (p * np.log(p / q)).sum()
    expected = (1 - alpha) * ce + alpha * t * t * kl / 2
    got = distillation_loss(logits, labels, teacher, alpha=alpha, temperature=t)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(distillation_loss(logits, labels, teacher, alpha=0.0, temperature=t)) == \
        pytest.approx(ce, rel=1e-6)


def test_fit_distils_from_the_teacher():
    torch.manual_seed(0)
    x, y = torch.randn(48, 4), torch.randint(0, 3, (48,))
    teacher = nn.Linear(4, 3)
    student = nn.Linear(4, 3)
    copy = nn.Linear(4, 3)
    copy.load_state_dict(student.state_dict())
    history = fit(student, x, y, epochs=1, batch_size=48, lr=0.0, teacher=teacher,
                  distill_alpha=0.25, temperature=3.0, progress=False)
    with torch.no_grad():
        expected = distillation_loss(copy(x), y, teacher(x), alpha=0.25, temperature=3.0)
    assert history[0]["loss"] == pytest.approx(float(expected), rel=1e-6)
    assert not teacher.training


def test_fit_without_teacher_is_unchanged():
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    runs = []
    for kwargs in ({}, {"teacher": None, "distill_alpha": 0.9, "temperature": 4.0,
                        "step_hook": None, "lr_schedule": "cosine"}):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        history = fit(model, x, y, epochs=2, batch_size=16, seed=3, progress=False, **kwargs)
        runs.append((history, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_phases_and_config():
    config = OFQConfig(weight_bits=2)
    assert (config.cga_epochs, config.cga_br, config.distill, config.distill_alpha,
            config.distill_temperature) == (None, 0.005, True, 0.5, 1.0)
    phases = method_of(config).phases(config, 7)
    assert [(p.name, p.epochs, p.lr_schedule) for p in phases] == [
        ("QAT", 7, "cosine"), ("CGA", 3, "constant")]
    assert phases[1].lr_scale == pytest.approx(phases[0].lr_scale * CGA_LR_FRACTION)
    assert all(p.distill == (0.5, 1.0) for p in phases)
    assert [p.epochs for p in method_of(config).phases(config, 1)] == [1, 1]
    assert [p.name for p in method_of(config).phases(config, 0)] == ["QAT"]
    # the LSQ baseline: the same epochs and learning rates, nothing frozen
    lsq = OFQConfig(weight_bits=2, weight_quantizer="lsq")
    lsq_phases = method_of(lsq).phases(lsq, 7)
    assert [(p.name, p.epochs, p.lr_schedule, p.lr_scale, p.step_hook) for p in lsq_phases] == [
        ("QAT", 7, "cosine", phases[0].lr_scale, None),
        ("constant lr", 3, "constant", phases[1].lr_scale, None)]
    off = OFQConfig(cga_epochs=0, distill=False)
    assert [(p.name, p.distill) for p in method_of(off).phases(off, 5)] == [("QAT", None)]
    assert OFQConfig.from_yaml(OFQConfig(cga_epochs=4, cga_br=0.01, distill_temperature=2)
                               .to_yaml()).cga_epochs == 4
    for bad, message in (({"cga_br": 0.5}, "config.cga_br"),
                         ({"cga_epochs": -1}, "config.cga_epochs"),
                         ({"distill": "yes"}, "config.distill"),
                         ({"distill_alpha": 1.5}, "config.distill_alpha"),
                         ({"distill_temperature": 0}, "config.distill_temperature")):
        with pytest.raises(ConfigError, match=message):
            OFQConfig.from_dict(bad)
    options = phases[1].fit_options(_layer_model(), teacher=nn.Linear(6, 3))
    assert isinstance(options["step_hook"], ConfidenceGuidedAnnealing)
    assert options["distill_alpha"] == 0.5 and options["temperature"] == 1.0


def test_cli_runs_cga_and_reports_the_frozen_fraction(tmp_path):
    run = tmp_path / "run"
    assert main(["quantize", "--method", "ofq", "--model", "tiny-vit", "--bits", "2",
                 "--epochs", "1", "--qat-epochs", "1", "--quiet", "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    phases = [r["phase"] for r in metrics["qat_history"]]
    assert phases == ["QAT", "CGA"]
    cga = metrics["qat_history"][-1]["cga"]
    assert 0 < cga["frozen_fraction"] <= 1 and len(cga["layers"]) == 12
    assert "cga" not in metrics["qat_history"][0]
    summary = metrics["cga"]
    assert summary["br"] == 0.005 and summary["frozen_fraction"] == cga["frozen_fraction"]
    assert metrics["qat_history"][-1]["lr"] == pytest.approx(
        json.loads((run / "run.json").read_text())["lr"] / 3 * CGA_LR_FRACTION)


def test_cga_with_distillation_resumes_exactly():
    x, y = torch.randn(48, 6), torch.randint(0, 3, (48,))
    teacher = nn.Sequential(nn.Linear(6, 3))
    kwargs = {"batch_size": 16, "lr": 1e-3, "lr_schedule": "constant", "teacher": teacher,
              "progress": False}
    whole = _layer_model(seed=2)
    expected = fit(whole, x, y, epochs=2, step_hook=ConfidenceGuidedAnnealing(whole),
                   **kwargs)
    states = []
    part = _layer_model(seed=2)
    fit(part, x, y, epochs=2, step_hook=ConfidenceGuidedAnnealing(part),
        checkpoint=lambda state: states.append(_saved(state)), **kwargs)
    saved = torch.load(states[0], weights_only=True)
    resumed = _layer_model(seed=5)
    history = fit(resumed, x, y, epochs=2, step_hook=ConfidenceGuidedAnnealing(resumed),
                  resume=saved, **kwargs)
    assert history == expected
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(),
                                                 resumed.state_dict().values(), strict=True))


def _saved(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer
