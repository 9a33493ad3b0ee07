"""Board integration for FPGA targets with a processing system: the files that turn an
hls4ml project into a bitstream and a PYNQ driver.

:func:`write_board` writes, into a ``board/`` folder beside the hls4ml project:

================== =========================================================================
file               what
================== =========================================================================
qflow_axi.h/.cpp   HLS top ``qflow_axi``: the hls4ml top behind AXI-Stream ports, exchanging
                   integer codes (one per 32-bit word, 64-bit when a type is wider), so a
                   transfer is exact; ``n_samples`` and start/done over AXI-Lite
qflow_axi_test.cpp C-simulation testbench (codes in from a file, codes out on stdout)
build_hls.tcl      Vitis HLS: synthesis and export to the IP catalog
block_design.tcl   Vivado: processing system, AXI DMA, ``qflow_axi``, bitstream, then
                   ``qflow.bit`` / ``qflow.hwh`` (PYNQ's overlay naming)
build.sh           runs both when the tools are on PATH; exits :data:`EXIT_TOOLS_MISSING`
                   with a message otherwise
driver.py          PYNQ driver ``QflowOverlay`` (``run`` / ``run_codes``), importable
                   without pynq
README.md          the files, the commands, and what is and is not checked
================== =========================================================================

The templates are plain text files in ``board_templates/`` with ``@@{name}`` fields
(C++, Tcl and Python all use braces and dollar signs, so neither ``str.format`` nor the
default ``string.Template`` delimiter fits). Processing systems are looked up by the
target's ``processing_system.family`` in :data:`PROCESSING_SYSTEMS`.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from math import prod
from pathlib import Path

from qflow.errors import QflowError
from qflow.numerics import FixedType
from qflow.targets import IO_TYPES, TargetSpec

TEMPLATES_DIR = Path(__file__).resolve().parent / "board_templates"
#: build.sh's exit status when Vitis HLS or Vivado is not on PATH
EXIT_TOOLS_MISSING = 3
#: widths up to this many bits travel in 32-bit stream words, wider ones in 64-bit words
NARROW_WORD_BITS = 32


class BoardError(QflowError):
    """A target or model that the board files cannot serve."""


@dataclass(frozen=True)
class ProcessingSystem:
    """How a processing-system family appears in a Vivado block design."""

    name: str
    vlnv: str  # IP catalog prefix (vendor:library:name), the newest version is used
    rule: str  # apply_bd_automation rule that applies the board preset
    automation: str  # its -config list (Tcl; $apply_preset is 1 with board files, else 0)
    config: str  # CONFIG properties: one AXI master, one HP slave, the fabric clock
    master: str  # AXI master port for the AXI-Lite control registers
    memory_port: str  # high-performance slave port the DMA reaches memory through
    clock: str  # fabric clock pin


PROCESSING_SYSTEMS: dict[str, ProcessingSystem] = {
    "zynq_ultrascale": ProcessingSystem(
        name="Zynq UltraScale+ MPSoC",
        vlnv="xilinx.com:ip:zynq_ultra_ps_e",
        rule="xilinx.com:bd_rule:zynq_ultra_ps_e",
        automation="apply_board_preset $apply_preset",
        # HPM0_FPD for control only (an enabled master left open fails validation),
        # S_AXI_HP0_FPD (GP2) for the DMA, pl_clk0 at the target clock
        config="CONFIG.PSU__USE__M_AXI_GP0 {1} CONFIG.PSU__USE__M_AXI_GP1 {0} "
               "CONFIG.PSU__USE__M_AXI_GP2 {0} CONFIG.PSU__USE__S_AXI_GP2 {1} "
               "CONFIG.PSU__CRL_APB__PL0_REF_CTRL__FREQMHZ $clock_mhz",
        master="M_AXI_HPM0_FPD",
        memory_port="S_AXI_HP0_FPD",
        clock="pl_clk0",
    ),
    "zynq": ProcessingSystem(
        name="Zynq-7000",
        vlnv="xilinx.com:ip:processing_system7",
        rule="xilinx.com:bd_rule:processing_system7",
        automation='make_external {FIXED_IO, DDR} apply_board_preset $apply_preset '
                   'Master Disable Slave Disable',
        config="CONFIG.PCW_USE_M_AXI_GP0 {1} CONFIG.PCW_USE_S_AXI_HP0 {1} "
               "CONFIG.PCW_FPGA0_PERIPHERAL_FREQMHZ $clock_mhz",
        master="M_AXI_GP0",
        memory_port="S_AXI_HP0",
        clock="FCLK_CLK0",
    ),
}

#: the wrapper body per hls4ml io_type
WRAPPERS = {"io_parallel": "qflow_axi_parallel.cpp", "io_stream": "qflow_axi_stream.cpp"}
#: board file -> template (the wrapper is added per io_type)
TEMPLATES = {
    "qflow_axi.h": "qflow_axi.h",
    "qflow_axi_test.cpp": "qflow_axi_test.cpp",
    "build_hls.tcl": "build_hls.tcl",
    "block_design.tcl": "block_design.tcl",
    "build.sh": "build.sh",
    "driver.py": "driver.py",
    "README.md": "README.md",
}
EXECUTABLES = ("build.sh",)


class _Template(string.Template):
    delimiter = "@@"


@dataclass(frozen=True)
class BoardSpec:
    """What the board files need to know about the hls4ml project and the model.

    Element counts are flattened in hls4ml's channels-last order. For ``io_stream`` a
    stream word of the hls4ml top holds ``stream_in_elements`` (``stream_out_elements``)
    values, its channels; for ``io_parallel`` these are 1.
    """

    project_name: str
    hls_dir: str  # the hls4ml project, relative to the board folder
    io_type: str
    n_inputs: int
    n_outputs: int
    input_type: FixedType
    output_type: FixedType
    stream_in_elements: int
    stream_out_elements: int
    clock_mhz: float
    part: str
    board_part: str
    #: per-sample shapes as the QGraph sees them (channels first), for the driver
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.io_type not in IO_TYPES:
            raise BoardError(f"io_type must be one of {', '.join(IO_TYPES)}, "
                             f"not {self.io_type!r}")
        for n, per_word, side in ((self.n_inputs, self.stream_in_elements, "input"),
                                  (self.n_outputs, self.stream_out_elements, "output")):
            if n < 1 or per_word < 1 or n % per_word:
                raise BoardError(f"{side}: {n} values do not split into stream words of "
                                 f"{per_word}")
        for shape, n, side in ((self.input_shape, self.n_inputs, "input"),
                               (self.output_shape, self.n_outputs, "output")):
            if shape and prod(shape) != n:
                raise BoardError(f"{side} shape {shape} does not hold {n} values")

    @property
    def in_word_bits(self) -> int:
        return word_bits(self.input_type)

    @property
    def out_word_bits(self) -> int:
        return word_bits(self.output_type)


def word_bits(t: FixedType) -> int:
    """Bits of the stream word that carries one code of ``t``."""
    return NARROW_WORD_BITS if t.width <= NARROW_WORD_BITS else 2 * NARROW_WORD_BITS


def board_spec(graph, target: TargetSpec, io_type: str | None = None, *,
               project_name: str = "qflow_model", hls_dir: str = "../hls") -> BoardSpec:
    """The :class:`BoardSpec` of a QGraph exported to ``target`` (io_type defaults to the
    target's)."""
    in_shape = tuple(graph.tensors[graph.input].shape)
    out_shape = tuple(graph.tensors[graph.output].shape)
    io_type = io_type or target.defaults.get("io_type", "io_parallel")
    streamed = io_type == "io_stream"

    def per_word(shape: tuple[int, ...]) -> int:
        # channels last: a word holds the channels of one pixel (the whole vector if flat)
        channels = shape[0] if len(shape) == 3 else shape[-1]
        return channels if streamed else 1

    return BoardSpec(
        project_name=project_name, hls_dir=hls_dir, io_type=io_type,
        n_inputs=prod(in_shape), n_outputs=prod(out_shape),
        input_type=graph.input_type, output_type=graph.output_type,
        stream_in_elements=per_word(in_shape), stream_out_elements=per_word(out_shape),
        clock_mhz=target.clock_mhz, part=target.part, board_part=target.board_part,
        input_shape=in_shape, output_shape=out_shape)


# ---- reading the hls4ml project back: the board files must match its top function

_TYPEDEF = r"typedef\s+(.+?)\s+{name}\s*;"
_STREAM_ARRAY = re.compile(r"nnet::array<\s*(.+)\s*,\s*([\d\s*]+)>")


def _count(expression: str) -> int:
    """hls4ml writes sizes as products such as ``8*8*1``."""
    return prod(int(f) for f in expression.replace(" ", "").split("*"))


def project_io(hls_project: Path, project_name: str = "qflow_model") -> dict:
    """The input and output of an hls4ml project's top function, read from
    ``firmware/defines.h`` and ``firmware/<project>.h``: for each of ``input`` and
    ``output`` the element type, the element count and the values per stream word
    (1 for io_parallel)."""
    firmware = Path(hls_project) / "firmware"
    defines = (firmware / "defines.h").read_text(encoding="utf-8")
    header = (firmware / f"{project_name}.h").read_text(encoding="utf-8")
    found = {}
    for side, name in (("input", "input_t"), ("output", "result_t")):
        match = re.search(_TYPEDEF.format(name=name), defines)
        if match is None:
            raise BoardError(f"{firmware / 'defines.h'}: no typedef of {name}")
        stream = _STREAM_ARRAY.fullmatch(match.group(1).strip())
        if stream:
            found[side] = {"type": FixedType.parse(stream.group(1)), "per_word": _count(
                stream.group(2)), "count": None}
            continue
        size = re.search(rf"\b{name}\s+\w+\s*\[([\d\s*]+)\]", header)
        if size is None:
            raise BoardError(f"{firmware / (project_name + '.h')}: no array of {name}")
        found[side] = {"type": FixedType.parse(match.group(1)), "per_word": 1,
                       "count": _count(size.group(1))}
    return found


def check_project(spec: BoardSpec, hls_project: Path) -> None:
    """Raise :class:`BoardError` unless the hls4ml project's top function has the types
    and sizes ``spec`` promises (a code is only exact in the type it was made for)."""
    io = project_io(hls_project, spec.project_name)
    for side, t, n, per_word in (
            ("input", spec.input_type, spec.n_inputs, spec.stream_in_elements),
            ("output", spec.output_type, spec.n_outputs, spec.stream_out_elements)):
        got = io[side]
        same_codes = (got["type"].signed, got["type"].width, got["type"].fractional) == (
            t.signed, t.width, t.fractional)
        if not same_codes:
            raise BoardError(f"hls4ml {side} type {got['type'].to_ap()} differs from the "
                             f"model's {t.to_ap()}")
        expected_per_word = per_word if spec.io_type == "io_stream" else 1
        if got["per_word"] != expected_per_word or got["count"] not in (None, n):
            raise BoardError(f"hls4ml {side} layout (count {got['count']}, "
                             f"{got['per_word']} per word) differs from {n} values, "
                             f"{expected_per_word} per word ({spec.io_type})")


# ---- writing the files

def _code_types(t: FixedType, bits: int) -> dict[str, str]:
    signed = "int" if t.signed else "uint"
    return {"code": f"ap_{signed}<{t.width}>", "data": f"ap_{signed}<{bits}>",
            "axis": "ap_axis" if t.signed else "ap_axiu",
            "dtype": f"{signed}{bits}"}


def _type_literal(t: FixedType) -> str:
    """The keyword arguments of the driver's ``to_codes`` for ``t``, as Python source."""
    return (f"dict(\n    signed={t.signed}, integer={t.integer}, fractional={t.fractional}, "
            f'rounding="{t.rounding}", overflow="{t.overflow}")')


def _fields(target: TargetSpec, spec: BoardSpec) -> dict[str, str]:
    ps = PROCESSING_SYSTEMS[target.processing_system["family"]]
    codes_in = _code_types(spec.input_type, spec.in_word_bits)
    codes_out = _code_types(spec.output_type, spec.out_word_bits)
    streamed = spec.io_type == "io_stream"
    fields = {
        "target": target.name, "description": target.description,
        "part": spec.part, "board_part": spec.board_part,
        "clock_mhz": f"{spec.clock_mhz:g}", "clock_period_ns": f"{1000 / spec.clock_mhz:g}",
        "project_name": spec.project_name, "hls_dir": spec.hls_dir, "io_type": spec.io_type,
        "n_inputs": spec.n_inputs, "n_outputs": spec.n_outputs,
        "stream_in_elements": spec.stream_in_elements,
        "stream_out_elements": spec.stream_out_elements,
        "input_ap": spec.input_type.to_ap(), "output_ap": spec.output_type.to_ap(),
        "input_element": "input_t::value_type" if streamed else "input_t",
        "result_element": "result_t::value_type" if streamed else "result_t",
        "in_word_bits": spec.in_word_bits, "out_word_bits": spec.out_word_bits,
        "in_code": codes_in["code"], "out_code": codes_out["code"],
        "in_data": codes_in["data"], "out_data": codes_out["data"],
        "in_axis": codes_in["axis"], "out_axis": codes_out["axis"],
        "in_word_dtype": codes_in["dtype"], "out_word_dtype": codes_out["dtype"],
        "input_type": _type_literal(spec.input_type),
        "output_type": _type_literal(spec.output_type),
        "input_shape": repr(spec.input_shape or (spec.n_inputs,)),
        "output_shape": repr(spec.output_shape or (spec.n_outputs,)),
        "ps_name": ps.name, "ps_vlnv": ps.vlnv, "ps_rule": ps.rule,
        "ps_automation": ps.automation, "ps_config": ps.config, "ps_master": ps.master,
        "ps_memory_port": ps.memory_port, "ps_clock": ps.clock,
    }
    return {k: str(v) for k, v in fields.items()}


def render(template: str, fields: dict[str, str]) -> str:
    """A template from ``board_templates/`` with its ``@@{name}`` fields filled in."""
    text = (TEMPLATES_DIR / f"{template}.in").read_text(encoding="utf-8")
    return _Template(text).substitute(fields)


def write_board(board_dir: Path, target: TargetSpec, spec: BoardSpec) -> list[str]:
    """Write the board files for ``target`` into ``board_dir``; return their names.

    The target must have a ``processing_system`` of a family in
    :data:`PROCESSING_SYSTEMS`. When the hls4ml project exists at ``board_dir /
    spec.hls_dir``, its top function is checked against ``spec`` first.
    """
    system = target.processing_system
    if target.kind != "fpga" or not system:
        raise BoardError(f"target {target.name!r} has no processing system: board files "
                         "(DMA, block design, PYNQ driver) need one")
    if system.get("family") not in PROCESSING_SYSTEMS:
        raise BoardError(f"target {target.name!r}: unknown processing-system family "
                         f"{system.get('family')!r} (known: {', '.join(PROCESSING_SYSTEMS)})")
    board_dir = Path(board_dir)
    hls_project = board_dir / spec.hls_dir
    if (hls_project / "firmware" / "defines.h").is_file():
        check_project(spec, hls_project)
    fields = _fields(target, spec)
    files = {"qflow_axi.cpp": WRAPPERS[spec.io_type], **TEMPLATES}
    board_dir.mkdir(parents=True, exist_ok=True)
    for name, template in files.items():
        path = board_dir / name
        path.write_text(render(template, fields), encoding="utf-8")
        if name in EXECUTABLES:
            path.chmod(0o755)
    return sorted(files)
