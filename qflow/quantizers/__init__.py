"""Quantizers: modules that cast a tensor to a (trainable) fixed-point type."""

from .fixed import FixedQuantizer

__all__ = ["FixedQuantizer"]
