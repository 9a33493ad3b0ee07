"""TensorBoard logging of a training run (``qflow quantize --log tensorboard[:DIR]``).

After every epoch: the loss and learning rate per phase (``loss/float``, ``loss/QAT``,
``lr/...``), the test accuracy where the epoch has one (``accuracy/...``), the fraction of
oscillating weights, in all and per layer (``oscillation/total``, ``oscillation/<layer>``),
and each quantized tensor's integer width I (``int_bits/<layer>.<tensor>``, the widest
channel's for per-channel formats) as the binary points move. The step is the epoch
count over all phases. Needs the ``tensorboard`` package (``pip install
qflow[tensorboard]``); view with ``tensorboard --logdir DIR``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torch import nn

from qflow.errors import QflowError

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

    def __init__(self, directory: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise QflowError(INSTALL_HINT) from None
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(directory))
        self.step = 0

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
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), self.step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
