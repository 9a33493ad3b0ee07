"""Corner-case inputs for bit-exactness checks, derived from the input type."""

from __future__ import annotations

import numpy as np

from .types import FixedType


def corner_inputs(input_type: FixedType, shape: tuple[int, ...], count: int = 256,
                  seed: int = 0) -> np.ndarray:
    """Real-valued inputs of per-sample ``shape`` that stress every rounding and overflow path.

    Returns ``max(count, 4)`` samples. Groups: every element at the type's minimum, its
    maximum, zero or one LSB (4 samples); then in equal parts: random mixes
    of the two extremes; exact rounding ties (a code plus half an LSB); values just inside
    and just outside the range; far out-of-range values (±64× the range) that saturate,
    zero or wrap; random values on a grid 8× finer than the type.
    """
    rng = np.random.default_rng(seed)
    lsb, lo, hi = input_type.lsb, input_type.min_value, input_type.max_value
    span = hi - lo + lsb
    per = max(1, -(-(count - 4) // 5))  # 4 fixed samples, then 5 random groups
    size = (per, *shape)
    groups = [
        np.stack([np.full(shape, lo), np.full(shape, hi), np.zeros(shape), np.full(shape, lsb)]),
        np.where(rng.random(size) < 0.5, lo, hi),
        (rng.integers(input_type.qmin, input_type.qmax, size) + 0.5) * lsb,
        np.where(rng.random(size) < 0.5, lo - lsb * rng.integers(0, 3, size),
                 hi + lsb * rng.integers(0, 3, size)) + 0.5 * lsb * rng.integers(0, 2, size),
        rng.uniform(lo - 64 * span, hi + 64 * span, size),
        (rng.integers(input_type.qmin * 8, input_type.qmax * 8 + 8, size)) * (lsb / 8),
    ]
    out = np.concatenate(groups).astype(np.float64)
    return out[:max(count, len(groups[0]))]
