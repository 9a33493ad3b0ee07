"""``qflow targets``: the boards and devices qflow exports to."""

from __future__ import annotations

import argparse

from rich.table import Table

from qflow.targets import all_targets

from .console import make_console

HELP = "list the deployment targets (boards and devices) and their budgets"


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    table = Table(title="Deployment targets (qflow export RUN --target NAME)")
    numbers = ("DSP", "LUT", "FF", "BRAM36", "URAM")
    for col in ("name", "kind", "backend", "part / device", "clock", *numbers, "description"):
        table.add_column(col, no_wrap=col != "description",
                         justify="right" if col in numbers else "left")
    for t in all_targets():
        res = t.resources
        device = t.part or (t.tvm.get("mtriple") or t.tvm.get("kind", "") if t.tvm else "")
        table.add_row(t.name, t.kind, t.backend, device,
                      f"{t.clock_mhz:g} MHz" if t.clock_mhz else "",
                      *(f"{res[k]:,}" if res else "" for k in ("dsp", "lut", "ff", "bram36",
                                                                "uram")),
                      t.description)
    make_console().print(table)
    return 0
