"""Deployment targets: one YAML data file per board or device under ``targets/``.

A target names its backend (``onnx``, ``hls4ml``, ``tvm``), its kind (``files``, ``fpga``,
``cpu``, ``gpu``) and what that backend needs: an FPGA part, clock, resource budget and
hls4ml defaults, or a TVM target. Exporters are picked from the backend name by table
lookup in :mod:`qflow.export`.

>>> t = load_target("ultra96")
>>> t.part, t.resources["dsp"], t.defaults["io_type"]
('xczu3eg-sbva484-1-i', 360, 'io_parallel')
>>> sorted(t.name for t in all_targets() if t.kind == "fpga")
['kv260', 'pynq-z2', 'ultra96', 'zcu104']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qflow.errors import QflowError

#: where the target files live (beside the package, in the source tree)
TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"

KINDS = ("files", "fpga", "cpu", "gpu")
BACKENDS = ("onnx", "hls4ml", "tvm")
RESOURCE_KEYS = ("dsp", "lut", "ff", "bram36", "uram")
IO_TYPES = ("io_parallel", "io_stream")
STRATEGIES = ("Latency", "Resource")

_REQUIRED = {
    "files": ("name", "description", "kind", "backend"),
    "fpga": ("name", "description", "kind", "backend", "part", "clock_mhz", "resources",
             "defaults"),
    "cpu": ("name", "description", "kind", "backend", "tvm"),
    "gpu": ("name", "description", "kind", "backend", "tvm"),
}
_OPTIONAL = ("board_part", "processing_system", "cross_compiler")


@dataclass(frozen=True, kw_only=True)
class TargetSpec:
    """One board or device, as read from its data file."""

    name: str
    description: str
    kind: str
    backend: str
    part: str = ""
    board_part: str = ""
    clock_mhz: float = 0.0
    resources: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    processing_system: dict = field(default_factory=dict)
    tvm: dict = field(default_factory=dict)
    cross_compiler: str = ""
    path: str = ""

    @property
    def clock_period_ns(self) -> float:
        return 1000.0 / self.clock_mhz


def _check(data, path: Path) -> TargetSpec:
    where = f"target file {path}"
    if not isinstance(data, dict):
        raise QflowError(f"{where}: expected a mapping of keys to values")
    kind = data.get("kind")
    if kind not in KINDS:
        raise QflowError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    required = _REQUIRED[kind]
    missing = [k for k in required if k not in data]
    if missing:
        raise QflowError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(set(data) - set(required) - set(_OPTIONAL))
    if unknown:
        raise QflowError(f"{where}: unknown key {unknown[0]!r}")
    if data["backend"] not in BACKENDS:
        raise QflowError(f"{where}: backend must be one of {', '.join(BACKENDS)}")
    if data["name"] != path.stem:
        raise QflowError(f"{where}: name {data['name']!r} differs from the file name")
    if kind == "fpga":
        res = data["resources"]
        if not isinstance(res, dict) or sorted(res) != sorted(RESOURCE_KEYS) or not all(
                isinstance(v, int) and v >= 0 for v in res.values()):
            raise QflowError(f"{where}: resources must give non-negative integers for "
                             f"{', '.join(RESOURCE_KEYS)}")
        d = data["defaults"]
        reuse = d.get("reuse_factor")
        if d.get("io_type") not in IO_TYPES or d.get("strategy") not in STRATEGIES or not (
                reuse == "auto" or (isinstance(reuse, int) and reuse >= 1)):
            raise QflowError(f"{where}: defaults need io_type ({'|'.join(IO_TYPES)}), "
                             f"strategy ({'|'.join(STRATEGIES)}) and reuse_factor (>= 1 or "
                             "auto)")
        if not (isinstance(data["clock_mhz"], int | float) and data["clock_mhz"] > 0):
            raise QflowError(f"{where}: clock_mhz must be a positive number")
    return TargetSpec(**data, path=str(path))


def load_target(name: str, directory: Path = TARGETS_DIR) -> TargetSpec:
    """The target called ``name``; a one-line QflowError listing the known ones otherwise."""
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(t.name for t in all_targets(directory))
        raise QflowError(f"unknown target {name!r} (known: {known})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise QflowError(f"malformed target file {path}: {str(exc).splitlines()[0]}") from None
    return _check(data, path)


def all_targets(directory: Path = TARGETS_DIR) -> list[TargetSpec]:
    """Every target file in ``directory``, sorted by kind then name."""
    if not directory.is_dir():
        raise QflowError(f"targets directory not found: {directory} (install qflow from "
                         "its source tree: pip install -e .)")
    specs = [load_target(p.stem, directory) for p in sorted(directory.glob("*.yaml"))]
    return sorted(specs, key=lambda t: (KINDS.index(t.kind), t.name))
