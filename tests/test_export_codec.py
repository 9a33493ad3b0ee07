"""codec.py, the numpy-only input/output helper in every export: its ``to_codes`` equals
``qflow.numerics.to_codes`` bit for bit (every rounding x overflow mode, widths 1..32,
negative and over-wide integer bits, corner cases and random values), and real values fed
through it to the integer ONNX model (ONNX Runtime) and to the TVM build's ``run.py`` give
the emulator's output codes, on an input type other than RND_CONV/SAT."""

import ast
import itertools
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import qflow
from qflow.config import QFXConfig, QuantSpec
from qflow.export import EXPORT_FILE, QGRAPH_FILE, export
from qflow.export.codec import CODEC_FILE, TEMPLATE, render
from qflow.export.manifest import digest_files
from qflow.numerics import FixedType, Overflow, Rounding, corner_inputs, from_codes, to_codes
from qflow.targets import load_target

MODES = list(itertools.product(Rounding, Overflow))
#: (W, I) pairs: narrow, wide (up to 32 bits), I < 0, I = 0, I > W
SHAPES = [(1, 0), (1, 1), (2, -1), (3, 5), (5, 2), (8, 0), (8, -3), (12, 15),
          (16, 6), (24, 1), (31, -4), (32, 40), (32, 8)]


def _module(text: str, name: str = "codec_under_test") -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(text, CODEC_FILE, "exec"), module.__dict__)
    return module


def _codec(t: FixedType, out: FixedType | None = None) -> types.ModuleType:
    return _module(render(t, out or t))


def _inputs(t: FixedType, seed: int) -> np.ndarray:
    """Corner cases of ``t`` plus random values at many scales, signed zeros, huge and
    tiny values, and exact ties at every code near the range's ends."""
    rng = np.random.default_rng(seed)
    span = max(abs(t.min_value), t.max_value) + t.lsb
    ends = np.concatenate([np.arange(t.qmin - 3, t.qmin + 4), np.arange(t.qmax - 3, t.qmax + 4),
                           np.arange(-4, 5)]).astype(np.float64)
    special = [0.0, -0.0, 5e-324, -5e-324, 1e-310, -1e-310, 1e300, -1e300,
               np.finfo(np.float64).max, -np.finfo(np.float64).max, 2.0**62, -(2.0**62)]
    return np.concatenate([
        corner_inputs(t, (), count=400, seed=seed),
        np.ldexp(ends, -t.fractional), np.ldexp(ends + 0.5, -t.fractional),  # ties
        np.ldexp(ends + 0.25, -t.fractional), np.ldexp(ends - 0.25, -t.fractional),
        rng.uniform(-3 * span, 3 * span, 500),
        rng.standard_normal(200) * 2.0 ** rng.integers(-40, 60, 200),
        special,
    ])


@pytest.mark.parametrize(("rounding", "overflow"), MODES, ids=lambda m: str(m))
def test_to_codes_equals_numerics(rounding, overflow):
    mismatches, checked = 0, 0
    for (width, int_width), signed in itertools.product(SHAPES, (True, False)):
        t = FixedType.from_width(width, int_width, signed=signed, rounding=rounding,
                                 overflow=overflow)
        codec = _codec(t)
        expected = {"width": width, "int_width": int_width, "signed": signed,
                    "rounding": str(rounding), "overflow": str(overflow)}
        assert expected == codec.INPUT
        x = _inputs(t, seed=width * 97 + int_width + 7 * signed)
        with np.errstate(over="ignore"):  # scaling 1e308 by 2**f: inf, handled
            got, want = codec.to_codes(x), to_codes(x, t)
        assert got.dtype == np.int64
        mismatches += int(np.count_nonzero(got != want))
        checked += x.size
        # another array shape, a scalar and integer inputs take the same path
        assert np.array_equal(codec.to_codes(x[:60].reshape(3, 4, 5)),
                              want[:60].reshape(3, 4, 5))
        assert codec.to_codes(x[7]) == want[7]
        ints = np.arange(-5, 6)
        assert np.array_equal(codec.to_codes(ints), to_codes(ints, t))
        # output side: codes back to the exact real values
        assert np.array_equal(codec.from_codes(want), from_codes(want, t))
    assert checked > 20_000
    assert mismatches == 0, f"{mismatches} of {checked} codes differ from qflow.numerics"


