"""Benchmark one QAT training step: float vs qflow QFX 4-bit vs brevitas 4-bit, and BiPer.

What it measures
    The wall time of one training step -- forward, cross-entropy loss, backward and an
    Adam step -- at batch size 256 (``--batch-size``) on seeded synthetic data, for two
    models, each in three variants built from the same float initialisation:

    * ``digits_cnn``: ``qflow.zoo.models.digits_cnn()`` (input N x 1 x 8 x 8, 10 classes:
      conv/BN/ReLU stem, a residual block, 2x2 average pooling, conv/BN/ReLU, global
      average pooling, linear);
    * ``jet_mlp``: ``qflow.zoo.models.jet_mlp()`` (input N x 16, 16-64-32-32-5, 5 classes).

    Variants:

    * ``float``: the plain torch model;
    * ``qflow``: ``qflow.quantize_(model, qflow.QFXConfig.with_bits(4))`` -- 4-bit input,
      4-bit per-channel weights, 4-bit activations, with the config's defaults for the
      rest (16-bit bias, 12-bit BatchNorm scale, 16-bit BatchNorm/residual-add outputs),
      all with trainable binary points;
    * ``brevitas``: the equivalent brevitas 0.13 model at 4 bits:
      ``QuantIdentity(bit_width=4)`` (signed, per tensor) on the input;
      ``QuantConv2d`` / ``QuantLinear`` with 4-bit per-output-channel weights
      (``Int8WeightPerChannelFloat``, ``weight_bit_width=4``) and, where the layer has a
      bias, a 16-bit bias with its own scale (``Int8BiasPerTensorFloatInternalScaling``,
      ``bias_bit_width=16``, the counterpart of qflow's 16-bit bias); ``QuantReLU``
      4-bit; ``nn.BatchNorm2d`` left float, as brevitas users do; the residual add
      re-quantized by a 16-bit signed ``QuantIdentity`` (qflow casts it to its 16-bit
      ``intermediate`` type); average pooling (2x2 and global) as float pooling followed
      by a 4-bit unsigned ``QuantIdentity``. We chose that over ``TruncAvgPool2d``
      because qflow re-casts the pooled value to a 4-bit type with a learned binary
      point, which is what a ``QuantIdentity`` with a learned scale does;
      ``TruncAvgPool2d`` instead drops low bits by a fixed shift.

    A third table (``--binary``, on by default) times the zoo's ``binary-cnn`` (input
    N x 1 x 8 x 8; a fixed-point stem, four binary 3x3 convolutions in residual blocks,
    a fixed-point classifier) as ``float`` and as ``biper`` (``qflow.BiPerConfig()``,
    in stage 2: α·sign(sin(ω₀·w)) weights, sign activations, the rest 8-bit QFX; what
    most of a BiPer run's steps are) and ``ste`` (the sign-STE baseline, stage 2), with
    the regularizer τ·mean(sin²(ω₀·w)) in BiPer's loss as ``qflow quantize`` adds it.
    brevitas has no BiPer; its column is left out there.

How it measures
    Each variant first runs warm-up steps (not timed): qflow's quantizers pick their
    binary points on the first forward, and brevitas's activation quantizers collect
    statistics for their first 300 training steps before switching to a learned scale,
    so brevitas is warmed up until every quantizer has left that phase and the timed
    steps are steady-state steps for all variants. The measurement then runs
    ``--repeats`` rounds; in each round every variant runs ``--steps`` steps in turn
    (float, qflow, brevitas, float, qflow, brevitas, ...) so that changes in machine
    load hit all variants alike. The table shows the median over rounds of the mean
    time per step, and its ratio to float; below it, per model, the two key ratios
    qflow/float and qflow/brevitas. Everything runs eagerly in float32 on the CPU (no
    ``torch.compile`` for any variant). Only stdout is written.

    The whole process, all variants alike, runs with
    ``qflow.train.keep_freed_memory()``, as ``qflow.train.fit`` does: glibc then keeps
    freed memory for the next step instead of returning it to the system and taking it
    back one page fault at a time. Without it the page faults depend on the heap's
    history: from none to thousands per step, which made one variant's step up to 40 %
    slower from one run to the next here (``--trim-heap`` measures that way).

    One intra-op thread by default: on a machine that other jobs share, several OpenMP
    threads wait on each other at every parallel operation, and one preempted thread can
    make a step ten times slower, which swamps the comparison. ``--threads 2`` (or 0 for
    torch's default) measures multi-threaded steps on an otherwise idle machine.

    ``--memory BATCH`` measures memory instead of time: for each model and variant, a
    fresh process builds it at that batch size, notes its resident set size, runs a few
    training steps and reports by how much the process's peak RSS rose above that
    baseline; ``--repeats`` processes per variant (median and range), then the ratio of
    the medians to float's. The figure swings between processes (glibc's heap layout):
    read the range. Beside it, the peak of the bytes live tensors hold during a step,
    from the profiler's allocation record: the same in every process, and what a GPU's
    ``torch.cuda.max_memory_allocated`` would count.

Run it
    . .venv/bin/activate
    python scripts/bench_qat.py                      # defaults: about a minute
    python scripts/bench_qat.py --threads 2 --steps 50 --repeats 9 --models digits_cnn
    python scripts/bench_qat.py --memory 4096        # peak memory per step instead
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

import qflow
import qflow.train
from qflow.zoo import models

VARIANTS = ("float", "qflow", "brevitas")
BITS = 4
ACC_BITS = 16  # qflow's default bias and intermediate word length
SEED = 0


def _brevitas():
    """Import brevitas lazily (it warns a lot on import); fail with a clear message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import brevitas.nn as qnn
            from brevitas.quant import (
                Int8ActPerTensorFloat,
                Int8BiasPerTensorFloatInternalScaling,
                Int8WeightPerChannelFloat,
                Uint8ActPerTensorFloat,
            )
    except ImportError as exc:  # pragma: no cover - depends on the environment
        sys.exit(f"bench_qat: brevitas is needed (pip install -e '.[bench]'): {exc}")
    return qnn, Int8ActPerTensorFloat, Uint8ActPerTensorFloat, Int8WeightPerChannelFloat, \
        Int8BiasPerTensorFloatInternalScaling


