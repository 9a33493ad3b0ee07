"""OFQ deployed: the LSQ baseline's layers (learned per-row scales, integer codes with a
fixed-point multiplier) equal their frozen graph code for code, and 2-bit OFQ tiny-vit
runs (StatsQ and LSQ weights), as a user makes them with ``qflow quantize``, export to
cpu, onnx and ultra96 and verify with 0 mismatching samples on every artifact."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import qflow
from qflow.cli.main import main
from qflow.errors import ConfigError
from qflow.ofq import OFQConfig
from qflow.ofq.lsq import LSQLinear, lsq_index, lsq_initial_scale, lsq_levels
from qflow.ofq.quantize import lsq_layers, statsq_layers
from qflow.oscillation import OscillationTracker, tracked_layers
from qflow.runs import load_run


# -- the config ----------------------------------------------------------------------
def test_weight_quantizer_round_trip_and_errors():
    cfg = OFQConfig(weight_bits=2, weight_quantizer="lsq")
    assert OFQConfig.from_json(cfg.to_json()) == cfg
    assert OFQConfig.from_yaml(cfg.to_yaml()) == cfg
    assert OFQConfig.from_dict({}).weight_quantizer == "statsq"
    for bad in ("LSQ", "pact", 1, None):
        with pytest.raises(ConfigError, match=r"config\.weight_quantizer: expected one "
                                              r"of statsq, lsq, got") as info:
            OFQConfig.from_dict({"weight_quantizer": bad})
        assert "\n" not in str(info.value)


# -- LSQ by hand -----------------------------------------------------------------------
def test_lsq_levels_codes_and_gradients_by_hand():
    w = torch.tensor([[0.3, -0.9, 0.05, 2.0, -2.0],
                      [1.0, 1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    s = torch.tensor([0.5, 0.0], requires_grad=True)
    # b = 2: codes -2..1; w/s = 0.6, -1.8, 0.1, 4 -> 1 (clamped), -4 -> -2 (clamped)
    assert lsq_index(w, s, 2).tolist() == [[1, -2, 0, 1, -2], [0, 0, 0, 0, 0]]
    q = lsq_levels(w, s, 2)
    assert q.tolist() == [[0.5, -1.0, 0.0, 0.5, -1.0], [0.0] * 5]
    q.sum().backward()
    assert w.grad[0].tolist() == [1, 1, 1, 0, 0]  # clamped weights get no gradient
    # ds: (k − w/s) inside the range, k outside, times 1/sqrt(N·Q_P) = 1/sqrt(5)
    expected = (0.4 - 0.2 - 0.1 + 1 - 2) / 5 ** 0.5
    assert abs(s.grad[0].item() - expected) < 1e-6
    # b = 3: codes -4..3; the scale is a negative step's |s|
    assert lsq_index(w.detach(), torch.tensor([-0.5, 1.0]), 3).tolist()[0] == [1, -2, 0, 3, -4]
    # Esser et al.'s initial scale, 2·mean|W|/sqrt(Q_P)
    init = lsq_initial_scale(torch.tensor([[1.0, -3.0, 2.0, 0.0]]), 4)
    assert torch.allclose(init, torch.tensor([3.0 / 7 ** 0.5]))


def test_lsq_layer_learns_its_scale_and_is_tracked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    qflow.quantize_(model, OFQConfig(weight_bits=2, weight_quantizer="lsq"))
    layer = model[3]
    assert isinstance(layer, LSQLinear) and lsq_layers(model) == [layer]
    assert statsq_layers(model) == []
    assert layer.qflow_name == "2"  # model[0] is the input quantizer
    assert "2.weight_scale" in dict(model.named_parameters())  # learned, checkpointed
    assert tracked_layers(model)["2"] is layer
    codes = layer.weight_codes()
    assert codes.dtype == torch.int16 and int(codes.min()) >= -2 and int(codes.max()) <= 1
    tracker = OscillationTracker(model)
    before = layer.weight_scale.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    model.train()
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        tracker.update()
    assert not torch.equal(layer.weight_scale.detach(), before)  # learned
    assert tracker.summary()["layers"]["2"]["weights"] == 16 * 16


def test_learned_activation_scale_trains_and_starts_from_lsq_init():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    qflow.quantize_(model, OFQConfig(weight_bits=2, act_quantizer="lsq"))
    inputs = model[3].input_quant
    assert type(model[1]).__name__ == type(model[5]).__name__ == "QLinear"  # first, last
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    model.train()
    model(x)
    with torch.no_grad():
        seen = model[2](model[1](model[0](x)))  # the layer's input: unsigned after the ReLU
    assert not bool(inputs.signed) and inputs.bits == 8
    expected = 2 * float(seen.abs().mean()) / 255 ** 0.5
    assert float(inputs.step.detach()) == pytest.approx(expected, rel=1e-6)
    assert "2.input_quant.step" in dict(model.named_parameters())  # learned, checkpointed
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = float(inputs.step.detach())
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert inputs.step.grad is not None and float(inputs.step.grad) != 0
        optimizer.step()
    assert float(inputs.step.detach()) != before


# -- tiny-vit through the command line ------------------------------------------------------
def _quantize(out, *extra):
    assert main(["quantize", "--method", "ofq", "--model", "tiny-vit", "--bits", "2",
                 "--epochs", "1", "--qat-epochs", "1", "--quiet", "--out", str(out),
                 *extra]) == 0
    return out


@pytest.fixture(scope="module")
def statsq_run(tmp_path_factory):
    return _quantize(tmp_path_factory.mktemp("ofq-statsq") / "run")


@pytest.fixture(scope="module")
def lsq_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ofq-lsq")
    recipe = root / "lsq.yaml"
    recipe.write_text("method: ofq\nweight_quantizer: lsq\nact_quantizer: lsq\n"
                      "weight_bits: 2\n")
    return _quantize(root / "run", "--recipe", str(recipe))


def _export_and_verify(run, target, out) -> set[str]:
    """Export ``run`` to ``target``, verify; the artifacts that ran (each with 0
    mismatching samples)."""
    assert main(["export", str(run), "--target", target, "--out", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] and report["mismatching_samples"] == 0
    ran = [r for r in report["results"] if r["role"] != "reference"]
    for row in ran:
        assert (row["status"], row["mismatching_samples"]) == ("ok", 0), row
        assert row["samples"] == report["samples"] > 500, row
    return {r["artifact"] for r in ran}


def test_the_run_plots_oscillation_per_layer(statsq_run):
    from matplotlib.image import imread

    history = json.loads((statsq_run / "metrics.json").read_text())["qat_history"]
    assert [r["phase"] for r in history] == ["QAT", "CGA"]
    image = imread(statsq_run / "oscillation.png")
    assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 0


def test_statsq_tiny_vit_exports_to_onnx(statsq_run, tmp_path):
    assert _export_and_verify(statsq_run, "onnx", tmp_path / "onnx") == {
        "QAT model (torch eval)", "int_onnx"}


def test_statsq_tiny_vit_exports_to_ultra96(statsq_run, tmp_path):
    # a StatsQ dense layer on tokens freezes to dense -> transpose to (features, tokens)
    # -> scale_shift (one multiplier per feature) -> cast -> transpose back; the hls4ml
    # project has no transposes there: the multipliers scale the features of the
    # (tokens, features) tensor, hls4ml's last axis
    out = tmp_path / "ultra96"
    assert _export_and_verify(statsq_run, "ultra96", out) == {
        "QAT model (torch eval)", "int_onnx", "hls_csim"}
    report = json.loads((out / "report.json").read_text())
    # QKR: 4 heads (2 blocks × 2), each a 32×32 layer on 16 tokens where q and k had d = 16
    tokens, dim, d, heads = 16, 32, 16, 4
    qkr, plain = (heads * (tokens * dim * dim + tokens * tokens * dim),
                  heads * (2 * tokens * d * dim + tokens * tokens * d))
    assert report["estimate"]["notes"] == [
        f"QKR: 4 heads as 32×32 (head width 16) products: {qkr:,} multiplications per "
        f"sample for the attention scores, where separate q and k take {plain:,} "
        f"({qkr - plain:+,})"]
    layers = report["layers"]
    classes = [(row["qgraph_node"], row["class"]) for row in layers]
    at = classes.index(("blocks_0_attn_qk_0", "PointwiseConv1D"))
    assert classes[at + 1:at + 3] == [("blocks_0_attn_qk_0_scale_shift", "BatchNormalization"),
                                      ("blocks_0_attn_qk_0_cast", "Activation")]
    assert "Transpose" not in {cls for _, cls in classes[at:at + 3]}


def test_lsq_tiny_vit_exports_to_cpu(lsq_run, tmp_path):
    config = json.loads((lsq_run / "config.json").read_text())
    assert config["weight_quantizer"] == "lsq" and config["weight_bits"] == 2
    assert config["act_quantizer"] == "lsq"
    artifacts = _export_and_verify(lsq_run, "cpu", tmp_path / "cpu")
    assert artifacts == {"QAT model (torch eval)", "int_onnx", "tvm"}


def test_learned_activation_scales_export_to_ultra96(lsq_run, tmp_path):
    # every LSQ layer's input codes: a scale_shift (the multiplier) and a cast to an
    # 8-bit integer type, on tokens too, through hls4ml's C simulation
    out = tmp_path / "ultra96"
    assert _export_and_verify(lsq_run, "ultra96", out) == {
        "QAT model (torch eval)", "int_onnx", "hls_csim"}
    nodes = [row["qgraph_node"] for row in json.loads((out / "report.json").read_text())[
        "layers"]]
    assert sum(n.endswith("_input_codes") for n in nodes) == 12  # the 12 LSQ layers


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ofq-token")
    recipe = root / "token.yaml"
    recipe.write_text("method: ofq\nact_quantizer: lsq_token\nweight_bits: 2\n")
    return _quantize(root / "run", "--recipe", str(recipe))


def test_per_token_activation_scales_export_to_ultra96(token_run, tmp_path):
    # StatsQ layers whose inputs have one learned scale per token: per-token input
    # multipliers, and per-token multipliers of the accumulator (the inverse scales,
    # rounded to their own type) before each feature's; hls4ml turns the tokens to its
    # last axis and back around them
    model, _ = load_run(token_run)
    scales = [m.input_quant for m in statsq_layers(model)]
    assert scales and all(s.tokens and s.step.numel() == 16 for s in scales)
    assert all(len(set(s.step.detach().tolist())) > 1 for s in scales)  # learned apart
    out = tmp_path / "ultra96"
    assert _export_and_verify(token_run, "ultra96", out) == {
        "QAT model (torch eval)", "int_onnx", "hls_csim"}
    nodes = [row["qgraph_node"] for row in json.loads((out / "report.json").read_text())[
        "layers"]]
    assert sum(n.endswith("_token_codes") for n in nodes) == len(scales)


def test_per_token_activation_scales_export_to_cpu(token_run, tmp_path):
    assert _export_and_verify(token_run, "cpu", tmp_path / "cpu") == {
        "QAT model (torch eval)", "int_onnx", "tvm"}
