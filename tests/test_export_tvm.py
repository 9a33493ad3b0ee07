"""TVM export: the host build equals the emulator bit for bit on every zoo model (test
data + corner cases, through ``qflow verify``'s runner); the arm64 build is aarch64
code; the CUDA build is a module that verify reports as not run without a GPU; what
cannot be compiled exactly, or without TVM, is refused with a one-line QflowError."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from zoo_fixtures import MODEL_NAMES, TRANSFORMER_MODELS, frozen

pytest.importorskip("tvm", reason="TVM is not installed (pip install qflow[tvm])")

from qflow.errors import QflowError
from qflow.export import EXPORT_FILE, QGRAPH_FILE, ExportOptions, export
from qflow.export.manifest import digest_files
from qflow.export.tvm import frontend, run_tvm
from qflow.export.tvm.build import tvm_target
from qflow.targets import load_target
from qflow.verify.check import verify_directory
from qflow.zoo import MODELS

ELF_MACHINES = {0x3E: "x86-64", 0xB7: "ARM aarch64"}  # ELF e_machine -> `file`'s wording
TEST_SAMPLES, CORNERS = 2000, 256


def _export_dir(root, model_name: str, target, messages: list | None = None):
    """What `qflow export` writes (without a run directory: no QAT model to compare)."""
    _, graph = frozen(model_name, "8bit")
    out = root / f"{model_name}-{target.name}"
    out.mkdir()
    graph.save(out / QGRAPH_FILE)
    progress = messages.append if messages is not None else (lambda msg: None)
    artifacts = export(graph, out, target, ExportOptions(progress=progress))
    info = {"target": target.name, "data": MODELS[model_name].data, "qgraph": QGRAPH_FILE,
            "artifacts": artifacts, "files": digest_files(out)}
    (out / EXPORT_FILE).write_text(json.dumps(info))
    return out


def _results(report) -> dict:
    return {r["artifact"]: r for r in report["results"]}


def _elf_machine(path) -> str:
    """`file`'s description of an ELF file, else its machine from the ELF header."""
    if shutil.which("file"):
        return subprocess.run(["file", "-b", str(path)], capture_output=True, text=True,
                              check=True).stdout
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return ELF_MACHINES.get(int.from_bytes(header[18:20], "little"), "unknown")


# -- host build: bit-exact on every zoo model ------------------------------------------------
@pytest.fixture(scope="module", params=MODEL_NAMES)
def cpu_export(request, tmp_path_factory):
    """Each zoo model exported once for the host CPU."""
    return _export_dir(tmp_path_factory.mktemp("tvm-cpu"), request.param, load_target("cpu"))


def test_cpu_build_equals_emulator(cpu_export):
    info = json.loads((cpu_export / EXPORT_FILE).read_text())
    qonnx = {} if cpu_export.name.removesuffix("-cpu") in TRANSFORMER_MODELS else {
        "qonnx": "model.qonnx.onnx"}  # QONNX has no transformer ops
    assert info["artifacts"] == {**qonnx, "int_onnx": "model.int.onnx", "tvm": "tvm"}
    build = json.loads((cpu_export / "tvm" / "build.json").read_text())
    assert build["device"] == "cpu" and build["library"] == "model.so"
    report = verify_directory(cpu_export, samples=TEST_SAMPLES, corners=CORNERS)
    assert report["corner_samples"] == CORNERS and report["test_samples"] > 0
    tvm_result = _results(report)["tvm"]
    assert tvm_result["note"] == ""
    assert tvm_result["samples"] == report["samples"]
    assert tvm_result["mismatching_samples"] == 0, tvm_result
    assert report["mismatching_samples"] == 0


