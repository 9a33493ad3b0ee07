"""QFX trainable fixed-point quantizer: word length fixed, binary point learned."""

from __future__ import annotations

import math

import torch
from torch import nn

from qflow import distributed
from qflow.config import QuantSpec
from qflow.numerics import kernel
from qflow.numerics.types import FixedType, Overflow, Rounding
from qflow.ops import cast_trainable

_INIT_CANDIDATES = 4  # integer-bit choices tried below the one that holds the maximum
#: integer bits tried, relative to ceil(log2(peak)), when the start must hold every value
_COVER_SPAN = tuple(range(-2, 3))
#: overflow modes that do not clip an out-of-range value but wrap or zero it
_DESTRUCTIVE = (Overflow.WRAP, Overflow.SAT_ZERO)


def _round_code(v: torch.Tensor, fractional: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    """``v * 2**fractional`` rounded by ``rounding``, before any overflow (float64, exact:
    the same kernel as every cast; a nonzero value scaled to 0 keeps its sign)."""
    scaled = kernel.undo_underflow(v, torch.ldexp(v, fractional), torch)
    return kernel.round_scaled(scaled, rounding, torch)


class FixedQuantizer(nn.Module):
    """Casts a tensor to ``spec.bits``-bit fixed point with learned integer bits.

    The integer bits live in the parameter ``integer_bits`` (one value, or one per
    output channel with ``per_channel``); the forward pass rounds them to an integer.
    When ``spec.integer_bits`` is ``None`` they start from the first tensor seen (the
    weight at creation, the first training batch or calibration pass for activations
    and the input): at the fewest integer bits under which no value of it overflows
    when :attr:`covers_range` (WRAP, SAT_ZERO, or a binary point that is not trained,
    as the input's), otherwise at the value with the least squared error among
    ``ceil(log2(max |x|))`` and the three below it. The gradient is described in
    :func:`qflow.ops.cast_trainable`.

    >>> import torch
    >>> from qflow.config import QuantSpec
    >>> q = FixedQuantizer(QuantSpec(bits=4, signed=True))
    >>> q(torch.tensor([0.1, -0.7, 0.3])).tolist()
    [0.125, -0.75, 0.25]
    >>> str(q.fixed_type())
    'ap_fixed<4,1,AP_RND_CONV,AP_SAT>'
    """

    def __init__(self, spec: QuantSpec, *, channels: int | None = None, ndim: int = 1,
                 per_sample: bool = False):
        super().__init__()
        self.spec = spec
        #: it quantizes a batch of values per sample (activations, not weights): under
        #: data-parallel training its gradient scale counts the whole batch
        self.per_sample = per_sample
        self.per_channel = bool(spec.per_channel and channels)
        shape = (channels,) + (1,) * (ndim - 1) if self.per_channel else ()
        start = float(spec.integer_bits) if spec.integer_bits is not None else 0.0
        self.integer_bits = nn.Parameter(torch.full(shape, start), requires_grad=spec.trainable)
        ready = spec.integer_bits is not None and spec.signed is not None
        self.register_buffer("initialized", torch.tensor(ready))
        self.register_buffer("signed", torch.tensor(bool(spec.signed)))
        self._sync_flags()

    # The buffers ``initialized`` and ``signed`` are the state (saved and loaded); their
    # Python mirrors below spare the forward pass a tensor-to-bool read of each. They are
    # refreshed wherever the buffers change: here, in ``initialize`` and on loading a
    # state dict. Change the buffers only through these (or call ``_sync_flags``).
    def _sync_flags(self) -> None:
        self._initialized = bool(self.initialized)
        self._signed = bool(self.signed)
        self._grad_scales: dict[int, float] = {}

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_flags()

    def __setstate__(self, state):  # a module pickled before the mirrors existed
        super().__setstate__(state)
        if "_initialized" not in self.__dict__:
            self._sync_flags()

    @property
    def is_signed(self) -> bool:
        return self._signed

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    def _grad_scale(self, numel: int) -> float:
        """LSQ gradient scale ``1 / sqrt(values per integer-bits entry * qmax)``."""
        scale = self._grad_scales.get(numel)
        if scale is None:
            per_value = numel // max(1, self.integer_bits.numel())
            qmax = (1 << (self.spec.bits - self._signed)) - 1 or 1
            scale = self._grad_scales[numel] = 1.0 / math.sqrt(per_value * qmax)
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._initialized:
            self.initialize(x)
        spec = self.spec
        return cast_trainable(
            x,
            self.integer_bits,
            width=spec.bits,
            signed=self._signed,
            rounding=spec.rounding,
            overflow=spec.overflow,
            khot=spec.khot,
            grad_scale=self._grad_scale(
                distributed.whole_batch(x.numel(), x.shape[0]) if self.per_sample and x.dim()
                else x.numel()),
        )

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Pick the sign (if not given) and the starting integer bits from ``x``."""
        x = x.detach()
        if self.spec.signed is None:
            self.signed.fill_(bool(x.min() < 0))
            self._sync_flags()  # _best_integer_bits below casts with the new sign
        if self.spec.integer_bits is None:
            self.integer_bits.copy_(self._best_integer_bits(x))
        self.initialized.fill_(True)
        self._sync_flags()

    @property
    def covers_range(self) -> bool:
        """Whether the starting integer bits must hold every value of the first tensor.

        True when a value outside the range would be wrapped or zeroed (``WRAP``,
        ``SAT_ZERO``), and when the binary point is not trained (the model input by
        default), whose calibration is final: under every overflow mode no value seen
        then may overflow. Otherwise (a trained binary point under ``SAT``/``SAT_SYM``)
        clipping the largest values can be the better start. K-hot codes always
        saturate, so they never need it.
        """
        spec = self.spec
        if spec.khot:
            return False
        return spec.overflow in _DESTRUCTIVE or not spec.trainable

    def _best_integer_bits(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.integer_bits.shape
        if self.per_channel:
            flat = x.reshape(x.shape[0], -1)
            reduce_dims = tuple(range(1, x.dim()))
        else:
            flat = x.reshape(1, -1)
            reduce_dims = tuple(range(x.dim()))
        peak = flat.abs().amax(dim=1).clamp_min(2.0**-24)
        top = torch.ceil(torch.log2(peak))  # integer bits of the largest magnitude
        if self.covers_range:
            return self._covering_integer_bits(flat, top).reshape(shape)
        best, best_err = top.clone(), None
        for drop in range(_INIT_CANDIDATES):
            bits = (top - drop).reshape(shape)
            y = cast_trainable(
                x, bits, width=self.spec.bits, signed=self.is_signed,
                rounding=self.spec.rounding, overflow=self.spec.overflow, khot=self.spec.khot,
            )
            err = ((y - x) ** 2).sum(dim=reduce_dims) if reduce_dims else (y - x) ** 2
            err = err.reshape(-1)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best = torch.where(better, top - drop, best)
            best_err = torch.where(better, err, best_err)
        return best.reshape(shape)

    def _code_limits(self) -> tuple[int, int]:
        """(lowest, highest) code of the type under its overflow mode (SAT_SYM: −qmax)."""
        qmin, qmax = kernel.code_range(self.spec.bits, self._signed)
        if self.spec.overflow is Overflow.SAT_SYM:
            qmin = kernel.sat_sym_low(self.spec.bits, self._signed)
        return qmin, qmax

    def _covering_integer_bits(self, flat: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """Per row of ``flat``, the fewest integer bits under which neither the row's
        maximum nor its minimum overflows once rounded (by the type's rounding mode,
        so ``1 - lsb/2`` rounding up to 1.0 counts).

        Rounding is monotone, so the extremes decide for every value, and more integer
        bits never make a value overflow that fitted before: the fewest of ``top - 2``
        (a margin for ``log2``'s rounding) to ``top + 2`` that fit are taken, and
        ``top + 2`` always fits (``|code| <= 2**(W - signed - 2)``, in range for W >= 2;
        a 1-bit signed type's 0 or -1 too). An unsigned type holds no negative
        value at any integer bits (they become code 0 under SAT, SAT_SYM and SAT_ZERO
        and wrap under WRAP): only its maximum decides.
        """
        spec, signed = self.spec, self.is_signed
        qmin, qmax = self._code_limits()
        hi = flat.amax(dim=1).to(torch.float64)
        lo = flat.amin(dim=1).to(torch.float64)
        if not signed:
            lo = lo.clamp_min(0.0)
        chosen = top + _COVER_SPAN[-1]
        for step in reversed(_COVER_SPAN):  # downwards, so the fewest that fit wins
            bits = top + step
            fractional = (spec.bits - int(signed) - bits).to(torch.float64)
            fits = ((_round_code(hi, fractional, spec.rounding) <= qmax)
                    & (_round_code(lo, fractional, spec.rounding) >= qmin))
            chosen = torch.where(fits, bits, chosen)
        return chosen

    @torch.no_grad()
    def cover_(self, x: torch.Tensor) -> None:
        """Raise the integer bits (never lower them) where a value of ``x`` would
        overflow; an uninitialized quantizer initializes from ``x`` instead.

        For tensors that are functions of parameters rather than data (a BatchNorm's
        per-channel γ/σ): clipping one is never the better approximation, and the
        learned binary point follows a growing value too slowly (its gradient is the
        sum over one value), so the training pass keeps the range covered.

        >>> import torch
        >>> from qflow.config import QuantSpec
        >>> q = FixedQuantizer(QuantSpec(bits=8, signed=True, integer_bits=1))
        >>> q.cover_(torch.tensor([3.0, -0.5])); str(q.fixed_type())
        'ap_fixed<8,3,AP_RND_CONV,AP_SAT>'
        >>> q.cover_(torch.tensor([0.1])); str(q.fixed_type())   # never lowered
        'ap_fixed<8,3,AP_RND_CONV,AP_SAT>'
        """
        x = x.detach()
        if not self._initialized:
            self.initialize(x)
            return
        flat = x.reshape(x.shape[0], -1) if self.per_channel else x.reshape(1, -1)
        if self._holds(flat):  # the common case, checked on a few Python floats
            return
        peak = flat.abs().amax(dim=1).clamp_min(2.0**-24)
        needed = self._covering_integer_bits(flat, torch.ceil(torch.log2(peak)))
        needed = needed.reshape(self.integer_bits.shape).to(self.integer_bits.dtype)
        current = self.integer_bits.data
        current.copy_(torch.where(torch.round(current) < needed, needed, current))

    def _holds(self, flat: torch.Tensor) -> bool:
        """Whether every row of ``flat`` lies inside its current type's range (so that no
        value overflows under any rounding)."""
        spec, signed = self.spec, self._signed
        qmin, qmax = self._code_limits()
        his, los = flat.amax(dim=1).tolist(), flat.amin(dim=1).tolist()
        bits = torch.round(self.integer_bits.detach()).reshape(-1).tolist()
        for i, (hi, lo) in enumerate(zip(his, los, strict=True)):
            lsb = 2.0 ** (bits[i if len(bits) > 1 else 0] - (spec.bits - int(signed)))
            if hi > qmax * lsb or (signed and lo < qmin * lsb):
                return False
        return True

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``x`` cast by the current type: ``cast(x) · 2^fractional``,
        computed in float64 (exact), as int32 (int64 for 32-bit unsigned codes). Unlike a
        forward pass this never initializes the quantizer: it must have seen a tensor.

        >>> import torch
        >>> from qflow.config import QuantSpec
        >>> q = FixedQuantizer(QuantSpec(bits=4, signed=True, integer_bits=0))
        >>> q.codes(torch.tensor([0.1, -0.7, 0.3])).tolist()
        [1, -6, 2]
        """
        if not self._initialized:
            raise RuntimeError("the quantizer has no type yet: it has seen no tensor")
        values = self(x.detach().to(torch.float64))
        integer = torch.round(self.integer_bits.detach().to(torch.float64))
        fractional = self.spec.bits - int(self._signed) - integer
        wide = self.spec.bits >= 32 and not self._signed
        return torch.round(torch.ldexp(values, fractional)).to(
            torch.int64 if wide else torch.int32)

    def fixed_types(self) -> list[FixedType]:
        """The current type of each channel (one entry when per tensor)."""
        bits = torch.round(self.integer_bits.detach()).reshape(-1).tolist()
        return [self._type(int(i)) for i in bits]

    def fixed_type(self) -> FixedType:
        """The current type; per channel, the widest integer part over channels."""
        return max(self.fixed_types(), key=lambda t: t.integer)

    def _type(self, integer: int) -> FixedType:
        signed = self.is_signed
        return FixedType(
            signed=signed,
            integer=integer,
            fractional=self.spec.bits - int(signed) - integer,
            rounding=self.spec.rounding,
            overflow=self.spec.overflow,
        )

    def extra_repr(self) -> str:
        where = "per-channel" if self.per_channel else "per-tensor"
        khot = f", khot={self.spec.khot}" if self.spec.khot else ""
        return (f"bits={self.spec.bits}, {where}, {self.spec.rounding}/{self.spec.overflow}"
                f"{khot}, trainable={self.spec.trainable}")
