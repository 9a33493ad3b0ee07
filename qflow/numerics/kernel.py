"""Array-namespace kernels shared by the numpy (``qflow.numerics``) and torch (``qflow.ops``)
implementations, so that the two cannot drift apart.

``xp`` is ``numpy`` or ``torch``: only functions both spell the same way are used
(floor, trunc, round, clip, where, fmod, remainder, log2, exp2, abs, sign, asarray, int64).
All float arithmetic here is exact: scaling by powers of two, floor/trunc, and
subtractions whose result is representable. Overflow handling runs on int64 codes,
because codes of more than 53 bits (widths up to ``MAX_WIDTH``) do not fit a double.
"""

from __future__ import annotations

import math

from .types import Overflow, Rounding


def code_range(width: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(1 << (width - 1)), (1 << (width - 1)) - 1
    return 0, (1 << width) - 1


def sat_sym_low(width: int, signed: bool) -> int:
    """Lowest code under SAT_SYM: ``-qmax`` for signed types, as ap_fixed does.

    ap_fixed builds the negative limit as bit pattern ``10...01``, which for a 1-bit
    signed type is ``1``, i.e. ``-1 = qmin`` rather than ``-qmax = 0``: there SAT_SYM
    behaves like SAT. We follow the headers so that casts stay bit-exact with HLS.
    """
    qmin, qmax = code_range(width, signed)
    if not signed or width == 1:
        return qmin
    return -qmax


def reduce_range(t, width: int, signed: bool, overflow: Overflow, xp):
    """Bring a scaled value ``t`` into a small range without changing the final code.

    The saturating modes clamp ``t`` to ``±2**width``: rounding is monotone and maps
    integers to themselves, and both bounds lie outside the code range, so the clamped
    value saturates (or is zeroed) exactly as the original; the bounds are exact in
    floating point and in int64, unlike ``qmin - 1`` or ``qmax`` for wide types. WRAP only
    needs ``t`` modulo ``2**width``, and ``fmod`` keeps the sign, the fractional part
    and (``2**width`` being even) the parity that the tie rules look at.

    Under WRAP, ``t`` is first clamped to ``±2**(width + 53)``: a double that large is a
    multiple of ``2**(width + 1)``, so its code is 0, as is the bound's. This also maps
    an infinite ``t`` (scaling ``x * 2**fractional`` overflowed) to code 0, which is
    exact: the ulp of such an ``x * 2**fractional`` is at least ``2**971 > 2**width``.
    Either way ``|result| <= 2**width``, so the rounded value fits int64.
    """
    if overflow is not Overflow.WRAP:
        bound = 2.0**width
        return xp.clip(t, -bound, bound)
    bound = 2.0 ** (width + 53)
    return xp.fmod(xp.clip(t, -bound, bound), float(1 << width))


def round_from_parts(floor, above_half, at_half, has_fraction, negative, odd, rounding):
    """Round given ``floor(t)`` and how the dropped fraction compares with one half.

    Works on floats and on integers alike; the boolean masks are added as 0/1.
    """
    if rounding is Rounding.TRN:
        return floor
    if rounding is Rounding.TRN_ZERO:
        return floor + (has_fraction & negative)
    if rounding is Rounding.RND:
        return floor + (above_half | at_half)
    if rounding is Rounding.RND_ZERO:
        return floor + (above_half | (at_half & negative))
    if rounding is Rounding.RND_INF:
        return floor + (above_half | (at_half & ~negative))
    if rounding is Rounding.RND_MIN_INF:
        return floor + above_half
    if rounding is Rounding.RND_CONV:
        return floor + (above_half | (at_half & odd))
    raise ValueError(f"unknown rounding {rounding!r}")


def round_scaled(t, rounding: Rounding, xp):
    """Round float ``t`` to an integer-valued float by ``rounding`` (exact)."""
    if rounding is Rounding.TRN:
        return xp.floor(t)
    if rounding is Rounding.TRN_ZERO:
        return xp.trunc(t)
    if rounding is Rounding.RND_CONV:
        return xp.round(t)  # numpy and torch both round half to even
    floor = xp.floor(t)
    frac = t - floor  # exact: both operands share the exponent range of t
    return round_from_parts(floor, frac > 0.5, frac == 0.5, frac > 0, t < 0, None, rounding)


def apply_overflow(q, width: int, signed: bool, overflow: Overflow, xp):
    """Map int64 ``q`` with ``|q| <= 2**62`` into the ``width``-bit code range (exact)."""
    qmin, qmax = code_range(width, signed)
    if overflow is Overflow.SAT:
        return xp.clip(q, qmin, qmax)
    if overflow is Overflow.SAT_SYM:
        return xp.clip(q, sat_sym_low(width, signed), qmax)
    if overflow is Overflow.SAT_ZERO:
        return xp.where((q < qmin) | (q > qmax), 0 * q, q)
    return xp.remainder(q - qmin, 1 << width) + qmin


def quantize_scaled(t, width: int, signed: bool, rounding: Rounding, overflow: Overflow, xp):
    """int64 codes of ``t = x * 2**fractional``."""
    t = reduce_range(t, width, signed, overflow, xp)
    q = xp.asarray(round_scaled(t, rounding, xp), dtype=xp.int64)  # exact: |q| <= 2**62
    return apply_overflow(q, width, signed, overflow, xp)


def float_at_most(n: int) -> float:
    """The largest double ``<= n`` (``float(n)`` may round up for ``n >= 2**53``)."""
    f = float(n)
    return f if int(f) <= n else math.nextafter(f, -math.inf)


def khot_scaled(t, k: int, width: int, signed: bool, xp):
    """Greedy sum of at most ``k`` signed powers of two approximating ``t`` (in codes).

    Each step takes the power of two nearest to the remaining residual (ties to the
    smaller power; residuals below one half give a zero term), halving it when the
    running sum would leave ``[-qmax, qmax]``. The result is on the code grid and fits
    ``width`` bits, so a product with it is ``k`` shifts and adds.
    """
    lim = float_at_most(code_range(width, signed)[1])  # qmax, unless it has > 53 bits
    t = xp.clip(t, -lim if signed else 0.0, lim)
    top = float(width - 2 if signed else width - 1)  # largest exponent with 2**e <= qmax
    acc = 0 * t
    for _ in range(k):
        residual = t - acc
        mag = xp.abs(residual)
        safe = xp.where(mag >= 1, mag, 1 + 0 * mag)
        e = xp.floor(xp.log2(safe))
        e = xp.where(xp.exp2(e) > safe, e - 1, e)  # guard libm rounding near powers of two
        e = xp.where(xp.exp2(e + 1) <= safe, e + 1, e)
        low = xp.exp2(xp.clip(e, 0, top))
        high = xp.exp2(xp.clip(e + 1, 0, top))
        term = xp.where(high - mag < mag - low, high, low)
        term = xp.where(mag <= 0.5, 0 * term, term)
        step = xp.sign(residual) * term
        # A nearest power is at most 4/3 of the residual, so half of it keeps the sum
        # between acc and t, hence in range.
        step = xp.where(xp.abs(acc + step) > lim, step / 2, step)
        step = xp.where(xp.abs(step) < 1, 0 * step, step)
        acc = acc + step
    return acc
