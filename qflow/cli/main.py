"""The ``qflow`` command: subcommands are looked up in a table."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

from qflow import __version__
from qflow.errors import QflowError

from . import export, importer, quantize, report, targets, verify

#: subcommand name -> module with ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "quantize": quantize,
    "export": export,
    "verify": verify,
    "report": report,
    "import": importer,
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
        # a command module may add an EPILOG (exit codes, notes), printed as written
        epilog = getattr(module, "EPILOG", None)
        extra = {"epilog": epilog, "formatter_class": argparse.RawDescriptionHelpFormatter}
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP,
                                            **(extra if epilog else {})))
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as SIGINT is: clean up (or keep resumable progress) and stop."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While a command runs in the main thread, SIGTERM raises :class:`Terminated`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run one ``qflow`` command. Exit codes: 0 done, 1 a check failed (verify), 2 bad
    input (one line on stderr), 130 interrupted (SIGINT), 143 terminated (SIGTERM)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to start it again (--nproc)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with _sigterm_as_interrupt():
            return COMMANDS[args.command].run(args)
    except QflowError as exc:
        print(f"qflow {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's side: disk full, permissions, a vanished file
        where = f": {exc.filename}" if exc.filename else ""
        print(f"qflow {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"qflow {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"qflow {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(message: str) -> str:
    return " ".join(message.split())


if __name__ == "__main__":
    sys.exit(main())
