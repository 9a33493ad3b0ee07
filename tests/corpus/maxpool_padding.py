"""Pattern: max pooling with padding (kernel 3, stride 2, padding 1), as in ResNet stems."""

from torch import nn


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),  # 8x8 -> 4x4
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )
