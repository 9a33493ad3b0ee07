"""Run directories: what ``qflow quantize`` writes and later commands read.

A run directory holds ``checkpoint.pt`` (the QAT model's state dict, loadable with
``torch.load(..., weights_only=True)``), ``float.pt`` (the float model before QAT),
``config.json`` (the method's config, with its ``method`` key), ``run.json`` (method,
model, data, seed, epochs, versions) and ``metrics.json``. It is written through
:class:`qflow.outdir.OutputDirectory`, so a failed run leaves nothing half-written.

A run is self-contained: ``run.json`` records its model and data sources with absolute
paths, the sha256 of the model file, of the data set's arrays, and of the checkpoint,
float weights and config. :func:`load_run` refuses a run whose files or sources changed
since it was written (one line naming what changed), before it runs any model code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qflow.api import quantize_
from qflow.errors import QflowError
from qflow.graph.ir import QGraph
from qflow.jsonfile import read_json, write_json
from qflow.methods import config_from_json
from qflow.outdir import OutputDirectory
from qflow.sources import (
    absolute_spec,
    dataset_sha256,
    file_sha256,
    resolve_data,
    resolve_model,
    source_file,
)
from qflow.zoo import Dataset

RUN_FORMAT = 2
CHECKPOINT, FLOAT_WEIGHTS, CONFIG, RUN_INFO, METRICS = (
    "checkpoint.pt", "float.pt", "config.json", "run.json", "metrics.json")
#: run files whose sha256 run.json records
DIGESTED = (CHECKPOINT, FLOAT_WEIGHTS, CONFIG)
#: an imported run (``qflow import``): its QGraph and a copy of the QONNX file it came from
IMPORTED, IMPORTED_GRAPH, IMPORTED_SOURCE = "import", "model.qgraph", "source.onnx"
IMPORTED_DIGESTED = (IMPORTED_GRAPH, IMPORTED_SOURCE)


def is_imported(info: dict) -> bool:
    """Whether run.json ``info`` is an imported run's (a QGraph, no torch model)."""
    return info.get("method") == IMPORTED


def run_identity(info: dict) -> str:
    """The sha256 that identifies a run's model: its checkpoint's, or an imported run's
    QGraph's (an export records it to tell whether the run was rewritten since)."""
    return info["files"][IMPORTED_GRAPH if is_imported(info) else CHECKPOINT]


def model_source(spec: str) -> dict:
    """The self-contained record of a ``--model`` spec (absolute path, file sha256)."""
    record = {"spec": absolute_spec(spec)}
    file = source_file(spec)
    if file is not None and file.is_file():
        record.update(file=str(file.resolve()), sha256=file_sha256(file))
    return record


def data_source(spec: str, data: Dataset, search_path: list[str] | None = None) -> dict:
    """The self-contained record of a ``--data`` spec and the data set it gave."""
    record = {"spec": absolute_spec(spec), "sha256": dataset_sha256(data)}
    if search_path:
        record["search_path"] = search_path
    return record


def write_run_files(directory: Path, *, qat_model: nn.Module, float_model: nn.Module,
                    config, run_info: dict, metrics: dict) -> None:
    """Write the run files into ``directory`` (an output's staging directory), with the
    sha256 of the checkpoint, float weights and config recorded in run.json."""
    directory = Path(directory)
    torch.save(qat_model.state_dict(), directory / CHECKPOINT)
    torch.save(float_model.state_dict(), directory / FLOAT_WEIGHTS)
    (directory / CONFIG).write_text(config.to_json() + "\n")
    write_json(directory / METRICS, metrics)
    digests = {name: file_sha256(directory / name) for name in DIGESTED}
    write_json(directory / RUN_INFO, {"format": RUN_FORMAT, **run_info, "files": digests})


