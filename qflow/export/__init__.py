"""Exporters: a QGraph to deployable artifacts for a target.

A target is a data file under ``targets/`` (see :mod:`qflow.targets`); its ``backend``
picks the exporter from :data:`BACKENDS`. Every exporter has the signature
``export(graph, out_dir, target, options) -> dict[str, str]`` and returns the artifacts
it wrote (artifact kind -> path relative to ``out_dir``); :data:`qflow.export.runners.RUNNERS`
knows how to run each kind and :func:`qflow.export.manifest.digest_files` records what was
written. Exporters write into a fresh temporary directory that the caller renames when
the export is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qflow.errors import QflowError
from qflow.graph.ir import QGraph
from qflow.targets import TargetSpec

#: what ``qflow export`` writes beside the artifacts: the export's description
#: (target, run, data, artifacts, file digests) and the frozen graph
EXPORT_FILE = "export.json"
QGRAPH_FILE = "model.qgraph"


def _no_progress(message: str) -> None:
    pass


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """Choices a user may set on the command line; ``None`` takes the target's default."""

    io_type: str | None = None
    reuse_factor: int | None = None
    strategy: str | None = None
    #: TVM targets: a fixed batch size (None: any)
    batch: int | None = None
    #: TVM targets for this machine's CPU: tile measurements at most (0: no tuning)
    tune_trials: int = 0
    #: TVM targets for this machine's CPU: a previous export's ``tvm/tuning.json`` to reuse
    tune_log: Path | None = None
    #: receives one-line progress messages and summaries for the user
    progress: Callable[[str], None] = field(default=_no_progress)

    def build_options(self):
        """The TVM build's share of these options (a ``tvm.build.BuildOptions``)."""
        from .tvm.build import BuildOptions

        return BuildOptions(batch=self.batch, tune_trials=self.tune_trials,
                            tune_log=self.tune_log)


def export_onnx(graph: QGraph, out_dir: Path, target: TargetSpec | None = None,
                options: ExportOptions | None = None) -> dict[str, str]:
    """The two ONNX files every target starts from, and ``codec.py`` beside them.

    ``codec.py`` (:mod:`qflow.export.codec`) converts real inputs to the input codes the
    artifacts take and their output codes back to real values, with numpy only. It is a
    plain file, not an artifact (nothing to run against the emulator); the export's file
    digests cover it like every other file.

    A graph with transformer or token ops has no QONNX form: the QONNX file is then left
    out, with a warning through ``options.progress`` naming the node
    (:func:`qflow.export.qonnx.qonnx_problem`).
    """
    from .codec import write_codec
    from .int_onnx import export_int_onnx
    from .qonnx import export_qonnx, qonnx_problem

    out_dir = Path(out_dir)
    artifacts = {}
    problem = qonnx_problem(graph)
    if problem:
        (options or ExportOptions()).progress(f"[yellow]warning:[/] no QONNX artifact: {problem}")
    else:
        export_qonnx(graph, out_dir / "model.qonnx.onnx")
        artifacts["qonnx"] = "model.qonnx.onnx"
    export_int_onnx(graph, out_dir / "model.int.onnx")
    write_codec(graph, out_dir)
    return {**artifacts, "int_onnx": "model.int.onnx"}


def _export_hls4ml(graph, out_dir, target, options):
    from .hls import export_hls

    return export_hls(graph, out_dir, target, options)


def _export_tvm(graph, out_dir, target, options):
    from .tvm import export_tvm

    return export_tvm(graph, out_dir, target, options)


Exporter = Callable[[QGraph, Path, TargetSpec, ExportOptions], dict[str, str]]

#: backend name (a target file's ``backend``) -> exporter
BACKENDS: dict[str, Exporter] = {
    "onnx": export_onnx,
    "hls4ml": _export_hls4ml,
    "tvm": _export_tvm,
}


def check_options(target: TargetSpec, options: ExportOptions) -> None:
    """A one-line QflowError for an option ``target`` does not take."""
    tvm_only = [name for name, given in (("--batch", options.batch is not None),
                                         ("--tune", options.tune_trials != 0),
                                         ("--tune-log", options.tune_log is not None))
                if given]
    if tvm_only and target.backend != "tvm":
        raise QflowError(f"{', '.join(tvm_only)} only apply to TVM targets (cpu, arm64, "
                         f"cuda); {target.name} is a {target.kind} target")
    if tvm_only:
        from .tvm.build import check_build_options

        check_build_options(options.build_options(), target)


def export(graph: QGraph, out_dir: Path, target: TargetSpec,
           options: ExportOptions | None = None) -> dict[str, str]:
    """Write ``target``'s artifacts for ``graph`` into ``out_dir``; return them by kind."""
    options = options or ExportOptions()
    check_options(target, options)
    return BACKENDS[target.backend](graph, Path(out_dir), target, options)
