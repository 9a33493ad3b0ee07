"""What the accuracy benchmarks share: the float model trained as ``qflow quantize``
trains it, the deployed model's accuracy (checked against the QAT model), mean ± std."""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

import qflow
from qflow.graph import Emulator
from qflow.train import fit, seed_everything


def train_float(zoo, data, *, epochs: int, batch_size: int, seed: int):
    """The zoo model trained in float from ``seed``, as ``qflow quantize`` does."""
    seed_everything(seed)
    model = zoo.factory()
    fit(model, data.x_train, data.y_train, epochs=epochs, lr=zoo.lr, batch_size=batch_size,
        seed=seed, progress=False, description="float")
    return model


def deployed_accuracy(model, data, script: str) -> float:
    """Accuracy (%) of the frozen model under the emulator; exits (naming ``script``)
    if the emulator decides any test sample differently from the QAT model in eval
    mode."""
    model.eval()
    graph = qflow.freeze(model, torch.from_numpy(data.x_test[:2]))
    logits = Emulator(graph).run(data.x_test)
    with torch.no_grad():
        qat = model(torch.from_numpy(data.x_test)).numpy()
    differ = int((np.argmax(logits, 1) != np.argmax(qat, 1)).sum())
    if differ:
        raise SystemExit(f"{script}: the emulator decides {differ} test samples "
                         "differently from the QAT model: not exact")
    return 100.0 * float((np.argmax(logits, 1) == data.y_test).mean())


def mean_std(values: list[float], digits: int = 1) -> str:
    """``mean ± std`` (the sample standard deviation; 0 for one value)."""
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def common_arguments(parser: argparse.ArgumentParser, data: list[str],
                     qat_help: str = "QAT epochs (default: half the float epochs, as qflow "
                                     "quantize)") -> None:
    """The options every accuracy benchmark takes: data sets, seeds, epochs, batch size,
    threads (:func:`apply_threads`)."""
    parser.add_argument("--data", nargs="+", default=list(data), choices=list(data))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None,
                        help="float epochs (default: the zoo model's)")
    parser.add_argument("--qat-epochs", type=int, default=None, help=qat_help)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default 0: torch's choice)")


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads``: torch's intra-op threads (0 leaves torch's choice)."""
    if args.threads:
        torch.set_num_threads(args.threads)
