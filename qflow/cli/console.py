"""The console every command prints to."""

from pathlib import Path

from rich.console import Console


def make_console() -> Console:
    """A rich console; 120 columns when output is not a terminal (logs, CI), so that
    tables of fixed-point types do not wrap."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=120)
    return console


def print_report(console: Console, run: Path, written: Path | None, why_not: str) -> None:
    """The line quantize, export and verify print after updating the run's report:
    its path (under ``run`` as the user named it), or why it was not updated."""
    if written is not None:
        console.print(f"report: {Path(run) / written.name}", soft_wrap=True)
    else:
        console.print(f"[yellow]{why_not}[/]", soft_wrap=True)
