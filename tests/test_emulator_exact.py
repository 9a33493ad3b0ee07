"""The QAT model in eval mode equals the QGraph emulator, bit for bit, on 10,000 inputs
for every zoo model and every configuration of the CI matrix; the emulator's float
arithmetics (float32 where the graph allows it, float64) and int64 agree."""

import numpy as np
import pytest
import torch
from zoo_fixtures import CONFIGS, MODEL_NAMES, frozen, test_inputs

from qflow.graph import Emulator
from qflow.graph.emulator import FLOAT_FORMATS
from qflow.graph.infer import float_bounds
from qflow.numerics import to_codes
from qflow.numerics.corners import corner_inputs
from qflow.verify.check import compare

CELLS = [(m, c) for m in MODEL_NAMES for c in CONFIGS]


def _qat_codes(model, graph, x):
    with torch.no_grad():
        out = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
    scaled = np.ldexp(out.astype(np.float64), graph.output_type.fractional)
    assert np.array_equal(scaled, np.rint(scaled)), "QAT output is off the output type's grid"
    return scaled.astype(np.int64)


@pytest.mark.parametrize(("model_name", "config_name"), CELLS)
def test_qat_model_equals_emulator(model_name, config_name):
    model, graph = frozen(model_name, config_name)
    x = test_inputs(model_name, 10_000 - 256)
    x = np.concatenate([x, corner_inputs(graph.input_type, x.shape[1:], 256)])
    assert len(x) >= 10_000
    emulated = Emulator(graph).run(x)
    bad, max_diff = compare(emulated, _qat_codes(model, graph, x))
    assert bad == 0, f"{bad} of {len(x)} samples differ (max {max_diff} LSB)"


@pytest.mark.parametrize(("model_name", "config_name"), CELLS)
def test_float_and_int64_arithmetic_agree(model_name, config_name):
    """Every float arithmetic the graph allows (float32 when its bounds fit 24 bits;
    float64 always here) equals int64 on every tensor."""
    _, graph = frozen(model_name, config_name)
    x = test_inputs(model_name, 1000)
    x = np.concatenate([x, corner_inputs(graph.input_type, x.shape[1:], 256)])
    exact = Emulator(graph, "int64")
    assert not exact.float_mode
    codes = to_codes(x, graph.input_type)
    b = exact.run_codes(codes, keep=True)
    bounds = float_bounds(graph)
    for fmt in FLOAT_FORMATS:
        if not bounds.fits(fmt):
            continue
        fast = Emulator(graph, np.dtype(fmt.dtype).name)
        assert fast.float_mode
        a = fast.run_codes(codes, keep=True)
        for name in b:
            assert np.array_equal(a[name], b[name]), f"{fast.arithmetic}: tensor {name} differs"


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_every_tensor_fits_its_type(model_name):
    """No intermediate value leaves its declared type (accumulators never overflow)."""
    _, graph = frozen(model_name, "8bit")
    x = test_inputs(model_name, 1000)
    x = np.concatenate([x, corner_inputs(graph.input_type, x.shape[1:], 256)])
    values = Emulator(graph).run_codes(to_codes(x, graph.input_type), keep=True)
    for name, codes in values.items():
        t = graph.tensors[name].type
        assert codes.min() >= t.qmin and codes.max() <= t.qmax, f"{name} leaves {t}"
