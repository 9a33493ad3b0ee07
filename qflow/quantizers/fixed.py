"""QFX trainable fixed-point quantizer: word length fixed, binary point learned."""

from __future__ import annotations

import math

import torch
from torch import nn

from qflow.config import QuantSpec
from qflow.numerics.types import FixedType
from qflow.ops import cast_trainable

_INIT_CANDIDATES = 4  # integer-bit choices tried below the one that holds the maximum


class FixedQuantizer(nn.Module):
    """Casts a tensor to ``spec.bits``-bit fixed point with learned integer bits.

    The integer bits live in the parameter ``integer_bits`` (one value, or one per
    output channel with ``per_channel``); the forward pass rounds them to an integer.
    When ``spec.integer_bits`` is ``None`` they start at the value (among the one that
    holds the largest magnitude and the few below it) with the least squared error on
    the first tensor seen: the weight at creation, the first training batch for
    activations. The gradient is described in :func:`qflow.ops.cast_trainable`.

    >>> import torch
    >>> from qflow.config import QuantSpec
    >>> q = FixedQuantizer(QuantSpec(bits=4, signed=True))
    >>> q(torch.tensor([0.1, -0.7, 0.3])).tolist()
    [0.125, -0.75, 0.25]
    >>> str(q.fixed_type())
    'ap_fixed<4,1,AP_RND_CONV,AP_SAT>'
    """

    def __init__(self, spec: QuantSpec, *, channels: int | None = None, ndim: int = 1):
        super().__init__()
        self.spec = spec
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
            grad_scale=self._grad_scale(x.numel()),
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

    def _best_integer_bits(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.integer_bits.shape
        if self.per_channel:
            flat = x.reshape(x.shape[0], -1)
            reduce_dims = tuple(range(1, x.dim()))
        else:
            flat = x.reshape(1, -1)
            reduce_dims = tuple(range(x.dim()))
        peak = flat.abs().amax(dim=1).clamp_min(2.0**-24)
        top = torch.ceil(torch.log2(peak))  # integer bits that hold the peak
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
