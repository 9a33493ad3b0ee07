"""A small training loop for users without one: ``fit`` and ``evaluate``."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn


def seed_everything(seed: int) -> None:
    """Seed torch and numpy so that the same seed gives the same run."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed on 64-bit systems


@functools.cache
def keep_freed_memory(trim_threshold: int = 64 << 20) -> bool:
    """Let glibc keep up to ``trim_threshold`` bytes of freed heap memory for reuse.

    A training step allocates and frees the same large tensors every time. By default
    glibc hands freed memory at the top of its heap back to the system once a few MiB lie
    free there, and the next step takes it back at one page fault per 4 KiB page: on a
    virtual machine that can cost as much as the step's arithmetic, and it varies from
    run to run with the heap's history. This sets glibc's mmap threshold to 32 MiB and its
    trim threshold to ``trim_threshold`` for the whole process (at most that much freed
    memory stays with the process). :func:`fit` calls it. Returns False, changing
    nothing, where the C library is not glibc.

    >>> keep_freed_memory() in (True, False)
    True
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def evaluate(model: nn.Module, x, y, *, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent, with the model in eval mode (exact quantized path)."""
    model.eval()
    x_t, y_t = torch.as_tensor(x), torch.as_tensor(y)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x_t), batch_size):
            logits = model(x_t[start:start + batch_size])
            correct += int((logits.argmax(dim=1) == y_t[start:start + batch_size]).sum())
    return 100.0 * correct / len(x_t)


def calibrate(model: nn.Module, x) -> None:
    """Run one eval-mode forward pass on (training) data ``x`` so that every quantizer
    starts from it, without touching BatchNorm statistics."""
    model.eval()
    with torch.no_grad():
        model(torch.as_tensor(x, dtype=torch.float32))


def fit(
    model: nn.Module,
    x_train,
    y_train,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    x_val=None,
    y_val=None,
    progress: bool = True,
    description: str = "train",
) -> list[dict]:
    """Train ``model`` (float or QFX) with Adam and cross-entropy; one dict per epoch.

    The learning rate follows a cosine schedule to zero. Shuffling is seeded by ``seed``.
    Calls :func:`keep_freed_memory` first (steadier and faster steps on the CPU).

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(2, 2)
    >>> x = torch.randn(64, 2); y = (x[:, 0] > 0).long()
    >>> history = fit(model, x, y, epochs=2, progress=False)
    >>> sorted(history[-1])
    ['epoch', 'loss', 'lr']
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    keep_freed_memory()
    x_t = torch.as_tensor(x_train, dtype=torch.float32)
    y_t = torch.as_tensor(y_train, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, (len(x_t) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch or 1)
    loss_fn = nn.CrossEntropyLoss()
    history: list[dict] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, console=None, transient=False,
                  redirect_stdout=False) as bar:
        task = bar.add_task(description, total=epochs, loss=float("nan"))
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(x_t), generator=gen)
            total, count = 0.0, 0
            for start in range(0, len(x_t), batch_size):
                idx = order[start:start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x_t[idx]), y_t[idx])
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            record = {"epoch": epoch + 1, "loss": total / count, "lr": schedule.get_last_lr()[0]}
            if x_val is not None:
                record["val_accuracy"] = evaluate(model, x_val, y_val)
            history.append(record)
            bar.update(task, advance=1, loss=record["loss"])
    if progress:
        sys.stderr.flush()
    return history
