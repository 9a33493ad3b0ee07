"""``qflow quantize`` end to end: run directories, printed report, accuracy acceptance,
determinism, recipes, user models and data, bad input (exit code 2, one line), load_run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qflow.api import describe, quantize_
from qflow.cli.main import main
from qflow.config import QFXConfig
from qflow.runs import load_run
from qflow.train import evaluate
from qflow.zoo import DATASETS, MODELS

RUN_FILES = {"checkpoint.pt", "config.json", "run.json", "metrics.json"}
TINY = ["--epochs", "2", "--qat-epochs", "1", "--quiet"]


def _run_in(cwd: Path, argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process with ``cwd`` as working directory; (code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("COLUMNS", "160")  # rich wraps the table to this width
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _read_run(run: Path) -> tuple[dict, dict, dict]:
    metrics = json.loads((run / "metrics.json").read_text())
    info = json.loads((run / "run.json").read_text())
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    return metrics, info, state


def _table_rows(stdout: str) -> set[tuple[str, ...]]:
    """Body rows of the printed format table, as tuples of cell texts."""
    rows = set()
    for line in stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line)[1:-1]]
        if len(cells) == 7 and cells[0] != "layer":
            rows.add(tuple(cells))
    return rows


def _expected_rows(formats: list[dict]) -> set[tuple[str, ...]]:
    rows = set()
    for f in formats:
        kind = ("ap_fixed" if f["signed"] else "ap_ufixed") + (
            f" {f['khot']}-hot" if f["khot"] else "")
        lo, hi = f["int_width_min"], f["int_width_max"]
        rows.add((f["layer"], f["tensor"], kind, str(f["width"]),
                  str(lo) if lo == hi else f"{lo}..{hi}", f["rounding"], f["overflow"]))
    return rows


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- (a) defaults, acceptance, (f) load_run ---------------------------------------------------


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``qflow quantize`` with no options (default model, data and epochs)."""
    cwd = tmp_path_factory.mktemp("default")
    code, out, err = _run_in(cwd, ["quantize"])
    return cwd, code, out, err


