"""Integer-only transformer ops (``qflow.numerics.transformer``) and their torch twins
(``qflow.ops.transformer``), against the specification in docs/transformer_ops.md.

Expected codes come from a per-row transcription of the spec with Python ints (no width
limit) and ``qflow.numerics.requantize`` for the final cast; accuracy is checked against
the float ops (``math.erf``, ``exp``) with bounds derived in the spec.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qflow import ops
from qflow.numerics import FixedType, Overflow, Rounding, requantize
from qflow.numerics import transformer as tr
from qflow.ops import transformer as tt

# No example database: it would write .hypothesis/ into the shared tree.
PROPERTY = settings(max_examples=100, deadline=None, database=None)
SPEC = Path(__file__).resolve().parents[1] / "docs" / "transformer_ops.md"
SATURATING = (Overflow.SAT, Overflow.SAT_SYM)


# --- strategies ------------------------------------------------------------------------


@st.composite
def fixed_types(draw, min_width=2, max_width=16, signed=None, overflows=tuple(Overflow)):
    signed = draw(st.booleans()) if signed is None else signed
    width = draw(st.integers(min_width, max_width))
    int_width = draw(st.integers(-3, width + 3))
    return FixedType.from_width(width, int_width, signed=signed,
                                rounding=draw(st.sampled_from(list(Rounding))),
                                overflow=draw(st.sampled_from(overflows)))


@st.composite
def softmax_out_types(draw, row_length: int, saturating_only=False):
    """Unsigned types accepted for rows of ``row_length``: enough fractional bits, and a
    saturating overflow unless 1.0 fits."""
    least = (row_length - 1).bit_length()
    frac = draw(st.integers(least, min(least + 10, 24)))
    integer = max(draw(st.integers(-3, 3)), 1 - frac)
    overflows = list(SATURATING) if integer < 1 or saturating_only else list(Overflow)
    return FixedType(signed=False, integer=integer, fractional=frac,
                     rounding=draw(st.sampled_from(list(Rounding))),
                     overflow=draw(st.sampled_from(overflows)))


@st.composite
def code_rows(draw, t: FixedType, rows: int, length: int):
    """Random codes, mixed with the extremes: equal rows, one huge element over the most
    negative codes, all-negative rows, all codes at the minimum or maximum."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.integers(t.qmin, t.qmax + 1, (rows, length))
    pattern = draw(st.sampled_from(["random", "equal", "huge", "negative", "min", "max", "mix"]))
    if pattern == "equal":
        q[:] = q[:, :1]
    elif pattern == "huge":
        q[:] = t.qmin
        q[np.arange(rows), rng.integers(0, length, rows)] = t.qmax
    elif pattern == "negative":
        q = rng.integers(t.qmin, min(t.qmax, -1) + 1, (rows, length)) if t.signed else q
    elif pattern in ("min", "max"):
        q[:] = t.qmin if pattern == "min" else t.qmax
    elif pattern == "mix":
        q = np.where(rng.random((rows, length)) < 0.5, t.qmin, t.qmax)
    return q.astype(np.int64)


def lengths():
    return st.one_of(st.just(1), st.integers(2, 70))


# --- spec transcriptions with Python ints ------------------------------------------------


def cast_exact(value: int, frac: int, t: FixedType) -> int:
    return int(requantize(np.array([value], dtype=np.int64), frac, t)[0])


def ref_softmax_row(row, t_in: FixedType, t_out: FixedType) -> list[int]:
    one, arg_bits = tr.EXP_FRAC_BITS, tr.POW2_ARG_BITS
    shift = t_in.fractional + tr.LOG2E_FRAC_BITS - arg_bits
    exps = []
    for q in row:
        scaled = (max(row) - q) * tr.LOG2E_CODE
        arg = scaled >> shift if shift >= 0 else scaled << -shift
        whole, rho = arg >> arg_bits, arg % (1 << arg_bits)
        frac_pow = (1 << one) - rho * (1 << (one - arg_bits - 1)) \
            - tr.POW2_CURVE_CODE * rho * ((1 << arg_bits) - rho)
        exps.append(frac_pow >> whole)  # Python ints: no clamp of the shift needed
    k = one + t_out.fractional + tr.SOFTMAX_GUARD_BITS
    reciprocal = (1 << k) // sum(exps)
    return [cast_exact(e * reciprocal, k, t_out) for e in exps]


def ref_layernorm_row(row, t_in, gamma, t_gamma, beta, t_beta, t_out) -> list[int]:
    n = len(row)
    total = sum(row)
    spread = n * sum(q * q for q in row) - total * total
    k = 61 - ((n - 1).bit_length() + 1) // 2
    z = max(t_out.fractional + max(t_gamma.integer, 0) + tr.LN_GUARD_BITS,
            t_beta.fractional - t_gamma.fractional, 0)
    norm = [0] * n
    if spread:
        t = (62 - spread.bit_length()) // 2
        reciprocal = (1 << k) // math.isqrt(spread << (2 * t))
        for i, q in enumerate(row):
            c = n * q - total
            mag = ((abs(c) << t) * reciprocal + (1 << (k - z - 1))) >> (k - z)
            norm[i] = -mag if c < 0 else mag
    frac = z + t_gamma.fractional
    return [cast_exact(norm[i] * gamma[i] + (beta[i] << (frac - t_beta.fractional)), frac, t_out)
            for i in range(n)]


