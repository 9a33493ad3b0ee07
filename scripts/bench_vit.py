"""Benchmark the tiny ViT: accuracy with each integer transformer op alone, full 8-bit QAT
and its deployed graph, and the QAT training step time against float.

What it measures
    For each seed (``--seeds``, default 0 1 2) the zoo's ``tiny-vit`` (digits, 2×2 patches
    → 16 tokens, dim 32, 2 heads, 2 blocks) is trained in float with the zoo defaults (60
    epochs, Adam, learning rate 2e-3 on a cosine schedule, batch 64), as ``qflow quantize``
    does. From that one float model:

    * ``float``: its test accuracy;
    * ``only softmax`` / ``only LayerNorm`` / ``only GELU`` integer: a copy in which every
      instance of that op (4 softmaxes, 5 LayerNorms, 2 GELUs) is the QAT layer that
      ``qflow.quantize_(model, QFXConfig.with_bits(8))`` puts there, and everything else
      stays float (no input cast, float linear layers, float products, sums and means).
      The layer computes the integer op (its torch twin) on its input cast to the
      layer's input type (the 16-bit ``intermediate`` role), with the layer's output
      type (8-bit; softmax's unsigned with 0 integer bits; LayerNorm's γ 12-bit and β
      16-bit). Each copy is calibrated as ``qflow quantize`` calibrates (one eval-mode
      forward on the first 256 training samples) and evaluated ("calibration only");
      with ``--finetune`` (on by default) that calibrated copy is then trained by the
      same QAT phase as the full model (30 epochs at a third of the learning rate; the
      float parts train too) and evaluated again ("+ QAT fine-tuning"). Those rows
      gain from the extra training as such, so the float model trained by that same
      phase with no integer op is the control row they compare with;
    * ``full 8-bit QAT``: exactly what ``qflow quantize --model tiny-vit --bits 8
      --seed S`` does (``quantize_`` on a copy, calibration, the QFX QAT phase, from the
      same random state the command has after float training), then the model frozen
      by ``qflow.freeze`` and run by the emulator on the test set: the script fails
      unless the emulator decides every test sample as the QAT model in eval mode does,
      and counts the samples whose output codes differ at all (expected 0).

    The table gives test accuracy (%) as mean ± std over the seeds, the change against
    the same seed's float model, and the per-seed values. A second table gives, for
    each op alone (calibration only, seed by seed, all instances of the op), the largest
    and the mean absolute difference between the integer layer's output and the float
    op on the same float input over the whole test set, and the output types' LSB: the
    in-model counterpart of the "Measured errors" table of docs/transformer_ops.md (that
    difference includes the input cast, γ/β quantization and the output cast).

    How "only that op integer" is built: a QFXConfig cannot leave a layer float
    (``quantize_`` refuses any op it cannot make exact, so that a quantized model always
    deploys), so the script swaps the layers in itself, with the constructors
    ``quantize_`` uses and the layer names it gives (``QLayerNorm.from_float`` and
    ``QGELU.from_float`` for the ``nn.LayerNorm`` and ``nn.GELU`` modules; for the
    ``F.softmax`` calls in the attention's forward, torch.fx replaces each call by a
    ``QSoftmax.from_config`` module, as :mod:`qflow.fxconvert` does, leaving the other
    functional ops float). A QAT layer evaluates in float64; its output, 8-bit codes,
    is handed to the float model in float32, which holds those values exactly (checked).

    Step time: one training step (forward, cross-entropy, backward, Adam) of the float
    tiny-vit and of its full 8-bit QAT copy (same float initialisation, seed 0; the QAT
    copy calibrated on the batch), on the same batch of ``--batch-size`` (default 64, the
    training batch) digits training samples: warm-up steps, then ``--repeats`` rounds in
    which each variant runs ``--steps`` steps in turn (float, QAT, float, QAT, ...); the
    median over rounds of the mean time per step, and the ratio QAT / float. As in
    ``scripts/bench_qat.py``: eager float32 on the CPU, ``qflow.train.keep_freed_memory``
    for the whole process, one intra-op thread by default (``--threads``).

Run it
    . .venv/bin/activate
    python scripts/bench_vit.py                      # 3 seeds: about 7 minutes, 1 thread
    python scripts/bench_vit.py --seeds 0 --no-finetune --epochs 5 --qat-epochs 2
    python scripts/bench_vit.py --seeds --repeats 9  # the step time only
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

import qflow
import qflow.train
from qflow import freeze
from qflow.graph import Emulator
from qflow.methods import method_of
from qflow.nn import QGELU, QLayerNorm, QSoftmax
from qflow.train import calibrate, evaluate, fit, seed_everything
from qflow.zoo import DATASETS, MODELS
from qflow.zoo.models import Attention

MODEL = "tiny-vit"
OPS = ("softmax", "LayerNorm", "GELU")
CALIBRATION_SAMPLES = 256  # what qflow quantize calibrates on: 4 batches of 64


class IntegerOnly(nn.Module):
    """One QAT layer inside a float model: its output back in the input's dtype (the
    8-bit output values are exact in float32) and, when ``track`` is on, its absolute
    difference from the float op (float64, the layer's own float γ and β for LayerNorm)
    on the same input: largest, summed, and largest where no cast saturates (the input
    row, or for GELU the element, within the input type's range, and the float op's
    output within half an LSB of the output type's range), with the saturated count."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.track = False
        self.reset()

    def reset(self) -> None:
        self.max_err = self.max_err_unsaturated = self.sum_err = 0.0
        self.count = self.saturated = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        out = y.to(x.dtype)
        if not self.training:
            assert torch.equal(out.to(y.dtype), y), "an output value is not exact in float32"
        if self.track:
            with torch.no_grad():
                self._record(x.double(), y.double())
        return out

    def _record(self, x: torch.Tensor, y: torch.Tensor) -> None:
        layer = self.layer
        in_t, out_t = layer.in_quant.fixed_type(), layer.out_quant.fixed_type()
        ref = self.reference(x)
        err = (y - ref).abs()
        sat = (x < in_t.min_value) | (x > in_t.max_value)
        if not isinstance(layer, QGELU):  # a saturated element changes its whole row
            sat = sat.any(dim=getattr(layer, "dim", -1), keepdim=True).expand_as(err)
        half = out_t.lsb / 2
        sat = sat | (ref < out_t.min_value - half) | (ref > out_t.max_value + half)
        self.max_err = max(self.max_err, float(err.max()))
        if not bool(sat.all()):
            self.max_err_unsaturated = max(self.max_err_unsaturated, float(err[~sat].max()))
        self.sum_err += float(err.sum())
        self.count += err.numel()
        self.saturated += int(sat.sum())

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, QSoftmax):
            return F.softmax(x, dim=layer.dim)
        if isinstance(layer, QGELU):
            return F.gelu(x, approximate=layer.approximate)
        weight, bias = (None if p is None else p.double() for p in (layer.weight, layer.bias))
        return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)

    def lsb(self) -> float:
        return 2.0 ** -self.layer.out_quant.fixed_type().fractional


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def only_op_integer(float_model: nn.Module, op: str, config) -> nn.Module:
    """A copy of ``float_model`` with every ``op`` (one of :data:`OPS`) the QAT layer of
    ``config`` (same constructor and layer name as ``qflow.quantize_``), all else float."""
    model = copy.deepcopy(float_model)
    for name, module in list(model.named_modules()):
        if op == "LayerNorm" and type(module) is nn.LayerNorm:
            _set(model, name, IntegerOnly(QLayerNorm.from_float(module, config, name)))
        elif op == "GELU" and type(module) is nn.GELU:
            _set(model, name, IntegerOnly(QGELU.from_float(module, config, name)))
        elif op == "softmax" and isinstance(module, Attention):
            _set(model, name, _integer_softmax(module, config, name))
    return model


