"""TensorBoard logging of a training run (``qflow quantize --log tensorboard[:DIR]``, or
``fit(..., log=TensorBoardLog(DIR))`` from Python).

After every epoch: the loss and learning rate per phase (``loss/float``, ``loss/QAT``,
``lr/...``), the test accuracy where the epoch has one (``accuracy/...``), the fraction of
oscillating weights, in all and per layer (``oscillation/total``, ``oscillation/<layer>``),
each quantized tensor's integer width I (``int_bits/<layer>.<tensor>``, the widest
channel's for per-channel formats) as the binary points move, and, given sample inputs,
the saturation rate of every quantizing cast (``saturation/<tensor>``: the fraction of
the values arriving on those inputs that fall outside the type's range and are clipped,
zeroed or wrapped; ``saturation/total`` over all casts), counted as in the report
(:func:`qflow.report.stats.cast_statistics`) on the model frozen as it stands at the
epoch's end. The step is the epoch count over all phases. Needs the ``tensorboard``
package (``pip install qflow[tensorboard]``); view with ``tensorboard --logdir DIR``.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qflow.errors import QflowError

#: test inputs the saturation rates are counted on, at most (a few seconds an epoch at most)
SATURATION_SAMPLES = 256
INSTALL_HINT = "--log tensorboard needs the tensorboard package: pip install qflow[tensorboard]"


def parse_log_option(value: str, default_dir: Path) -> Path:
    """``tensorboard`` or ``tensorboard:DIR`` -> the directory to write the events to."""
    kind, _, directory = value.partition(":")
    if kind != "tensorboard":
        raise QflowError(f"--log {value!r}: unknown logger (use tensorboard or tensorboard:DIR)")
    if importlib.util.find_spec("tensorboard") is None:
        raise QflowError(INSTALL_HINT)
    return Path(directory) if directory else default_dir


class TensorBoardLog:
    """Writes one set of scalars per epoch; see the module docstring.

    >>> import tempfile, torch, qflow
    >>> model = qflow.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 2)))
    >>> _ = model(torch.rand(8, 4))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     log = TensorBoardLog(d)
    ...     log.epoch("QAT", {"loss": 0.5, "lr": 1e-3}, model)
    ...     log.close()
    """

    def __init__(self, directory: str | Path, *, samples=None,
                 warn: Callable[[str], None] | None = None):
        """``samples``: inputs for the saturation rates (none: no rates); ``warn`` is told,
        once, when the rates cannot be counted for a model."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise QflowError(INSTALL_HINT) from None
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(directory))
        self.step = 0
        self.samples = None if samples is None else np.asarray(samples, dtype=np.float64)
        self.warn = warn

    def epoch(self, phase: str, record: dict, model: nn.Module | None = None) -> None:
        """Log one epoch's ``record`` (a row of :func:`qflow.train.fit`'s history) of
        ``phase``; with a quantized ``model``, its integer widths too."""
        from qflow.api import describe

        self.step += 1
        scalars = {f"loss/{phase}": record["loss"], f"lr/{phase}": record["lr"]}
        if "val_accuracy" in record:
            scalars[f"accuracy/{phase}"] = record["val_accuracy"]
        oscillation = record.get("oscillation")
        if oscillation:
            scalars["oscillation/total"] = oscillation["fraction"]
            scalars.update({f"oscillation/{layer}": fraction
                            for layer, fraction in oscillation["layers"].items()})
        if model is not None:
            scalars.update({f"int_bits/{row.layer}.{row.tensor}": row.int_width_max
                            for row in describe(model)})
            if self.samples is not None and hasattr(model, "qflow_input"):
                scalars.update(self._saturation(model))
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), self.step)
        self.writer.flush()

    def _saturation(self, model: nn.Module) -> dict[str, float]:
        """The saturation rates of ``model`` frozen now; a copy is frozen, so that the
        training state (modes, quantizer state) stays as it is."""
        from qflow.graph.from_torch import freeze
        from qflow.report.stats import cast_statistics

        try:
            frozen = copy.deepcopy(model)
            graph = freeze(frozen, torch.as_tensor(self.samples[:2], dtype=torch.float32))
        except QflowError as exc:
            if self.warn is not None:
                self.warn(f"saturation rates not logged: {exc}")
                self.warn = None
            return {}
        rows = cast_statistics(graph, self.samples)
        scalars = {f"saturation/{row['tensor']}": row["outside"] for row in rows}
        scalars["saturation/total"] = (sum(row["outside_count"] for row in rows)
                                       / sum(row["values"] for row in rows))
        return scalars

    def close(self) -> None:
        self.writer.close()