def test_non_finite_and_bad_codes_are_refused():
    t = FixedType.parse("ap_fixed<8,2,AP_TRN,AP_WRAP>")
    codec = _codec(t)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="non-finite"):
            to_codes([1.0, bad], t)
        with pytest.raises(ValueError, match="non-finite"):
            codec.to_codes([1.0, bad])
    with pytest.raises(TypeError):
        codec.to_codes(np.array(["1.0"]))
    with pytest.raises(ValueError, match="outside the range"):
        codec.from_codes([0, 128])
    with pytest.raises(ValueError, match="integers"):
        codec.from_codes([0.5])
    assert codec.from_codes(np.array([-128.0, 127.0])).tolist() == [-2.0, 127 / 64]


def test_wide_output_codes_stay_exact_or_are_refused():
    wide = FixedType(signed=True, integer=30, fractional=30)  # 61 bits: beyond float64
    codec = _codec(FixedType.parse("ap_ufixed<8,0>"), wide)
    assert codec.from_codes([1 << 53, -(1 << 53)]).tolist() == [2.0**23, -(2.0**23)]
    with pytest.raises(ValueError, match="53 bits"):
        codec.from_codes([(1 << 53) + 1])


def test_template_is_numpy_only_and_the_types_block_is_replaced():
    t_in = FixedType.parse("ap_fixed<7,-2,AP_RND_MIN_INF,AP_SAT_ZERO>")
    t_out = FixedType.parse("ap_ufixed<20,12,AP_TRN_ZERO,AP_SAT_SYM>")
    text = render(t_in, t_out)
    imported = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported == {"__future__", "sys", "numpy"}
    assert "ap_fixed<7,-2,AP_RND_MIN_INF,AP_SAT_ZERO>" in text
    assert "ap_ufixed<20,12,AP_TRN_ZERO,AP_SAT_SYM>" in text
    codec = _module(text)
    assert codec.OUTPUT["int_width"] == 12 and codec.OUTPUT["signed"] is False
    # the template itself is the module, with an example type
    assert _module(TEMPLATE.read_text()).INPUT["width"] == 8


# -- an export, used as a user would ---------------------------------------------------------

INPUT_SPEC = QuantSpec(bits=8, rounding="TRN", overflow="WRAP", trainable=False)


def _tiny_graph():
    """A small MLP whose input type floors and wraps: not ``round(x * 2**f)`` saturated."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(12, 16))
    model.add_module("relu1", nn.ReLU())
    model.add_module("fc2", nn.Linear(16, 5))
    qflow.quantize_(model, QFXConfig(input=INPUT_SPEC))
    x = torch.rand(64, 12) * 4 - 2
    return qflow.freeze(model, x)


def _real_inputs(graph) -> np.ndarray:
    """Calibration-like data, data past the range (that wraps) and the type's corners."""
    rng = np.random.default_rng(1)
    t = graph.input_type
    return np.concatenate([rng.uniform(-2, 2, (300, 12)), rng.uniform(-6, 6, (200, 12)),
                           corner_inputs(t, (12,), count=300, seed=2)])


def _mismatching_samples(got, want) -> int:
    return int(np.count_nonzero((got != want).reshape(len(want), -1).any(axis=1)))


def _naive_codes(x, t: FixedType) -> np.ndarray:
    """What the old documentation said the codes were: round(x * 2**f), saturated."""
    return np.clip(np.round(np.ldexp(x, t.fractional)), t.qmin, t.qmax).astype(np.int64)