def _integer_softmax(attn: Attention, config, path: str) -> fx.GraphModule:
    """``attn`` traced by torch.fx with each ``F.softmax`` call made a QSoftmax module,
    named ``softmax``, ``softmax_1``, ... in call order, as :mod:`qflow.fxconvert` names
    them; the rest of the forward unchanged."""
    graph = fx.Tracer().trace(attn)
    modules = dict(attn.named_children())
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.softmax:
            continue
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        name = "softmax" if count == 0 else f"softmax_{count}"
        count += 1
        layer = QSoftmax.from_config(config, f"{path}.{name}", dim=dim)
        modules[name] = IntegerOnly(layer)
        with graph.inserting_after(node):
            new = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    if count == 0:
        raise SystemExit(f"bench_vit: no F.softmax call in {path}'s forward")
    root = nn.Module()
    for key, value in modules.items():
        root.add_module(key, value)
    return fx.GraphModule(root, graph, class_name="IntegerSoftmaxAttention")


def qat_phases(model: nn.Module, data, config, *, qat_epochs: int, lr: float,
               batch_size: int, seed: int) -> None:
    """The method's QAT phases, as ``qflow quantize`` runs them after calibration (but
    without a teacher: no phase distils)."""
    method = method_of(config)
    for index, phase in enumerate(method.phases(config, qat_epochs), start=1):
        if phase.prepare is not None:
            phase.prepare(model)
        fit(model, data.x_train, data.y_train, epochs=phase.epochs, lr=lr * phase.lr_scale,
            batch_size=batch_size, seed=seed + index, progress=False, description=phase.name,
            **phase.fit_options(model))
    if method.finish is not None:
        method.finish(model, data.x_train)


