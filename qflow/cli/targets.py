"""``qflow targets``: the boards and devices qflow exports to.

A broken target file does not hide the others: the valid targets are listed, then each
broken file gets one line on stderr (``qflow targets: error: target file ...: ...``) and
the exit status is 2.
"""

from __future__ import annotations

import argparse
import sys

from rich.table import Table

from qflow import targets

from .console import make_console

HELP = "list the deployment targets (boards and devices) and their budgets"


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    errors: list[str] = []
    found = targets.all_targets(targets.TARGETS_DIR, errors=errors)
    table = Table(title="Deployment targets (qflow export RUN --target NAME)")
    numbers = ("DSP", "LUT", "FF", "BRAM36", "URAM")
    for col in ("name", "kind", "backend", "part / device", "clock", *numbers, "description"):
        table.add_column(col, no_wrap=col != "description",
                         justify="right" if col in numbers else "left")
    for t in found:
        res = t.resources
        device = t.part or (t.tvm.get("mtriple") or t.tvm.get("kind", "") if t.tvm else "")
        table.add_row(t.name, t.kind, t.backend, device,
                      f"{t.clock_mhz:g} MHz" if t.clock_mhz else "",
                      *(f"{res[k]:,}" if res else "" for k in targets.RESOURCE_KEYS),
                      t.description)
    make_console().print(table)
    for message in errors:
        print(f"qflow targets: error: {message}", file=sys.stderr)
    return 2 if errors else 0
