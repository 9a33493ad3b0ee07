"""Resolve ``--model`` and ``--data`` arguments: zoo names, files and ``module:function``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qflow.errors import QflowError
from qflow.zoo import DATASETS, MODELS, Dataset

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def resolve_model(spec: str) -> Callable[[], object]:
    """A zoo name (``digits-mlp``) or ``path/file.py:factory`` -> a model factory."""
    if spec in MODELS:
        return MODELS[spec].factory
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        path, func = spec.rsplit(":", 1)
        factory = _load_file_attr(Path(path), func, "model")
    else:
        raise QflowError(f"unknown model {spec!r}: use a zoo name ({', '.join(sorted(MODELS))}) "
                         "or path/file.py:factory")

    def build():
        from torch import nn

        model = factory()
        if not isinstance(model, nn.Module):
            raise QflowError(f"model factory {spec} returned {type(model).__name__}, "
                             "not a torch.nn.Module")
        return model

    return build


def _load_file_attr(path: Path, attr: str, what: str):
    if not path.is_file():
        raise QflowError(f"{what} file not found: {path}")
    module_name = f"qflow_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise QflowError(f"cannot import {what} file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise QflowError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, attr):
        raise QflowError(f"{path} has no function {attr!r}")
    return getattr(module, attr)


def resolve_data(spec: str) -> Dataset:
    """A zoo name (``digits``), an ``.npz`` with x_train/y_train/x_test/y_test, or
    ``module:function`` returning such a mapping (or a 4-tuple)."""
    if spec in DATASETS:
        return DATASETS[spec]()
    if spec.endswith(".npz"):
        return _load_npz(Path(spec))
    if ":" in spec:
        module_name, func = spec.split(":", 1)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise QflowError(f"data {spec}: cannot import module {module_name!r}: {exc}") from None
        if not hasattr(module, func):
            raise QflowError(f"data {spec}: module {module_name!r} has no function {func!r}")
        result = getattr(module, func)()
        if isinstance(result, dict):
            missing = [k for k in _NPZ_KEYS if k not in result]
            if missing:
                raise QflowError(f"data {spec}: result lacks {', '.join(missing)}")
            return Dataset.checked(spec, *(result[k] for k in _NPZ_KEYS))
        if isinstance(result, tuple | list) and len(result) == 4:
            return Dataset.checked(spec, *result)
        raise QflowError(f"data {spec}: expected a dict with {', '.join(_NPZ_KEYS)} or a 4-tuple")
    raise QflowError(f"unknown data {spec!r}: use a zoo name ({', '.join(sorted(DATASETS))}), "
                     "a .npz file or module:function")


def _load_npz(path: Path) -> Dataset:
    if not path.is_file():
        raise QflowError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _NPZ_KEYS if k not in npz.files]
            if missing:
                raise QflowError(f"data file {path} lacks arrays {', '.join(missing)}")
            arrays = [npz[k] for k in _NPZ_KEYS]
    except QflowError:
        raise
    except Exception as exc:
        raise QflowError(f"data file {path} is not a readable .npz: {exc}") from None
    return Dataset.checked(str(path), *arrays)
