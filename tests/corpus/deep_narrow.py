"""Pattern: a deep, narrow net (12 linear layers of width 8), built in a loop."""

from torch import nn


def build() -> nn.Module:
    layers = [nn.Flatten(), nn.Linear(64, 8), nn.ReLU()]
    for _ in range(10):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    layers.append(nn.Linear(8, 10))
    return nn.Sequential(*layers)
