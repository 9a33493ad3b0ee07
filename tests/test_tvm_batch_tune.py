"""TVM build options: a fixed batch size (``--batch N``) and bounded tile tuning
(``--tune TRIALS``, ``--tune-log FILE``). Both builds equal the emulator on a number of
samples that is not a multiple of the batch; tuning spends no more than its budget, logs
what it measured, and a later export takes the logged tiles without measuring; options
a target does not take are refused in one line, exit 2, before anything is written."""

import json

import numpy as np
import pytest
from zoo_fixtures import frozen

pytest.importorskip("tvm", reason="TVM is not installed (pip install qflow[tvm])")

from qflow.cli.main import main
from qflow.export import ExportOptions, export
from qflow.export.tvm import run_tvm
from qflow.export.tvm.schedule import tile_candidates
from qflow.graph.emulator import Emulator
from qflow.numerics import to_codes
from qflow.targets import load_target


def _mismatches(graph, directory, samples: int) -> int:
    x = np.random.default_rng(3).uniform(-2, 2, (samples, *graph.tensors[graph.input].shape))
    expected = Emulator(graph).run_codes(to_codes(x, graph.input_type))
    got = run_tvm(directory / "tvm", graph, x)
    return int((got != expected).reshape(samples, -1).any(axis=1).sum())


def test_fixed_batch_build_takes_any_number_of_samples(tmp_path):
    _, graph = frozen("digits-mlp", "8bit")
    export(graph, tmp_path, load_target("cpu"), ExportOptions(batch=3))
    build = json.loads((tmp_path / "tvm" / "build.json").read_text())
    assert build["batch"] == 3 and build["tuning"] is None
    assert _mismatches(graph, tmp_path, 7) == 0  # calls of 3, 3 and 1 padded to 3
    assert _mismatches(graph, tmp_path, 1) == 0


def test_tuning_keeps_its_budget_and_a_later_export_reuses_the_log(tmp_path):
    _, graph = frozen("digits-cnn", "8bit")
    messages: list[str] = []
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    export(graph, first, load_target("cpu"),
           ExportOptions(tune_trials=7, progress=messages.append))
    log = json.loads((first / "tvm" / "tuning.json").read_text())
    assert log["format"] == "qflow-tvm-tuning/1" and 0 < log["trials"] <= 7
    measured = sum(len(e["microseconds"]) for e in log["functions"].values())
    assert measured == log["trials"]
    assert all(e["microseconds"][f"{e['tiles'][0]}x{e['tiles'][1]}"]
               == min(e["microseconds"].values()) for e in log["functions"].values())
    assert json.loads((first / "tvm" / "build.json").read_text())["tuning"]["trials"] \
        == log["trials"]
    assert any("TVM tuning:" in m for m in messages)
    assert _mismatches(graph, first, 50) == 0

    messages.clear()
    export(graph, second, load_target("cpu"),
           ExportOptions(tune_log=first / "tvm" / "tuning.json", progress=messages.append))
    again = json.loads((second / "tvm" / "tuning.json").read_text())
    assert again["trials"] == 0
    assert {k: e["tiles"] for k, e in again["functions"].items()} == \
        {k: e["tiles"] for k, e in log["functions"].items()}
    assert any(f"{len(log['functions'])} layers from the tuning log" in m for m in messages)
    assert _mismatches(graph, second, 50) == 0


def test_tile_candidates_start_with_the_default_and_divide_the_layer(tmp_path):
    import onnx
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline
    from tvm.relax.frontend.onnx import from_onnx

    from qflow.export.int_onnx import INPUT_NAME, export_int_onnx
    from qflow.export.tvm import frontend
    from qflow.export.tvm.schedule import CHANNEL_TILES, COLUMN_TILES, NARROW_CHANNEL_TILES

    _, graph = frozen("digits-cnn", "8bit")
    export_int_onnx(graph, tmp_path / "m.onnx")
    model = onnx.load(tmp_path / "m.onnx")
    frontend.register_converters()
    target = tvm.target.Target({"kind": "llvm"})
    with target:
        mod = tvm.transform.Sequential(pipeline.library_dispatch_passes(target)
                                       + pipeline.legalize_passes(target))(
            from_onnx(model, dtype_dict={INPUT_NAME: "int64"}))
    convs = [f for gv, f in mod.functions.items() if gv.name_hint.startswith("fused_conv2d")]
    assert convs
    for func in convs:
        candidates = tile_candidates(func)
        assert len(candidates) == len(set(candidates)) > 1
        channels, columns = (int(d) for d in func.params[-1].shape[1:4:2])
        column = next(t for t in COLUMN_TILES if columns % t == 0)
        # narrow layers (no full vector of columns) take more filters per tile
        channel_tiles = CHANNEL_TILES if column == COLUMN_TILES[0] else NARROW_CHANNEL_TILES
        assert candidates[0] == (next(t for t in channel_tiles if channels % t == 0), column)
        assert all(channels % c == 0 and columns % w == 0 for c, w in candidates)


@pytest.mark.parametrize("args, words", [
    (["--target", "cpu", "--batch", "0"], "--batch must be an integer >= 1"),
    (["--target", "ultra96", "--batch", "4"], "only apply to TVM targets"),
    (["--target", "onnx", "--tune", "8"], "only apply to TVM targets"),
    (["--target", "arm64", "--tune", "8"], "arm64 is not one"),
    (["--target", "cpu", "--tune", "-1"], "--tune must be an integer >= 0"),
    (["--target", "cpu", "--tune-log", "missing.json"], "no such file"),
    (["--target", "cpu", "--tune-log", "bad.json"], "not a qflow tuning log"),
])
def test_build_options_a_target_does_not_take_exit_2_in_one_line(tmp_path, capsys,
                                                                   monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "run"), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_a_loaded_build_keeps_results_apart_across_calls_and_threads(tmp_path):
    """The runner reuses one input buffer between calls: results must not alias it or
    each other, calls of other sizes must not read stale codes, and threads calling one
    model must each get their own inputs' outputs."""
    from concurrent.futures import ThreadPoolExecutor

    from qflow.export.tvm.runner import load

    _, graph = frozen("digits-mlp", "8bit")
    t, shape = graph.input_type, graph.tensors[graph.input].shape
    inputs = [np.random.default_rng(seed).integers(t.qmin, t.qmax + 1, (size, *shape))
              for seed, size in enumerate([3, 3, 1, 5, 2, 3])]
    expected = [Emulator(graph).run_codes(x) for x in inputs]
    assert not np.array_equal(expected[0], expected[1])  # so a stale input would show
    for batch in (3, None):
        out = tmp_path / f"batch-{batch}"
        out.mkdir()
        export(graph, out, load_target("cpu"), ExportOptions(batch=batch))
        model = load(out / "tvm")
        results = [model(x) for x in inputs]  # every earlier result kept while later calls run
        assert [int((r != e).any(axis=1).sum())
                for r, e in zip(results, expected, strict=True)] == [0] * 6
        with ThreadPoolExecutor(4) as pool:
            threaded = list(pool.map(model, inputs * 8))
        assert sum(int((r != e).any(axis=1).sum())
                   for r, e in zip(threaded, expected * 8, strict=True)) == 0