def ref_gelu(q: int, t_in: FixedType, t_out: FixedType) -> int:
    shift = t_in.fractional - tr.GELU_CLIP_FRAC_BITS
    arg = abs(q) >> shift if shift >= 0 else abs(q) << -shift
    gap = tr.GELU_CLIP_CODE - min(arg, tr.GELU_CLIP_CODE)
    tail = tr.GELU_CURVE_CODE * gap * gap
    bits = tr.GELU_FACTOR_FRAC_BITS
    factor = (2 << bits) - tail if q >= 0 else tail
    return cast_exact(q * factor, t_in.fractional + bits + 1, t_out)


# --- float references --------------------------------------------------------------------


def float_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def float_gelu(x: np.ndarray) -> np.ndarray:
    return np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.ravel()]
                    ).reshape(x.shape)


def float_layernorm(x, gamma, beta):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    safe = np.where(var > 0, var, 1.0)
    return np.where(var > 0, (x - mean) / np.sqrt(safe), 0.0) * gamma + beta


def saturate(values, t: FixedType):
    low = -t.max_value if (t.overflow is Overflow.SAT_SYM and t.signed) else t.min_value
    return np.clip(values, low, t.max_value)


def values(codes, t: FixedType) -> np.ndarray:
    return np.asarray(codes, dtype=np.float64) * t.lsb


# --- shared integer helpers --------------------------------------------------------------

EDGE_RADICANDS = [0, 1, 2, 3, 4, 2**60 - 1, 2**60, 2**61, 2**62 - 1]


@PROPERTY
@given(st.lists(st.one_of(st.integers(0, 2**62 - 1), st.integers(0, 2**31 - 1).map(
    lambda r: r * r), st.integers(1, 2**31 - 1).map(lambda r: r * r - 1)), min_size=1,
    max_size=50))
def test_integer_sqrt_is_exact(ns):
    ns = ns + EDGE_RADICANDS
    expected = [math.isqrt(n) for n in ns]
    assert tr.integer_sqrt(np.array(ns, dtype=np.int64)).tolist() == expected
    assert tr.integer_sqrt(torch.tensor(ns), torch).tolist() == expected


def test_integer_sqrt_of_every_small_number_and_square():
    ns = np.arange(0, 70000, dtype=np.int64)
    roots = np.arange(1, 2**31, 99991, dtype=np.int64)
    squares = np.concatenate([roots * roots, roots * roots - 1, roots * roots + 1])
    for n in (ns, squares[squares < 2**62]):
        assert tr.integer_sqrt(n).tolist() == [math.isqrt(v) for v in n.tolist()]
    with pytest.raises(ValueError, match="0 <= n < 2"):
        tr.integer_sqrt(np.array([2**62]))
    with pytest.raises(ValueError, match="0 <= n < 2"):
        tr.integer_sqrt(np.array([-1]))


@PROPERTY
@given(st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=50))
def test_bit_length_matches_python(ns):
    expected = [n.bit_length() for n in ns]
    assert tr.bit_length(np.array(ns, dtype=np.int64)).tolist() == expected
    assert tr.bit_length(torch.tensor(ns), torch).tolist() == expected
    ns = [*ns, 0, 2**53 - 1, 2**53, 2**53 + 1, 2**62 - 1, 2**62, 2**63 - 1]
    expected = [n.bit_length() for n in ns]
    assert tr.bit_length_float(np.array(ns, dtype=np.int64)).tolist() == expected
    assert tr.bit_length_float(torch.tensor(ns), torch).tolist() == expected


def _float_sqrt_radicands():
    """Powers of two, their predecessors, squares and their neighbours up to the largest
    radicand the LayerNorm width rules allow (``V * 4**t < 2**62``), and random values."""
    limit = 1 << tr.INT_LIMIT_BITS
    powers = [1 << k for k in range(tr.INT_LIMIT_BITS)]
    roots = [math.isqrt(limit - 1) - d for d in range(4)] + [2**k + d for k in range(31)
                                                            for d in (-1, 0, 1)]
    squares = [r * r + d for r in roots for d in (-1, 0, 1)]
    rng = np.random.default_rng(0)
    random = rng.integers(0, limit, 200_000, dtype=np.int64).tolist()
    random += [int(r) ** 2 - 1 for r in rng.integers(1, 2**31, 20_000)]
    ns = powers + [p - 1 for p in powers] + squares + random + [limit - 1]
    return np.array(sorted({n for n in ns if 0 <= n < limit}), dtype=np.int64)


def test_float_sqrt_equals_the_bitwise_one():
    small = np.arange(1 << 20, dtype=np.int64)
    for n in (small, _float_sqrt_radicands()):
        expected = tr.isqrt_steps(n)
        np.testing.assert_array_equal(tr.isqrt_float(n), expected)
        np.testing.assert_array_equal(tr.isqrt_float(torch.from_numpy(n), torch).numpy(),
                                      expected)
    assert tr.isqrt_float(np.array([2**62 - 1])).tolist() == [math.isqrt(2**62 - 1)]


