"""Target data files: every one loads and is complete; broken files give one-line errors
naming the file and the key; only plain names reach targets/; `qflow targets` lists the
valid files and reports the broken ones."""

import argparse
import copy
import time
from pathlib import Path

import pytest
import yaml

from qflow import targets as targets_module
from qflow.cli import targets as targets_cli
from qflow.errors import QflowError
from qflow.targets import (
    PROCESSING_SYSTEM_FAMILIES,
    RESOURCE_KEYS,
    TARGETS_DIR,
    TVM_KINDS,
    all_targets,
    load_target,
    load_target_file,
)

FPGA_BOARDS = {"ultra96", "pynq-z2", "zcu104", "kv260"}


def _data(name: str) -> dict:
    return yaml.safe_load((TARGETS_DIR / f"{name}.yaml").read_text())


def _write(directory: Path, name: str, data) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _one_line_error(call) -> str:
    with pytest.raises(QflowError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.isprintable(), message
    return message


def test_every_target_file_loads():
    targets = {t.name: t for t in all_targets()}
    assert FPGA_BOARDS | {"onnx", "cpu", "arm64", "cuda"} <= set(targets)
    for name in FPGA_BOARDS:
        t = targets[name]
        assert t.kind == "fpga" and t.backend == "hls4ml" and t.part and t.board_part
        assert set(t.resources) == set(RESOURCE_KEYS) and t.resources["dsp"] > 0
        assert t.clock_period_ns == pytest.approx(1000 / t.clock_mhz)
        assert t.processing_system["family"] in ("zynq", "zynq_ultrascale")
    assert targets["ultra96"].part == "xczu3eg-sbva484-1-i"
    assert targets["arm64"].tvm["mtriple"] == "aarch64-linux-gnu"


def test_the_lists_the_checks_use_match_the_exporters():
    from qflow.export.hls.board import PROCESSING_SYSTEMS

    assert set(PROCESSING_SYSTEM_FAMILIES) == set(PROCESSING_SYSTEMS)
    onnx = pytest.importorskip("onnx")  # noqa: F841 (build.py needs it)
    from qflow.export.tvm.build import DEVICES

    assert set(TVM_KINDS) == set(DEVICES)


# -- one defect per file, one line per defect ------------------------------------------------

_TOO_BIG = 10**9 + 1

#: (base target, change to its data, words of the message)
BAD_DATA = [
    # kind, backend, keys
    ("ultra96", {"kind": "asic"}, "kind must be one of files, fpga, cpu, gpu, not 'asic'"),
    ("ultra96", {"kind": ["fpga"]}, "kind must be one of"),
    ("ultra96", {"backend": "vendor"}, "backend must be one of onnx, hls4ml, tvm"),
    ("ultra96", {"backend": "tvm"}, "backend tvm cannot serve kind fpga (use hls4ml or onnx)"),
    ("onnx", {"backend": "hls4ml"}, "backend hls4ml cannot serve kind files"),
    ("ultra96", {"colour": "red"}, "unknown key 'colour' (allowed for kind fpga:"),
    ("ultra96", {"cross_compiler": "g++"}, "unknown key 'cross_compiler'"),
    ("arm64", {"processing_system": {"family": "zynq"}}, "unknown key 'processing_system'"),
    # strings
    ("ultra96", {"part": 12345}, "part must be a string, not int"),
    ("ultra96", {"part": ""}, "part must be an FPGA part name"),
    ("ultra96", {"part": "xc7z020 }; exec rm"}, "part must be an FPGA part name"),
    ("ultra96", {"board_part": 1.2}, "board_part must be a string, not float"),
    ("ultra96", {"name": 96}, "name must be a string, not int"),
    ("ultra96", {"name": "Ultra96"}, "name must be a lower-case name"),
    ("ultra96", {"name": "zcu104"}, "name 'zcu104' differs from the file name"),
    ("ultra96", {"description": None}, "description must be a string, not null"),
    ("ultra96", {"description": 'board"""\nimport os'}, "description must be one line"),
    ("ultra96", {"description": "[red]x[/red] $(x)"}, "description must be one line"),
    # clock
    ("ultra96", {"clock_mhz": 0}, "clock_mhz must be a positive number of MHz"),
    ("ultra96", {"clock_mhz": -100}, "clock_mhz must be a positive number of MHz"),
    ("ultra96", {"clock_mhz": True}, "clock_mhz must be a positive number of MHz up to "
                                     "10,000, not bool"),
    ("ultra96", {"clock_mhz": "100"}, "clock_mhz must be a positive number of MHz up to "
                                      "10,000, not string"),
    ("ultra96", {"clock_mhz": float("inf")}, "clock_mhz must be a positive number"),
    ("ultra96", {"clock_mhz": float("nan")}, "clock_mhz must be a positive number"),
    ("ultra96", {"clock_mhz": 1e6}, "clock_mhz must be a positive number"),
    # resources
    ("ultra96", {"resources": {"dsp": 1}},
     "resources must give dsp, lut, ff, bram36, uram: lut, ff, bram36, uram missing"),
    ("ultra96", {"resources": [360]}, "resources must be a mapping, not list"),
    ("ultra96", {"resources": {**_data("ultra96")["resources"], "dsp": True}},
     "resources.dsp must be an integer from 0 to 1,000,000,000, not bool"),
    ("ultra96", {"resources": {**_data("ultra96")["resources"], "uram": False}},
     "resources.uram must be an integer from 0 to 1,000,000,000, not bool"),
    ("ultra96", {"resources": {**_data("ultra96")["resources"], "lut": -1}},
     "resources.lut must be an integer from 0 to 1,000,000,000, not -1"),
    ("ultra96", {"resources": {**_data("ultra96")["resources"], "ff": 1.5}},
     "resources.ff must be an integer from 0 to 1,000,000,000, not float"),
    ("ultra96", {"resources": {**_data("ultra96")["resources"], "ff": _TOO_BIG}},
     "resources.ff must be an integer"),
    ("ultra96", {"resources": {**_data("ultra96")["resources"], "luts": 1}},
     "resources: unknown key 'luts' (allowed: dsp, lut, ff, bram36, uram)"),
    # defaults
    ("ultra96", {"defaults": ["io_parallel"]}, "defaults must be a mapping, not list"),
    ("ultra96", {"defaults": "io_parallel"}, "defaults must be a mapping, not string"),
    ("ultra96", {"defaults": {"io_type": "io_serial", "strategy": "Latency", "reuse_factor": 1}},
     "defaults.io_type must be one of io_parallel, io_stream, not 'io_serial'"),
    ("ultra96", {"defaults": {"io_type": "io_stream", "strategy": 1, "reuse_factor": 1}},
     "defaults.strategy must be one of Latency, Resource, not 1"),
    ("ultra96", {"defaults": {"io_type": "io_stream", "strategy": "Latency",
                              "reuse_factor": True}},
     "defaults.reuse_factor must be an integer from 1 to 1,000,000 or auto, not bool"),
    ("ultra96", {"defaults": {"io_type": "io_stream", "strategy": "Latency",
                              "reuse_factor": 0}}, "defaults.reuse_factor must be"),
    ("ultra96", {"defaults": {"io_type": "io_stream", "strategy": "Latency",
                              "reuse_factor": "fast"}}, "defaults.reuse_factor must be"),
    ("ultra96", {"defaults": {"io_type": "io_stream", "strategy": "Latency"}},
     "defaults must give io_type, strategy, reuse_factor: reuse_factor missing"),
    ("ultra96", {"defaults": {"io_type": "io_stream", "strategy": "Latency",
                              "reuse_factor": 1, "precision": 8}},
     "defaults: unknown key 'precision'"),
    # processing system
    ("ultra96", {"processing_system": 7}, "processing_system must be a mapping, not int"),
    ("ultra96", {"processing_system": {}},
     "processing_system must give family: family missing"),
    ("ultra96", {"processing_system": {"family": "versal"}},
     "processing_system.family must be one of zynq, zynq_ultrascale, not 'versal'"),
    ("ultra96", {"processing_system": {"family": "zynq", "cpu": 53}},
     "processing_system.cpu must be a string, not int"),
    ("ultra96", {"processing_system": {"family": "zynq", "tvm_target": "../cpu"}},
     "processing_system.tvm_target must be a target name"),
    ("ultra96", {"processing_system": {"family": "zynq", "dma": 1}},
     "processing_system: unknown key 'dma' (allowed: family, cpu, tvm_target)"),
    # TVM targets
    ("arm64", {"tvm": 7}, "tvm must be a mapping, not int"),
    ("arm64", {"tvm": "llvm"}, "tvm must be a mapping, not string"),
    ("arm64", {"tvm": {"mcpu": "cortex-a53"}}, "tvm must give kind (llvm, cuda)"),
    ("arm64", {"tvm": {"kind": "vulkan"}}, "tvm.kind must be one of llvm, cuda, not 'vulkan'"),
    ("arm64", {"tvm": {"kind": "cuda"}}, "tvm.kind cuda runs on kind gpu, not cpu"),
    ("cuda", {"tvm": {"kind": "llvm"}}, "tvm.kind llvm runs on kind cpu, not gpu"),
    ("arm64", {"tvm": {"kind": "llvm", "mtriple": 5}}, "tvm.mtriple must be a string, not int"),
    ("arm64", {"tvm": {"kind": "llvm", "mattr": [1]}}, "tvm.mattr[0] must be a string, not int"),
    ("arm64", {"tvm": {"kind": "llvm", "fast-math": True}},
     "tvm.fast-math would let LLVM change float64 results"),
    ("arm64", {"tvm": {"kind": "llvm", "host": {"kind": "llvm"}}},
     "tvm.host must be a string, integer, true/false or a list of strings, not mapping"),
    ("arm64", {"tvm": {"kind": "llvm", "Bad Key": 1}}, "a tvm key must be a TVM target option"),
    ("arm64", {"cross_compiler": 3}, "cross_compiler must be a string, not int"),
    ("arm64", {"cross_compiler": "g++ -static"}, "cross_compiler must be a program name"),
]


@pytest.mark.parametrize(("base", "change", "words"), BAD_DATA,
                         ids=[f"{b}-{'-'.join(map(str, c))}-{i}"
                              for i, (b, c, _) in enumerate(BAD_DATA)])
def test_broken_target_data_is_refused_in_one_line(tmp_path, base, change, words):
    data = copy.deepcopy(_data(base))
    data.update(change)
    path = _write(tmp_path, base, data)
    for load in (lambda: load_target(base, tmp_path), lambda: load_target_file(path)):
        message = _one_line_error(load)
        assert message.startswith(f"target file {path}: "), message
        assert words in message, message


@pytest.mark.parametrize(("base", "key"), [("ultra96", "part"), ("ultra96", "resources"),
                                           ("ultra96", "defaults"), ("ultra96", "clock_mhz"),
                                           ("arm64", "tvm"), ("onnx", "description")])
def test_a_missing_key_is_named(tmp_path, base, key):
    data = _data(base)
    del data[key]
    message = _one_line_error(lambda: load_target(base, _write(tmp_path, base, data).parent))
    assert message.endswith(f": missing {key}"), message


_ULTRA96_TEXT = (TARGETS_DIR / "ultra96.yaml").read_text()

#: (file text or bytes, words of the message)
BAD_TEXT = [
    ("name: [unclosed\n", "malformed YAML at line 2"),
    ("", "expected a mapping of keys to values, not null"),
    ("- ultra96\n", "expected a mapping of keys to values, not list"),
    (_ULTRA96_TEXT + "part: xc7z020clg400-1\n", "duplicate key 'part' at line 14"),
    (_ULTRA96_TEXT.replace("{dsp: 360,", "{dsp: 360, dsp: 1,"), "duplicate key 'dsp' at line 11"),
    (_ULTRA96_TEXT.replace("clock_mhz: 100", "clock_mhz: " + "[" * 100_000),
     "YAML nested too deeply (more than 100 levels) at line 10"),
    (_ULTRA96_TEXT.replace("clock_mhz: 100", "clock_mhz:\n" + "- " * 100_000 + "1"),
     "YAML nested too deeply (more than 100 levels)"),
    (_ULTRA96_TEXT.replace("clock_mhz: 100", "clock_mhz: 0x_"),
     "malformed YAML at line 10: cannot read the value '0x_'"),
    (_ULTRA96_TEXT.replace("clock_mhz: 100", "clock_mhz: 0x" + "f" * 5000),
     "is too large (more than 64 bits)"),
    (_ULTRA96_TEXT.replace("name: ultra96", "name: !!python/name:os.system"),
     "could not determine a constructor"),
    (_ULTRA96_TEXT.replace("name: ultra96", "yes: ultra96"),
     "a key must be a string, not bool 'yes' (quote it)"),
    (_ULTRA96_TEXT.replace("part: xczu3eg", "part: \x07xczu3eg"),
     "special characters are not allowed"),
    (_ULTRA96_TEXT.encode() + b"\nboard_part: \xff\n", "not UTF-8 text (invalid start byte"),
    (_ULTRA96_TEXT + "---\nname: ultra96\n", "expected a single document"),
]


@pytest.mark.parametrize(("text", "words"), BAD_TEXT, ids=range(len(BAD_TEXT)))
def test_malformed_target_files_are_refused_in_one_line(tmp_path, text, words):
    path = tmp_path / "ultra96.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    start = time.perf_counter()
    message = _one_line_error(lambda: load_target_file(path))
    assert time.perf_counter() - start < 2
    assert message.startswith(f"target file {path}: "), message
    assert words in message, message


def test_a_good_user_board_file_loads(tmp_path):
    text = _ULTRA96_TEXT.replace("name: ultra96", "name: my-board")
    (tmp_path / "my-board.yaml").write_text(text)
    spec = load_target_file(tmp_path / "my-board.yaml")
    builtin = load_target("ultra96")
    assert spec.name == "my-board" and spec.path == str(tmp_path / "my-board.yaml")
    for key in ("part", "board_part", "clock_mhz", "resources", "defaults",
                "processing_system"):
        assert getattr(spec, key) == getattr(builtin, key)


@pytest.mark.parametrize(("make", "words"), [
    (lambda d: d / "nope.yaml", "target file not found: "),
    (lambda d: d, "is not a file"),
    (lambda d: _copy(d, "ultra96", "my-board"), "name 'ultra96' differs from the file name"),
    (lambda d: _big(d), "larger than 1 MiB"),
])
def test_bad_user_board_files(tmp_path, make, words):
    message = _one_line_error(lambda: load_target_file(make(tmp_path)))
    assert words in message, message


def _copy(directory: Path, source: str, name: str) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text((TARGETS_DIR / f"{source}.yaml").read_text())
    return path


def _big(directory: Path) -> Path:
    path = directory / "big.yaml"
    path.write_text("# padding\n" * 200_000)
    return path


# -- containment -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "../../x/evil", "../evil", "/etc/passwd", "evil/../ultra96", ".hidden", "..", ".",
    "a..b", "", "Ultra96", "ultra96.yaml/", "x" * 65, "ultra96\n", "ultra 96", "~/evil",
    "C:\\evil", None, 7,
])
def test_load_target_takes_plain_names_only(tmp_path, monkeypatch, name):
    inside = tmp_path / "targets"
    inside.mkdir()
    _copy(inside, "ultra96", "ultra96")
    _write(tmp_path, "evil", _data("onnx") | {"name": "evil"})  # valid, but outside
    opened = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: opened.append(p) or original(p))
    message = _one_line_error(lambda: load_target(name, inside))
    assert message.startswith("target must be a name from qflow targets (ultra96) or use "
                              "--target-file PATH, not "), message
    assert opened == []


