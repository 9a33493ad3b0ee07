"""QGraph files: round trip, corruption, and running without torch."""

import json
import subprocess
import sys

import numpy as np
import pytest
from zoo_fixtures import frozen, test_inputs

from qflow.graph import Emulator, QGraph, QGraphError
from qflow.graph.ir import Node, TensorInfo
from qflow.numerics import FixedType


def test_round_trip_gives_identical_results(tmp_path):
    _, graph = frozen("digits-cnn", "8bit")
    path = graph.save(tmp_path / "m.qgraph")
    loaded = QGraph.load(path)
    assert [n.op for n in loaded.nodes] == [n.op for n in graph.nodes]
    assert {k: v.type for k, v in loaded.tensors.items()} == {
        k: v.type for k, v in graph.tensors.items()}
    x = test_inputs("digits-cnn", 300)
    assert np.array_equal(Emulator(loaded).run(x), Emulator(graph).run(x))


def test_truncated_file_is_refused(tmp_path):
    _, graph = frozen("digits-mlp", "8bit")
    path = graph.save(tmp_path / "m.qgraph")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(QGraphError, match=r"m\.qgraph"):
        QGraph.load(path)


def test_garbage_and_missing_files_are_refused(tmp_path):
    (tmp_path / "g.qgraph").write_bytes(b"not a zip at all")
    with pytest.raises(QGraphError, match="not a readable QGraph"):
        QGraph.load(tmp_path / "g.qgraph")
    with pytest.raises(QGraphError, match="not found"):
        QGraph.load(tmp_path / "missing.qgraph")


def _rewrite_description(path, edit):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    desc = json.loads(arrays["__graph__"].tobytes())
    edit(desc)
    arrays["__graph__"] = np.frombuffer(json.dumps(desc).encode(), dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def test_unknown_op_names_node_and_op(tmp_path):
    _, graph = frozen("digits-mlp", "8bit")
    path = graph.save(tmp_path / "m.qgraph")
    first = graph.nodes[0].name

    def edit(desc):
        desc["nodes"][0]["op"] = "softmax_v9"

    _rewrite_description(path, edit)
    with pytest.raises(QGraphError, match=rf"node '{first}' \(op 'softmax_v9'\): unsupported op"):
        QGraph.load(path)


def test_missing_constant_is_refused(tmp_path):
    _, graph = frozen("digits-mlp", "8bit")
    path = graph.save(tmp_path / "m.qgraph")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files if not k.endswith("/weight")}
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(QGraphError, match="constant 'weight' is missing"):
        QGraph.load(path)


def test_wrong_input_shape_is_refused():
    _, graph = frozen("digits-mlp", "8bit")
    with pytest.raises(QGraphError, match="per-sample shape"):
        Emulator(graph).run(np.zeros((3, 64)))


def test_validate_catches_dangling_input():
    t = FixedType(signed=True, integer=3, fractional=4)
    graph = QGraph("x", "y", {"x": TensorInfo("x", (2,), t), "y": TensorInfo("y", (2,), t)},
                   [Node("cast", "y", ["nowhere"], "y")])
    with pytest.raises(QGraphError, match="input 'nowhere' is not produced"):
        graph.validate()


def test_emulator_runs_without_torch(tmp_path):
    """Everything after freeze runs without torch: block its import and emulate a saved graph."""
    _, graph = frozen("digits-cnn", "4bit")
    path = graph.save(tmp_path / "m.qgraph")
    x = test_inputs("digits-cnn", 50)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", Emulator(graph).run(x))
    script = (
        "import sys, numpy as np\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "from qflow.graph import QGraph, Emulator\n"
        f"g = QGraph.load({str(path)!r})\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"ok = np.array_equal(Emulator(g).run(x), np.load({str(tmp_path / 'expected.npy')!r}))\n"
        "print('torch-free', ok)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch-free True" in result.stdout
