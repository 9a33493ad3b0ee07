"""Built-in float models. ``qflow.quantize_`` turns them into QFX models."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from qflow.nn import Add


def digits_mlp() -> nn.Module:
    """MLP for 8x8 digits: 64 -> 64 -> 32 -> 10."""
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64, 64)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(64, 32)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(32, 10)),
    ]))


class DigitsCNN(nn.Module):
    """Small CNN for 1x8x8 digits with BatchNorm, a residual block and pooling."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stem_relu = nn.ReLU()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.add = Add()
        self.relu2 = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.stem_relu(self.stem_bn(self.stem(x)))
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = self.relu2(self.add(x, y))
        x = self.pool(x)
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(self.flatten(self.gap(x)))


def digits_cnn() -> nn.Module:
    return DigitsCNN()


def jet_mlp() -> nn.Module:
    """16 -> 64 -> 32 -> 32 -> 5, the shape of hls4ml's jet-tagging benchmark."""
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(16, 64)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(64, 32)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(32, 32)), ("relu3", nn.ReLU()),
        ("fc4", nn.Linear(32, 5)),
    ]))
