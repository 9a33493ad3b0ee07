"""Convert the hls4ml-form QONNX graph with hls4ml 1.3, then check every layer's types.

Every precision hls4ml uses comes from the QGraph through hls4ml's per-layer config
(``LayerName.<node>.Precision.<key>``). After conversion qflow reads back each layer's
types and refuses to write the project if any differs from what it asked for, if a
layer appears that qflow did not ask for, or if one it asked for is missing.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qflow.errors import QflowError
from qflow.graph.ir import QGraph
from qflow.numerics import values_to_codes

from . import custom
from .binary import XNOR
from .onnx_graph import HlsExportError, hls_graph

PROJECT_NAME = "qflow_model"
HLS_BACKEND = "Vitis"
HLS_ONNX_FILE = "model.hls4ml.onnx"
#: a default no QGraph type has; any layer left with it is caught by the read-back
UNSET_PRECISION = "fixed<16,6,TRN,WRAP>"
#: layers hls4ml inserts that only move data; accepted when every output's type is their
#: input's (in io_stream, padded convolutions get a ZeroPadding2D in front and a tensor
#: read twice gets a Clone)
PASS_THROUGH_CLASSES = ("ZeroPadding1D", "ZeroPadding2D", "Clone")
#: hls4ml layer attribute holding each precision key's type
_TYPE_ATTRS = {"weight": "weight_t", "bias": "bias_t", "accum": "accum_t",
               "result": "result_t", "scale": "scale_t"}


@dataclass
class Project:
    """What conversion produced: the hls4ml model and every layer's checked types."""

    model: object
    layers: list[dict]
    io_type: str
    reuse_factor: int
    strategy: str


def _as_tuple(precision) -> tuple:
    """(signed, width, integer, rounding, overflow) of an hls4ml precision object."""
    rounding = getattr(precision, "rounding_mode", None)
    overflow = getattr(precision, "saturation_mode", None)
    return (bool(precision.signed), int(precision.width), int(precision.integer),
            str(getattr(rounding, "name", rounding) or "TRN"),
            str(getattr(overflow, "name", overflow) or "WRAP"))


def _expected_tuple(text: str) -> tuple:
    kind, rest = text.split("<", 1)
    width, integer, rounding, overflow = rest.rstrip(">").split(",")
    return (kind == "fixed", int(width), int(integer), rounding, overflow)


def _pass_through_problem(layer) -> str:
    """Why an hls4ml-inserted layer is not acceptable ('' when it is)."""
    if layer.class_name not in PASS_THROUGH_CLASSES:
        return f"layer {layer.name!r} ({layer.class_name}) was not asked for"
    source = layer.get_input_variable().type.precision
    for output in layer.outputs:
        result = layer.get_output_variable(output).type.precision
        if _as_tuple(result) != _as_tuple(source):
            return (f"layer {layer.name!r} ({layer.class_name}) inserted by hls4ml changes "
                    f"the type {source} to {result}")
    return ""


def _config_precisions(precisions: dict[str, str]) -> dict[str, str]:
    """A layer's precisions as hls4ml's config takes them. No string names hls4ml's binary
    type: a binary weight is ``auto`` (hls4ml takes the type of its BipolarQuant), a
    binary result is set by the layer itself (qflow's FixedSign, or a Flatten that
    passes its input on); the read-back checks both."""
    out = {}
    for key, text in precisions.items():
        if text != XNOR:
            out[key] = text
        elif key == "weight":
            out[key] = "auto"
    return out


def _hls_config(graph_form, reuse_factor: int, strategy: str) -> dict:
    return {
        "Model": {"Precision": UNSET_PRECISION, "ReuseFactor": reuse_factor,
                  "Strategy": strategy},
        "LayerName": {name: {"Precision": _config_precisions(p)} for name, p in
                      graph_form.precisions.items()},
    }


def _type_matches(precision, text: str) -> bool:
    if text == XNOR:
        from hls4ml.model.types import XnorPrecisionType

        return isinstance(precision, XnorPrecisionType)
    return _as_tuple(precision) == _expected_tuple(text)


def check_layer_types(model, graph_form) -> list[dict]:
    """Every hls4ml layer's types against the QGraph's; raise HlsExportError on any
    difference. Returns one row per layer (name, class, QGraph node, types)."""
    expected = {graph_form.layer_names[k]: v for k, v in graph_form.precisions.items()}
    problems, rows, seen = [], [], set()
    for layer in model.get_layers():
        name = layer.name
        if name not in expected:
            problem = _pass_through_problem(layer)
            if problem:
                problems.append(problem)
            else:
                rows.append({"layer": name, "class": layer.class_name, "qgraph_node": "",
                             "types": {"result": str(layer.get_input_variable().type.precision)},
                             "note": "inserted by hls4ml; its output types = its input's"})
            continue
        seen.add(name)
        types = {}
        for key, text in expected[name].items():
            attr = layer.get_attr(_TYPE_ATTRS[key])
            if attr is None:
                problems.append(f"layer {name!r} has no {_TYPE_ATTRS[key]}")
                continue
            types[key] = XNOR if text == XNOR else str(attr.precision)
            if not _type_matches(attr.precision, text):
                problems.append(f"layer {name!r} {_TYPE_ATTRS[key]} is {attr.precision}, "
                                f"the QGraph says {text}")
        rows.append({"layer": name, "class": layer.class_name,
                     "qgraph_node": graph_form.sources.get(name, ""), "types": types})
    problems += [f"layer {name!r} is missing after conversion"
                 for name in expected if name not in seen]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise HlsExportError(f"hls4ml changed the model: {problems[0]}{more}")
    return rows


