"""Pattern: a conv net ending in conv -> relu -> flatten -> linear (no pooling)."""

from torch import nn


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 10),
    )
