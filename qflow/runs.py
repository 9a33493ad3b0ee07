"""Run directories: what ``qflow quantize`` writes and later commands read.

A run directory holds ``checkpoint.pt`` (the QAT model's state dict, loadable with
``torch.load(..., weights_only=True)``), ``float.pt`` (the float model before QAT),
``config.json`` (the QFX config), ``run.json`` (model, data, seed, epochs, versions)
and ``metrics.json``. It is written into a temporary directory that is renamed into
place when complete, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from qflow.api import quantize_
from qflow.config import QFXConfig
from qflow.errors import QflowError
from qflow.jsonfile import read_json, write_json
from qflow.sources import resolve_model

RUN_FORMAT = 1


@contextmanager
def atomic_directory(final: Path):
    """Yield a temporary sibling of ``final``; rename it to ``final`` on success.

    An existing ``final`` is replaced only once the new directory is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a run directory is not
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_run(directory: Path, *, qat_model: nn.Module, float_model: nn.Module,
             config: QFXConfig, run_info: dict, metrics: dict) -> Path:
    """Write a complete run directory atomically; return its path."""
    with atomic_directory(directory) as tmp:
        torch.save(qat_model.state_dict(), tmp / "checkpoint.pt")
        torch.save(float_model.state_dict(), tmp / "float.pt")
        (tmp / "config.json").write_text(config.to_json() + "\n")
        write_json(tmp / "run.json", {"format": RUN_FORMAT, **run_info})
        write_json(tmp / "metrics.json", metrics)
    return Path(directory)


def load_run(directory: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the QAT model of a run directory (eval mode) and return it with run.json.

    >>> # model, info = load_run("runs/digits-mlp-w8a8-seed0")
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise QflowError(f"run directory not found: {directory}")
    info = read_json(directory / "run.json", missing=f"run file not found: "
                     f"{directory / 'run.json'}")
    if info.get("format") != RUN_FORMAT:
        raise QflowError(f"{directory / 'run.json'}: unsupported run format {info.get('format')!r}")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise QflowError(f"config not found: {config_path}")
    config = QFXConfig.from_json(config_path.read_text(encoding="utf-8"))
    model = resolve_model(info["model"])()
    quantize_(model, config)
    checkpoint = directory / "checkpoint.pt"
    if not checkpoint.is_file():
        raise QflowError(f"checkpoint not found: {checkpoint}")
    try:
        state = torch.load(checkpoint, weights_only=True, map_location="cpu")
        model.load_state_dict(state)
    except Exception as exc:
        raise QflowError(f"cannot load checkpoint {checkpoint}: {exc}") from None
    return model.eval(), info
