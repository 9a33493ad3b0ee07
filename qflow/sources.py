"""Resolve ``--model`` and ``--data`` arguments: zoo names, files and ``module:function``.

A model file (``path/file.py:factory``) and a ``module:function`` data source are Python
code that qflow runs: only name files you trust. Runs record their sources in a
self-contained form (:func:`absolute_spec`, :func:`file_sha256`, :func:`dataset_sha256`)
so that later commands work from any directory and notice a changed source.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
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

        model = _call_user_code(factory, f"model factory {spec}")
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
        raise QflowError(f"importing {path} failed: {_describe(exc)}") from None
    if not hasattr(module, attr):
        raise QflowError(f"{path} has no function {attr!r}")
    return getattr(module, attr)


def resolve_data(spec: str, search_path: list[str] | None = None) -> Dataset:
    """A zoo name (``digits``), an ``.npz`` with x_train/y_train/x_test/y_test, or
    ``module:function`` returning such a mapping (or a 4-tuple).

    ``module`` is imported with ``search_path`` (default: the current directory) in front
    of ``sys.path``; :func:`module_search_path` gives the entry a run records.
    """
    if spec in DATASETS:
        return DATASETS[spec]()
    if spec.endswith(".npz"):
        return _load_npz(Path(spec))
    if ":" in spec:
        module_name, func = spec.split(":", 1)
        saved = list(sys.path)
        sys.path[:0] = search_path if search_path is not None else [os.getcwd()]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise QflowError(f"data {spec}: cannot import module {module_name!r}: {exc}") from None
        except Exception as exc:
            raise QflowError(f"data {spec}: importing {module_name!r} raised "
                             f"{_describe(exc)}") from None
        finally:
            sys.path[:] = saved
        if not hasattr(module, func):
            raise QflowError(f"data {spec}: module {module_name!r} has no function {func!r}")
        function = getattr(module, func)
        if not callable(function):
            raise QflowError(f"data {spec}: {func!r} is not a function")
        result = _call_user_code(function, f"data {spec}: calling {func}()")
        torch_data = _from_torch_datasets(spec, result)
        if torch_data is not None:
            return torch_data
        if isinstance(result, dict):
            missing = [k for k in _NPZ_KEYS if k not in result]
            if missing:
                raise QflowError(f"data {spec}: result lacks {', '.join(missing)}")
            return Dataset.checked(spec, *(result[k] for k in _NPZ_KEYS))
        if isinstance(result, tuple | list) and len(result) == 4:
            return Dataset.checked(spec, *result)
        raise QflowError(f"data {spec}: expected a dict with {', '.join(_NPZ_KEYS)}, a "
                         "4-tuple, or a (train, test) pair of torch Datasets")
    raise QflowError(f"unknown data {spec!r}: use a zoo name ({', '.join(sorted(DATASETS))}), "
                     "a .npz file or module:function")


def _load_npz(path: Path) -> Dataset:
    """The four arrays of an ``.npz``; inputs stored uncompressed (``np.savez``) are
    memory-mapped, not read into memory (``np.savez_compressed`` members are read)."""
    if not path.is_file():
        raise QflowError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _NPZ_KEYS if k not in npz.files]
            if missing:
                raise QflowError(f"data file {path} lacks arrays {', '.join(missing)}")
            mapped = _mapped_npz_members(path, ("x_train", "x_test"))
            arrays = [mapped[k] if k in mapped else npz[k] for k in _NPZ_KEYS]
    except QflowError:
        raise
    except Exception as exc:
        raise QflowError(f"data file {path} is not a readable .npz: {exc}") from None
    return Dataset.checked(str(path), *arrays)


def _mapped_npz_members(path: Path, names: tuple[str, ...]) -> dict[str, np.memmap]:
    """Read-only memory maps of the members ``names`` that are stored uncompressed."""
    import struct
    import zipfile

    mapped = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for name in names:
            try:
                info = archive.getinfo(f"{name}.npy")
            except KeyError:
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                continue
            f.seek(info.header_offset)
            local = f.read(30)  # the local file header: its name and extra field follow
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                continue
            if dtype.hasobject or fortran or not shape:
                continue
            mapped[name] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(),
                                     shape=shape)
    return mapped


def _from_torch_datasets(spec: str, result) -> Dataset | None:
    """A ``(train, test)`` pair of torch ``Dataset``s (each item ``(input, label)``), or
    None for anything else. Inputs are read on demand (:class:`qflow.zoo.data.Rows`);
    the labels are read once (a dataset's ``targets``, else every item)."""
    import torch.utils.data as tud

    if not (isinstance(result, tuple | list) and len(result) == 2
            and all(isinstance(d, tud.Dataset) for d in result)):
        return None
    return Dataset.checked(spec, *_torch_split(spec, "train", result[0]),
                           *_torch_split(spec, "test", result[1]))


def _torch_split(spec: str, split: str, dataset):
    from qflow.zoo.data import Rows

    try:
        length = len(dataset)
        first = dataset[0]
    except Exception as exc:
        raise QflowError(f"data {spec}: the {split} Dataset cannot be read: "
                         f"{_describe(exc)}") from None
    if not (isinstance(first, tuple | list) and len(first) == 2):
        raise QflowError(f"data {spec}: each item of the {split} Dataset must be "
                         "(input, label)")

    def item(i):
        return dataset[int(i)]

    def read(indices):
        return np.stack([np.asarray(item(i)[0], dtype=np.float32) for i in indices])

    targets = getattr(dataset, "targets", None)
    labels = np.asarray(targets) if targets is not None and len(targets) == length else \
        np.array([int(item(i)[1]) for i in range(length)])
    return Rows(read, length, np.asarray(first[0]).shape), labels


def _call_user_code(function: Callable[[], object], what: str):
    """``function()``; an exception of the user's code becomes one line naming ``what``."""
    try:
        return function()
    except QflowError:
        raise
    except Exception as exc:
        raise QflowError(f"{what} raised {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (a user's exception may span many lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def absolute_spec(spec: str) -> str:
    """``spec`` with its file path made absolute (zoo names and ``module:function`` as
    given), so that a run can be used from any directory.

    >>> absolute_spec("digits-mlp")
    'digits-mlp'
    >>> absolute_spec("models/net.py:build") == os.path.abspath("models/net.py") + ":build"
    True
    """
    if spec in MODELS or spec in DATASETS:
        return spec
    if spec.endswith(".npz"):
        return os.path.abspath(spec)
    path, sep, func = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return f"{os.path.abspath(path)}:{func}"
    return spec


def source_file(spec: str) -> Path | None:
    """The file a model or data spec reads (a model file, an .npz), or None."""
    if spec in MODELS or spec in DATASETS:
        return None
    if spec.endswith(".npz"):
        return Path(spec)
    path, sep, _ = spec.rpartition(":")
    return Path(path) if sep and path.endswith(".py") else None


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_sha256(data: Dataset) -> str:
    """The sha256 of a data set's arrays (shapes, dtypes and values, in order)."""
    from qflow.zoo.data import row_chunks

    digest = hashlib.sha256()
    for array in (data.x_train, data.y_train, data.x_test, data.y_test):
        digest.update(f"{np.dtype(array.dtype).str}{tuple(array.shape)}".encode())
        for chunk in row_chunks(array):  # the bytes of the C-ordered array, block by block
            digest.update(np.ascontiguousarray(chunk, dtype=array.dtype).tobytes())
    return digest.hexdigest()


def module_search_path(spec: str) -> list[str] | None:
    """For a ``module:function`` data spec already resolved: the ``sys.path`` entry its
    module was found in (so a run can import it again from another directory)."""
    if ":" not in spec or spec.endswith(".npz") or spec in DATASETS:
        return None
    module = sys.modules.get(spec.split(":", 1)[0])
    file = getattr(module, "__file__", None)
    if not file:
        return None
    depth = spec.split(":", 1)[0].count(".") + 1 + (Path(file).name == "__init__.py")
    return [str(Path(file).resolve().parents[depth - 1])]
