"""Run every artifact of an export directory and compare its output codes with the
emulator's, sample by sample; write the report to ``verify.json``.

Each row of the report is one thing that was (or was not) checked: the emulator (the
reference), the QAT model of the run, a file-digest check for files that belong to no
artifact, and every artifact in ``export.json``. A row's ``status`` is ``ok`` (ran,
every output code equal), ``mismatch`` (ran, some samples differ), ``failed`` (did not
run: changed files, a compile error, a crash) or ``not run`` (cannot run here).
:func:`verdict` turns the rows into the exit status of ``qflow verify``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qflow.errors import ArtifactNotRunnableError, QflowError
from qflow.export import EXPORT_FILE
from qflow.export.manifest import check_files, owner
from qflow.export.runners import RUNNERS
from qflow.graph.emulator import Emulator
from qflow.graph.ir import QGraph
from qflow.numerics import corner_inputs, values_to_codes
from qflow.outdir import OutputDirectory

from .exportdir import ExportInfo, read_export, run_directory

__all__ = ["REPORT_FILE", "compare", "qat_codes", "verdict", "verification_inputs",
           "verify_directory"]

REPORT_FILE = "verify.json"
#: mismatching samples listed per row in the report
MAX_LISTED = 20
#: a row's role: what its status means for the verdict; SOURCE is an imported model's
#: original graph where its scales are not powers of two: counted, never failing
REFERENCE, QAT, FILES, ARTIFACT, SOURCE = ("reference", "qat model", "files", "artifact",
                                           "source")
QAT_NAME = "QAT model (torch eval)"
#: the QAT row of an imported run: its original graph
SOURCE_NAME = "original QONNX (qonnx executor)"


def _noop(message: str) -> None:
    pass


def _prefixed(progress: Callable[[str], None], prefix: str, message: str) -> None:
    progress(f"{prefix}: {message}")


def qat_codes(run_dir: Path, graph: QGraph, x: np.ndarray) -> np.ndarray:
    """Output codes of the QAT model (eval mode, exact float64 path) of a run directory."""
    import torch

    from qflow.runs import load_run

    model, _ = load_run(run_dir)
    with torch.no_grad():
        out = model(torch.as_tensor(x, dtype=torch.float32)).numpy().astype(np.float64)
    return values_to_codes(out, graph.output_type)


def source_codes(run_dir: Path, graph: QGraph, x: np.ndarray) -> np.ndarray:
    """Output codes of an imported run's original QONNX graph under qonnx's executor (its
    float32 arithmetic), all of ``x`` in one batch."""
    from qonnx.core.onnx_exec import execute_onnx

    from qflow.qonnx_import import clean_qonnx
    from qflow.runs import IMPORTED_SOURCE

    model = clean_qonnx(run_dir / IMPORTED_SOURCE, batch=len(x))
    name, out = model.graph.input[0].name, model.graph.output[0].name
    values = execute_onnx(model, {name: np.asarray(x, dtype=np.float32)})[out]
    if not graph.meta.get("exact", True):  # read to the nearest code: differences in LSB
        return np.rint(np.ldexp(values.astype(np.float64), graph.output_type.fractional)
                       ).astype(np.int64)
    return values_to_codes(values.astype(np.float64), graph.output_type)


def compare(reference: np.ndarray, codes: np.ndarray) -> tuple[int, int]:
    """(mismatching samples, max |difference| in LSBs) between two code arrays; a shape
    difference makes every sample a mismatch, with max difference -1."""
    if codes.shape != reference.shape:
        return len(reference), -1
    diff = np.abs(codes.astype(np.float64) - reference.astype(np.float64))
    per_sample = diff.reshape(len(diff), -1).max(axis=1)
    return int((per_sample > 0).sum()), int(per_sample.max()) if len(per_sample) else 0


def list_mismatches(reference: np.ndarray, codes: np.ndarray, kinds: list[tuple[str, int]],
                    limit: int = MAX_LISTED) -> list[dict]:
    """The first ``limit`` mismatching samples: ``index`` (row of the verification
    inputs), ``kind`` (from ``kinds``, the (kind, count) blocks in order), ``output``
    (flat index of the first differing output), ``expected`` and ``got`` codes."""
    ref = reference.reshape(len(reference), -1)
    got = codes.reshape(len(codes), -1)
    rows = np.flatnonzero((ref != got).any(axis=1))[:limit]
    bounds = np.cumsum([n for _, n in kinds])
    listed = []
    for i in rows:
        j = int(np.flatnonzero(ref[i] != got[i])[0])
        kind = kinds[int(np.searchsorted(bounds, i, side="right"))][0]
        listed.append({"index": int(i), "kind": kind, "output": j,
                       "expected": int(ref[i, j]), "got": int(got[i, j])})
    return listed


#: the default inputs: data-derived samples and corner cases
DEFAULT_SAMPLES, DEFAULT_CORNERS = 2_000, 256
#: multiply-accumulates of all default inputs together: beyond it the defaults shrink. The
#: slowest artifact, the HLS C simulation, takes about 16 ns a MAC on one core (the MLPerf
#: Tiny ResNet-8, 12.5 M MACs: 0.2 s a sample), so this keeps it near a minute on two
MAX_DEFAULT_MACS = 5_000_000_000
#: the fewest default inputs, however large the model
MIN_DEFAULT_INPUTS = 64


def macs_per_sample(graph: QGraph) -> int:
    """Multiply-accumulates of one sample: dense, conv2d and matmul products, plus one per
    output value of every other node."""
    total = 0
    for node in graph.nodes:
        outputs = int(np.prod(graph.tensors[node.output].shape))
        if node.op in ("dense", "conv2d"):
            total += outputs * int(np.prod(node.consts["weight"].shape[1:]))
        elif node.op == "matmul":
            total += outputs * int(graph.tensors[node.inputs[0]].shape[-1])
        else:
            total += outputs
    return total


def default_inputs(graph: QGraph) -> tuple[int, int]:
    """(samples, corners) when the user gives neither: 2000 and 256, or for a model whose
    inputs would exceed :data:`MAX_DEFAULT_MACS` together, as many as fit (at least
    :data:`MIN_DEFAULT_INPUTS`), a quarter of them corner cases."""
    total = DEFAULT_SAMPLES + DEFAULT_CORNERS
    macs = max(1, macs_per_sample(graph))
    if macs * total <= MAX_DEFAULT_MACS:
        return DEFAULT_SAMPLES, DEFAULT_CORNERS
    total = max(MIN_DEFAULT_INPUTS, MAX_DEFAULT_MACS // macs)
    return total - total // 4, total // 4


def default_workers() -> int:
    """Worker processes for the slow artifacts: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def verification_inputs(graph: QGraph, data, samples: int, corners: int, seed: int = 0, *,
                        x: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """The inputs verify runs: up to ``samples`` data-derived inputs, then ``corners``
    corner cases (:func:`qflow.numerics.corner_inputs` with seed 0).

    The data-derived inputs are the test split, then (when it is shorter than
    ``samples``) the training split, then test inputs moved by a few half-LSBs of the
    input type (random, from ``seed``). ``data`` is a data set with ``x_test`` (and
    ``x_train``) or None. Given ``x`` (real-valued, batch first), ``x`` replaces the
    data-derived inputs. Returns the inputs and the count of each kind, in order: the
    same arguments always give the same inputs, so sample ``i`` of a report can be
    regenerated.
    """
    shape = tuple(graph.tensors[graph.input].shape)
    parts = []
    if x is not None:
        given = np.asarray(x, dtype=np.float64)
        if given.shape[1:] != shape:
            raise QflowError(f"x has shape {given.shape}; the model takes (N, "
                             f"{', '.join(map(str, shape))})")
        parts.append(given)
        counts = {"given": len(given), "corner": 0}
    else:
        counts = {"test": 0, "train": 0, "perturbed test": 0, "corner": 0}
    if x is None and data is not None and samples:
        test = np.asarray(data.x_test[:samples], dtype=np.float64)
        parts.append(test)
        counts["test"] = len(test)
        train = getattr(data, "x_train", None)
        if train is not None and counts["test"] < samples:
            extra = np.asarray(train[:samples - counts["test"]], dtype=np.float64)
            parts.append(extra)
            counts["train"] = len(extra)
        missing = samples - counts["test"] - counts["train"]
        if missing > 0 and len(test):
            rng = np.random.default_rng(seed)
            picked = test[rng.integers(0, len(test), missing)]
            lsb = graph.input_type.lsb
            parts.append(picked + lsb * rng.integers(-4, 5, picked.shape) / 2)
            counts["perturbed test"] = missing
    if corners:
        parts.append(corner_inputs(graph.input_type, shape, corners))
        counts["corner"] = len(parts[-1])
    if not parts:
        return np.zeros((0, *shape)), counts
    return np.concatenate(parts), counts


def _row(name: str, role: str, *, path: str = "", status: str = "ok", samples: int = 0,
         bad: int = 0, max_diff: int = 0, seconds: float = 0.0, note: str = "",
         mismatches: list | None = None) -> dict:
    return {"artifact": name, "role": role, "path": path, "status": status,
            "samples": samples, "mismatching_samples": bad, "max_diff_lsb": max_diff,
            "seconds": round(seconds, 3), "note": note, "mismatches": mismatches or []}


def _one_line(exc: BaseException) -> str:
    """An exception as one line: its first non-empty line, its type for non-qflow errors."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if not isinstance(exc, QflowError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:300]


def _checked_row(name: str, role: str, path: str, reference: np.ndarray,
                 kinds: list[tuple[str, int]], run: Callable[[], np.ndarray]) -> dict:
    """Run ``run`` and compare its codes with ``reference``; any failure becomes the row."""
    start = time.perf_counter()
    try:
        codes = np.asarray(run())
    except ArtifactNotRunnableError as exc:
        return _row(name, role, path=path, status="not run", note=f"not run: {_one_line(exc)}")
    except Exception as exc:
        return _row(name, role, path=path, status="failed", note=_one_line(exc),
                    seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    if codes.shape != reference.shape:
        return _row(name, role, path=path, status="failed", seconds=seconds,
                    samples=len(reference), bad=len(reference), max_diff=-1,
                    note=f"output shape {codes.shape} is not the emulator's "
                         f"{reference.shape}")
    bad, max_diff = compare(reference, codes)
    return _row(name, role, path=path, status="mismatch" if bad else "ok",
                samples=len(reference), bad=bad, max_diff=max_diff, seconds=seconds,
                mismatches=list_mismatches(reference, codes, kinds) if bad else [])


def _changed_note(problems: dict[str, str]) -> str:
    """'changed since export: a (and 2 more)', naming the first changed file."""
    first = next(iter(problems))
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[first]} since export: {first}{more}"


def verdict(report: dict) -> tuple[bool, str]:
    """(passed, one-line summary) of a report: passed only when at least one artifact
    ran, every artifact ran and is exact, every listed file is unchanged and the QAT
    model, when it ran, agrees; a QAT model that was not run does not fail verify."""
    rows = report["results"]
    artifacts = [r for r in rows if r["role"] == ARTIFACT]
    bad = report["mismatching_samples"]
    if not artifacts:
        return False, f"FAIL: nothing verified: {EXPORT_FILE} lists no artifacts"
    problems = [r for r in rows if r["status"] != "ok" and r["role"] != SOURCE
                and not (r["role"] == QAT and r["status"] == "not run")]
    ran = sum(r["status"] in ("ok", "mismatch") for r in artifacts)
    source = "".join(f"; the original QONNX graph differs on {r['mismatching_samples']} of "
                     f"{r['samples']} samples, at most {r['max_diff_lsb']} LSB ({r['note']})"
                     for r in rows if r["role"] == SOURCE and r["status"] == "mismatch")
    if not problems:
        return True, (f"OK: 0 mismatching samples; {ran} of {len(artifacts)} artifacts "
                      f"ran, every output code equal to the emulator's{source}")
    not_ran = [f"{r['artifact']} ({r['note']})" for r in problems
               if r["status"] in ("failed", "not run")]
    text = f"FAIL: {bad} mismatching samples"
    differ = [f"{r['artifact']}: {r['mismatching_samples']}" for r in problems
              if r["status"] == "mismatch"]
    if differ:
        text += f" ({', '.join(differ)})"
    if not_ran:
        text += f"; did not run or failed: {'; '.join(not_ran)}"
    return False, text


def verify_directory(directory: Path, *, samples: int | None = None,
                     corners: int | None = None, workers: int | None = None,
                     progress: Callable[[str], None] = _noop,
                     x: np.ndarray | None = None) -> dict:
    """Check every artifact in ``directory``; return the report written to verify.json.

    ``samples`` and ``corners`` left None take :func:`default_inputs` for the model;
    ``workers`` (None: every CPU) bounds the processes of the slow artifacts (the HLS C
    simulation).

    The old ``verify.json`` is deleted first and the new one written (atomically) only
    at the end, so a report on disk always belongs to a finished check. Bad input (a
    missing or malformed export.json, a missing QGraph, unreadable data) raises
    QflowError; everything that goes wrong with an artifact becomes its row. ``x``
    (real-valued, batch first) replaces the data-derived inputs. ``report["passed"]``
    and ``report["summary"]`` hold :func:`verdict`.
    """
    directory = Path(directory)
    if not (directory / EXPORT_FILE).is_file():
        read_export(directory)  # raises the one-line error for a missing export
    # no qflow export --force may replace the folder while it is checked (nor the reverse)
    with OutputDirectory(directory, kind="export").locked():
        return _verify_locked(directory, samples=samples, corners=corners,
                              workers=workers or default_workers(), progress=progress, x=x)


def _verify_locked(directory: Path, *, samples: int | None, corners: int | None,
                   workers: int, progress: Callable[[str], None],
                   x: np.ndarray | None) -> dict:
    (directory / REPORT_FILE).unlink(missing_ok=True)
    info = read_export(directory)
    graph = QGraph.load(directory / info.qgraph)
    if samples is None or corners is None:
        default_samples, default_corners = default_inputs(graph)
        if (default_samples, default_corners) != (DEFAULT_SAMPLES, DEFAULT_CORNERS):
            progress(f"{macs_per_sample(graph) / 1e6:.1f} M multiply-accumulates a sample: "
                     f"{default_samples} samples and {default_corners} corner cases by "
                     "default (--samples, --corners to change)")
        samples = default_samples if samples is None else samples
        corners = default_corners if corners is None else corners
    digests, problems = check_files(directory, info.files)
    data = _load_data(info) if x is None and samples and info.data else None
    x, counts = verification_inputs(graph, data, samples, corners, x=x)
    if not len(x):
        raise QflowError("nothing to verify: no data-derived samples and no corner cases")
    kinds = [(kind, n) for kind, n in counts.items() if n]
    progress(f"{len(x)} samples: " + ", ".join(f"{n} {kind}" for kind, n in kinds))
    progress(f"{len(digests)} file digests checked, {len(problems)} changed or missing")

    start = time.perf_counter()
    reference = Emulator(graph).run(x)
    rows = [_row("emulator (reference)", REFERENCE, path=info.qgraph, samples=len(x),
                 seconds=time.perf_counter() - start)]
    if info.qgraph in problems:
        rows[0].update(status="failed", note=_changed_note({info.qgraph: problems[info.qgraph]}))
    rows.append(_qat_row(info, graph, x, reference, kinds, progress))
    owned = {path: owner(path, info.artifacts) for path in problems}
    others = {p: why for p, why in problems.items() if owned[p] is None and p != info.qgraph}
    if others:
        rows.append(_row("other files", FILES, status="failed", note=_changed_note(others)))
    for kind, rel in info.artifacts.items():
        # kinds may share a folder (tvm/ is run natively and under qemu): each sees its files
        mine = {p: why for p, why in problems.items() if owner(p, {kind: rel})}
        listed = any(owner(p, {kind: rel}) for p in info.files)
        if mine:
            rows.append(_row(kind, ARTIFACT, path=rel, status="failed",
                             note=_changed_note(mine)))
        elif not listed:
            rows.append(_row(kind, ARTIFACT, path=rel, status="failed",
                             note=f"{rel} is not among the file digests in {EXPORT_FILE}"))
        else:
            progress(f"running {kind} ({rel})")
            rows.append(_checked_row(kind, ARTIFACT, rel, reference, kinds, functools.partial(
                RUNNERS[kind], directory / rel, graph, x, workers=workers,
                progress=functools.partial(_prefixed, progress, kind))))
            progress(f"{kind}: {rows[-1]['status']}, {rows[-1]['seconds']:.1f} s")
    report = {
        "directory": str(directory),
        "passed": False,
        "summary": "",
        "samples": len(x),
        "test_samples": len(x) - counts["corner"],
        "corner_samples": counts["corner"],
        "sample_kinds": counts,
        "inputs": {"source": "given" if "given" in counts else "data",
                   "data": None if "given" in counts else info.data,
                   "data_search_path": info.data_search_path,
                   "samples": samples, "corners": corners, "seed": 0,
                   "kinds": [{"kind": k, "first_index": int(sum(n for _, n in kinds[:i])),
                              "count": n} for i, (k, n) in enumerate(kinds)]},
        "output_type": graph.output_type.to_ap(),
        "files": {"checked": len(digests), "problems": problems, "digests": digests},
        "results": rows,
        "mismatching_samples": sum(r["mismatching_samples"] for r in rows
                                   if r["role"] != SOURCE),
    }
    report["passed"], report["summary"] = verdict(report)
    _write_atomic(directory / REPORT_FILE, report)
    return report


def _load_data(info: ExportInfo):
    """The data set export.json names, checked against the sha256 recorded at export."""
    from qflow.sources import dataset_sha256, resolve_data

    hint = "(or --samples 0 to check corner cases only)"
    try:
        data = resolve_data(info.data, info.data_search_path)
    except QflowError as exc:
        raise QflowError(f"{exc} {hint}") from None
    if info.data_sha256 and dataset_sha256(data) != info.data_sha256:
        raise QflowError(f"data {info.data} is not the data set this export was made from "
                         f"(sha256 of its arrays differs) {hint}")
    return data


def _qat_row(info: ExportInfo, graph: QGraph, x, reference, kinds, progress) -> dict:
    """The QAT model's row: 'not run' (not a failure) when the run directory is absent
    or cannot be loaded, so an export folder copied alone still verifies."""
    run_dir, why = run_directory(info)
    if run_dir is None:
        return _row(QAT_NAME, QAT, status="not run", note=f"not run: {why}")
    try:
        import torch  # noqa: F401
    except ImportError:
        return _row(QAT_NAME, QAT, status="not run", note="not run: torch is not installed")
    rewritten = _rewritten(info, run_dir)
    name = SOURCE_NAME if _imported(run_dir) else QAT_NAME
    if rewritten:
        return _row(name, QAT, status="not run", note=f"not run: {rewritten}")
    if name == SOURCE_NAME:
        progress(f"running the original QONNX graph of {run_dir} under qonnx's executor")
        exact = graph.meta.get("exact", True)
        row = _checked_row(name, QAT if exact else SOURCE, str(run_dir), reference, kinds,
                           lambda: source_codes(run_dir, graph, x))
        if not exact and row["status"] == "mismatch":
            row["note"] = ("float32 arithmetic and scales that are not powers of two: "
                           "counted, not failing")
    else:
        progress(f"running the QAT model of {run_dir}")
        row = _checked_row(name, QAT, str(run_dir), reference, kinds,
                           lambda: qat_codes(run_dir, graph, x))
    if row["status"] == "failed" and not row["samples"]:
        # the run is not part of the export: a run that cannot be loaded is reported,
        # and only a QAT model that runs and disagrees fails verify
        row.update(status="not run", note=f"not run: {row['note']}")
    return row


def _imported(run_dir: Path) -> bool:
    from qflow.runs import is_imported

    try:
        return is_imported(json.loads((run_dir / "run.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return False


def _rewritten(info: ExportInfo, run_dir: Path) -> str:
    """Why the run found is not the one the export was made from ('' when it is)."""
    from qflow.runs import run_identity

    expected = info.raw.get("run_checkpoint_sha256")
    try:
        found = run_identity(json.loads((run_dir / "run.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        found = None
    if expected and found != expected:
        return (f"run {run_dir} is not the run this export was made from (its checkpoint "
                "was rewritten since)")
    return ""


def _write_atomic(path: Path, report: dict) -> None:
    """Write to a hidden sibling, then rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
