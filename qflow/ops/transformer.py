"""torch twins of :mod:`qflow.numerics.transformer`: the same integer kernels, run on int64
tensors (any device), with gradients for quantization-aware training.

Each op takes either int64 codes (and returns int64 codes, equal to the numpy twin's) or
floating tensors of values on the input type's grid (as :func:`qflow.ops.cast` gives) and
returns values ``code * 2**-fractional`` in the input's dtype: exact whenever the output
type's width fits the dtype's mantissa (24 bits for float32, 53 for float64).

The forward pass is the integer op; the backward pass is the gradient of the float op it
approximates, evaluated at the input values (a straight-through surrogate, as for casts):

- softmax: ``p * (g - sum(g * p))`` with ``p = softmax(x)``;
- LayerNorm: the gradient of ``gamma * (x - mean) / sqrt(var + eps) + beta`` for ``x``,
  ``gamma`` and ``beta``, with ``eps = (lsb / (4 N))**2``: far below the smallest nonzero
  variance ``(N - 1) / N**2 * lsb**2``, it only keeps a constant row's gradient finite;
- GELU: ``Phi(x) + x * phi(x)``, the derivative of ``x * Phi(x)`` (erf form);
- matmul: the exact gradient, the forward pass being the exact product of the values.

>>> import torch
>>> from qflow.numerics import FixedType
>>> t_in = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
>>> t_out = FixedType.parse("ap_ufixed<8,0,AP_RND_CONV,AP_SAT>")
>>> x = torch.tensor([1.0, 0.0, -1.0], requires_grad=True)
>>> p = fixed_softmax(x, t_in, t_out)
>>> (p * 256).tolist()
[170.0, 63.0, 23.0]
>>> p[0].backward(); [round(g, 3) for g in x.grad.tolist()]
[0.223, -0.163, -0.06]
"""

from __future__ import annotations

import math

import torch

from qflow.numerics.transformer import (
    GeluWidths,
    LayerNormWidths,
    SoftmaxWidths,
    check_codes,
    gelu_kernel,
    gelu_widths,
    layernorm_kernel,
    layernorm_widths,
    matmul_accumulator_type,
    reduced_length,
    softmax_kernel,
    softmax_widths,
)
from qflow.numerics.types import FixedType

#: Exact integer range of float64: products and partial sums up to this width are exact.
_FLOAT64_EXACT_BITS = 53


def _codes(x: torch.Tensor, t: FixedType, name: str) -> torch.Tensor:
    """int64 codes of ``x``: integer tensors are codes already; floating ones are values,
    which must lie on ``t``'s grid and in its range (scaling by ``2**f`` is exact)."""
    if not x.is_floating_point():
        return x.to(torch.int64)
    scaled = x.detach().to(torch.float64) * 2.0**t.fractional
    on_grid = (scaled == torch.round(scaled)) & (scaled >= t.qmin) & (scaled <= t.qmax)
    if not bool(on_grid.all()):
        raise ValueError(f"{name} has values that are not codes of {t}: cast them to it first "
                         "(qflow.ops.cast)")
    return scaled.to(torch.int64)


def _values(codes: torch.Tensor, t: FixedType, dtype: torch.dtype) -> torch.Tensor:
    return codes.to(dtype) * 2.0**-t.fractional  # exact while the code fits the mantissa


def _as_float(x: torch.Tensor, t: FixedType, dtype: torch.dtype) -> torch.Tensor:
    """Values of ``x`` for the float op of a backward pass (codes are converted)."""
    return x.detach().to(dtype) if x.is_floating_point() else _values(x, t, dtype)