@PROPERTY
@given(st.lists(st.one_of(st.integers(0, 2**62 - 1), st.integers(0, 2**31 - 1).map(
    lambda r: r * r), st.integers(1, 2**31 - 1).map(lambda r: r * r - 1)), min_size=1,
    max_size=50))
def test_float_sqrt_is_exact(ns):
    expected = [math.isqrt(n) for n in ns]
    assert tr.isqrt_float(np.array(ns, dtype=np.int64)).tolist() == expected
    assert tr.isqrt_float(torch.tensor(ns), torch).tolist() == expected


@PROPERTY
@given(fixed_types(min_width=1, max_width=40), st.integers(1, 20),
       st.lists(st.integers(-(2**45), 2**45), min_size=1, max_size=40))
def test_shift_requantize_equals_requantize(t, shift, codes):
    q = np.array(codes, dtype=np.int64)
    expected = requantize(q, t.fractional + shift, t)
    np.testing.assert_array_equal(tr.shift_requantize(q, t.fractional + shift, t, np), expected)
    got = tr.shift_requantize(torch.from_numpy(q), t.fractional + shift, t, torch)
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(tr.shift_requantize_fast(q, t.fractional + shift, t, np),
                                  expected)
    got = tr.shift_requantize_fast(torch.from_numpy(q), t.fractional + shift, t, torch)
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("rounding", list(Rounding))
@pytest.mark.parametrize("shift", [1, 2, 7, 30, 61, 62])
def test_fast_shift_requantize_equals_the_spec_at_full_width(rounding, shift):
    t = FixedType.from_width(16, 4, signed=True, rounding=rounding, overflow=Overflow.SAT)
    rng = np.random.default_rng(shift)
    limit = 1 << tr.INT_LIMIT_BITS  # |q| < 2**62, as every width rule proves
    span = min(shift + 2, tr.INT_LIMIT_BITS - 1)
    edges = [0, 1, -1, limit - 1, -(limit - 1)]
    for k in range(1, tr.INT_LIMIT_BITS):
        half = 1 << (k - 1)
        edges += [half - 1, half, half + 1, -half + 1, -half, -half - 1,
                  3 * half, -3 * half]
    q = np.concatenate([np.array(edges, dtype=np.int64),
                        rng.integers(-(limit - 1), limit, 20_000, dtype=np.int64),
                        rng.integers(-(1 << span), 1 << span, 2_000)])
    from_fractional = t.fractional + shift
    expected = tr.shift_requantize(q, from_fractional, t, np)
    np.testing.assert_array_equal(tr.shift_requantize_fast(q, from_fractional, t, np), expected)
    got = tr.shift_requantize_fast(torch.from_numpy(q), from_fractional, t, torch)
    np.testing.assert_array_equal(got.numpy(), expected)


# --- softmax -------------------------------------------------------------------------------


def test_softmax_constants_are_the_stated_ones():
    assert round(math.log2(math.e) * 2**tr.LOG2E_FRAC_BITS) == tr.LOG2E_CODE
    # The curvature code is the best of its neighbours for the largest relative error.
    rho = np.linspace(0.0, 1.0, 20001)

    def worst(code):
        a = code / 2**tr.POW2_CURVE_FRAC_BITS
        return np.abs((1 - rho / 2 - a * rho * (1 - rho)) / 2.0**-rho - 1).max()

    code = tr.POW2_CURVE_CODE
    assert worst(code) < min(worst(code - 1), worst(code + 1))


@pytest.mark.parametrize("frac", [-4, 0, 3, 5, 7, 12, 15])
def test_exp_is_monotone_exact_at_zero_and_within_its_error_bound(frac):
    t = FixedType(signed=True, integer=15 - frac, fractional=frac)
    w = tr.softmax_widths(t, FixedType(signed=False, integer=1, fractional=8), 1)
    diff = np.arange(0, t.qmax - t.qmin + 1, dtype=np.int64)
    exps = tr.exp_codes(diff, w.arg_shift)
    assert exps[0] == 1 << tr.EXP_FRAC_BITS
    assert (np.diff(exps) <= 0).all()
    true = np.exp(-diff * t.lsb)
    err = np.abs(exps / 2.0**tr.EXP_FRAC_BITS - true)
    assert (err <= tr.EXP_REL_ERROR_BOUND * true + 2.0**-tr.EXP_FRAC_BITS).all()


@st.composite
def softmax_cases(draw, saturating_only=False):
    length = draw(lengths())
    t_in = draw(fixed_types())
    t_out = draw(softmax_out_types(length, saturating_only))
    return t_in, t_out, draw(code_rows(t_in, draw(st.integers(1, 4)), length))


