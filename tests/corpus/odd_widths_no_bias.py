"""Pattern: bias=False layers and odd widths (29 -> 13 -> 7 -> 3), unnamed Sequential."""

from torch import nn


def build() -> nn.Module:
    return nn.Sequential(
        nn.Linear(29, 13, bias=False), nn.ReLU(),
        nn.Linear(13, 7, bias=False), nn.ReLU(),
        nn.Linear(7, 3),
    )
