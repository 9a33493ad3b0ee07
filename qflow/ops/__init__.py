"""torch twins of :mod:`qflow.numerics`, under the same names, with straight-through gradients.

Values are exact in the tensor's dtype whenever the result is representable in it:
float32 holds codes of up to 24 significant bits, float64 up to 53.

>>> import torch
>>> from qflow.numerics import FixedType
>>> from qflow.ops import cast
>>> t = FixedType.parse("ap_fixed<4,2,AP_RND_CONV,AP_SAT>")
>>> cast(torch.tensor([0.3, -2.0, 9.0]), t).tolist()
[0.25, -2.0, 1.75]
"""

from .fixed import cast, cast_trainable, from_codes, khot_codes, requantize, to_codes

__all__ = ["cast", "cast_trainable", "from_codes", "khot_codes", "requantize", "to_codes"]
