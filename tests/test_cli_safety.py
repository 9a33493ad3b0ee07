"""Never lose a user's data: every reproduction of a data-loss, traceback or silently
accepted input, as a table of command -> exit code and the words of the one-line error,
plus the output rules (force, locks, leftovers, read-only), self-contained runs and the
Python API's calibrate."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qflow.cli import quantize as quantize_cli
from qflow.cli.main import main
from qflow.zoo import DATASETS

TINY = ["--epochs", "1", "--qat-epochs", "1", "--quiet"]


def _main(cwd: Path, argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process with ``cwd`` as working directory; (code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("COLUMNS", "160")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def made_run(tmp_path_factory) -> Path:
    """A finished run of a user model file and a user npz (relative paths), made once."""
    root = tmp_path_factory.mktemp("made")
    (root / "net.py").write_text(
        "from torch import nn\n\n\ndef build():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))\n")
    d = DATASETS["digits"]()
    np.savez(root / "ok.npz", x_train=d.x_train[:600], y_train=d.y_train[:600],
             x_test=d.x_test[:200], y_test=d.y_test[:200])
    code, _, err = _main(root, ["quantize", "--model", "net.py:build", "--data", "ok.npz",
                                *TINY, "--out", "run"])
    assert code == 0, err
    return root


@pytest.fixture
def user_dir(made_run, tmp_path) -> Path:
    """A fresh copy of the made run's directory (model file, data and run)."""
    work = tmp_path / "work"
    shutil.copytree(made_run, work)
    # the run records absolute paths: point them at this copy's files
    info = json.loads((work / "run" / "run.json").read_text())
    for key in ("model", "data"):
        spec = info["sources"][key]["spec"]
        info["sources"][key]["spec"] = spec.replace(str(made_run), str(work))
        if "file" in info["sources"][key]:
            info["sources"][key]["file"] = info["sources"][key]["file"].replace(
                str(made_run), str(work))
    (work / "run" / "run.json").write_text(json.dumps(info))
    return work


def _deep_yaml() -> str:
    return "weight: " + "[" * 100_000 + "]" * 100_000 + "\n"


def _npz(path: Path, *, scale: float = 1.0, test_scale: float = 1.0, label_shift: int = 0,
         dtype=np.float32) -> None:
    d = DATASETS["digits"]()
    y_train = d.y_train[:300].copy()
    y_train[0] = 9 + label_shift
    np.savez(path, x_train=(d.x_train[:300].astype(np.float64) * scale).astype(dtype),
             y_train=y_train,
             x_test=(d.x_test[:100].astype(np.float64) * test_scale).astype(dtype),
             y_test=d.y_test[:100])


def _target_file(path: Path, change: str) -> None:
    """A copy of targets/ultra96.yaml named after ``path`` with one ``key: value`` changed
    (a top-level key, or a resource inside the one-line resources mapping)."""
    text = (Path(__file__).parent.parent / "targets" / "ultra96.yaml").read_text()
    key = change.partition(": ")[0]
    changed = re.sub(rf"^{key}:.*$", change, text, count=1, flags=re.MULTILINE)
    if changed == text:
        changed = re.sub(rf"\b{key}: \w+", change, text, count=1)
    assert changed != text, change
    path.write_text(changed.replace("name: ultra96", f"name: {path.stem}"))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


