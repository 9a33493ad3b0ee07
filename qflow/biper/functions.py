"""BiPer's forward and backward rules as autograd functions.

- :func:`sign`: +1 where ``x >= 0`` (so sign(0) = +1, unlike ``torch.sign``), else -1.
- :class:`BinaryActivation`: the training-mode activation. The input is divided by its
  per-sample standard deviation ``s`` (over all dimensions but the batch, no mean
  subtracted, ``s = sqrt(var + 1e-5)`` so that a constant input divides by no zero);
  the forward result is ``sign(x / s) = sign(x)`` and the gradient is the surrogate
  ``max(0, 2 - |2 x / s|)``, through the division and through ``s``.
- :class:`PeriodicSign`: BiPer's stage-2 weight ``sign(sin(ω₀·w))`` with the gradient
  ``ω₀·cos(ω₀·w)`` (the identity through the sign).
- :class:`ClippedSign`: the sign-STE baseline's weight ``sign(w)``, gradient 1 where
  ``|w| <= 1``, else 0.

Each is one autograd node with a hand-written backward, so a training step pays no
autograd bookkeeping for the formulas' intermediate terms.

>>> import torch
>>> sign(torch.tensor([-0.5, 0.0, 2.0])).tolist()
[-1.0, 1.0, 1.0]
>>> w = torch.tensor([0.01, -0.2], requires_grad=True)
>>> y = PeriodicSign.apply(w, 20.0); y.tolist()
[1.0, 1.0]
>>> y.sum().backward(); [round(g, 4) for g in w.grad.tolist()]
[19.6013, -13.0729]
"""

from __future__ import annotations

import torch

#: added to the per-sample variance before its square root (a constant input)
STD_EPS = 1e-5


def sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where ``x >= 0`` (``-0.0`` and ``0.0`` included), else -1, in ``x``'s dtype.

    ``torch.sign`` gives -1, 0 or +1; adding 1/2 and taking the sign again sends 0 to
    +1 (two cheap passes; ``torch.where`` on a mask is many times slower on the CPU).
    """
    return torch.sign(x).add_(0.5).sign_()


class BinaryActivation(torch.autograd.Function):
    """``sign(x / s)`` with ``s`` the per-sample standard deviation of ``x`` (see the
    module docstring); gradient ``max(0, 2 - 2|x / s|)`` through ``x / s``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return sign(x)  # = sign(x / s): s > 0

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        flat = x.reshape(x.shape[0], -1)
        count = flat.shape[1]
        # per-sample statistics in two passes (torch.var_mean is far slower here)
        centered = flat - flat.sum(dim=1, keepdim=True).div_(count)
        var = torch.linalg.vecdot(centered, centered).div_(count)
        inv = var.add_(STD_EPS).rsqrt_().unsqueeze(1)  # 1/s
        # dL/d(x/s): the surrogate max(0, 2 - 2|x/s|) times the incoming gradient
        g = torch.abs(flat).mul_(-2.0 * inv).add_(2.0).clamp_(min=0.0)
        g.mul_(grad.reshape(g.shape))
        # through x/s and s = sqrt(mean((x - mean)^2) + eps):
        # dL/dx = g/s - sum(g*x)/s^2 * (x - mean)/(count*s)
        coupling = torch.linalg.vecdot(g, flat).unsqueeze(1).mul_(inv.pow(3)).div_(count)
        return g.mul_(inv).sub_(centered.mul_(coupling)).reshape(x.shape)


class PeriodicSign(torch.autograd.Function):
    """``sign(sin(ω₀·w))`` forward, ``grad · ω₀·cos(ω₀·w)`` backward."""

    @staticmethod
    def forward(ctx, w, omega0: float):
        ctx.omega0 = omega0
        ctx.save_for_backward(w)
        return sign(torch.sin(w * omega0))

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * torch.cos(w * ctx.omega0).mul_(ctx.omega0), None


class ClippedSign(torch.autograd.Function):
    """``sign(w)`` forward, ``grad`` where ``|w| <= 1`` (else 0) backward."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return sign(w)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1.0)


def sine_penalty(weight: torch.Tensor, omega0: float) -> torch.Tensor:
    """BiPer's regularizer term of one layer: ``mean(sin²(ω₀·w))`` (autograd's gradient).

    >>> round(float(sine_penalty(torch.tensor([0.0, 3.14159265 / 40]), 20.0)), 6)
    0.5
    """
    return torch.sin(weight * omega0).square().mean()
