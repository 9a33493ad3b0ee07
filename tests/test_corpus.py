"""Every corpus model (tests/corpus/), as a user would run it: ``qflow quantize`` on
generated data, ``qflow export`` for onnx, ultra96 (io_parallel, io_stream) and cpu, then
``qflow verify``: 0 mismatching samples on every artifact, or the expected one-line
refusal that the README's support matrix names. No traceback anywhere."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from corpus import MODELS, TARGETS

from qflow.cli.main import main

QUANTIZE = ["--epochs", "2", "--qat-epochs", "1", "--batch-size", "32", "--quiet"]


def _main(cwd: Path, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    assert "Traceback" not in out.getvalue() + err.getvalue()
    return code, out.getvalue(), err.getvalue()


def _assert_refusal(code: int, err: str, command: str, words: tuple[str, ...]) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"qflow {command}: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (exit code, stderr, run directory) of ``qflow quantize``, made on demand."""
    root = tmp_path_factory.mktemp("corpus")
    made: dict[str, tuple[int, str, Path]] = {}

    def run(name: str):
        if name not in made:
            model = MODELS[name]
            np.savez(root / f"{name}.npz", **model.data())
            code, _, err = _main(root, ["quantize", "--model", model.spec, "--data",
                                        f"{name}.npz", *QUANTIZE, "--out", name])
            made[name] = (code, err, root / name)
        return made[name]

    return run


@pytest.mark.parametrize("name", sorted(MODELS))
def test_quantize(runs, name):
    code, err, run = runs(name)
    expected = MODELS[name].refused.get("quantize")
    if expected:
        _assert_refusal(code, err, "quantize", expected)
        assert not run.exists()
    else:
        assert code == 0, err
        assert (run / "checkpoint.pt").is_file()


CELLS = [(name, target) for name in sorted(MODELS) for target in TARGETS
         if "quantize" not in MODELS[name].refused]


@pytest.mark.parametrize(("name", "target"), CELLS)
def test_export_and_verify(runs, name, target):
    code, err, run = runs(name)
    assert code == 0, err
    out = run.parent / f"{name}-{target.replace(' ', '-')}"
    code, _, err = _main(run.parent, ["export", str(run), *TARGETS[target], "--out", str(out)])
    expected = MODELS[name].refused.get(target)
    if expected:
        _assert_refusal(code, err, "export", expected)
        assert not out.exists()
        return
    assert code == 0, err
    code, stdout, err = _main(run.parent, ["verify", str(out)])
    report = json.loads((out / "verify.json").read_text())
    assert code == 0, stdout + err
    assert report["mismatching_samples"] == 0
    statuses = {r["artifact"]: r["status"] for r in report["results"]}
    assert set(statuses.values()) == {"ok"}, statuses
    assert statuses.keys() >= {"QAT model (torch eval)", "qonnx", "int_onnx"}
    kinds = set(json.loads((out / "export.json").read_text())["artifacts"])
    extra = {"onnx": set(), "cpu": {"tvm"}}.get(target, {"hls_csim"})
    assert kinds == {"qonnx", "int_onnx"} | extra


def test_readme_support_matrix_is_the_corpus_table():
    """The README's matrix is what this file checks (scripts/support_matrix.py prints it)."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("support_matrix",
                                                  root / "scripts" / "support_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.readme_matrix(root / "README.md") == module.matrix()
