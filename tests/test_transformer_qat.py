"""Transformer QAT layers and their freeze: ``qflow.quantize_`` on attention written as
users write it (modules and functional ops), per-layer overrides, refusals, gradients,
and the emulator's codes equal to the QAT model's eval output on every sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_fixtures import dataset

import qflow
from qflow.config import LayerOverride, QFXConfig, SpecOverride
from qflow.errors import ConfigError
from qflow.graph import Emulator
from qflow.nn import QGELU, QAddConst, QLayerNorm, QMatmul, QMean, QSoftmax
from qflow.train import calibrate, fit
from qflow.zoo import MODELS
from qflow.zoo.models import TinyViT


class ReshapeHeads(nn.Module):
    """Attention as many users write it: heads by reshape and permute, ``torch.matmul``,
    ``torch.softmax``, ``F.layer_norm`` with the module's parameters, ``F.gelu``, the
    first token taken by ``x[:, 0]``."""

    def __init__(self, dim: int = 16, heads: int = 2, tokens: int = 16):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.embed = nn.Conv2d(1, dim, 2, stride=2)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        self.ln_w = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))
        self.ln_b = nn.Parameter(0.1 * torch.randn(dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(2 * dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).permute(0, 2, 1) + self.pos
        b, t, c = x.shape
        y = F.layer_norm(x, (c,), self.ln_w, self.ln_b)
        qkv, d = self.qkv(y), self.dim
        q, k, v = (qkv[:, :, i * d:(i + 1) * d].reshape(b, t, self.heads, c // self.heads)
                   .transpose(1, 2) for i in range(3))
        p = torch.softmax(torch.matmul(q, k.transpose(-2, -1)), -1)
        y = (p @ v).transpose(1, 2).reshape(b, t, c)
        x = x + F.gelu(self.fc(y))
        return self.head(torch.cat([x[:, 0], x.mean(1)], dim=1))


def _trained(model: nn.Module, config=None) -> nn.Module:
    data = dataset("digits")
    torch.manual_seed(0)
    model = qflow.quantize_(model, config or QFXConfig.with_bits(8))
    calibrate(model, data.x_train[:256])
    fit(model, data.x_train[:256], data.y_train[:256], epochs=1, lr=1e-3, progress=False)
    return model.eval()


def _mismatching_samples(model: nn.Module, arithmetic: str = "auto") -> tuple[int, int]:
    """(samples whose emulator codes differ from the model's eval output, samples)."""
    data = dataset("digits")
    rng = np.random.default_rng(0)
    noise = rng.uniform(-0.3, 1.3, (200, 1, 8, 8)).astype(np.float32)
    x = np.concatenate([data.x_test, noise, np.zeros((1, 1, 8, 8), np.float32),
                        np.ones((1, 1, 8, 8), np.float32)])
    graph = qflow.freeze(model, torch.as_tensor(x[:4]))
    codes = Emulator(graph, arithmetic).run(x)
    with torch.no_grad():
        values = model(torch.as_tensor(x)).to(torch.float64).numpy()
    scaled = np.ldexp(values, graph.output_type.fractional)
    assert np.array_equal(scaled, np.rint(scaled)), "model outputs off the output grid"
    return int((scaled.astype(np.int64) != codes).any(axis=1).sum()), len(x)


def test_tiny_vit_swaps_every_op():
    model = qflow.quantize_(TinyViT(), QFXConfig.with_bits(8))
    counts: dict[type, int] = {}
    for module in model.modules():
        counts[type(module)] = counts.get(type(module), 0) + 1
    assert [counts.get(t, 0) for t in (QLayerNorm, QGELU, QSoftmax, QMatmul, QAddConst,
                                      QMean)] == [5, 2, 4, 8, 1, 1]
    names = {m.qflow_name for m in model.modules() if isinstance(m, QSoftmax)}
    assert names == {"blocks.0.attn.softmax", "blocks.0.attn.softmax_1",
                     "blocks.1.attn.softmax", "blocks.1.attn.softmax_1"}
    assert all(not isinstance(m, nn.LayerNorm | nn.GELU) or isinstance(m, QLayerNorm | QGELU)
               for m in model.modules())


@pytest.mark.parametrize("arithmetic", ["auto", "int64"])
def test_tiny_vit_freeze_is_exact(arithmetic):
    model = _trained(TinyViT())
    mismatching, samples = _mismatching_samples(model, arithmetic)
    print(f"tiny-vit, {arithmetic}: {mismatching} of {samples} samples differ")
    assert samples > 700 and mismatching == 0


def test_tiny_vit_mnist_builds_runs_and_freezes_exactly():
    """The 28×28 variant (4×4 patches, 49 tokens): forward on mnist5k-shaped input, 8-bit
    QAT briefly, then the emulator's codes equal the QAT model's on every sample."""
    zoo = MODELS["tiny-vit-mnist"]
    assert zoo.data == "mnist5k"
    torch.manual_seed(0)
    model = zoo.factory()
    assert model.pos.shape == (1, 49, 32)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    data = dataset("mnist5k")
    model = qflow.quantize_(model, QFXConfig.with_bits(8))
    calibrate(model, data.x_train[:128])
    fit(model, data.x_train[:128], data.y_train[:128], epochs=1, lr=1e-3, progress=False)
    model.eval()
    rng = np.random.default_rng(0)
    x = np.concatenate([data.x_test[:48], rng.uniform(-0.3, 1.3, (14, 1, 28, 28)),
                        np.zeros((1, 1, 28, 28)), np.ones((1, 1, 28, 28))]).astype(np.float32)
    graph = qflow.freeze(model, torch.as_tensor(x[:2]))
    assert sum(n.op == "softmax" for n in graph.nodes) == 4
    codes = Emulator(graph).run(x)
    with torch.no_grad():
        values = model(torch.as_tensor(x)).to(torch.float64).numpy()
    scaled = np.ldexp(values, graph.output_type.fractional)
    assert np.array_equal(scaled, np.rint(scaled)), "model outputs off the output grid"
    mismatching = int((scaled.astype(np.int64) != codes).any(axis=1).sum())
    assert mismatching == 0, f"{mismatching} of {len(x)} samples differ"


def test_functional_attention_freeze_is_exact():
    model = _trained(ReshapeHeads())
    kinds = {type(m) for m in model.modules()}
    assert {QLayerNorm, QGELU, QSoftmax, QMatmul, QAddConst, QMean} <= kinds
    graph = qflow.freeze(model, torch.zeros(2, 1, 8, 8))
    ops = [n.op for n in graph.nodes]
    for op in ("layernorm", "gelu", "softmax", "matmul", "transpose", "slice", "add_const",
               "mean", "concat"):
        assert op in ops, op
    mismatching, samples = _mismatching_samples(model)
    assert mismatching == 0, f"{mismatching} of {samples} samples differ"


def test_probabilities_keep_the_softmax_type():
    model = _trained(TinyViT())
    graph = qflow.freeze(model, torch.zeros(2, 1, 8, 8))
    for node in graph.nodes:
        if node.op == "matmul" and graph.tensors[node.inputs[0]].type.signed is False:
            producer = next(n for n in graph.nodes if n.output == node.inputs[0])
            assert producer.op == "softmax"  # no cast between them
    assert sum(n.op == "matmul" and next(p for p in graph.nodes if p.output == n.inputs[0]).op
               == "softmax" for n in graph.nodes) == 4


def test_per_layer_overrides_reach_the_new_layers():
    config = QFXConfig.with_bits(8, overrides=(
        LayerOverride(pattern="blocks.0.attn.softmax", activation=SpecOverride(bits=12)),
        LayerOverride(pattern=r"blocks\.1\.norm.*", norm_scale=SpecOverride(bits=6)),
        LayerOverride(pattern="blocks.0.mlp.1", activation=SpecOverride(bits=6)),
    ))
    model = qflow.quantize_(TinyViT(), config)
    calibrate(model, dataset("digits").x_train[:64])
    layers = dict(model.named_modules())
    assert str(layers["blocks.0.attn.softmax"].out_quant.fixed_type()) == \
        "ap_ufixed<12,0,AP_RND_CONV,AP_SAT>"
    assert layers["blocks.0.attn.softmax_1"].out_quant.fixed_type().width == 8
    assert layers["blocks.1.norm1"].gamma_quant.fixed_type().width == 6
    assert layers["blocks.0.norm1"].gamma_quant.fixed_type().width == 12
    assert layers["blocks.0.mlp.1"].out_quant.fixed_type().width == 6
    # the matmul of those probabilities takes them in the softmax's type
    assert layers["blocks.0.attn.matmul_1"].a_quant.fixed_type().width == 12
    rows = {(r.layer, r.tensor) for r in qflow.api.describe(model)}
    assert {("blocks.0.norm1", "gamma"), ("blocks.0.attn.matmul", "operand b"),
            ("add_const", "constant"), ("mean", "output")} <= rows


def test_gradients_reach_parameters_and_binary_points():
    model = qflow.quantize_(TinyViT(), QFXConfig.with_bits(8))
    data = dataset("digits")
    calibrate(model, data.x_train[:64])
    model.train()
    loss = F.cross_entropy(model(torch.as_tensor(data.x_train[:64])),
                           torch.as_tensor(data.y_train[:64]).long())
    loss.backward()
    layers = dict(model.named_modules())
    for name in ("pos", "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.q.weight",
                 "embed.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and bool(grad.abs().sum() > 0), name
    for name, attr in (("blocks.0.norm1", "out_quant"), ("blocks.0.mlp.1", "out_quant"),
                       ("blocks.0.mlp.1", "in_quant"), ("blocks.0.attn.matmul", "b_quant")):
        grad = getattr(layers[name], attr).integer_bits.grad
        assert grad is not None and bool(grad.abs().sum() > 0), (name, attr)


class _Squared(TinyViT):
    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head((x * x).mean(1))  # a product of two tensors (by a constant is fine)


class _BatchIndex(TinyViT):
    def forward(self, x):
        return self.head(self.embed(x).flatten(2).transpose(1, 2)[0])


class _BatchTranspose(TinyViT):
    def forward(self, x):
        return self.head(self.embed(x).flatten(2).transpose(0, 2).mean(1))


class _SoftmaxDtype(TinyViT):
    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(F.softmax(x, dim=-1, dtype=torch.float64).mean(1))


@pytest.mark.parametrize("model, message", [
    (_Squared, "'mul' in the model (call_function operator.mul)"),
    (_BatchIndex, "selects along the batch dim"),
    (_BatchTranspose, "moves the batch dim 0"),
    (_SoftmaxDtype, "dtype= is not supported"),
])
def test_unsupported_ops_are_refused_in_one_line(model, message):
    with pytest.raises(ConfigError) as info:
        qflow.quantize_(model(), QFXConfig())
    text = str(info.value)
    assert message in text and "\n" not in text, text
