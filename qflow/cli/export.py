"""``qflow export``: freeze a run's QAT model and write deployable artifacts."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.table import Table

import qflow
from qflow.errors import QflowError
from qflow.export import ExportOptions, export
from qflow.runs import atomic_directory
from qflow.targets import IO_TYPES, STRATEGIES, load_target
from qflow.verify.check import EXPORT_FILE, QGRAPH_FILE

from .console import make_console

HELP = "freeze a run and export it for a target (see `qflow targets`)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run directory written by `qflow quantize`")
    p.add_argument("--target", required=True,
                   help="deployment target: a board or device name from `qflow targets` "
                        "(onnx, cpu, arm64, cuda, ultra96, pynq-z2, zcu104, kv260)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default RUN/export-<target>)")
    p.add_argument("--io-type", choices=[t.removeprefix("io_") for t in IO_TYPES],
                   default=None, help="FPGA targets: hls4ml io type (default: the target's)")
    p.add_argument("--reuse", default=None, metavar="N|auto",
                   help="FPGA targets: hls4ml reuse factor, or auto: the smallest power of "
                        "two whose resource estimate fits the board (default: the target's)")
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="FPGA targets: hls4ml strategy (default: the target's)")


def run(args: argparse.Namespace) -> int:
    import torch

    from qflow.graph.from_torch import freeze
    from qflow.runs import load_run

    console = make_console()
    target = load_target(args.target)
    reuse = args.reuse
    if reuse is not None and reuse != "auto":
        if not reuse.isdigit() or int(reuse) < 1:
            raise QflowError(f"--reuse must be an integer >= 1 or auto, not {reuse!r}")
        reuse = int(reuse)
    options = ExportOptions(
        io_type=f"io_{args.io_type}" if args.io_type else None,
        reuse_factor=reuse, strategy=args.strategy,
        progress=lambda msg: console.print(msg))
    model, info = load_run(args.run)
    shape = info.get("input_shape")
    if not shape:
        raise QflowError(f"{args.run / 'run.json'} lacks input_shape")
    graph = freeze(model, torch.zeros((2, *shape)))
    graph.meta.update({"model": info.get("model"), "run": str(args.run)})
    out = args.out or args.run / f"export-{target.name}"
    console.print(_graph_table(graph))
    with atomic_directory(out) as tmp:
        graph.save(tmp / QGRAPH_FILE)
        artifacts = export(graph, tmp, target, options)
        export_info = {
            "target": target.name,
            "run": os.path.relpath(args.run.resolve(), out.resolve()),
            "data": info.get("data"),
            "qgraph": QGRAPH_FILE,
            "artifacts": artifacts,
            "input_type": graph.input_type.to_ap(),
            "output_type": graph.output_type.to_ap(),
            "qflow": qflow.__version__,
        }
        (tmp / EXPORT_FILE).write_text(json.dumps(export_info, indent=2) + "\n")
    for kind, name in artifacts.items():
        console.print(f"  {kind:11s} {out / name}")
    for extra in ("board", "report.json"):
        if (out / extra).exists():
            console.print(f"  {extra:11s} {out / extra}")
    console.print(f"exported {args.run} for target {target.name} to {out}")
    console.print(f"check it with: qflow verify {out}")
    return 0


def _graph_table(graph) -> Table:
    table = Table(title="QGraph (every tensor's fixed-point type)")
    for col in ("node", "op", "from layer", "output type", "shape"):
        table.add_column(col)
    table.add_row("input", "", "", graph.input_type.to_ap(),
                  str(tuple(graph.tensors[graph.input].shape)))
    for row in graph.summary():
        table.add_row(row["node"], row["op"], row["source"], row["type"], str(row["shape"]))
    return table