@PROPERTY
@given(softmax_cases())
def test_softmax_follows_the_spec_and_the_twins_agree(case):
    t_in, t_out, q = case
    got = tr.fixed_softmax(q, t_in, t_out)
    assert got.dtype == np.int64
    assert got.tolist() == [ref_softmax_row(row, t_in, t_out) for row in q.tolist()]
    assert tt.fixed_softmax(torch.from_numpy(q), t_in, t_out).tolist() == got.tolist()
    as_values = tt.fixed_softmax(torch.from_numpy(values(q, t_in)), t_in, t_out)
    np.testing.assert_array_equal(as_values.numpy(), values(got, t_out))
    # along another axis: the same rows
    np.testing.assert_array_equal(tr.fixed_softmax(q.T, t_in, t_out, axis=0), got.T)


@PROPERTY
@given(softmax_cases())
def test_softmax_max_is_never_zero_and_rows_sum_to_one(case):
    t_in, t_out, q = case
    got = tr.fixed_softmax(q, t_in, t_out)
    top = got[np.arange(len(q)), q.argmax(axis=1)]
    assert (top >= 1).all()
    # Before the cast the row sums to (1 - 2**-guard, 1]; where the type reaches 1 - LSB
    # each cast moves an element by at most one LSB (rounding, or saturating a 1.0).
    if t_out.integer >= 0:
        sums = values(got, t_out).sum(axis=1)
        assert (np.abs(sums - 1) <= q.shape[1] * t_out.lsb + 2.0**-tr.SOFTMAX_GUARD_BITS).all()


@PROPERTY
@given(softmax_cases(saturating_only=True))
def test_softmax_is_close_to_the_float_softmax(case):
    t_in, t_out, q = case
    p = float_softmax(values(q, t_in))
    eps = tr.EXP_REL_ERROR_BOUND
    bound = (2 * eps / (1 - eps) * p + 2 * q.shape[1] * 2.0**-tr.EXP_FRAC_BITS
             + 2.0**-(t_out.fractional + tr.SOFTMAX_GUARD_BITS) + t_out.lsb)
    err = np.abs(values(tr.fixed_softmax(q, t_in, t_out), t_out) - saturate(p, t_out))
    assert (err <= bound).all()


@PROPERTY
@given(softmax_cases(), st.data())
def test_softmax_depends_only_on_differences_and_is_monotone(case, data):
    t_in, t_out, q = case
    got = tr.fixed_softmax(q, t_in, t_out)
    room_up, room_down = t_in.qmax - q.max(), q.min() - t_in.qmin
    offset = data.draw(st.integers(-room_down, room_up))
    np.testing.assert_array_equal(tr.fixed_softmax(q + offset, t_in, t_out), got)
    order = np.argsort(q, axis=1, kind="stable")
    assert (np.diff(np.take_along_axis(got, order, axis=1), axis=1) >= 0).all()


def test_softmax_extremes():
    t_in = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
    t_out = FixedType.parse("ap_ufixed<8,0,AP_RND_CONV,AP_SAT>")
    one_huge = tr.fixed_softmax([[127, -128, -128, -128]], t_in, t_out)
    assert one_huge.tolist() == [[255, 0, 0, 0]]  # 1.0 saturates to 255/256; e**-8 < 1/512
    assert tr.fixed_softmax([[5]], t_in, t_out).tolist() == [[255]]  # a row of one
    equal = tr.fixed_softmax(np.full((3, 5), -128), t_in, t_out)
    assert (equal == round(256 / 5)).all()  # RND_CONV of 51.2


def test_softmax_refuses_types_that_break_its_guarantees():
    t_in = FixedType.parse("ap_fixed<8,3>")
    sat = FixedType.parse("ap_ufixed<8,0,AP_RND,AP_SAT>")
    with pytest.raises(ValueError, match="unsigned"):
        tr.fixed_softmax([[0, 1]], t_in, FixedType.parse("ap_fixed<8,1,AP_RND,AP_SAT>"))
    with pytest.raises(ValueError, match="round to 0"):
        tr.fixed_softmax(np.zeros((1, 257), dtype=np.int64), t_in, sat)
    with pytest.raises(ValueError, match=r"cannot hold 1\.0"):
        tr.fixed_softmax([[0, 1]], t_in, FixedType.parse("ap_ufixed<8,0,AP_RND,AP_WRAP>"))
    with pytest.raises(ValueError, match="fractional bits"):
        tr.fixed_softmax([[0, 1]], t_in, FixedType.parse("ap_ufixed<30,1,AP_RND,AP_SAT>"))
    with pytest.raises(ValueError, match="outside the range"):
        tr.fixed_softmax([[0, 200]], t_in, sat)
    with pytest.raises(TypeError, match="integer codes"):
        tr.fixed_softmax([[0.5]], t_in, sat)
    with pytest.raises(ValueError, match="not codes of"):
        tt.fixed_softmax(torch.tensor([0.01]), t_in, sat)


# --- LayerNorm -----------------------------------------------------------------------------