def save_run(directory: str | Path, *, qat_model: nn.Module, float_model: nn.Module,
             config, run_info: dict, metrics: dict, force: bool = False) -> Path:
    """Write a complete run directory; return its path.

    ``run_info`` should hold ``model`` and ``input_shape`` and, for :func:`load_run` to
    rebuild the model, ``sources`` (see :func:`model_source` and :func:`data_source`).
    An existing directory is replaced only with ``force`` and only when qflow wrote it.
    """
    out = OutputDirectory(directory, kind="run", force=force)
    with out.open() as stage:
        write_run_files(stage, qat_model=qat_model, float_model=float_model, config=config,
                        run_info=run_info, metrics=metrics)
        out.commit()
    return Path(directory)


def read_run_info(directory: str | Path) -> dict:
    """run.json of a run directory, after checking that the run's files are the ones it
    was written with."""
    directory = Path(directory)
    if not directory.is_dir():
        raise QflowError(f"run directory not found: {directory}")
    info = read_json(directory / RUN_INFO, missing=f"run file not found: "
                     f"{directory / RUN_INFO}")
    if info.get("format") != RUN_FORMAT:
        raise QflowError(f"{directory / RUN_INFO}: unsupported run format "
                         f"{info.get('format')!r} (this qflow reads {RUN_FORMAT}; re-run "
                         "qflow quantize)")
    digests = info.get("files")
    digested = IMPORTED_DIGESTED if is_imported(info) else DIGESTED
    if not isinstance(digests, dict) or sorted(digests) != sorted(digested):
        raise QflowError(f"{directory / RUN_INFO}: 'files' must give the sha256 of "
                         f"{', '.join(digested)}")
    for name in digested:
        path = directory / name
        if not path.is_file():
            raise QflowError(f"{name} not found in run {directory}")
        if file_sha256(path) != digests[name]:
            raise QflowError(f"{path} changed since the run was written (sha256 differs from "
                             "run.json); re-run qflow quantize")
    if not isinstance(info.get("model"), str) or not isinstance(info.get("sources"), dict):
        raise QflowError(f"{directory / RUN_INFO}: lacks model or sources")
    return info


def _source(info: dict, key: str, directory: Path) -> dict:
    record = info["sources"].get(key)
    if not isinstance(record, dict) or not isinstance(record.get("spec"), str):
        raise QflowError(f"{directory / RUN_INFO}: sources.{key} must give a spec")
    return record


def check_model_source(info: dict, directory: Path) -> str:
    """The run's model spec, after checking that its model file is the one it trained."""
    record = _source(info, "model", directory)
    file, expected = record.get("file"), record.get("sha256")
    if file is not None:
        if not Path(file).is_file():
            raise QflowError(f"model file {file} of run {directory} not found")
        if file_sha256(Path(file)) != expected:
            raise QflowError(f"model file {file} changed since run {directory} was written "
                             "(sha256 differs); re-run qflow quantize")
    return record["spec"]


def has_data(info: dict) -> bool:
    """Whether a run names a data set (an imported run may have none)."""
    return info.get("sources", {}).get("data") is not None


def load_run_data(directory: str | Path, info: dict | None = None) -> Dataset:
    """The data set a run trained on, after checking it is the same (sha256 of the arrays).

    Runs ``module:function`` data sources (their code).
    """
    directory = Path(directory)
    info = read_run_info(directory) if info is None else info
    if not has_data(info):
        raise QflowError(f"run {directory} names no data set (imported without --data)")
    record = _source(info, "data", directory)
    data = resolve_data(record["spec"], record.get("search_path"))
    if dataset_sha256(data) != record.get("sha256"):
        raise QflowError(f"data {record['spec']} changed since run {directory} was written "
                         "(sha256 of its arrays differs)")
    return data


