"""numpy implementation of fixed-point casts: float values to int64 codes and back.

The torch twin with the same names lives in :mod:`qflow.ops`.
"""

from __future__ import annotations

import numpy as np

from . import kernel
from .types import FixedType


def _as_float64(x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"expected a numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("cannot cast non-finite values (NaN or inf) to a fixed-point type")
    return arr


FLOAT_EXACT_WIDTH = 53
#: the code :func:`values_to_codes` gives a value that is not on the grid (or NaN)
OFF_GRID_CODE = np.iinfo(np.int64).min // 2


def _check_float_width(t: FixedType) -> None:
    # float64 holds every code of a type up to 53 bits; wider codes only come from
    # integer arithmetic (requantize), never from real values.
    if t.width > FLOAT_EXACT_WIDTH:
        raise ValueError(f"cannot cast real values into {t} exactly: wider than "
                         f"{FLOAT_EXACT_WIDTH} bits (use requantize on integer codes)")


def to_codes(x, t: FixedType, *, as_float: bool = False) -> np.ndarray:
    """Cast real values to the int64 codes of ``t`` (round first, overflow second).

    >>> from qflow.numerics import FixedType
    >>> t = FixedType(signed=True, integer=1, fractional=2, rounding="RND_CONV", overflow="SAT")
    >>> to_codes([0.375, 0.625, 5.0, -9.0], t).tolist()
    [2, 2, 7, -8]

    With ``as_float`` the codes come back as integer-valued float64 (exact: widths are
    at most 53 bits), sparing a conversion when they feed float arithmetic.
    """
    _check_float_width(t)
    x = _as_float64(x)
    scaled = np.ldexp(x, t.fractional)
    if t.fractional < 0:  # only scaling down can underflow a nonzero value to zero
        scaled = kernel.undo_underflow(x, scaled, np)
    q = kernel.quantize_scaled(scaled, t.width, t.signed, t.rounding, t.overflow, np)
    return q if as_float else q.astype(np.int64)


def from_codes(q, t: FixedType) -> np.ndarray:
    """Real values (float64) of int64 codes of ``t``; exact for widths up to 53 bits."""
    return np.ldexp(np.asarray(q, dtype=np.int64).astype(np.float64), -t.fractional)


def cast(x, t: FixedType) -> np.ndarray:
    """Cast to ``t`` and return the real values as float64."""
    return from_codes(to_codes(x, t), t)


def values_to_codes(values, t: FixedType) -> np.ndarray:
    """Real values on ``t``'s grid -> int64 codes, for comparing a deployed artifact's
    real-valued outputs with the emulator's codes.

    Nothing is rounded: a value off ``t``'s grid (or NaN) becomes -2**62, a code no
    type of at most 53 bits has, so it always counts as a mismatch.

    >>> from qflow.numerics import FixedType
    >>> t = FixedType(signed=True, integer=1, fractional=2)
    >>> values_to_codes([0.25, -1.5, 0.3], t).tolist()
    [1, -6, -4611686018427387904]
    """
    scaled = np.ldexp(np.asarray(values, dtype=np.float64), t.fractional)
    codes = np.rint(scaled)
    off_grid = ~(codes == scaled)
    # an off-grid value can never match: push it out of reach so it counts as a mismatch
    return np.where(off_grid, OFF_GRID_CODE, codes).astype(np.int64)


def khot_codes(x, t: FixedType, k: int) -> np.ndarray:
    """Codes of ``t`` that are each a sum of at most ``k`` signed powers of two.

    >>> from qflow.numerics import FixedType
    >>> t = FixedType(signed=True, integer=4, fractional=0)
    >>> khot_codes([7.0, 5.0, 3.2, -6.0], t, k=1).tolist()
    [8, 4, 4, -4]
    """
    if k < 1:
        raise ValueError(f"K-hot needs k >= 1, got {k}")
    scaled = np.ldexp(_as_float64(x), t.fractional)
    return kernel.khot_scaled(scaled, k, t.width, t.signed, np).astype(np.int64)


def requantize(q, from_fractional: int, t: FixedType) -> np.ndarray:
    """Cast int64 codes with ``from_fractional`` fractional bits to ``t``, in integers only.

    This is what hardware does between layers: a shift, a rounding decided from the
    dropped bits, and the overflow rule. It equals ``to_codes(from_codes(q), t)``.

    >>> from qflow.numerics import FixedType
    >>> t = FixedType(signed=True, integer=3, fractional=0, rounding="RND_CONV", overflow="SAT")
    >>> requantize([5, 6, 7, 400], 1, t).tolist()   # 2.5, 3.0, 3.5, 200.0
    [2, 3, 4, 7]
    """
    q = np.asarray(q, dtype=np.int64)
    shift = from_fractional - t.fractional
    if abs(shift) > 62:
        raise ValueError(f"requantize shift of {shift} bits is out of range")
    if shift <= 0:
        return _shift_left(q, -shift, t)
    floor = q >> shift
    rem = q & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    rounded = kernel.round_from_parts(
        floor, rem > half, rem == half, rem != 0, q < 0, (floor & 1) == 1, t.rounding
    )
    return kernel.apply_overflow(rounded.astype(np.int64), t.width, t.signed, t.overflow, np)


def _shift_left(q: np.ndarray, shift: int, t: FixedType) -> np.ndarray:
    # Reduce first so that q << shift cannot overflow int64; the reduced code overflows
    # exactly as the original would.
    if shift >= t.width + 1:
        bound = 1
    else:
        bound = (1 << (t.width + 1 - shift)) if shift else (1 << 62)
    if t.overflow.name == "WRAP":
        reduced = np.remainder(q, bound) if shift < t.width else np.zeros_like(q)
    else:
        reduced = np.clip(q, -bound, bound)
    return kernel.apply_overflow(reduced << shift, t.width, t.signed, t.overflow, np)
