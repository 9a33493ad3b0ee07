"""Integer-only transformer ops on int64 codes: softmax, LayerNorm, GELU and the product
of two activations. The specification, with every width and the proofs that nothing
overflows, is docs/transformer_ops.md; the torch twins are :mod:`qflow.ops.transformer`.

Each op is one array-namespace kernel (``xp`` is ``numpy`` or ``torch``, as in
:mod:`qflow.numerics.kernel`) that uses only integer add, subtract, multiply, shifts,
comparisons and, where stated, an integer division; the numpy functions here and the torch
twins both call it, so their codes cannot drift apart. The width rules
(:func:`softmax_widths`, :func:`layernorm_widths`, :func:`gelu_widths`,
:func:`matmul_accumulator_type`) check a type and row length once, raise ``ValueError``
naming the reason when some intermediate could leave int64, and give the shift amounts
and bounds that an HLS implementation needs too.

>>> import numpy as np
>>> from qflow.numerics import FixedType
>>> logits = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
>>> probs = FixedType.parse("ap_ufixed<8,0,AP_RND_CONV,AP_SAT>")
>>> fixed_softmax(np.array([32, 0, -32]), logits, probs).tolist()   # [1.0, 0.0, -1.0]
[170, 63, 23]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import kernel
from .types import MAX_WIDTH, FixedType, Overflow, Rounding

#: Every intermediate of every op stays below ``2**INT_LIMIT_BITS`` in magnitude: one bit of
#: headroom below int64's range, so a bound proven with a strict inequality still fits.
INT_LIMIT_BITS = 62

# --- shared integer helpers ----------------------------------------------------------------


def check_codes(codes, t: FixedType, name: str) -> None:
    """Refuse codes outside ``t``'s range: they would void every width proof.

    >>> check_codes(np.array([300]), FixedType.parse("ap_fixed<8,3>"), "codes")
    Traceback (most recent call last):
    ...
    ValueError: codes holds codes outside the range [-128, 127] of ap_fixed<8,3,AP_TRN,AP_WRAP>
    """
    if bool(((codes < t.qmin) | (codes > t.qmax)).any()):
        raise ValueError(f"{name} holds codes outside the range [{t.qmin}, {t.qmax}] of {t}")


def _as_codes(codes, name: str) -> np.ndarray:
    arr = np.asarray(codes)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer codes, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def reduced_length(shape, axis: int) -> int:
    """Length of the rows an op reduces over (``shape[axis]``), refusing empty rows.

    >>> reduced_length((2, 5), -1)
    5
    """
    if len(shape) == 0:
        raise ValueError("the op needs at least one dimension to reduce over")
    length = int(shape[axis])
    if length < 1:
        raise ValueError("rows along the reduced axis are empty")
    return length


def _shift(value, shift: int):
    """``floor(value * 2**-shift)``: a right shift, or an exact left shift when ``shift < 0``."""
    return value >> shift if shift >= 0 else value << -shift


def shift_requantize(q, from_fractional: int, t: FixedType, xp):
    """Codes at ``from_fractional`` bits to ``t``: an arithmetic right shift, ``t``'s rounding
    decided from the dropped bits, then ``t``'s overflow rule. Equal to
    :func:`qflow.numerics.requantize` (which is numpy-only) for a right shift, the only
    kind the transformer ops need: each keeps ``from_fractional > t.fractional``.

    >>> import numpy as np
    >>> t = FixedType(signed=True, integer=3, fractional=0, rounding="RND_CONV", overflow="SAT")
    >>> shift_requantize(np.array([5, 6, 7, 400]), 1, t, np).tolist()   # 2.5, 3, 3.5, 200
    [2, 3, 4, 7]
    """
    shift = from_fractional - t.fractional
    if not 1 <= shift <= INT_LIMIT_BITS:
        raise ValueError(f"a final right shift of {shift} bits is out of range 1..62")
    floor = q >> shift
    dropped = q & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    rounded = kernel.round_from_parts(floor, dropped > half, dropped == half, dropped != 0,
                                      q < 0, (floor & 1) == 1, t.rounding)
    return kernel.apply_overflow(rounded, t.width, t.signed, t.overflow, xp)


def shift_requantize_fast(q, from_fractional: int, t: FixedType, xp):
    """:func:`shift_requantize` with the same codes in fewer array operations: the rounding
    becomes one addition before the shift (the torch twins' path; the exporters trace
    :func:`shift_requantize`). With ``s`` the shift, ``h = 2**(s - 1)`` and ``floor`` the
    shifted value, ``(q + h - 1 + b) >> s`` is ``floor + 1`` when the dropped bits exceed
    ``h``, ``floor + b`` when they equal it and ``floor`` below: ``b`` is 1 for RND, 0 for
    RND_MIN_INF, ``floor & 1`` for RND_CONV, ``q < 0`` for RND_ZERO and ``q >= 0`` for
    RND_INF; TRN_ZERO adds ``2**s - 1`` to negative ``q`` (a ceiling). ``|q| < 2**62``
    keeps every sum inside int64.

    >>> t = FixedType(signed=True, integer=3, fractional=0, rounding="RND_CONV", overflow="SAT")
    >>> shift_requantize_fast(np.array([5, 6, 7, 400]), 1, t, np).tolist()
    [2, 3, 4, 7]
    """
    shift = from_fractional - t.fractional
    if not 1 <= shift <= INT_LIMIT_BITS:
        raise ValueError(f"a final right shift of {shift} bits is out of range 1..62")
    below_half = (1 << (shift - 1)) - 1
    rounding = t.rounding
    if rounding is Rounding.TRN:
        rounded = q >> shift
    elif rounding is Rounding.TRN_ZERO:
        rounded = (q + (q < 0) * ((1 << shift) - 1)) >> shift
    elif rounding is Rounding.RND:
        rounded = (q + (below_half + 1)) >> shift
    elif rounding is Rounding.RND_MIN_INF:
        rounded = (q + below_half) >> shift
    elif rounding is Rounding.RND_CONV:
        rounded = (q + ((q >> shift) & 1) + below_half) >> shift
    elif rounding is Rounding.RND_ZERO:
        rounded = (q + (q < 0) + below_half) >> shift
    elif rounding is Rounding.RND_INF:
        rounded = (q + (q >= 0) + below_half) >> shift
    else:
        raise ValueError(f"unknown rounding {rounding!r}")
    return kernel.apply_overflow(rounded, t.width, t.signed, t.overflow, xp)


#: Steps of :func:`integer_sqrt`: one per result bit of a 62-bit radicand.
ISQRT_STEPS = INT_LIMIT_BITS // 2


def integer_sqrt(n, xp=np):
    """``floor(sqrt(n))`` of int64 ``0 <= n < 2**62``, exact, by 31 bitwise steps.

    The restoring digit-by-digit method: each step tries the next result bit ``bit``
    (a power of four, from ``4**30`` down to 1) and keeps it when the remainder allows;
    every intermediate is at most ``n``.

    >>> integer_sqrt(np.array([0, 1, 15, 16, 17, 2**62 - 1])).tolist()
    [0, 1, 3, 4, 4, 2147483647]
    """
    if bool(((n < 0) | (n >= (1 << INT_LIMIT_BITS))).any()):
        raise ValueError("integer_sqrt takes 0 <= n < 2**62")
    return isqrt_steps(n, xp)


def isqrt_steps(n, xp=np):
    """The 31 steps of :func:`integer_sqrt` without its range check, for values whose
    range is proven elsewhere (the exporters trace these steps into their own ops).

    >>> isqrt_steps(np.array([99, 100])).tolist()
    [9, 10]
    """
    root = 0 * n
    bit = 1 << (2 * ISQRT_STEPS - 2)
    for _ in range(ISQRT_STEPS):
        trial = root + bit
        take = n >= trial
        n = xp.where(take, n - trial, n)
        root = xp.where(take, (root >> 1) + bit, root >> 1)
        bit >>= 2
    return root


def isqrt_float(n, xp=np):
    """``floor(sqrt(n))`` of int64 ``0 <= n < 2**62``, equal to :func:`integer_sqrt` (the
    definition, which the HLS code and the exporters keep), by one float64 square root and
    an exact correction: the torch twins' path, a few array operations instead of 31
    steps. No range check: the caller proves it.

    ``float64(n)`` is ``n`` below ``2**53`` and within ``2**8`` of it above, so
    ``sqrt(float64(n))`` is within ``2**-19`` of ``sqrt(n)``, and within ``2**-18`` after
    its own rounding (half an ulp of a value ``<= 2**31``). Its floor ``r`` is therefore
    ``floor(sqrt(n))`` or one off either way: ``r - 1`` when ``r**2 > n``, then ``r + 1``
    when ``(r + 1)**2 <= n``, is exact. Every product stays below
    ``(2**31 + 1)**2 < 2**63``.

    >>> isqrt_float(np.array([0, 1, 15, 16, 17, 2**62 - 1])).tolist()
    [0, 1, 3, 4, 4, 2147483647]
    """
    root = xp.asarray(xp.floor(xp.sqrt(xp.asarray(n, dtype=xp.float64))), dtype=xp.int64)
    root = xp.where(root * root > n, root - 1, root)
    return root + ((root + 1) * (root + 1) <= n)


def bit_length(n, xp=np):
    """Bits of int64 ``n >= 0`` (``int.bit_length``), by a 6-step binary search of shifts
    and comparisons: the leading-zero count an HLS priority encoder gives.

    >>> bit_length(np.array([0, 1, 2, 255, 256, 2**62])).tolist()
    [0, 1, 2, 8, 9, 63]
    """
    length = 0 * n
    for step in (32, 16, 8, 4, 2, 1):
        high = (n >> step) != 0
        n = xp.where(high, n >> step, n)
        length = length + xp.where(high, step, 0)
    return length + (n != 0)


def bit_length_float(n, xp=np):
    """:func:`bit_length` of int64 ``n >= 0`` from the exponent of ``float64(n)`` (the torch
    twins' path, equal codes): that exponent is the bit length, or one more where the
    conversion rounded ``n`` up to the next power of two, which ``n >> (e - 1) == 0``
    detects; ``n = 0`` has exponent 0. Exact for every ``0 <= n < 2**63``.

    >>> bit_length_float(np.array([0, 1, 2, 255, 256, 2**62, 2**62 - 1])).tolist()
    [0, 1, 2, 8, 9, 63, 62]
    """
    exponent = xp.asarray(xp.frexp(xp.asarray(n, dtype=xp.float64))[1], dtype=xp.int64)
    return exponent + ((n >> xp.clip(exponent - 1, 0, None)) != 0) + (n == 0) - 1


def narrowest_type(lo: int, hi: int, fractional: int) -> FixedType:
    """The narrowest type with ``fractional`` bits whose codes cover ``[lo, hi]``, with the
    HLS defaults TRN and WRAP (nothing is ever rounded or wrapped in it: it holds every
    value). The rule of ``qflow.graph.infer.type_for_range``, at the numerics layer.

    >>> str(narrowest_type(-128, 127, 4)), str(narrowest_type(0, 255, 0))
    ('ap_fixed<8,4,AP_TRN,AP_WRAP>', 'ap_ufixed<8,8,AP_TRN,AP_WRAP>')
    """
    lo, hi = int(lo), int(hi)
    signed = lo < 0
    width = max(hi.bit_length(), (-lo - 1).bit_length()) + 1 if signed else max(hi.bit_length(), 1)
    if width > MAX_WIDTH:
        raise ValueError(f"a result needs {width} bits, more than the {MAX_WIDTH} supported")
    return FixedType(signed=signed, integer=width - int(signed) - fractional,
                     fractional=fractional)


def _max_abs(t: FixedType) -> int:
    return max(-t.qmin, t.qmax)


# --- product of two activations ----------------------------------------------------------


def matmul_accumulator_type(a_type: FixedType, b_type: FixedType, depth: int) -> FixedType:
    """Exact type of a sum of ``depth`` products ``a * b``: the narrowest type holding
    ``depth`` times the smallest and the largest product of two codes (both reachable: all
    terms at the same corner), at ``a.fractional + b.fractional`` bits.

    >>> a = FixedType.parse("ap_fixed<8,3>")
    >>> str(matmul_accumulator_type(a, a, 64))   # (-128)**2 * 64 = 2**20 needs 22 bits
    'ap_fixed<22,12,AP_TRN,AP_WRAP>'
    """
    if depth < 0:
        raise ValueError(f"a product depth must be >= 0, got {depth}")
    corners = [x * y for x in (a_type.qmin, a_type.qmax) for y in (b_type.qmin, b_type.qmax)]
    return narrowest_type(depth * min(min(corners), 0), depth * max(max(corners), 0),
                          a_type.fractional + b_type.fractional)


def fixed_matmul(a_codes, a_type: FixedType, b_codes, b_type: FixedType):
    """Batched ``a @ b`` of int64 codes (``numpy.matmul`` broadcasting) and its exact
    accumulator type (:func:`matmul_accumulator_type` for ``K = a.shape[-1]``): attention's
    ``q @ k^T`` and ``probabilities @ v``. Exact: the type proves every partial sum fits.

    >>> a, b = FixedType.parse("ap_fixed<4,2>"), FixedType.parse("ap_ufixed<4,0>")
    >>> codes, acc = fixed_matmul([[1, -8], [7, 2]], a, [[15], [3]], b)
    >>> codes.tolist(), str(acc)
    ([[-9], [111]], 'ap_fixed<9,3,AP_TRN,AP_WRAP>')
    """
    a = _as_codes(a_codes, "a_codes")
    b = _as_codes(b_codes, "b_codes")
    check_codes(a, a_type, "a_codes")
    check_codes(b, b_type, "b_codes")
    acc = matmul_accumulator_type(a_type, b_type, a.shape[-1] if a.ndim else 0)
    return np.matmul(a, b), acc


# --- softmax -------------------------------------------------------------------------------

#: log2(e) at 16 fractional bits: round(1.4426950408889634 * 2**16).
LOG2E_FRAC_BITS = 16
LOG2E_CODE = 94548
#: Fractional bits kept of the exponent's fractional part rho (truncated).
POW2_ARG_BITS = 10
#: The curvature ``a`` of 2**-rho ~ 1 - rho/2 - a*rho*(1 - rho): 174 / 2**10 = 0.16992, the
#: code nearest to the a = 0.16988 that minimises the largest relative error on [0, 1).
POW2_CURVE_FRAC_BITS = 10
POW2_CURVE_CODE = 174
#: Fractional bits of an exp code: the quadratic is then an integer with no rounding.
EXP_FRAC_BITS = POW2_CURVE_FRAC_BITS + 2 * POW2_ARG_BITS
#: Extra bits of the row reciprocal beyond the output's fraction.
SOFTMAX_GUARD_BITS = 8
#: A bound on the relative error of the integer exp against e**x (before the final shift
#: floors it to whole codes); tests check it against math.exp.
EXP_REL_ERROR_BOUND = 0.004


@dataclass(frozen=True)
class SoftmaxWidths:
    """Shifts and bounds of :func:`fixed_softmax` for one input type, output type and row
    length (docs/transformer_ops.md, "Softmax")."""

    in_type: FixedType
    out_type: FixedType
    row_length: int
    arg_shift: int  # right shift from (max - q) * LOG2E_CODE to POW2_ARG_BITS fraction bits
    reciprocal_frac: int  # K: the reciprocal is floor(2**K / sum)
    max_scaled: int  # bound on (max - q) * LOG2E_CODE
    max_arg: int  # bound on the exponent at POW2_ARG_BITS fraction bits
    max_sum: int  # bound on the row's sum of exp codes


def softmax_widths(in_type: FixedType, out_type: FixedType, row_length: int) -> SoftmaxWidths:
    """Check and give the widths of :func:`fixed_softmax`.

    Refused: a signed output type; rows longer than ``2**out_type.fractional`` (the
    largest probability could then round to 0); an output type that cannot hold 1.0 under
    WRAP or SAT_ZERO (a certain probability would become 0); an output fraction above
    ``62 - EXP_FRAC_BITS - SOFTMAX_GUARD_BITS = 24`` bits; input types whose scaled
    differences would pass 2**62.

    >>> t_in = FixedType.parse("ap_fixed<8,3>")
    >>> t_out = FixedType.parse("ap_ufixed<8,0,AP_RND,AP_SAT>")
    >>> w = softmax_widths(t_in, t_out, 16)
    >>> w.arg_shift, w.reciprocal_frac, w.max_sum.bit_length()
    (11, 46, 35)
    """
    if row_length < 1:
        raise ValueError("softmax rows must hold at least one element")
    if out_type.signed:
        raise ValueError(f"softmax output type {out_type} must be unsigned (ap_ufixed)")
    frac = out_type.fractional
    if frac < 0 or row_length > (1 << frac):
        raise ValueError(
            f"softmax rows of {row_length} elements need at least {(row_length - 1).bit_length()}"
            f" fractional output bits ({out_type} has {frac}): the largest probability, at "
            "least 1/row_length, could otherwise round to 0")
    if out_type.qmax < (1 << frac) and out_type.overflow in (Overflow.WRAP, Overflow.SAT_ZERO):
        raise ValueError(
            f"softmax output type {out_type} cannot hold 1.0 and its overflow mode "
            f"{out_type.overflow} would turn a certain probability into 0: use SAT or an "
            "integer bit")
    reciprocal_frac = EXP_FRAC_BITS + frac + SOFTMAX_GUARD_BITS
    if reciprocal_frac > INT_LIMIT_BITS:
        raise ValueError(
            f"softmax output type {out_type} has {frac} fractional bits; at most "
            f"{INT_LIMIT_BITS - EXP_FRAC_BITS - SOFTMAX_GUARD_BITS} fit the 62-bit reciprocal")
    arg_shift = in_type.fractional + LOG2E_FRAC_BITS - POW2_ARG_BITS
    max_scaled = (in_type.qmax - in_type.qmin) * LOG2E_CODE
    max_arg = _shift(max_scaled, arg_shift)
    if max(max_scaled, max_arg).bit_length() > INT_LIMIT_BITS:
        raise ValueError(
            f"softmax input type {in_type}: scaled differences need "
            f"{max(max_scaled, max_arg).bit_length()} bits, more than {INT_LIMIT_BITS}")
    return SoftmaxWidths(in_type, out_type, row_length, arg_shift, reciprocal_frac,
                         max_scaled, max_arg, row_length << EXP_FRAC_BITS)


def exp_codes(diff, arg_shift: int, xp=np):
    """The exp codes of :func:`fixed_softmax`: about ``2**30 * e**(x - max)`` for the
    differences ``diff = max - q >= 0`` of codes, ``arg_shift`` from :func:`softmax_widths`.

    ``diff * LOG2E_CODE`` is ``(max - x) * log2(e)``; ``arg`` keeps ``POW2_ARG_BITS``
    fractional bits of it (floor); its integer part becomes a right shift and its
    fraction ``rho = r / 2**10`` goes through the quadratic
    ``2**30 - r * 2**19 - 174 * r * (2**10 - r)`` = ``2**30 * (1 - rho/2 - a*rho*(1-rho))``,
    which is exactly ``2**30`` at ``rho = 0`` and decreasing in ``r``.

    >>> exp_codes(np.array([0, 32, 64]), 11).tolist()   # 2**30 * e**[0, -1, -2]
    [1073741824, 395615999, 145033726]
    """
    scaled = diff * LOG2E_CODE
    arg = _shift(scaled, arg_shift)
    whole = arg >> POW2_ARG_BITS
    # E0 < 2**(EXP_FRAC_BITS + 1): shifting it further right than this only gives 0 again
    whole = xp.where(whole > EXP_FRAC_BITS + 1, EXP_FRAC_BITS + 1, whole)
    rho = arg & ((1 << POW2_ARG_BITS) - 1)
    curve = POW2_CURVE_CODE * rho * ((1 << POW2_ARG_BITS) - rho)
    frac_pow = (1 << EXP_FRAC_BITS) - (rho << (EXP_FRAC_BITS - POW2_ARG_BITS - 1)) - curve
    return frac_pow >> whole


def softmax_kernel(codes, widths: SoftmaxWidths, axis: int, xp, fast: bool = False):
    """:func:`fixed_softmax` on an ``xp`` int64 array whose types and row length
    ``widths`` has checked (the torch twin calls this too, with ``fast``: the same codes
    by :func:`shift_requantize_fast`).

    >>> t_in = FixedType.parse("ap_fixed<4,2>")
    >>> t_out = FixedType.parse("ap_ufixed<4,0,AP_TRN,AP_SAT>")
    >>> w = softmax_widths(t_in, t_out, 2)
    >>> softmax_kernel(np.array([[3, 3], [-8, 7]]), w, -1, np).tolist()
    [[8, 8], [0, 15]]
    """
    check_codes(codes, widths.in_type, "codes")
    diff = xp.amax(codes, axis=axis, keepdims=True) - codes
    exps = exp_codes(diff, widths.arg_shift, xp)
    total = xp.sum(exps, axis=axis, keepdims=True)  # >= 2**EXP_FRAC_BITS: the max's own term
    reciprocal = (1 << widths.reciprocal_frac) // total
    requantize = shift_requantize_fast if fast else shift_requantize
    return requantize(exps * reciprocal, widths.reciprocal_frac, widths.out_type, xp)


def fixed_softmax(codes, in_type: FixedType, out_type: FixedType, axis: int = -1) -> np.ndarray:
    """Integer-only softmax along ``axis``: int64 codes of ``in_type`` in, codes of the
    unsigned ``out_type`` out (docs/transformer_ops.md, "Softmax").

    exp(x - max) by shifts and a quadratic (:func:`exp_codes`), an integer row sum, one
    integer division per row for a reciprocal, then a product per element cast to
    ``out_type`` (its rounding and overflow). The row's largest element never gets code 0.

    >>> t_in = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
    >>> t_out = FixedType.parse("ap_ufixed<8,0,AP_RND_CONV,AP_SAT>")
    >>> fixed_softmax([[0, 0], [127, -128]], t_in, t_out).tolist()   # 0.5 0.5; 1 and ~0
    [[128, 128], [255, 0]]
    """
    q = _as_codes(codes, "codes")
    widths = softmax_widths(in_type, out_type, reduced_length(q.shape, axis))
    return softmax_kernel(q, widths, axis, np)


# --- LayerNorm -----------------------------------------------------------------------------

#: Fractional bits of the normalised value beyond what the output and gamma's integer bits
#: need: its rounding error stays below 2**-(LN_GUARD_BITS + 1) output LSBs.
LN_GUARD_BITS = 8
#: The row's N**2 * variance is scaled by 4**t into [2**60, 2**62): a 31-bit square root.
LN_ROOT_BITS = INT_LIMIT_BITS // 2


@dataclass(frozen=True)
class LayerNormWidths:
    """Shifts and bounds of :func:`fixed_layernorm` (docs/transformer_ops.md, "LayerNorm")."""

    in_type: FixedType
    gamma_type: FixedType
    beta_type: FixedType
    out_type: FixedType
    row_length: int
    reciprocal_frac: int  # K: the reciprocal is floor(2**K / root)
    norm_frac: int  # Z: fractional bits of the normalised value
    beta_shift: int  # left shift aligning beta to norm_frac + gamma's fraction
    max_moment: int  # bound on N * sum(q**2) and sum(q)**2
    max_result: int  # bound on |z * gamma + beta|
    max_norm: int = 0  # bound on |z|, the normalised value at norm_frac bits


def layernorm_widths(in_type: FixedType, gamma_type: FixedType, beta_type: FixedType,
                     out_type: FixedType, row_length: int) -> LayerNormWidths:
    """Check and give the widths of :func:`fixed_layernorm`.

    Refused when ``N**2 * max|q|**2`` (the moments) or the affine result would pass
    2**62, or when the normalised value would need a fraction too fine for the
    reciprocal.

    >>> t = FixedType.parse("ap_fixed<8,3>")
    >>> w = layernorm_widths(t, t, t, t, 64)
    >>> w.reciprocal_frac, w.norm_frac, w.beta_shift
    (58, 15, 15)
    """
    n = row_length
    if n < 1:
        raise ValueError("LayerNorm rows must hold at least one element")
    max_moment = n * n * _max_abs(in_type) ** 2
    if max_moment.bit_length() > INT_LIMIT_BITS:
        raise ValueError(f"LayerNorm over {n} elements of {in_type}: N**2 * max|q|**2 needs "
                         f"{max_moment.bit_length()} bits, more than {INT_LIMIT_BITS}")
    # (|c| << t) * reciprocal < sqrt(N - 1) * 2**(K + 1) <= 2**62
    reciprocal_frac = INT_LIMIT_BITS - 1 - (((n - 1).bit_length() + 1) // 2)
    norm_frac = max(out_type.fractional + max(gamma_type.integer, 0) + LN_GUARD_BITS,
                    beta_type.fractional - gamma_type.fractional, 0)
    if norm_frac >= reciprocal_frac:
        raise ValueError(f"LayerNorm output {out_type} with gamma {gamma_type} needs "
                         f"{norm_frac} fractional bits, the reciprocal has {reciprocal_frac}")
    beta_shift = norm_frac + gamma_type.fractional - beta_type.fractional
    # |z| <= sqrt(N - 1) * 2**Z * (1 + 2**-30) + 1/2: |x_hat| <= sqrt(N - 1), the floors of
    # the root and the reciprocal add at most 2**-30 of it, the rounding half an LSB
    root_bound = math.isqrt((n - 1) << (2 * norm_frac)) + 1
    max_norm = root_bound + (root_bound >> 30) + 2
    max_result = max_norm * _max_abs(gamma_type) + (_max_abs(beta_type) << beta_shift)
    if max_result.bit_length() > INT_LIMIT_BITS:
        raise ValueError(f"LayerNorm affine result needs {max_result.bit_length()} bits, more "
                         f"than {INT_LIMIT_BITS} (gamma {gamma_type}, beta {beta_type})")
    return LayerNormWidths(in_type, gamma_type, beta_type, out_type, n, reciprocal_frac,
                           norm_frac, beta_shift, max_moment, max_result, max_norm)


def _along(vector, axis: int, ndim: int, length: int, name: str):
    """A per-element parameter (one value, or ``length`` values) laid along ``axis``."""
    count = vector.shape[0] if vector.ndim == 1 else 1
    if vector.ndim > 1 or count not in (1, length):
        raise ValueError(f"{name} must be one value or {length} values, got shape "
                         f"{tuple(vector.shape)}")
    shape = [1] * ndim
    shape[axis] = count
    return vector.reshape(shape)


def layernorm_kernel(codes, gamma, beta, widths: LayerNormWidths, axis: int, xp,
                     fast: bool = False):
    """:func:`fixed_layernorm` on ``xp`` int64 arrays whose types and row length
    ``widths`` has checked (the torch twin calls this too, with ``fast``: the same codes
    by :func:`bit_length_float`, :func:`isqrt_float` and
    :func:`shift_requantize_fast`).

    >>> t = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
    >>> w = layernorm_widths(t, t, t, t, 2)
    >>> layernorm_kernel(np.array([[1, 3]]), np.array(32), np.array(0), w, -1, np).tolist()
    [[-32, 32]]
    """
    check_codes(codes, widths.in_type, "codes")
    check_codes(gamma, widths.gamma_type, "gamma_codes")
    check_codes(beta, widths.beta_type, "beta_codes")
    n, ndim = widths.row_length, codes.ndim
    gamma = _along(gamma, axis, ndim, n, "gamma_codes")
    beta = _along(beta, axis, ndim, n, "beta_codes")
    total = xp.sum(codes, axis=axis, keepdims=True)  # N * mean, never rounded
    spread = n * xp.sum(codes * codes, axis=axis, keepdims=True) - total * total  # N**2 * var
    centred = n * codes - total  # N * (q - mean)
    bits = bit_length_float(spread, xp) if fast else bit_length(spread, xp)
    norm_shift = (INT_LIMIT_BITS - bits) >> 1
    scaled = spread << (2 * norm_shift)  # in [2**60, 2**62), or 0
    root = isqrt_float(scaled, xp) if fast else integer_sqrt(scaled, xp)  # [2**30, 2**31)
    root = xp.where(root == 0, 1, root)  # zero variance: every centred value is 0 anyway
    reciprocal = (1 << widths.reciprocal_frac) // root
    drop = widths.reciprocal_frac - widths.norm_frac
    magnitude = ((xp.abs(centred) << norm_shift) * reciprocal + (1 << (drop - 1))) >> drop
    norm = xp.where(centred < 0, -magnitude, magnitude)  # rounded half away from zero
    result = norm * gamma + (beta << widths.beta_shift)
    requantize = shift_requantize_fast if fast else shift_requantize
    return requantize(result, widths.norm_frac + widths.gamma_type.fractional,
                      widths.out_type, xp)


def fixed_layernorm(codes, in_type: FixedType, gamma_codes, gamma_type: FixedType,
                    beta_codes, beta_type: FixedType, out_type: FixedType,
                    axis: int = -1) -> np.ndarray:
    """Integer-only LayerNorm along ``axis`` (docs/transformer_ops.md, "LayerNorm").

    The mean is never rounded (deviations are kept as ``N*q - sum(q)``), the variance is
    the integer ``N*sum(q**2) - sum(q)**2``, its square root is exact
    (:func:`integer_sqrt` after an even normalising shift), one integer division per row
    gives a reciprocal, the normalised value is rounded half away from zero, then
    ``gamma`` and ``beta`` (one value, or one per element of the axis) and the cast to
    ``out_type``. A row of equal values (zero variance) gives ``beta``.

    >>> t = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
    >>> one, half = 32, 16   # codes of 1.0 and 0.5 in t
    >>> fixed_layernorm([[0, 32, 64, 96], [5, 5, 5, 5]], t, one, t, half, t, t).tolist()
    [[-27, 2, 30, 59], [16, 16, 16, 16]]
    """
    q = _as_codes(codes, "codes")
    gamma = _as_codes(gamma_codes, "gamma_codes")
    beta = _as_codes(beta_codes, "beta_codes")
    widths = layernorm_widths(in_type, gamma_type, beta_type, out_type,
                              reduced_length(q.shape, axis))
    return layernorm_kernel(q, gamma, beta, widths, axis, np)


# --- GELU ----------------------------------------------------------------------------------
# I-BERT's erf polynomial, L(z) = sign(z) * (-0.2888 * (min(|z|, 1.769) - 1.769)**2 + 1),
# at z = x / sqrt(2): 1 + erf(x / sqrt(2)) ~ 1 + sign(x) * (1 - 0.1444 * (c - min(|x|, c))**2)
# with c = 1.769 * sqrt(2).

#: c = 1.769 * sqrt(2) = 2.50174 at 12 fractional bits: round(2.5017437918 * 2**12).
GELU_CLIP_FRAC_BITS = 12
GELU_CLIP_CODE = 10247
#: 0.2888 / 2 = 0.1444 at 12 fractional bits: round(0.1444 * 2**12).
GELU_CURVE_FRAC_BITS = 12
GELU_CURVE_CODE = 591
#: Fractional bits of 1 + erf(x / sqrt(2)), a value in [0, 2].
GELU_FACTOR_FRAC_BITS = 2 * GELU_CLIP_FRAC_BITS + GELU_CURVE_FRAC_BITS


@dataclass(frozen=True)
class GeluWidths:
    """Shifts and bounds of :func:`fixed_gelu` (docs/transformer_ops.md, "GELU")."""

    in_type: FixedType
    out_type: FixedType
    arg_shift: int  # right shift bringing |q| to GELU_CLIP_FRAC_BITS fraction bits
    arg_limit: int  # |q| above this is past the clip point (used before a left shift)
    product_frac: int  # fraction of q * (1 + erf): in_frac + GELU_FACTOR_FRAC_BITS + 1
    max_product: int


def gelu_widths(in_type: FixedType, out_type: FixedType) -> GeluWidths:
    """Check and give the widths of :func:`fixed_gelu`: refused when ``q * (1 + erf)``
    would pass 2**62 (input types wider than 25 bits) or the final shift is not in 1..62.

    >>> w = gelu_widths(FixedType.parse("ap_fixed<8,3>"), FixedType.parse("ap_fixed<8,3>"))
    >>> w.arg_shift, w.product_frac
    (-7, 42)
    """
    arg_shift = in_type.fractional - GELU_CLIP_FRAC_BITS
    arg_limit = (GELU_CLIP_CODE >> -arg_shift) + 1 if arg_shift < 0 else 0
    product_frac = in_type.fractional + GELU_FACTOR_FRAC_BITS + 1  # + 1: the factor x / 2
    max_product = _max_abs(in_type) << (GELU_FACTOR_FRAC_BITS + 1)
    if max_product.bit_length() > INT_LIMIT_BITS:
        raise ValueError(f"GELU input type {in_type} is too wide: x * (1 + erf) needs "
                         f"{max_product.bit_length()} bits, more than {INT_LIMIT_BITS}")
    if arg_shift < 0 and (arg_limit << -arg_shift).bit_length() > INT_LIMIT_BITS:
        raise ValueError(f"GELU input type {in_type} has {in_type.fractional} fractional "
                         f"bits: its argument would need a left shift of {-arg_shift} bits")
    if not 1 <= product_frac - out_type.fractional <= INT_LIMIT_BITS:
        raise ValueError(f"GELU from {in_type} to {out_type}: the final right shift of "
                         f"{product_frac - out_type.fractional} bits is out of range 1..62")
    return GeluWidths(in_type, out_type, arg_shift, arg_limit, product_frac, max_product)


def gelu_kernel(codes, widths: GeluWidths, xp, fast: bool = False):
    """:func:`fixed_gelu` on an ``xp`` int64 array whose types ``widths`` has checked
    (the torch twin calls this too, with ``fast``: the same codes by
    :func:`shift_requantize_fast`).

    >>> t = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
    >>> gelu_kernel(np.array([-32, 0, 32]), gelu_widths(t, t), np).tolist()
    [-5, 0, 27]
    """
    check_codes(codes, widths.in_type, "codes")
    magnitude = xp.abs(codes)
    if widths.arg_shift >= 0:
        arg = magnitude >> widths.arg_shift  # |x| truncated to 12 fractional bits
    else:  # past the clip point already: limit first so the left shift cannot overflow
        magnitude = xp.where(magnitude > widths.arg_limit, widths.arg_limit, magnitude)
        arg = magnitude << -widths.arg_shift
    arg = xp.where(arg > GELU_CLIP_CODE, GELU_CLIP_CODE, arg)
    gap = GELU_CLIP_CODE - arg  # c - min(|x|, c) >= 0
    tail = GELU_CURVE_CODE * gap * gap  # 0.1444 * gap**2 = 1 - |erf| ~ in [0, 0.904]
    factor = xp.where(codes >= 0, (2 << GELU_FACTOR_FRAC_BITS) - tail, tail)  # 1 + erf
    requantize = shift_requantize_fast if fast else shift_requantize
    return requantize(codes * factor, widths.product_frac, widths.out_type, xp)


def fixed_gelu(codes, in_type: FixedType, out_type: FixedType) -> np.ndarray:
    """Integer-only GELU, ``x/2 * (1 + erf(x/sqrt(2)))`` with I-BERT's quadratic erf
    (docs/transformer_ops.md, "GELU"): one square, two products, one cast to ``out_type``.

    >>> t = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
    >>> fixed_gelu([-128, -32, 0, 16, 127], t, t).tolist()   # -4, -1, 0, 0.5, 3.97
    [0, -5, 0, 11, 127]
    """
    q = _as_codes(codes, "codes")
    return gelu_kernel(q, gelu_widths(in_type, out_type), np)
