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


class _TrainableCast(torch.autograd.Function):
    """Fixed-point cast whose integer bits are a (rounded) trainable tensor.

    Forward: ``f = width - signed - round(integer_bits)``; ``y = Q(x * 2**f) * 2**-f``.
    Backward (LSQ-style, see docs/qfx.md):
      dy/dx = 1 inside the code range, 0 outside under saturating overflow, 1 under WRAP;
      dy/di = ln2 * 2**-f * (q - t) inside the range (or always, under WRAP),
              ln2 * y outside it, scaled by ``grad_scale``; round(i) passes straight through.
    """

    @staticmethod
    def forward(ctx, x, integer_bits, width, signed, rounding, overflow, khot, grad_scale):
        fractional = (width - int(signed)) - torch.round(integer_bits)
        scale = torch.exp2(fractional).to(x.dtype)
        t = x * scale
        if khot:
            q = kernel.khot_scaled(t, khot, width, signed, torch)
        else:
            q = kernel.quantize_scaled(t, width, signed, rounding, overflow, torch)
        y = q / scale
        ctx.meta = (width, signed, overflow, grad_scale, integer_bits.shape)
        ctx.save_for_backward(t, q, scale)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        width, signed, overflow, grad_scale, i_shape = ctx.meta
        t, q, scale = ctx.saved_tensors
        qmin, qmax = kernel.code_range(width, signed)
        grad_x = grad_i = None
        if overflow is Overflow.WRAP:
            inside = None
            grad_x = grad_y
        else:
            low = -qmax if (overflow is Overflow.SAT_SYM and signed) else qmin
            inside = (t >= low) & (t <= qmax)
            grad_x = grad_y * inside
        if ctx.needs_input_grad[1]:
            err = q - t if inside is None else torch.where(inside, q - t, q)
            grad_i = _sum_to_shape(grad_y * err / scale, i_shape) * (_LN2 * grad_scale)
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
    return _TrainableCast.apply(
        x, integer_bits, width, signed, rounding, overflow, khot, grad_scale
    )


def cast(x: torch.Tensor, t: FixedType) -> torch.Tensor:
    """Cast to ``t``, straight-through gradient inside the range (torch twin of numerics.cast)."""
    _check_finite(x)
    i = torch.tensor(float(t.integer), dtype=x.dtype, device=x.device)
    return cast_trainable(
        x, i, width=t.width, signed=t.signed, rounding=t.rounding, overflow=t.overflow
    )


def to_codes(x: torch.Tensor, t: FixedType) -> torch.Tensor:
    """int64 codes of ``x`` cast to ``t`` (no gradient)."""
    _check_finite(x)
    with torch.no_grad():
        scaled = x.to(torch.float64) * (2.0**t.fractional)
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