def deployed(model: nn.Module, data) -> tuple[float, int]:
    """(accuracy % of the frozen model under the emulator, test samples whose output codes
    differ from the QAT model's); fails if any class decision differs."""
    model.eval()
    graph = freeze(model, torch.from_numpy(data.x_test[:2]))
    codes = Emulator(graph).run(data.x_test)
    with torch.no_grad():
        values = model(torch.from_numpy(data.x_test)).to(torch.float64).numpy()
    qat = np.rint(np.ldexp(values, graph.output_type.fractional)).astype(np.int64)
    decisions = int((np.argmax(codes, 1) != np.argmax(qat, 1)).sum())
    if decisions:
        raise SystemExit(f"bench_vit: the emulator decides {decisions} test samples "
                         "differently from the QAT model: not exact")
    differ = int((codes != qat).any(axis=1).sum())
    return 100.0 * float((np.argmax(codes, 1) == data.y_test).mean()), differ


def op_errors(model: nn.Module, data) -> dict:
    """The integer layers of ``model`` against their float ops over the test set: largest
    and mean abs error, largest where nothing saturates, share of saturated elements, and
    the smallest and largest output LSB."""
    layers = [m for m in model.modules() if isinstance(m, IntegerOnly)]
    for layer in layers:
        layer.reset()
        layer.track = True
    evaluate(model, data.x_test, data.y_test)
    for layer in layers:
        layer.track = False
    count = sum(m.count for m in layers)
    lsbs = [layer.lsb() for layer in layers]
    return {"max": max(m.max_err for m in layers),
            "max_unsaturated": max(m.max_err_unsaturated for m in layers),
            "mean": sum(m.sum_err for m in layers) / count,
            "saturated": sum(m.saturated for m in layers) / count,
            "lsb": (min(lsbs), max(lsbs))}


def accuracy_tables(args, zoo, data, config) -> tuple[dict, dict]:
    epochs = args.epochs if args.epochs is not None else zoo.epochs
    qat_epochs = args.qat_epochs if args.qat_epochs is not None else max(3, epochs // 2)
    print(f"{MODEL} on {data.name} ({len(data.x_train)} train / {len(data.x_test)} test): "
          f"float {epochs} epochs, QAT {qat_epochs} epochs at lr/3, batch {args.batch_size}, "
          f"lr {zoo.lr}, seeds {args.seeds}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    acc: dict[str, list[float]] = {}
    errors: dict[str, list[tuple]] = {op: [] for op in OPS}
    differ: list[int] = []
    for seed in args.seeds:
        started = time.perf_counter()
        seed_everything(seed)
        float_model = zoo.factory()
        fit(float_model, data.x_train, data.y_train, epochs=epochs, lr=zoo.lr,
            batch_size=args.batch_size, seed=seed, progress=False, description="float")
        after_float = torch.get_rng_state()  # what qflow quantize's QAT starts from
        acc.setdefault("float", []).append(evaluate(float_model, data.x_test, data.y_test))
        if args.finetune:  # the same extra training with no integer op: the control
            control = copy.deepcopy(float_model)
            torch.set_rng_state(after_float)
            qat_phases(control, data, config, qat_epochs=qat_epochs, lr=zoo.lr,
                       batch_size=args.batch_size, seed=seed)
            acc.setdefault(f"float, + {qat_epochs} epochs at lr/3 (control)", []).append(
                evaluate(control, data.x_test, data.y_test))
        calib = data.x_train[:CALIBRATION_SAMPLES]
        for op in OPS:
            model = only_op_integer(float_model, op, config)
            calibrate(model, calib)
            acc.setdefault(f"only {op} integer, calibration only", []).append(
                evaluate(model, data.x_test, data.y_test))
            errors[op].append(op_errors(model, data))
            if args.finetune:
                torch.set_rng_state(after_float)
                qat_phases(model, data, config, qat_epochs=qat_epochs, lr=zoo.lr,
                           batch_size=args.batch_size, seed=seed)
                acc.setdefault(f"only {op} integer, + {qat_epochs} QAT epochs", []).append(
                    evaluate(model, data.x_test, data.y_test))
        torch.set_rng_state(after_float)
        qat = qflow.quantize_(copy.deepcopy(float_model), config)
        calibrate(qat, calib)
        qat_phases(qat, data, config, qat_epochs=qat_epochs, lr=zoo.lr,
                   batch_size=args.batch_size, seed=seed)
        acc.setdefault(f"full 8-bit QAT ({qat_epochs} QAT epochs)", []).append(
            evaluate(qat, data.x_test, data.y_test))
        emulated, mismatching = deployed(qat, data)
        acc.setdefault("full 8-bit QAT, frozen, emulator", []).append(emulated)
        differ.append(mismatching)
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in acc.items())
              + f"; emulator output codes differ on {mismatching} of {len(data.x_test)} "
              f"samples ({time.perf_counter() - started:.0f} s)", flush=True)
    return acc, {"errors": errors, "differ": differ}


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"


