"""QFX quantized modules. ``qflow.quantize_`` swaps float modules for these.

=====================  =======================  ==========================================
float module           quantized                what is fixed point
=====================  =======================  ==========================================
model input            QInput (pre-hook)        ``input``
nn.Linear              QLinear                  ``weight``, ``bias``; output = accumulator
nn.Conv2d              QConv2d                  ``weight``, ``bias``; output = accumulator
nn.BatchNorm1d/2d      QBatchNorm1d/2d          ``norm_scale``, shift (``bias``), output
                                                (``intermediate``); or folded into the layer
nn.ReLU                QReLU                    output (``activation``)
qflow.nn.Add           QAdd                     output (``intermediate``)
nn.AvgPool2d           QAvgPool2d               output (``activation``)
nn.AdaptiveAvgPool2d   QAdaptiveAvgPool2d       output (``activation``), global pooling only
nn.MaxPool2d           QMaxPool2d               exact, keeps the input type
torch.cat (dim 1)      QCat                     output (``activation``): every input cast
                                                to one type, then concatenated (token
                                                tensors: also along the features, dim 2)
nn.LayerNorm           QLayerNorm               input (``intermediate``), γ
                                                (``norm_scale``), β (``bias``), output
                                                (``activation``)
nn.GELU                QGELU                    input (``intermediate``), output
                                                (``activation``)
nn.Softmax, softmax    QSoftmax                 input (``intermediate``), output: unsigned
                                                ``activation`` bits
``a @ b``              QMatmul                  both operands (``activation``); output =
                                                accumulator
``x + parameter``      QAddConst                the constant (``bias``), output
                                                (``intermediate``)
``x.mean(dim)``        QMean                    output (``intermediate``)
``x * c``, ``x / c``   QMulConst                the constant (``weight`` bits, its binary
                                                point fixed), output (``intermediate``)
=====================  =======================  ==========================================

The transformer layers run the exact integer ops of ``docs/transformer_ops.md`` in their
forward pass (:mod:`qflow.nn.transformer`).

Functional ops in a ``forward`` (``F.relu``, ``+``, ``torch.cat``, ``F.max_pool2d``,
...) become these modules too: see ``qflow.fxconvert``.
"""

from .concat import QCat
from .elementwise import (
    QAdaptiveAvgPool2d,
    QAdd,
    QAvgPool2d,
    QBatchNorm1d,
    QBatchNorm2d,
    QInput,
    QMaxPool2d,
    QMulConst,
    QReLU,
)
from .functional import Add
from .layers import QConv2d, QLinear
from .transformer import QGELU, QAddConst, QLayerNorm, QMatmul, QMean, QSoftmax

__all__ = [
    "QGELU",
    "Add",
    "QAdaptiveAvgPool2d",
    "QAdd",
    "QAddConst",
    "QAvgPool2d",
    "QBatchNorm1d",
    "QBatchNorm2d",
    "QCat",
    "QConv2d",
    "QInput",
    "QLayerNorm",
    "QLinear",
    "QMatmul",
    "QMaxPool2d",
    "QMean",
    "QMulConst",
    "QReLU",
    "QSoftmax",
]
