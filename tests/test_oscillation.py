"""The weight-oscillation tracker: the definition on hand-made code sequences, the codes
QFX and BiPer layers deploy, ``fit``'s history and checkpoint, ``qflow quantize``'s run."""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json

import pytest
import torch
from torch import nn

import qflow
from qflow.biper import binary_layers
from qflow.cli.main import main
from qflow.oscillation import MOMENTUM, THRESHOLD, OscillationTracker, tracked_layers
from qflow.train import calibrate, fit
from qflow.zoo import DATASETS


class _Codes(nn.Module):
    """A stand-in quantized layer whose codes the test sets by hand."""

    def __init__(self, name: str, codes):
        super().__init__()
        self.qflow_name = name
        self.codes = torch.tensor(codes, dtype=torch.int32)

    def weight_codes(self):
        return self.codes.clone()


def _reference(sequence: list[int], m: float = MOMENTUM) -> float:
    """The frequency after ``sequence`` of codes, straight from the definition."""
    f, last = 0.0, 0
    for prev, code in itertools.pairwise(sequence):
        d = (code > prev) - (code < prev)
        f = (1 - m) * f + m * (d != 0 and d == -last)
        if d:
            last = d
    return f


def _track(sequences: list[list[int]], **kwargs) -> OscillationTracker:
    layer = _Codes("layer", [s[0] for s in sequences])
    tracker = OscillationTracker(layer, **kwargs)
    for step in range(1, len(sequences[0])):
        layer.codes = torch.tensor([s[step] for s in sequences], dtype=torch.int32)
        tracker.update()
    return tracker


SEQUENCES = [
    [0, 1, 0, 1, 0, 1],        # oscillates at every step from the second
    [0, 1, 2, 3, 4, 5],        # moves steadily: never
    [0, 1, 1, 1, 0, 0],        # the direction is remembered over steps without a change
    [0, 1, 1, 2, 2, 3],        # pauses, same direction: never
    [3, 3, 3, 3, 3, 3],        # still
    [0, -2, 5, 5, -7, 7],      # jumps of any size count by their direction
]


def test_frequency_is_the_ema_of_moving_back():
    tracker = _track(SEQUENCES)
    got = tracker.frequencies()["layer"].tolist()
    assert got == pytest.approx([_reference(s) for s in SEQUENCES], rel=1e-6)
    m = MOMENTUM
    # by hand: oscillations at steps 2..5 for the first, only at step 4 for the third,
    # at steps 2, 4 and 5 for the last
    assert got[0] == pytest.approx(m * sum((1 - m) ** k for k in range(4)), rel=1e-6)
    assert got[2] == pytest.approx(m * (1 - m), rel=1e-6)
    assert got[1] == got[3] == got[4] == 0.0
    assert got[5] == pytest.approx(m * ((1 - m) ** 3 + (1 - m) + 1), rel=1e-6)  # 2, 4, 5
    assert tracker.steps == 5


def test_a_single_oscillation_stays_above_the_threshold_for_68_quiet_steps():
    short = _track([[0, 1, 0] + [0] * 68])
    assert short.oscillating()["layer"].tolist() == [True]
    assert short.frequencies()["layer"].item() > THRESHOLD
    longer = _track([[0, 1, 0] + [0] * 69])
    assert longer.oscillating()["layer"].tolist() == [False]
    assert longer.summary()["fraction"] == 0.0


def test_summary_counts_per_layer_and_in_total():
    model = nn.Sequential(_Codes("a", [0, 0, 0, 0]), _Codes("b", [0, 0]))
    tracker = OscillationTracker(model)
    for a, b in ([1, 1, 0, 1], [1, 0]), ([0, 1, 0, 1], [0, 0]):
        model[0].codes = torch.tensor(a, dtype=torch.int32)
        model[1].codes = torch.tensor(b, dtype=torch.int32)
        tracker.update()
    summary = tracker.summary()
    assert summary["layers"]["a"]["weights"] == 4 and summary["layers"]["b"]["weights"] == 2
    assert summary["layers"]["a"]["fraction"] == 0.25  # only the first weight went back
    assert summary["layers"]["b"]["fraction"] == 0.5
    assert summary["fraction"] == pytest.approx(2 / 6)
    assert summary["layers"]["a"]["mean_frequency"] == pytest.approx(MOMENTUM / 4)
    assert tracker.epoch_record() == {"fraction": summary["fraction"],
                                      "layers": {"a": 0.25, "b": 0.5}}
    assert tracker.describe() == "oscillating weights: 33.3 % (threshold f > 0.005)"
    strict = OscillationTracker(model, threshold=0.02)
    assert strict.summary()["fraction"] == 0.0


