"""Array-namespace kernels shared by the numpy (``qflow.numerics``) and torch (``qflow.ops``)
implementations, so that the two cannot drift apart.

``xp`` is ``numpy`` or ``torch``: only functions both spell the same way are used
(floor, trunc, round, clip, where, fmod, remainder, log2, exp2, abs, sign, zeros_like).
All float arithmetic here is exact: scaling by powers of two, floor/trunc, and
subtractions whose result is representable. Float codes are therefore exact whenever
the code itself is representable (every code of up to 53 bits in float64, 24 in float32).
"""

from __future__ import annotations

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

    Rounding is monotone and maps integers to themselves, so clamping to the code range
    before rounding gives the same result as clamping after (SAT, SAT_SYM); one code of
    margin keeps SAT_ZERO's out-of-range test intact (see :func:`quantize_scaled` for
    when ``qmin - 1`` is not representable); WRAP only needs ``t`` modulo ``2**width``,
    and ``fmod`` keeps the sign, the fractional part and (``2**width`` being even) the
    parity that the tie rules look at.

    Under WRAP, ``|t| >= 2**(width + 53)`` becomes 0 first: such a float is a multiple of
    ``2**(width + 1)``, so its code is 0 anyway. That includes an infinite ``t`` (scaling
    ``x * 2**fractional`` overflowed), whose exact value has an ulp of at least
    ``2**971 > 2**width``; ``fmod`` would turn it into NaN.
    """
    qmin, qmax = code_range(width, signed)
    if overflow is Overflow.SAT:
        return xp.clip(t, qmin, qmax)
    if overflow is Overflow.SAT_SYM:
        return xp.clip(t, sat_sym_low(width, signed), qmax)
    if overflow is Overflow.SAT_ZERO:
        return xp.clip(t, qmin - 1, qmax + 1)
    if overflow is Overflow.WRAP:
        t = xp.where(xp.abs(t) < 2.0 ** (width + 53), t, xp.zeros_like(t))
        return xp.fmod(t, float(1 << width))
    raise ValueError(f"unknown overflow {overflow!r}")


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
    # t - floor can round (t = -0.5 + 2**-54 would look like a tie); floor + 0.5 is exact
    # while |floor| < 2**(mantissa bits - 1), and beyond that t has no fraction at all.
    mid = floor + 0.5
    has_fraction = t > floor
    above = has_fraction & (t > mid)
    at_half = has_fraction & (t == mid)
    return round_from_parts(floor, above, at_half, has_fraction, t < 0, None, rounding)


def undo_underflow(x, scaled, xp):
    """Float64 ``scaled = x * 2**f`` with underflow to zero undone: a nonzero ``x`` keeps
    a nonzero ``scaled`` of its sign (the smallest subnormal), which every rounding mode
    treats like the true tiny value (TRN of a tiny negative value is -1, not 0)."""
    return xp.where((scaled == 0) & (x != 0), xp.sign(x) * 5e-324, scaled)


def apply_overflow(q, width: int, signed: bool, overflow: Overflow, xp):
    """Map integer-valued ``q`` (float or int array) into the ``width``-bit code range."""
    qmin, qmax = code_range(width, signed)
    if overflow is Overflow.SAT:
        return xp.clip(q, qmin, qmax)
    if overflow is Overflow.SAT_SYM:
        return xp.clip(q, sat_sym_low(width, signed), qmax)
    if overflow is Overflow.SAT_ZERO:
        return xp.where((q < qmin) | (q > qmax), 0 * q, q)
    if overflow is Overflow.WRAP:
        return xp.remainder(q - qmin, 1 << width) + qmin
    raise ValueError(f"unknown overflow {overflow!r}")


def quantize_scaled(t, width: int, signed: bool, rounding: Rounding, overflow: Overflow, xp):
    """Codes (as integer-valued floats) of ``t = x * 2**fractional``.

    Exact whenever the code is representable in ``t``'s dtype. The comparisons use
    ``qmin`` and ``qmax + 1``, which are 0 or powers of two and so exact in any float
    format (``qmax`` and ``qmin - 1`` are not, past the mantissa width).
    """
    q = round_scaled(reduce_range(t, width, signed, overflow, xp), rounding, xp)
    qmin, qmax = code_range(width, signed)
    if overflow is Overflow.WRAP:
        # reduce_range left |q| <= 2**width, so one period at most is added or taken
        # away, in one operation: exact when the code is representable, unlike
        # remainder(q - qmin, 2**width) + qmin, whose q - qmin rounds for wide types.
        period = float(1 << width)
        q = xp.where(q >= qmax + 1, q - period, q)
        return xp.where(q < qmin, q + period, q)
    if overflow is Overflow.SAT_ZERO:
        # Where qmin - 1 is not representable it rounds to qmin, and the clamp in
        # reduce_range pulls a t below the range into it; such a t is below qmin - 1.
        return xp.where((q < qmin) | (q >= qmax + 1) | (t < qmin - 1), 0 * q, q)
    # SAT, SAT_SYM: reduce_range clamped to the integer bounds apply_overflow would clamp
    # to, and rounding is monotone and keeps integers, so q is in range already.
    return q


def khot_scaled(t, k: int, width: int, signed: bool, xp):
    """Greedy sum of at most ``k`` signed powers of two approximating ``t`` (in codes).

    Each step takes the power of two nearest to the remaining residual (ties to the
    smaller power; residuals below one half give a zero term), halving it when the
    running sum would leave ``[-qmax, qmax]``. The result is on the code grid and fits
    ``width`` bits, so a product with it is ``k`` shifts and adds.
    """
    qmax = code_range(width, signed)[1]
    t = xp.clip(t, -qmax if signed else 0, qmax)
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
        # qmax + 1 is a power of two, exact in any float format; qmax may round up.
        step = xp.where(xp.abs(acc + step) >= qmax + 1, step / 2, step)
        step = xp.where(xp.abs(step) < 1, 0 * step, step)
        acc = acc + step
    return acc
