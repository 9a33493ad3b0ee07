"""K-hot (multiplier-free) weights for an FPGA: DSPs saved and accuracy kept, on digits-cnn.

Run:  python examples/khot_fpga.py [--epochs N] [--target ultra96]

The zoo's digits-cnn is trained in float, then fine-tuned twice with QFX 8-bit
activations and BatchNorm folded into the convolutions: once with ordinary 8-bit weights,
once with K-hot weights (each weight a sum of at most 2 signed powers of two, so every
product is two shifts and an add). Both are frozen, and qflow's resource estimate for
the target compares their DSPs; the accuracies are on the exact fixed-point path.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import torch

import qflow
from qflow.config import QuantSpec
from qflow.export.hls.estimate import estimate_resources
from qflow.targets import load_target
from qflow.train import calibrate, evaluate, fit, seed_everything
from qflow.zoo import DATASETS, MODELS


def fine_tune(model, data, config, epochs: int, lr: float):
    """What `qflow quantize` does: quantize a copy, calibrate the binary points on a few
    batches, fine-tune at a third of the float learning rate."""
    qmodel = qflow.quantize_(copy.deepcopy(model), config)
    calibrate(qmodel, data.x_train[:256])
    fit(qmodel, data.x_train, data.y_train, epochs=epochs, lr=lr / 3, progress=False)
    return qmodel.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="float training epochs")
    parser.add_argument("--target", default="ultra96")
    args = parser.parse_args()

    seed_everything(0)
    zoo = MODELS["digits-cnn"]
    data = DATASETS[zoo.data]()
    model = zoo.factory()
    fit(model, data.x_train, data.y_train, epochs=args.epochs, lr=zoo.lr, progress=False)
    float_acc = evaluate(model, data.x_test, data.y_test)

    ordinary = qflow.QFXConfig(fold_batchnorm=True)
    khot = dataclasses.replace(
        ordinary, weight=QuantSpec(bits=8, signed=True, per_channel=True, khot=2))
    qat_epochs = max(3, args.epochs // 2)
    target = load_target(args.target)
    rows = {}
    for name, config in (("ordinary 8-bit", ordinary), ("K-hot K=2", khot)):
        qmodel = fine_tune(model, data, config, qat_epochs, zoo.lr)
        graph = qflow.freeze(qmodel, torch.as_tensor(data.x_test[:2]))
        estimate = estimate_resources(graph, target, io_type="io_parallel", reuse_factor=1,
                                      strategy="Latency")
        rows[name] = (evaluate(qmodel, data.x_test, data.y_test), estimate.totals["dsp"],
                      estimate.totals["lut"])

    print(f"digits-cnn float accuracy {float_acc:.2f} %")
    for name, (acc, dsp, lut) in rows.items():
        print(f"QFX {name:15s} accuracy {acc:.2f} %  estimated DSP {dsp:6,}  LUT {lut:8,}")
    (acc_o, dsp_o, _), (acc_k, dsp_k, _) = rows.values()
    saved = 1 - dsp_k / dsp_o if dsp_o else 0.0
    print(f"K-hot: {saved:.1%} fewer DSPs on {target.name}, accuracy "
          f"{acc_k - acc_o:+.2f} points vs ordinary multipliers, {acc_k - float_acc:+.2f} "
          "vs float")


if __name__ == "__main__":
    main()
