"""qflow: quantization-aware training and bit-exact deployment.

Only the torch-free parts load eagerly (configs, numerics, the QGraph IR and emulator);
``quantize_``, ``describe`` and ``freeze`` import torch on first use, so that everything
after ``freeze`` runs without torch installed.

>>> import torch, qflow
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
>>> qflow.quantize_(model, qflow.QFXConfig.with_bits(8)) is model
True
"""

from .biper import BiPerConfig  # registers the BiPer method (torch-free)
from .config import LayerOverride, QFXConfig, QuantSpec, SpecOverride
from .dyadic import DyadicConfig  # registers the dyadic method (torch-free)
from .errors import ConfigError, QflowError
from .hawq import HAWQConfig  # registers the HAWQ method (torch-free)
from .ofq import OFQConfig  # registers the OFQ method (torch-free)

__version__ = "0.1.0"

_LAZY = {
    "quantize_": ("qflow.api", "quantize_"),
    "describe": ("qflow.api", "describe"),
    "freeze": ("qflow.graph.from_torch", "freeze"),
    "emulate": ("qflow.graph.emulator", "emulate"),
    "QGraph": ("qflow.graph.ir", "QGraph"),
    "import_qonnx": ("qflow.qonnx_import", "import_qonnx"),
    "import_brevitas": ("qflow.qonnx_import", "import_brevitas"),
}

__all__ = [
    "BiPerConfig",
    "ConfigError",
    "DyadicConfig",
    "HAWQConfig",
    "LayerOverride",
    "OFQConfig",
    "QFXConfig",
    "QGraph",
    "QflowError",
    "QuantSpec",
    "SpecOverride",
    "__version__",
    "describe",
    "emulate",
    "freeze",
    "import_brevitas",
    "import_qonnx",
    "quantize_",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'qflow' has no attribute {name!r}")