def print_accuracy(acc: dict, extra: dict, seeds: list[int]) -> None:
    print(f"\ntest accuracy %, {len(seeds)} seed(s) {seeds}; change: against the same "
          "seed's float model, in points\n")
    print("| variant | mean ± std | change | per seed |")
    print("|---|---|---|---|")
    base = acc["float"]
    for name, values in acc.items():
        change = "—" if name == "float" else _mean_std([v - b for v, b in zip(values, base,
                                                                           strict=True)])
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {_mean_std(values)} | {change} | {runs} |")
    print(f"\nemulator vs QAT model: 0 differing decisions; samples with any differing "
          f"output code per seed: {extra['differ']}")
    print("\ninteger op alone vs the float op on the same input, test set, calibration only "
          "(all instances; per seed)\n")
    print("| op | output LSB | max abs error, no cast saturated | elements saturated | "
          "max abs error, all | mean abs error, all |")
    print("|---|---|---|---|---|---|")
    for op, rows in extra["errors"].items():
        lo, hi = min(r["lsb"][0] for r in rows), max(r["lsb"][1] for r in rows)
        lsb = f"{lo:g}" if lo == hi else f"{lo:g} to {hi:g}"
        cells = [", ".join(fmt.format(r[key]) for r in rows) for key, fmt in (
            ("max_unsaturated", "{:.4f}"), ("saturated", "{:.2e}"), ("max", "{:.4f}"),
            ("mean", "{:.5f}"))]
        print(f"| {op} | {lsb} | " + " | ".join(cells) + " |")


class Stepper:
    """A model with its optimizer and one batch, ready to run training steps."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model, self.x, self.y = model.train(), x, y
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.loss_fn = nn.CrossEntropyLoss()
        self.times: list[float] = []

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            self.loss_fn(self.model(self.x), self.y).backward()
            self.opt.step()
        return (time.perf_counter() - start) / steps


def step_ratio(args, zoo, data, config) -> None:
    x = torch.from_numpy(data.x_train[:args.batch_size])
    y = torch.from_numpy(data.y_train[:args.batch_size])
    seed_everything(0)
    float_model = zoo.factory()
    qat = qflow.quantize_(copy.deepcopy(float_model), config)
    calibrate(qat, x)
    variants = {"float": Stepper(float_model, x, y), "8-bit QAT": Stepper(qat, x, y)}
    for variant in variants.values():
        variant.run(args.warmup)
    for _ in range(args.repeats):
        for variant in variants.values():  # interleaved
            variant.times.append(variant.run(args.steps))
    ms = {k: statistics.median(v.times) * 1e3 for k, v in variants.items()}
    rounds = [q / f for f, q in zip(variants["float"].times, variants["8-bit QAT"].times,
                                    strict=True)]
    print(f"\ntraining step of {MODEL} (forward, loss, backward, Adam), batch "
          f"{args.batch_size}, {torch.get_num_threads()} thread(s), median of {args.repeats} "
          f"interleaved rounds of {args.steps} steps")
    for name, value in ms.items():
        print(f"  {name:<10} {value:8.2f} ms/step")
    print(f"QAT / float step time: {ms['8-bit QAT'] / ms['float']:.2f} (per-round ratios "
          f"{min(rounds):.2f} to {max(rounds):.2f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="seeds of the accuracy tables (none: the step time only)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="float epochs (default: the zoo model's, 60)")
    parser.add_argument("--qat-epochs", type=int, default=None,
                        help="QAT epochs (default: half the float epochs, as qflow quantize)")
    parser.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=True,
                        help="also fine-tune each op-alone model by the QAT phase (default on)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="training batch, and the batch of the step timing (default 64)")
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per variant per round (default 20)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="interleaved timing rounds; the median is reported (default 7)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed steps per variant before timing (default 10)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1; 0 keeps torch's choice)")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.repeats, args.warmup) < 1:
        parser.error("--batch-size, --steps, --repeats and --warmup must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    qflow.train.keep_freed_memory()
    zoo = MODELS[MODEL]
    data = DATASETS[zoo.data]()
    config = qflow.QFXConfig.with_bits(8)  # qflow quantize --bits 8
    step_ratio(args, zoo, data, config)
    if args.seeds:
        acc, extra = accuracy_tables(args, zoo, data, config)
        print_accuracy(acc, extra, args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
