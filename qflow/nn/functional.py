"""Float building blocks that torch lacks as modules, so that ``quantize_`` can swap them."""

from __future__ import annotations

import torch
from torch import nn

from qflow import distributed


class Add(nn.Module):
    """Element-wise ``a + b`` as a module (a residual add); quantized to :class:`QAdd`.

    >>> import torch
    >>> Add()(torch.ones(2), torch.ones(2)).tolist()
    [2.0, 2.0]
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


def exact_dtype(x: torch.Tensor, module: nn.Module) -> torch.dtype:
    """float64 in eval mode (exact for accumulators up to 53 bits), the input's dtype in training.

    Training runs in float32 for speed; it is exact while values stay within 24
    significant bits. Evaluation must equal the integer emulator bit for bit, so it
    runs in float64.
    """
    return x.dtype if module.training else torch.float64


def update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean, var_biased, count: int):
    """Update ``bn``'s running statistics as torch's own BatchNorm does."""
    if not bn.track_running_stats:
        return
    with torch.no_grad():
        bn.num_batches_tracked += 1
        momentum = bn.momentum
        if momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
        unbiased = var_biased * (count / max(count - 1, 1))
        bn.running_mean.mul_(1 - momentum).add_(mean * momentum)  # no_grad: no detach
        bn.running_var.mul_(1 - momentum).add_(unbiased * momentum)


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of each channel (dimension 1) over all other dimensions.

    Two passes (the mean, then the squares of the centred values), with autograd. On
    the CPU this is several times faster than ``torch.var_mean`` or the statistics of
    torch's training BatchNorm for small feature maps, and as accurate.

    >>> import torch
    >>> mean, var = channel_moments(torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]]))
    >>> mean.tolist(), var.tolist()
    ([4.0], [5.0])
    """
    mean, var, _ = batch_moments(x, synced=False)
    return mean, var


def batch_moments(x: torch.Tensor, *, synced: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`channel_moments` and the number of values per channel; ``synced``: over
    the whole batch of a data-parallel group (:mod:`qflow.distributed`: the sums, and
    with them the gradient, go over every process's share)."""
    n = x.numel() // x.shape[1]
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    sums = flat.sum(2).sum(0)
    if synced and distributed.active():
        total = distributed.summed(torch.cat([sums, sums.new_tensor([n])]))
        n, sums = int(total[-1]), total[:-1]
        mean = sums / n
        centered = flat - mean[:, None]
        return mean, distributed.summed(torch.linalg.vecdot(centered, centered).sum(0)) / n, n
    mean = sums / n
    centered = flat - mean[:, None]
    return mean, torch.linalg.vecdot(centered, centered).sum(0) / n, n


def batch_statistics(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor):
    """Mean and (biased) variance per channel: from the batch in training (the whole
    batch of a data-parallel group), else running."""
    if bn.training or not bn.track_running_stats:
        mean, var, count = batch_moments(x, synced=bn.training)
        if bn.training:
            update_running_stats(bn, mean, var, count)
        return mean, var
    return bn.running_mean, bn.running_var


def batchnorm_scale_shift(bn: nn.modules.batchnorm._BatchNorm, mean, var, dtype):
    """Per-channel ``scale, shift`` with ``bn(x) == x * scale + shift``."""
    return scale_shift_from_invstd(bn, mean, torch.rsqrt(var.to(dtype) + bn.eps), dtype)


def scale_shift_from_invstd(bn: nn.modules.batchnorm._BatchNorm, mean, invstd, dtype):
    """:func:`batchnorm_scale_shift` given ``invstd = 1 / sqrt(var + eps)`` in ``dtype``."""
    mean = mean.to(dtype)
    if bn.affine:
        scale = bn.weight.to(dtype) * invstd
        shift = bn.bias.to(dtype) - mean * scale
    else:
        scale, shift = invstd, -mean * invstd
    return scale, shift

