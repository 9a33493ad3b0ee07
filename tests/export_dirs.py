"""What ``qflow export`` and ``qflow verify`` do to a QGraph without a run directory:
shared by the tests of hand-built graphs."""

from __future__ import annotations

import json

import numpy as np

from qflow.export import EXPORT_FILE, QGRAPH_FILE, ExportOptions, export
from qflow.export.manifest import digest_files
from qflow.graph import QGraph
from qflow.verify.check import verify_directory


def export_dir(root, graph: QGraph, target, io_type=None, messages=None):
    """Export ``graph`` for ``target`` into a new folder under ``root``, with the export
    record ``qflow verify`` reads; ``messages`` collects the progress lines."""
    out = root / f"export-{target.name}-{io_type or 'default'}"
    out.mkdir()
    graph.save(out / QGRAPH_FILE)
    options = ExportOptions(io_type=io_type, progress=(
        [] if messages is None else messages).append)
    artifacts = export(graph, out, target, options)
    info = {"target": target.name, "qgraph": QGRAPH_FILE, "artifacts": artifacts,
            "files": digest_files(out)}
    (out / EXPORT_FILE).write_text(json.dumps(info))
    return out


def verify_rows(out, x: np.ndarray) -> dict:
    """``qflow verify``'s check of ``out`` on the inputs ``x``: every artifact row, by kind,
    after asserting that each ran on every sample with 0 mismatching samples."""
    report = verify_directory(out, samples=0, corners=0, x=x)
    rows = {r["artifact"]: r for r in report["results"] if r["role"] == "artifact"}
    for kind, row in rows.items():
        print(f"{out.name}: {kind} {row['mismatching_samples']} of {row['samples']} "
              f"samples differ ({row['status']}, {row['seconds']} s)")
    assert report["passed"], report["summary"]
    for kind, row in rows.items():
        assert (row["status"], row["samples"], row["mismatching_samples"]) == (
            "ok", len(x), 0), (kind, row)
    return rows
