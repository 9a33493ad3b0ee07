"""Pattern: raw sensor-style inputs of about +-1e3 (no normalization), a small MLP."""

from torch import nn


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(),
                         nn.Linear(12, 4))
