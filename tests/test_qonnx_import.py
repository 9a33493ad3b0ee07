"""`qflow import`: brevitas models exported by brevitas's own `export_qonnx`, imported,
exported to onnx, cpu and ultra96, and verified: 0 mismatching samples between the
emulator and every artifact, and against qonnx's executor on the original file where
the scales are powers of two (counted separately otherwise); unsupported QONNX content
refused in one line naming the node."""

import json
import subprocess
import sys
from pathlib import Path

import brevitas.nn as qnn
import numpy as np
import onnx
import pytest
import torch
from brevitas.export import export_qonnx
from brevitas.quant import (
    Int8ActPerTensorFixedPoint,
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFixedPoint,
    Int16Bias,
    Int32Bias,
    SignedBinaryActPerTensorConst,
    SignedBinaryWeightPerTensorConst,
    Uint8ActPerTensorFixedPoint,
    Uint8ActPerTensorFloat,
)
from onnx import helper, numpy_helper

import qflow
from qflow.graph import emulate
from qflow.numerics.convert import values_to_codes
from qflow.zoo import DATASETS


def _qflow(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "qflow.cli.main", *args], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout, result.stderr


class PowerOfTwoMLP(torch.nn.Module):
    """Written as a brevitas user writes it: power-of-two scales, 16-bit biases."""

    def __init__(self):
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint,
                                     return_quant_tensor=True)
        self.fc1 = qnn.QuantLinear(64, 32, bias=True, weight_quant=Int8WeightPerTensorFixedPoint,
                                   bias_quant=Int16Bias)
        self.relu = qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, return_quant_tensor=True)
        self.fc2 = qnn.QuantLinear(32, 10, bias=True, weight_quant=Int8WeightPerTensorFixedPoint,
                                   bias_quant=Int16Bias)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(self.inp(x.flatten(1)))))


class BinaryMLP(torch.nn.Module):
    """Binary weights and a binary hidden layer (BipolarQuant), power-of-two scales."""

    def __init__(self):
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint,
                                     return_quant_tensor=True)
        self.fc1 = qnn.QuantLinear(64, 32, bias=False,
                                   weight_quant=SignedBinaryWeightPerTensorConst,
                                   weight_scaling_const=0.5)
        self.sign = qnn.QuantIdentity(act_quant=SignedBinaryActPerTensorConst,
                                      act_scaling_const=0.25, return_quant_tensor=True)
        self.fc2 = qnn.QuantLinear(32, 10, bias=False,
                                   weight_quant=SignedBinaryWeightPerTensorConst,
                                   weight_scaling_const=1.0)

    def forward(self, x):
        return self.fc2(self.sign(self.fc1(self.inp(x.flatten(1)))))


class FloatScaleCNN(torch.nn.Module):
    """brevitas's default kind: float scales (per-channel weights), 32-bit biases."""

    def __init__(self):
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True)
        self.conv = qnn.QuantConv2d(1, 8, 3, padding=1, weight_quant=Int8WeightPerChannelFloat,
                                    bias_quant=Int32Bias)
        self.relu = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)
        self.fc = qnn.QuantLinear(8 * 4 * 4, 10, weight_quant=Int8WeightPerChannelFloat,
                                  bias_quant=Int32Bias)

    def forward(self, x):
        pooled = torch.nn.functional.max_pool2d(self.relu(self.conv(self.inp(x))), 2)
        return self.fc(pooled.flatten(1))


class PowerOfTwoCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint,
                                     return_quant_tensor=True)
        self.conv = qnn.QuantConv2d(1, 6, 3, padding=1, bias=True,
                                    weight_quant=Int8WeightPerTensorFixedPoint,
                                    bias_quant=Int16Bias)
        self.relu = qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, return_quant_tensor=True)
        # an average and a Trunc to 8 bits in brevitas's export
        self.average = qnn.TruncAvgPool2d(kernel_size=2, stride=2, bit_width=8,
                                          return_quant_tensor=True)
        self.fc = qnn.QuantLinear(6 * 2 * 2, 10, bias=True,
                                  weight_quant=Int8WeightPerTensorFixedPoint,
                                  bias_quant=Int16Bias)

    def forward(self, x):
        pooled = torch.nn.functional.max_pool2d(self.relu(self.conv(self.inp(x))), 2)
        return self.fc(self.average(pooled).flatten(1))


class GlobalPoolCNN(PowerOfTwoCNN):
    """The same layers with a global average (a ReduceMean in brevitas's export)."""

    def __init__(self):
        super().__init__()
        del self.average  # brevitas exports every module, used or not
        self.fc = qnn.QuantLinear(6, 10, bias=True, weight_quant=Int8WeightPerTensorFixedPoint,
                                  bias_quant=Int16Bias)

    def forward(self, x):
        pooled = torch.nn.functional.max_pool2d(self.relu(self.conv(self.inp(x))), 2)
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(pooled, 1).flatten(1))


