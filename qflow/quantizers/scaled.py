"""Integer input codes at a scale that is not a power of two, deployed as a fixed-point
multiplier: the input side of dyadic layers and of OFQ's learned activation scales.

A weight layer with an :class:`InputScale` multiplies integer codes q of its input:

    s       the scale: static (the input's range r / Q_a, r from the first batch, then
            a moving average over training batches) or learned (LSQ: a parameter)
    m_in    1/s as a B-bit fixed-point multiplier M · 2^(−F)     (:func:`multiplier_codes`)
    q       cast(x · m_in) to ``ap_int<a>`` / ``ap_uint<a>``, RND_CONV, SAT

Q_a = 2^(a−1) − 1 (signed) or 2^a − 1 (unsigned: the first batch has no negative value).
Eval mode computes q exactly that way, in float64; training uses the float scale,
x_q = s · clamp(round(x / s)) with straight-through rounding (LSQ's gradients for a
learned s). The layer then multiplies its accumulator by its row scale times 1/m_in.

Per token (``per_token=True``, an input of tokens (batch, T, features)): one scale s_t
and one multiplier per token position t (the first per-sample axis); the layer then
multiplies its accumulator by 1/m_in[t] (its own fixed-point multiplier, per token)
before the row scale. An input of any other rank keeps one scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qflow import distributed
from qflow.numerics import FixedType
from qflow.ops import fixed as fixed_ops

#: the smallest input range kept (an input that is all zeros at calibration)
MIN_RANGE = 2.0**-16


def multiplier_codes(scale: torch.Tensor, bits: int, multiplier_bits: int):
    """(codes M, fractions F) of the fixed-point multipliers m = M · 2^(−F) of the
    scales ``scale / 2^bits``: per entry, the nearest ``multiplier_bits``-bit signed
    value with M in [2^(B−2), 2^(B−1)) (ties to even); a zero scale gives M = F = 0.

    >>> m, f = multiplier_codes(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64), 2, 8)
    >>> m.tolist(), f.tolist()
    ([96, 64, 0], [7, 8, 0])
    """
    v = scale.to(torch.float64) / 2 ** bits
    _, exponent = torch.frexp(v)  # v = mantissa · 2^exponent, mantissa in [½, 1)
    frac = multiplier_bits - 1 - exponent.to(torch.int64)
    codes = torch.round(torch.ldexp(v, frac))
    top = codes == 2 ** (multiplier_bits - 1)  # rounded up out of the signed range
    codes = torch.where(top, codes / 2, codes)
    frac = torch.where(top, frac - 1, frac)
    zero = v == 0
    return (torch.where(zero, torch.zeros_like(codes), codes).to(torch.int64),
            torch.where(zero, torch.zeros_like(frac), frac))


def input_type(bits: int, signed: bool) -> FixedType:
    """The integer type of a layer's input codes.

    >>> str(input_type(4, False)), str(input_type(8, True))
    ('ap_ufixed<4,4,AP_RND_CONV,AP_SAT>', 'ap_fixed<8,8,AP_RND_CONV,AP_SAT>')
    """
    return FixedType(signed=signed, integer=bits - int(signed), fractional=0,
                     rounding="RND_CONV", overflow="SAT")


class InputScale(nn.Module):
    """The input codes of a weight layer (see the module docstring).

    >>> q = InputScale(4, 16)
    >>> q.eval().codes(torch.tensor([[0.0, 1.5, 3.0]])).tolist()   # range 3: scale 0.2
    [[0.0, 8.0, 15.0]]
    >>> str(q.input_type()), q.multiplier()
    ('ap_ufixed<4,4,AP_RND_CONV,AP_SAT>', (20480, 12))
    """

    def __init__(self, bits: int, multiplier_bits: int, *, learned: bool = False,
                 momentum: float = 0.99, per_token: bool = False):
        super().__init__()
        self.bits = int(bits)
        self.multiplier_bits = int(multiplier_bits)
        self.learned = bool(learned)
        self.momentum = float(momentum)
        #: asked for one scale per token; :attr:`tokens` says whether the input had them
        self.per_token = bool(per_token)
        self.register_buffer("range", torch.zeros((), dtype=torch.float64))
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("ready", torch.tensor(False))
        if self.learned:  # LSQ's step size, set from the first batch
            self.step = nn.Parameter(torch.ones(()))

    def steps(self) -> int:
        """Q_a: the largest code."""
        return (1 << (self.bits - 1)) - 1 if bool(self.signed) else (1 << self.bits) - 1

    @property
    def tokens(self) -> bool:
        """Whether there is one scale per token (known from the first input)."""
        return self.range.dim() == 1

    def _resize(self, tokens: int) -> None:
        """One scale per token: the buffers (and a learned step, the same Parameter
        object, so an optimizer built on it keeps it) get ``tokens`` entries."""
        self.range = self.range.new_zeros(tokens)
        if self.learned:
            self.step.data = self.step.data.new_ones(tokens)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "range")
        if self.per_token and saved is not None and saved.dim() == 1 and not self.tokens:
            self._resize(saved.shape[0])  # a per-token scale saved before it is rebuilt
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _per_scale(self, values: torch.Tensor, reduce) -> torch.Tensor:
        """``reduce`` of ``values`` (batch, ...) over everything but the token axis when
        per token, over everything otherwise."""
        if not self.tokens:
            return reduce(values.reshape(-1), 0)
        return reduce(values.transpose(0, 1).reshape(values.shape[1], -1), 1)

    def _broadcast(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-token ``values`` shaped to multiply ``like`` (batch, T, features)."""
        return values.reshape(-1, 1) if self.tokens and like.dim() == 3 else values

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Start from ``x`` (the first call: sign, range, a learned step's initial value);
        a static range then follows training batches."""
        ready = bool(self.ready)
        if ready and (self.learned or not self.training):
            return
        if not ready:  # signed when any process sees a negative value
            self.signed.fill_(bool(distributed.max_((x.min() < 0).to(torch.float32)) > 0))
            if self.per_token and x.dim() == 3:
                self._resize(x.shape[1])
        if ready and self.tokens and (x.dim() != 3 or x.shape[1] != self.range.shape[0]):
            raise ValueError(f"input of shape {tuple(x.shape)}: this per-token scale has "
                             f"{self.range.shape[0]} tokens")
        values = x.to(torch.float64)
        peak = distributed.max_(self._per_scale(values.abs() if bool(self.signed) else values,
                                                lambda v, dim: v.amax(dim)).clamp_min(0))
        if not ready and self.learned:  # Esser et al.: 2·mean|x| / sqrt(Q_P)
            sums = self._per_scale(values.abs(), lambda v, dim: v.sum(dim))
            count = distributed.sum_(values.new_tensor(float(values.numel() // sums.numel())))
            mean = distributed.sum_(sums) / count
            self.step.copy_((2 * mean / math.sqrt(self.steps())).clamp_min(
                MIN_RANGE / self.steps()))
        if ready:
            peak = self.momentum * self.range + (1 - self.momentum) * peak
        self.range.copy_(peak)
        self.ready.fill_(True)

    def scale(self) -> torch.Tensor:
        """The float scale s (float64, no gradient; one per token when per token)."""
        if self.learned:
            return self.step.detach().abs().to(torch.float64).clamp_min(MIN_RANGE / self.steps())
        return self.range.clamp_min(MIN_RANGE) / self.steps()

    def input_type(self) -> FixedType:
        return input_type(self.bits, bool(self.signed))

    def multipliers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes M, fractions F) of m_in = M · 2^(−F) ≈ 1/s, one per token when per
        token (shape (T,)), else one (shape (1,))."""
        return multiplier_codes((1 / self.scale()).reshape(-1), 0, self.multiplier_bits)

    def multiplier_values(self) -> torch.Tensor:
        """The values m_in (float64, shape (T,) or (1,))."""
        codes, frac = self.multipliers()
        return torch.ldexp(codes.to(torch.float64), -frac)

    def multiplier(self) -> tuple[int, int]:
        """(code M, fraction F) of m_in = M · 2^(−F) ≈ 1/s (one scale only)."""
        if self.tokens:
            raise ValueError("a per-token input scale has one multiplier per token: "
                             "use multipliers()")
        codes, frac = self.multipliers()
        return int(codes[0]), int(frac[0])

    def multiplier_value(self) -> float:
        code, frac = self.multiplier()
        return math.ldexp(code, -frac)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes q = cast(x · m_in), exact in float64 (eval mode)."""
        self.observe(x)
        m = self._broadcast(self.multiplier_values(), x)
        return fixed_ops.cast(x.to(torch.float64) * m, self.input_type())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training: the fake-quantized input s · clamp(round(x / s)), straight through
        (and LSQ's gradient for a learned s, scaled by 1/sqrt(n · Q_a), n the values
        one scale quantizes per sample)."""
        self.observe(x)
        high = self.steps()
        low = -high - 1 if bool(self.signed) else 0
        if self.learned:
            n = x[0].numel() // (self.step.numel() if self.tokens else 1)
            g = 1 / math.sqrt(n * high)
            s = self.step.abs().clamp_min(MIN_RANGE / high).to(x.dtype)
            s = s * g + (s - s * g).detach()  # the value s, the gradient · g
        else:
            s = self.scale().to(x.dtype)
        s = self._broadcast(s, x)
        v = torch.clamp(x / s, low, high)
        return (v + (torch.round(v) - v).detach()) * s

    def extra_repr(self) -> str:
        return f"bits={self.bits}, multiplier_bits={self.multiplier_bits}, " + (
            "learned (LSQ)" if self.learned else f"static, momentum={self.momentum:g}") + (
            ", per token" if self.per_token else "")
