"""Folded BatchNorm trains like BatchNorm: gradients flow through the batch statistics."""

import copy
import dataclasses

import torch
from torch import nn

import qflow
from qflow.config import QuantSpec


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_folded_gradients_match_float_batchnorm():
    torch.manual_seed(0)
    float_model = ConvBN().train()
    # 24-bit weights and outputs: quantization is nearly the identity, so the folded
    # layer's gradients must be those of conv + BatchNorm in training mode
    wide = QuantSpec(bits=24, signed=True)
    config = dataclasses.replace(qflow.QFXConfig(fold_batchnorm=True), weight=wide,
                                 bias=wide, intermediate=wide, activation=wide, input=wide)
    folded = qflow.quantize_(copy.deepcopy(float_model), config).train()
    x = torch.randn(16, 3, 6, 6) * 2
    target = torch.randn(16, 4, 6, 6)
    grads = []
    for model in (float_model, folded):
        model.zero_grad()
        loss = ((model(x).float() - target) ** 2).mean()
        loss.backward()
        grads.append(model.conv.weight.grad.clone())
    rel = (grads[0] - grads[1]).norm() / grads[0].norm()
    assert rel < 1e-2, f"folded gradient differs from BatchNorm's by {rel:.3f}"
