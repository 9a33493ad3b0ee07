"""QFX quantization-aware training from Python, on the built-in 8x8 digits data.

Run:  python examples/qat_python_api.py [--epochs N]

A plain float CNN is trained, quantized in place with ``qflow.quantize_`` (4-bit
weights and activations, the first layer kept at 8 bits by a per-layer override),
fine-tuned with ``qflow.train.fit`` and evaluated on the exact fixed-point path.
"""

from __future__ import annotations

import argparse
import copy

from torch import nn

import qflow
from qflow.config import LayerOverride, SpecOverride
from qflow.train import evaluate, fit, seed_everything
from qflow.zoo import DATASETS


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.bn(self.conv(x))))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()

    seed_everything(0)
    data = DATASETS["digits"]()
    model = SmallCNN()
    fit(model, data.x_train, data.y_train, epochs=args.epochs, lr=3e-3, progress=False)
    float_acc = evaluate(model, data.x_test, data.y_test)

    config = qflow.QFXConfig.with_bits(
        4, fold_batchnorm=True,
        overrides=(LayerOverride(pattern="conv", weight=SpecOverride(bits=8)),),
    )
    qmodel = qflow.quantize_(copy.deepcopy(model), config)
    fit(qmodel, data.x_train, data.y_train, epochs=max(1, args.epochs // 2), lr=1e-3,
        progress=False)
    quant_acc = evaluate(qmodel, data.x_test, data.y_test)

    for row in qflow.describe(qmodel):
        print(f"{row.layer:8s} {row.tensor:7s} W={row.width:2d} I={row.int_width:6s} "
              f"{row.rounding}/{row.overflow}")
    print(f"float {float_acc:.2f} %  ->  QFX 4-bit {quant_acc:.2f} %")


if __name__ == "__main__":
    main()
