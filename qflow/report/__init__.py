"""The run report: ``report.html`` in a run directory, and its statistics.

:func:`write_report` reads a run (and, when given, one of its exports) and writes one
self-contained HTML page into the run: images embedded, no scripts, nothing fetched.
Each section is there when its data is:

- summary: model, method, data, accuracies, seed, qflow version;
- training: loss and test accuracy per epoch, float then QAT phases;
- formats: each quantized tensor's word length W and integer width I, and a strip of
  the integer width per channel for per-channel formats;
- quantized values: for the input and every quantizing cast of the frozen graph, a
  histogram of the values arriving on test data against the type's range, and the rates
  of values clipped, zeroed or wrapped by the overflow mode and of zero codes
  (:mod:`qflow.report.stats`);
- oscillation (``oscillation.png``) and the mixed-precision Pareto front
  (``pareto.png``, HAWQ runs), as the run wrote them;
- with an export: the FPGA resource estimate against the board's budget and the
  latency (``report.json``), and verify's per-artifact table (``verify.json``), with the
  indices of any mismatching samples.

The statistics also go into the run's ``metrics.json`` under ``"report"`` (for CI), and
:func:`write_report` returns them.

>>> # stats = write_report("runs/digits-cnn", "runs/digits-cnn/export-ultra96")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import qflow
from qflow.errors import QflowError
from qflow.graph.ir import QGraph
from qflow.jsonfile import read_json

from . import figures
from .page import Page, image, paragraph, table
from .stats import cast_statistics

REPORT_FILE = "report.html"
#: test samples the value statistics run on, at most
DEFAULT_SAMPLES = 1000
#: the heading of every section, by id, in page order
SECTIONS = {"summary": "Summary", "training": "Training", "formats": "Formats",
            "values": "Quantized values", "oscillation": "Oscillation",
            "pareto": "Mixed precision", "resources": "FPGA resources", "verify": "Verify"}


def write_report(run_dir: str | Path, export_dir: str | Path | None = None, *,
                 samples: int = DEFAULT_SAMPLES, graph: QGraph | None = None) -> dict:
    """Write ``report.html`` into ``run_dir`` and the statistics into its
    ``metrics.json``; return the statistics (with ``"sections"``, the ids present).

    ``graph``, when the caller has it, is the run's frozen QGraph (else the run is
    loaded and frozen here)."""
    from qflow.runs import METRICS, RUN_INFO, freeze_run, has_data, load_run_data

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise QflowError(f"run directory not found: {run_dir} (no run.json)")
    export_dir = Path(export_dir) if export_dir is not None else None
    if export_dir is not None and not (export_dir / "export.json").is_file():
        raise QflowError(f"export directory not found: {export_dir} (no export.json)")
    metrics = read_json(run_dir / METRICS)
    if graph is None:
        graph, info = freeze_run(run_dir)
    else:
        info = read_json(run_dir / RUN_INFO)
    data = load_run_data(run_dir, info) if has_data(info) else None
    rows = cast_statistics(graph, data.x_test[:samples]) if data is not None else []
    page = Page(f"qflow report: {info.get('model', run_dir.name)}")
    stats = {"qflow": qflow.__version__, "tensors": rows}
    _summary(page.section("summary", SECTIONS["summary"]), info, metrics)
    training = figures.training_figure(metrics.get("float_history", []),
                                       metrics.get("qat_history", []))
    if training:
        page.section("training", SECTIONS["training"]).append(image(training, "training curves"))
    if metrics.get("formats"):
        _formats(page.section("formats", SECTIONS["formats"]), metrics["formats"])
    if data is not None:
        _values(page.section("values", SECTIONS["values"]), rows, len(data.x_test[:samples]))
    for anchor, name, alt in (("oscillation", "oscillation.png", "oscillating weights per layer"),
                              ("pareto", "pareto.png", "mixed-precision Pareto front")):
        if (run_dir / name).is_file():
            page.section(anchor, SECTIONS[anchor]).append(image((run_dir / name).read_bytes(), alt))
    if export_dir is not None:
        stats.update(_export_sections(page, export_dir))
    stats["sections"] = [anchor for anchor, _, _ in page.sections]
    _write_atomic(run_dir / REPORT_FILE, page.render())
    _write_atomic(run_dir / METRICS, json.dumps({**metrics, "report": stats}, indent=2,
                                                sort_keys=True) + "\n")
    return stats


def update_report(run_dir: str | Path, export_dir: str | Path | None = None, *,
                  graph: QGraph | None = None) -> tuple[Path | None, str]:
    """Rewrite a run's report for ``qflow quantize``, ``export`` and ``verify``: (the
    path written, "") or (None, why not). A report that cannot be written does not fail
    the command that made the run or export; the caller prints the reason."""
    try:
        write_report(run_dir, export_dir, graph=graph)
    except (QflowError, OSError, ValueError) as exc:
        return None, f"report not updated: {str(exc).splitlines()[0] if str(exc) else exc!r}"
    return Path(run_dir) / REPORT_FILE, ""


def _summary(parts: list[str], info: dict, metrics: dict) -> None:
    rows = [["model", info.get("model", "")], ["method", info.get("method", "")],
            ["data", info.get("data", "")], ["seed", info.get("seed", "")],
            ["epochs (float + QAT)", f"{info.get('epochs', '')} + {info.get('qat_epochs', '')}"]]
    for key, label in (("float_accuracy", "float accuracy"),
                       ("quantized_accuracy", "quantized accuracy")):
        if isinstance(metrics.get(key), int | float):
            rows.append([label, f"{metrics[key]:.2f} %"])
    rows.append(["qflow version", f"{info.get('qflow', '?')} (report: {qflow.__version__})"])
    parts.append(table(None, rows))


def _formats(parts: list[str], formats: list[dict]) -> None:
    def width(r):
        low, high = r["int_width_min"], r["int_width_max"]
        return str(low) if low == high else f"{low}..{high} (per channel)"

    parts.append(table(["layer", "tensor", "W", "I", "signed", "rounding", "overflow", "K-hot"],
                       [[r["layer"], r["tensor"], r["width"], width(r), r["signed"], r["rounding"],
                         r["overflow"], r["khot"] or "-"] for r in formats], numeric={2}))
    strip = figures.channel_strip_figure(formats)
    if strip:
        parts.append(paragraph("Per-channel formats: the integer width I of each output "
                               "channel."))
        parts.append(image(strip, "integer width per channel"))


def _values(parts: list[str], rows: list[dict], samples: int) -> None:
    parts.append(paragraph(
        f"What each quantizer received on {samples} test samples: values outside its range "
        "were clipped, zeroed or wrapped by its overflow mode. Shaded: the representable "
        "range; bars outside it in the second colour; counts on a log scale."))
    parts.append(table(
        ["tensor", "layer", "type", "values", "clipped", "zeroed", "wrapped", "zero codes"],
        [[r["tensor"], r["layer"], r["type"], r["values"], f"{r['clipped']:.4%}",
          f"{r['zeroed']:.4%}", f"{r['wrapped']:.4%}", f"{r['zero_codes']:.2%}"] for r in rows],
        numeric={3, 4, 5, 6, 7}))
    for n, png in enumerate(figures.histogram_figures(rows)):
        parts.append(image(png, f"value histograms, part {n + 1}"))


def _export_sections(page: Page, export_dir: Path) -> dict:
    stats = {}
    estimate = _read_optional(export_dir / "report.json").get("estimate")
    if estimate:
        parts = page.section("resources", SECTIONS["resources"])
        totals, settings = estimate.get("totals", {}), estimate.get("settings", {})
        parts.append(paragraph(f"{settings.get('target', '')} ({settings.get('part', '')}, "
                               f"{settings.get('clock_mhz', '?')} MHz), {settings.get('io_type')}, "
                               f"reuse factor {settings.get('reuse_factor')}, "
                               f"{settings.get('strategy')}: {estimate.get('verdict', '')}"))
        figure = figures.resource_figure(estimate)
        if figure:
            parts.append(image(figure, "resource estimate against the board budget"))
        parts.append(paragraph(f"latency {totals.get('latency_cycles', '?')} cycles "
                               f"({totals.get('latency_us', '?')} µs), initiation interval "
                               f"{totals.get('ii', '?')} cycles (estimate)"))
        stats["resources"] = {"totals": totals, "budget": estimate.get("budget", {}),
                              "fits": estimate.get("fits")}
    verify = _read_optional(export_dir / "verify.json")
    if verify.get("results"):
        parts = page.section("verify", SECTIONS["verify"])
        parts.append(paragraph(verify.get("summary", ""), "" if verify.get("passed") else "bad"))
        parts.append(table(["artifact", "samples", "mismatching samples", "max diff (LSB)",
                            "status"],
                           [[r["artifact"], r["samples"], r["mismatching_samples"],
                             r["max_diff_lsb"], r["status"] + (f": {r['note']}" if r["note"]
                                                               else "")]
                            for r in verify["results"]], numeric={1, 2, 3}))
        for r in verify["results"]:
            if r.get("mismatches"):
                indices = sorted({m["index"] for m in r["mismatches"]})
                parts.append(paragraph(f"{r['artifact']}: mismatching samples at indices "
                                       f"{', '.join(map(str, indices))}", "bad"))
        stats["verify"] = {"passed": verify.get("passed"), "results": [
            {k: r[k] for k in ("artifact", "samples", "mismatching_samples", "status")}
            for r in verify["results"]]}
    return stats


def _read_optional(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QflowError(f"{path}: unreadable ({exc})") from None


def _write_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed over it)."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise QflowError(f"cannot write {path}: {exc.strerror or exc}") from None