def test_state_round_trips_through_torch_save(tmp_path):
    tracker = _track(SEQUENCES[:3])
    torch.save(tracker.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    other = OscillationTracker(_Codes("layer", [0, 0, 0]))
    other.load_state_dict(state)
    assert other.summary() == tracker.summary()
    with pytest.raises(ValueError, match="lacks"):
        OscillationTracker(_Codes("other", [0, 0, 0])).load_state_dict(state)


def test_qfx_codes_are_the_deployed_weights_with_batchnorm_folded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(12, 4))
    qflow.quantize_(model, qflow.QFXConfig(fold_batchnorm=True))
    layers = tracked_layers(model)
    assert all(layer.weight_codes() is None for layer in layers.values())  # no type yet
    x = torch.randn(8, 2, 4, 4)
    model.train()(x)  # running statistics move away from the defaults
    model.eval()
    for layer in layers.values():
        codes = layer.weight_codes()
        weight, _ = layer.quantized_parameters(x.to(torch.float64))
        fractional = torch.tensor([t.fractional for t in layer.weight_quant.fixed_types()],
                                  dtype=torch.float64)
        if layer.weight_quant.per_channel:
            fractional = fractional.reshape(-1, *([1] * (weight.dim() - 1)))
        assert codes.dtype == torch.int32
        assert torch.equal(codes.to(torch.float64), torch.ldexp(weight, fractional))
        assert codes.abs().max() > 8  # 8-bit codes, not values


@pytest.fixture(scope="module")
def digits():
    data = DATASETS["digits"]()
    return data.x_train[:256], data.y_train[:256]


def test_a_qfx_fit_records_it_and_resumes_it_exactly(digits):
    x, y = digits

    def start():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        qflow.quantize_(model, qflow.QFXConfig.with_bits(4))
        calibrate(model, x[:64])
        return model, OscillationTracker(model)

    model, tracker = start()
    saved = []
    history = fit(model, x, y, epochs=3, batch_size=32, lr=3e-2, progress=False,
                  oscillation=tracker, checkpoint=lambda s: saved.append(copy.deepcopy(s)))
    assert tracker.steps == 3 * 8
    assert [sorted(r["oscillation"]["layers"]) for r in history] == [["1", "3"]] * 3
    assert history[-1]["oscillation"] == tracker.epoch_record()
    assert tracker.summary()["fraction"] > 0  # 4-bit codes at a high learning rate
    model2, tracker2 = start()
    resumed = fit(model2, x, y, epochs=3, batch_size=32, lr=3e-2, progress=False,
                  oscillation=tracker2, resume=saved[0])
    assert resumed == history
    assert tracker2.state_dict()["layers"].keys() == tracker.state_dict()["layers"].keys()
    for name, state in tracker.state_dict()["layers"].items():
        for key, value in state.items():
            assert torch.equal(tracker2.state_dict()["layers"][name][key], value), (name, key)


def test_a_biper_fit_records_the_binary_layers(digits):
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32),
                          nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Linear(32, 10))
    qflow.quantize_(model, qflow.BiPerConfig())
    calibrate(model, x[:64])
    tracker = OscillationTracker(model)
    binary = {layer.qflow_name for layer in binary_layers(model)}
    assert binary and binary < set(tracker.layers)  # first and last layers are QFX
    history = fit(model, x, y, epochs=2, batch_size=32, lr=1e-2, progress=False,
                  oscillation=tracker)
    assert set(history[-1]["oscillation"]["layers"]) == set(tracker.layers)
    assert all(tracker.summary()["layers"][name]["weights"] == 32 * 32 for name in binary)
    codes = {name: layer.weight_codes() for name, layer in tracker.layers.items()}
    assert all(set(codes[name].unique().tolist()) <= {-1, 1} for name in binary)


def test_quantize_saves_it_in_metrics_and_prints_it(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["quantize", "--epochs", "1", "--qat-epochs", "2", "--quiet",
                     "--out", str(tmp_path / "run")])
    assert code == 0, err.getvalue()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    summary = metrics["oscillation"]
    assert set(summary["layers"]) == {"fc1", "fc2", "fc3"}
    assert summary["threshold"] == THRESHOLD and summary["steps"] > 0
    assert [set(r["oscillation"]["layers"]) for r in metrics["qat_history"]] == \
        [{"fc1", "fc2", "fc3"}] * 2
    assert metrics["qat_history"][-1]["oscillation"]["fraction"] == summary["fraction"]
    assert "oscillation" not in metrics["float_history"][-1]
    assert f"oscillating weights: {100 * summary['fraction']:.1f} %" in out.getvalue()
