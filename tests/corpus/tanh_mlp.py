"""Pattern: a layer qflow has no exact fixed-point form for (Tanh): refused by name."""

from torch import nn


def build() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
