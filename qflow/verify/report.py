"""The verify report as plain text, and :func:`assert_exact` for a user's own tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .check import verify_directory

COLUMNS = ("artifact", "samples", "mismatching samples", "max diff (LSB)", "status / note")


def table_rows(report: dict) -> list[tuple[str, ...]]:
    """One tuple of strings per report row, in :data:`COLUMNS` order."""
    rows = []
    for r in report["results"]:
        ran = r["status"] in ("ok", "mismatch") or r["samples"]
        status = r["status"] + (f": {r['note']}" if r["note"] else "")
        rows.append((r["artifact"], str(r["samples"]) if ran else "-",
                     str(r["mismatching_samples"]) if ran else "-",
                     str(r["max_diff_lsb"]) if ran else "-", status))
    return rows


def format_table(report: dict) -> str:
    """The report's rows as a plain-text table (one line per row), then its summary."""
    rows = [COLUMNS, *table_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=False))]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    lines.append(report["summary"])
    return "\n".join(lines)


def assert_exact(export_dir: str | Path, x: np.ndarray | None = None, *,
                 samples: int = 2000, corners: int = 256) -> dict:
    """Run ``qflow verify``'s checks on an export directory; raise AssertionError unless
    every artifact ran and every output code equals the emulator's.

    Writes ``verify.json`` exactly as ``qflow verify`` does. ``x`` (real-valued inputs,
    batch first) replaces the data-derived samples; ``corners`` corner cases are added
    either way. The AssertionError's message is the per-artifact table (artifact,
    samples, mismatching samples, max diff, status and note) and the summary line.
    Bad input (no export.json, a missing QGraph) raises :class:`qflow.QflowError`.
    Returns the report (the contents of verify.json) when the export is exact.

    In a test of your own (``docs/examples/test_bit_exact.py`` is a complete one)::

        from qflow.verify import assert_exact

        def test_export_is_bit_exact():
            report = assert_exact("runs/ci/export-onnx", samples=500, corners=128)
            assert report["mismatching_samples"] == 0
    """
    report = verify_directory(Path(export_dir), samples=samples, corners=corners, x=x)
    if not report["passed"]:
        raise AssertionError(f"export {export_dir} is not bit-exact\n{format_table(report)}")
    return report