@st.composite
def layernorm_cases(draw, saturating_only=False):
    length = draw(lengths())
    t_in = draw(fixed_types())
    t_gamma, t_beta = draw(fixed_types()), draw(fixed_types())
    overflows = SATURATING if saturating_only else tuple(Overflow)
    t_out = draw(fixed_types(signed=True, overflows=overflows))
    q = draw(code_rows(t_in, draw(st.integers(1, 4)), length))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    per_element = draw(st.booleans())
    size = length if per_element else 1
    gamma = rng.integers(t_gamma.qmin, t_gamma.qmax + 1, size)
    beta = rng.integers(t_beta.qmin, t_beta.qmax + 1, size)
    return t_in, q, t_gamma, gamma, t_beta, beta, t_out


def run_layernorm(case, module=tr, axis=-1):
    t_in, q, t_gamma, gamma, t_beta, beta, t_out = case
    return module.fixed_layernorm(q, t_in, gamma, t_gamma, beta, t_beta, t_out, axis=axis)


@PROPERTY
@given(layernorm_cases())
def test_layernorm_follows_the_spec_and_the_twins_agree(case):
    t_in, q, t_gamma, gamma, t_beta, beta, t_out = case
    got = run_layernorm(case)
    n = q.shape[1]
    g, b = np.broadcast_to(gamma, n).tolist(), np.broadcast_to(beta, n).tolist()
    assert got.tolist() == [ref_layernorm_row(row, t_in, g, t_gamma, b, t_beta, t_out)
                            for row in q.tolist()]
    as_tensors = [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in case]
    assert run_layernorm(as_tensors, tt).tolist() == got.tolist()
    as_values = tt.fixed_layernorm(
        torch.from_numpy(values(q, t_in)), t_in, torch.from_numpy(values(gamma, t_gamma)),
        t_gamma, torch.from_numpy(values(beta, t_beta)), t_beta, t_out)
    np.testing.assert_array_equal(as_values.numpy(), values(got, t_out))
    transposed = (t_in, q.T, t_gamma, gamma, t_beta, beta, t_out)
    np.testing.assert_array_equal(run_layernorm(transposed, axis=0), got.T)


@PROPERTY
@given(layernorm_cases(saturating_only=True))
def test_layernorm_is_close_to_the_float_layernorm(case):
    t_in, q, t_gamma, gamma, t_beta, beta, t_out = case
    w = tr.layernorm_widths(t_in, t_gamma, t_beta, t_out, q.shape[1])
    ref = float_layernorm(values(q, t_in), values(gamma, t_gamma), values(beta, t_beta))
    # normalised value: root and reciprocal floors (relative 2**-30 and 2**(31 - K)) on
    # |x_hat| <= sqrt(N - 1), its rounding 2**-(Z + 1); then gamma; then the cast's LSB
    norm_err = math.sqrt(q.shape[1]) * 2.0 ** (32 - w.reciprocal_frac) + 2.0**-w.norm_frac
    bound = max(-t_gamma.min_value, t_gamma.max_value) * norm_err + t_out.lsb
    err = np.abs(values(run_layernorm(case), t_out) - saturate(ref, t_out))
    assert (err <= bound).all()


@PROPERTY
@given(layernorm_cases(), st.data())
def test_layernorm_ignores_a_common_offset_and_gives_beta_on_zero_variance(case, data):
    t_in, q, t_gamma, gamma, t_beta, beta, t_out = case
    got = run_layernorm(case)
    offset = data.draw(st.integers(t_in.qmin - q.min(), t_in.qmax - q.max()))
    shifted = (t_in, q + offset, t_gamma, gamma, t_beta, beta, t_out)
    np.testing.assert_array_equal(run_layernorm(shifted), got)
    flat = (t_in, np.repeat(q[:, :1], q.shape[1], axis=1), t_gamma, gamma, t_beta, beta, t_out)
    expected = requantize(np.broadcast_to(beta, q.shape), t_beta.fractional, t_out)
    np.testing.assert_array_equal(run_layernorm(flat), expected)


@PROPERTY
@given(fixed_types(signed=True), lengths(), st.integers(0, 2**32 - 1))
def test_layernorm_is_odd(t_in, length, seed):
    # Rounding half away from zero and a symmetric output make x -> -x flip the sign.
    q = np.random.default_rng(seed).integers(t_in.qmin + 1, t_in.qmax + 1, (3, length))
    t_out = FixedType.parse("ap_fixed<12,4,AP_RND_INF,AP_SAT_SYM>")
    one = FixedType.parse("ap_fixed<4,2>")
    up = tr.fixed_layernorm(q, t_in, 4, one, 0, one, t_out)
    np.testing.assert_array_equal(tr.fixed_layernorm(-q, t_in, 4, one, 0, one, t_out), -up)


def test_layernorm_rows_of_one_and_refusals():
    t = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
    assert tr.fixed_layernorm([[100], [-128]], t, 32, t, -16, t, t).tolist() == [[-16], [-16]]
    wide = FixedType.parse("ap_fixed<32,16>")
    with pytest.raises(ValueError, match="N\\*\\*2"):
        tr.fixed_layernorm(np.zeros((1, 4), dtype=np.int64), wide, 1, t, 0, t, t)
    with pytest.raises(ValueError, match="affine result"):
        tr.fixed_layernorm([[0, 1]], t, 1, FixedType.parse("ap_fixed<40,20>"), 0,
                           FixedType.parse("ap_fixed<40,1>"), t)
    with pytest.raises(ValueError, match="one value or 3 values"):
        tr.fixed_layernorm([[0, 1, 2]], t, [1, 2], t, 0, t, t)


