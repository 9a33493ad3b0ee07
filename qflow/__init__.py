"""qflow: quantization-aware training and bit-exact deployment.

>>> import torch, qflow
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
>>> qflow.quantize_(model, qflow.QFXConfig.with_bits(8)) is model
True
"""

from .api import describe, quantize_
from .config import LayerOverride, QFXConfig, QuantSpec, SpecOverride
from .errors import ConfigError, QflowError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "LayerOverride",
    "QFXConfig",
    "QflowError",
    "QuantSpec",
    "SpecOverride",
    "__version__",
    "describe",
    "quantize_",
]
