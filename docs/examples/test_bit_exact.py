"""A CI test of your own: the exported model computes exactly what the emulator (the
frozen integer graph) computes, sample by sample, or the test fails with the table.

Run it on an export directory written by ``qflow export``::

    QFLOW_EXPORT_DIR=runs/ci/export-onnx pytest docs/examples/test_bit_exact.py

Without ``QFLOW_EXPORT_DIR`` both tests are skipped, with the reason. Each call of
``assert_exact`` runs every artifact of the export (this runs the export's compiled
code: point it only at folders you trust) and writes ``verify.json`` there, as
``qflow verify`` does.
"""

import os
from pathlib import Path

import numpy as np
import pytest

import qflow
from qflow.verify import assert_exact

EXPORT_DIR = os.environ.get("QFLOW_EXPORT_DIR")

pytestmark = pytest.mark.skipif(
    not EXPORT_DIR,
    reason="QFLOW_EXPORT_DIR is not set: set it to an export directory written by "
           "`qflow export` (e.g. runs/ci/export-onnx)")


def test_every_artifact_is_bit_exact_on_the_data():
    """The run's test data (then training data), plus 256 generated corner cases."""
    report = assert_exact(Path(EXPORT_DIR), samples=2000, corners=256)
    assert report["mismatching_samples"] == 0


def test_every_artifact_is_bit_exact_on_inputs_of_my_own():
    """Your own inputs instead of the data: here random values over twice the input
    type's range (out-of-range values exercise the saturation or wrap-around)."""
    graph = qflow.QGraph.load(Path(EXPORT_DIR) / "model.qgraph")
    t, shape = graph.input_type, graph.tensors[graph.input].shape
    span = t.max_value - t.min_value
    x = np.random.default_rng(0).uniform(t.min_value - span / 2, t.max_value + span / 2,
                                         (500, *shape))
    report = assert_exact(Path(EXPORT_DIR), x, corners=64)
    assert report["sample_kinds"] == {"given": 500, "corner": 64}