# --- GELU ----------------------------------------------------------------------------------


def test_gelu_constants_are_ibert_s():
    # I-BERT's erf polynomial: a = -0.2888, b = -1.769 (published), at z = x / sqrt(2)
    assert round(1.769 * math.sqrt(2.0) * 2**tr.GELU_CLIP_FRAC_BITS) == tr.GELU_CLIP_CODE
    assert round(0.2888 / 2 * 2**tr.GELU_CURVE_FRAC_BITS) == tr.GELU_CURVE_CODE
    # 1 - |erf| = 0.1444 * gap**2 stays below 1: the factor 1 + erf lies in [0, 2]
    assert tr.GELU_CURVE_CODE * tr.GELU_CLIP_CODE**2 < 1 << tr.GELU_FACTOR_FRAC_BITS


def ibert_float_gelu(x: np.ndarray) -> np.ndarray:
    """I-BERT's GELU with its published float constants: the integer op's target."""
    z = np.minimum(np.abs(x) / math.sqrt(2.0), 1.769)
    erf = np.sign(x) * (-0.2888 * (z - 1.769) ** 2 + 1)
    return x / 2 * (1 + erf)


# its largest error against GELU, on a grid 2**-12 fine over the range where they differ
GRID = np.arange(-4 * 2**12, 4 * 2**12 + 1) / 2**12
IBERT_FORM_ERROR = float(np.abs(ibert_float_gelu(GRID) - float_gelu(GRID)).max())


@st.composite
def gelu_cases(draw, saturating_only=False):
    t_in = draw(fixed_types(max_width=16))
    overflows = SATURATING if saturating_only else tuple(Overflow)
    t_out = draw(fixed_types(max_width=16, overflows=overflows))
    if not 1 <= t_in.fractional + tr.GELU_FACTOR_FRAC_BITS + 1 - t_out.fractional <= 62:
        t_out = t_out.replace(integer=t_out.integer + t_out.fractional - t_in.fractional,
                              fractional=t_in.fractional)
    return t_in, t_out


def all_codes(t: FixedType, limit: int = 4096) -> np.ndarray:
    if t.qmax - t.qmin < limit:
        return np.arange(t.qmin, t.qmax + 1, dtype=np.int64)
    rng = np.random.default_rng(t.width)
    edges = [t.qmin, t.qmin + 1, -1, 0, 1, t.qmax - 1, t.qmax]
    return np.concatenate([np.array(edges), rng.integers(t.qmin, t.qmax + 1, limit)]).clip(
        t.qmin, t.qmax).astype(np.int64)


@PROPERTY
@given(gelu_cases())
def test_gelu_follows_the_spec_and_the_twins_agree(case):
    t_in, t_out = case
    q = all_codes(t_in)
    got = tr.fixed_gelu(q, t_in, t_out)
    assert got.tolist() == [ref_gelu(v, t_in, t_out) for v in q.tolist()]
    assert tt.fixed_gelu(torch.from_numpy(q), t_in, t_out).tolist() == got.tolist()
    as_values = tt.fixed_gelu(torch.from_numpy(values(q, t_in)), t_in, t_out)
    np.testing.assert_array_equal(as_values.numpy(), values(got, t_out))


@PROPERTY
@given(gelu_cases(saturating_only=True))
def test_gelu_is_close_to_the_float_gelu(case):
    t_in, t_out = case
    q = all_codes(t_in)
    x = values(q, t_in)
    # the integer constants (c and 0.1444 to 2**-13) and the argument's truncation to
    # 2**-12 move the result by under 2**-10; then the cast's LSB
    bound = IBERT_FORM_ERROR + 2.0**-10 + t_out.lsb
    err = np.abs(values(tr.fixed_gelu(q, t_in, t_out), t_out) - saturate(float_gelu(x), t_out))
    assert (err <= bound).all()


@PROPERTY
@given(gelu_cases())
def test_gelu_beyond_the_clip_point_is_x_or_zero(case):
    t_in, t_out = case
    q = all_codes(t_in)
    got = tr.fixed_gelu(q, t_in, t_out)
    clip = tr.GELU_CLIP_CODE * 2.0**-tr.GELU_CLIP_FRAC_BITS
    far = np.abs(values(q, t_in)) >= clip + 2.0**-tr.GELU_CLIP_FRAC_BITS
    positive = far & (q > 0)
    np.testing.assert_array_equal(got[positive], requantize(q[positive], t_in.fractional, t_out))
    assert (got[far & (q < 0)] == 0).all()


def test_gelu_refuses_inputs_too_wide_or_too_coarse():
    with pytest.raises(ValueError, match="too wide"):
        tr.fixed_gelu([0], FixedType.parse("ap_fixed<32,4>"), FixedType.parse("ap_fixed<8,3>"))
    with pytest.raises(ValueError, match="left shift"):
        tr.fixed_gelu([0], FixedType.parse("ap_fixed<8,70>"), FixedType.parse("ap_fixed<8,70>"))


