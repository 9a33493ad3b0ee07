"""Pattern: an MLP with BatchNorm1d between linear layers (unnamed Sequential)."""

from torch import nn


def build() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 10),
    )