def test_standalone_runner_needs_neither_qflow_nor_torch(cpu_export, tmp_path):
    """tvm/run.py's command line, with qflow and torch made unimportable (tvm_ffi imports
    torch when it can): one subprocess runs it on good input, then on a missing file."""
    from qflow.graph.emulator import Emulator

    _, graph = frozen(cpu_export.name.rsplit("-", 1)[0], "8bit")
    t, shape = graph.input_type, graph.tensors[graph.input].shape
    codes = np.random.default_rng(1).integers(t.qmin, t.qmax + 1, (7, *shape))
    np.save(tmp_path / "in.npy", codes)
    runner = cpu_export / "tvm" / "run.py"
    script = ("import runpy, sys\n"
              "class Block:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0] in ('qflow', 'torch'):\n"
              "            raise ModuleNotFoundError(name)\n"
              "sys.meta_path.insert(0, Block())\n"
              f"run = runpy.run_path({str(runner)!r})\n"
              "codes = [run['main'](['in.npy', 'out.npy']), run['main'](['nope.npy', 'x.npy'])]\n"
              "print('exit codes', codes)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "exit codes [0, 2]" in result.stdout and "nope.npy" in result.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), Emulator(graph).run_codes(codes))


# -- arm64: aarch64 code, linked when the cross toolchain is present -------------------------
@pytest.fixture(scope="module")
def arm64_export(tmp_path_factory):
    messages = []
    out = _export_dir(tmp_path_factory.mktemp("tvm-arm64"), "digits-mlp",
                      load_target("arm64"), messages)
    return out, messages


def test_arm64_build_is_aarch64(arm64_export):
    out, messages = arm64_export
    target = load_target("arm64")
    build = json.loads((out / "tvm" / "build.json").read_text())
    assert build["arch"] == "aarch64" and build["tvm_target"]["mcpu"] == "cortex-a53"
    if shutil.which(target.cross_compiler):
        assert build["library"] == "model.so"
        description = _elf_machine(out / "tvm" / "model.so")
        assert "ARM aarch64" in description
        assert "shared object" in description or not shutil.which("file")
    else:  # no toolchain: object files, and the note says how to link them
        assert build["library"] is None and build["objects"]
        for name in build["objects"]:
            assert "ARM aarch64" in _elf_machine(out / "tvm" / name)
        assert any("not found" in m and "-shared" in m for m in messages), messages


def test_arm64_without_cross_compiler_writes_aarch64_objects(tmp_path):
    """The no-toolchain path, whatever this machine has installed."""
    import dataclasses

    target = dataclasses.replace(load_target("arm64"), cross_compiler="no-such-aarch64-g++")
    messages = []
    out = _export_dir(tmp_path, "digits-mlp", target, messages)
    build = json.loads((out / "tvm" / "build.json").read_text())
    assert build["library"] is None and sorted(build["objects"]) == ["devc.o", "lib0.o"]
    for name in build["objects"]:
        description = _elf_machine(out / "tvm" / name)
        assert "ARM aarch64" in description
        assert "relocatable" in description or not shutil.which("file")
    assert any("no-such-aarch64-g++ not found" in m for m in messages), messages
    assert not (out / "tvm" / "model.tar").exists()
    report = verify_directory(out, samples=20, corners=4)
    assert _results(report)["tvm"]["note"].startswith("not run: cross-compiled for aarch64")


def _require_arm64_emulation() -> None:
    """Fail (or skip, where the set-up was told not to use apt-get) without qemu-user
    and the aarch64 Python that scripts/setup.sh prepares."""
    from qflow.export.tvm import qemu

    reason = qemu.missing()
    if reason and os.environ.get("QFLOW_NO_APT") == "1":
        pytest.skip(f"arm64 emulation not set up (QFLOW_NO_APT=1): {reason}")
    assert reason is None, f"arm64 emulation not set up: {reason} (scripts/setup.sh dev)"


def test_verify_runs_the_arm64_build_under_qemu(arm64_export):
    out, _ = arm64_export
    if not json.loads((out / "tvm" / "build.json").read_text())["library"]:
        pytest.fail("no aarch64 cross linker: scripts/setup.sh dev installs it as root")
    _require_arm64_emulation()
    report = verify_directory(out, samples=300, corners=64)
    rows = _results(report)
    assert "tvm" not in rows  # a linked aarch64 build is the artifact tvm_arm64
    result = rows["tvm_arm64"]
    assert (result["status"], result["mismatching_samples"]) == ("ok", 0), result
    assert result["samples"] == report["samples"] >= 364
    assert report["passed"]


def test_a_corpus_cnn_exported_for_arm64_verifies_under_qemu(tmp_path):
    # LeNet-5 as users write it (conv, max pool, x.view, F.relu), through the commands
    from qflow.cli.main import main

    _require_arm64_emulation()
    model = Path(__file__).parent / "corpus" / "lenet5.py"
    run, out = tmp_path / "run", tmp_path / "arm64"
    assert main(["quantize", "--model", f"{model}:build", "--epochs", "2", "--qat-epochs",
                 "1", "--quiet", "--out", str(run)]) == 0
    assert main(["export", str(run), "--target", "arm64", "--out", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    rows = _results(json.loads((out / "verify.json").read_text()))
    assert set(rows) >= {"QAT model (torch eval)", "int_onnx", "tvm_arm64"}
    assert (rows["tvm_arm64"]["status"], rows["tvm_arm64"]["mismatching_samples"]) == ("ok", 0)
    assert rows["tvm_arm64"]["samples"] > 500


# -- cuda: built here, run only with a GPU ---------------------------------------------------
def test_cuda_build_is_a_module_run_only_with_a_gpu(tmp_path):
    import tvm

    out = _export_dir(tmp_path, "digits-cnn", load_target("cuda"))
    build = json.loads((out / "tvm" / "build.json").read_text())
    assert build["device"] == "cuda" and (out / "tvm" / "model.so").stat().st_size > 0
    report = verify_directory(out, samples=50, corners=8)
    result = _results(report)["tvm"]
    if tvm.device("cuda", 0).exist:
        assert result["note"] == "" and result["mismatching_samples"] == 0, result
    else:
        assert result["note"].startswith("not run: no GPU"), result
        assert result["samples"] == 0


# -- refusals and bad input ------------------------------------------------------------------
def _model(op_type: str, elem_type: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("codes", elem_type, ["N", 4])
    y = helper.make_tensor_value_info("codes_out", elem_type, ["N", 4])
    inputs = ["codes", "codes"] if op_type in ("MatMul", "Div") else ["codes"]
    node = helper.make_node(op_type, inputs, ["codes_out"], name=f"layer/{op_type.lower()}")
    graph = helper.make_graph([node], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("op_type", "elem_type", "expect"), [
    ("Sin", TensorProto.DOUBLE, "no exact TVM lowering"),
    ("MatMul", TensorProto.FLOAT, "operand type FLOAT"),
    ("Div", TensorProto.DOUBLE, "operand type DOUBLE"),
])
def test_inexact_ops_are_refused_naming_node_and_op(op_type, elem_type, expect):
    with pytest.raises(QflowError) as info:
        frontend.check_exact(_model(op_type, elem_type))
    message = str(info.value)
    assert "\n" not in message and expect in message
    assert f"node 'layer/{op_type.lower()}' (op '{op_type}')" in message


def test_integer_ops_pass_the_exactness_check():
    frontend.check_exact(_model("Div", TensorProto.INT64))
    frontend.check_exact(_model("MatMul", TensorProto.INT64))


def test_float_ops_pass_only_where_the_exporter_proved_them_exact():
    proven = _model("MatMul", TensorProto.FLOAT)
    helper.set_model_props(proven, {frontend.ARITHMETICS_KEY: "float32,int64"})
    frontend.check_exact(proven)
    with pytest.raises(QflowError, match="operand type FLOAT"):  # no proof, no float
        frontend.check_exact(_model("MatMul", TensorProto.FLOAT))
    division = _model("Div", TensorProto.DOUBLE)  # a float division is never exact
    helper.set_model_props(division, {frontend.ARITHMETICS_KEY: "float64"})
    with pytest.raises(QflowError, match="operand type DOUBLE"):
        frontend.check_exact(division)


def test_cpu_build_schedules_every_convolution_and_dense_layer(tmp_path):
    """TVM's default CPU pipeline leaves conv2d and matmul as scalar loops; qflow's
    schedule tiles and vectorizes each (the builds above show the result exact)."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from qflow.export.int_onnx import export_int_onnx
    from qflow.export.tvm.schedule import CONV_BLOCK, DENSE_BLOCK, schedule_convolutions

    _, graph = frozen("digits-cnn", "8bit")
    model = onnx.load(export_int_onnx(graph, tmp_path / "m.onnx"))
    frontend.register_converters()
    module = from_onnx(model, dtype_dict={"codes": "int64"})
    with tvm.target.Target(tvm_target(load_target("cpu"))):
        fused = tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(),
            relax.transform.FuseTIR()])(module)

    def product_functions(mod):
        return {var.name_hint: func.script() for var, func in mod.functions.items()
                if isinstance(func, tvm.tirx.PrimFunc) and (
                    f'sblock("{CONV_BLOCK}' in func.script()
                    or f'sblock("{DENSE_BLOCK}' in func.script())}

    before = product_functions(fused)
    after = product_functions(schedule_convolutions(fused))
    assert len(before) == sum(n.op in ("conv2d", "dense") for n in graph.nodes) > 0
    assert all("T.vectorized" not in text for text in before.values())
    assert after.keys() == before.keys()
    assert all("T.vectorized" in text and '"local"' in text for text in after.values())


def test_fast_math_targets_are_refused():
    import dataclasses

    target = dataclasses.replace(load_target("cpu"), tvm={"kind": "llvm", "fast-math": True})
    with pytest.raises(QflowError, match="fast-math"):
        tvm_target(target)


def test_missing_tvm_gives_the_install_hint(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tvm" else real(name, *a))
    _, graph = frozen("digits-mlp", "8bit")
    with pytest.raises(QflowError, match=r"pip install qflow\[tvm\]"):
        export(graph, tmp_path, load_target("cpu"))


def test_broken_builds_raise_one_line_errors(cpu_export, tmp_path):
    _, graph = frozen(cpu_export.name.rsplit("-", 1)[0], "8bit")
    x = np.zeros((2, *graph.tensors[graph.input].shape))
    with pytest.raises(QflowError, match=r"run\.py not found"):
        run_tvm(tmp_path, graph, x)
    broken = tmp_path / "tvm"
    shutil.copytree(cpu_export / "tvm", broken)
    (broken / "model.so").write_bytes(b"not a library")
    with pytest.raises(QflowError) as info:
        run_tvm(broken, graph, x)
    assert "\n" not in str(info.value) and str(broken) in str(info.value)
    (broken / "build.json").write_text("{")
    with pytest.raises(QflowError, match=r"build\.json"):
        run_tvm(broken, graph, x)


def test_pools_become_exact_sums_for_tvm():
    """``pools_as_sums``: tiling and global average pools over power-of-two counts become
    ReduceSum times 1/count with the same outputs under ONNX Runtime; overlapping windows
    and a count of 9 stay pools."""
    import onnxruntime as ort

    from qflow.export.tvm.frontend import pools_as_sums

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 8])
    nodes = [helper.make_node("AveragePool", ["x"], ["tiled"], kernel_shape=[2, 2],
                              strides=[2, 2]),  # 9 rows: the last one is dropped
             helper.make_node("GlobalAveragePool", ["tiled"], ["global"]),
             helper.make_node("AveragePool", ["x"], ["overlap"], kernel_shape=[2, 2],
                              strides=[1, 1]),
             helper.make_node("AveragePool", ["x"], ["nine"], kernel_shape=[3, 3],
                              strides=[3, 3])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
               for n in ("global", "tiled", "overlap", "nine")]
    model = helper.make_model(helper.make_graph(nodes, "pools", [x], outputs),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rewritten = pools_as_sums(model)
    assert [n.op_type for n in rewritten.graph.node].count("AveragePool") == 2
    assert "GlobalAveragePool" not in [n.op_type for n in rewritten.graph.node]
    codes = np.random.default_rng(0).integers(-2**20, 2**20, (5, 3, 9, 8)).astype(np.float32)
    runs = [ort.InferenceSession(m.SerializeToString()).run(None, {"x": codes})
            for m in (model, rewritten)]
    for before, after in zip(*runs, strict=True):
        assert before.shape == after.shape and np.array_equal(before, after)
