"""Small models on digits, exported for the Ultra96 and C-simulated, for the hls4ml tests
of user-style models (``test_hls_user_models.py``, ``test_hls_depthwise_maxpool.py``).

A model is trained briefly (one epoch on 512 digits, seed 0: exactness does not depend on
accuracy) and frozen; each (model, io type) cell is exported once and its C simulation
run on the digits test set plus 512 corner cases of the input type, to be compared with
the emulator sample by sample.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import qflow
from qflow.config import QFXConfig
from qflow.export import ExportOptions
from qflow.export.hls import export_hls, run_csim
from qflow.graph import Emulator
from qflow.graph.ir import QGraph
from qflow.numerics.corners import corner_inputs
from qflow.targets import load_target
from qflow.train import fit
from qflow.verify.check import compare
from qflow.zoo import DATASETS

ULTRA96 = load_target("ultra96")
IO_TYPES = ("io_parallel", "io_stream")
CORNERS = 512


@functools.cache
def digits():
    return DATASETS["digits"]()


def train_and_freeze(factory: Callable[[], nn.Module], config: QFXConfig | None = None
                     ) -> QGraph:
    """The model ``factory`` builds (seed 0), quantized with ``config`` (default: QFX
    8-bit), trained one epoch on 512 digits and frozen."""
    data = digits()
    torch.manual_seed(0)
    model = qflow.quantize_(factory(), config or QFXConfig())
    fit(model, data.x_train[:512], data.y_train[:512], epochs=1, lr=3e-3, progress=False)
    return qflow.freeze(model.eval(), torch.as_tensor(data.x_test[:4]))


def inputs(graph: QGraph) -> np.ndarray:
    """The digits test set and 512 corner cases of the input type."""
    shape = graph.tensors[graph.input].shape
    return np.concatenate([digits().x_test.astype(np.float64),
                           corner_inputs(graph.input_type, shape, CORNERS)])


@dataclass
class Cell:
    name: str
    io_type: str
    graph: QGraph
    out: Path
    x: np.ndarray
    csim: np.ndarray

    @property
    def report(self) -> dict:
        return json.loads((self.out / "report.json").read_text())


def export_cell(name: str, io_type: str, graph: QGraph, tmp_path_factory) -> Cell:
    """``graph`` exported for the Ultra96 in ``io_type`` and C-simulated on its inputs."""
    out = tmp_path_factory.mktemp(f"{name}-{io_type}")
    export_hls(graph, out, ULTRA96, ExportOptions(io_type=io_type))
    x = inputs(graph)
    return Cell(name, io_type, graph, out, x, run_csim(out / "hls", graph, x))


def csim_mismatches(cell: Cell) -> tuple[int, int]:
    """(samples that differ, largest difference) between the C simulation and the
    emulator; prints the count."""
    bad, max_diff = compare(Emulator(cell.graph).run(cell.x), cell.csim)
    print(f"{cell.name} {cell.io_type}: {bad} of {len(cell.x)} samples differ "
          f"({CORNERS} corner cases)")
    return bad, max_diff


def hls_type(text: str) -> tuple:
    """(signed, width, integer, rounding, overflow) of an hls4ml precision string."""
    m = re.fullmatch(r"(u?)fixed<(\d+),(-?\d+),(\w+),(\w+)(?:,\d+)?>", text)
    assert m, text
    return (m[1] == "", int(m[2]), int(m[3]), m[4], m[5])