def convert(graph: QGraph, hls_dir: Path, *, part: str, clock_mhz: float, io_type: str,
            reuse_factor: int, strategy: str, log: Path,
            testbench: tuple[np.ndarray, np.ndarray] | None = None) -> Project:
    """Write the hls4ml project for ``graph`` into ``hls_dir`` (not compiled).

    ``testbench``: (real inputs, real outputs), batch first, QGraph layout; written as
    the project's ``tb_data`` so its own C++ testbench has data.
    """
    import hls4ml

    custom.register()
    form = hls_graph(graph, io_type, strategy)
    hls_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = hls_dir.parent / HLS_ONNX_FILE
    onnx.save(form.model, onnx_path)
    tb = {}
    if testbench is not None:
        for key, values in zip(("input_data_tb", "output_data_tb"), testbench, strict=True):
            path = hls_dir.parent / f".{key}.npy"
            np.save(path, to_hls_layout(values))
            tb[key] = str(path)
    # hls4ml prints its progress: keep it in a log file, not on the user's console
    with open(log, "w") as fh, contextlib.redirect_stdout(fh):
        try:
            model = hls4ml.converters.convert_from_onnx_model(
                str(onnx_path), output_dir=str(hls_dir), project_name=PROJECT_NAME,
                backend=HLS_BACKEND, part=part, clock_period=round(1000.0 / clock_mhz, 6),
                io_type=io_type, hls_config=_hls_config(form, reuse_factor, strategy), **tb)
        except (RuntimeError, ValueError, AssertionError, NotImplementedError,
                KeyError) as exc:
            raise HlsExportError(f"hls4ml could not convert the model: "
                                 f"{type(exc).__name__}: {exc}") from None
        rows = check_layer_types(model, form)
        model.write()
    for path in tb.values():
        Path(path).unlink()
    _relative_config_paths(hls_dir / "hls4ml_config.yml")
    return Project(model, rows, io_type, reuse_factor, strategy)


def _relative_config_paths(config: Path) -> None:
    """hls4ml records the paths it was given; the project is written to a temporary
    directory and renamed, so store them relative to the project instead."""
    relative = {"OutputDir": ".", "OnnxModel": f"../{HLS_ONNX_FILE}",
                "InputData": "tb_data/tb_input_features.dat",
                "OutputPredictions": "tb_data/tb_output_predictions.dat"}
    lines = config.read_text().splitlines()
    for i, line in enumerate(lines):
        key = line.split(":", 1)[0]
        if key in relative:
            lines[i] = f"{key}: {relative[key]}"
    config.write_text("\n".join(lines) + "\n")


def to_hls_layout(x: np.ndarray) -> np.ndarray:
    """QGraph layout (N, C, H, W) -> hls4ml's channels-last rows (N, H·W·C)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x.reshape(len(x), -1))


def run_project(hls_dir: Path, graph: QGraph, x: np.ndarray, log: Path, *, workers: int = 1,
                progress: Callable[[str], None] | None = None) -> np.ndarray:
    """Compile the project with g++ (hls4ml's ``compile()``) and run real-valued ``x``
    through its C simulation in ``workers`` processes (:mod:`.csim_pool`); return the
    output codes in the QGraph's layout.

    The project is copied to a fresh temporary folder and built there, every time.
    hls4ml's ``build_lib.sh`` always recompiles, but the library it loads has a fixed
    name (``firmware/<project>-<stamp>.so``) and loading a path that this process has
    loaded before returns the old library: a second check in one process would run the
    first build. A fresh folder gives a new path, leaves any build product lying in the
    export (``*.so``, ``*.o``) unused, and writes nothing into the export but ``log``.
    A compile failure raises QflowError with the first compiler error line.
    """
    import hls4ml

    from .csim_pool import simulate

    out_shape = graph.tensors[graph.output].shape
    with tempfile.TemporaryDirectory(prefix="qflow-csim-") as tmp:
        build = Path(tmp) / "hls"
        shutil.copytree(hls_dir, build, symlinks=False,
                        ignore=shutil.ignore_patterns("*.so", "*.o", "__pycache__"))
        script = build / "build_lib.sh"
        if script.is_file():  # an export copied without permissions still builds
            script.chmod(script.stat().st_mode | 0o100)
        with open(log, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(
                io.StringIO()):
            model = hls4ml.converters.link_existing_project(str(build))
            model.config.config["OutputDir"] = str(build)
            try:
                start = time.perf_counter()
                model.compile()
            except Exception:
                failed = True
            else:
                failed = False
        if not failed:
            if progress is not None:
                progress(f"C simulation compiled in {time.perf_counter() - start:.0f} s")
            # float64 in and out (<project>_double): exact for every type up to 53
            # significant bits
            y = simulate(model._top_function_lib._name, f"{PROJECT_NAME}_double",
                         to_hls_layout(x), int(np.prod(out_shape)), workers=workers,
                         progress=progress)
    if failed:
        raise QflowError(f"C simulation did not compile: {_first_error(log)}")
    y = y.reshape(len(x), -1)
    if len(out_shape) == 3:
        c, h, w = out_shape
        y = y.reshape(len(x), h, w, c).transpose(0, 3, 1, 2)
    return values_to_codes(y.reshape(len(x), *out_shape), graph.output_type)


def _first_error(log: Path) -> str:
    """The first compiler error line in the build log (paths relative to the project)."""
    lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines()]
    for line in lines:
        if "error" in line.lower():
            return line[:300]
    return f"see {log}"
