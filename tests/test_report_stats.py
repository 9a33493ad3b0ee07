"""The report's value statistics against counts made here, independently: from the
emulator's codes of every tensor, each cast's arriving codes turned into real values in
float64, scaled to the cast's fraction and rounded by numpy's own functions, then
compared with the type's range."""

import numpy as np
import pytest
from zoo_fixtures import frozen

from qflow.graph.emulator import Emulator
from qflow.numerics import corner_inputs, to_codes
from qflow.report.stats import cast_statistics
from qflow.zoo import DATASETS, MODELS

#: numpy's rounding of values already scaled to the output's LSB, per rounding mode
ROUND = {"RND_CONV": np.rint, "TRN": np.floor}


def _independent_counts(graph, x) -> dict[str, tuple[int, int, float]]:
    """tensor -> (values outside the range, values, fraction of zero output codes)."""
    tensors = Emulator(graph).run_codes(to_codes(x, graph.input_type), keep=True)
    counts = {}
    for node in graph.nodes:
        if node.op != "cast":
            continue
        t, source = graph.tensors[node.output].type, graph.tensors[node.inputs[0]].type
        real = tensors[node.inputs[0]].astype(np.float64) * 2.0 ** -source.fractional
        rounded = ROUND[t.rounding.value](real * 2.0 ** t.fractional)
        outside = int(((rounded < t.qmin) | (rounded > t.qmax)).sum())
        counts[node.name] = (outside, rounded.size, float((tensors[node.output] == 0).mean()))
    return counts


@pytest.mark.parametrize("config", ["8bit", "wrap_trn"])
def test_saturation_and_wrap_rates_equal_counts_from_the_emulator_codes(config):
    _, graph = frozen("digits-cnn", config)
    # test data, then corner cases: their extreme inputs push values out of the ranges
    x = np.concatenate([DATASETS[MODELS["digits-cnn"].data]().x_test[:200],
                        corner_inputs(graph.input_type, graph.tensors[graph.input].shape, 64)])
    rows = {r["tensor"]: r for r in cast_statistics(graph, x)}
    expected = _independent_counts(graph, x)
    assert set(rows) == {"input", *expected}
    effect = "clipped" if config == "8bit" else "wrapped"
    for name, (outside, values, zeros) in expected.items():
        row = rows[name]
        assert (row["outside_count"], row["values"]) == (outside, values), name
        assert round(row[effect] * values) == outside and row["zero_codes"] == zeros, name
    assert sum(r["outside_count"] for r in rows.values()) > 0, "no value outside any range"
    # the corner cases include inputs beyond the input type's range
    assert rows["input"]["outside_count"] > 0


def test_input_values_outside_the_input_type_are_counted():
    _, graph = frozen("digits-mlp", "8bit")
    x = DATASETS[MODELS["digits-mlp"].data]().x_test[:10] * 4.0  # beyond the input range
    row = cast_statistics(graph, x)[0]
    high = graph.input_type.qmax * 2.0 ** -graph.input_type.fractional
    assert row["outside_count"] == int((np.rint(x * 2.0 ** graph.input_type.fractional)
                                        > graph.input_type.qmax).sum()) > 0
    assert row["range"][1] == high and sum(row["histogram"]["counts"]) == x.size
