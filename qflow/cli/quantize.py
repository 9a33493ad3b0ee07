"""``qflow quantize``: train a float model, quantize it with QFX, fine-tune, write a run.

Everything the command is given is checked before anything is written: options, recipe,
data, the model (built once, fed two samples, quantized on a copy) and the output
directory (:mod:`qflow.outdir`). Training then saves its complete state after every epoch
into the output's staging directory, so a killed run continues with ``--resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import qflow
from qflow import distributed
from qflow.api import describe, quantize_
from qflow.errors import ConfigError, QflowError
from qflow.jsonfile import write_json
from qflow.methods import METHODS, config_from_dict, config_from_yaml, method_named, method_of
from qflow.oscillation import OscillationTracker
from qflow.oscillation_plot import oscillation_figure
from qflow.outdir import OutputDirectory, read_marker
from qflow.report import update_report
from qflow.runs import data_source, model_source, write_run_files
from qflow.sources import absolute_spec, module_search_path, resolve_data, resolve_model
from qflow.train import calibrate, evaluate, fit, rows_tensor, seed_everything
from qflow.training_log import SATURATION_SAMPLES, TensorBoardLog, parse_log_option
from qflow.zoo import DATASETS, MODELS, Dataset
from qflow.zoo.data import peak_magnitude

from .console import make_console, print_report

HELP = ("train a model and quantize it with a QAT method (default: digits-mlp, QFX "
        "8-bit)")
DEFAULT_MODEL = "digits-mlp"
DEFAULT_METHOD = "qfx"
DEFAULT_BATCH_SIZE = 64
MAX_SEED = 2**31 - 1
PROGRESS_FILE = "progress.pt"
PROGRESS_FORMAT = 3  # 3: the QAT state holds the oscillation tracker's
#: options that --resume takes from the interrupted run when they are not given again
RESUMED_OPTIONS = ("model", "data", "epochs", "qat_epochs", "lr", "batch_size", "seed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default=None, choices=sorted(METHODS),
                   help=f"QAT method (default: the recipe's, else the zoo model's: biper "
                        f"for binary-cnn and binary-mlp, {DEFAULT_METHOD} for the others)")
    p.add_argument("--model", default=None,
                   help=f"zoo name ({', '.join(sorted(MODELS))}) or path/file.py:factory "
                        f"(default {DEFAULT_MODEL}); a model file is Python code that qflow "
                        "runs")
    p.add_argument("--data", default=None,
                   help=f"zoo name ({', '.join(sorted(DATASETS))}), file.npz with "
                        "x_train/y_train/x_test/y_test (inputs saved uncompressed are "
                        "memory-mapped), or module:function returning such arrays or a "
                        "(train, test) pair of torch Datasets (default: the model's own "
                        "data set)")
    p.add_argument("--recipe", type=Path, default=None,
                   help="YAML file holding a method's config (its `method:` key names the "
                        "method; the other keys are the fields of its config class, e.g. "
                        "qflow.QFXConfig)")
    p.add_argument("--bits", type=int, default=None,
                   help="word length of weights, activations and input (default 8); "
                        "replaces a recipe's base widths, its per-layer overrides still apply")
    p.add_argument("--weight-bits", type=int, default=None,
                   help="word length of weights (replaces --bits and the recipe's)")
    p.add_argument("--act-bits", type=int, default=None,
                   help="word length of activations and input (replaces --bits and the "
                        "recipe's)")
    p.add_argument("--budget", action="append", default=None, metavar="QUANTITY=FRACTION",
                   help="HAWQ budget: a fraction of the all-8-bit model's, size=0.6 (weight "
                        "bits), bops=0.3 (bit operations), or a count on --target, dsp=300, "
                        "lut=50000, latency=20000 (clock cycles); repeat for several; "
                        "replaces the recipe's (default size=0.5)")
    p.add_argument("--target", default=None,
                   help="HAWQ: the FPGA target whose resource estimate a dsp, lut or latency "
                        "budget bounds (e.g. ultra96)")
    p.add_argument("--epochs", type=int, default=None,
                   help="float training epochs (default: the zoo model's, else 20)")
    p.add_argument("--qat-epochs", type=int, default=None,
                   help="epochs of each QAT phase (default: half of --epochs, at least 3)")
    p.add_argument("--lr", type=float, default=None, help="float learning rate (QAT uses a third)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"training batch size (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default runs/<model>-w<W>a<A>-seed<S>); an existing "
                        "one is replaced only with --force")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out, if it is a run qflow wrote (never "
                        "anything else)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last saved epoch "
                        "(options not given again are the interrupted run's); start it "
                        "when there is none")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="do not write RUN/report.html (qflow report RUN writes it later)")
    p.add_argument("--log", default=None, metavar="tensorboard[:DIR]",
                   help="log loss, learning rate, accuracy, integer widths and oscillation per "
                        "epoch for TensorBoard, into DIR (default RUN/tensorboard); needs "
                        "pip install qflow[tensorboard]")
    p.add_argument("--workers", type=int, default=0,
                   help="background processes that read training batches of data that is "
                        "not in memory (a memory-mapped .npz, torch Datasets); default 0: "
                        "read in the training process")
    p.add_argument("--device", default="auto",
                   help="where to train: auto (cuda when a GPU is present, else cpu), cpu, "
                        "cuda or cuda:N (default auto); the run, its exports and verify do "
                        "not depend on it")
    p.add_argument("--nproc", type=int, default=1,
                   help="train data-parallel in N processes on this machine: starts "
                        "`torchrun --standalone --nproc-per-node N -m qflow quantize ...` "
                        "(gloo on cpu, nccl on cuda; --batch-size stays the global batch)")


@dataclass(frozen=True)
class Settings:
    """What a run is made of, resolved and checked; ``plain()`` is what --resume compares."""

    model: str
    data: str
    config: object  # a registered method's config (qflow.methods)
    epochs: int
    qat_epochs: int
    lr: float
    batch_size: int
    seed: int

    def plain(self) -> dict:
        return {"model": self.model, "data": self.data, "config": self.config.to_dict(),
                "epochs": self.epochs, "qat_epochs": self.qat_epochs, "lr": self.lr,
                "batch_size": self.batch_size, "seed": self.seed}


def build_config(args: argparse.Namespace, note=lambda message: None):
    """The recipe (or the method's default config) with the word lengths given on the
    command line. The method is ``--method``, else the recipe's ``method:``, else the zoo
    model's (qfx for a model file)."""
    zoo = MODELS.get(args.model or DEFAULT_MODEL)
    default = args.method or (zoo.method if zoo else DEFAULT_METHOD)
    if args.recipe is not None:
        if not args.recipe.is_file():
            raise QflowError(f"recipe file not found: {args.recipe}")
        try:
            text = args.recipe.read_bytes()
        except OSError as exc:
            raise QflowError(f"cannot read recipe {args.recipe}: {exc.strerror}") from None
        try:
            config = config_from_yaml(text, default=default)
        except ConfigError as exc:
            raise ConfigError(f"{args.recipe}: {exc}") from None
        if args.method is not None and method_of(config).name != args.method:
            raise ConfigError(f"--method {args.method} but {args.recipe} is a "
                              f"{method_of(config).name} recipe")
    else:
        config = method_named(default).config_type()
    changed = config.replace_bits(args.bits, weight_bits=args.weight_bits,
                                  act_bits=args.act_bits)
    for option in ("budget", "target"):
        if getattr(args, option, None) and method_of(changed).name != "hawq":
            raise ConfigError(f"--{option} is for --method hawq, not {method_of(changed).name}")
    if getattr(args, "budget", None) or getattr(args, "target", None):
        from qflow.hawq import parse_budget

        budget = dict(map(parse_budget, args.budget)) if args.budget else changed.budget
        changed = dataclasses.replace(changed, budget=budget,
                                      target=args.target or changed.target)
    if args.recipe is not None and changed != config:
        describe = method_of(config).describe
        note(f"the command line's word lengths replace the recipe's: {describe(config)} -> "
             f"{describe(changed)} (the recipe's per-layer overrides still apply)")
    return changed


def _check_options(args: argparse.Namespace) -> None:
    for name in ("epochs", "qat_epochs"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise QflowError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise QflowError(f"--batch-size must be > 0, got {args.batch_size}")
    if args.log is not None:
        parse_log_option(args.log, Path("tensorboard"))  # a bad value stops before training
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise QflowError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise QflowError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}")
    if getattr(args, "workers", 0) < 0:
        raise QflowError(f"--workers must be >= 0, got {args.workers}")
    if args.resume and args.force:
        raise QflowError("--resume and --force exclude each other: --resume continues the "
                         "interrupted run, --force starts over")


def _settings(args: argparse.Namespace, note) -> Settings:
    config = build_config(args, note)
    model = args.model or DEFAULT_MODEL
    zoo = MODELS.get(model)
    epochs = args.epochs if args.epochs is not None else (zoo.epochs if zoo else 20)
    return Settings(
        model=model, data=args.data or (zoo.data if zoo else "digits"), config=config,
        epochs=epochs,
        qat_epochs=args.qat_epochs if args.qat_epochs is not None else max(3, epochs // 2),
        lr=args.lr if args.lr is not None else (zoo.lr if zoo else 3e-3),
        batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        seed=args.seed if args.seed is not None else 0)


def _default_out(settings: Settings) -> Path:
    name = settings.model if settings.model in MODELS else Path(
        settings.model.split(":")[0]).stem
    method = method_of(settings.config)
    tag = method.tag(settings.config)
    named = method.name == DEFAULT_METHOD or tag.startswith(f"{method.name}-")
    prefix = "" if named else f"{method.name}-"
    return Path("runs") / f"{name}-{prefix}{tag}-seed{settings.seed}"


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.nproc != 1 and not distributed.launched():
        return _launch(args, device)
    distributed.start(device)
    try:
        return _run(args, device)
    finally:
        distributed.stop()


def _run(args: argparse.Namespace, device: torch.device) -> int:
    main = distributed.is_main()  # rank 0 prints and writes; the others only train
    console = make_console() if main else Console(quiet=True)

    def note(message: str) -> None:
        console.print(f"[yellow]note:[/] {message}")

    _check_options(args)
    settings = _settings(args, note)
    out = OutputDirectory(args.out or _default_out(settings), kind="run", force=args.force,
                          report=lambda message: console.print(f"[yellow]{message}[/]"))
    saved = None
    if args.resume:
        marker = read_marker(out.final)
        if out.staged_progress() is None and marker and marker.get("complete"):
            console.print(f"run {out.given} is already complete; nothing to resume")
            return 0
        saved = _load_progress(out)
    if saved is not None:
        settings = _resumed_settings(args, settings, saved)
        model_spec, data_spec = (saved["sources"][k]["spec"] for k in ("model", "data"))
        search_path = saved["sources"]["data"].get("search_path")
    else:
        model_spec, data_spec, search_path = settings.model, settings.data, None
    build_model = resolve_model(model_spec)
    data = resolve_data(data_spec, search_path)
    sources = {"model": model_source(model_spec),
               "data": data_source(data_spec, data, search_path or
                                   module_search_path(data_spec))}
    if saved is not None:
        _check_same_sources(saved["sources"], sources)
    failure = None
    if main:
        try:
            out.check()
        except QflowError as exc:
            failure = exc
    if not distributed.all_ok(failure is None):
        if failure is not None:
            raise failure
        return 2  # rank 0 says why
    _check_model(build_model, data, settings.config)
    train = functools.partial(_train, settings, data, build_model, console, quiet=args.quiet,
                              log=args.log,
                              out=out, saved=saved, sources=sources, device=device,
                              workers=args.workers)
    if not main:
        train(stage=None)
        return 0

    with out.open(resume=saved is not None,
                  keep_progress_on=(KeyboardInterrupt, OSError)) as stage:
        if saved is not None:
            note(f"resuming {out.given}: {out.staged_progress()}")
        elif args.resume:
            note(f"no interrupted run in {out.given}: starting it")
        try:
            result = train(stage=stage)
        except KeyboardInterrupt:
            saved_at = out.staged_progress()
            if saved_at:
                console.print(f"[yellow]progress saved ({saved_at}); continue with the same "
                              "command and --resume[/]")
            raise
        (stage / PROGRESS_FILE).unlink(missing_ok=True)
        out.commit()
    rows, float_acc, quant_acc, elapsed, oscillation = result
    console.print(_format_table(rows))
    console.print(f"float accuracy      {float_acc:6.2f} %")
    console.print(f"quantized accuracy  {quant_acc:6.2f} %  "
                  f"({method_of(settings.config).describe(settings.config)}; drop "
                  f"{float_acc - quant_acc:+.2f} points)")
    console.print(oscillation)
    console.print(f"run written to {out.given}  ({elapsed:.1f} s)")
    if args.report:
        print_report(console, out.given, *update_report(out.final))
    return 0


def _train(settings: Settings, data: Dataset, build_model, console, *, quiet: bool,
           log: str | None = None,
           out: OutputDirectory, stage: Path | None, saved: dict | None, sources: dict,
           device: torch.device, workers: int = 0):
    """Float training, quantization, QAT, the run files; per-epoch progress in ``stage``
    (None: a data-parallel process other than rank 0, which writes nothing)."""
    started = time.perf_counter()
    before = saved["seconds"] if saved else 0.0
    s = settings
    seed_everything(s.seed)
    float_model = build_model().to(device)
    console.print(f"[bold]qflow quantize[/] model={s.model} data={data.name} "
                  f"train={len(data.x_train)} test={len(data.x_test)} seed={s.seed}")

    method = method_of(s.config)
    phases = method.phases(s.config, s.qat_epochs)
    done = saved["phase_index"] if saved else 0  # 0: float training, i: QAT phase i

    def save(index: int, state: dict, **extra) -> None:
        if stage is None:
            return
        name, epochs = ("float training", s.epochs) if index == 0 else (
            phases[index - 1].name, phases[index - 1].epochs)
        progress = {"format": PROGRESS_FORMAT, "settings": s.plain(), "sources": sources,
                    "phase_index": index, "state": state,
                    "seconds": before + time.perf_counter() - started, **extra}
        tmp = stage / f"{PROGRESS_FILE}.tmp"
        torch.save(progress, tmp)
        tmp.replace(stage / PROGRESS_FILE)
        out.mark_progress(f"saved after epoch {state['epoch']} of {epochs} of {name}")

    board = (TensorBoardLog(parse_log_option(log, stage / "tensorboard"),
                            samples=data.x_test[:SATURATION_SAMPLES],
                            warn=lambda message: console.print(f"[yellow]{message}[/]"))
             if log and stage is not None else None)

    progress = not quiet
    if done > 0:
        float_model.load_state_dict(saved["float_model"])
        float_history = saved["float_history"]
    else:
        float_history = fit(float_model, data.x_train, data.y_train, epochs=s.epochs, lr=s.lr,
                            batch_size=s.batch_size, seed=s.seed, progress=progress,
                            description="float", resume=saved and saved["state"],
                            x_val=data.x_test, y_val=data.y_test,
                            checkpoint=lambda state: save(0, state), log=board,
                            workers=workers)
    float_acc = evaluate(float_model, data.x_test, data.y_test)
    _warn_if_not_learning(console, float_acc, data)

    qat_model = copy.deepcopy(float_model)
    quant_config, resolved = s.config, None
    if method.resolve is not None:  # HAWQ: the config comes from the float model and data
        quant_config, report, line = method.resolve(
            s.config, float_model, data,
            None if quiet or not distributed.is_main() else console.print)
        resolved = (report, line)
        console.print(line)
    quantize_(qat_model, quant_config)
    calibrate(qat_model, data.x_train[: s.batch_size * 4])
    ptq_acc = evaluate(qat_model, data.x_test, data.y_test)
    # over all QAT phases; a resumed phase restores it from the saved state
    oscillation = OscillationTracker(qat_model)
    float_state = float_model.state_dict()
    histories = list(saved["histories"]) if done > 1 else []
    hooks = {}  # phase name -> its step hook (OFQ's CGA), for metrics.json and the console

    def save_qat(index: int, finished: list, state: dict) -> None:
        save(index, state, float_model=float_state, float_history=float_history,
             histories=finished)

    for index, phase in enumerate(phases, start=1):
        if phase.prepare is not None:
            phase.prepare(qat_model)
        if index < done:
            continue  # finished before the interruption: its end state is in the next one's
        checkpoint = functools.partial(save_qat, index, list(histories))
        options = phase.fit_options(qat_model, teacher=float_model)
        history = fit(qat_model, data.x_train, data.y_train, epochs=phase.epochs,
                      lr=s.lr * phase.lr_scale, batch_size=s.batch_size, seed=s.seed + index,
                      progress=progress, description=phase.name, oscillation=oscillation,
                      resume=saved["state"] if saved and index == done else None,
                      x_val=data.x_test, y_val=data.y_test,
                      checkpoint=checkpoint, log=board, workers=workers, **options)
        histories.append([{**r, "phase": phase.name} for r in history])
        if options["step_hook"] is not None and phase.epochs > 0:
            hooks[phase.name] = options["step_hook"]
    if method.finish is not None:  # BiPer re-estimates its BatchNorm statistics
        method.finish(qat_model, data.x_train)
    qat_history = [r for h in histories for r in h]
    quant_acc = evaluate(qat_model, data.x_test, data.y_test)
    rows = describe(qat_model)
    elapsed = before + time.perf_counter() - started
    metrics = {
        "float_accuracy": float_acc,
        "quantized_accuracy": quant_acc,
        "accuracy_drop": float_acc - quant_acc,
        "post_training_accuracy": ptq_acc,
        "float_history": float_history,
        "qat_history": qat_history,
        "formats": [r.__dict__ for r in rows],
        "oscillation": oscillation.summary(),
        "seconds": round(elapsed, 2),
    }
    for hook in hooks.values():  # OFQ: metrics["cga"], the frozen fraction at the end
        metrics[hook.key] = hook.summary()
    run_info = {
        "method": method.name,
        "model": s.model,
        "data": s.data,
        "sources": sources,
        "seed": s.seed,
        "epochs": s.epochs,
        "qat_epochs": s.qat_epochs,
        "lr": s.lr,
        "batch_size": s.batch_size,
        "input_shape": list(data.x_train.shape[1:]),
        "processes": distributed.world_size(),
        "device": device.type,
        "qflow": qflow.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    notes = "\n".join([oscillation.describe(), *(h.describe() for h in hooks.values())])
    if board is not None:
        board.close()
    if stage is None:
        return rows, float_acc, quant_acc, elapsed, notes
    write_run_files(stage, qat_model=qat_model, float_model=float_model, config=quant_config,
                    run_info=run_info, metrics=metrics)
    oscillation_figure(qat_history, stage / "oscillation.png",
                       threshold=metrics["oscillation"]["threshold"])
    if resolved is not None:  # what the config was chosen from (hawq.json)
        write_json(stage / f"{method.name}.json", resolved[0])
        if method.report_files is not None:  # HAWQ's pareto.png
            method.report_files(resolved[0], stage)
    return rows, float_acc, quant_acc, elapsed, notes


def resolve_device(spec: str) -> torch.device:
    """``--device``: auto, cpu, cuda or cuda:N; a CUDA device must exist. Under torchrun
    on CUDA, each process takes the GPU of its local rank."""
    spec = spec.strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    head, _, index = spec.partition(":")
    if head != "cuda" or (index and not index.isdigit()):
        raise QflowError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise QflowError(f"--device {spec}: no CUDA device is available here (torch "
                         f"{torch.__version__}, torch.cuda.is_available() is False)")
    count = torch.cuda.device_count()
    number = int(index) if index else int(os.environ.get("LOCAL_RANK", "0"))
    if number >= count:
        raise QflowError(f"--device {spec}: cuda:{number} does not exist ({count} CUDA "
                         f"device{'s' if count != 1 else ''})")
    return torch.device("cuda", number)


def _launch(args: argparse.Namespace, device: torch.device) -> int:
    """``--nproc N``: check what the run needs (options, data, model, output), then run
    this command again in N processes under torchrun; its exit code."""
    if args.nproc < 1:
        raise QflowError(f"--nproc must be >= 1, got {args.nproc}")
    if device.type == "cuda" and args.nproc > torch.cuda.device_count():
        raise QflowError(f"--nproc {args.nproc} on cuda needs {args.nproc} GPUs; "
                         f"{torch.cuda.device_count()} are present")
    _check_options(args)
    settings = _settings(args, lambda message: None)
    if not args.resume:
        OutputDirectory(args.out or _default_out(settings), kind="run",
                        force=args.force).check()
    _check_model(resolve_model(settings.model), resolve_data(settings.data), settings.config)
    command = [sys.executable, "-m", "qflow.cli.torchrun", "--standalone",
               "--nproc-per-node", str(args.nproc), "-m", "qflow", "quantize",
               *_without_nproc(args.argv)]
    env = dict(os.environ)  # threads per process: the cores shared out (torchrun's default: 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    env.setdefault("LOGLEVEL", "ERROR")  # the launcher's notes on shutting processes down
    with signal_ignored(signal.SIGINT):  # Ctrl-C reaches the launcher, which stops the rest
        return subprocess.run(command, env=env, check=False).returncode


@contextlib.contextmanager
def signal_ignored(signum: int):
    """While inside, this process ignores ``signum`` (its child handles it)."""
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def _without_nproc(argv: list[str]) -> list[str]:
    """The quantize command line without ``--nproc N`` (or ``--nproc=N``)."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--nproc":
            skip = True
        elif not word.startswith("--nproc="):
            kept.append(word)
    return kept[kept.index("quantize") + 1:] if "quantize" in kept else kept


def _load_progress(out: OutputDirectory) -> dict | None:
    """The progress an interrupted run saved in ``out``'s staging directory, or None."""
    if out.staged_progress() is None:
        return None
    path = out.stage / PROGRESS_FILE
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise QflowError(f"cannot resume from {path}: {type(exc).__name__}; start over with "
                         "--force") from None
    if not isinstance(saved, dict) or saved.get("format") != PROGRESS_FORMAT:
        raise QflowError(f"cannot resume from {path}: written by another qflow version; "
                         "start over with --force")
    return saved


def _resumed_settings(args: argparse.Namespace, given: Settings, saved: dict) -> Settings:
    """The interrupted run's settings; an option given again must agree with them."""
    stored = saved["settings"]
    for name in RESUMED_OPTIONS:
        value = getattr(args, name)
        if value is None:
            continue
        if name in ("model", "data"):
            mine, theirs = absolute_spec(value), saved["sources"][name]["spec"]
        else:
            mine, theirs = value, stored[name]
        if mine != theirs:
            raise QflowError(f"--{name.replace('_', '-')} {value} differs from the interrupted "
                             f"run's ({stored[name]}); resume with the same options or start "
                             "over with --force")
    config = config_from_dict(stored["config"])
    config_given = args.recipe is not None or any(
        v is not None for v in (args.bits, args.weight_bits, args.act_bits))
    if config_given and given.config != config:
        raise QflowError("the recipe and bit widths differ from the interrupted run's config; "
                         "resume with the same options or start over with --force")
    return Settings(model=stored["model"], data=stored["data"], config=config,
                    **{k: stored[k] for k in ("epochs", "qat_epochs", "lr", "batch_size",
                                              "seed")})


def _check_same_sources(stored: dict, current: dict) -> None:
    for key, what in (("model", "model file"), ("data", "data")):
        if stored.get(key, {}).get("sha256") != current[key].get("sha256"):
            raise QflowError(f"{what} {current[key]['spec']} changed since the interrupted run "
                             "started (sha256 differs); restore it or start over with --force")


def _check_model(build_model, data: Dataset, config) -> None:
    """Build the model once and check it against the data and the config, so that a
    mismatch stops the command before any training or writing."""
    model = build_model()
    sample = rows_tensor(data.x_train[:2])
    try:
        with torch.no_grad():
            logits = model.eval()(sample)
    except Exception as exc:
        reason = str(exc).strip().splitlines()
        raise QflowError(f"model does not accept the data's input shape "
                         f"{tuple(sample.shape[1:])}: {reason[0] if reason else exc!r}") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise QflowError(f"model output must be (batch, classes) logits, got {shape}")
    outputs = logits.shape[1]
    for split in ("train", "test"):
        labels = getattr(data, f"y_{split}")
        top = int(labels.max())
        if top >= outputs:
            raise QflowError(f"y_{split} has label {top} but the model has {outputs} outputs "
                             f"(labels must be 0..{outputs - 1})")
    check = method_of(config).check
    if check is None:  # unsupported layers, overrides matching nothing
        quantize_(copy.deepcopy(model), config)
    else:
        check(copy.deepcopy(model), config, sample)


def _warn_if_not_learning(console, float_acc: float, data: Dataset) -> None:
    """Say so when the float model does no better than guessing the commonest class."""
    counts = np.bincount(data.y_test)
    guess = 100.0 * counts.max() / len(data.y_test)
    if float_acc <= guess + 5.0:
        peak = peak_magnitude(data.x_train)
        console.print(f"[yellow]warning:[/] the float model reaches {float_acc:.2f} %, no better "
                      f"than always guessing the commonest class ({guess:.2f} %): check the "
                      f"data's scale (inputs reach {peak:.3g}), --lr and --epochs")


def _format_table(rows) -> Table:
    table = Table(title="Fixed-point formats (I: range over channels)")
    for col in ("layer", "tensor", "type", "W", "I", "rounding", "overflow"):
        table.add_column(col, justify="right" if col in ("W", "I") else "left")
    for r in rows:
        kind = ("ap_fixed" if r.signed else "ap_ufixed") + (f" {r.khot}-hot" if r.khot else "")
        table.add_row(r.layer, r.tensor, kind, str(r.width), r.int_width, r.rounding, r.overflow)
    return table

