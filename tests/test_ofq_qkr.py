"""Query-key reparameterization: attentions written as users write them become one C×C
layer per head with the same float scores (up to the row constants softmax ignores),
OFQ quantizes and anneals those layers, and the config reads old runs without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qflow
from qflow.cli.main import main
from qflow.errors import ConfigError
from qflow.ofq import OFQConfig
from qflow.ofq.cga import ConfidenceGuidedAnnealing
from qflow.ofq.layers import StatsQLinear
from qflow.ofq.qkr import reparameterize_qk
from qflow.zoo import MODELS


class ScaledAttention(nn.Module):
    """One head, torch.matmul, transpose(-2, -1), a scale, torch.softmax; the k output
    also read elsewhere (so k stays), biases on q and k."""

    def __init__(self, dim=12):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.scale = dim ** -0.5

    def forward(self, x):
        k = self.key(x)
        scores = torch.matmul(self.query(x), k.transpose(-2, -1)) * self.scale
        return torch.softmax(scores, dim=-1) @ self.value(x) + k


class RawScores(nn.Module):
    """q @ kᵀ returned as it is: the k bias matters, so nothing is rewritten."""

    def __init__(self, dim=8):
        super().__init__()
        self.q, self.k = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.q(x) @ self.k(x).transpose(1, 2)


def test_user_attention_keeps_its_float_output():
    torch.manual_seed(0)
    model = ScaledAttention()
    with torch.no_grad():  # biases large enough that a wrong bias term would show
        model.query.bias.normal_(0, 2)
        model.key.bias.normal_(0, 2)
    x = torch.randn(3, 7, 12)
    before = model(x)
    assert reparameterize_qk(model) == {"querykey_0": 12}
    assert not hasattr(model, "query") and hasattr(model, "key")  # k is still read
    assert torch.allclose(model(x), before, atol=1e-5)
    assert model.querykey_0.weight.shape == (12, 12)


def test_scores_not_read_by_a_softmax_are_left_alone():
    model = RawScores()
    x = torch.randn(2, 5, 8)
    before = model(x)
    assert reparameterize_qk(model) == {}
    assert hasattr(model, "q") and hasattr(model, "k")
    assert torch.equal(model(x), before)


def test_tiny_vit_heads_become_statsq_layers():
    torch.manual_seed(0)
    model = MODELS["tiny-vit"].factory().eval()
    x = torch.rand(4, 1, 8, 8)
    float_model = MODELS["tiny-vit"].factory().eval()
    float_model.load_state_dict(model.state_dict())
    assert reparameterize_qk(float_model) == {f"blocks.{b}.attn.qk_{h}": 16
                                              for b in (0, 1) for h in (0, 1)}
    with torch.no_grad():
        assert torch.allclose(float_model(x), model(x), atol=1e-5)
    qflow.quantize_(model, OFQConfig(weight_bits=2))
    attn = model.blocks[0].attn
    assert not hasattr(attn, "q") and not hasattr(attn, "k")
    assert isinstance(attn.qk_0, StatsQLinear) and attn.qk_0.bits == 2
    assert attn.qk_0.weight.shape == (32, 32)  # C × C per head (C = 32, d = 16)
    cga = ConfidenceGuidedAnnealing(model)
    assert {"blocks.0.attn.qk_0", "blocks.1.attn.qk_1"} <= set(cga.layers)
    # qkr off: q and k stay, quantized separately
    plain = qflow.quantize_(MODELS["tiny-vit"].factory(), OFQConfig(weight_bits=2, qkr=False))
    assert isinstance(plain.blocks[0].attn.q, StatsQLinear)
    assert not hasattr(plain.blocks[0].attn, "qk_0")


def test_overrides_name_the_qk_layers_and_errors_leave_the_model_alone():
    model = MODELS["tiny-vit"].factory()
    qflow.quantize_(model, OFQConfig(weight_bits=2,
                                     overrides={r".*\.qk_1": {"weight_bits": 4}}))
    assert model.blocks[0].attn.qk_1.bits == 4 and model.blocks[0].attn.qk_0.bits == 2
    fresh = MODELS["tiny-vit"].factory()
    with pytest.raises(ConfigError, match="no_such_layer"):
        qflow.quantize_(fresh, OFQConfig(overrides={"no_such_layer": {"weight_bits": 4}}))
    assert hasattr(fresh.blocks[0].attn, "q") and not hasattr(fresh.blocks[0].attn, "qk_0")


def test_config_field_and_version_one_runs():
    assert OFQConfig().qkr is True
    cfg = OFQConfig(qkr=False)
    assert OFQConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["version"] == 3
    # a run written before QKR existed rebuilds the model it trained: no QKR
    assert OFQConfig.from_dict({"version": 1, "weight_bits": 2}).qkr is False
    assert OFQConfig.from_dict({"version": 2}).qkr is True
    # and one written before learned activation scales, QFX activations
    assert OFQConfig.from_dict({"version": 2}).act_quantizer == "qfx"
    with pytest.raises(ConfigError, match=r"config\.qkr: expected true or false, got 'yes'"):
        OFQConfig.from_dict({"qkr": "yes"})


def test_functional_softmax_method_form_matches():
    class MethodForm(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)

        def forward(self, x):
            return F.softmax(self.q(x).matmul(self.k(x).transpose(2, 1)) / 4.0, dim=2)

    model = MethodForm()
    x = torch.randn(2, 3, 6)
    before = model(x)
    assert reparameterize_qk(model) == {"qk_0": 6}
    assert model.qk_0.bias is None
    assert torch.allclose(model(x), before, atol=1e-6)


RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tiny_vit_recipes_load_with_their_width(bits):
    config = OFQConfig.from_yaml((RECIPES / f"ofq-tiny-vit-w{bits}.yaml").read_text())
    # every field spelled out: the defaults, but BR a tenth of the paper's (docs/ofq.md)
    assert config == OFQConfig(weight_bits=bits, cga_br=0.0005)


def test_three_bit_recipe_runs_through_the_command_line(tmp_path):
    run = tmp_path / "run"
    assert main(["quantize", "--model", "tiny-vit", "--recipe",
                 str(RECIPES / "ofq-tiny-vit-w3.yaml"), "--epochs", "1", "--qat-epochs", "1",
                 "--quiet", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["method"], config["weight_bits"], config["qkr"]) == ("ofq", 3, True)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert "blocks.0.attn.qk_0.weight" in state and "blocks.0.attn.q.weight" not in state


def test_a_mode_dependent_attention_is_refused():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            scores = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1)
            return scores * 0.5 if self.training else scores

    model = Noisy()
    with pytest.raises(ConfigError, match=r"qkr: the forward of the model \(Noisy\) differs "
                                          r"between training and evaluation mode"):
        reparameterize_qk(model)
    assert hasattr(model, "q")
