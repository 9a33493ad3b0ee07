"""`qflow import`: brevitas models exported by brevitas's own `export_qonnx`, imported,
exported to onnx, cpu and ultra96, and verified: 0 mismatching samples between the
emulator, every artifact and qonnx's executor on the original file; unsupported QONNX
content refused in one line naming the node."""

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
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFixedPoint,
    Int16Bias,
    SignedBinaryActPerTensorConst,
    SignedBinaryWeightPerTensorConst,
    Uint8ActPerTensorFixedPoint,
)
from onnx import helper

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


class PowerOfTwoCNN(torch.nn.Module):
    def __init__(self, weight_quant=Int8WeightPerTensorFixedPoint):
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint,
                                     return_quant_tensor=True)
        self.conv = qnn.QuantConv2d(1, 6, 3, padding=1, bias=True, weight_quant=weight_quant,
                                    bias_quant=Int16Bias)
        self.relu = qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, return_quant_tensor=True)
        self.fc = qnn.QuantLinear(6 * 2 * 2, 10, bias=True, weight_quant=weight_quant,
                                  bias_quant=Int16Bias)

    def forward(self, x):
        pooled = torch.nn.functional.max_pool2d(self.relu(self.conv(self.inp(x))), 2)
        # every argument given: brevitas's avg_pool2d handler takes them all positionally
        averaged = torch.nn.functional.avg_pool2d(pooled, 2, 2, 0, False, True, None)
        return self.fc(averaged.flatten(1))


class GlobalPoolCNN(PowerOfTwoCNN):
    """The same layers with a global average (a ReduceMean in brevitas's export)."""

    def __init__(self):
        super().__init__()
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
    files = {}
    for name, model in (("mlp", PowerOfTwoMLP()), ("cnn", PowerOfTwoCNN()),
                        ("binary", BinaryMLP())):
        model = _calibrated(model, data.x_train)
        example = torch.rand(1, 1, 8, 8)
        export_qonnx(model, input_t=example if name == "cnn" else example.flatten(1),
                     export_path=str(root / f"{name}.onnx"))
        files[name] = (root / f"{name}.onnx", model)
    return root, files


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "cnn", "binary"])
def test_brevitas_model_imports_exports_and_verifies_exactly(brevitas_files, name):
    root, files = brevitas_files
    path, _ = files[name]
    data = "digits" if name == "cnn" else "digits64.npz"
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
        # the original file under qonnx's executor agrees with the emulator exactly
        assert rows["original QONNX (qonnx executor)"]["status"] == "ok"
        assert all(r["mismatching_samples"] == 0 and r["samples"] == report["samples"]
                   for r in report["results"]), rows
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


def _set_rounding(graph, mode):
    quant = [n for n in graph.node if n.op_type == "Quant"][-1]
    for attribute in quant.attribute:
        if attribute.name == "rounding_mode":
            attribute.CopyFrom(helper.make_attribute("rounding_mode", mode))


@pytest.mark.parametrize(("case", "words"), [
    ("float op", ["Sigmoid", "no exact QGraph form"]),
    ("ceil rounding", ["CEIL", "no ap_fixed equivalent"]),
    ("float scale", ["not a power of two"]),
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
    elif case == "float scale":
        model = _calibrated(PowerOfTwoCNN(Int8WeightPerChannelFloat), DATASETS["digits"]().x_train)
        path = tmp_path / "m.onnx"
        export_qonnx(model, input_t=torch.rand(1, 1, 8, 8), export_path=str(path))
    else:
        path = tmp_path / "m.onnx"
        path.write_text("not a model")
    code, _, err = _qflow("import", str(path), "--out", "run", cwd=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(word in err for word in words), err
    if case != "not onnx":
        assert "node " in err  # the node is named
    assert not (tmp_path / "run").exists()