def _brevitas_layers():
    qnn, act_signed, act_unsigned, weight, bias = _brevitas()

    def conv(cin, cout, k, **kw):
        return qnn.QuantConv2d(cin, cout, k, weight_quant=weight, weight_bit_width=BITS,
                               bias_quant=bias, bias_bit_width=ACC_BITS, **kw)

    def linear(cin, cout):
        return qnn.QuantLinear(cin, cout, bias=True, weight_quant=weight,
                               weight_bit_width=BITS, bias_quant=bias,
                               bias_bit_width=ACC_BITS)

    def relu():
        return qnn.QuantReLU(act_quant=act_unsigned, bit_width=BITS)

    def ident(bits, signed):
        return qnn.QuantIdentity(act_quant=act_signed if signed else act_unsigned,
                                 bit_width=bits)

    return conv, linear, relu, ident


class BrevitasDigitsCNN(nn.Module):
    """brevitas twin of :class:`qflow.zoo.models.DigitsCNN` (same parameter names)."""

    def __init__(self, width: int = 16):
        super().__init__()
        conv, linear, relu, ident = _brevitas_layers()
        self.input_quant = ident(BITS, signed=True)
        self.stem = conv(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stem_relu = relu()
        self.conv1 = conv(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = relu()
        self.conv2 = conv(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.add_quant = ident(ACC_BITS, signed=True)
        self.relu2 = relu()
        self.pool = nn.AvgPool2d(2)
        self.pool_quant = ident(BITS, signed=False)
        self.conv3 = conv(width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.relu3 = relu()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.gap_quant = ident(BITS, signed=False)
        self.flatten = nn.Flatten()
        self.fc = linear(2 * width, 10)

    def forward(self, x):
        x = self.input_quant(x)
        x = self.stem_relu(self.stem_bn(self.stem(x)))
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = self.relu2(self.add_quant(x + y))
        x = self.pool_quant(self.pool(x))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(self.flatten(self.gap_quant(self.gap(x))))


def brevitas_jet_mlp() -> nn.Module:
    """brevitas twin of :func:`qflow.zoo.models.jet_mlp` (same parameter names)."""
    _, linear, relu, ident = _brevitas_layers()
    return nn.Sequential(OrderedDict([
        ("input_quant", ident(BITS, signed=True)),
        ("fc1", linear(16, 64)), ("relu1", relu()),
        ("fc2", linear(64, 32)), ("relu2", relu()),
        ("fc3", linear(32, 32)), ("relu3", relu()),
        ("fc4", linear(32, 5)),
    ]))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], tuple, int]] = {
    # name: (float model, brevitas model, input shape without batch, classes)
    "digits_cnn": (models.digits_cnn, BrevitasDigitsCNN, (1, 8, 8), 10),
    "jet_mlp": (models.jet_mlp, brevitas_jet_mlp, (16,), 5),
}


def _copy_float_parameters(src: nn.Module, dst: nn.Module) -> None:
    """Start the brevitas twin from the float model's weights, BN included."""
    dst_state = dst.state_dict()
    with torch.no_grad():
        for name, value in src.state_dict().items():
            if name not in dst_state or dst_state[name].shape != value.shape:
                raise RuntimeError(f"brevitas twin lacks a matching {name!r}")
            dst_state[name].copy_(value)


class Variant:
    """One model in one variant, with its optimizer and data, ready to step."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model = model.train()
        self.x, self.y = x, y
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.loss_fn = nn.CrossEntropyLoss()
        self.times: list[float] = []
        self.warmup_steps = 0

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - start) / steps


def _brevitas_stats_pending(model: nn.Module) -> bool:
    """True while some brevitas quantizer still collects statistics (not steady state)."""
    for module in model.modules():
        steps = getattr(module, "collect_stats_steps", None)
        counter = getattr(module, "counter", None)
        if isinstance(steps, int) and isinstance(counter, int) and counter <= steps:
            return True
    return False


def build(name: str, batch_size: int) -> dict[str, Variant]:
    make_float, make_brevitas, shape, classes = MODELS[name]
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn((batch_size, *shape), generator=gen)
    y = torch.randint(0, classes, (batch_size,), generator=gen)
    torch.manual_seed(SEED)
    float_model = make_float()
    qflow_model = qflow.quantize_(copy.deepcopy(float_model), qflow.QFXConfig.with_bits(BITS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # brevitas's deprecation and tracing chatter
        brevitas_model = make_brevitas()
    _copy_float_parameters(float_model, brevitas_model)
    return {
        "float": Variant(float_model, x, y),
        "qflow": Variant(qflow_model, x, y),
        "brevitas": Variant(brevitas_model, x, y),
    }


class RegularizedVariant(Variant):
    """A variant whose loss has a regularizer term added, as its method's phase does."""

    def __init__(self, model, x, y, regularizer):
        super().__init__(model, x, y)
        self.regularizer = regularizer

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x), self.y)
        if self.regularizer is not None:
            loss = loss + self.regularizer(self.model)
        loss.backward()
        self.opt.step()