def _along(vector: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """A LayerNorm parameter (one value, or one per element) laid along ``axis``."""
    shape = [1] * ndim
    shape[axis] = vector.shape[0] if vector.dim() == 1 else 1
    return vector.reshape(shape)


# --- softmax -------------------------------------------------------------------------------


class _FixedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, widths: SoftmaxWidths, axis: int):
        codes = softmax_kernel(_codes(x, widths.in_type, "x"), widths, axis, torch, fast=True)
        ctx.axis = axis
        ctx.save_for_backward(x)
        return _values(codes, widths.out_type, x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        p = torch.softmax(x, dim=ctx.axis)
        grad_x = p * (grad_y - (grad_y * p).sum(dim=ctx.axis, keepdim=True))
        return grad_x, None, None


def fixed_softmax(x: torch.Tensor, in_type: FixedType, out_type: FixedType,
                  axis: int = -1) -> torch.Tensor:
    """Torch twin of :func:`qflow.numerics.transformer.fixed_softmax`: codes in, codes out;
    or values in, values out with the float softmax's gradient.

    >>> import torch
    >>> t_in = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
    >>> t_out = FixedType.parse("ap_ufixed<8,0,AP_RND_CONV,AP_SAT>")
    >>> fixed_softmax(torch.tensor([[0, 0], [127, -128]]), t_in, t_out).tolist()
    [[128, 128], [255, 0]]
    """
    widths = softmax_widths(in_type, out_type, reduced_length(x.shape, axis))
    if not x.is_floating_point():
        return softmax_kernel(x.to(torch.int64), widths, axis, torch, fast=True)
    return _FixedSoftmax.apply(x, widths, axis)


# --- LayerNorm -----------------------------------------------------------------------------


def _float_layernorm(x, gamma, beta, axis: int, eps: float):
    mean = x.mean(dim=axis, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axis, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * _along(gamma, axis, x.dim()) \
        + _along(beta, axis, x.dim())


class _FixedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, widths: LayerNormWidths, axis: int):
        codes = layernorm_kernel(_codes(x, widths.in_type, "x"),
                                 _codes(gamma, widths.gamma_type, "gamma"),
                                 _codes(beta, widths.beta_type, "beta"), widths, axis, torch,
                                 fast=True)
        ctx.meta = (widths, axis)
        ctx.save_for_backward(x, gamma, beta)
        return _values(codes, widths.out_type, x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        widths, axis = ctx.meta
        x, gamma, beta = ctx.saved_tensors
        eps = (widths.in_type.lsb / (4 * widths.row_length)) ** 2
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(),
                      _as_float(gamma, widths.gamma_type, x.dtype).requires_grad_(),
                      _as_float(beta, widths.beta_type, x.dtype).requires_grad_()]
            y = _float_layernorm(*inputs, axis, eps)
            grads = torch.autograd.grad(y, inputs, grad_y)
        grad_x, grad_gamma, grad_beta = (
            g.to(t.dtype) if need else None
            for g, t, need in zip(grads, (x, gamma, beta), ctx.needs_input_grad, strict=False))
        return grad_x, grad_gamma, grad_beta, None, None


def fixed_layernorm(x: torch.Tensor, in_type: FixedType, gamma: torch.Tensor,
                    gamma_type: FixedType, beta: torch.Tensor, beta_type: FixedType,
                    out_type: FixedType, axis: int = -1) -> torch.Tensor:
    """Torch twin of :func:`qflow.numerics.transformer.fixed_layernorm`. ``gamma`` and
    ``beta`` (one value, or one per element of ``axis``) are codes when their dtype is an
    integer one, else values on their types' grids; floating ones get gradients.

    >>> import torch
    >>> t = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
    >>> x = torch.tensor([[0.0, 1.0, 2.0, 3.0]], requires_grad=True)
    >>> y = fixed_layernorm(x, t, torch.tensor(1.0), t, torch.tensor(0.5), t, t)
    >>> (y * 32).tolist()
    [[-27.0, 2.0, 30.0, 59.0]]
    """
    widths = layernorm_widths(in_type, gamma_type, beta_type, out_type,
                              reduced_length(x.shape, axis))
    if not x.is_floating_point():
        return layernorm_kernel(x.to(torch.int64), _codes(gamma, gamma_type, "gamma"),
                                _codes(beta, beta_type, "beta"), widths, axis, torch, fast=True)
    return _FixedLayerNorm.apply(x, gamma, beta, widths, axis)


# --- GELU ----------------------------------------------------------------------------------


class _FixedGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, widths: GeluWidths):
        codes = gelu_kernel(_codes(x, widths.in_type, "x"), widths, torch, fast=True)
        ctx.save_for_backward(x)
        return _values(codes, widths.out_type, x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return grad_y * (cdf + x * pdf), None


def fixed_gelu(x: torch.Tensor, in_type: FixedType, out_type: FixedType) -> torch.Tensor:
    """Torch twin of :func:`qflow.numerics.transformer.fixed_gelu`, with the gradient of
    the exact (erf) GELU.

    >>> import torch
    >>> t = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
    >>> fixed_gelu(torch.tensor([-128, -32, 0, 16, 127]), t, t).tolist()
    [0, -5, 0, 11, 127]
    """
    widths = gelu_widths(in_type, out_type)
    if not x.is_floating_point():
        return gelu_kernel(x.to(torch.int64), widths, torch, fast=True)
    return _FixedGelu.apply(x, widths)


# --- product of two activations ----------------------------------------------------------


def _matmul_codes(a: torch.Tensor, b: torch.Tensor, acc: FixedType) -> torch.Tensor:
    """Exact int64 ``a @ b``. Up to 53 bits float64 is exact and runs on any device: every
    product and every partial sum, in whatever order BLAS adds them, is an integer inside
    the accumulator's range. Wider sums take int64 on the CPU (CUDA has no int64 matmul)."""
    if acc.width <= _FLOAT64_EXACT_BITS:
        return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int64)
    return torch.matmul(a.cpu(), b.cpu()).to(a.device)


class _FixedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, a_type: FixedType, b_type: FixedType, acc: FixedType):
        codes = _matmul_codes(_codes(a, a_type, "a"), _codes(b, b_type, "b"), acc)
        ctx.save_for_backward(a, b)
        return _values(codes, acc, torch.promote_types(a.dtype, b.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        a, b = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [a.detach().requires_grad_(), b.detach().requires_grad_()]
            grad_a, grad_b = torch.autograd.grad(torch.matmul(*inputs), inputs, grad_y)
        return grad_a, grad_b, None, None, None


def fixed_matmul(a: torch.Tensor, a_type: FixedType, b: torch.Tensor,
                 b_type: FixedType) -> tuple[torch.Tensor, FixedType]:
    """Torch twin of :func:`qflow.numerics.transformer.fixed_matmul`: the batched product
    (codes, or values with the exact gradient) and its exact accumulator type.

    >>> import torch
    >>> a, b = FixedType.parse("ap_fixed<4,2>"), FixedType.parse("ap_ufixed<4,0>")
    >>> codes, acc = fixed_matmul(torch.tensor([[1, -8], [7, 2]]), a, torch.tensor([[15], [3]]), b)
    >>> codes.tolist(), str(acc)
    ([[-9], [111]], 'ap_fixed<9,3,AP_TRN,AP_WRAP>')
    """
    acc = matmul_accumulator_type(a_type, b_type, a.shape[-1] if a.dim() else 0)
    if a.is_floating_point() or b.is_floating_point():
        if not (a.is_floating_point() and b.is_floating_point()):
            raise TypeError("fixed_matmul takes two code tensors or two value tensors")
        return _FixedMatmul.apply(a, b, a_type, b_type, acc), acc
    a, b = a.to(torch.int64), b.to(torch.int64)
    check_codes(a, a_type, "a")
    check_codes(b, b_type, "b")
    return _matmul_codes(a, b, acc), acc