def test_unknown_names_list_the_known_ones(tmp_path):
    message = _one_line_error(lambda: load_target("ultra69"))
    assert message.startswith("unknown target 'ultra69' (known: arm64, cpu, cuda, kv260,")
    assert "--target-file PATH" in message
    # the list comes from the file names: a broken file does not hide it
    (tmp_path / "broken.yaml").write_text("name: [\n")
    assert "known: broken" in _one_line_error(lambda: load_target("x", tmp_path))


# -- all_targets and `qflow targets` ------------------------------------------------------

def _mixed_directory(root: Path) -> Path:
    directory = root / "targets"
    directory.mkdir()
    for name in ("ultra96", "onnx", "arm64"):
        _copy(directory, name, name)
    bad = _data("ultra96") | {"name": "bad", "defaults": ["io_parallel"]}
    _write(directory, "bad", bad)
    worse = _data("ultra96") | {"name": "worse"}
    worse["resources"] = {**worse["resources"], "dsp": True}
    _write(directory, "worse", worse)
    (directory / "deep.yaml").write_text("name: " + "{" * 100_000)
    return directory


def test_all_targets_raises_or_collects(tmp_path):
    directory = _mixed_directory(tmp_path)
    message = _one_line_error(lambda: all_targets(directory))
    assert "bad.yaml: defaults must be a mapping, not list" in message
    errors = []
    found = all_targets(directory, errors=errors)
    assert [t.name for t in found] == ["onnx", "ultra96", "arm64"]
    assert [e.split(": ", 1)[1] for e in errors] == [
        "defaults must be a mapping, not list",
        "YAML nested too deeply (more than 100 levels) at line 1",
        "resources.dsp must be an integer from 0 to 1,000,000,000, not bool",
    ]
    assert all(e.startswith(f"target file {directory}/") for e in errors)
    with pytest.raises(QflowError, match="targets directory not found"):
        all_targets(tmp_path / "none")