def _calibrated(model, x):
    """A few forward passes in training mode set the activation ranges (no training:
    the point is the arithmetic, not the accuracy)."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for start in range(0, 512, 64):
            model(torch.as_tensor(x[start:start + 64], dtype=torch.float32))
    return model.eval()


@pytest.fixture(scope="module")
def brevitas_files(tmp_path_factory):
    """The power-of-two models exported by brevitas, and the digits data beside them
    (flattened for the MLPs)."""
    root = tmp_path_factory.mktemp("import")
    data = DATASETS["digits"]()
    np.savez(root / "digits64.npz", **{k: getattr(data, k).reshape(len(getattr(data, k)), -1)
                                       if k.startswith("x") else getattr(data, k)
                                       for k in ("x_train", "y_train", "x_test", "y_test")})
    # inputs at 0.9 of the digits' range, so that the float input scale is not 2^-7
    np.savez(root / "digits09.npz", **{k: (0.9 * getattr(data, k)).astype(np.float32)
                                       if k.startswith("x") else getattr(data, k)
                                       for k in ("x_train", "y_train", "x_test", "y_test")})
    files = {}
    for name, model in (("mlp", PowerOfTwoMLP()), ("cnn", PowerOfTwoCNN()),
                        ("binary", BinaryMLP()), ("float", FloatScaleCNN())):
        model = _calibrated(model, 0.9 * data.x_train if name == "float" else data.x_train)
        example = torch.rand(1, 1, 8, 8)
        export_qonnx(model, input_t=example if name in ("cnn", "float") else example.flatten(1),
                     export_path=str(root / f"{name}.onnx"))
        files[name] = (root / f"{name}.onnx", model)
    return root, files


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "cnn", "binary", "float"])
def test_brevitas_model_imports_exports_and_verifies_exactly(brevitas_files, name):
    """Every artifact equals the emulator on every sample. With power-of-two scales qonnx's
    executor on the original file does too; with float scales its differences (float32
    arithmetic against 23-bit multipliers) are counted in its own row and do not fail
    verify."""
    root, files = brevitas_files
    path, _ = files[name]
    data = {"cnn": "digits", "float": "digits09.npz"}.get(name, "digits64.npz")
    code, out, err = _qflow("import", str(path), "--data", data, "--out", f"run-{name}", cwd=root)
    assert code == 0, err
    assert "imported" in out
    for target in ("onnx", "cpu", "ultra96"):
        code, _, err = _qflow("export", f"run-{name}", "--target", target, cwd=root)
        assert code == 0, err
        code, out, err = _qflow("verify", f"run-{name}/export-{target}", cwd=root)
        report = json.loads((root / f"run-{name}" / f"export-{target}" / "verify.json")
                            .read_text())
        assert code == 0, out + err
        rows = {r["artifact"]: r for r in report["results"]}
        source = rows.pop("original QONNX (qonnx executor)")
        assert source["samples"] == report["samples"]
        if name == "float":
            # rare: a hidden value within 2^-23 of a rounding tie, or the output's last bit
            assert source["role"] == "source", source
            assert source["mismatching_samples"] < report["samples"] // 10, source
            assert "original QONNX graph differs" in report["summary"] or not source[
                "mismatching_samples"]
        else:  # the original file under qonnx's executor agrees with the emulator exactly
            assert source["status"] == "ok" and source["role"] == "qat model", source
        assert report["mismatching_samples"] == 0
        assert all(r["mismatching_samples"] == 0 and r["samples"] == report["samples"]
                   for r in rows.values()), rows
        assert report["sample_kinds"]["test"] > 0  # the user's data, not corner cases only


@pytest.mark.parametrize("name", ["cnn", "global pool"])
def test_import_brevitas_computes_what_brevitas_computes(brevitas_files, name):
    """qflow.import_brevitas runs brevitas's export itself; the emulator's output codes
    equal brevitas's own float outputs on its grid, sample for sample."""
    _, files = brevitas_files
    data = DATASETS["digits"]()
    model = files["cnn"][1] if name == "cnn" else _calibrated(GlobalPoolCNN(), data.x_train)
    graph = qflow.import_brevitas(model, torch.rand(1, 1, 8, 8))
    assert {"avgpool2d" if name == "cnn" else "global_avgpool2d", "maxpool2d", "conv2d"} <= {
        node.op for node in graph.nodes}
    assert name != "cnn" or any(n.source.startswith("Trunc") for n in graph.nodes)
    x = data.x_test[:300]
    with torch.no_grad():
        expected = model(torch.as_tensor(x)).numpy().astype(np.float64)
    codes = emulate(graph, x)
    assert np.array_equal(values_to_codes(expected, graph.output_type), codes)


def _edited(source: Path, target: Path, edit) -> Path:
    model = onnx.load(str(source))
    edit(model.graph)
    onnx.save(model, str(target))
    return target


def _first(graph, op_type):
    return next(n for n in graph.node if n.op_type == op_type)


