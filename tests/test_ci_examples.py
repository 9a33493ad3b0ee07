"""The CI examples in docs/examples work as written: the GitHub Actions workflow's qflow
steps run (in a scratch folder with a model file and a data file of its own) and pass,
and the pytest example passes on a good export, fails with the table on a tampered one,
and skips with a reason when no export is given."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import numpy_helper

from qflow.export.manifest import digest_files

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
WORKFLOW = EXAMPLES / "qflow-ci.yml"
PYTEST_EXAMPLE = EXAMPLES / "test_bit_exact.py"

MODEL_FILE = '''"""An unnamed MLP for 8x8 digits."""
from torch import nn


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
'''


def _env(**extra) -> dict:
    """This interpreter's scripts (qflow, pytest) first on PATH, as after `pip install`."""
    env = {k: v for k, v in os.environ.items() if k != "QFLOW_EXPORT_DIR"}
    env.update(extra)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _steps() -> list[dict]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    (job,) = workflow["jobs"].values()
    return job["steps"]


def _runs_here(command: str) -> bool:
    """The steps this test runs: qflow's own; installing software is left to CI."""
    return command.startswith(("qflow", "QFLOW_EXPORT_DIR"))


def test_workflow_structure():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert {"push", "pull_request"} <= set(triggers)
    (job,) = workflow["jobs"].values()
    assert job["runs-on"].startswith("ubuntu")
    steps = job["steps"]
    uses = [s.get("uses", "") for s in steps]
    assert uses[0].startswith("actions/checkout@")
    setup = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert str(setup["with"]["python-version"]) == "3.11"
    runs = [s["run"].strip() for s in steps if "run" in s]
    install = next(r for r in runs if "pip install" in r)
    assert "qflow" in install and "pytest" in install
    commands = [r for r in runs if _runs_here(r)]
    assert [shlex.split(c)[:2] for c in commands] == [
        ["qflow", "quantize"], ["qflow", "export"], ["qflow", "verify"],
        ["QFLOW_EXPORT_DIR=runs/ci/export-onnx", "pytest"]]
    assert commands[0] == ("qflow quantize --model models/net.py:build --data data/train.npz "
                           "--epochs 3 --qat-epochs 2 --out runs/ci --force")
    assert commands[2] == "qflow verify runs/ci/export-onnx --json > verify-report.json"
    assert commands[3].endswith("pytest docs/examples/test_bit_exact.py")
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()" and "verify-report.json" in upload["with"]["path"]


@pytest.fixture(scope="module")
def workflow_dir(tmp_path_factory):
    """A scratch checkout: models/net.py, data/train.npz (digits), the pytest example;
    then every qflow step of the workflow, run as written (only the folder differs)."""
    from sklearn.datasets import load_digits

    work = tmp_path_factory.mktemp("ci")
    (work / "models").mkdir()
    (work / "models" / "net.py").write_text(MODEL_FILE)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    (work / "data").mkdir()
    np.savez(work / "data" / "train.npz", x_train=x[:300], y_train=digits.target[:300],
             x_test=x[300:420], y_test=digits.target[300:420])
    (work / "docs" / "examples").mkdir(parents=True)
    shutil.copy(PYTEST_EXAMPLE, work / "docs" / "examples" / PYTEST_EXAMPLE.name)
    results = []
    # the install steps are not run: this environment already has qflow and pytest
    for command in (s["run"].strip() for s in _steps() if "run" in s):
        if not _runs_here(command):
            continue
        done = subprocess.run(["bash", "-c", command], cwd=work, env=_env(),
                              capture_output=True, text=True, timeout=600)
        results.append((command, done))
        if done.returncode:
            break
    return work, results


def test_workflow_steps_pass(workflow_dir):
    work, results = workflow_dir
    assert len(results) == 4
    for command, done in results:
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    report = json.loads((work / "verify-report.json").read_text())  # the verify step's
    assert report["directory"] == "runs/ci/export-onnx" and report["passed"]
    assert report["mismatching_samples"] == 0
    assert {r["artifact"]: r["status"] for r in report["results"]} == {
        "emulator (reference)": "ok", "QAT model (torch eval)": "ok",
        "qonnx": "ok", "int_onnx": "ok"}
    assert "2 passed" in results[-1][1].stdout


def _pytest_example(env_dir: Path | None, cwd: Path):
    extra = {"QFLOW_EXPORT_DIR": str(env_dir)} if env_dir else {}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           str(PYTEST_EXAMPLE)], cwd=cwd, env=_env(**extra),
                          capture_output=True, text=True, timeout=600)


def test_pytest_example_skips_without_an_export(tmp_path):
    done = _pytest_example(None, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 skipped" in done.stdout and "QFLOW_EXPORT_DIR is not set" in done.stdout


def test_pytest_example_fails_with_the_table_on_a_tampered_export(workflow_dir, tmp_path):
    work, _ = workflow_dir
    export = Path(shutil.copytree(work / "runs/ci/export-onnx", tmp_path / "export"))
    model = onnx.load(export / "model.int.onnx")
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(init).copy()
    values[...] = values + 1  # every weight code one LSB up: every sample differs
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, export / "model.int.onnx")
    info = json.loads((export / "export.json").read_text())
    info["files"] = digest_files(export)  # as if exported so: it runs, and disagrees
    (export / "export.json").write_text(json.dumps(info))
    done = _pytest_example(export, work)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "2 failed" in done.stdout
    assert "mismatching samples" in done.stdout and "int_onnx" in done.stdout
