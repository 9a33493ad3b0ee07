"""torch implementation of fixed-point casts, sharing its kernels with the numpy one."""

from __future__ import annotations

import math

import torch

from qflow.numerics import kernel
from qflow.numerics.types import FixedType, Overflow, Rounding

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
    out = grad.sum(dim=dims, keepdim=True) if dims else grad
    return out.reshape(shape)


def _scale(integer_bits: torch.Tensor, width: int, signed: bool, dtype) -> torch.Tensor:
    """``2**f`` with ``f = width - signed - round(integer_bits)``, in ``dtype`` (exact)."""
    scale = torch.exp2(torch.round(integer_bits).neg_().add_(width - int(signed)))
    return scale if scale.dtype == dtype else scale.to(dtype)


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
    """``codes(x * scale) / scale``, with code 0 giving +0.0 as integer codes do.

    The same values as ``quantize_scaled(x * scale) / scale`` in ``x``'s dtype: every
    step is exact (scaling by a power of two, clamping, rounding), and float rounding's
    -0.0 becomes +0.0 by adding 0.0, which changes nothing else. One new tensor; the
    rest is done in place on it.
    """
    q = _codes(x * scale, width, signed, rounding, overflow, khot)
    return q.div_(scale).add_(0.0)


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


#: Tensors with fewer elements save their range mask and error in the forward pass (fewer
#: operations in all, which is what costs for small tensors); larger ones save only ``x``
#: and have the backward pass recompute them (nothing kept alive between the passes that
#: the graph does not hold anyway, which is what costs for large tensors on CPU: memory
#: and page faults).
_RECOMPUTE_FROM = 1 << 15


class _TrainableCast(torch.autograd.Function):
    """Fixed-point cast whose integer bits are a (rounded) trainable tensor.

    Forward: ``f = width - signed - round(integer_bits)``; ``y = Q(x * 2**f) * 2**-f``.
    Backward (LSQ-style, see docs/qfx.md):
      dy/dx = 1 inside the code range, 0 outside under saturating overflow, 1 under WRAP;
      dy/di = ln2 * 2**-f * (q - t) inside the range (or always, under WRAP),
              ln2 * y outside it, scaled by ``grad_scale``; round(i) passes straight through.

    For large tensors only ``x`` and the scale are saved, and the backward pass recomputes
    ``t``, the codes and the range mask with the same operations, hence the same values
    (see ``_RECOMPUTE_FROM``).
    """

    @staticmethod
    def forward(ctx, x, integer_bits, width, signed, rounding, overflow, khot, grad_scale):
        scale = _scale(integer_bits, width, signed, x.dtype)
        ctx.meta = (width, signed, rounding, overflow, khot, grad_scale, integer_bits.shape)
        ctx.recompute = x.numel() >= _RECOMPUTE_FROM
        if ctx.recompute:
            ctx.save_for_backward(x, scale)
            return _cast_values(x, scale, width, signed, rounding, overflow, khot)
        inside, err, q = _mask_and_err(x, scale, width, signed, rounding, overflow, khot,
                                       ctx.needs_input_grad[1], keep_codes=True)
        ctx.save_for_backward(inside, err, scale)
        return q.div_(scale).add_(0.0)  # as in _cast_values

    @staticmethod
    def backward(ctx, grad_y):
        width, signed, rounding, overflow, khot, grad_scale, i_shape = ctx.meta
        need_x, need_i = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.recompute:  # inside and err are made here: free to overwrite
            x, scale = ctx.saved_tensors
            inside, err, _ = _mask_and_err(x, scale, width, signed, rounding, overflow, khot,
                                           need_i, keep_codes=False)
        else:
            inside, err, scale = ctx.saved_tensors
        grad_x = grad_i = None
        if need_i:
            product = torch.mul(grad_y, err, out=err if ctx.recompute else None).div_(scale)
            grad_i = _sum_to_shape(product, i_shape)
            grad_i.mul_(_LN2 * grad_scale)  # made here (a sum or product itself): in place
        if need_x and inside is not None:
            grad_x = inside.mul_(grad_y) if ctx.recompute else grad_y * inside
        elif need_x:
            grad_x = grad_y
        return grad_x, grad_i, None, None, None, None, None, None


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
    if torch.is_grad_enabled() and (x.requires_grad or integer_bits.requires_grad):
        return _TrainableCast.apply(
            x, integer_bits, width, signed, rounding, overflow, khot, grad_scale
        )
    scale = _scale(integer_bits, width, signed, x.dtype)  # no graph: same values, no saving
    return _cast_values(x, scale, width, signed, rounding, overflow, khot)


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
