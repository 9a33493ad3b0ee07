"""Pattern: a plain, unnamed nn.Sequential MLP (children "0", "1", ... as in tutorials)."""

from torch import nn


def build() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
