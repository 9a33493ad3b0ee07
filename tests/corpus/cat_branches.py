"""Pattern: two branches joined by torch.cat along channels (an Inception-style block)."""

import torch
import torch.nn.functional as F
from torch import nn


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch3 = nn.Conv2d(1, 4, 3, padding=1)
        self.branch1 = nn.Conv2d(1, 4, 1)
        self.mix = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        a = F.relu(self.branch3(x))
        b = F.relu(self.branch1(x))
        x = torch.cat([a, b], dim=1)
        x = F.relu(self.mix(x))
        return self.head(torch.flatten(x, 1))


def build() -> nn.Module:
    return TwoBranches()
