"""``qflow export``: freeze a run's QAT model and write deployable artifacts."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.table import Table

import qflow
from qflow.errors import QflowError
from qflow.export import EXPORT_FILE, QGRAPH_FILE, ExportOptions, check_options, export
from qflow.export.manifest import digest_files
from qflow.graph.ir import QGraph
from qflow.outdir import OutputDirectory
from qflow.report import REPORT_FILE, update_report
from qflow.targets import IO_TYPES, STRATEGIES, load_target, load_target_file

from .console import make_console, print_report

HELP = "freeze a run and export it for a target (see `qflow targets`)"
#: command-line options that only FPGA targets take
FPGA_OPTIONS = ("io_type", "reuse", "strategy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run directory written by `qflow quantize`")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--target",
                       help="deployment target: a board or device name from `qflow targets` "
                            "(onnx, cpu, arm64, cuda, ultra96, pynq-z2, zcu104, kv260)")
    which.add_argument("--target-file", type=Path, metavar="PATH",
                       help="a board file of your own, in the format of targets/*.yaml")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default RUN/export-<target>); an existing one is "
                        "replaced only with --force")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out, if it is an export qflow wrote (never "
                        "anything else)")
    p.add_argument("--io-type", choices=[t.removeprefix("io_") for t in IO_TYPES],
                   default=None, help="FPGA targets: hls4ml io type (default: the target's)")
    p.add_argument("--reuse", default=None, metavar="N|auto",
                   help="FPGA targets: hls4ml reuse factor, or auto: the smallest power of "
                        "two whose resource estimate fits the board (default: the target's)")
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="FPGA targets: hls4ml strategy (default: the target's)")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="TVM targets: build for a fixed batch of N samples (faster; the "
                        "runner still takes any number, N per call); default: any batch")
    p.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                   help="target cpu: measure up to TRIALS tile sizes of the convolution and "
                        "dense layers on this machine and keep the fastest; the log is "
                        "written to tvm/tuning.json (default 0: no tuning)")
    p.add_argument("--tune-log", type=Path, default=None, metavar="FILE",
                   help="target cpu: reuse the tiles of an earlier export's tvm/tuning.json "
                        "for the layers it has measured")


def _options(args: argparse.Namespace, target, console) -> ExportOptions:
    given = [f"--{name.replace('_', '-')}" for name in FPGA_OPTIONS
             if getattr(args, name) is not None]
    if given and target.kind != "fpga":
        raise QflowError(f"{', '.join(given)} only apply to FPGA targets; {target.name} is a "
                         f"{target.kind} target")
    reuse = args.reuse
    if reuse is not None and reuse != "auto":
        if not reuse.isdigit() or int(reuse) < 1:
            raise QflowError(f"--reuse must be an integer >= 1 or auto, not {reuse!r}")
        reuse = int(reuse)
    if args.tune_log is not None and not args.tune_log.is_file():
        raise QflowError(f"--tune-log {args.tune_log}: no such file")
    options = ExportOptions(
        io_type=f"io_{args.io_type}" if args.io_type else None,
        reuse_factor=reuse, strategy=args.strategy,
        batch=args.batch, tune_trials=args.tune, tune_log=args.tune_log,
        progress=lambda msg: console.print(msg))
    check_options(target, options)
    return options


def run(args: argparse.Namespace) -> int:
    from qflow.runs import freeze_run, has_data, load_run_data, run_identity

    console = make_console()
    target = load_target_file(args.target_file) if args.target_file else load_target(args.target)
    options = _options(args, target, console)
    run_dir = Path(args.run)
    out = OutputDirectory(args.out or run_dir / f"export-{target.name}", kind="export",
                          force=args.force, protect=[run_dir] if run_dir.is_dir() else [],
                          report=lambda message: console.print(f"[yellow]{message}[/]"))
    out.check()
    graph, info = freeze_run(run_dir)
    if has_data(info):  # the data verify will use must be the data it trained on
        load_run_data(run_dir, info)
    console.print(_graph_table(graph))
    with out.open() as stage:
        graph.save(stage / QGRAPH_FILE)
        artifacts = export(graph, stage, target, options)
        export_info = {
            "target": target.name,
            "run": os.path.relpath(run_dir.resolve(), out.final.resolve()),
            "run_absolute": str(run_dir.resolve()),
            "run_checkpoint_sha256": run_identity(info),
            "data": info["sources"]["data"]["spec"] if has_data(info) else None,
            "data_sha256": info["sources"]["data"]["sha256"] if has_data(info) else None,
            "qgraph": QGRAPH_FILE,
            "artifacts": artifacts,
            "input_type": graph.input_type.to_ap(),
            "output_type": graph.output_type.to_ap(),
            "qflow": qflow.__version__,
        }
        if has_data(info) and info["sources"]["data"].get("search_path"):
            export_info["data_search_path"] = info["sources"]["data"]["search_path"]
        export_info["files"] = digest_files(stage)
        (stage / EXPORT_FILE).write_text(json.dumps(export_info, indent=2) + "\n")
        out.commit()
    for kind, name in artifacts.items():
        console.print(f"  {kind:11s} {out.given / name}")
    for extra in ("board", "report.json"):
        if (out.final / extra).exists():
            console.print(f"  {extra:11s} {out.given / extra}")
    console.print(f"exported {args.run} for target {target.name} to {out.given}")
    if (run_dir / REPORT_FILE).is_file():  # the run has a report: add this export to it
        print_report(console, run_dir, *update_report(
            run_dir, out.final, graph=QGraph.load(out.final / QGRAPH_FILE)))
    console.print(f"check it with: qflow verify {out.given}")
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
