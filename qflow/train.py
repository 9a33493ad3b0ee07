"""A small training loop for users without one: ``fit`` and ``evaluate``."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from qflow import distributed
from qflow.errors import QflowError
from qflow.nn.functional import batch_moments, update_running_stats
from qflow.zoo.data import Rows

if TYPE_CHECKING:
    from qflow.oscillation import OscillationTracker


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
    y_t = torch.as_tensor(y)
    device = _device_of(model)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y_t), batch_size):  # x read a batch at a time
            batch = rows_tensor(x[start:start + batch_size])
            logits = model(batch.to(device)).cpu()
            correct += int((logits.argmax(dim=1) == y_t[start:start + batch_size]).sum())
    return 100.0 * correct / len(y_t)


def calibrate(model: nn.Module, x) -> None:
    """Run one eval-mode forward pass on (training) data ``x`` so that every quantizer
    starts from it, without touching BatchNorm statistics.

    The model is left in the mode it was in (training or eval), module by module: a
    training loop that follows keeps training with batch statistics and the fast
    training path.

    >>> import torch, qflow
    >>> model = qflow.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 2)))
    >>> calibrate(model.train(), torch.rand(16, 4))
    >>> model.training, model.qflow_input.quant.is_initialized
    (True, True)
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(rows_tensor(x, torch.float32).to(_device_of(model)))
    finally:
        for module, training in modes.items():
            module.training = training


class TrainingDivergedError(QflowError, FloatingPointError):
    """The training loss became NaN or infinite (the data's scale or the learning rate)."""


#: the learning-rate schedules of :func:`fit`
LR_SCHEDULES = ("cosine", "constant")


