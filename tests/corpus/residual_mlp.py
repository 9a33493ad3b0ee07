"""Pattern: an MLP with a functional skip connection, `x + self.fc2(F.relu(self.fc1(x)))`."""

import torch.nn.functional as F
from torch import nn


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 24)
        self.fc1 = nn.Linear(24, 24)
        self.fc2 = nn.Linear(24, 24)
        self.out = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.inp(x))
        x = x + self.fc2(F.relu(self.fc1(x)))
        return self.out(F.relu(x))


def build() -> nn.Module:
    return ResidualMLP()