def _set_zero_point(graph):
    zero_point = _first(graph, "Quant").input[2]
    for init in graph.initializer:
        if init.name == zero_point:
            init.CopyFrom(numpy_helper.from_array(np.array(3.0, dtype=np.float32), zero_point))


def _set_rounding(graph, mode):
    quant = [n for n in graph.node if n.op_type == "Quant"][-1]
    for attribute in quant.attribute:
        if attribute.name == "rounding_mode":
            attribute.CopyFrom(helper.make_attribute("rounding_mode", mode))


@pytest.mark.parametrize(("case", "words"), [
    ("float op", ["Sigmoid", "no exact QGraph form"]),
    ("ceil rounding", ["CEIL", "no ap_fixed equivalent"]),
    ("zero point", ["zero point", "not 0"]),
    ("not onnx", ["not an ONNX model"]),
])
def test_unsupported_qonnx_is_refused_in_one_line(brevitas_files, tmp_path, case, words):
    _, files = brevitas_files
    mlp = files["mlp"][0]
    if case == "float op":  # a float Sigmoid between two quantizers
        path = _edited(mlp, tmp_path / "m.onnx",
                       lambda g: setattr(_first(g, "Relu"), "op_type", "Sigmoid"))
    elif case == "ceil rounding":
        path = _edited(mlp, tmp_path / "m.onnx", lambda g: _set_rounding(g, "CEIL"))
    elif case == "zero point":  # an asymmetric input quantizer
        path = _edited(mlp, tmp_path / "m.onnx", _set_zero_point)
    else:
        path = tmp_path / "m.onnx"
        path.write_text("not a model")
    code, _, err = _qflow("import", str(path), "--out", "run", cwd=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(word in err for word in words), err
    if case != "not onnx":
        assert "node " in err  # the node is named
    assert not (tmp_path / "run").exists()


def _threshold_graph(path: Path, thresholds: np.ndarray, out_scale: float, out_bias: float):
    """A hand-written QONNX graph (as FINN's streamlining leaves them): an 8-bit input
    Quant, a MatMul with quantized weights, a MultiThreshold, a second MatMul."""
    rng = np.random.default_rng(0)
    quant = {"domain": "qonnx.custom_op.general", "signed": 1, "narrow": 0,
             "rounding_mode": "ROUND"}
    consts = {"s_in": 2.0 ** -5, "s_w": 2.0 ** -6, "zero": 0.0, "bits": 8.0,
              "w1": rng.normal(0, 0.3, (16, 12)), "w2": rng.normal(0, 0.3, (12, 4)),
              "thresholds": thresholds}
    nodes = [
        helper.make_node("Quant", ["x", "s_in", "zero", "bits"], ["xq"], **quant),
        helper.make_node("Quant", ["w1", "s_w", "zero", "bits"], ["w1q"], **quant),
        helper.make_node("MatMul", ["xq", "w1q"], ["h"]),
        helper.make_node("MultiThreshold", ["h", "thresholds"], ["a"],
                         domain="qonnx.custom_op.general", out_dtype="INT4",
                         out_scale=out_scale, out_bias=out_bias),
        helper.make_node("Quant", ["w2", "s_w", "zero", "bits"], ["w2q"], **quant),
        helper.make_node("MatMul", ["a", "w2q"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "thresholds", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                            [1, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("qonnx.custom_op.general",
                                                                        1)])
    onnx.save(model, str(path))
    return path


def test_multithreshold_that_is_a_quantizer_imports_exactly(tmp_path):
    """A MultiThreshold with the thresholds of a 4-bit signed quantizer of step 2^-3 is a
    cast (ties toward +inf): the onnx and cpu exports and qonnx's executor on the
    original file all give the emulator's codes; uneven thresholds are refused."""
    step = 2.0 ** -3
    levels = np.arange(-8, 7) + 0.5  # 15 thresholds between 16 levels, -8 .. 7
    path = _threshold_graph(tmp_path / "t.onnx", (levels * step)[None, :], step, -8 * step)
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1.5, (600, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x_train=x, y_train=np.zeros(600, np.int64), x_test=x[:300],
             y_test=np.zeros(300, np.int64))
    code, _, err = _qflow("import", str(path), "--data", "data.npz", "--out", "run",
                          cwd=tmp_path)
    assert code == 0, err
    for target in ("onnx", "cpu"):
        code, _, err = _qflow("export", "run", "--target", target, cwd=tmp_path)
        assert code == 0, err
        code, out, err = _qflow("verify", f"run/export-{target}", cwd=tmp_path)
        assert code == 0, out + err
        report = json.loads((tmp_path / "run" / f"export-{target}" / "verify.json").read_text())
        assert all(r["mismatching_samples"] == 0 and r["status"] == "ok"
                   for r in report["results"]), report["results"]
    uneven = levels * step
    uneven[3] += step / 4
    bad = _threshold_graph(tmp_path / "bad.onnx", uneven[None, :], step, -8 * step)
    code, _, err = _qflow("import", str(bad), "--out", "run2", cwd=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "MultiThreshold" in err, err