class StepHook(Protocol):
    """What :func:`fit` calls around every optimizer step (``step_hook``): a training
    constraint such as OFQ's confidence-guided annealing (:mod:`qflow.ofq.cga`).

    ``before_step()`` runs after the backward pass (gradients are set),
    ``after_step()`` right after ``optimizer.step()`` (before the learning-rate schedule
    and the oscillation tracker); ``epoch_record()`` is stored in each epoch's history row
    under ``key``. A hook keeps no state that must survive a checkpoint."""

    key: str

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def epoch_record(self) -> dict: ...


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor,
                      teacher_logits: torch.Tensor, *, alpha: float,
                      temperature: float) -> torch.Tensor:
    """(1 − α)·CE(logits, labels) + α·T²·KL(softmax(teacher/T) ‖ softmax(logits/T)).

    Cross-entropy and KL are means over the batch (KL summed over the classes); the
    teacher's logits carry no gradient.

    >>> x = torch.tensor([[2.0, 0.0]]); y = torch.tensor([0])
    >>> float(distillation_loss(x, y, x, alpha=1.0, temperature=2.0))
    0.0
    """
    hard = F.cross_entropy(logits, labels)
    if alpha == 0:
        return hard
    t = float(temperature)
    soft = F.kl_div(F.log_softmax(logits / t, dim=1),
                    F.log_softmax(teacher_logits.detach() / t, dim=1),
                    reduction="batchmean", log_target=True)
    return (1 - alpha) * hard + alpha * t * t * soft


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
    checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
    oscillation: OscillationTracker | None = None,
    lr_schedule: str = "cosine",
    step_hook: StepHook | None = None,
    teacher: nn.Module | None = None,
    distill_alpha: float = 0.5,
    temperature: float = 1.0,
    workers: int = 0,
    log=None,
) -> list[dict]:
    """Train ``model`` (float or QFX) with Adam and cross-entropy; one dict per epoch.

    The learning rate follows a cosine schedule to zero (``lr_schedule="cosine"``) or
    stays at ``lr`` (``"constant"``). Shuffling is seeded by ``seed``.
    Calls :func:`keep_freed_memory` first (steadier and faster steps on the CPU).

    ``checkpoint``, when given, is called after every epoch with the complete training
    state (a dict of tensors and plain values: epoch, history, model, optimizer,
    scheduler, shuffling generator and torch's random state; save it with ``torch.save``,
    it loads with ``weights_only=True``). Passing such a dict back as ``resume`` continues
    from that epoch: the result equals an uninterrupted run's, tensor for tensor.
    A NaN or infinite loss raises :class:`TrainingDivergedError`. ``regularizer(model)``,
    when given, is added to every step's loss (and to the loss recorded).
    ``oscillation`` (a :class:`qflow.oscillation.OscillationTracker` of ``model``), when
    given, is updated after every optimizer step; each epoch's row then holds its
    ``epoch_record()`` under ``"oscillation"``, and its state travels with the checkpoint.
    ``step_hook`` (a :class:`StepHook`), when given, runs around every optimizer step and
    its ``epoch_record()`` goes into each row under its ``key``.
    ``teacher`` (a model put in eval mode and run without gradients), when given, makes
    the loss :func:`distillation_loss` with ``distill_alpha`` (α) and ``temperature``
    (T); without it the loss is plain cross-entropy.
    ``log`` (a :class:`qflow.training_log.TensorBoardLog`), when given, gets every
    epoch's row under the phase name ``description``, with the model.
    ``x_val`` and ``y_val``, when given, are evaluated after every epoch (eval mode, the
    exact quantized path; the model goes back to training mode after), and each row
    holds the top-1 accuracy in percent under ``"val_accuracy"``.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(2, 2)
    >>> x = torch.randn(64, 2); y = (x[:, 0] > 0).long()
    >>> history = fit(model, x, y, epochs=2, progress=False)
    >>> sorted(history[-1])
    ['epoch', 'loss', 'lr']

    ``x_train`` may be an array in memory, a memory map or :class:`qflow.zoo.data.Rows`
    (a torch ``Dataset``'s inputs, read on demand): the last two are read a batch at a
    time, by ``workers`` background processes when ``workers`` > 0 (torch's
    ``DataLoader``); the batches are the same either way.

    In a data-parallel group (:mod:`qflow.distributed`, processes started by torchrun)
    the model trains as ``DistributedDataParallel``: every process draws the same order,
    takes its share of each global batch of ``batch_size`` samples and weighs its loss
    by that share, so the averaged gradients are the whole batch's; BatchNorm statistics
    are the whole batch's too. The result equals one process's up to float rounding,
    except that a last batch with fewer samples than processes is skipped and random
    layers (dropout) draw differently. Only rank 0 shows progress and calls
    ``checkpoint``; the recorded loss is the whole batch's.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if teacher is not None:
        if not 0 <= distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1], got {distill_alpha}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        teacher.eval()
    keep_freed_memory()
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    lazy = isinstance(x_train, np.memmap | Rows)  # read a batch at a time
    x_t = x_train if lazy else torch.as_tensor(x_train, dtype=torch.float32)
    y_t = torch.as_tensor(np.asarray(y_train), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    device = _device_of(model)
    world, me = distributed.world_size(), distributed.rank()
    net = model
    if world > 1:  # parameters and buffers start as rank 0's
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False, static_graph=True)
    progress = progress and me == 0
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, (len(x_t) + batch_size - 1) // batch_size)
    if lr_schedule == "constant":
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)
    else:
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                              epochs * steps_per_epoch or 1)
    loss_fn = nn.CrossEntropyLoss()
    history: list[dict] = []
    start_epoch = 0
    if resume is not None:
        start_epoch, history = _restore(resume, model, optimizer, schedule, gen)
        if oscillation is not None and "oscillation" in resume:
            oscillation.load_state_dict(resume["oscillation"])
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, console=None, transient=False,
                  redirect_stdout=False) as bar, _synced_batchnorms(model, world > 1):
        task = bar.add_task(description, total=epochs, completed=start_epoch,
                            loss=history[-1]["loss"] if history else float("nan"))
        for epoch in range(start_epoch, epochs):
            model.train()
            order = torch.randperm(len(y_t), generator=gen)
            total, count = 0.0, 0
            shares = []  # (this process's sample indices, the global batch's size)
            for start in range(0, len(y_t), batch_size):
                idx = order[start:start + batch_size]
                if world > 1:  # this process's share of the global batch
                    if len(idx) < world:
                        continue  # not one sample each: skipped by every process
                    shares.append((idx.tensor_split(world)[me], len(idx)))
                else:
                    shares.append((idx, len(idx)))
            for (idx, share), x_batch in zip(shares, _batches(x_t, shares, workers),
                                             strict=True):
                optimizer.zero_grad(set_to_none=True)
                x_batch, y_batch = x_batch.to(device), y_t[idx].to(device)
                # the share also covers the backward pass, which recomputes some layers
                with (distributed.batch_share(len(idx), share) if world > 1
                      else contextlib.nullcontext()):
                    logits = _forward(net, x_batch)
                    if teacher is None:
                        loss = loss_fn(logits, y_batch)
                    else:
                        with torch.no_grad():
                            teacher_logits = teacher(x_batch)
                        loss = distillation_loss(logits, y_batch, teacher_logits,
                                                 alpha=distill_alpha, temperature=temperature)
                    if regularizer is not None:
                        loss = loss + regularizer(model)
                    if world > 1:  # DDP averages: each share counts by its size
                        (loss * (len(idx) * world / share)).backward()
                    else:
                        loss.backward()
                if step_hook is not None:
                    step_hook.before_step()
                optimizer.step()
                if step_hook is not None:
                    step_hook.after_step()
                schedule.step()
                if oscillation is not None:
                    oscillation.update()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            if world > 1:  # the whole batch's loss, the same in every process
                total, count = distributed.sum_(torch.tensor([total, count],
                                                             dtype=torch.float64)).tolist()
            if not math.isfinite(total):
                raise TrainingDivergedError(
                    f"{description} training diverged: the loss is {total / count} in epoch "
                    f"{epoch + 1} (check the data's scale and the learning rate {lr:g})")
            record = {"epoch": epoch + 1, "loss": total / count, "lr": schedule.get_last_lr()[0]}
            if x_val is not None:
                record["val_accuracy"] = evaluate(model, x_val, y_val)
                model.train()  # as the epoch left it (evaluate switches to eval mode)
            if oscillation is not None:
                record["oscillation"] = oscillation.epoch_record()
            if step_hook is not None:
                record[step_hook.key] = step_hook.epoch_record()
            history.append(record)
            if log is not None and me == 0:
                log.epoch(description, record, model)
            bar.update(task, advance=1, loss=record["loss"])
            if checkpoint is not None and me == 0:
                state = {
                    "epoch": epoch + 1, "history": [dict(r) for r in history],
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": schedule.state_dict(), "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                }
                if oscillation is not None:
                    state["oscillation"] = oscillation.state_dict()
                checkpoint(state)
    if progress:
        sys.stderr.flush()
    return history


def rows_tensor(x, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` (a tensor, an array, rows of a memory map or of :class:`~qflow.zoo.data.Rows`)
    as a tensor; arrays are copied (a memory map's rows are read-only).

    >>> rows_tensor(np.arange(3), torch.float32).tolist()
    [0.0, 1.0, 2.0]
    """
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(dtype)
    tensor = torch.from_numpy(np.array(x))
    return tensor if dtype is None else tensor.to(dtype)


