"""Fixed-point types with the semantics of HLS ``ap_fixed<W,I,Q,O>`` / ``ap_ufixed``.

A value of a type is an integer code ``q`` times ``2**-fractional``. ``W`` (width) is
``signed + integer + fractional``; ``I`` in ap_fixed terms is ``signed + integer``.
``integer`` and ``fractional`` may be negative (``I < 0`` or ``I > W``), as in ap_fixed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

MAX_WIDTH = 62  # codes live in int64 with headroom for one addition and a sign


class Rounding(StrEnum):
    """Rounding modes, named as in ap_fixed (``AP_`` prefix dropped)."""

    TRN = "TRN"  # floor (HLS default)
    TRN_ZERO = "TRN_ZERO"  # toward zero
    RND = "RND"  # ties toward +inf
    RND_ZERO = "RND_ZERO"  # ties toward zero
    RND_INF = "RND_INF"  # ties away from zero
    RND_MIN_INF = "RND_MIN_INF"  # ties toward -inf
    RND_CONV = "RND_CONV"  # ties to even


class Overflow(StrEnum):
    """Overflow modes, named as in ap_fixed (``AP_`` prefix dropped)."""

    SAT = "SAT"  # clamp to [qmin, qmax]
    SAT_ZERO = "SAT_ZERO"  # 0 when out of range
    SAT_SYM = "SAT_SYM"  # clamp to [-qmax, qmax] when signed
    WRAP = "WRAP"  # keep the low W bits (HLS default)


def parse_rounding(value: str | Rounding) -> Rounding:
    """Accept ``"RND_CONV"``, ``"AP_RND_CONV"`` or a :class:`Rounding`."""
    if isinstance(value, Rounding):
        return value
    name = str(value).strip().upper().removeprefix("AP_")
    try:
        return Rounding(name)
    except ValueError:
        known = ", ".join(m.value for m in Rounding)
        raise ValueError(f"unknown rounding mode {value!r} (known: {known})") from None


def parse_overflow(value: str | Overflow) -> Overflow:
    """Accept ``"SAT"``, ``"AP_SAT"`` or an :class:`Overflow`."""
    if isinstance(value, Overflow):
        return value
    name = str(value).strip().upper().removeprefix("AP_")
    try:
        return Overflow(name)
    except ValueError:
        known = ", ".join(m.value for m in Overflow)
        raise ValueError(f"unknown overflow mode {value!r} (known: {known})") from None


@dataclass(frozen=True, kw_only=True)
class FixedType:
    """A fixed-point type: sign, integer bits, fractional bits, rounding, overflow.

    >>> t = FixedType(signed=True, integer=2, fractional=5, rounding="RND_CONV", overflow="SAT")
    >>> t.width, t.qmin, t.qmax
    (8, -128, 127)
    >>> str(t)
    'ap_fixed<8,3,AP_RND_CONV,AP_SAT>'
    >>> FixedType.parse(str(t)) == t
    True
    """

    signed: bool
    integer: int
    fractional: int
    rounding: Rounding = Rounding.TRN
    overflow: Overflow = Overflow.WRAP

    def __post_init__(self) -> None:
        object.__setattr__(self, "rounding", parse_rounding(self.rounding))
        object.__setattr__(self, "overflow", parse_overflow(self.overflow))
        for name in ("integer", "fractional"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"FixedType.{name} must be an int, got {value!r}")
        if not 1 <= self.width <= MAX_WIDTH:
            raise ValueError(
                f"fixed-point width {self.width} out of range: must be 1..{MAX_WIDTH} "
                f"(signed={self.signed}, integer={self.integer}, fractional={self.fractional})"
            )

    @classmethod
    def from_width(
        cls,
        width: int,
        int_width: int,
        *,
        signed: bool = True,
        rounding: Rounding | str = Rounding.TRN,
        overflow: Overflow | str = Overflow.WRAP,
    ) -> FixedType:
        """Build from ap_fixed's ``W`` and ``I`` (``I`` counts the sign bit)."""
        return cls(
            signed=signed,
            integer=int_width - int(signed),
            fractional=width - int_width,
            rounding=rounding,
            overflow=overflow,
        )

    @property
    def width(self) -> int:
        return int(self.signed) + self.integer + self.fractional

    @property
    def int_width(self) -> int:
        """ap_fixed's ``I``: sign bit plus integer bits."""
        return int(self.signed) + self.integer

    @property
    def qmin(self) -> int:
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1

    @property
    def lsb(self) -> float:
        return 2.0**-self.fractional

    @property
    def min_value(self) -> float:
        return self.qmin * self.lsb

    @property
    def max_value(self) -> float:
        return self.qmax * self.lsb

    def replace(self, **changes) -> FixedType:
        fields = {
            "signed": self.signed,
            "integer": self.integer,
            "fractional": self.fractional,
            "rounding": self.rounding,
            "overflow": self.overflow,
        }
        fields.update(changes)
        return FixedType(**fields)

    def to_ap(self) -> str:
        """The C++ HLS type, e.g. ``ap_fixed<8,3,AP_RND_CONV,AP_SAT>``."""
        kind = "ap_fixed" if self.signed else "ap_ufixed"
        return f"{kind}<{self.width},{self.int_width},AP_{self.rounding},AP_{self.overflow}>"

    def to_hls4ml(self) -> str:
        """hls4ml's precision string, e.g. ``fixed<8,3,RND_CONV,SAT>``."""
        kind = "fixed" if self.signed else "ufixed"
        return f"{kind}<{self.width},{self.int_width},{self.rounding},{self.overflow}>"

    def __str__(self) -> str:
        return self.to_ap()

    @classmethod
    def parse(cls, text: str) -> FixedType:
        """Parse ``ap_fixed<W,I[,Q[,O[,N]]]>``, ``ap_ufixed<...>`` or hls4ml's ``fixed<...>``.

        Omitted modes take the HLS defaults (TRN, WRAP). A saturation-bits argument
        ``N`` other than 0 is not supported.
        """
        match = _AP_PATTERN.fullmatch(text.strip())
        if not match:
            raise ValueError(f"not a fixed-point type string: {text!r}")
        kind, args = match.group(1), [a.strip() for a in match.group(2).split(",")]
        if len(args) < 2 or len(args) > 5:
            raise ValueError(f"expected 2 to 5 template arguments in {text!r}")
        try:
            width, int_width = int(args[0]), int(args[1])
        except ValueError:
            raise ValueError(f"width and integer width must be integers in {text!r}") from None
        rounding = parse_rounding(args[2]) if len(args) > 2 else Rounding.TRN
        overflow = parse_overflow(args[3]) if len(args) > 3 else Overflow.WRAP
        if len(args) == 5 and args[4] != "0":
            raise ValueError(f"saturation bits N={args[4]} are not supported in {text!r}")
        return cls.from_width(
            width,
            int_width,
            signed=not kind.endswith("ufixed"),
            rounding=rounding,
            overflow=overflow,
        )


_AP_PATTERN = re.compile(r"((?:ap_)?u?fixed)\s*<([^<>]*)>")
