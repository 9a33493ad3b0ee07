"""The int8 convolution and dense kernels of CPU builds on x86 VNNI
(``qflow.export.tvm.vnni``): which layers take them, and that the kernels equal the
exact layer on every shape and at the ends of every code range (where a saturating int16
pair sum would fail)."""

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from zoo_fixtures import frozen

from qflow.export import ExportOptions, export
from qflow.export.tvm import vnni
from qflow.targets import load_target

needs_vnni = pytest.mark.skipif(not vnni.host_has_vnni(),
                                reason="this CPU lacks AVX-512 VNNI: the int8 kernels "
                                       "are not built for it")


def _conv_onnx(channels, height, width, weights, strides, pads, batch) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                      [batch or "N", channels, height, width])
    k = weights.shape[2]
    out_shape = [batch or "N", len(weights), (height + pads[0] + pads[2] - k) // strides[0] + 1,
                 (width + pads[1] + pads[3] - k) // strides[1] + 1]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], strides=list(strides),
                            pads=[pads[0], pads[1], pads[2], pads[3]],
                            kernel_shape=[k, k])
    graph = helper.make_graph([conv], "conv", [x], [y], [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run_int8(model, weights, offset, x):
    """(output, nodes that took a kernel) of ``model`` built with its one Conv or MatMul
    (``weights``) planned for the int8 kernels."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from qflow.export.tvm.build import tvm_target

    module = from_onnx(model)
    filters = weights.T.reshape(*weights.T.shape, 1, 1) if weights.ndim == 2 else weights
    conv = vnni._int8_layer(filters, offset)
    assert conv is not None
    conv = dataclasses.replace(conv, nodes=("conv",))
    module, nodes = vnni.use_int8_kernels(module, {vnni.weight_key(weights): conv})
    target = tvm.target.Target(tvm_target(load_target("cpu")))
    machine = relax.VirtualMachine(tvm.compile(module, target=target), tvm.cpu())
    return machine["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy(), nodes


def _exact_conv(x, weights, strides, pads):
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    return torch.nn.functional.conv2d(torch.from_numpy(padded),
                                      torch.from_numpy(weights.astype(np.float64)),
                                      stride=tuple(strides)).numpy()


# (input channels, height, width, output channels, kernel, strides, pads t/l/b/r)
SHAPES = [
    (3, 32, 32, 16, 3, (1, 1), (1, 1, 1, 1)),  # resnet8's stem: 3 channels, one quad
    (16, 16, 16, 32, 3, (2, 2), (1, 1, 1, 1)),  # stride 2
    (16, 16, 16, 32, 1, (2, 2), (0, 0, 0, 0)),  # 1x1 shortcut
    (5, 9, 12, 24, 3, (1, 1), (0, 1, 2, 1)),  # uneven pads, channels not a multiple of 4
    (8, 8, 16, 8, 3, (1, 2), (1, 1, 1, 1)),  # stride in the columns only, 8 lanes
    (6, 7, 4, 4, 3, (1, 1), (1, 1, 1, 1)),  # 4 lanes
    (4, 5, 8, 6, 3, (1, 1), (1, 1, 1, 1)),  # 6 output channels: tiles of 2
    # rows of at least 16 columns per stride phase are packed 16 at a time, the rest one
    # by one: both, with a partial channel quad, and with stride 2
    (6, 4, 36, 8, 3, (1, 1), (1, 1, 1, 1)),
    (16, 6, 40, 16, 3, (2, 2), (1, 1, 1, 1)),
    (8, 4, 32, 16, 1, (2, 2), (0, 0, 0, 0)),
]


@needs_vnni
@pytest.mark.parametrize("offset", [0, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_kernel_equals_the_exact_convolution(shape, offset):
    channels, height, width, out_channels, k, strides, pads = shape
    rng = np.random.default_rng(channels * 100 + offset)
    codes = rng.integers(-128, 128, (out_channels, channels, k, k))
    codes[0] = -128  # the ends of the int8 range, against the largest inputs below
    codes[-1] = 127
    exponents = rng.integers(-6, 4, out_channels)[:, None, None, None]
    weights = np.ldexp(codes, exponents).astype(np.float32)
    low, high = -offset, 255 - offset
    x = rng.integers(low, high + 1, (3, channels, height, width)).astype(np.float32)
    x[0], x[1] = high, low
    for batch in (None, 3):
        model = _conv_onnx(channels, height, width, weights, strides, pads, batch)
        got, nodes = _run_int8(model, weights, offset, x)
        assert nodes == ["conv"]
        expected = _exact_conv(x, weights, strides, pads)
        assert got.shape == expected.shape
        assert int((got != expected).reshape(len(x), -1).any(axis=1).sum()) == 0


@needs_vnni
def test_widths_no_vector_divides_stay_float_convolutions():
    weights = np.ones((4, 4, 3, 3), np.float32)
    model = _conv_onnx(4, 6, 6, weights, (1, 1), (0, 0, 0, 0), None)  # 4 output columns
    _, nodes = _run_int8(model, weights, 0, np.zeros((1, 4, 6, 6), np.float32))
    assert nodes == ["conv"]
    model = _conv_onnx(4, 7, 7, weights, (1, 1), (0, 0, 0, 0), None)  # 5 output columns
    got, nodes = _run_int8(model, weights, 0, np.ones((1, 4, 7, 7), np.float32))
    assert nodes == [] and np.all(got == 36)


def _dense_onnx(in_features, weights, batch) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch or "N", in_features])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch or "N", weights.shape[1]])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "dense", [x],
                              [y], [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@needs_vnni
@pytest.mark.parametrize("offset", [0, 128])
@pytest.mark.parametrize(("in_features", "out_features"),
                         [(64, 64), (5, 16), (16, 24), (33, 128), (3, 4)])
def test_int8_dense_kernel_equals_the_exact_product(in_features, out_features, offset):
    rng = np.random.default_rng(in_features * 1000 + out_features + offset)
    codes = rng.integers(-128, 128, (in_features, out_features))
    codes[:, 0], codes[:, -1] = -128, 127
    weights = np.ldexp(codes, rng.integers(-6, 4, out_features)[None, :]).astype(np.float32)
    low, high = -offset, 255 - offset
    x = rng.integers(low, high + 1, (vnni.DENSE_MIN_BATCH, in_features)).astype(np.float32)
    x[0], x[1] = high, low
    for batch in (None, vnni.DENSE_MIN_BATCH):
        got, nodes = _run_int8(_dense_onnx(in_features, weights, batch), weights, offset, x)
        assert nodes == ["conv"]
        expected = x.astype(np.float64) @ weights.astype(np.float64)
        assert int((got != expected).any(axis=1).sum()) == 0


@needs_vnni
def test_dense_layers_without_a_vector_of_outputs_or_with_few_samples_stay_float():
    weights = np.ones((8, 10), np.float32)  # 10 outputs: no multiple of 4
    got, nodes = _run_int8(_dense_onnx(8, weights, None), weights, 0,
                           np.ones((2, 8), np.float32))
    assert nodes == [] and np.all(got == 8)
    weights = np.ones((8, 16), np.float32)  # a build for 4 samples per call
    got, nodes = _run_int8(_dense_onnx(8, weights, 4), weights, 0, np.ones((4, 8), np.float32))
    assert nodes == [] and np.all(got == 8)


def test_weights_take_int8_codes_times_a_power_of_two_per_channel():
    weights = np.array([[3, -5, 0.5, 0], [0, 0, 0, 0], [-128, 127, 64, 2]], np.float32)
    conv = vnni._int8_layer(weights.reshape(3, 4, 1, 1) * np.float32(2**-3), offset=128)
    assert conv is not None
    assert conv.codes.reshape(3, 4).tolist() == [[6, -10, 1, 0], [0, 0, 0, 0],
                                                 [-128, 127, 64, 2]]
    values = conv.codes.reshape(3, 4).astype(np.float64) * conv.scales[:, None]
    assert np.array_equal(values, weights * 2**-3)  # the codes times 2**e are the weights
    assert conv.correction.tolist() == (128 * conv.codes.reshape(3, 4).sum(axis=1)).tolist()
    assert vnni._int8_layer(np.array([129, 1], np.float32).reshape(1, 2, 1, 1), 0) is None
    assert vnni._int8_layer(np.array([0.75, 1], np.float32).reshape(1, 2, 1, 1), 0) is not None
    assert vnni._int8_layer(np.array([255, 1], np.float32).reshape(1, 2, 1, 1), 0) is None
    # 255 * sum|w| must stay below 2**24: 600 channels of 3x3 weights of 127 do not
    assert vnni._int8_layer(np.full((1, 600, 3, 3), 127, np.float32), 0) is None
    assert vnni._int8_layer(np.full((1, 50, 3, 3), 127, np.float32), 0) is not None


def test_only_layers_on_8_bit_codes_are_planned(tmp_path):
    from qflow.export.int_onnx import export_int_onnx

    _, graph = frozen("digits-cnn", "8bit")
    model = onnx.load(export_int_onnx(graph, tmp_path / "m.onnx"))
    plan = vnni.plan_int8_layers(model)
    convs = [n for n in graph.nodes if n.op == "conv2d"]
    dense = [n for n in graph.nodes if n.op == "dense"]
    assert len(plan) == len(convs) + len(dense) and all(plan.values())
    meta = {p.key: p.value for p in model.metadata_props}
    assert plan[next(iter(plan))].offset == (128 if meta["qflow.type." + graph.input].startswith(
        "ap_fixed") else 0)
    for prop in model.metadata_props:  # 9-bit codes do not fit a byte
        if prop.key.startswith("qflow.type.") and prop.key != "qflow.type." + graph.input \
                and prop.value.startswith("ap_ufixed<8,"):
            prop.value = prop.value.replace("ap_ufixed<8,", "ap_ufixed<9,")
    assert len(vnni.plan_int8_layers(model)) == 1  # only the stem's (the input's type) stays


@needs_vnni
@pytest.mark.parametrize("model_name", ["digits-cnn", "jet-mlp"])
def test_cpu_builds_use_the_int8_kernels(tmp_path, model_name):
    """The zoo and corpus builds verified elsewhere take this route on this machine:
    every layer but those whose outputs fill no vector (digits-cnn's 10 classes,
    jet-mlp's 5)."""
    _, graph = frozen(model_name, "8bit")
    out = tmp_path / "export"
    out.mkdir()
    export(graph, out, load_target("cpu"), ExportOptions())
    manifest = json.loads((out / "tvm" / "build.json").read_text())
    layers = [f"{n.name}/conv" if n.op == "conv2d" else f"{n.name}/matmul"
              for n in graph.nodes if n.op in ("conv2d", "dense")
              and graph.tensors[n.output].shape[-1] % 4 == 0]  # columns, features
    assert len(layers) >= 3
    assert manifest["int8_layers"] == sorted(layers)


def test_weights_shared_with_a_wider_input_keep_every_such_convolution_float():
    """The Relax module is matched by weights: one unqualified user keeps them all float."""
    weights = np.ones((4, 4, 3, 3), np.float32)
    nodes = [helper.make_node("Conv", [x, "w"], [f"{x}_out"], pads=[1, 1, 1, 1])
             for x in ("a", "b")]
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4, 8, 8]) for x in "ab"]
    outputs = [helper.make_tensor_value_info(f"{x}_out", TensorProto.FLOAT, None) for x in "ab"]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs,
                                                [numpy_helper.from_array(weights, "w")]))
    types = {"a": "ap_ufixed<8,2,AP_RND_CONV,AP_SAT>", "b": "ap_ufixed<8,2,AP_RND_CONV,AP_SAT>"}
    onnx.helper.set_model_props(model, {f"qflow.type.{k}": v for k, v in types.items()})
    assert list(vnni.plan_int8_layers(model)) == [vnni.weight_key(weights)]
    types["b"] = "ap_ufixed<9,3,AP_RND_CONV,AP_SAT>"
    onnx.helper.set_model_props(model, {f"qflow.type.{k}": v for k, v in types.items()})
    assert vnni.plan_int8_layers(model) == {}
