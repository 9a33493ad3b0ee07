"""Data-parallel QAT: two torchrun processes (gloo) against one at the same global batch.

tests/ddp_worker.py trains a zoo model for 4 steps of global batch 96, once in one
process and once in two (48 samples each). The processes must end identical to each
other, bit for bit; against the single process, every float tensor within 1e-4 of that
tensor's largest magnitude (the sums run in another order: float32 rounding), every
integer tensor equal, and the frozen QGraphs equal: the same integer constants and the
same type on every edge.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import qflow
from qflow.graph.from_torch import freeze
from qflow.zoo import DATASETS, MODELS

WORKER = Path(__file__).with_name("ddp_worker.py")
TOLERANCE = 1e-4  # of each float tensor's largest magnitude


def _run(*command: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *command], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _model(name: str, state: dict) -> torch.nn.Module:
    zoo = MODELS[name]
    model = zoo.factory()
    qflow.quantize_(model, qflow.QFXConfig() if zoo.method == "qfx" else qflow.BiPerConfig())
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("name", ["digits-cnn", "binary-cnn"])
def test_two_processes_train_as_one(name, tmp_path):
    _run(str(WORKER), name, str(tmp_path))
    _run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
         name, str(tmp_path))
    single, rank0, rank1 = (torch.load(tmp_path / f"{n}.pt", weights_only=True)
                            for n in ("single", "rank0", "rank1"))
    assert rank0.keys() == rank1.keys() == single.keys()
    assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []
    worst = {}
    for key, ref in single.items():
        if ref.dtype.is_floating_point:
            peak = max(float(ref.abs().max()), 1e-12) if ref.numel() else 1.0
            worst[key] = float((rank0[key] - ref).abs().max()) / peak if ref.numel() else 0.0
        else:
            assert torch.equal(rank0[key], ref), key
    assert max(worst.values()) <= TOLERANCE, sorted(worst.items(), key=lambda kv: kv[1])[-3:]
    assert any(v > 0 for v in worst.values())  # two processes did sum in another order

    x = torch.as_tensor(DATASETS[MODELS[name].data]().x_test[:8], dtype=torch.float32)
    one, two = (freeze(_model(name, state), x) for state in (single, rank0))
    assert [n.name for n in one.nodes] == [n.name for n in two.nodes]
    differing = [(a.name, key) for a, b in zip(one.nodes, two.nodes, strict=True)
                 for key in a.consts
                 if not np.array_equal(a.consts[key], b.consts[key])]
    assert differing == []
    assert {t: one.tensors[t].type for t in one.tensors} == {
        t: two.tensors[t].type for t in two.tensors}


def test_hutchinson_traces_are_data_parallel(tmp_path):
    # each process probes its half of the batch; the products are summed over the group
    _run(str(WORKER), "hutchinson", str(tmp_path))
    _run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
         "hutchinson", str(tmp_path))
    single, rank0, rank1 = (torch.load(tmp_path / f"traces-{n}.pt", weights_only=True)
                            for n in ("single", "rank0", "rank1"))
    assert torch.equal(rank0["traces"], rank1["traces"]) and int(rank0["probes"]) == 20
    assert torch.allclose(rank0["traces"], single["traces"], rtol=1e-4, atol=0)


# -- the command line --------------------------------------------------------------------
ARGS = ["quantize", "--epochs", "2", "--qat-epochs", "2", "--batch-size", "8", "--quiet",
        "--nproc", "2"]


def _start(cwd: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "-m", "qflow", *ARGS, *extra], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _progress(cwd: Path) -> str:
    try:
        return json.loads((cwd / ".run.partial" / ".qflow").read_text()).get("progress", "")
    except (OSError, ValueError):
        return ""


def _tree(root: int) -> list[int]:
    """``root`` and every process below it (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += [child for child, parent in parents.items() if parent == pid]
    return found


def test_nproc_2_writes_one_run_and_resumes_exactly(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    proc = _start(whole, "--out", "run")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert sorted(p.name for p in whole.iterdir()) == ["run"]  # rank 0 wrote, nothing else
    info = json.loads((whole / "run" / "run.json").read_text())
    assert (info["processes"], info["device"], info["batch_size"]) == (2, "cpu", 8)

    # killed (the whole process group: torchrun and both processes) inside QAT, resumed
    proc = _start(cut, "--out", "run")
    deadline = time.monotonic() + 300
    while "QAT" not in _progress(cut):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no QAT progress saved"
        time.sleep(0.01)
    for pid in _tree(proc.pid):  # torchrun starts its workers in their own sessions
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (cut / "run").exists()
    proc = _start(cut, "--out", "run", "--resume")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming" in out
    a, b = (torch.load(d / "run" / "checkpoint.pt", weights_only=True) for d in (whole, cut))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert sorted(p.name for p in cut.iterdir()) == ["run"]


def test_ctrl_c_stops_every_process_keeps_progress_and_exits_130(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qflow", "quantize", "--epochs", "40",
                             "--batch-size", "8", "--quiet", "--nproc", "2", "--out", "run"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while "float training" not in _progress(tmp_path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no progress saved"
        time.sleep(0.01)
    tree = _tree(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err
    assert "saved after epoch" in _progress(tmp_path)  # continues with --resume
    time.sleep(1)
    assert [pid for pid in tree if Path(f"/proc/{pid}").exists()] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present here")
def test_device_cuda_is_refused_without_a_gpu(tmp_path, capsys):
    from qflow.cli.main import main

    assert main(["quantize", "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qflow quantize: error: --device cuda: no CUDA device is available here "
                   f"(torch {torch.__version__}, torch.cuda.is_available() is False)"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
    (["--nproc", "0"], "--nproc must be >= 1, got 0"),
])
def test_bad_device_or_process_count(args, message, tmp_path, capsys):
    from qflow.cli.main import main

    assert main(["quantize", *args, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"qflow quantize: error: {message}"
    assert list(tmp_path.iterdir()) == []
