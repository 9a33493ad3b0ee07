"""Scales that are not powers of two: fixed-point multipliers (dyadic requantization).

A QONNX tensor whose scale s is not a power of two is held in the QGraph as its integer
codes (fraction 0) with the scale kept beside it (the converter's ``factor``). A
``Gemm``/``Conv`` on such codes, or with such weights, leaves an output whose real value
is ``acc · S_c + B_c`` per output channel c (S_c the input scale times the weight scale,
B_c the real bias); that affine map stays pending through ``Relu`` (when B is 0),
pooling and flattening, which commute with it, and is applied where the next ``Quant``
needs it: a ``scale_shift`` by the multiplier m_c · 2^-k_c nearest S_c / s_out (23
significant bits) and the shift B_c / s_out on the same grid (or to 23 significant
bits), then the ``cast`` with the ``Quant``'s rounding and saturation. The graph input
with such a scale is read as a 24-bit fixed-point value first, then multiplied the same
way; an output with such a scale is given in real units, rounded to 16 fraction bits.

This is the QGraph's meaning of the model, and every artifact computes it exactly. It
can differ from the QONNX graph's real-number meaning (and from qonnx's float32
executor) where a value lies within the multiplier's relative error (2^-23) of a
rounding boundary, and at the output's last bit; ``qflow verify`` counts those samples
in the original graph's row.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from qflow.numerics import FixedType, Overflow, Rounding

#: significant bits of a multiplier that stands for a ratio of scales (a 24-bit signed
#: constant: exact in float32, as the QONNX export of the QGraph needs)
MULTIPLIER_BITS = 23
#: width of the fixed-point type the graph input is read into before its multiplier
RAW_INPUT_BITS = 24
#: fractional bits of a model's output when its scale is not a power of two
OUTPUT_FRACTION_BITS = 16


def multiplier(ratio: np.ndarray, bits: int = MULTIPLIER_BITS) -> tuple[np.ndarray, np.ndarray]:
    """(codes, fractions) with codes · 2^-fractions the ``bits``-significant-bit value
    nearest each positive ``ratio``."""
    ratio = np.asarray(ratio, dtype=np.float64).reshape(-1)
    if not np.all(ratio > 0):
        raise ValueError("a multiplier must be positive")
    _, exponent = np.frexp(ratio)  # ratio = mantissa · 2^exponent, mantissa in [0.5, 1)
    fracs = bits - exponent
    codes = np.rint(np.ldexp(ratio, fracs)).astype(np.int64)
    over = codes >= 1 << bits  # rounded up to the next power of two
    codes[over] >>= 1
    fracs[over] -= 1
    return codes, fracs.astype(np.int64)


def exact_codes(value: np.ndarray, scale: np.ndarray, rounding: Rounding, lo: int,
                hi: int) -> np.ndarray:
    """round(value / scale) clamped to [lo, hi], exactly (in rational arithmetic where
    float64 cannot tell a tie): the codes a ``Quant`` gives a constant. ``scale``
    broadcasts to ``value``."""
    value = np.asarray(value, dtype=np.float64)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), value.shape)
    quotient = value / scale
    codes = _round(quotient, rounding)
    near = np.abs(np.abs(quotient - np.floor(quotient)) - 0.5) < 1e-6
    for index in zip(*np.nonzero(near), strict=True):
        exact = Fraction(float(value[index])) / Fraction(float(scale[index]))
        codes[index] = _round_fraction(exact, rounding)
    return np.clip(codes, lo, hi).astype(np.int64)


def _round(x: np.ndarray, rounding: Rounding) -> np.ndarray:
    if rounding is Rounding.RND_CONV:
        return np.rint(x)
    if rounding is Rounding.TRN:
        return np.floor(x)
    if rounding is Rounding.TRN_ZERO:
        return np.trunc(x)
    if rounding is Rounding.RND_INF:
        return np.sign(x) * np.floor(np.abs(x) + 0.5)
    if rounding is Rounding.RND_ZERO:
        return np.sign(x) * np.ceil(np.abs(x) - 0.5)
    raise ValueError(f"rounding {rounding} is not a QONNX rounding mode")


def _round_fraction(x: Fraction, rounding: Rounding) -> int:
    floor = x.numerator // x.denominator
    rest = x - floor
    if rounding is Rounding.TRN:
        return floor
    if rounding is Rounding.TRN_ZERO:
        return floor if x >= 0 or rest == 0 else floor + 1
    if rest != Fraction(1, 2):
        return floor + (rest > Fraction(1, 2))
    return {Rounding.RND_CONV: floor + (floor % 2), Rounding.RND_INF: floor + (x > 0),
            Rounding.RND_ZERO: floor + (x < 0)}[rounding]


def raw_input_type(scale: float, width: int, signed: bool) -> FixedType:
    """The fixed-point type a graph input with a scale that is not a power of two is read
    into: ``RAW_INPUT_BITS`` wide, its range just covering the quantizer's (values beyond
    saturate, as the quantizer's own clamp would)."""
    top = (2 ** (width - 1) if signed else 2 ** width) * scale
    integer = int(np.ceil(np.log2(top))) + 1
    return FixedType(signed=signed, integer=integer, fractional=RAW_INPUT_BITS - integer
                     - int(signed), rounding=Rounding.RND_CONV, overflow=Overflow.SAT)


def affine_consts(scale: np.ndarray, shift: np.ndarray, in_frac: int, target: float) -> dict:
    """The constants of the ``scale_shift`` that maps values ``x · scale_c + shift_c`` (x
    the codes at ``in_frac`` fraction bits) to units of ``target``: multipliers nearest
    scale_c / target, shifts rounded to the product's grid or to 23 significant bits."""
    codes, fracs = multiplier(np.asarray(scale, dtype=np.float64) / target)
    shift = np.asarray(shift, dtype=np.float64) / target
    # the product's grid, or MULTIPLIER_BITS significant bits of the shift if coarser (every
    # constant stays a 24-bit signed code, exact in float32, as the QONNX export requires)
    _, exponent = np.frexp(shift)
    shift_fracs = np.minimum(in_frac + fracs, np.where(shift == 0, 0, MULTIPLIER_BITS - exponent))
    shift_codes = np.rint(np.ldexp(shift, shift_fracs))
    return {"scale": codes, "scale_frac": fracs, "shift": shift_codes.astype(np.int64),
            "shift_frac": shift_fracs.astype(np.int64)}
