"""``qflow report``: a run's report.html (plots of training, formats, value ranges,
resources and verify), and its statistics."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qflow.errors import QflowError
from qflow.report import DEFAULT_SAMPLES, REPORT_FILE, write_report

from .console import make_console

HELP = "write RUN/report.html: training, formats, value histograms, resources, verify"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run directory written by `qflow quantize`")
    p.add_argument("export", type=Path, nargs="?", default=None,
                   help="an export of the run (`qflow export`): adds its resource estimate "
                        "and its verify.json")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"test samples for the value statistics (default {DEFAULT_SAMPLES})")
    p.add_argument("--json", action="store_true",
                   help="print the statistics as JSON on stdout (they are also written to "
                        "the run's metrics.json under \"report\")")


def run(args: argparse.Namespace) -> int:
    if args.samples < 1:
        raise QflowError(f"--samples must be >= 1, not {args.samples}")
    stats = write_report(args.run, args.export, samples=args.samples)
    message = (f"report written to {args.run / REPORT_FILE} (sections: "
               f"{', '.join(stats['sections'])})")
    if args.json:
        print(message, file=sys.stderr)
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
    else:
        make_console().print(message, soft_wrap=True)
    return 0
