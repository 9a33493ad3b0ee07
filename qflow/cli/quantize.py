"""``qflow quantize``: train a float model, quantize it with QFX, fine-tune, write a run."""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch
from rich.table import Table

import qflow
from qflow.api import describe, quantize_
from qflow.config import QFXConfig
from qflow.errors import ConfigError, QflowError
from qflow.runs import save_run
from qflow.sources import resolve_data, resolve_model
from qflow.train import calibrate, evaluate, fit, seed_everything
from qflow.zoo import MODELS

from .console import make_console

HELP = "train and quantize a model with QFX fixed point (default: digits-mlp, 8-bit)"
DEFAULT_MODEL = "digits-mlp"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"zoo name ({', '.join(sorted(MODELS))}) or path/file.py:factory "
                        f"(default {DEFAULT_MODEL})")
    p.add_argument("--data", default=None,
                   help="zoo name (digits, jets), file.npz with x_train/y_train/x_test/y_test, "
                        "or module:function (default: the model's own data set)")
    p.add_argument("--recipe", type=Path, default=None,
                   help="YAML file holding a QFX config (the fields of qflow.QFXConfig)")
    p.add_argument("--bits", type=int, default=None,
                   help="word length of weights, activations and input (default 8)")
    p.add_argument("--weight-bits", type=int, default=None, help="word length of weights")
    p.add_argument("--act-bits", type=int, default=None,
                   help="word length of activations and input")
    p.add_argument("--epochs", type=int, default=None,
                   help="float training epochs (default: the zoo model's, else 20)")
    p.add_argument("--qat-epochs", type=int, default=None,
                   help="QAT fine-tuning epochs (default: half of --epochs, at least 3)")
    p.add_argument("--lr", type=float, default=None, help="float learning rate (QAT uses a third)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default runs/<model>-w<W>a<A>-seed<S>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_config(args: argparse.Namespace) -> QFXConfig:
    if args.recipe is not None:
        if not args.recipe.is_file():
            raise QflowError(f"recipe file not found: {args.recipe}")
        try:
            config = QFXConfig.from_yaml(args.recipe.read_text(encoding="utf-8"))
        except ConfigError as exc:
            raise ConfigError(f"{args.recipe}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{args.recipe}: not UTF-8 text ({exc.reason} at byte "
                              f"{exc.start})") from None
        except OSError as exc:
            raise QflowError(f"cannot read recipe {args.recipe}: {exc.strerror}") from None
    else:
        config = QFXConfig()
    return config.replace_bits(args.bits, weight_bits=args.weight_bits, act_bits=args.act_bits)


def _check_positive(name: str, value: int | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise QflowError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def run(args: argparse.Namespace) -> int:
    console = make_console()
    _check_positive("epochs", args.epochs, allow_zero=True)
    _check_positive("qat-epochs", args.qat_epochs, allow_zero=True)
    _check_positive("batch-size", args.batch_size)
    config = build_config(args)
    build_model = resolve_model(args.model)
    zoo = MODELS.get(args.model)
    data = resolve_data(args.data or (zoo.data if zoo else "digits"))
    epochs = args.epochs if args.epochs is not None else (zoo.epochs if zoo else 20)
    qat_epochs = args.qat_epochs if args.qat_epochs is not None else max(3, epochs // 2)
    lr = args.lr if args.lr is not None else (zoo.lr if zoo else 3e-3)
    out = args.out or Path("runs") / (
        f"{args.model if zoo else Path(args.model.split(':')[0]).stem}"
        f"-w{config.weight.bits}a{config.activation.bits}-seed{args.seed}")

    started = time.perf_counter()
    seed_everything(args.seed)
    float_model = build_model()
    console.print(f"[bold]qflow quantize[/] model={args.model} data={data.name} "
                  f"train={len(data.x_train)} test={len(data.x_test)} seed={args.seed}")
    _check_model_fits(float_model, data)
    progress = not args.quiet
    float_history = fit(float_model, data.x_train, data.y_train, epochs=epochs, lr=lr,
                        batch_size=args.batch_size, seed=args.seed, progress=progress,
                        description="float")
    float_acc = evaluate(float_model, data.x_test, data.y_test)

    qat_model = copy.deepcopy(float_model)
    quantize_(qat_model, config)
    calibrate(qat_model, data.x_train[: args.batch_size * 4])
    ptq_acc = evaluate(qat_model, data.x_test, data.y_test)
    qat_history = fit(qat_model, data.x_train, data.y_train, epochs=qat_epochs, lr=lr / 3,
                      batch_size=args.batch_size, seed=args.seed + 1, progress=progress,
                      description="QAT")
    quant_acc = evaluate(qat_model, data.x_test, data.y_test)
    rows = describe(qat_model)
    elapsed = time.perf_counter() - started

    metrics = {
        "float_accuracy": float_acc,
        "quantized_accuracy": quant_acc,
        "accuracy_drop": float_acc - quant_acc,
        "post_training_accuracy": ptq_acc,
        "float_history": float_history,
        "qat_history": qat_history,
        "formats": [r.__dict__ for r in rows],
        "seconds": round(elapsed, 2),
    }
    run_info = {
        "model": args.model,
        "data": args.data or data.name,
        "seed": args.seed,
        "epochs": epochs,
        "qat_epochs": qat_epochs,
        "lr": lr,
        "batch_size": args.batch_size,
        "input_shape": list(data.x_train.shape[1:]),
        "qflow": qflow.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    save_run(out, qat_model=qat_model, float_model=float_model, config=config,
             run_info=run_info, metrics=metrics)

    console.print(_format_table(rows))
    console.print(f"float accuracy      {float_acc:6.2f} %")
    console.print(f"quantized accuracy  {quant_acc:6.2f} %  "
                  f"(QFX, weights {config.weight.bits}-bit, activations "
                  f"{config.activation.bits}-bit; drop {float_acc - quant_acc:+.2f} points)")
    console.print(f"run written to {out}  ({elapsed:.1f} s)")
    return 0


def _check_model_fits(model: torch.nn.Module, data) -> None:
    sample = torch.as_tensor(data.x_train[:2])
    try:
        with torch.no_grad():
            logits = model.eval()(sample)
    except Exception as exc:
        raise QflowError(f"model does not accept the data's input shape "
                         f"{tuple(sample.shape[1:])}: {exc}") from None
    if logits.dim() != 2 or logits.shape[1] < data.num_classes:
        raise QflowError(f"model outputs shape {tuple(logits.shape[1:])} but the data has "
                         f"{data.num_classes} classes")


def _format_table(rows) -> Table:
    table = Table(title="Fixed-point formats (I: range over channels)")
    for col in ("layer", "tensor", "type", "W", "I", "rounding", "overflow"):
        table.add_column(col, justify="right" if col in ("W", "I") else "left")
    for r in rows:
        kind = ("ap_fixed" if r.signed else "ap_ufixed") + (f" {r.khot}-hot" if r.khot else "")
        table.add_row(r.layer, r.tensor, kind, str(r.width), r.int_width, r.rounding, r.overflow)
    return table
