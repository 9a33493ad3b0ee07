"""Property tests of the command line: random malformed recipes, target files and npz data
always give exit code 2, one line on stderr, no traceback, and nothing under --out."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_yaml_input import _broken_recipe, _broken_target

from qflow.cli import quantize as quantize_cli
from qflow.cli.main import main

TINY = ["--epochs", "1", "--qat-epochs", "1", "--quiet"]
PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


def _run(cwd: Path, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(argv)
    return code, err.getvalue()


def _assert_refused(cwd: Path, argv: list[str], command: str, what) -> None:
    before = sorted(os.listdir(cwd))
    code, err = _run(cwd, [*argv, "--out", "out"])
    lines = err.strip().splitlines()
    assert code == 2, (what, err)
    assert len(lines) == 1 and "Traceback" not in err, (what, err)
    assert lines[0].startswith(f"qflow {command}: error: "), (what, err)
    assert sorted(os.listdir(cwd)) == before, what  # no out, no lock, no staging folder


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A directory with a finished run (for export) in it."""
    root = tmp_path_factory.mktemp("props")
    code, err = _run(root, ["quantize", *TINY, "--out", "run"])
    assert code == 0, err
    return root


@pytest.fixture(autouse=True)
def _never_train(monkeypatch):
    monkeypatch.setattr(quantize_cli, "fit", lambda *a, **k: pytest.fail("trained on bad input"))


@PROPERTY
@given(case=_broken_recipe())
def test_malformed_recipes(work, case):
    what, text = case
    path = work / "recipe.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    try:
        _assert_refused(work, ["quantize", *TINY, "--recipe", "recipe.yaml"], "quantize", what)
    finally:
        path.unlink()


@PROPERTY
@given(case=_broken_target())
def test_malformed_target_files(work, case):
    base, what, text = case
    path = work / f"{base}.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    try:
        _assert_refused(work, ["export", "run", "--target-file", path.name], "export",
                        (base, what))
    finally:
        path.unlink()
        shutil.rmtree(work / "run" / "out", ignore_errors=True)


NPZ_DEFECTS = ("missing key", "not an npz", "text x", "object x", "non-finite", "huge",
               "y length", "y 2-D", "negative label", "fractional label", "label too large",
               "empty", "x 1-D", "train/test shapes", "wrong features", "complex x")


@st.composite
def _broken_npz(draw):
    """(defect, arrays or raw bytes): digits-mlp data with exactly one defect."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_train, n_test = draw(st.integers(2, 40)), draw(st.integers(2, 20))
    arrays = {"x_train": rng.random((n_train, 1, 8, 8)).astype(np.float32),
              "y_train": rng.integers(0, 10, n_train),
              "x_test": rng.random((n_test, 1, 8, 8)).astype(np.float32),
              "y_test": rng.integers(0, 10, n_test)}
    what = draw(st.sampled_from(NPZ_DEFECTS))
    x_key = draw(st.sampled_from(["x_train", "x_test"]))
    y_key = x_key.replace("x", "y")
    where = draw(st.integers(0, 10_000))
    if what == "missing key":
        del arrays[draw(st.sampled_from(sorted(arrays)))]
    elif what == "not an npz":
        return what, draw(st.binary(max_size=200))
    elif what == "text x":
        arrays[x_key] = arrays[x_key].astype(str)
    elif what == "object x":
        arrays[x_key] = np.array([object()] * 3, dtype=object)
    elif what in ("non-finite", "huge"):
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf])) if what == "non-finite" \
            else draw(st.sampled_from([2.0**64, -1e30, 1e39]))
        x = arrays[x_key].astype(np.float64)
        x.flat[where % x.size] = value
        arrays[x_key] = x
    elif what == "y length":
        arrays[y_key] = np.concatenate([arrays[y_key], [1]])
    elif what == "y 2-D":
        arrays[y_key] = arrays[y_key][:, None]
    elif what == "negative label":
        arrays[y_key][where % len(arrays[y_key])] = -draw(st.integers(1, 2**40))
    elif what == "fractional label":
        y = arrays[y_key].astype(np.float64)
        y[where % len(y)] += 0.5
        arrays[y_key] = y
    elif what == "label too large":
        arrays[y_key][where % len(arrays[y_key])] = draw(st.integers(10, 2**40))
    elif what == "empty":
        arrays[x_key] = arrays[x_key][:0]
        arrays[y_key] = arrays[y_key][:0]
    elif what == "x 1-D":
        arrays[x_key] = arrays[x_key].reshape(-1)
    elif what == "train/test shapes":
        arrays[x_key] = arrays[x_key].reshape(len(arrays[x_key]), 8, 8)
    elif what == "wrong features":
        n = draw(st.sampled_from([1, 5, 63, 65]))
        arrays["x_train"] = rng.random((n_train, n)).astype(np.float32)
        arrays["x_test"] = rng.random((n_test, n)).astype(np.float32)
    else:
        arrays[x_key] = arrays[x_key] + 1j
    return what, arrays


@PROPERTY
@given(case=_broken_npz())
def test_malformed_npz_data(work, case):
    what, content = case
    path = work / "data.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, **content)
    try:
        _assert_refused(work, ["quantize", *TINY, "--data", "data.npz"], "quantize", what)
    finally:
        path.unlink()


def test_the_npz_base_is_valid(work, monkeypatch):
    """Without a defect the same data trains: the property above tests the defects."""
    rng = np.random.default_rng(0)
    np.savez(work / "good.npz", x_train=rng.random((40, 1, 8, 8)).astype(np.float32),
             y_train=rng.integers(0, 10, 40), x_test=rng.random((20, 1, 8, 8)),
             y_test=rng.integers(0, 10, 20))
    from qflow.train import fit

    monkeypatch.setattr(quantize_cli, "fit", fit)
    code, err = _run(work, ["quantize", *TINY, "--data", "good.npz", "--out", "good"])
    assert code == 0, err
