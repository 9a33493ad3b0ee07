"""torch implementation of fixed-point casts, sharing its kernels with the numpy one."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from qflow.numerics import kernel
from qflow.numerics.types import FixedType, Overflow, Rounding

from . import native

_LN2 = math.log(2.0)


def _check_finite(x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError("cannot cast non-finite values (NaN or inf) to a fixed-point type")


def _check_width(t: FixedType) -> None:
    from qflow.numerics.convert import _check_float_width

    _check_float_width(t)


def _sum_to_shape(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape`` (the shape of the integer-bits tensor)."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    dims = list(range(lead)) + [
        lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1
    ]
    if not shape:
        return grad.sum()  # the same full reduction, one operation less
    out = grad.sum(dim=dims, keepdim=True) if dims else grad
    return out if out.shape == shape else out.reshape(shape)


def _scale(integer_bits: torch.Tensor, width: int, signed: bool, dtype) -> torch.Tensor:
    """``2**f`` with ``f = width - signed - round(integer_bits)``, in ``dtype`` (exact)."""
    scale = torch.exp2((width - int(signed)) - torch.round(integer_bits))
    return scale if scale.dtype == dtype else scale.to(dtype)


#: Largest ``|f|`` for which a per-tensor scale is a Python float: ``2**f`` and ``2**-f``
#: are then normal float32 numbers, the very values :func:`_scale` gives.
_MAX_SCALAR_FRACTIONAL = 100


def _scalar_scale(integer_bits: torch.Tensor, width: int, signed: bool, dtype) -> float | None:
    """``2**f`` as a Python float for per-tensor integer bits (as :func:`_scale`), else None.

    A scalar operand costs less than a 0-d tensor, and the scale itself then takes no
    tensor operations. ``round`` rounds half to even, as ``torch.round`` does.
    """
    if integer_bits.dim() or dtype not in (torch.float32, torch.float64):
        return None
    i = integer_bits.item()
    if not math.isfinite(i):
        return None
    f = width - int(signed) - round(i)
    return math.ldexp(1.0, f) if abs(f) <= _MAX_SCALAR_FRACTIONAL else None


_ZERO = torch.zeros(())  # a CPU 0-d tensor: torch broadcasts it to any device and dtype


def _values_(q: torch.Tensor, scale) -> torch.Tensor:
    """``q / scale`` in place on the codes ``q``, with code 0 giving +0.0 as integer codes do.

    Every step is exact (scaling by a power of two); float rounding's -0.0 becomes +0.0
    by adding 0.0, which changes nothing else. One pass does both: ``0 + q * 2**-f``.
    """
    if isinstance(scale, float):
        return torch.add(_ZERO, q, alpha=1.0 / scale, out=q)
    return torch.addcdiv(_ZERO, q, scale, out=q)  # 0 + q / scale


def _saturating_low(width: int, signed: bool, overflow: Overflow) -> int | None:
    """Lower clamp bound when ``kernel.quantize_scaled`` is a clamp and a rounding, else None.

    Under SAT and SAT_SYM, ``quantize_scaled(t) = apply_overflow(round(clip(t, low, qmax)))``
    and ``apply_overflow`` (the same clip) is the identity on the rounded value: rounding
    is monotone and maps the integer bounds to themselves. For those types the clamp is
    also exactly the gradient's code range (see :func:`_grad_range`), except a 1-bit signed
    SAT_SYM type, which saturates like SAT (``kernel.sat_sym_low``) while its gradient
    range is ``[-qmax, qmax] = [0, 0]``: that one takes the general path.
    """
    if overflow is Overflow.SAT:
        return kernel.code_range(width, signed)[0]
    if overflow is Overflow.SAT_SYM and not (signed and width == 1):
        return kernel.sat_sym_low(width, signed)
    return None


def _grad_range(width: int, signed: bool, overflow: Overflow) -> tuple[int, int]:
    """Codes where the straight-through gradient passes (not used under WRAP)."""
    qmin, qmax = kernel.code_range(width, signed)
    low = -qmax if (overflow is Overflow.SAT_SYM and signed) else qmin
    return low, qmax


def _round_(c: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    """``kernel.round_scaled(c)``, in place on ``c`` where the kernel is one torch op
    (``round``, ``floor``, ``trunc``: keep these in step with the kernel)."""
    if rounding is Rounding.RND_CONV:
        return c.round_()
    if rounding is Rounding.TRN:
        return c.floor_()
    if rounding is Rounding.TRN_ZERO:
        return c.trunc_()
    return kernel.round_scaled(c, rounding, torch)


def _codes(t: torch.Tensor, width, signed, rounding, overflow, khot) -> torch.Tensor:
    """Codes of ``t`` as floats (``quantize_scaled`` / ``khot_scaled``); may overwrite ``t``."""
    low = None if khot else _saturating_low(width, signed, overflow)
    if low is not None:
        return _round_(t.clamp_(low, kernel.code_range(width, signed)[1]), rounding)
    if khot:
        q = kernel.khot_scaled(t, khot, width, signed, torch)
    else:
        q = kernel.quantize_scaled(t, width, signed, rounding, overflow, torch)
    return q if q.is_floating_point() else q.to(t.dtype)  # int64 codes: as q / scale would


def _cast_values(x, scale, width, signed, rounding, overflow, khot) -> torch.Tensor:
    """``codes(x * scale) / scale`` (the values of ``quantize_scaled(x * scale) / scale``
    in ``x``'s dtype: scaling by a power of two, clamping and rounding are all exact).
    One new tensor; the rest is done in place on it."""
    return _values_(_codes(x * scale, width, signed, rounding, overflow, khot), scale)


def _mask_and_err(x, scale, width, signed, rounding, overflow, khot, need_err, keep_codes):
    """``(inside, err, q)`` of ``t = x * scale``, for the backward pass.

    ``inside`` is the float mask (1.0 / 0.0) of ``t`` lying in the gradient's code range
    (``None`` under WRAP: everywhere); ``err`` is ``q - t`` inside it and ``q`` outside it
    (``q - t`` everywhere under WRAP), or None unless ``need_err``; ``q`` are the codes of
    the forward pass, kept intact only with ``keep_codes`` (else ``err`` may reuse their
    memory). Masks are float, not bool: on CPU, comparisons into bool and ``where`` or
    products with bool masks are much slower than float arithmetic.
    """
    t = x * scale
    low, qmax = _grad_range(width, signed, overflow)
    want_codes = need_err or keep_codes
    if not khot and _saturating_low(width, signed, overflow) == low:
        # The forward clamp is the gradient range: the codes are round(c).
        c = torch.clamp(t, low, qmax)
        q = kernel.round_scaled(c, rounding, torch) if want_codes else None  # a new tensor
        inside = t.eq_(c)  # 1.0 where clamping left t alone
    else:
        q = _codes(t.clone(), width, signed, rounding, overflow, khot) if want_codes else None
        if overflow is Overflow.WRAP:
            if not need_err:
                return None, None, q
            return None, (q - t if keep_codes else q.sub_(t)), q
        c = torch.clamp(t, low, qmax)
        inside = t.eq_(c)
    if not need_err:
        return inside, None, q
    # q - c * inside: q - t inside the range (c == t there), q outside it (c is finite)
    return inside, torch.addcmul(q, c, inside, value=-1, out=c if keep_codes else q), q


class _TrainableCast(torch.autograd.Function):
    """Fixed-point cast whose integer bits are a (rounded) trainable tensor.

    Forward: ``f = width - signed - round(integer_bits)``; ``y = Q(x * 2**f) * 2**-f``.
    Backward (LSQ-style, see docs/qfx.md):
      dy/dx = 1 inside the code range, 0 outside under saturating overflow, 1 under WRAP;
      dy/di = ln2 * 2**-f * (q - t) inside the range (or always, under WRAP),
              ln2 * y outside it, scaled by ``grad_scale``; round(i) passes straight through.

    The forward pass saves the range mask and the error ``q - t`` (``q`` outside the
    range) that it computes on the way to ``y``, so the backward pass is two products
    and a sum. The factor ``2**-f`` is applied after that sum: scaling by a power of two
    commutes with float rounding, so this equals scaling each term first.
    """

    @staticmethod
    def forward(ctx, x, integer_bits, scale, width, signed, rounding, overflow, khot,
                grad_scale):
        if scale is None:
            scale = _scale(integer_bits, width, signed, x.dtype)
        ctx.meta = (scale, grad_scale, integer_bits.shape)
        inside, err, q = _mask_and_err(x, scale, width, signed, rounding, overflow, khot,
                                       ctx.needs_input_grad[1], keep_codes=True)
        ctx.save_for_backward(inside, err)
        return _values_(q, scale)

    @staticmethod
    def backward(ctx, grad_y):
        scale, grad_scale, i_shape = ctx.meta
        inside, err = ctx.saved_tensors
        grad_x = grad_i = None
        if ctx.needs_input_grad[1]:
            grad_i = _sum_to_shape(grad_y * err, i_shape)  # made here: scaled in place
            if isinstance(scale, float):
                grad_i.mul_(_LN2 * grad_scale / scale)  # one exact power-of-two factor more
            else:  # 0 + (c * grad_i) / scale: the division is exact, so = c * (grad_i / scale)
                grad_i = torch.addcdiv(_ZERO, grad_i, scale, value=_LN2 * grad_scale,
                                       out=grad_i)
        if ctx.needs_input_grad[0]:
            grad_x = grad_y if inside is None else grad_y * inside
        return grad_x, grad_i, None, None, None, None, None, None, None


_SUBNORMAL = 5e-324  # compared at run time: reads as 0 when denormals are flushed


@functools.lru_cache(maxsize=256)
def _next_float(v: float, dtype, up: bool) -> float:
    """The neighbour of ``v`` (a ``dtype`` value) towards +inf or -inf, as a Python float."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    return float(np.nextafter(np_dtype(v), np_dtype(np.inf if up else -np.inf)))


class _ScalarCast(torch.autograd.Function):
    """:class:`_TrainableCast` for a per-tensor saturating type with ``scale = 2**f >= 1``.

    Everything happens in ``x``'s units: ``t = x * 2**f`` lies in ``[low, high]`` exactly
    when ``x`` lies in ``[lo, hi] = [low * 2**-f, high * 2**-f]`` (with ``f >= 0`` the
    product cannot underflow), and scaling by a power of two commutes with float
    rounding, so these are the values of :class:`_TrainableCast`:

    * forward: ``y = round(clamp(x, lo, hi))`` to a multiple of ``2**-f``. Under
      RND_CONV that is ``(c + C) - C`` with ``C = 1.5 * 2**(p - f)`` (``p`` the
      mantissa bits): ``c + C`` lies in one binade whose spacing is ``2**-f``, so the
      float addition itself rounds half to even, and ``C - C`` is +0.0, never -0.0.
      Three passes over the data (one through the native loop of
      :mod:`qflow.ops.native`, when it is built); other roundings take four.
    * backward: ``dL/dx = grad_y`` inside ``[lo, hi]``, else 0, and
      ``dL/di = ln2 * grad_scale * sum(grad_y * (y - x_in))`` with ``x_in = x`` inside
      and 0 outside. Both masks are one pass each: ``hardtanh_backward`` keeps values
      strictly between the float neighbours of ``lo`` and ``hi``, i.e. inside
      ``[lo, hi]`` inclusive (the native loop does all of it in one pass). Saving
      ``x`` and ``y`` (which the next layer holds anyway)
      keeps no extra memory alive between the passes; as with torch's own functions
      that save their output, modifying ``y`` in place makes autograd refuse the
      backward pass.
    """

    @staticmethod
    def forward(ctx, x, integer_bits, scale, width, signed, rounding, overflow, grad_scale):
        low = _saturating_low(width, signed, overflow)
        high = kernel.code_range(width, signed)[1]
        lo, hi = low / scale, high / scale  # exact: integers times a power of two
        ctx.meta = (scale, low, high, width, signed, rounding, overflow, grad_scale)
        mantissa = 24 if x.dtype == torch.float32 else 53
        if rounding is Rounding.RND_CONV and width <= mantissa - 3:
            # |c| <= 2**(width - f) stays below 2**(p - 2 - f): c + C keeps C's binade
            magic = 1.5 * 2.0 ** (mantissa - 1) / scale
            y = native.cast_forward(x, lo, hi, magic)
            if y is None:
                y = torch.clamp(x, lo, hi).add_(magic).sub_(magic)
        else:
            y = _values_(_round_((x * scale).clamp_(low, high), rounding), scale)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        scale, low, high, width, signed, rounding, overflow, grad_scale = ctx.meta
        x, y = ctx.saved_tensors
        lo, hi = low / scale, high / scale
        if lo == 0.0 and not _SUBNORMAL > 0.0:  # Python floats obey the same CPU flags
            # Denormals read as zero (torch.set_flush_denormal): the neighbour of 0 is
            # gone, so take the general way.
            mask, err, _ = _mask_and_err(x, scale, width, signed, rounding, overflow, 0,
                                         ctx.needs_input_grad[1], keep_codes=False)
            grad_i = None
            if ctx.needs_input_grad[1]:
                grad_i = err.mul_(grad_y).sum().div_(scale).mul_(_LN2 * grad_scale)
            grad_x = mask.mul_(grad_y) if ctx.needs_input_grad[0] else None
            return grad_x, grad_i, None, None, None, None, None, None
        below, above = _next_float(lo, x.dtype, False), _next_float(hi, x.dtype, True)
        fused = native.cast_backward(grad_y, x, y, below, above, ctx.needs_input_grad[0])
        if fused is not None:
            grad_x, total = fused
            grad_i = None
            if ctx.needs_input_grad[1]:
                grad_i = torch.tensor(total * (_LN2 * grad_scale), dtype=y.dtype)
            return grad_x, grad_i, None, None, None, None, None, None
        keep = torch.ops.aten.hardtanh_backward  # (g, x, a, b): g where a < x < b, else 0
        grad_i = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = keep(x, x, below, above)  # x_in for now; then grad_x in its memory
            grad_i = torch.sub(y, grad_x, out=grad_x).mul_(grad_y).sum().mul_(_LN2 * grad_scale)
        if ctx.needs_input_grad[0]:
            grad_x = keep(grad_y, x, below, above) if grad_x is None else \
                keep.grad_input(grad_y, x, below, above, grad_input=grad_x)
        else:
            grad_x = None
        return grad_x, grad_i, None, None, None, None, None, None


def _channel_bounds(x, integer_bits, width, signed, rounding, overflow, khot):
    """Per-channel bounds for :class:`_ChannelCast`, or None where it does not apply.

    It applies to the native loops' case: a saturating RND_CONV type, integer bits per
    channel along ``x``'s first dimension, ``f >= 0`` in every channel (as for
    :class:`_ScalarCast`), a contiguous float CPU tensor.
    """
    if khot or rounding is not Rounding.RND_CONV or not native.available():
        return None
    low = _saturating_low(width, signed, overflow)
    if low is None or x.dtype not in _MANTISSA or width > _MANTISSA[x.dtype] - 3 \
            or x.dim() == 0 or x.device.type != "cpu" or not x.is_contiguous() \
            or integer_bits.shape != (x.shape[0],) + (1,) * (x.dim() - 1):
        return None
    rounded = np.round(integer_bits.detach().cpu().numpy())
    return _bounds_for(rounded.tobytes(), rounded.dtype.str, width - int(signed), low,
                       kernel.code_range(width, signed)[1], x.dtype)


_MANTISSA = {torch.float32: 24, torch.float64: 53}


@functools.lru_cache(maxsize=1024)
def _bounds_for(rounded_integer_bits: bytes, bits_dtype: str, magnitude_bits: int, low: int,
                high: int, dtype) -> native.ChannelBounds | None:
    """``lo = low * 2**-f``, ``hi = high * 2**-f`` and the magic numbers per channel, for
    ``f = magnitude_bits - integer_bits`` (exact: integers times powers of two); None
    unless ``0 <= f <= 100`` everywhere. Cached: the rounded integer bits change rarely."""
    f = magnitude_bits - np.frombuffer(rounded_integer_bits, dtype=bits_dtype)
    if not (np.isfinite(f).all() and (f >= 0).all() and (f <= _MAX_SCALAR_FRACTIONAL).all()):
        return None
    scale = np.ldexp(1.0, f.astype(np.int64))
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    return native.ChannelBounds(*(np.ascontiguousarray(v / scale, dtype=np_dtype)
                                  for v in (low, high, 1.5 * 2.0 ** (_MANTISSA[dtype] - 1))))


class _ChannelCast(torch.autograd.Function):
    """:class:`_ScalarCast` per channel, through the native loops (RND_CONV only).

    Channel ``c`` (``x[c]``) is clamped to ``[lo[c], hi[c]]`` and rounded with its own
    magic number; the backward pass gives :class:`_TrainableCast`'s gradients, with
    ``dL/di[c] = ln2 * grad_scale * sum(grad_y * (y - x_in))`` over the channel.
    """

    @staticmethod
    def forward(ctx, x, integer_bits, bounds, grad_scale):
        y = native.channel_cast_forward(x, bounds)
        ctx.meta = (bounds, grad_scale, integer_bits.shape)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        bounds, grad_scale, i_shape = ctx.meta
        x, y = ctx.saved_tensors
        grad_x, sums = native.channel_cast_backward(grad_y.contiguous(), x, y, bounds,
                                                    ctx.needs_input_grad[0])
        grad_i = None
        if ctx.needs_input_grad[1]:
            grad_i = sums.mul_(_LN2 * grad_scale).to(y.dtype).view(i_shape)
        return grad_x, grad_i, None, None


def cast_trainable(
    x: torch.Tensor,
    integer_bits: torch.Tensor,
    *,
    width: int,
    signed: bool,
    rounding: Rounding = Rounding.RND_CONV,
    overflow: Overflow = Overflow.SAT,
    khot: int = 0,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Cast ``x`` to a ``width``-bit type whose integer bits are ``round(integer_bits)``.

    ``integer_bits`` broadcasts against ``x`` (a scalar per tensor, or one value per
    output channel shaped like ``(C, 1, 1, 1)``). With ``khot=K`` the codes are sums of
    at most K signed powers of two instead of rounded values.

    >>> import torch
    >>> i = torch.tensor(0.0, requires_grad=True)
    >>> y = cast_trainable(torch.tensor([0.3, 2.0]), i, width=4, signed=True)
    >>> y.tolist()
    [0.25, 0.875]
    >>> y.sum().backward(); float(i.grad) > 0   # clipping pushes the binary point right
    True
    """
    scale = _scalar_scale(integer_bits, width, signed, x.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or integer_bits.requires_grad):
        if (scale is not None and scale >= 1.0 and not khot
                and _saturating_low(width, signed, overflow) is not None):
            return _ScalarCast.apply(x, integer_bits, scale, width, signed, rounding, overflow,
                                    grad_scale)
        bounds = None if scale is not None else \
            _channel_bounds(x, integer_bits, width, signed, rounding, overflow, khot)
        if bounds is not None:
            return _ChannelCast.apply(x, integer_bits, bounds, grad_scale)
        return _TrainableCast.apply(x, integer_bits, scale, width, signed, rounding,
                                    overflow, khot, grad_scale)
    if scale is None:
        scale = _scale(integer_bits, width, signed, x.dtype)
    return _cast_values(x, scale, width, signed, rounding, overflow, khot)  # no graph: no saving


def keeps_output(y: torch.Tensor) -> bool:
    """Does the cast that made ``y`` keep ``y`` itself for its backward pass (so that
    another saved reference to it costs no memory)?"""
    return type(y.grad_fn) in (_ScalarCast._backward_cls, _ChannelCast._backward_cls)


def cast(x: torch.Tensor, t: FixedType) -> torch.Tensor:
    """Cast to ``t``, straight-through gradient inside the range (torch twin of numerics.cast)."""
    _check_finite(x)
    i = torch.tensor(float(t.integer), dtype=x.dtype, device=x.device)
    return cast_trainable(
        x, i, width=t.width, signed=t.signed, rounding=t.rounding, overflow=t.overflow
    )


def to_codes(x: torch.Tensor, t: FixedType) -> torch.Tensor:
    """int64 codes of ``x`` cast to ``t`` (no gradient)."""
    _check_width(t)
    _check_finite(x)
    with torch.no_grad():
        x64 = x.to(torch.float64)
        scaled = x64 * (2.0**t.fractional)
        if t.fractional < 0:  # only scaling down can underflow a nonzero value to zero
            scaled = kernel.undo_underflow(x64, scaled, torch)
        q = kernel.quantize_scaled(scaled, t.width, t.signed, t.rounding, t.overflow, torch)
    return q.to(torch.int64)


def from_codes(q: torch.Tensor, t: FixedType, dtype=torch.float64) -> torch.Tensor:
    """Real values of int64 codes of ``t``."""
    return q.to(dtype) * (2.0**-t.fractional)


def khot_codes(x: torch.Tensor, t: FixedType, k: int) -> torch.Tensor:
    """int64 codes of ``t`` that are sums of at most ``k`` signed powers of two."""
    if k < 1:
        raise ValueError(f"K-hot needs k >= 1, got {k}")
    _check_finite(x)
    with torch.no_grad():
        scaled = x.to(torch.float64) * (2.0**t.fractional)
        return kernel.khot_scaled(scaled, k, t.width, t.signed, torch).to(torch.int64)


def requantize(q: torch.Tensor, from_fractional: int, t: FixedType) -> torch.Tensor:
    """Integer-only requantization of int64 codes (torch twin of numerics.requantize)."""
    import numpy as np

    from qflow.numerics import requantize as np_requantize

    out = np_requantize(q.detach().cpu().numpy().astype(np.int64), from_fractional, t)
    return torch.from_numpy(out).to(q.device)