def _batches(x, shares: list, workers: int):
    """The input batches of one epoch: ``x``'s rows at each share's indices."""
    if isinstance(x, torch.Tensor):
        return (x[idx] for idx, _ in shares)
    indices = [idx.numpy() for idx, _ in shares]
    if workers == 0:
        return (torch.from_numpy(np.asarray(x[i], dtype=np.float32)) for i in indices)
    loader = torch.utils.data.DataLoader(_RowReader(x), batch_size=None, sampler=indices,
                                         num_workers=workers)
    return iter(loader)


class _RowReader(torch.utils.data.Dataset):
    """``x``'s rows at an index array, as a float32 tensor (for DataLoader workers)."""

    def __init__(self, x):
        self.x = x

    def __getitem__(self, indices):
        return torch.from_numpy(np.asarray(self.x[indices], dtype=np.float32))


def _forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    try:
        return net(x)
    except RuntimeError as exc:  # DDP: a parameter got no gradient in the last step
        if "finished reduction" not in str(exc):
            raise
        raise QflowError("data-parallel training needs a gradient for every trainable "
                         "parameter in every step; some got none (set requires_grad=False "
                         "on parameters the loss does not use)") from None


class _SyncedBatchNorm:
    """The training forward of torch's BatchNorm with the statistics of a data-parallel
    group's whole batch (torch's SyncBatchNorm runs on GPUs only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        mean, var, count = batch_moments(x, synced=True)
        update_running_stats(self, mean.detach(), var.detach(), count)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.reshape(shape)) * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


_SYNCED = {cls: type(f"Synced{cls.__name__}", (_SyncedBatchNorm, cls), {})
           for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)}


@contextlib.contextmanager
def _synced_batchnorms(model: nn.Module, synced: bool):
    """While training data-parallel, torch's own BatchNorm layers of ``model`` (a float
    model's; qflow's QAT BatchNorms sync by themselves) use the whole batch's
    statistics: their class is swapped for the synced one and back."""
    swapped = [m for m in model.modules() if type(m) in _SYNCED] if synced else []
    for module in swapped:
        module.__class__ = _SYNCED[type(module)]
    try:
        yield
    finally:
        for module in swapped:
            module.__class__ = module.__class__.__mro__[2]


def _device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters (else buffers) live; the CPU for an empty model."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _constant(step: int) -> float:
    """The factor of ``lr_schedule="constant"`` (a module function: schedulers pickle)."""
    return 1.0


def _restore(state: dict, model: nn.Module, optimizer, schedule, gen) -> tuple[int, list]:
    """Load a state given to ``fit``'s checkpoint callback; (epochs done, history)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]), [dict(r) for r in state["history"]]
