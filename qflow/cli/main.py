"""The ``qflow`` command: subcommands are looked up in a table."""

from __future__ import annotations

import argparse
import sys

from qflow import __version__
from qflow.errors import QflowError

from . import export, quantize, targets, verify

#: subcommand name -> module with ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "quantize": quantize,
    "export": export,
    "verify": verify,
    "targets": targets,
}


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="qflow", description=(
        "Quantization-aware training and bit-exact deployment. "
        "Start with `qflow quantize` (no arguments trains the built-in default)."))
    parser.add_argument("--version", action="version", version=f"qflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except QflowError as exc:
        print(f"qflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
