"""Data that need not fit in memory: memory-mapped .npz inputs and torch Datasets are
read a batch at a time (by worker processes too) and train exactly as arrays do."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

import qflow
from qflow.cli.main import main
from qflow.sources import dataset_sha256, resolve_data
from qflow.train import calibrate, evaluate, fit
from qflow.zoo import DATASETS, MODELS
from qflow.zoo.data import Rows

DIGITS = DATASETS["digits"]()


def _npz(path, compressed=False):
    save = np.savez_compressed if compressed else np.savez
    save(path, x_train=DIGITS.x_train, y_train=DIGITS.y_train, x_test=DIGITS.x_test,
         y_test=DIGITS.y_test)
    return path


def test_uncompressed_npz_inputs_are_memory_mapped(tmp_path):
    mapped = resolve_data(str(_npz(tmp_path / "d.npz")))
    loaded = resolve_data(str(_npz(tmp_path / "c.npz", compressed=True)))
    assert isinstance(mapped.x_train, np.memmap) and isinstance(mapped.x_test, np.memmap)
    assert not isinstance(loaded.x_train, np.memmap)
    assert np.array_equal(mapped.x_train, DIGITS.x_train)
    assert dataset_sha256(mapped) == dataset_sha256(loaded) == dataset_sha256(DIGITS)


def _state_after_fit(x, workers=0):
    torch.manual_seed(0)
    model = qflow.quantize_(MODELS["digits-cnn"].factory(), qflow.QFXConfig.with_bits(4))
    calibrate(model, x[:64])
    fit(model, x, DIGITS.y_train, epochs=1, batch_size=100, progress=False, workers=workers)
    return model.state_dict(), evaluate(model, x, DIGITS.y_train)


def test_memory_maps_and_rows_read_on_demand_train_as_arrays_do(tmp_path):
    mapped = resolve_data(str(_npz(tmp_path / "d.npz")))
    rows = Rows(lambda i: DIGITS.x_train[i], len(DIGITS.x_train), DIGITS.x_train.shape[1:])
    reference, accuracy = _state_after_fit(DIGITS.x_train)
    for x, workers in ((mapped.x_train, 0), (rows, 0), (rows, 2)):
        state, acc = _state_after_fit(x, workers)
        assert acc == accuracy
        assert [k for k in state if not torch.equal(state[k], reference[k])] == []


DATA_MODULE = '''
import torch
from torch.utils.data import Dataset
from qflow.zoo import DATASETS

class Digits(Dataset):
    """Items read one at a time, as a user's Dataset over files would."""

    def __init__(self, split):
        data = DATASETS["digits"]()
        self.x, self.y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]), int(self.y[i])

def splits():
    return Digits("train"), Digits("test")

def broken():
    return Digits("train"), [1, 2, 3]
'''


def test_torch_datasets_train_export_and_verify_as_the_arrays(tmp_path, monkeypatch):
    (tmp_path / "my_digits.py").write_text(DATA_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = resolve_data("my_digits:splits")
    assert isinstance(data.x_train, Rows) and data.x_train.shape == DIGITS.x_train.shape
    assert np.array_equal(data.y_test, DIGITS.y_test)
    args = ["quantize", "--model", "digits-mlp", "--epochs", "2", "--qat-epochs", "1",
            "--quiet"]
    assert main([*args, "--data", "my_digits:splits", "--workers", "1", "--out", "ds"]) == 0
    assert main([*args, "--data", "digits", "--out", "arrays"]) == 0
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)
            for d in ("ds", "arrays"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert main(["export", "ds", "--target", "onnx", "--out", "ds/onnx"]) == 0
    assert main(["verify", "ds/onnx"]) == 0
    report = json.loads((tmp_path / "ds" / "onnx" / "verify.json").read_text())
    assert report["mismatching_samples"] == 0 and report["samples"] > 500
    sys.modules.pop("my_digits", None)


def test_a_bad_dataset_pair_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_bad.py").write_text(DATA_MODULE)
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "--data", "my_bad:broken", "--out", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qflow quantize: error: data my_bad:broken: expected a dict") and \
        "\n" not in err
    assert not (tmp_path / "run").exists()
    sys.modules.pop("my_bad", None)


def test_workers_must_not_be_negative(tmp_path, capsys):
    assert main(["quantize", "--workers", "-1", "--out", str(tmp_path / "run")]) == 2
    assert "--workers must be >= 0, got -1" in capsys.readouterr().err
