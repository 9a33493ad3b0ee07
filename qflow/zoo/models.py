"""Built-in float models. ``qflow.quantize_`` turns them into QFX models."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from qflow.nn import Add


def digits_mlp() -> nn.Module:
    """MLP for 8x8 digits: 64 -> 64 -> 32 -> 10."""
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64, 64)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(64, 32)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(32, 10)),
    ]))


class DigitsCNN(nn.Module):
    """Small CNN for 1x8x8 digits with BatchNorm, a residual block and pooling."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stem_relu = nn.ReLU()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.add = Add()
        self.relu2 = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.stem_relu(self.stem_bn(self.stem(x)))
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = self.relu2(self.add(x, y))
        x = self.pool(x)
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(self.flatten(self.gap(x)))


def digits_cnn() -> nn.Module:
    return DigitsCNN()


def jet_mlp() -> nn.Module:
    """16 -> 64 -> 32 -> 32 -> 5, the shape of hls4ml's jet-tagging benchmark."""
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(16, 64)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(64, 32)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(32, 32)), ("relu3", nn.ReLU()),
        ("fc4", nn.Linear(32, 5)),
    ]))


class ResNet8(nn.Module):
    """The MLPerf Tiny image-classification network (ResNet-8 for 3x32x32 images): a
    3x3 stem of 16 channels, three residual stacks of 16, 32 and 64 channels (the last
    two downsample by a strided 3x3 convolution, with a strided 1x1 convolution on the
    shortcut), global average pooling and a dense layer. Written as users write it:
    functional ReLU and ``+`` in ``forward``."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.stacks = nn.ModuleList()
        for cin, cout, stride in ((16, 16, 1), (16, 32, 2), (32, 64, 2)):
            stack = nn.Module()
            stack.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            stack.bn1 = nn.BatchNorm2d(cout)
            stack.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            stack.bn2 = nn.BatchNorm2d(cout)
            if stride != 1:
                stack.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                stack.shortcut_bn = nn.BatchNorm2d(cout)
            self.stacks.append(stack)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        for stack in self.stacks:
            y = F.relu(stack.bn1(stack.conv1(x)))
            y = stack.bn2(stack.conv2(y))
            if hasattr(stack, "shortcut"):
                x = stack.shortcut_bn(stack.shortcut(x))
            x = F.relu(x + y)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def resnet8() -> nn.Module:
    return ResNet8()


class ResidualBlock(nn.Module):
    """``x + BN(conv3x3(relu(x)))``, a pre-activation residual block. With BiPer it is
    a Bi-Real block ``x + BN(binconv(sign(x)))``: the convolution becomes binary and its
    sign takes the ReLU's place; the shortcut keeps ``x`` in fixed point."""

    def __init__(self, width: int):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.add = Add()

    def forward(self, x):
        return self.add(x, self.bn(self.conv(self.relu(x))))


class BinaryCNN(nn.Module):
    """CNN for 1-channel images of any size (8x8 digits, 28x28 MNIST), made for BiPer:
    a fixed-point stem (conv, BatchNorm; the first block's ReLU follows), residual
    blocks whose 3x3 convolutions become binary, 2x2 max pooling between two groups of
    blocks, global average pooling and a fixed-point linear classifier.

    >>> import torch
    >>> BinaryCNN()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, width: int = 32, blocks: tuple[int, int] = (2, 2), classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.group1 = nn.Sequential(*(ResidualBlock(width) for _ in range(blocks[0])))
        self.pool = nn.MaxPool2d(2)
        self.group2 = nn.Sequential(*(ResidualBlock(width) for _ in range(blocks[1])))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem_bn(self.stem(x))
        x = self.group2(self.pool(self.group1(x)))
        return self.fc(self.flatten(self.gap(x)))


def binary_cnn() -> nn.Module:
    return BinaryCNN()


def binary_mlp(in_features: int = 64, width: int = 128, blocks: int = 2,
               classes: int = 10) -> nn.Module:
    """MLP for 8x8 digits made for BiPer: a fixed-point input layer with BatchNorm,
    ``blocks`` ReLU + linear + BatchNorm blocks whose linear layers become binary (their
    sign takes the ReLU's place), a ReLU and a fixed-point classifier.

    >>> import torch
    >>> binary_mlp()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    layers = [("flatten", nn.Flatten()), ("fc_in", nn.Linear(in_features, width)),
              ("bn_in", nn.BatchNorm1d(width))]
    for i in range(1, blocks + 1):
        layers += [(f"relu{i}", nn.ReLU()), (f"fc{i}", nn.Linear(width, width, bias=False)),
                   (f"bn{i}", nn.BatchNorm1d(width))]
    layers += [("relu_out", nn.ReLU()), ("fc_out", nn.Linear(width, classes))]
    return nn.Sequential(OrderedDict(layers))


class Attention(nn.Module):
    """Multi-head self-attention written as users write it: q, k and v linear layers,
    the heads sliced from them, ``softmax(q @ kᵀ) @ v`` per head, the heads joined by
    ``torch.cat`` and projected. The ``1/sqrt(d)`` scale of the scores is left to the
    q projection to learn (a product by a constant has no QGraph op)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        heads = []
        for h in range(self.heads):
            part = slice(h * self.head_dim, (h + 1) * self.head_dim)
            scores = q[:, :, part] @ k[:, :, part].transpose(1, 2)
            heads.append(F.softmax(scores, dim=-1) @ v[:, :, part])
        return self.drop(self.proj(torch.cat(heads, dim=-1)))


class Block(nn.Module):
    """A pre-LN transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))`` with a
    GELU MLP; dropout after the attention and inside the MLP (qflow.freeze removes it)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2, dropout: float = 0.2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A vision transformer for small 1-channel images: a ``patch``×``patch`` convolution
    with stride ``patch`` as the patch embedding (8×8 digits, 2×2 patches: 16 tokens), a
    learned position embedding, pre-LN blocks, a mean over the tokens, a LayerNorm and a
    linear classifier. Dropout 0.2 keeps it from overfitting the 1257 training digits
    (float test accuracy 96.3 to 96.7 % over three seeds at 60 epochs, learning rate
    2e-3; 93 to 94 % without).

    >>> import torch
    >>> TinyViT()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, image: int = 8, patch: int = 2, dim: int = 32, heads: int = 2,
                 blocks: int = 2, classes: int = 10):
        super().__init__()
        tokens = (image // patch) ** 2
        self.embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(blocks)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # (batch, tokens, dim)
        x = self.blocks(x + self.pos)
        return self.head(self.norm(x.mean(dim=1)))


def tiny_vit() -> nn.Module:
    return TinyViT()


def tiny_vit_mnist() -> nn.Module:
    """TinyViT for 28×28 MNIST: 4×4 patches, 49 tokens, otherwise as :func:`tiny_vit`.

    >>> import torch
    >>> tiny_vit_mnist()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    return TinyViT(image=28, patch=4)
