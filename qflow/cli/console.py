"""The console every command prints to."""

from rich.console import Console


def make_console() -> Console:
    """A rich console; 120 columns when output is not a terminal (logs, CI), so that
    tables of fixed-point types do not wrap."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=120)
    return console