#: id -> (setup(work), argv, exit code, words the one line must contain)
CASES = {
    # -- data loss and output handling
    "out-user-folder": (lambda w: (w / "mydocs").mkdir() or (w / "mydocs/thesis.txt")
                        .write_text("x"), ["quantize", *TINY, "--out", "mydocs"], 2,
                        ["mydocs", "not empty", "--force"]),
    "out-user-folder-force": (lambda w: (w / "mydocs").mkdir() or (w / "mydocs/thesis.txt")
                              .write_text("x"), ["quantize", *TINY, "--out", "mydocs",
                                                 "--force"], 2,
                              ["mydocs", "qflow did not make it"]),
    "export-into-run": (None, ["export", "run", "--target", "onnx", "--out", "run"], 2,
                        ["is the run being read"]),
    "export-into-run-parent": (None, ["export", "run", "--target", "onnx", "--out", "."], 2,
                               ["current directory"]),
    "export-over-runs-parent": (lambda w: (w / "runs").mkdir() or shutil.move(
        w / "run", w / "runs" / "run"), ["export", "runs/run", "--target", "onnx", "--out",
                                         "runs", "--force"], 2,
        ["holds the run being read"]),
    "requantize-same-out": (None, ["quantize", *TINY, "--model", "net.py:build", "--data",
                                   "ok.npz", "--out", "run"], 2, ["run", "not empty"]),
    "force-run-holding-user-file": (lambda w: (w / "run" / "notes.txt").write_text("mine"),
                                    ["quantize", *TINY, "--out", "run", "--force"], 2,
                                    ["notes.txt", "qflow did not write"]),
    "force-export-as-run": (None, ["quantize", *TINY, "--out", "run/export-x", "--force"],
                            None, None),  # placeholder replaced below
    "out-is-a-file": (lambda w: (w / "afile.txt").write_text("keep"),
                      ["quantize", *TINY, "--out", "afile.txt"], 2,
                      ["afile.txt", "not a directory"]),
    "out-is-cwd": (None, ["quantize", *TINY, "--out", "."], 2, ["current directory"]),
    "out-is-a-symlink": (lambda w: (w / "link").symlink_to(w / "run"),
                         ["quantize", *TINY, "--out", "link", "--force"], 2,
                         ["link", "symbolic link"]),
    # -- tracebacks where a one-line error is promised
    "builder-raises": (lambda w: (w / "bad.py").write_text(
        "def build():\n    raise ValueError('no such layer size')\n"),
        ["quantize", *TINY, "--model", "bad.py:build"], 2,
        ["bad.py:build", "ValueError", "no such layer size"]),
    "lr-nan": (None, ["quantize", *TINY, "--lr", "nan"], 2, ["--lr", "nan"]),
    "lr-negative": (None, ["quantize", *TINY, "--lr", "-1"], 2, ["--lr", "-1"]),
    "lr-inf": (None, ["quantize", *TINY, "--lr", "inf"], 2, ["--lr", "inf"]),
    "seed-huge": (None, ["quantize", *TINY, "--seed", "99999999999999999999"], 2,
                  ["--seed", "99999999999999999999"]),
    "data-function-needs-arguments": (None, ["quantize", *TINY, "--data", "json:loads"], 2,
                                      ["json:loads", "TypeError"]),
    "recipe-100k-deep": (lambda w: (w / "deep.yaml").write_text(_deep_yaml()),
                         ["quantize", *TINY, "--recipe", "deep.yaml"], 2,
                         ["deep.yaml", "deep"]),
    "run-json-wrong-input-shape": (lambda w: _edit_json(w / "run/run.json", input_shape=[3, 5]),
                                   ["export", "run", "--target", "onnx"], 2,
                                   ["input_shape", "[3, 5]", "does not fit"]),
    "run-json-input-shape-not-a-list": (lambda w: _edit_json(w / "run/run.json",
                                                             input_shape="64"),
                                        ["export", "run", "--target", "onnx"], 2,
                                        ["input_shape", "positive integers"]),
    "target-defaults-a-list": (lambda w: _target_file(w / "board.yaml",
                                                      "defaults: [io_parallel]"),
                               ["export", "run", "--target-file", "board.yaml"], 2,
                               ["board.yaml", "defaults"]),
    "target-part-a-number": (lambda w: _target_file(w / "board.yaml", "part: 12345"),
                             ["export", "run", "--target-file", "board.yaml"], 2,
                             ["board.yaml", "part"]),
    "target-processing-system-a-number": (
        lambda w: _target_file(w / "board.yaml", "processing_system: 7"),
        ["export", "run", "--target-file", "board.yaml"], 2,
        ["board.yaml", "processing_system"]),
    "target-path-outside-targets": (None, ["export", "run", "--target", "../../x/evil"], 2,
                                    ["../../x/evil", "--target-file"]),
    "x-train-beyond-float32": (lambda w: _npz(w / "big.npz", scale=1e39, dtype=np.float64),
                               ["quantize", *TINY, "--data", "big.npz"], 2,
                               ["big.npz", "x_train", "1e+39"]),
    "x-test-beyond-float32": (lambda w: _npz(w / "big.npz", test_scale=1e39, dtype=np.float64),
                              ["quantize", *TINY, "--data", "big.npz"], 2,
                              ["big.npz", "x_test", "1e+39"]),
    # -- silently accepted before
    "recipe-duplicate-key": (lambda w: (w / "dup.yaml").write_text(
        "weight: {bits: 4}\nweight: {bits: 6}\n"), ["quantize", *TINY, "--recipe", "dup.yaml"],
        2, ["dup.yaml", "duplicate", "weight"]),
    "override-matches-no-layer": (lambda w: (w / "r.yaml").write_text(
        "overrides:\n  - pattern: fc9\n    weight: {bits: 4}\n"),
        ["quantize", *TINY, "--recipe", "r.yaml"], 2, ["'fc9'", "matches no layer"]),
    "target-dsp-true": (lambda w: _target_file(w / "board.yaml", "dsp: true"),
                        ["export", "run", "--target-file", "board.yaml"], 2,
                        ["board.yaml", "resources"]),
    "data-times-1e30": (lambda w: _npz(w / "big.npz", scale=1e30),
                        ["quantize", *TINY, "--data", "big.npz"], 2,
                        ["big.npz", "1e+30", "scale the data"]),
    "reuse-with-onnx-target": (None, ["export", "run", "--target", "onnx", "--reuse", "4"], 2,
                               ["--reuse", "FPGA", "onnx"]),
    "io-type-with-cpu-target": (None, ["export", "run", "--target", "cpu", "--io-type",
                                       "stream"], 2, ["--io-type", "FPGA", "cpu"]),
    "config-edited-beside-checkpoint": (
        lambda w: (w / "run/config.json").write_text((w / "run/config.json").read_text()
                                                     .replace('"bits": 8', '"bits": 4')),
        ["export", "run", "--target", "onnx"], 2, ["config.json", "changed"]),
    "model-file-edited": (lambda w: (w / "net.py").write_text(
        (w / "net.py").read_text().replace("16", "17")),
        ["export", "run", "--target", "onnx"], 2, ["net.py", "changed"]),
    "data-file-replaced": (lambda w: _npz(w / "ok.npz"), ["export", "run", "--target", "onnx"],
                           2, ["ok.npz", "changed"]),
    # -- unclear messages before
    "label-out-of-range": (lambda w: _npz(w / "labels.npz", label_shift=1),
                           ["quantize", *TINY, "--data", "labels.npz"], 2,
                           ["y_train has label 10", "10 outputs", "0..9"]),
    "empty-checkpoint": (lambda w: (w / "run/checkpoint.pt").write_bytes(b""),
                         ["export", "run", "--target", "onnx"], 2,
                         ["checkpoint.pt", "changed"]),
    "unsupported-layer": (lambda w: (w / "tanh.py").write_text(
        "from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Flatten(), "
        "nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))\n"),
        ["quantize", *TINY, "--model", "tanh.py:build"], 2, ["2 (Tanh)", "no exact"]),
}
CASES["force-export-as-run"] = (
    lambda w: _main(w, ["export", "run", "--target", "onnx"]),
    ["quantize", *TINY, "--out", "run/export-onnx", "--force"], 2,
    ["export-onnx", "qflow export, not a run"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_touches_nothing(user_dir, monkeypatch, case):
    setup, argv, code_expected, words = CASES[case]
    if setup is not None:
        setup(user_dir)
    before = _tree(user_dir)

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the input is bad")

    monkeypatch.setattr(quantize_cli, "fit", no_training)
    code, _, err = _main(user_dir, argv)
    assert code == code_expected, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"qflow {argv[0]}: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert _tree(user_dir) == before  # the user's files intact, nothing added


def test_table_covers_every_case_of_the_issue():
    """Each reproduction of the issue has its row (the verify cases live in
    tests/test_verify_contract.py, resume in tests/test_resume.py)."""
    assert len(CASES) >= 38


# -- documented behaviour ---------------------------------------------------------------------


def test_bits_beside_a_recipe_says_which_wins(user_dir):
    (user_dir / "r4.yaml").write_text("weight: {bits: 4}\nactivation: {bits: 4}\n"
                                      "input: {bits: 4}\n")
    code, out, err = _main(user_dir, ["quantize", *TINY, "--recipe", "r4.yaml", "--bits", "8",
                                      "--out", "r8"])
    assert code == 0, err
    assert ("replace the recipe's: QFX, weights 4-bit, activations 4-bit -> QFX, weights 8-bit, "
            "activations 8-bit") in " ".join(out.split())
    config = json.loads((user_dir / "r8" / "config.json").read_text())
    assert config["weight"]["bits"] == 8 and config["activation"]["bits"] == 8


def test_force_replaces_a_run_and_names_its_exports(user_dir):
    code, _, err = _main(user_dir, ["export", "run", "--target", "onnx"])
    assert code == 0, err
    old = (user_dir / "run" / "checkpoint.pt").read_bytes()
    code, out, err = _main(user_dir, ["quantize", *TINY, "--model", "net.py:build", "--data",
                                      "ok.npz", "--seed", "1", "--out", "run", "--force"])
    assert code == 0, err
    assert "replacing run and what qflow wrote into it (export-onnx)" in " ".join(out.split())
    assert (user_dir / "run" / "checkpoint.pt").read_bytes() != old
    assert not (user_dir / "run" / "export-onnx").exists()
    assert sorted(p.name for p in user_dir.iterdir() if p.name.startswith(".")) == []


def test_reexport_needs_force_and_force_replaces_only_the_export(user_dir):
    assert _main(user_dir, ["export", "run", "--target", "onnx"])[0] == 0
    run_files = _tree(user_dir / "run")
    code, _, err = _main(user_dir, ["export", "run", "--target", "onnx"])
    assert code == 2 and "not empty" in err
    code, _, err = _main(user_dir, ["export", "run", "--target", "onnx", "--force"])
    assert code == 0, err
    after = _tree(user_dir / "run")
    assert {k: v for k, v in after.items() if not k.startswith("export-onnx")} == \
        {k: v for k, v in run_files.items() if not k.startswith("export-onnx")}


def test_second_writer_is_refused_while_the_lock_is_held(user_dir):
    lock = user_dir / ".busy.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running qflow holds
        code, _, err = _main(user_dir, ["quantize", *TINY, "--out", "busy"])
    assert code == 2 and "another qflow process is working on busy" in err, err
    assert not (user_dir / "busy").exists() and not (user_dir / ".busy.partial").exists()
    code, _, err = _main(user_dir, ["quantize", *TINY, "--out", "busy"])  # released: runs
    assert code == 0, err
    assert not lock.exists()  # the lock file goes with the lock


def test_verify_and_reexport_of_one_folder_exclude_each_other(user_dir):
    assert _main(user_dir, ["export", "run", "--target", "onnx"])[0] == 0
    with open(user_dir / "run" / ".export-onnx.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a running export --force holds it
        code, _, err = _main(user_dir, ["verify", "run/export-onnx"])
        assert code == 2 and "another qflow process is working on" in err, err
        code, _, err = _main(user_dir, ["export", "run", "--target", "onnx", "--force"])
        assert code == 2 and "another qflow process is working on" in err, err
    assert _main(user_dir, ["verify", "run/export-onnx"])[0] == 0


def test_leftovers_of_killed_processes_are_reported_and_removed(user_dir):
    older = user_dir / ".fresh.tmp-ab12cd34"  # what earlier qflow versions left
    older.mkdir()
    (older / "checkpoint.pt").write_bytes(b"half")
    partial = user_dir / ".fresh.partial"  # killed before it saved an epoch
    partial.mkdir()
    (partial / ".qflow").write_text(json.dumps({"kind": "run", "complete": False,
                                                "entries": [".qflow"]}))
    code, out, err = _main(user_dir, ["quantize", *TINY, "--out", "fresh"])
    assert code == 0, err
    text = " ".join(out.split())
    assert "removing .fresh.tmp-ab12cd34" in text and "removing .fresh.partial" in text
    assert not older.exists() and not partial.exists() and (user_dir / "fresh").is_dir()


def test_a_partial_that_qflow_did_not_make_is_left_alone(user_dir):
    (user_dir / ".mine.partial").mkdir()
    (user_dir / ".mine.partial" / "data.txt").write_text("user data")
    code, _, err = _main(user_dir, ["quantize", *TINY, "--out", "mine"])
    assert code == 2 and "qflow did not make it" in err
    assert (user_dir / ".mine.partial" / "data.txt").read_text() == "user data"


def test_read_only_output_fails_before_training(user_dir, monkeypatch):
    """A read-only --out parent fails at once with one line, before any training.

    As root, permission bits do not stop writes, so there the refusal of the file system
    is simulated at os.access and mkdir; otherwise the directory is really read-only.
    """
    locked = user_dir / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        real_access, real_mkdir = os.access, os.mkdir

        def access(path, mode, *args, **kwargs):
            if Path(path) == locked and mode & os.W_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            if Path(path).parent == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
        monkeypatch.setattr(os, "mkdir", mkdir)
    else:
        locked.chmod(0o555)
    monkeypatch.setattr(quantize_cli, "fit", lambda *a, **k: pytest.fail("trained first"))
    try:
        code, _, err = _main(user_dir, ["quantize", *TINY, "--out", "locked/run"])
    finally:
        locked.chmod(0o755)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "permission denied" in err and "locked" in err
    assert list(locked.iterdir()) == []


def test_runs_work_from_another_directory(user_dir, tmp_path):
    """The run stores absolute paths: export and verify from elsewhere (the issue's
    `--model good.py:build --data ok.npz` case)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, _, err = _main(elsewhere, ["export", str(user_dir / "run"), "--target", "onnx"])
    assert code == 0, err
    code, out, err = _main(elsewhere, ["verify", str(user_dir / "run" / "export-onnx")])
    assert code == 0, out + err
    report = json.loads((user_dir / "run" / "export-onnx" / "verify.json").read_text())
    assert report["mismatching_samples"] == 0
    ran = {r["artifact"] for r in report["results"] if r.get("status", "ok") == "ok"}
    assert {"QAT model (torch eval)", "qonnx", "int_onnx"} <= ran


# -- Python API ------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_calibrate_restores_the_mode_of_every_module(training):
    import qflow
    from qflow.train import calibrate

    model = qflow.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3),
                                                torch.nn.ReLU()))
    model.train(training)
    model[2].eval()  # a user froze one module: that must survive too
    modes = [m.training for m in model.modules()]
    running_mean = model[2].running_mean.clone()
    calibrate(model, torch.rand(32, 4))
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[2].running_mean, running_mean)  # no batch statistics taken
    assert model.qflow_input.quant.is_initialized
