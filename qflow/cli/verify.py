"""``qflow verify``: every artifact of an export against the emulator, bit for bit."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qflow.errors import QflowError
from qflow.graph.ir import QGraph
from qflow.report import REPORT_FILE as RUN_REPORT_FILE
from qflow.report import update_report
from qflow.verify.check import REPORT_FILE, SOURCE, verify_directory
from qflow.verify.exportdir import read_export, run_directory
from qflow.verify.report import COLUMNS, table_rows

from .console import make_console, print_report

HELP = "check every exported artifact against the bit-exact emulator"

EPILOG = """\
exit codes:
  0  every artifact ran and every output code equals the emulator's
  1  not verified: a mismatching sample; an artifact that did not or could not run
     here (compile error, crash, a CUDA or cross-compiled build); a file changed or
     missing since the export; or no artifact at all
  2  bad input: no or malformed export.json, unknown artifact kind, a path outside
     the export directory, a missing QGraph, no file digests (export again)

The report is written to DIR/verify.json (the old one is deleted first). Verifying
runs the export's compiled code: verify only folders you trust."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, help="export directory written by `qflow export`")
    p.add_argument("--samples", type=int, default=None,
                   help="data-derived samples (default 2000, fewer for a large model: "
                        "all inputs together stay within 5 G multiply-accumulates): the "
                        "test split first, then the training split, then test inputs "
                        "moved by a few LSBs")
    p.add_argument("--corners", type=int, default=None,
                   help="generated corner-case inputs added to the test samples (default "
                        "256, a quarter of the inputs for a large model)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for the HLS C simulation (default: every CPU)")
    p.add_argument("--json", action="store_true",
                   help="print the report (verify.json's contents) as JSON on stdout; "
                        "progress and the table go to stderr")


def _stderr_console() -> Console:
    """Like make_console, on stderr: with --json, stdout carries the report only."""
    console = Console(highlight=False, stderr=True)
    return console if console.is_terminal else Console(highlight=False, stderr=True,
                                                       width=120)


def run(args: argparse.Namespace) -> int:
    if (args.samples or 0) < 0 or (args.corners or 0) < 0:
        raise QflowError("--samples and --corners must be >= 0")
    if args.samples == 0 and args.corners == 0:
        raise QflowError("nothing to verify: --samples and --corners are both 0")
    if args.workers is not None and args.workers < 1:
        raise QflowError("--workers must be >= 1")
    console = _stderr_console() if args.json else make_console()
    report = verify_directory(args.directory, samples=args.samples, corners=args.corners,
                              workers=args.workers,
                              progress=lambda msg: console.print(f"[dim]{msg}[/]"))
    kinds = ", ".join(f"{n} {kind}" for kind, n in report["sample_kinds"].items() if n)
    table = Table(title=f"Bit-exactness vs the emulator ({kinds} samples; output "
                  f"{report['output_type']})")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in (COLUMNS[0], COLUMNS[-1]) else "right")
    styles = {"ok": None, "mismatch": "red", "failed": "red", "not run": "yellow"}
    for r, cells in zip(report["results"], table_rows(report), strict=True):
        # the original graph of an imported model with other scales: counted, not failing
        table.add_row(*cells, style="yellow" if r["role"] == SOURCE and r["status"] == "mismatch"
                      else styles[r["status"]])
    console.print(table)
    console.print(f"[{'green' if report['passed'] else 'red'}]{report['summary']}[/]; "
                  f"report in {args.directory / REPORT_FILE}", soft_wrap=True)
    _update_run_report(console, args.directory)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


def _update_run_report(console: Console, directory: Path) -> None:
    """Add this verification to the report of the export's run, where it has one."""
    info = read_export(directory)
    run, _ = run_directory(info)
    if run is not None and (run / RUN_REPORT_FILE).is_file():
        graph = QGraph.load(directory / info.qgraph)
        print_report(console, run, *update_report(run, directory, graph=graph))
