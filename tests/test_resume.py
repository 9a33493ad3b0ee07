"""``qflow quantize --resume``: a run killed at a random point (SIGKILL, a real process) and
resumed ends with the same checkpoint as an uninterrupted run; SIGTERM is handled like
SIGINT; resume refuses changed options and sources."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qflow.cli.main import main

# Many small steps (batch 8): each epoch takes a moment, so a kill lands inside one; a
# kill comes within 0.3 s of a phase's first saved epoch, and at least two more epochs
# (each longer than that) follow in every phase.
ARGS = ["quantize", "--epochs", "4", "--qat-epochs", "3", "--batch-size", "8", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _start(cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qflow.cli.main", *ARGS, *extra], cwd=cwd,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _progress(cwd: Path, name: str) -> str:
    try:
        marker = json.loads((cwd / f".{name}.partial" / ".qflow").read_text())
    except (OSError, ValueError):
        return ""
    return marker.get("progress", "")


def _kill_when(proc: subprocess.Popen, cwd: Path, name: str, phase: str, rng: random.Random,
               sig: int = signal.SIGKILL) -> str:
    """Send ``sig`` at a random moment after ``proc`` first saved progress in ``phase``."""
    deadline = time.monotonic() + 120
    while phase not in _progress(cwd, name):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no progress saved"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the next epoch (or at its end)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    return _progress(cwd, name)


def _checkpoint(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("whole")
    proc = _start(cwd, "--out", "run")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return cwd / "run"


def test_killed_twice_then_resumed_equals_an_uninterrupted_run(uninterrupted, tmp_path):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    saved = []
    for phase in ("float training", "QAT"):  # one kill in each phase
        proc = _start(tmp_path, "--out", "run", "--resume")
        saved.append(_kill_when(proc, tmp_path, "run", phase, rng))
        assert proc.returncode == -signal.SIGKILL
        assert not (tmp_path / "run").exists()
    assert saved[0].startswith("saved after epoch") and "of 4 of float training" in saved[0]
    assert "QAT" in saved[1]
    # without --resume the interrupted run is neither lost nor silently restarted
    code = main([*ARGS, "--out", str(tmp_path / "run")])
    assert code == 2
    proc = _start(tmp_path, "--out", "run", "--resume")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resuming" in out
    a, b = _checkpoint(uninterrupted), _checkpoint(tmp_path / "run")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ma = json.loads((uninterrupted / "metrics.json").read_text())
    mb = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("float_history", "qat_history", "float_accuracy", "quantized_accuracy"):
        assert ma[key] == mb[key], key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock, no leftovers
    assert not (tmp_path / "run" / "progress.pt").exists()


def test_sigterm_keeps_progress_and_exits_143(uninterrupted, tmp_path):
    proc = _start(tmp_path, "--out", "run")
    saved = _kill_when(proc, tmp_path, "run", "float training", random.Random(1),
                       sig=signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    assert saved, "progress was not kept"
    assert not (tmp_path / ".run.lock").exists()
    proc = _start(tmp_path, "--out", "run", "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    a, b = _checkpoint(uninterrupted), _checkpoint(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_options_and_says_when_done(uninterrupted, tmp_path, capsys):
    proc = _start(tmp_path, "--out", "run")
    _kill_when(proc, tmp_path, "run", "float training", random.Random(2))
    run = str(tmp_path / "run")
    assert main([*ARGS, "--out", run, "--resume", "--seed", "5"]) == 2
    assert "--seed 5 differs from the interrupted run's (0)" in capsys.readouterr().err
    assert main([*ARGS, "--out", run, "--resume", "--bits", "4"]) == 2
    assert "differ from the interrupted run's config" in capsys.readouterr().err
    assert main([*ARGS, "--out", run, "--resume", "--force"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    # options not given again come from the interrupted run
    assert main(["quantize", "--quiet", "--out", run, "--resume"]) == 0
    assert all(torch.equal(a, b) for a, b in zip(_checkpoint(uninterrupted).values(),
                                                 _checkpoint(tmp_path / "run").values(),
                                                 strict=True))
    capsys.readouterr()
    assert main([*ARGS, "--out", run, "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
