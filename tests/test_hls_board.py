"""Board files (qflow.export.hls.board): the AXI-Stream wrapper, compiled with g++ against
real hls4ml firmware, gives the emulator's output codes sample for sample (io_parallel
and io_stream); the Tcl and shell scripts name the target's part and clock and stop
cleanly without vendor tools; the PYNQ driver's real-to-code cast is qflow's cast.

Synthesis, the block design and the bitstream need Vitis HLS and Vivado: not tested here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from zoo_fixtures import frozen, test_inputs

from qflow.export.hls.board import (
    EXIT_TOOLS_MISSING,
    PROCESSING_SYSTEMS,
    BoardError,
    BoardSpec,
    board_spec,
    check_project,
    write_board,
)
from qflow.graph import Emulator
from qflow.numerics import FixedType, Overflow, Rounding, to_codes
from qflow.numerics.corners import corner_inputs
from qflow.targets import all_targets, load_target

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

BOARD_TARGETS = [t for t in all_targets() if t.processing_system]
#: (model, io_type, samples): the CNN's C simulation is slow, so fewer samples
MODELS = {"io_parallel": ("digits-mlp", 1000), "io_stream": ("digits-cnn", 200)}
CORNERS = 64


def _hls_project(graph, target, io_type: str, out: Path) -> None:
    """hls4ml firmware for ``graph`` in ``out`` (written, not compiled)."""
    hls4ml = pytest.importorskip("hls4ml")
    import onnx

    from qflow.export.hls.onnx_graph import hls_graph

    h = hls_graph(graph)
    onnx.save(h.model, out.parent / "model.hls.onnx")
    config = {"Model": {"Precision": "fixed<16,6>", "ReuseFactor": 1, "Strategy": "Latency"},
              "LayerName": {k: {"Precision": v} for k, v in h.precisions.items()}}
    model = hls4ml.converters.convert_from_onnx_model(
        str(out.parent / "model.hls.onnx"), output_dir=str(out), project_name="qflow_model",
        backend="Vitis", part=target.part, clock_period=target.clock_period_ns,
        io_type=io_type, hls_config=config)
    model.write()


def _compile(sources: list[Path], include: Path, binary: Path,
             defines: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """Start compiling each source to an object file; _link finishes the job."""
    flags = ["g++", "-std=c++14", "-O1", f"-I{include}", f"-I{include / 'ap_types'}",
             *defines]
    return [subprocess.Popen([*flags, "-c", str(s), "-o", str(binary.parent / f"{s.stem}.o")],
                             stderr=subprocess.PIPE, text=True) for s in sources]


def _link(jobs: list[subprocess.Popen], sources: list[Path], binary: Path) -> None:
    for job in jobs:
        _, err = job.communicate()
        assert job.returncode == 0, err[-3000:]
    objects = [str(binary.parent / f"{s.stem}.o") for s in sources]
    subprocess.run(["g++", *objects, "-o", str(binary)], check=True)


def _csim(binary: Path, rows: np.ndarray, n_outputs: int) -> np.ndarray:
    """Output codes of the compiled testbench for channels-last input code rows."""
    codes = binary.parent / "codes.txt"
    np.savetxt(codes, rows, fmt="%d")
    run = subprocess.run([str(binary), str(codes)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return np.loadtxt(run.stdout.splitlines(), dtype=np.int64, ndmin=2).reshape(-1, n_outputs)


def _channels_last(codes: np.ndarray) -> np.ndarray:
    if codes.ndim == 4:
        codes = codes.transpose(0, 2, 3, 1)
    return codes.reshape(len(codes), -1)


@pytest.fixture(scope="module")
def boards(tmp_path_factory):
    """io_type -> (graph, board dir, C-simulation binary, BoardSpec). Both models'
    firmware compiles at once (the compiler is the slow part)."""
    target = load_target("ultra96")
    built, jobs = {}, {}
    for io_type, (model_name, _) in MODELS.items():
        _, graph = frozen(model_name, "8bit")
        root = tmp_path_factory.mktemp(io_type)
        _hls_project(graph, target, io_type, root / "hls")
        spec = board_spec(graph, target, io_type)
        board = root / "board"
        write_board(board, target, spec)
        firmware = root / "hls" / "firmware"
        sources = [board / "qflow_axi.cpp", board / "qflow_axi_test.cpp",
                   firmware / "qflow_model.cpp"]
        binary = board / "qflow_axi_csim"
        jobs[io_type] = (sources, _compile(sources, firmware, binary,
                                           (f'-DWEIGHTS_DIR="{firmware / "weights"}"',)))
        built[io_type] = (graph, board, binary, spec)
    for io_type, (sources, started) in jobs.items():
        _link(started, sources, built[io_type][2])
    return built


@pytest.mark.parametrize("io_type", list(MODELS))
def test_wrapper_csim_equals_emulator(boards, io_type):
    graph, _, binary, spec = boards[io_type]
    model_name, samples = MODELS[io_type]
    x = test_inputs(model_name, samples)
    x = np.concatenate([x, corner_inputs(graph.input_type, x.shape[1:], CORNERS)])
    codes = to_codes(x, graph.input_type)
    expected = Emulator(graph).run_codes(codes).reshape(len(codes), -1)
    got = _csim(binary, _channels_last(codes), spec.n_outputs)
    assert got.shape == expected.shape
    mismatches = int((got != expected).any(axis=1).sum())
    assert mismatches == 0, f"{mismatches} of {len(codes)} samples differ ({io_type})"


def test_written_files(boards):
    target = load_target("ultra96")
    board = boards["io_parallel"][1]
    written = ("qflow_axi.h", "qflow_axi.cpp", "qflow_axi_test.cpp", "build_hls.tcl",
               "block_design.tcl", "build.sh", "driver.py", "README.md")
    for name in written:
        assert (board / name).is_file(), name
    hls_tcl = (board / "build_hls.tcl").read_text()
    assert f"set_part {{{target.part}}}" in hls_tcl
    assert "create_clock -period 10 " in hls_tcl and "set_top qflow_axi" in hls_tcl
    assert "export_design -format ip_catalog" in hls_tcl
    bd_tcl = (board / "block_design.tcl").read_text()
    assert target.part in bd_tcl and target.board_part in bd_tcl
    assert f"set clock_mhz {target.clock_mhz:g}" in bd_tcl
    for needed in ("zynq_ultra_ps_e", "axi_dma", "c_include_sg {0}", "validate_bd_design",
                   "write_bitstream", "qflow.bit", "qflow.hwh"):
        assert needed in bd_tcl, needed
    wrapper = (board / "qflow_axi.cpp").read_text()
    assert "INTERFACE axis port=in_stream" in wrapper and "s_axilite port=return" in wrapper
    assert not any("@@" in (board / name).read_text() for name in written)


def test_build_script_stops_without_vendor_tools(boards):
    board = boards["io_parallel"][1]
    script = board / "build.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    run = subprocess.run([str(script)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(board)})
    assert run.returncode == EXIT_TOOLS_MISSING
    assert "Vitis HLS / Vivado not found on PATH" in run.stderr
    assert not (board / "qflow.bit").exists()


def _driver(board: Path):
    spec = importlib.util.spec_from_file_location(f"qflow_driver_{board.parent.name}",
                                                  board / "driver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_driver_cast_equals_qflow(boards, monkeypatch):
    graph, board, _, _ = boards["io_parallel"]
    monkeypatch.setitem(sys.modules, "pynq", None)  # any import of pynq fails
    driver = _driver(board)
    t = graph.input_type
    rng = np.random.default_rng(1)
    shape = (500, *graph.tensors[graph.input].shape)
    random = rng.uniform(t.min_value - 1, t.max_value + 1, shape)
    ties = (rng.integers(t.qmin - 4, t.qmax + 4, shape) + 0.5) * t.lsb
    for x in (random, ties, corner_inputs(t, shape[1:], 64)):
        assert np.array_equal(driver.input_codes(x), to_codes(x, t))
    codes = to_codes(random, t)
    assert np.array_equal(driver.hardware_order(codes), _channels_last(codes))


@pytest.mark.parametrize("rounding", list(Rounding))
def test_driver_cast_every_mode(boards, rounding):
    driver = _driver(boards["io_parallel"][1])
    rng = np.random.default_rng(2)
    for overflow in Overflow:
        for signed, integer, fractional in ((True, 3, 4), (False, 2, 5), (True, 9, -3),
                                            (True, 0, 1), (False, 20, 12)):
            t = FixedType(signed=signed, integer=integer, fractional=fractional,
                          rounding=rounding, overflow=overflow)
            span = 4 * max(abs(t.min_value), t.max_value) + 1
            x = np.concatenate([
                rng.uniform(-span, span, 2000),
                (rng.integers(-4 * t.qmax - 8, 4 * t.qmax + 8, 2000) + 0.5) * t.lsb,
                [0.0, 1e-300, -1e-300, 1e30, -1e30, t.max_value, t.min_value]])
            got = driver.to_codes(x, signed=signed, integer=integer, fractional=fractional,
                                  rounding=str(rounding), overflow=str(overflow))
            assert np.array_equal(got, to_codes(x, t)), t.to_ap()


class _FakeChannel:
    def __init__(self, dma, direction):
        self.dma, self.direction = dma, direction

    def transfer(self, buffer, nbytes):
        self.dma.pending[self.direction] = (buffer, nbytes)

    def wait(self):
        if self.direction == "recv":
            self.dma.complete()


class _FakeBuffer(np.ndarray):
    def flush(self):
        pass

    def invalidate(self):
        pass

    def freebuffer(self):
        pass


def _fake_pynq(binary: Path, n_outputs: int):
    """A pynq module whose DMA runs the C simulation: tests the driver's control flow."""
    registers = {}

    class Dma:
        def __init__(self):
            self.pending = {}
            self.sendchannel, self.recvchannel = _FakeChannel(self, "send"), _FakeChannel(
                self, "recv")

        def complete(self):
            (sent, sent_bytes), (received, _) = self.pending["send"], self.pending["recv"]
            assert registers[0x00] == 1, "the IP was not started"
            rows = np.asarray(sent[:sent_bytes // sent.itemsize]).reshape(
                registers[0x10], -1)
            out = _csim(binary, rows, n_outputs)
            received[:out.size] = out.reshape(-1)

    class Ip:
        def write(self, offset, value):
            registers[offset] = value

        def read(self, offset):
            return 0x4  # idle

    class Overlay:
        def __init__(self, bitfile, download=True):
            self.axi_dma_0, self.qflow_axi_0 = Dma(), Ip()

    def allocate(shape, dtype):
        return np.zeros(shape, dtype).view(_FakeBuffer)

    module = type(sys)("pynq")
    module.Overlay, module.allocate = Overlay, allocate
    return module


def test_driver_runs_batches_through_the_dma(boards, monkeypatch):
    graph, board, binary, spec = boards["io_parallel"]
    monkeypatch.setitem(sys.modules, "pynq", _fake_pynq(binary, spec.n_outputs))
    driver = _driver(board)
    accel = driver.QflowOverlay(board / "qflow.bit", batch=40)
    x = test_inputs("digits-mlp", 100)
    expected = Emulator(graph).run(x)
    assert np.array_equal(accel.run(x), expected)  # three DMA transfers: 40, 40, 20
    accel.close()


def _ap_types() -> str:
    """hls4ml's copy of the open-source ap_types headers."""
    hls4ml = pytest.importorskip("hls4ml")
    return str(Path(hls4ml.__file__).parent / "templates" / "vivado" / "ap_types")


def test_wide_codes_travel_in_64_bit_words(tmp_path):
    """Types wider than 32 bits use 64-bit stream words; negative codes sign-extend."""
    firmware = tmp_path / "hls" / "firmware"
    shutil.copytree(_ap_types(), firmware / "ap_types")
    in_t, out_t = FixedType.parse("ap_fixed<40,12>"), FixedType.parse("ap_fixed<41,13>")
    (firmware / "defines.h").write_text(
        f'#include "ap_fixed.h"\ntypedef {in_t.to_ap()} input_t;\n'
        f"typedef {out_t.to_ap()} result_t;\n")
    (firmware / "qflow_model.h").write_text(
        '#include "hls_stream.h"\n#include "defines.h"\n'
        "void qflow_model(input_t x[4], result_t y[2]);\n")
    (firmware / "qflow_model.cpp").write_text(  # y = the sums of the pairs
        '#include "qflow_model.h"\n'
        "void qflow_model(input_t x[4], result_t y[2]) {\n"
        "    for (int j = 0; j < 2; j++) y[j] = x[2 * j] + x[2 * j + 1];\n}\n")
    target = load_target("zcu104")
    spec = BoardSpec(project_name="qflow_model", hls_dir="../hls", io_type="io_parallel",
                     n_inputs=4, n_outputs=2, input_type=in_t, output_type=out_t,
                     stream_in_elements=1, stream_out_elements=1,
                     clock_mhz=target.clock_mhz, part=target.part,
                     board_part=target.board_part)
    board = tmp_path / "board"
    write_board(board, target, spec)
    assert "c_m_axis_mm2s_tdata_width {64}" in (board / "block_design.tcl").read_text()
    sources = [board / "qflow_axi.cpp", board / "qflow_axi_test.cpp",
               firmware / "qflow_model.cpp"]
    _link(_compile(sources, firmware, board / "csim"), sources, board / "csim")
    rng = np.random.default_rng(3)
    codes = rng.integers(in_t.qmin, in_t.qmax + 1, (50, 4))
    expected = codes.reshape(50, 2, 2).sum(axis=2)
    assert np.array_equal(_csim(board / "csim", codes, 2), expected)


def test_spec_must_match_the_project(boards):
    _, board, _, spec = boards["io_stream"]
    check_project(spec, board.parent / "hls")
    wrong = dataclasses.replace(spec, stream_out_elements=1)
    with pytest.raises(BoardError, match="layout"):
        check_project(wrong, board.parent / "hls")
    narrower = dataclasses.replace(spec, input_type=FixedType.parse("ap_ufixed<6,0>"))
    with pytest.raises(BoardError, match="input type"):
        check_project(narrower, board.parent / "hls")


def test_every_processing_system_target_has_a_block_design(tmp_path):
    spec = BoardSpec(project_name="qflow_model", hls_dir="../hls", io_type="io_parallel",
                     n_inputs=4, n_outputs=2, input_type=FixedType.parse("ap_fixed<8,2>"),
                     output_type=FixedType.parse("ap_fixed<16,4>"), stream_in_elements=1,
                     stream_out_elements=1, clock_mhz=100, part="", board_part="")
    assert {t.name for t in BOARD_TARGETS} >= {"ultra96", "pynq-z2", "zcu104", "kv260"}
    for target in BOARD_TARGETS:
        ps = PROCESSING_SYSTEMS[target.processing_system["family"]]
        target_spec = dataclasses.replace(spec, part=target.part,
                                          board_part=target.board_part,
                                          clock_mhz=target.clock_mhz)
        write_board(tmp_path / target.name, target, target_spec)
        tcl = (tmp_path / target.name / "block_design.tcl").read_text()
        assert ps.vlnv in tcl and ps.memory_port in tcl and target.part in tcl
    with pytest.raises(BoardError, match="no processing system"):
        write_board(tmp_path / "cpu", load_target("cpu"), spec)