BINARY_VARIANTS = ("float", "biper", "ste")


def build_binary(batch_size: int) -> dict[str, Variant]:
    """binary-cnn as float, BiPer stage 2 and sign-STE stage 2, from one initialisation."""
    from qflow.methods import method_of

    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn((batch_size, 1, 8, 8), generator=gen)
    y = torch.randint(0, 10, (batch_size,), generator=gen)
    torch.manual_seed(SEED)
    float_model = models.binary_cnn()
    variants: dict[str, Variant] = {"float": Variant(float_model, x, y)}
    for name, config in (("biper", qflow.BiPerConfig()),
                         ("ste", qflow.BiPerConfig(estimator="ste"))):
        model = qflow.quantize_(copy.deepcopy(float_model), config)
        stage2 = method_of(config).phases(config, 1)[-1]
        stage2.prepare(model)
        variants[name] = RegularizedVariant(model.train(), x, y, stage2.regularizer)
    return variants


def warm_up(variants: dict[str, Variant], steps: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for variant in variants.values():
            variant.run(steps)
            variant.warmup_steps = steps
            while _brevitas_stats_pending(variant.model):
                if variant.warmup_steps > 10_000:
                    raise RuntimeError("brevitas quantizers never left statistics collection")
                variant.run(10)
                variant.warmup_steps += 10


def measure(variants: dict[str, Variant], steps: int, repeats: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(repeats):
            for variant in variants.values():  # interleaved: float, qflow, brevitas, ...
                variant.times.append(variant.run(steps))


MEMORY_STEPS = 3


def _rss_bytes() -> int:
    """The process's resident set size now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Start the peak RSS (VmHWM) over from the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def memory_probe(name: str, variant: str, batch_size: int) -> tuple[float, float]:
    """(RSS, tensors) in MiB for one variant, in a fresh process: by how much the peak
    RSS during ``MEMORY_STEPS`` training steps lies above the RSS once the model, its
    optimizer and the data exist (the peak counted after a first step, which
    initializes the quantizers: what the heap keeps from it counts, its own transient
    peak does not); then the peak of the bytes held by live tensors during one more
    step (:func:`tensor_peak`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chosen = build(name, batch_size)[variant]
        gc.collect()
        base = _rss_bytes()
        chosen.run(1)  # the first step initializes the quantizers: its peak is not a step's
        _reset_peak_rss()
        chosen.run(MEMORY_STEPS)
        peak = _peak_rss_bytes()
        tensors = tensor_peak(chosen)
    return max(peak - base, 0) / 2**20, tensors / 2**20


def tensor_peak(variant: Variant) -> int:
    """The most bytes that tensors allocated during one training step hold at once (the
    profiler's record of every allocation and free, in order): what the step needs,
    whatever the heap does with it; the CPU's counterpart of
    ``torch.cuda.max_memory_allocated``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        variant.run(1)
    changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


def memory_table(names: list[str], batch_size: int, threads: int, repeats: int) -> None:
    """Peak memory of a step above the process baseline, per model and variant, each in
    ``repeats`` fresh processes (interleaved over variants; the median and the range);
    the ratio of the medians to float's."""
    print(f"\nPeak memory of a training step, batch {batch_size}: RSS, the rise of a fresh "
          f"process's peak RSS above its baseline over {MEMORY_STEPS} steps (median and "
          f"range of {repeats} processes per variant); tensors, the most bytes live tensors "
          "held at once during a step (the same in every process):")
    print(f"{'model':<12} {'variant':<10} {'RSS MiB':>9} {'range':>11} {'x float':>8} "
          f"{'tensors MiB':>12} {'x float':>8}")
    print("-" * 76)
    for name in names:
        runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
        tensors: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(repeats):
            for variant in VARIANTS:
                out = subprocess.run(
                    [sys.executable, __file__, "--memory-probe", name, variant,
                     "--batch-size", str(batch_size), "--threads", str(threads)],
                    capture_output=True, text=True, check=True)
                rss, live = out.stdout.split()[-2:]
                runs[variant].append(float(rss))
                tensors[variant].append(float(live))
        mib = {v: statistics.median(r) for v, r in runs.items()}
        live = {v: statistics.median(r) for v, r in tensors.items()}
        for variant in VARIANTS:
            spread = f"{min(runs[variant]):.0f}–{max(runs[variant]):.0f}"
            print(f"{name:<12} {variant:<10} {mib[variant]:>9.1f} {spread:>11} "
                  f"{mib[variant] / mib['float']:>8.2f} {live[variant]:>12.1f} "
                  f"{live[variant] / live['float']:>8.2f}")
        print(f"{name}: qflow/float peak memory = {mib['qflow'] / mib['float']:.2f} (RSS), "
              f"{live['qflow'] / live['float']:.2f} (tensors); goal <= 1.5 on digits_cnn at "
              "batch 4096")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per variant per round (default 20)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1; 0 keeps torch's own choice)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="interleaved measurement rounds; the median is reported (default 7)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed steps per variant before measuring (default 10; brevitas "
                             "runs more until its quantizers leave statistics collection)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS),
                        help="models to benchmark (default: all)")
    parser.add_argument("--binary", action=argparse.BooleanOptionalAction, default=True,
                        help="also time binary-cnn: float vs BiPer vs sign-STE (default on)")
    parser.add_argument("--trim-heap", action="store_true",
                        help="leave glibc's default heap trimming on (see 'How it measures')")
    parser.add_argument("--memory", type=int, default=None, metavar="BATCH",
                        help="instead of timing, the peak memory of a step at batch BATCH "
                             "(e.g. 4096), each variant in a fresh process")
    parser.add_argument("--memory-probe", nargs=2, metavar=("MODEL", "VARIANT"),
                        help=argparse.SUPPRESS)  # one variant's figure, in its own process
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.batch_size < 1 or args.warmup < 1:
        parser.error("--steps, --repeats, --batch-size and --warmup must be positive")
    if args.threads < 0:
        parser.error("--threads must be 0 (torch's choice) or positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    heap = "glibc's default heap trimming"
    if not args.trim_heap and qflow.train.keep_freed_memory():
        heap = "freed memory kept (qflow.train.keep_freed_memory, as fit does)"
    if args.memory_probe:
        print("{:.3f} {:.3f}".format(*memory_probe(*args.memory_probe, args.batch_size)))
        return 0
    if args.memory is not None:
        memory_table(args.models, args.memory, args.threads, args.repeats)
        return 0

    print(f"QAT training step (forward + loss + backward + Adam), batch {args.batch_size}, "
          f"{BITS}-bit, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"median of {args.repeats} interleaved rounds of {args.steps} steps; {heap}")
    results: dict[str, dict[str, float]] = {}
    warmups: dict[str, dict[str, int]] = {}
    for name in args.models:
        variants = build(name, args.batch_size)
        warm_up(variants, args.warmup)
        measure(variants, args.steps, args.repeats)
        results[name] = {v: statistics.median(variants[v].times) * 1e3 for v in VARIANTS}
        warmups[name] = {v: variants[v].warmup_steps for v in VARIANTS}

    print()
    print(f"{'model':<12} {'variant':<10} {'ms/step':>9} {'x float':>8}")
    print("-" * 42)
    for name, ms in results.items():
        for v in VARIANTS:
            print(f"{name:<12} {v:<10} {ms[v]:>9.3f} {ms[v] / ms['float']:>8.2f}")
    print()
    for name, ms in results.items():
        print(f"{name}: qflow/float = {ms['qflow'] / ms['float']:.2f}, "
              f"qflow/brevitas = {ms['qflow'] / ms['brevitas']:.2f}")
    print("(project targets: qflow/float <= 1.5 on digits_cnn; qflow/brevitas < 1 on both)")
    print()
    for name, steps in warmups.items():
        print(f"{name} warm-up steps (untimed): "
              + ", ".join(f"{v} {steps[v]}" for v in VARIANTS))
    if args.binary:
        variants = build_binary(args.batch_size)
        warm_up(variants, args.warmup)
        measure(variants, args.steps, args.repeats)
        ms = {v: statistics.median(variants[v].times) * 1e3 for v in BINARY_VARIANTS}
        print()
        print(f"{'model':<12} {'variant':<10} {'ms/step':>9} {'x float':>8}")
        print("-" * 42)
        for v in BINARY_VARIANTS:
            print(f"{'binary_cnn':<12} {v:<10} {ms[v]:>9.3f} {ms[v] / ms['float']:>8.2f}")
        print(f"binary_cnn: biper/float = {ms['biper'] / ms['float']:.2f}, "
              f"ste/float = {ms['ste'] / ms['float']:.2f} (project target: biper/float "
              "<= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
