"""Channel concatenation of fixed-point tensors: one common type, then ``torch.cat``."""

from __future__ import annotations

import torch
from torch import nn

from qflow.config import QFXConfig
from qflow.errors import QflowError
from qflow.quantizers import FixedQuantizer

from .functional import exact_dtype


class QCat(nn.Module):
    """``torch.cat(tensors, dim)`` along the channel dim (dim 1), or the features of token
    tensors (dim 2 of batch, tokens, features: attention heads), in one fixed-point type.

    Every input is cast to the output quantizer's type (the ``activation`` spec: its
    word length, a trainable binary point, the sign from the data) and the casts are
    concatenated; the concatenation itself is exact. The cast is element-wise, so it
    is applied once to the concatenated tensor (the same values and gradients as one
    cast per input). ``dim`` may be negative: it is resolved against the inputs' rank
    on every call, and any other dim is refused.

    >>> import torch
    >>> from qflow.config import QFXConfig
    >>> cat = QCat.from_config(QFXConfig.with_bits(4), "cat", dim=-1)
    >>> cat(torch.tensor([[0.3]]), torch.tensor([[0.7, 1.0]])).shape
    torch.Size([1, 3])
    """

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = int(dim)

    @classmethod
    def from_config(cls, config: QFXConfig, name: str, dim: int = 1) -> QCat:
        layer = cls(dim)
        layer.qflow_name = name
        layer.out_quant = FixedQuantizer(config.spec_for(name, "activation"), per_sample=True)
        return layer

    def channel_dim(self, ndim: int) -> int:
        """The dim this layer concatenates along for ``ndim``-D inputs: 1, or 2 (the
        features) for 3-D token tensors (batch, tokens, features)."""
        dim = self.dim + ndim if self.dim < 0 else self.dim
        if dim != 1 and not (ndim == 3 and dim == 2):
            raise QflowError(f"{getattr(self, 'qflow_name', 'QCat')}: concatenation along dim "
                             f"{self.dim} of {ndim}-D tensors is not supported (only the "
                             "channel dim 1, or the features of token tensors)")
        return dim

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        if len(tensors) == 1 and isinstance(tensors[0], list | tuple):
            tensors = tuple(tensors[0])
        if not tensors:
            raise QflowError(f"{getattr(self, 'qflow_name', 'QCat')}: nothing to concatenate")
        dim = self.channel_dim(tensors[0].dim())
        dtype = exact_dtype(tensors[0], self)
        return self.out_quant(torch.cat([t.to(dtype) for t in tensors], dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
