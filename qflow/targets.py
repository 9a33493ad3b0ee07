"""Deployment targets: one YAML data file per board or device under ``targets/``.

A target names its backend (``onnx``, ``hls4ml``, ``tvm``), its kind (``files``, ``fpga``,
``cpu``, ``gpu``) and what that backend needs: an FPGA part, clock, resource budget and
hls4ml defaults, or a TVM target. Exporters are picked from the backend name by table
lookup in :mod:`qflow.export`.

Every key and value is checked when the file is read (allow-list, typed), so a broken
file is a one-line :class:`~qflow.errors.QflowError` naming the file and the key, never
a failure later in an exporter. The built-in targets are loaded by name only
(:func:`load_target`); a board file of the user's own is loaded by path
(:func:`load_target_file`).

>>> t = load_target("ultra96")
>>> t.part, t.resources["dsp"], t.defaults["io_type"]
('xczu3eg-sbva484-1-i', 360, 'io_parallel')
>>> sorted(t.name for t in all_targets() if t.kind == "fpga")
['kv260', 'pynq-z2', 'ultra96', 'zcu104']
>>> load_target("../../x/evil")  # doctest: +ELLIPSIS
Traceback (most recent call last):
qflow.errors.QflowError: target must be a name from qflow targets (arm64, ...) or use \
--target-file PATH, not '../../x/evil'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from qflow.errors import QflowError
from qflow.yamlfile import load_yaml, short_repr, type_name

#: where the target files live (beside the package, in the source tree)
TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"

KINDS = ("files", "fpga", "cpu", "gpu")
BACKENDS = ("onnx", "hls4ml", "tvm")
RESOURCE_KEYS = ("dsp", "lut", "ff", "bram36", "uram")
IO_TYPES = ("io_parallel", "io_stream")
STRATEGIES = ("Latency", "Resource")
#: ``processing_system.family`` values (the block designs of
#: :data:`qflow.export.hls.board.PROCESSING_SYSTEMS`)
PROCESSING_SYSTEM_FAMILIES = ("zynq", "zynq_ultrascale")
#: TVM target kinds the TVM exporter builds (:data:`qflow.export.tvm.build.DEVICES`), and
#: the target kind each runs on
TVM_KINDS = {"llvm": "cpu", "cuda": "gpu"}

#: the largest resource count, clock and reuse factor a target file may give
MAX_RESOURCE = 10**9
MAX_CLOCK_MHZ = 10_000
MAX_REUSE = 10**6
#: largest target file read
MAX_FILE_BYTES = 1 << 20

_REQUIRED = {
    "files": ("name", "description", "kind", "backend"),
    "fpga": ("name", "description", "kind", "backend", "part", "clock_mhz", "resources",
             "defaults"),
    "cpu": ("name", "description", "kind", "backend", "tvm"),
    "gpu": ("name", "description", "kind", "backend", "tvm"),
}
_OPTIONAL = {
    "files": (),
    "fpga": ("board_part", "processing_system"),
    "cpu": ("cross_compiler",),
    "gpu": ("cross_compiler",),
}
#: the backends that can serve each kind (every kind can be exported as ONNX files)
_KIND_BACKENDS = {"files": ("onnx",), "fpga": ("hls4ml", "onnx"), "cpu": ("tvm", "onnx"),
                  "gpu": ("tvm", "onnx")}
_DEFAULTS_KEYS = ("io_type", "strategy", "reuse_factor")
_TVM_LISTS = ("mattr", "keys", "libs")
_PS_KEYS = ("family", "cpu", "tvm_target")

#: a target name: what ``load_target`` accepts and every target file's ``name``
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
#: FPGA part and Vivado board part (``xczu3eg-sbva484-1-i``, ``avnet.com:ultra96v2:part0:1.2``)
_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
#: one line of text for tables and the comments of generated Tcl, shell and Python files
_DESCRIPTION_RE = re.compile(r"[\w .,:()+/&'#-]{1,200}")
_TVM_KEY_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_NO_SPACE_RE = re.compile(r"[^\s\x00-\x1f\x7f]{1,255}")


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


def _show_path(path: Path) -> str:
    text = str(path)
    return text if text.isprintable() else repr(text)


class _Checker:
    """Checks one target file's data; every error names the file."""

    def __init__(self, path: Path) -> None:
        self.where = f"target file {_show_path(path)}"

    def fail(self, message: str):
        raise QflowError(f"{self.where}: {message}")

    def mapping(self, value, key: str, allowed: tuple[str, ...],
                required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(f"{key} must be a mapping, not {type_name(value)}")
        unknown = [k for k in value if k not in allowed]
        if unknown:
            self.fail(f"{key}: unknown key {short_repr(unknown[0])} (allowed: "
                      f"{', '.join(allowed)})")
        missing = [k for k in required if k not in value]
        if missing:
            self.fail(f"{key} must give {', '.join(required)}: {', '.join(missing)} missing")
        return value

    def string(self, value, key: str, pattern: re.Pattern | None = None,
               rule: str = "") -> str:
        if not isinstance(value, str):
            self.fail(f"{key} must be a string, not {type_name(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(f"{key} must be {rule}, not {short_repr(value)}")
        return value

    def choice(self, value, key: str, choices) -> str:
        if not isinstance(value, str) or value not in choices:
            self.fail(f"{key} must be one of {', '.join(choices)}, not {short_repr(value)}")
        return value

    def integer(self, value, key: str, low: int, high: int, extra: str = "") -> int:
        rule = f"an integer from {low:,} to {high:,}{extra}"
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{key} must be {rule}, not {type_name(value)}")
        if not low <= value <= high:
            self.fail(f"{key} must be {rule}, not {short_repr(value)}")
        return value


def _check_fpga(c: _Checker, data: dict) -> None:
    c.string(data["part"], "part", _PART_RE, "an FPGA part name (letters, digits, _.:-)")
    if "board_part" in data:
        c.string(data["board_part"], "board_part", _PART_RE,
                 "a Vivado board part (letters, digits, _.:-)")
    clock = data["clock_mhz"]
    rule = f"a positive number of MHz up to {MAX_CLOCK_MHZ:,}"
    if isinstance(clock, bool) or not isinstance(clock, int | float):
        c.fail(f"clock_mhz must be {rule}, not {type_name(clock)}")
    if not (0 < clock <= MAX_CLOCK_MHZ) or not math.isfinite(clock):
        c.fail(f"clock_mhz must be {rule}, not {short_repr(clock)}")
    resources = c.mapping(data["resources"], "resources", RESOURCE_KEYS, RESOURCE_KEYS)
    for key in RESOURCE_KEYS:
        c.integer(resources[key], f"resources.{key}", 0, MAX_RESOURCE)
    defaults = c.mapping(data["defaults"], "defaults", _DEFAULTS_KEYS, _DEFAULTS_KEYS)
    c.choice(defaults["io_type"], "defaults.io_type", IO_TYPES)
    c.choice(defaults["strategy"], "defaults.strategy", STRATEGIES)
    if defaults["reuse_factor"] != "auto":
        c.integer(defaults["reuse_factor"], "defaults.reuse_factor", 1, MAX_REUSE, " or auto")
    if "processing_system" in data:
        system = c.mapping(data["processing_system"], "processing_system", _PS_KEYS,
                           ("family",))
        c.choice(system["family"], "processing_system.family", PROCESSING_SYSTEM_FAMILIES)
        if "cpu" in system:
            c.string(system["cpu"], "processing_system.cpu", _PART_RE,
                     "a CPU name (letters, digits, _.:-)")
        if "tvm_target" in system:
            c.string(system["tvm_target"], "processing_system.tvm_target", NAME_RE,
                     "a target name")


def _check_tvm(c: _Checker, data: dict) -> None:
    tvm = data["tvm"]
    if not isinstance(tvm, dict):
        c.fail(f"tvm must be a mapping, not {type_name(tvm)}")
    if "kind" not in tvm:
        c.fail("tvm must give kind (" + ", ".join(TVM_KINDS) + ")")
    kind = c.choice(tvm["kind"], "tvm.kind", tuple(TVM_KINDS))
    if TVM_KINDS[kind] != data["kind"]:
        c.fail(f"tvm.kind {kind} runs on kind {TVM_KINDS[kind]}, not {data['kind']}")
    for key, value in tvm.items():
        c.string(key, "a tvm key", _TVM_KEY_RE, "a TVM target option name")
        if key.startswith("fast-math") and value:
            c.fail(f"tvm.{key} would let LLVM change float64 results; remove it")
        if key in ("mtriple", "mcpu", "mabi"):
            c.string(value, f"tvm.{key}", _PART_RE, "a name (letters, digits, _.:-)")
        elif key in _TVM_LISTS and not isinstance(value, list):
            c.fail(f"tvm.{key} must be a list of strings, not {type_name(value)}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                c.string(item, f"tvm.{key}[{i}]", _NO_SPACE_RE, "one word")
        elif isinstance(value, str):
            c.string(value, f"tvm.{key}", _NO_SPACE_RE, "one word")
        elif not isinstance(value, bool | int):
            c.fail(f"tvm.{key} must be a string, integer, true/false or a list of strings, "
                   f"not {type_name(value)}")
    if "cross_compiler" in data:
        c.string(data["cross_compiler"], "cross_compiler", _NO_SPACE_RE,
                 "a program name or path without spaces")


def _check(data, path: Path) -> TargetSpec:
    """A :class:`TargetSpec` from a target file's data; a one-line QflowError naming the
    file and the key otherwise."""
    c = _Checker(path)
    if not isinstance(data, dict):
        c.fail(f"expected a mapping of keys to values, not {type_name(data)}")
    kind = c.choice(data.get("kind"), "kind", KINDS)
    required, optional = _REQUIRED[kind], _OPTIONAL[kind]
    unknown = [k for k in data if k not in required and k not in optional]
    if unknown:
        c.fail(f"unknown key {short_repr(unknown[0])} (allowed for kind {kind}: "
               f"{', '.join(required + optional)})")
    missing = [k for k in required if k not in data]
    if missing:
        c.fail(f"missing {', '.join(missing)}")
    name = c.string(data["name"], "name", NAME_RE,
                    "a lower-case name (letters, digits, _.-; at most 64 characters)")
    if name != path.stem:
        c.fail(f"name {name!r} differs from the file name")
    c.string(data["description"], "description", _DESCRIPTION_RE,
             "one line of at most 200 letters, digits, spaces and .,:()+/&'#-")
    backend = c.choice(data["backend"], "backend", BACKENDS)
    if backend not in _KIND_BACKENDS[kind]:
        c.fail(f"backend {backend} cannot serve kind {kind} (use "
               f"{' or '.join(_KIND_BACKENDS[kind])})")
    if kind == "fpga":
        _check_fpga(c, data)
    elif kind in ("cpu", "gpu"):
        _check_tvm(c, data)
    return TargetSpec(**data, path=str(path))


def _read(path: Path) -> TargetSpec:
    """Read and check one target file (any path)."""
    shown = _show_path(path)
    try:
        if not path.exists():
            raise QflowError(f"target file not found: {shown}")
        if not path.is_file():
            raise QflowError(f"target file {shown} is not a file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise QflowError(f"target file {shown}: larger than {MAX_FILE_BYTES >> 20} MiB")
        raw = path.read_bytes()
    except OSError as exc:
        raise QflowError(f"cannot read target file {shown}: {exc.strerror}") from None
    return _check(load_yaml(raw, f"target file {shown}"), path)


def _directory(directory: Path | None) -> Path:
    return TARGETS_DIR if directory is None else Path(directory)


def _names(directory: Path) -> list[str]:
    """The target names in ``directory`` (from the file names; nothing is read)."""
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.yaml") if NAME_RE.fullmatch(p.stem))


def load_target(name: str, directory: Path | None = None) -> TargetSpec:
    """The built-in target called ``name`` (``targets/<name>.yaml``).

    ``name`` must be a plain target name (lower-case letters, digits, ``_.-``, no ``/``,
    no ``..``, no leading dot): nothing outside ``directory`` (default
    :data:`TARGETS_DIR`) is ever opened. A bad or unknown name is a one-line QflowError
    listing the known names; a broken file is one naming the file and the key.

    >>> load_target("onnx").backend
    'onnx'
    >>> load_target("ultra69")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    qflow.errors.QflowError: unknown target 'ultra69' (known: arm64, cpu, ...)
    """
    directory = _directory(directory)
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        known = ", ".join(_names(directory))
        raise QflowError(f"target must be a name from qflow targets ({known}) or use "
                         f"--target-file PATH, not {short_repr(name)}")
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(_names(directory))
        raise QflowError(f"unknown target {name!r} (known: {known}; a board file of your "
                         "own: --target-file PATH)")
    return _read(path)


def load_target_file(path: Path) -> TargetSpec:
    """A target from a board file of the user's own, checked like the built-in ones.

    The file's ``name`` must equal its stem (``boards/myboard.yaml`` holds ``name:
    myboard``). ``qflow export RUN --target-file PATH`` (mutually exclusive with
    ``--target NAME``) calls this and exports to ``RUN/export-<name>``; any problem is
    a one-line QflowError, which the CLI prints as ``qflow export: error: ...`` (exit 2).

    >>> spec = load_target_file(TARGETS_DIR / "pynq-z2.yaml")
    >>> spec.name, spec.clock_mhz
    ('pynq-z2', 100)
    >>> load_target_file(Path("no/such/board.yaml"))
    Traceback (most recent call last):
    qflow.errors.QflowError: target file not found: no/such/board.yaml
    """
    return _read(Path(path))


def all_targets(directory: Path | None = None,
                errors: list[str] | None = None) -> list[TargetSpec]:
    """Every target file in ``directory`` (default :data:`TARGETS_DIR`), sorted by kind
    then name.

    Without ``errors`` the first broken file raises its QflowError. With a list, each
    broken file's one-line message is appended to it instead and the valid targets are
    returned (``qflow targets`` lists those and reports the others).

    >>> errors = []
    >>> len(all_targets(errors=errors)) >= 8, errors
    (True, [])
    """
    directory = _directory(directory)
    if not directory.is_dir():
        raise QflowError(f"targets directory not found: {_show_path(directory)} (install "
                         "qflow from its source tree: pip install -e .)")
    specs = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            specs.append(_read(path))
        except QflowError as exc:
            if errors is None:
                raise
            errors.append(str(exc))
    return sorted(specs, key=lambda t: (KINDS.index(t.kind), t.name))
