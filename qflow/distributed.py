"""Data-parallel training with ``torch.distributed``: the process group as qflow sees it.

``torchrun --nproc-per-node N -m qflow quantize ...`` (or ``qflow quantize --nproc N``)
starts N processes; :func:`start` joins them into one group (gloo on the CPU, nccl on
CUDA) and :func:`qflow.train.fit` wraps the model in ``DistributedDataParallel``. Each
process takes its share of every global batch; what depends on a whole batch is summed
over the group, so that N processes at global batch B compute what one process computes
at batch B (up to float rounding):

- gradients: DDP averages them; :func:`qflow.train.fit` weighs each process's loss by
  its share of the batch;
- BatchNorm batch statistics and their gradient (QAT BatchNorm, BatchNorm folded into
  QFX weights, BiPer's BatchNorm): :func:`summed` in :func:`qflow.nn.functional.channel_moments`
  and the training BatchNorm's backward;
- static input ranges (:class:`qflow.quantizers.scaled.InputScale`): the peak over the
  group;
- the gradient scale of activation quantizers (1/√(values · Q), LSQ's, which counts the
  batch): :func:`whole_batch` inside :func:`batch_share`.

Calibration runs on the same samples in every process, so every quantizer starts the
same. Outside a group of two or more, every function here is a no-op.

>>> world_size(), rank(), is_main()
(1, 0, True)
>>> summed(torch.tensor([1.0, 2.0])).tolist()
[1.0, 2.0]
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch
import torch.distributed as dist

#: (this process's samples, the whole batch's) while a data-parallel step runs
_BATCH_SHARE: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "qflow_batch_share", default=None)


def active() -> bool:
    """Whether this process belongs to a group of two or more."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or no group): the process that prints and writes."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def start(device: torch.device) -> None:
    """Join the group torchrun describes in the environment (nccl for CUDA devices,
    gloo otherwise); nothing when this process was not started as one of several."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def summed(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the group, with autograd (the gradient is summed too)."""
    return _Summed.apply(x) if active() else x


class _Summed(torch.autograd.Function):
    """y = Σ_processes x. Every process's loss reads y, so the gradient of the group's
    total loss with respect to this process's x is the sum of the processes' dL/dy."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


@torch.no_grad()
def sum_(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the group, in place, without autograd; returns ``x``."""
    return _all_reduce(x, dist.ReduceOp.SUM) if active() else x


@torch.no_grad()
def max_(x: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``x`` over the group, in place; returns ``x``."""
    return _all_reduce(x, dist.ReduceOp.MAX) if active() else x


def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    """``dist.all_reduce`` in place; a CPU tensor goes through this process's GPU under
    nccl (which reduces CUDA tensors only)."""
    if x.device.type == "cpu" and dist.get_backend() == "nccl":
        on_gpu = x.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=op)
        return x.copy_(on_gpu)
    dist.all_reduce(x, op=op)
    return x


@contextlib.contextmanager
def batch_share(mine: int, whole: int):
    """Within: this process trains on ``mine`` samples of a global batch of ``whole``."""
    token = _BATCH_SHARE.set((int(mine), int(whole)))
    try:
        yield
    finally:
        _BATCH_SHARE.reset(token)


def whole_batch(numel: int, batch: int) -> int:
    """The values a per-sample tensor of ``numel`` values and ``batch`` samples would
    have in the whole global batch (:func:`batch_share`); ``numel`` outside a share or
    for another batch size.

    >>> with batch_share(48, 96):
    ...     whole_batch(48 * 10, 48), whole_batch(30, 3)
    (960, 30)
    """
    share = _BATCH_SHARE.get()
    if share is None or batch != share[0] or share[0] == 0:
        return numel
    return numel // share[0] * share[1]


def all_ok(ok: bool) -> bool:
    """Whether ``ok`` holds in every process (one all-reduce): a check that one process
    makes (rank 0's output directory) stops them all.

    >>> all_ok(True), all_ok(False)
    (True, False)
    """
    if not active():
        return bool(ok)
    return float(sum_(torch.tensor([0.0 if ok else 1.0]))[0]) == 0.0
