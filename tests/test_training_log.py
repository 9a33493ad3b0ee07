"""`qflow quantize --log tensorboard[:DIR]`: TensorBoard's own reader finds the expected
scalars, one per epoch, equal to the run's history; a bad --log value stops before
training with a one-line error."""

import json

import numpy as np
import pytest

pytest.importorskip("tensorboard", reason="pip install qflow[tensorboard]")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qflow.cli.main import main


def test_tensorboard_events_hold_every_epoch_of_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "--model", "digits-mlp", "--epochs", "2", "--qat-epochs", "2",
                 "--quiet", "--out", "run", "--log", "tensorboard:tb"]) == 0
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"loss/float", "lr/float", "loss/QAT", "lr/QAT", "oscillation/total",
                "oscillation/fc1", "int_bits/fc1.weight", "int_bits/relu1.output"}
    assert expected <= tags, sorted(tags)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for phase, history, steps in (("float", metrics["float_history"], [1, 2]),
                                  ("QAT", metrics["qat_history"], [3, 4])):
        scalars = events.Scalars(f"loss/{phase}")
        assert [s.step for s in scalars] == steps
        assert [s.value for s in scalars] == [np.float32(r["loss"]) for r in history]
    final = {r["layer"] + "." + r["tensor"]: r["int_width_max"] for r in metrics["formats"]}
    assert events.Scalars("int_bits/fc1.weight")[-1].value == final["fc1.weight"]


def test_an_unknown_logger_exits_2_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "--out", "run", "--log", "wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown logger" in err[0]
    assert not (tmp_path / "run").exists()