# --- product of two activations ----------------------------------------------------------


@PROPERTY
@given(fixed_types(max_width=16), fixed_types(max_width=16), st.integers(1, 40),
       st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_matmul_is_exact_and_its_accumulator_is_the_narrowest(ta, tb, depth, m, n, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(ta.qmin, ta.qmax + 1, (2, m, depth))
    b = rng.integers(tb.qmin, tb.qmax + 1, (2, depth, n))
    got, acc = tr.fixed_matmul(a, ta, b, tb)
    exact = np.matmul(a.astype(object), b.astype(object))
    assert got.tolist() == exact.tolist()
    assert acc.fractional == ta.fractional + tb.fractional
    codes, acc_t = tt.fixed_matmul(torch.from_numpy(a), ta, torch.from_numpy(b), tb)
    assert acc_t == acc and codes.tolist() == got.tolist()
    vals, _ = tt.fixed_matmul(torch.from_numpy(values(a, ta)), ta,
                              torch.from_numpy(values(b, tb)), tb)
    np.testing.assert_array_equal(vals.numpy(), values(got, acc))
    # every term at one corner reaches each end of the range; one bit less would not hold it
    ends = []
    for x in (ta.qmin, ta.qmax):
        for y in (tb.qmin, tb.qmax):
            ends.append(tr.fixed_matmul(np.full((1, depth), x), ta, np.full((depth, 1), y), tb)[0])
    assert min(ends) >= acc.qmin and max(ends) <= acc.qmax
    if acc.width > 1:
        narrower = acc.replace(integer=acc.integer - 1)
        assert min(ends) < narrower.qmin or max(ends) > narrower.qmax


def test_matmul_wider_than_float64_takes_the_int64_path():
    t = FixedType.parse("ap_fixed<28,4>")
    a = np.full((1, 8), t.qmin)
    got, acc = tr.fixed_matmul(a, t, a.T, t)
    assert acc.width > 53 and got.item() == 8 * t.qmin**2
    codes, _ = tt.fixed_matmul(torch.from_numpy(a), t, torch.from_numpy(a.T.copy()), t)
    assert codes.item() == 8 * t.qmin**2


# --- every width from 2 to 16 bits -------------------------------------------------------


@pytest.mark.parametrize("width", range(2, 17))
def test_every_width_twins_agree(width):
    rng = np.random.default_rng(width)
    t_in = FixedType.from_width(width, min(3, width), rounding="RND_CONV", overflow="SAT")
    codes = np.concatenate([rng.integers(t_in.qmin, t_in.qmax + 1, (6, 4)),
                            np.full((1, 4), t_in.qmin), np.full((1, 4), t_in.qmax),
                            [[t_in.qmax, t_in.qmin, t_in.qmin, t_in.qmin]]]).astype(np.int64)
    tq = torch.from_numpy(codes)
    prob = FixedType(signed=False, integer=0, fractional=width, rounding="RND", overflow="SAT")
    assert tt.fixed_softmax(tq, t_in, prob).tolist() == tr.fixed_softmax(codes, t_in, prob).tolist()
    t_out = FixedType.from_width(width, min(3, width), rounding="RND_CONV", overflow="SAT")
    expected = tr.fixed_layernorm(codes, t_in, 1, t_out, 0, t_out, t_out)
    got = tt.fixed_layernorm(tq, t_in, torch.tensor(1), t_out, torch.tensor(0), t_out, t_out)
    assert got.tolist() == expected.tolist()
    assert tt.fixed_gelu(tq, t_in, t_out).tolist() == tr.fixed_gelu(codes, t_in, t_out).tolist()
    got, _ = tt.fixed_matmul(tq, t_in, tq.T, t_in)
    assert got.tolist() == tr.fixed_matmul(codes, t_in, codes.T, t_in)[0].tolist()


# --- gradients -----------------------------------------------------------------------------

T8 = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
P8 = FixedType.parse("ap_ufixed<8,0,AP_RND_CONV,AP_SAT>")
W16 = FixedType.parse("ap_fixed<16,6,AP_RND_CONV,AP_SAT>")


def grid_tensor(shape, t: FixedType, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    codes = rng.integers(t.qmin, t.qmax + 1, shape)
    return torch.tensor(values(codes, t), requires_grad=True)


def surrogate_and_float_grads(fixed, reference, inputs):
    upstream = torch.randn(fixed(*inputs).shape, generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64)
    got = torch.autograd.grad(fixed(*inputs), inputs, upstream)
    expected = torch.autograd.grad(reference(*inputs), inputs, upstream)
    return got, expected


def test_gradients_are_those_of_the_float_ops():
    x = grid_tensor((3, 6), T8, 1)
    got, expected = surrogate_and_float_grads(
        lambda v: tt.fixed_softmax(v, T8, P8), lambda v: torch.softmax(v, -1), [x])
    torch.testing.assert_close(got, expected)

    got, expected = surrogate_and_float_grads(
        lambda v: tt.fixed_gelu(v, T8, T8), torch.nn.functional.gelu, [x])
    torch.testing.assert_close(got, expected)

    gamma, beta = grid_tensor((6,), T8, 2), grid_tensor((6,), T8, 3)
    eps = (T8.lsb / (4 * 6)) ** 2
    got, expected = surrogate_and_float_grads(
        lambda v, g, b: tt.fixed_layernorm(v, T8, g, T8, b, T8, W16),
        lambda v, g, b: torch.nn.functional.layer_norm(v, (6,), g, b, eps), [x, gamma, beta])
    torch.testing.assert_close(got, expected)

    y = grid_tensor((2, 6, 4), T8, 4)
    got, expected = surrogate_and_float_grads(
        lambda a, b: tt.fixed_matmul(a, T8, b, T8)[0], torch.matmul, [x, y])
    torch.testing.assert_close(got, expected)
    # the forward value is the exact product too
    torch.testing.assert_close(tt.fixed_matmul(x, T8, y, T8)[0], torch.matmul(x, y),
                               rtol=0, atol=0)


def test_a_small_attention_block_trains_through_the_integer_ops():
    torch.manual_seed(0)
    tokens, dim = 4, 8
    param = torch.nn.Parameter(torch.randn(tokens, dim) * 0.5)
    gamma = torch.nn.Parameter(torch.ones(dim))
    target = torch.tensor([1, 0, 3, 2])
    opt = torch.optim.SGD([param, gamma], lr=0.5)
    probs_of_target = []
    for _ in range(40):
        x = ops.cast(param, T8)
        h = tt.fixed_layernorm(x, T8, ops.cast(gamma, T8), T8, torch.zeros(1), T8, T8)
        h = tt.fixed_gelu(h, T8, T8)
        scores, _ = tt.fixed_matmul(h, T8, h.transpose(0, 1), T8)
        p = tt.fixed_softmax(ops.cast(scores, T8), T8, P8)
        picked = p[torch.arange(tokens), target]
        loss = -(picked + 1e-3).log().mean()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
        assert torch.isfinite(gamma.grad).all()
        opt.step()
        probs_of_target.append(float(picked.detach().mean()))
    assert probs_of_target[-1] > probs_of_target[0] + 0.2


# --- the measured errors of docs/transformer_ops.md ----------------------------------------


def measured_error(op: str, t_in: FixedType, t_out: FixedType) -> tuple[float, float | None]:
    """The measurement the spec's table reports: (error of the op, error of x*sigmoid(1.702x)
    cast to the output type, for GELU)."""
    rng = np.random.default_rng(0)
    if op == "gelu":
        q = np.arange(t_in.qmin, t_in.qmax + 1, dtype=np.int64)
        x, ref = values(q, t_in), float_gelu(values(q, t_in))
        quick = ops.cast(torch.from_numpy(x / (1 + np.exp(-1.702 * x))), t_out).numpy()
        return (float(np.abs(values(tr.fixed_gelu(q, t_in, t_out), t_out) - ref).max()),
                float(np.abs(quick - ref).max()))
    length = 16 if op == "softmax" else 32
    spread = rng.integers(t_in.qmin, t_in.qmax + 1, (4096, length))
    narrow = rng.integers(t_in.qmax - 16, t_in.qmax + 1, (1024, length))
    dominant = rng.integers(t_in.qmin, 1, (1024, length))
    dominant[:, 0] = t_in.qmax
    q = np.concatenate([spread, narrow, dominant])
    if op == "softmax":
        got = values(tr.fixed_softmax(q, t_in, t_out), t_out)
        return float(np.abs(got - float_softmax(values(q, t_in))).max()), None
    t_affine = FixedType.parse("ap_fixed<8,1,AP_RND_CONV,AP_SAT>")
    gamma = rng.integers(t_affine.qmin, t_affine.qmax + 1, length)
    beta = rng.integers(t_affine.qmin, t_affine.qmax + 1, length)
    got = values(tr.fixed_layernorm(q, t_in, gamma, t_affine, beta, t_affine, t_out), t_out)
    ref = float_layernorm(values(q, t_in), values(gamma, t_affine), values(beta, t_affine))
    assert (np.abs(ref) < t_out.max_value).all()  # no saturation in the measurement
    return float(np.abs(got - ref).max()), None


ROW = re.compile(r"^\| (softmax|layernorm|gelu) \| `([^`]+)` \| `([^`]+)` \| ([0-9.]+) \| "
                 r"([0-9.]+|—) \|$")


def test_the_spec_reports_the_measured_errors():
    rows = [ROW.match(line) for line in SPEC.read_text().splitlines()]
    rows = [m for m in rows if m]
    assert {m.group(1) for m in rows} == {"softmax", "layernorm", "gelu"}
    for m in rows:
        op, t_in, t_out = m.group(1), FixedType.parse(m.group(2)), FixedType.parse(m.group(3))
        error, quick = measured_error(op, t_in, t_out)
        assert m.group(4) == f"{error:.5f}", (op, error)
        if op == "gelu":
            assert m.group(5) == f"{quick:.5f}", (op, quick)
            assert error < quick  # why the op uses I-BERT's erf rather than ShiftGELU