def _load_codec(directory):
    return _module((directory / CODEC_FILE).read_text(encoding="utf-8"), "codec_export")


def _write_export_json(out, graph, artifacts):
    """What `qflow export` writes last: export.json with the digests of every file."""
    graph.save(out / QGRAPH_FILE)
    info = {"artifacts": artifacts, "files": digest_files(out)}
    (out / EXPORT_FILE).write_text(json.dumps(info))
    return info


def test_onnx_export_codec_feeds_onnx_runtime_exactly(tmp_path):
    import onnxruntime as ort

    graph = _tiny_graph()
    t = graph.input_type
    assert (t.rounding, t.overflow) == (Rounding.TRN, Overflow.WRAP)
    out = tmp_path / "export-onnx"
    out.mkdir()
    artifacts = export(graph, out, load_target("onnx"))
    assert CODEC_FILE not in artifacts.values()  # a plain file, not an artifact kind
    info = _write_export_json(out, graph, artifacts)
    assert CODEC_FILE in info["files"]  # the digests cover it

    codec = _load_codec(out)
    x = _real_inputs(graph)
    codes = codec.to_codes(x)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(out / "model.int.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: codes})
    want = qflow.emulate(graph, x)
    assert _mismatching_samples(got, want) == 0
    assert np.array_equal(codec.from_codes(got), from_codes(want, graph.output_type))
    # the old recipe (round, saturate) is wrong for this type: the test can tell
    naive = _naive_codes(x, t)
    assert _mismatching_samples(naive, codes) > 100
    (naive_out,) = session.run(None, {session.get_inputs()[0].name: naive})
    assert _mismatching_samples(naive_out, want) > 0


def test_onnx_export_codec_command_line(tmp_path):
    graph = _tiny_graph()
    out = tmp_path / "export"
    out.mkdir()
    export(graph, out, load_target("onnx"))
    x = _real_inputs(graph)
    np.save(tmp_path / "x.npy", x)
    # run without qflow importable: the file must stand alone
    blocked = ("import runpy, sys; sys.modules['qflow'] = None; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    subprocess.run([sys.executable, "-c", blocked, str(out / CODEC_FILE), "to-codes",
                    str(tmp_path / "x.npy"), str(tmp_path / "codes.npy")],
                   check=True, capture_output=True, cwd=tmp_path)
    codes = np.load(tmp_path / "codes.npy")
    assert codes.dtype == np.int64
    assert _mismatching_samples(codes, to_codes(x, graph.input_type)) == 0
    np.save(tmp_path / "bad.npy", np.array([np.nan]))
    bad = subprocess.run([sys.executable, str(out / CODEC_FILE), "to-codes",
                          str(tmp_path / "bad.npy"), str(tmp_path / "never.npy")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "NaN" in bad.stderr
    assert not (tmp_path / "never.npy").exists()


@pytest.mark.slow
def test_tvm_cpu_export_run_py_with_codec_codes(tmp_path):
    graph = _tiny_graph()
    out = tmp_path / "export-cpu"
    out.mkdir()
    artifacts = export(graph, out, load_target("cpu"))
    assert artifacts["tvm"] == "tvm"
    info = _write_export_json(out, graph, artifacts)
    assert CODEC_FILE in info["files"]

    x = _real_inputs(graph)
    np.save(tmp_path / "x.npy", x)
    for argv in ([str(out / CODEC_FILE), "to-codes", "x.npy", "in.npy"],
                 [str(out / "tvm" / "run.py"), "in.npy", "out.npy"],
                 [str(out / CODEC_FILE), "from-codes", "out.npy", "y.npy"]):
        subprocess.run([sys.executable, *argv], check=True, capture_output=True, cwd=tmp_path)
    got = np.load(tmp_path / "out.npy")
    want = qflow.emulate(graph, x)
    assert _mismatching_samples(got, want) == 0
    assert np.array_equal(np.load(tmp_path / "y.npy"), from_codes(want, graph.output_type))
