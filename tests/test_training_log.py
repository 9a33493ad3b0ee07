"""`qflow quantize --log tensorboard[:DIR]`: TensorBoard's own reader finds the expected
scalars, one per epoch, equal to the run's history (loss, test accuracy) and to the saved
run's saturation rates; a bad --log value stops before
training with a one-line error."""

import json

import numpy as np
import pytest

pytest.importorskip("tensorboard", reason="pip install qflow[tensorboard]")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qflow.cli.main import main
from qflow.report.stats import cast_statistics
from qflow.runs import freeze_run, load_run_data
from qflow.training_log import SATURATION_SAMPLES


def test_tensorboard_events_hold_every_epoch_of_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "--model", "digits-mlp", "--epochs", "2", "--qat-epochs", "2",
                 "--quiet", "--out", "run", "--log", "tensorboard:tb"]) == 0
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"loss/float", "lr/float", "loss/QAT", "lr/QAT", "oscillation/total",
                "oscillation/fc1", "int_bits/fc1.weight", "int_bits/relu1.output",
                "accuracy/float", "accuracy/QAT", "saturation/total", "saturation/input"}
    assert expected <= tags, sorted(tags)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for phase, history, steps in (("float", metrics["float_history"], [1, 2]),
                                  ("QAT", metrics["qat_history"], [3, 4])):
        scalars = events.Scalars(f"loss/{phase}")
        assert [s.step for s in scalars] == steps
        assert [s.value for s in scalars] == [np.float32(r["loss"]) for r in history]
        accuracy = events.Scalars(f"accuracy/{phase}")
        assert [s.value for s in accuracy] == [np.float32(r["val_accuracy"]) for r in history]
    final = {r["layer"] + "." + r["tensor"]: r["int_width_max"] for r in metrics["formats"]}
    assert events.Scalars("int_bits/fc1.weight")[-1].value == final["fc1.weight"]
    # the last epoch's saturation rates are the saved run's, counted on the same inputs
    graph, info = freeze_run(tmp_path / "run")
    rows = cast_statistics(graph, load_run_data(tmp_path / "run", info).x_test[:SATURATION_SAMPLES])
    for row in rows:
        assert len(events.Scalars(f"saturation/{row['tensor']}")) == 2  # the QAT epochs
        assert events.Scalars(f"saturation/{row['tensor']}")[-1].value == np.float32(
            row["outside"])
    assert any(row["outside_count"] for row in rows)  # else the comparison is moot


def test_an_unknown_logger_exits_2_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "--out", "run", "--log", "wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown logger" in err[0]
    assert not (tmp_path / "run").exists()
