"""Bring a brevitas model: train it with brevitas, import it into qflow, deploy it exactly.

Run:  python examples/brevitas_import.py [--epochs N] [--target onnx|cpu|ultra96] [--out DIR]

A small brevitas CNN with power-of-two scales (the fixed-point quantizers) is trained on
the built-in 8x8 digits, exported by brevitas's own ``export_qonnx``, then imported with
``qflow import``, exported for ``--target`` and checked by ``qflow verify``: every
artifact and qonnx's executor on the original file against qflow's emulator.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import brevitas.nn as qnn
import torch
from brevitas.export import export_qonnx
from brevitas.quant import (
    Int8ActPerTensorFixedPoint,
    Int8WeightPerTensorFixedPoint,
    Int16Bias,
    Uint8ActPerTensorFixedPoint,
)
from torch import nn

from qflow.zoo import DATASETS


class BrevitasCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint,
                                     return_quant_tensor=True)
        self.conv = qnn.QuantConv2d(1, 8, 3, padding=1, weight_quant=Int8WeightPerTensorFixedPoint,
                                    bias_quant=Int16Bias)
        self.relu = qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, return_quant_tensor=True)
        self.fc = qnn.QuantLinear(8 * 4 * 4, 10, weight_quant=Int8WeightPerTensorFixedPoint,
                                  bias_quant=Int16Bias)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.relu(self.conv(self.inp(x))), 2)
        return self.fc(x.flatten(1))


def qflow_cli(*args: str) -> None:
    print("$ qflow", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "qflow", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--target", default="onnx")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the QONNX file and the run (default: a temporary one)")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = DATASETS["digits"]()
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    model = BrevitasCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(args.epochs):  # plain brevitas QAT
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(torch.as_tensor(data.x_test)).argmax(1).numpy() == data.y_test).mean()
    print(f"brevitas model: test accuracy {100 * accuracy:.2f} %")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        onnx_file = work / "brevitas_cnn.onnx"
        export_qonnx(model, input_t=torch.rand(1, 1, 8, 8), export_path=str(onnx_file))
        run = work / "brevitas-cnn"
        qflow_cli("import", str(onnx_file), "--data", "digits", "--out", str(run))
        qflow_cli("export", str(run), "--target", args.target)
        qflow_cli("verify", str(run / f"export-{args.target}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
