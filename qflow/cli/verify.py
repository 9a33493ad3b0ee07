"""``qflow verify``: every artifact of an export against the emulator, bit for bit."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from qflow.errors import QflowError
from qflow.verify.check import verify_directory

from .console import make_console

HELP = "check every exported artifact against the bit-exact emulator"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, help="export directory written by `qflow export`")
    p.add_argument("--samples", type=int, default=2_000,
                   help="data-derived samples (default 2000): the test split first, then "
                        "the training split, then test inputs moved by a few LSBs")
    p.add_argument("--corners", type=int, default=256,
                   help="generated corner-case inputs added to the test samples (default 256)")


def run(args: argparse.Namespace) -> int:
    if args.samples < 0 or args.corners < 0:
        raise QflowError("--samples and --corners must be >= 0")
    if args.samples + args.corners == 0:
        raise QflowError("nothing to verify: --samples and --corners are both 0")
    console = make_console()
    report = verify_directory(args.directory, samples=args.samples, corners=args.corners,
                              progress=lambda msg: console.print(f"[dim]{msg}[/]"))
    kinds = ", ".join(f"{n} {kind}" for kind, n in report["sample_kinds"].items() if n)
    table = Table(title=f"Bit-exactness vs the emulator ({kinds} samples; output "
                  f"{report['output_type']})")
    for col in ("artifact", "samples", "mismatching samples", "max diff (LSB)", "seconds"):
        table.add_column(col, justify="left" if col == "artifact" else "right")
    for r in report["results"]:
        if r["note"]:
            table.add_row(r["artifact"], r["note"], "", "", "", style="yellow")
            continue
        style = "red" if r["mismatching_samples"] else None
        table.add_row(r["artifact"], str(r["samples"]), str(r["mismatching_samples"]),
                      str(r["max_diff_lsb"]), f"{r['seconds']:.2f}", style=style)
    console.print(table)
    bad = report["mismatching_samples"]
    console.print(f"{'FAIL' if bad else 'OK'}: {bad} mismatching samples; "
                  f"report in {args.directory / 'verify.json'}")
    return 1 if bad else 0
