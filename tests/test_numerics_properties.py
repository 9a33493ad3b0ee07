"""Properties of the fixed-point casts in ``qflow.numerics`` and their torch twins in ``qflow.ops``.

Expected codes come from a reference written here with Python ints and ``Fraction``s,
never from qflow itself. Types cover widths 1..32 (1..53 for the reference check), signed
and unsigned, with ``I`` from -8 to ``W + 8``, under every rounding and overflow mode.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qflow import ops
from qflow.numerics import (
    MAX_WIDTH,
    FixedType,
    Overflow,
    Rounding,
    cast,
    from_codes,
    khot_codes,
    parse_overflow,
    parse_rounding,
    requantize,
    to_codes,
)

ROUNDINGS = list(Rounding)
OVERFLOWS = list(Overflow)
# No example database: it would write .hypothesis/ into the shared tree.
PROPERTY = settings(max_examples=150, deadline=None, database=None)

# Subnormals are left out: see test_negative_subnormal_truncates_to_minus_one_lsb.
finite_floats = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)
FAR = [1e30, 2.0**60, 2.0**60 + 2.0**8, 1e300, sys.float_info.max]  # beyond any I <= 40


# --- exact reference -----------------------------------------------------------------


def ref_round(r: Fraction, rounding: Rounding) -> int:
    low = math.floor(r)
    rest = r - low
    if rounding is Rounding.TRN:
        return low
    if rounding is Rounding.TRN_ZERO:
        return math.trunc(r)
    if rest != Fraction(1, 2):
        return low + (rest > Fraction(1, 2))
    return {
        Rounding.RND: low + 1,
        Rounding.RND_ZERO: low if r > 0 else low + 1,
        Rounding.RND_INF: low + 1 if r > 0 else low,
        Rounding.RND_MIN_INF: low,
        Rounding.RND_CONV: low + low % 2,
    }[rounding]


def sat_sym_low(t: FixedType) -> int:
    # ap_fixed writes the negative SAT_SYM limit as bit pattern 10..01, which for W = 1
    # is 1, i.e. -1 = qmin rather than -qmax = 0 (checked against the C++ headers in
    # test_numerics_ap_fixed.py).
    return -t.qmax if t.signed and t.width > 1 else t.qmin


def ref_overflow(q: int, t: FixedType) -> int:
    if t.overflow is Overflow.SAT:
        return min(max(q, t.qmin), t.qmax)
    if t.overflow is Overflow.SAT_SYM:
        return min(max(q, sat_sym_low(t)), t.qmax)
    if t.overflow is Overflow.SAT_ZERO:
        return q if t.qmin <= q <= t.qmax else 0
    return (q - t.qmin) % (1 << t.width) + t.qmin


def ref_code(x: float, t: FixedType) -> int:
    return ref_overflow(ref_round(Fraction(x) * Fraction(2) ** t.fractional, t.rounding), t)


def min_signed_powers(n: int) -> int:
    """Fewest signed powers of two that sum to ``n``: the weight of its non-adjacent form."""
    n, count = abs(n), 0
    while n:
        if n & 1:
            n -= 2 - (n & 3)  # digit +1 when n = 1 mod 4, -1 when n = 3 mod 4
            count += 1
        n >>= 1
    return count


def np_codes(xs: np.ndarray, t: FixedType) -> np.ndarray:
    # Scaling DBL_MAX-sized values by 2**f overflows to inf; the kernel maps that exactly.
    with np.errstate(over="ignore"):
        return to_codes(xs, t)


def np_cast(xs: np.ndarray, t: FixedType) -> np.ndarray:
    with np.errstate(over="ignore"):
        return cast(xs, t)


# --- strategies ------------------------------------------------------------------------


@st.composite
def fixed_types(draw, max_width: int = 32) -> FixedType:
    signed = draw(st.booleans())
    width = draw(st.integers(1, max_width))
    int_width = draw(st.integers(-8, width + 8))  # ap_fixed's I: below 0 and above W too
    return FixedType.from_width(
        width,
        int_width,
        signed=signed,
        rounding=draw(st.sampled_from(ROUNDINGS)),
        overflow=draw(st.sampled_from(OVERFLOWS)),
    )


def values_for(t: FixedType, max_size: int = 40):
    """Values on a grid 3 bits finer than ``t`` around its range (so ties are common),
    mixed with arbitrary doubles."""
    span = t.qmax - t.qmin + 1
    fine = st.integers((t.qmin - span) << 3, (t.qmax + span + 1) << 3).map(
        lambda q: math.ldexp(q, -(t.fractional + 3))
    )
    far = st.sampled_from(FAR + [-x for x in FAR])
    return st.lists(st.one_of(fine, fine, finite_floats, far), min_size=1, max_size=max_size).map(
        lambda xs: np.array(xs, dtype=np.float64)
    )


typed_values = fixed_types().flatmap(lambda t: st.tuples(st.just(t), values_for(t)))


# --- casts -------------------------------------------------------------------------------


@PROPERTY
@given(typed_values)
def test_to_codes_matches_exact_reference(case):
    t, xs = case
    assert np_codes(xs, t).tolist() == [ref_code(float(x), t) for x in xs]


@PROPERTY
@given(fixed_types(max_width=53).flatmap(lambda t: st.tuples(st.just(t), values_for(t))))
def test_wide_types_match_exact_reference(case):
    # Float codes are exact up to 53 bits; wider types need an integer path (not covered).
    t, xs = case
    assert np_codes(xs, t).tolist() == [ref_code(float(x), t) for x in xs]


@PROPERTY
@given(typed_values)
def test_float32_casts_are_exact_where_the_code_fits(case):
    # ops.cast computes in the input's dtype; float32 holds every code below 2**24.
    t, xs = case
    with np.errstate(over="ignore"):
        x32 = xs.astype(np.float32)
    tiny = np.finfo(np.float32).tiny  # float32 subnormals: same underflow as float64's
    x32 = x32[np.isfinite(x32) & ((x32 == 0) | (np.abs(x32) >= tiny))]
    codes = np_codes(x32.astype(np.float64), t)
    fits = np.abs(codes) < 2**24
    got = ops.cast(torch.from_numpy(x32), t).numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[fits], from_codes(codes, t).astype(np.float32)[fits])


@PROPERTY
@given(typed_values)
def test_cast_is_idempotent(case):
    t, xs = case
    once = np_cast(xs, t)
    np.testing.assert_array_equal(cast(once, t), once)
    np.testing.assert_array_equal(to_codes(once, t), np_codes(xs, t))


@PROPERTY
@given(typed_values)
def test_results_are_on_the_grid_and_in_range(case):
    t, xs = case
    codes, values = np_codes(xs, t), np_cast(xs, t)
    assert codes.dtype == np.int64
    lsb = Fraction(2) ** -t.fractional
    for q, v in zip(codes.tolist(), values.tolist(), strict=True):
        assert Fraction(v) == q * lsb
        assert t.qmin <= q <= t.qmax
        if t.overflow is Overflow.SAT_SYM:
            assert sat_sym_low(t) <= q


@PROPERTY
@given(fixed_types(), st.data())
def test_exact_ties_follow_the_rounding_rule(t, data):
    # x = (k + 1/2) LSB with k and k + 1 both codes, so only the rounding decides.
    ks = data.draw(st.lists(st.integers(t.qmin, t.qmax - 1), min_size=1, max_size=20))
    xs = np.array([math.ldexp(k + 0.5, -t.fractional) for k in ks])
    rule = {
        Rounding.TRN: lambda k: k,
        Rounding.TRN_ZERO: lambda k: k if k >= 0 else k + 1,
        Rounding.RND: lambda k: k + 1,
        Rounding.RND_ZERO: lambda k: k if k >= 0 else k + 1,
        Rounding.RND_INF: lambda k: k + 1 if k >= 0 else k,
        Rounding.RND_MIN_INF: lambda k: k,
        Rounding.RND_CONV: lambda k: k if k % 2 == 0 else k + 1,
    }[t.rounding]
    expected = [ref_overflow(rule(k), t) for k in ks]  # SAT_SYM may still clip qmin
    assert to_codes(xs, t).tolist() == expected
    assert ops.to_codes(torch.from_numpy(xs), t).tolist() == expected


@PROPERTY
@given(
    fixed_types(),
    st.lists(
        st.one_of(st.sampled_from(FAR), st.floats(2.0**45, sys.float_info.max)),
        min_size=1,
        max_size=10,
    ),
    st.booleans(),
)
def test_far_out_of_range_values_saturate_zero_or_wrap(t, magnitudes, negative):
    xs = np.array(magnitudes) * (-1.0 if negative else 1.0)
    codes = np_codes(xs, t).tolist()
    if t.overflow is Overflow.SAT:
        assert codes == [t.qmin if negative else t.qmax] * len(xs)
    elif t.overflow is Overflow.SAT_SYM:
        assert codes == [sat_sym_low(t) if negative else t.qmax] * len(xs)
    elif t.overflow is Overflow.SAT_ZERO:
        assert codes == [0] * len(xs)
    else:
        scaled = [Fraction(float(x)) * Fraction(2) ** t.fractional for x in xs]
        rounded = [ref_round(r, t.rounding) for r in scaled]  # f < 0 can leave a fraction
        assert codes == [(q - t.qmin) % (1 << t.width) + t.qmin for q in rounded]
    assert ops.to_codes(torch.from_numpy(xs), t).tolist() == codes


@PROPERTY
@given(typed_values)
def test_numpy_and_torch_agree(case):
    t, xs = case
    x = torch.from_numpy(xs)
    np.testing.assert_array_equal(ops.to_codes(x, t).numpy(), np_codes(xs, t))
    np.testing.assert_array_equal(ops.cast(x, t).numpy(), np_cast(xs, t))


@PROPERTY
@given(
    st.integers(-8, 40),
    st.lists(
        st.one_of(st.integers(-(2**20), 2**20), st.integers(-(2**52) + 1, 2**52 - 1)),
        min_size=1,
        max_size=40,
    ),
    fixed_types(),
)
def test_requantize_equals_the_float_path(from_fractional, codes, t):
    # A 53-bit source type holds every code drawn, so from_codes is exact.
    src = FixedType(signed=True, integer=52 - from_fractional, fractional=from_fractional)
    q = np.array(codes, dtype=np.int64)
    expected = to_codes(from_codes(q, src), t)
    np.testing.assert_array_equal(requantize(q, from_fractional, t), expected)
    np.testing.assert_array_equal(ops.requantize(torch.from_numpy(q), from_fractional, t), expected)


def test_negative_subnormal_truncates_to_minus_one_lsb():
    t = FixedType.parse("ap_fixed<16,20,AP_TRN,AP_SAT>")  # f = -4
    xs = np.array([-5e-324])
    got = [to_codes(xs, t).tolist(), ops.to_codes(torch.from_numpy(xs), t).tolist()]
    assert got == [[-1], [-1]]


# --- K-hot -------------------------------------------------------------------------------


@PROPERTY
@given(typed_values, st.integers(1, 4))
def test_khot_codes_are_k_signed_powers_of_two_in_range(case, k):
    t, xs = case
    with np.errstate(over="ignore"):
        codes = khot_codes(xs, t, k)
    assert codes.dtype == np.int64
    for q in codes.tolist():
        assert t.qmin <= q <= t.qmax
        assert min_signed_powers(q) <= k
    np.testing.assert_array_equal(ops.khot_codes(torch.from_numpy(xs), t, k).numpy(), codes)


# --- type strings ------------------------------------------------------------------------


@PROPERTY
@given(fixed_types(max_width=MAX_WIDTH))
def test_type_strings_round_trip(t):
    assert FixedType.parse(t.to_ap()) == t
    assert FixedType.parse(t.to_hls4ml()) == t
    assert str(t) == t.to_ap()


@PROPERTY
@given(st.integers(1, MAX_WIDTH), st.integers(-8, 70), st.booleans())
def test_omitted_modes_default_to_trn_wrap(width, int_width, signed):
    t = FixedType.from_width(width, int_width, signed=signed)
    assert (t.rounding, t.overflow) == (Rounding.TRN, Overflow.WRAP)
    kind = "ap_fixed" if signed else "ap_ufixed"
    assert FixedType.parse(f"{kind}<{width},{int_width}>") == t
    assert FixedType.parse(f"{kind}< {width} , {int_width} >") == t
    assert FixedType.parse(f"{kind}<{width},{int_width},AP_TRN,AP_WRAP,0>") == t
    assert FixedType.parse(f"{kind.removeprefix('ap_')}<{width},{int_width}>") == t
    rnd = FixedType.parse(f"{kind}<{width},{int_width},AP_RND>")
    assert (rnd.rounding, rnd.overflow) == (Rounding.RND, Overflow.WRAP)


def test_known_type_fields():
    t = FixedType.parse("ap_ufixed<6,-2,AP_RND_CONV,AP_SAT_SYM>")
    assert (t.signed, t.integer, t.fractional, t.width, t.int_width) == (False, -2, 8, 6, -2)
    assert (t.qmin, t.qmax) == (0, 63)
    t = FixedType.parse("fixed<4,7,RND_INF,SAT_ZERO>")
    assert (t.integer, t.fractional, t.qmin, t.qmax) == (6, -3, -8, 7)


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: FixedType.from_width(0, 0),
        lambda: FixedType.from_width(0, 3, signed=False),
        lambda: FixedType.from_width(MAX_WIDTH + 1, 4),
        lambda: FixedType(signed=False, integer=MAX_WIDTH, fractional=1),
        lambda: FixedType.parse("ap_fixed<0,0>"),
        lambda: FixedType.parse(f"ap_fixed<{MAX_WIDTH + 1},1>"),
        lambda: FixedType.from_width(8, 3, rounding="RND_UP"),
        lambda: FixedType.from_width(8, 3, overflow="CLAMP"),
        lambda: FixedType.parse("ap_fixed<8,3,AP_RND_UP>"),
        lambda: FixedType.parse("ap_fixed<8,3,AP_RND,AP_WRAP_SM>"),  # real, but unsupported
        lambda: FixedType.parse("ap_fixed<8,3,AP_RND,AP_SAT,2>"),
        lambda: FixedType.parse("ap_fixed<8>"),
        lambda: FixedType.parse("ap_int<8>"),
        lambda: parse_rounding("nearest"),
        lambda: parse_overflow("AP_SATURATE"),
    ],
)
def test_bad_types_raise(make):
    with pytest.raises(ValueError):
        make()


def test_non_integer_bit_counts_raise():
    with pytest.raises(TypeError):
        FixedType(signed=True, integer=2.0, fractional=5)
    with pytest.raises(TypeError):
        FixedType(signed=True, integer=True, fractional=5)


def test_width_limits_are_accepted():
    assert FixedType.from_width(1, 1).width == 1
    assert FixedType.from_width(MAX_WIDTH, 1, signed=False).width == MAX_WIDTH


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_raise(bad):
    t = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
    xs = np.array([0.5, bad])
    for fn in (to_codes, cast, lambda x, t: khot_codes(x, t, 2)):
        with pytest.raises(ValueError):
            fn(xs, t)
    for fn in (ops.to_codes, ops.cast, lambda x, t: ops.khot_codes(x, t, 2)):
        with pytest.raises(ValueError):
            fn(torch.from_numpy(xs), t)


def test_bad_arguments_raise():
    t = FixedType.parse("ap_fixed<8,3>")
    with pytest.raises(ValueError):
        khot_codes([1.0], t, 0)
    with pytest.raises(ValueError):
        ops.khot_codes(torch.ones(1, dtype=torch.float64), t, 0)
    with pytest.raises(ValueError):
        requantize([1], t.fractional + 63, t)
    with pytest.raises(TypeError):
        to_codes(np.array(["1.0"]), t)


def test_near_tie_below_zero_is_not_a_tie():
    """t = -0.5 + 2**-54 lies above the tie: t - floor(t) would round to exactly 0.5."""
    t = FixedType(signed=True, integer=3, fractional=0, rounding="RND_INF", overflow="SAT")
    x = np.array([-0.5 + 2.0**-54, -0.5, -1.5 + 2.0**-52])
    expected = [0, -1, -1]  # nearest: 0; a true tie goes away from zero; nearest: -1
    assert to_codes(x, t).tolist() == expected
    assert ops.to_codes(torch.from_numpy(x), t).tolist() == expected
    t_min = t.replace(rounding="RND_MIN_INF")
    assert to_codes(x, t_min).tolist() == [0, -1, -1]


def test_real_values_into_types_wider_than_53_bits_are_refused():
    wide = FixedType(signed=True, integer=40, fractional=20)
    with pytest.raises(ValueError, match="wider than 53 bits"):
        to_codes([1.0], wide)
    with pytest.raises(ValueError, match="wider than 53 bits"):
        ops.to_codes(torch.tensor([1.0]), wide)