def load_run(directory: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the QAT model of a run directory (eval mode) and return it with run.json.

    The checkpoint, float weights, config and model file are checked against the sha256
    recorded in run.json first (a one-line QflowError names what changed). The model file
    of a run made with ``--model file.py:factory`` is then run.

    >>> # model, info = load_run("runs/digits-mlp-w8a8-seed0")
    """
    directory = Path(directory)
    info = read_run_info(directory)
    if is_imported(info):
        raise QflowError(f"run {directory} was imported from {info.get('model')}: it has a "
                         "QGraph, no torch model")
    spec = check_model_source(info, directory)
    config = config_from_json((directory / CONFIG).read_bytes(), str(directory / CONFIG))
    model = resolve_model(spec)()
    quantize_(model, config)
    checkpoint = directory / CHECKPOINT
    try:
        state = torch.load(checkpoint, weights_only=True, map_location="cpu")
        model.load_state_dict(state)
    except Exception as exc:
        reason = str(exc).strip().splitlines()
        raise QflowError(f"cannot load checkpoint {checkpoint}: "
                         f"{reason[0] if reason else type(exc).__name__}") from None
    return model.eval(), info


def input_shape(info: dict, directory: Path) -> tuple[int, ...]:
    """run.json's ``input_shape`` (per sample), checked."""
    shape = info.get("input_shape")
    if not (isinstance(shape, list) and shape and all(
            isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1 << 20 for n in shape)):
        raise QflowError(f"{Path(directory) / RUN_INFO}: input_shape must be a non-empty list "
                         f"of positive integers, not {shape!r}")
    return tuple(shape)


def freeze_run(directory: str | Path):
    """The frozen QGraph of a run directory, with run.json: :func:`load_run`, then
    :func:`qflow.graph.freeze` on a batch of ``input_shape``. The graph's metadata names
    the model and the run."""
    from qflow.graph.from_torch import freeze

    directory = Path(directory)
    info = read_run_info(directory)
    if is_imported(info):
        graph = QGraph.load(directory / IMPORTED_GRAPH)
        graph.meta.update({"model": info.get("model"), "run": str(directory)})
        return graph, info
    model, info = load_run(directory)
    shape = input_shape(info, directory)
    example = torch.zeros((2, *shape))
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:
        reason = str(exc).strip().splitlines()
        raise QflowError(f"{directory / RUN_INFO}: input_shape {list(shape)} does not fit the "
                         f"model ({reason[0] if reason else type(exc).__name__})") from None
    graph = freeze(model, example)
    graph.meta.update({"model": info.get("model"), "run": str(directory)})
    return graph, info


def save_imported_run(directory: str | Path, graph: QGraph, source: str | Path, *,
                      data_spec: str | None = None, data: Dataset | None = None,
                      search_path: list[str] | None = None, notes: dict | None = None,
                      force: bool = False) -> Path:
    """Write an imported run: the QGraph, a self-contained copy of the QONNX file (external
    weights inlined), run.json (method ``import``) and metrics.json; return its path."""
    import onnx

    source = Path(source)
    model = onnx.load(str(source))  # external data, if any, is read in
    shape = [int(n) for n in graph.tensors[graph.input].shape]
    out = OutputDirectory(directory, kind="run", force=force)
    out.check()
    with out.open() as stage:
        graph.save(stage / IMPORTED_GRAPH)
        onnx.save(model, str(stage / IMPORTED_SOURCE))
        sources = {"model": {"spec": str(source.resolve()), "file": str(source.resolve()),
                             "sha256": file_sha256(source)}}
        if data_spec is not None:
            sources["data"] = data_source(data_spec, data, search_path)
        write_json(stage / METRICS, {"import": notes or {}})
        digests = {name: file_sha256(stage / name) for name in IMPORTED_DIGESTED}
        write_json(stage / RUN_INFO, {
            "format": RUN_FORMAT, "method": IMPORTED, "model": source.name,
            "data": data_spec, "sources": sources, "input_shape": shape,
            "qflow": _version(), "files": digests})
        out.commit()
    return Path(directory)


def _version() -> str:
    import qflow

    return qflow.__version__
