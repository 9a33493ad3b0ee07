"""Exact fixed-point numerics on numpy int64 codes (no torch).

>>> from qflow.numerics import FixedType, cast
>>> cast([0.3, -2.0], FixedType.parse("ap_fixed<4,2,AP_RND_CONV,AP_SAT>")).tolist()
[0.25, -2.0]
"""

from .convert import cast, from_codes, khot_codes, requantize, to_codes, values_to_codes
from .corners import corner_inputs
from .types import MAX_WIDTH, FixedType, Overflow, Rounding, parse_overflow, parse_rounding

__all__ = [
    "MAX_WIDTH",
    "FixedType",
    "Overflow",
    "Rounding",
    "cast",
    "corner_inputs",
    "from_codes",
    "khot_codes",
    "parse_overflow",
    "parse_rounding",
    "requantize",
    "to_codes",
    "values_to_codes",
]
