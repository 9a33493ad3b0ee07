"""Bit-exactness checks of deployed artifacts against the emulator.

:func:`verify_directory` is ``qflow verify`` without the printing; :func:`assert_exact`
raises AssertionError with the per-artifact table, for a user's own tests;
:func:`verification_inputs` regenerates the inputs of a report (sample ``i`` of
``verify.json`` is row ``i``).
"""

from .check import compare, verdict, verification_inputs, verify_directory
from .report import assert_exact, format_table

__all__ = ["assert_exact", "compare", "format_table", "verdict", "verification_inputs",
           "verify_directory"]