def test_default_run_writes_the_run_directory(default_run):
    cwd, code, _, err = default_run
    assert code == 0, err
    assert sorted(p.name for p in (cwd / "runs").iterdir()) == ["digits-mlp-w8a8-seed0"]
    run = cwd / "runs" / "digits-mlp-w8a8-seed0"
    assert {p.name for p in run.iterdir()} >= RUN_FILES
    metrics, info, state = _read_run(run)
    # the checkpoint is a plain state dict of the quantized digits-mlp
    reference = quantize_(MODELS["digits-mlp"].factory(), QFXConfig())
    assert set(state) == set(reference.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert QFXConfig.from_json((run / "config.json").read_text()) == QFXConfig()
    zoo = MODELS["digits-mlp"]
    assert (info["model"], info["data"], info["seed"]) == ("digits-mlp", "digits", 0)
    assert info["epochs"] == zoo.epochs and info["qat_epochs"] == max(3, zoo.epochs // 2)
    assert 0 <= metrics["quantized_accuracy"] <= 100 and 0 <= metrics["float_accuracy"] <= 100


def test_default_run_prints_accuracies_and_format_table(default_run):
    cwd, code, out, _ = default_run
    assert code == 0
    metrics = json.loads((cwd / "runs/digits-mlp-w8a8-seed0/metrics.json").read_text())
    float_line = re.search(r"float accuracy\s+([\d.]+) %", out)
    quant_line = re.search(r"quantized accuracy\s+([\d.]+) %", out)
    assert float_line and quant_line, out
    assert float_line.group(1) == f"{metrics['float_accuracy']:.2f}"
    assert quant_line.group(1) == f"{metrics['quantized_accuracy']:.2f}"
    rows = _table_rows(out)
    assert rows == _expected_rows(metrics["formats"])
    layers = {(r[0], r[1]) for r in rows}
    assert {("input", "input"), ("fc1", "weight"), ("fc1", "bias"), ("relu1", "output"),
            ("fc2", "weight"), ("relu2", "output"), ("fc3", "weight"), ("fc3", "bias")} <= layers
    assert {r[3] for r in rows if r[1] in ("weight", "output", "input")} == {"8"}


def test_acceptance_8_bit_within_one_point_of_float(default_run):
    cwd, code, _, _ = default_run
    assert code == 0
    metrics = json.loads((cwd / "runs/digits-mlp-w8a8-seed0/metrics.json").read_text())
    assert metrics["float_accuracy"] > 90  # a trained model, else the comparison is moot
    assert abs(metrics["float_accuracy"] - metrics["quantized_accuracy"]) <= 1.0, metrics


def test_load_run_reproduces_the_quantized_accuracy(default_run):
    cwd, code, _, _ = default_run
    assert code == 0
    run = cwd / "runs" / "digits-mlp-w8a8-seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    model, info = load_run(run)
    assert info["model"] == "digits-mlp"
    assert not model.training
    data = DATASETS["digits"]()
    assert evaluate(model, data.x_test, data.y_test) == metrics["quantized_accuracy"]
    assert _expected_rows([r.__dict__ for r in describe(model)]) == \
        _expected_rows(metrics["formats"])


def test_acceptance_4_bit_within_three_points_of_float(tmp_path):
    code, _, err = _run_in(tmp_path, ["quantize", "--bits", "4", "--quiet"])
    assert code == 0, err
    run = tmp_path / "runs" / "digits-mlp-w4a4-seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = QFXConfig.from_json((run / "config.json").read_text())
    assert (cfg.weight.bits, cfg.activation.bits, cfg.input.bits) == (4, 4, 4)
    widths = {(f["tensor"], f["width"]) for f in metrics["formats"]}
    assert ("weight", 4) in widths and ("weight", 8) not in widths
    assert metrics["float_accuracy"] > 90
    assert abs(metrics["float_accuracy"] - metrics["quantized_accuracy"]) <= 3.0, metrics


# -- (b) determinism --------------------------------------------------------------------------


def test_same_seed_gives_identical_runs(tmp_path):
    run = tmp_path / "runs" / "digits-mlp-w8a8-seed3"
    results = []
    for force in ([], ["--force"]):  # the second run replaces the first directory
        code, _, err = _run_in(tmp_path, ["quantize", *TINY, "--seed", "3", *force])
        assert code == 0, err
        results.append(_read_run(run))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [run.name]  # no leftovers
    (m1, _, s1), (m2, _, s2) = results
    for key in ("float_accuracy", "quantized_accuracy", "post_training_accuracy",
                "float_history", "qat_history", "formats"):
        assert m1[key] == m2[key], key
    assert s1.keys() == s2.keys()
    for key in s1:
        assert torch.equal(s1[key], s2[key]), key
    # another seed trains differently, so the comparison above can fail
    code, _, err = _run_in(tmp_path, ["quantize", *TINY, "--seed", "4"])
    assert code == 0, err
    _, _, s3 = _read_run(tmp_path / "runs" / "digits-mlp-w8a8-seed4")
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_quantize_writes_the_report_unless_told_not_to(tmp_path):
    code, out, err = _run_in(tmp_path, ["quantize", *TINY, "--seed", "5"])
    assert code == 0, err
    run = tmp_path / "runs" / "digits-mlp-w8a8-seed5"
    assert f"report: {Path('runs/digits-mlp-w8a8-seed5/report.html')}" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["report"]["sections"] == ["summary", "training", "formats", "values",
                                             "oscillation"]
    # the training curves have the test accuracy of every epoch of every phase
    assert all("val_accuracy" in r for r in metrics["float_history"] + metrics["qat_history"])
    assert metrics["qat_history"][-1]["val_accuracy"] == metrics["quantized_accuracy"]
    code, out, err = _run_in(tmp_path, ["quantize", *TINY, "--seed", "6", "--no-report"])
    assert code == 0, err
    assert "report:" not in out
    assert not (tmp_path / "runs" / "digits-mlp-w8a8-seed6" / "report.html").exists()


# -- (c) recipes ------------------------------------------------------------------------------

RECIPE = """\
version: 1
weight: {bits: 8, signed: true, per_channel: true}
overrides:
  - pattern: fc1
    weight: {bits: 4, rounding: TRN, overflow: WRAP}
  - pattern: "relu[12]"
    activation: {bits: 6, rounding: RND_INF, overflow: SAT_SYM}
  - pattern: fc3
    bias: {bits: 12, overflow: SAT_ZERO}
"""


def test_recipe_overrides_are_honoured(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    code, out, err = _run_in(tmp_path, ["quantize", *TINY, "--recipe", "recipe.yaml"])
    assert code == 0, err
    run = tmp_path / "runs" / "digits-mlp-w8a8-seed0"
    cfg = QFXConfig.from_json((run / "config.json").read_text())
    assert cfg == QFXConfig.from_yaml(RECIPE)
    fc1 = cfg.spec_for("fc1", "weight")
    assert (fc1.bits, str(fc1.rounding), str(fc1.overflow)) == (4, "TRN", "WRAP")

    metrics = json.loads((run / "metrics.json").read_text())
    formats = {(f["layer"], f["tensor"]): f for f in metrics["formats"]}
    expected = {
        ("fc1", "weight"): (4, "TRN", "WRAP"),
        ("fc2", "weight"): (8, "RND_CONV", "SAT"),
        ("fc3", "weight"): (8, "RND_CONV", "SAT"),
        ("relu1", "output"): (6, "RND_INF", "SAT_SYM"),
        ("relu2", "output"): (6, "RND_INF", "SAT_SYM"),
        ("fc3", "bias"): (12, "RND_CONV", "SAT_ZERO"),
        ("fc2", "bias"): (16, "RND_CONV", "SAT"),
    }
    for key, (width, rounding, overflow) in expected.items():
        f = formats[key]
        assert (f["width"], f["rounding"], f["overflow"]) == (width, rounding, overflow), key
    # the printed table says the same
    printed = {(r[0], r[1]): r for r in _table_rows(out)}
    for key, (width, rounding, overflow) in expected.items():
        assert printed[key][3] == str(width) and printed[key][5:] == (rounding, overflow), key
    # and the reloaded model quantizes fc1's weights to 4-bit codes with TRN
    model, _ = load_run(run)
    wq = model.fc1.weight_quant
    types = wq.fixed_types()
    assert {(t.width, str(t.rounding), str(t.overflow)) for t in types} == {(4, "TRN", "WRAP")}
    from qflow.numerics import cast

    w = model.fc1.weight.detach().double().numpy()
    got = wq(model.fc1.weight.double()).detach().numpy()
    for row_w, row_q, t in zip(w, got, types, strict=True):
        assert np.array_equal(row_q, cast(row_w, t))


# -- (d) bad input ----------------------------------------------------------------------------


def _npz(path: Path, *, nan: bool = False) -> None:
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(30, 1, 8, 8)).astype(np.float32)
    if nan:
        x_train[3, 0, 2, 2] = np.nan
    np.savez(path, x_train=x_train, y_train=rng.integers(0, 10, 30),
             x_test=rng.normal(size=(10, 1, 8, 8)).astype(np.float32),
             y_test=rng.integers(0, 10, 10))


BAD_INPUT = [
    # id, argv after "quantize", files to create, words the message must contain
    ("unknown-model", ["--model", "resnet9000"], {}, ["unknown model", "resnet9000"]),
    ("unknown-data", ["--data", "imagenet"], {}, ["unknown data", "imagenet"]),
    ("unknown-recipe-key", ["--recipe", "r.yaml"], {"r.yaml": "weight:\n  bitz: 4\n"},
     ["r.yaml", "config.weight", "bitz"]),
    ("bits-0", ["--bits", "0"], {}, ["bit width 0"]),
    ("bits-33", ["--bits", "33"], {}, ["bit width 33"]),
    ("weight-bits-0", ["--weight-bits", "0"], {}, ["bit width 0"]),
    ("act-bits-33", ["--act-bits", "33"], {}, ["bit width 33"]),
    ("recipe-bits-0", ["--recipe", "r.yaml"], {"r.yaml": "activation: {bits: 0}\n"},
     ["r.yaml", "config.activation", "bit width 0"]),
    ("nan-data", ["--data", "d.npz"], {"d.npz": "nan"}, ["d.npz", "x_train", "non-finite"]),
    ("missing-data-file", ["--data", "nope.npz"], {}, ["not found", "nope.npz"]),
    ("missing-recipe", ["--recipe", "nope.yaml"], {}, ["not found", "nope.yaml"]),
    ("malformed-yaml", ["--recipe", "r.yaml"], {"r.yaml": "weight: {bits: 8\n"},
     ["r.yaml", "malformed YAML"]),
    ("yaml-control-character", ["--recipe", "r.yaml"], {"r.yaml": "version: 1\x07\n"},
     ["r.yaml", "malformed YAML"]),
    ("recipe-not-utf8", ["--recipe", "r.yaml"], {"r.yaml": b"weight: {bits: 8}\n\xff\xfe\n"},
     ["r.yaml"]),
    ("missing-model-file", ["--model", "models/missing.py:factory"], {},
     ["not found", "missing.py"]),
    ("model-file-without-factory", ["--model", "m.py:factory"],
     {"m.py": "def other():\n    pass\n"}, ["m.py", "factory"]),
]


def _create(root: Path, files: dict) -> None:
    for name, content in files.items():
        path = root / name
        if content == "nan":
            _npz(path, nan=True)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


@pytest.mark.parametrize(("argv", "files", "words"), [c[1:] for c in BAD_INPUT],
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys, argv, files, words):
    _create(tmp_path, files)
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main(["quantize", *argv])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("qflow quantize: error: ")
    assert "Traceback" not in captured.err
    for word in words:
        assert word in lines[0], lines[0]
    assert _snapshot(tmp_path) == before  # no run directory, no temporary directory


SUBPROCESS_CASES = ["unknown-model", "nan-data", "malformed-yaml"]


def test_bad_input_exit_codes_from_a_real_process(tmp_path):
    cases = {c[0]: c for c in BAD_INPUT if c[0] in SUBPROCESS_CASES}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    procs = {}
    for name, (_, argv, files, _) in cases.items():
        cwd = tmp_path / name
        cwd.mkdir()
        _create(cwd, files)
        procs[name] = (cwd, _snapshot(cwd), subprocess.Popen(
            [sys.executable, "-m", "qflow.cli.main", "quantize", *argv], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for name, (cwd, before, proc) in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, err)
        assert "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qflow quantize: error: "), err
        for word in cases[name][3]:
            assert word in lines[0], (name, lines[0])
        assert _snapshot(cwd) == before, name


# -- (e) user model file and data file, (f) load_run -------------------------------------------

MODEL_FILE = """\
from torch import nn


def build():
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
"""


def test_model_file_and_npz_data(tmp_path):
    (tmp_path / "tiny_model.py").write_text(MODEL_FILE)
    rng = np.random.default_rng(1)
    x_train = rng.normal(size=(120, 5)).astype(np.float32)
    x_test = rng.normal(size=(45, 5)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x_train=x_train, y_train=x_train[:, :3].argmax(axis=1),
             x_test=x_test, y_test=x_test[:, :3].argmax(axis=1))
    code, out, err = _run_in(tmp_path, ["quantize", "--model", "tiny_model.py:build",
                                        "--data", "data.npz", *TINY])
    assert code == 0, err
    run = tmp_path / "runs" / "tiny_model-w8a8-seed0"
    assert {p.name for p in run.iterdir()} >= RUN_FILES
    metrics, info, state = _read_run(run)
    assert info["model"] == "tiny_model.py:build" and info["data"] == "data.npz"
    assert info["input_shape"] == [5] and info["epochs"] == 2 and info["qat_epochs"] == 1
    assert "0.weight" in state and "qflow_input.quant.integer_bits" in state
    assert "quantized accuracy" in out
    # (f) the rebuilt model scores exactly what metrics.json says
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        model, _ = load_run(Path("runs") / "tiny_model-w8a8-seed0")
    assert evaluate(model, x_test, x_test[:, :3].argmax(axis=1)) == \
        metrics["quantized_accuracy"]
    assert evaluate(model, x_train, x_train[:, :3].argmax(axis=1)) > 0