def test_cli_lists_the_valid_targets_and_reports_the_broken_ones(tmp_path, monkeypatch,
                                                                 capsys):
    directory = _mixed_directory(tmp_path)
    monkeypatch.setattr(targets_module, "TARGETS_DIR", directory)
    assert targets_cli.run(argparse.Namespace()) == 2
    captured = capsys.readouterr()
    for name in ("ultra96", "onnx", "arm64", "xczu3eg-sbva484-1-i"):
        assert name in captured.out
    assert "worse" not in captured.out and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 3, captured.err
    for line, file in zip(lines, ("bad", "deep", "worse"), strict=True):
        assert line.startswith(f"qflow targets: error: target file {directory / file}.yaml: ")
    # a directory of good files only: exit 0, nothing on stderr
    for file in ("bad", "deep", "worse"):
        (directory / f"{file}.yaml").unlink()
    assert targets_cli.run(argparse.Namespace()) == 0
    assert capsys.readouterr().err == ""


def test_cli_lists_targets_and_refuses_unknown_ones(capsys, tmp_path):
    from qflow.cli.main import main

    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in FPGA_BOARDS:
        assert name in out
    assert "xczu3eg-sbva484-1-i" in out and "360" in out
    assert main(["export", str(tmp_path), "--target", "ultra69"]) == 2
    assert "unknown target 'ultra69'" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--target", "../../x/evil"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qflow export: error: target must be a name from qflow targets (")
    assert len(err.splitlines()) == 1
