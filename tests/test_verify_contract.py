"""`qflow verify` as a contract CI can trust: exit 0 only when every artifact ran and is
exact, exit 1 when anything was not verified (a mismatch, an artifact that did not run,
a file changed since the export, no artifact at all), exit 2 with one line for bad
input; the report on disk always belongs to the last run; `--json`; `assert_exact`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qflow
from qflow.cli.main import main
from qflow.errors import ArtifactNotRunnableError
from qflow.export import runners
from qflow.export.manifest import digest_files
from qflow.verify import assert_exact, verification_inputs

SMALL = ["--samples", "40", "--corners", "8"]  # enough to run every path, quick


def _qflow(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "qflow.cli.main", *args], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout, result.stderr


def _verify(directory, capsys, *extra):
    """`qflow verify` in this process: (exit code, stdout, stderr)."""
    code = main(["verify", str(directory), *SMALL, *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def _report(directory) -> dict:
    return json.loads((directory / "verify.json").read_text())


def _rows(report) -> dict:
    return {r["artifact"]: r for r in report["results"]}


def _edit_info(directory, **changes):
    info = json.loads((directory / "export.json").read_text())
    info.update(changes)
    (directory / "export.json").write_text(json.dumps(info))
    return info


def _record_digests(directory):
    """Record the files as they are now, as if the export had written them so."""
    _edit_info(directory, files=digest_files(directory))


def _one_line_error(code, stdout, stderr, expect):
    assert code == 2, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("qflow verify: error:") and expect in lines[0], lines[0]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """A one-epoch digits-mlp run, exported for onnx (and, when hls4ml is here, for the
    Ultra96) once for the module."""
    root = tmp_path_factory.mktemp("contract")
    code, _, err = _qflow("quantize", "--epochs", "1", "--qat-epochs", "1", "--quiet",
                          "--out", "run", cwd=root)
    assert code == 0, err
    code, _, err = _qflow("export", "run", "--target", "onnx", cwd=root)
    assert code == 0, err
    return root


@pytest.fixture(scope="module")
def ultra96(run_root):
    pytest.importorskip("hls4ml")
    if shutil.which("g++") is None:
        pytest.skip("C simulation needs g++")
    code, _, err = _qflow("export", "run", "--target", "ultra96", cwd=run_root)
    assert code == 0, err
    return run_root / "run" / "export-ultra96"


@pytest.fixture
def onnx_export(run_root, tmp_path):
    """A fresh copy of the onnx export; its run directory still resolves (run_absolute)."""
    return Path(shutil.copytree(run_root / "run" / "export-onnx", tmp_path / "export"))


@pytest.fixture
def hls_export(ultra96, tmp_path):
    return Path(shutil.copytree(ultra96, tmp_path / "export"))


def _flip_int_onnx_weight(directory):
    """One weight code of the integer ONNX moved by one LSB; digests re-recorded so the
    artifact runs (and disagrees) instead of being refused as changed."""
    model = onnx.load(directory / "model.int.onnx")
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(init).copy()
    # a weight of a central pixel (the digits' corner pixels are always 0)
    at = tuple(max(0, d // 2 - 5) for d in values.shape)
    integer = values.dtype.kind in "iu"  # weights are float32 on the float32 route
    values[at] = (values[at] + 1 if not integer
                  or values[at] < np.iinfo(values.dtype).max else 0)
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, directory / "model.int.onnx")
    _record_digests(directory)


# -- exit 1: nothing, or not everything, verified ------------------------------------------
def test_no_artifacts_is_exit_1_not_ok(onnx_export, capsys):
    _edit_info(onnx_export, artifacts={})
    code, out, err = _verify(onnx_export, capsys)
    assert code == 1, out + err
    assert "OK" not in out and "nothing verified" in out
    report = _report(onnx_export)
    assert report["passed"] is False and "nothing verified" in report["summary"]


def test_not_runnable_artifact_is_exit_1_and_the_others_still_run(onnx_export, capsys,
                                                                  monkeypatch):
    def no_gpu(path, graph, x, **_):
        raise ArtifactNotRunnableError("no GPU on this machine")

    def crash(path, graph, x, **_):
        raise RuntimeError("segment 3 of the runtime fell over\nsecond line")

    monkeypatch.setitem(runners.RUNNERS, "qonnx", no_gpu)
    code, out, _ = _verify(onnx_export, capsys)
    rows = _rows(_report(onnx_export))
    assert code == 1 and "FAIL" in out
    assert rows["qonnx"]["status"] == "not run" and "no GPU" in rows["qonnx"]["note"]
    assert rows["int_onnx"]["status"] == "ok" and rows["int_onnx"]["samples"] == 48

    monkeypatch.setitem(runners.RUNNERS, "qonnx", crash)
    code, out, err = _verify(onnx_export, capsys)
    rows = _rows(_report(onnx_export))
    assert code == 1 and "Traceback" not in out + err
    assert rows["qonnx"]["status"] == "failed"
    assert rows["qonnx"]["note"] == "RuntimeError: segment 3 of the runtime fell over"
    assert rows["int_onnx"]["status"] == "ok"


def test_a_changed_onnx_file_is_exit_1_and_not_run(onnx_export, capsys):
    (onnx_export / "model.int.onnx").write_bytes(b"\x08\x07garbage" * 10)
    code, out, err = _verify(onnx_export, capsys)
    assert code == 1 and "Traceback" not in out + err
    row = _rows(_report(onnx_export))["int_onnx"]
    assert row["status"] == "failed" and row["samples"] == 0
    assert row["note"] == "changed since export: model.int.onnx"
    assert _report(onnx_export)["files"]["problems"] == {"model.int.onnx": "changed"}


def test_a_corrupt_artifact_that_runs_is_a_failed_row(onnx_export, capsys):
    (onnx_export / "model.int.onnx").write_bytes(b"\x08\x07garbage" * 10)
    _record_digests(onnx_export)
    code, out, err = _verify(onnx_export, capsys)
    assert code == 1 and "Traceback" not in out + err
    rows = _rows(_report(onnx_export))
    assert rows["int_onnx"]["status"] == "failed" and rows["int_onnx"]["note"]
    assert rows["qonnx"]["status"] == "ok"


def test_run_directory_missing_is_reported_but_does_not_fail(onnx_export, capsys):
    """An export folder copied alone (no run beside it) still verifies."""
    _edit_info(onnx_export, run="../no-such-run", run_absolute=None)
    code, out, _ = _verify(onnx_export, capsys)
    assert code == 0, out
    row = _rows(_report(onnx_export))["QAT model (torch eval)"]
    assert row["status"] == "not run" and "no-such-run" in row["note"]
    assert "not found" in row["note"]


# -- exit 2: bad input, one line -------------------------------------------------------------
@pytest.mark.parametrize(("change", "expect"), [
    ({"artifacts": ["model.int.onnx"]}, "'artifacts' must map"),
    ({"artifacts": {"int_onnx": "../../../../etc/hostname"}}, "../../../../etc/hostname"),
    ({"artifacts": {"int_onnx": "/etc/hostname"}}, "/etc/hostname"),
    ({"artifacts": {"fpga9000": "model.int.onnx"}}, "fpga9000"),
    ({"artifacts": {"int_onnx": 3}}, "int_onnx"),
    ({"files": None}, "export the run again"),
    ({"files": {"model.int.onnx": "abc"}}, "sha256"),
    ({"files": {"../../x": "0" * 64}}, "../../x"),
])
def test_bad_export_json_is_exit_2_one_line(onnx_export, capsys, change, expect):
    _edit_info(onnx_export, **change)
    if change.get("files", 1) is None:
        info = json.loads((onnx_export / "export.json").read_text())
        del info["files"]
        (onnx_export / "export.json").write_text(json.dumps(info))
    _one_line_error(*_verify(onnx_export, capsys), expect)
    assert not (onnx_export / "verify.json").exists()


def test_missing_qgraph_and_malformed_json_are_exit_2(onnx_export, capsys):
    (onnx_export / "model.qgraph").unlink()
    _one_line_error(*_verify(onnx_export, capsys), "model.qgraph")
    (onnx_export / "export.json").write_text("{not json")
    _one_line_error(*_verify(onnx_export, capsys), "export.json")


# -- the report: --json, stale reports, digests ----------------------------------------------
def test_json_output_equals_verify_json(onnx_export, run_root):
    code, stdout, stderr = _qflow("verify", str(onnx_export), *SMALL, "--json", cwd=run_root)
    assert code == 0, stderr
    assert json.loads(stdout) == _report(onnx_export)
    assert "OK: 0 mismatching samples" in stderr  # the table and summary go to stderr
    report = json.loads(stdout)
    assert report["passed"] and report["files"]["problems"] == {}
    info = json.loads((onnx_export / "export.json").read_text())
    assert report["files"]["digests"] == info["files"]  # the digests checked are recorded


def test_json_exit_codes_match(onnx_export, run_root):
    _flip_int_onnx_weight(onnx_export)
    code, stdout, _ = _qflow("verify", str(onnx_export), *SMALL, "--json", cwd=run_root)
    assert code == 1 and json.loads(stdout)["passed"] is False
    _edit_info(onnx_export, artifacts=[])
    code, stdout, stderr = _qflow("verify", str(onnx_export), "--json", cwd=run_root)
    assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    text = capsys.readouterr().out
    for line in ("0  every artifact ran", "1  not verified", "2  bad input"):
        assert line in text


# -- assert_exact and the mismatch listing ---------------------------------------------------
def test_assert_exact_passes_on_a_good_export(onnx_export):
    report = assert_exact(onnx_export, samples=30, corners=8)
    assert report["passed"] and report["samples"] == 38
    assert _report(onnx_export) == report
    x = np.random.default_rng(0).uniform(0, 16, (5, 1, 8, 8))
    report = assert_exact(onnx_export, x, corners=4)
    assert report["sample_kinds"] == {"given": 5, "corner": 4}


def test_assert_exact_fails_with_the_table_and_lists_mismatches(onnx_export, run_root):
    _flip_int_onnx_weight(onnx_export)
    with pytest.raises(AssertionError) as failure:
        assert_exact(onnx_export, samples=600, corners=64)
    message = str(failure.value)
    assert "artifact" in message and "mismatching samples" in message
    int_line = next(line for line in message.splitlines() if line.startswith("int_onnx"))
    assert "mismatch" in int_line and "FAIL" in message
    assert next(line for line in message.splitlines() if line.startswith("qonnx")).endswith("ok")

    report = _report(onnx_export)
    row = _rows(report)["int_onnx"]
    assert row["status"] == "mismatch" and 0 < len(row["mismatches"]) <= 20
    assert len(row["mismatches"]) == min(20, row["mismatching_samples"])
    inputs = report["inputs"]
    graph = qflow.QGraph.load(onnx_export / "model.qgraph")
    from qflow.sources import resolve_data

    x, counts = verification_inputs(graph, resolve_data(inputs["data"]), inputs["samples"],
                                    inputs["corners"], seed=inputs["seed"])
    assert [k["count"] for k in inputs["kinds"]] == [n for n in counts.values() if n]
    starts = {k["kind"]: k["first_index"] for k in inputs["kinds"]}
    for m in row["mismatches"]:
        assert set(m) == {"index", "kind", "output", "expected", "got"}
        assert m["expected"] != m["got"]
        assert starts[m["kind"]] <= m["index"]
        codes = qflow.emulate(graph, x[m["index"]:m["index"] + 1]).reshape(-1)
        assert codes[m["output"]] == m["expected"]


# -- the Ultra96 export: C simulation, digests of what synthesis reads -----------------------
@pytest.mark.slow
def test_hls_export_verifies_and_ignores_stale_build_products(hls_export, capsys):
    """A good export passes; a stale (here: garbage) library or object file left in the
    project is never used (the project is rebuilt in a fresh folder) and nothing new is
    written into the project."""
    stamp = "qflow_model-deadbeef.so"
    (hls_export / "hls" / "firmware" / stamp).write_bytes(b"not a library")
    (hls_export / "hls" / "qflow_model.o").write_bytes(b"not an object")
    before = digest_files(hls_export, skip=())
    code, out, err = _verify(hls_export, capsys)
    assert code == 0, out + err
    rows = _rows(_report(hls_export))
    assert rows["hls_csim"]["status"] == "ok" and rows["hls_csim"]["samples"] == 48
    after = digest_files(hls_export, skip=())
    assert set(after) - set(before) == {"verify.json", "csim.log"}
    assert {k: v for k, v in after.items() if k in before} == before
    # what export.json lists is exactly what digest_files finds after a verify
    assert digest_files(hls_export) == json.loads((hls_export / "export.json").read_text())["files"]


@pytest.mark.slow
def test_deleted_weights_txt_fails_and_leaves_no_stale_report(hls_export, capsys):
    (hls_export / "verify.json").write_text(json.dumps(
        {"mismatching_samples": 0, "passed": True, "summary": "OK: 0 mismatching samples"}))
    txt = sorted((hls_export / "hls" / "firmware" / "weights").glob("w*.txt"))[0]
    txt.unlink()
    code, out, err = _verify(hls_export, capsys)
    assert code == 1 and "Traceback" not in out + err
    name = f"hls/firmware/weights/{txt.name}"
    report = _report(hls_export)
    assert report["passed"] is False and name in report["summary"]
    row = _rows(report)["hls_csim"]
    assert row["status"] == "failed" and row["note"] == f"missing since export: {name}"
    assert report["files"]["digests"][name] is None

    # a run that stops on bad input removes the old report too
    (hls_export / "verify.json").write_text(json.dumps({"passed": True}))
    _edit_info(hls_export, artifacts=[])
    _one_line_error(*_verify(hls_export, capsys), "artifacts")
    assert not (hls_export / "verify.json").exists()


@pytest.mark.slow
def test_tampered_weight_header_fails_naming_it(hls_export, capsys):
    """C simulation reads weights/w*.txt; synthesis reads weights/w*.h: a change to the
    header would never show in C simulation, so the digests must catch it."""
    header = sorted((hls_export / "hls" / "firmware" / "weights").glob("w*.h"))[0]
    header.write_text(header.read_text().replace("{", "{1.0, ", 1))
    code, out, _ = _verify(hls_export, capsys)
    assert code == 1
    name = f"firmware/weights/{header.name}"
    assert name in out
    row = _rows(_report(hls_export))["hls_csim"]
    assert row["status"] == "failed" and name in row["note"]
    assert "changed since export" in row["note"]
    assert _rows(_report(hls_export))["int_onnx"]["status"] == "ok"


@pytest.mark.slow
def test_broken_firmware_fails_without_traceback(hls_export, run_root, capsys):
    cpp = hls_export / "hls" / "firmware" / "qflow_model.cpp"
    cpp.write_text(cpp.read_text() + "\nthis is not C++;\n")
    code, out, err = _qflow("verify", str(hls_export), *SMALL, cwd=run_root)
    assert code == 1 and "Traceback" not in out + err
    row = _rows(_report(hls_export))["hls_csim"]
    assert row["note"] == "changed since export: hls/firmware/qflow_model.cpp"

    # recorded as if exported so: it runs, g++ fails, the row gives the compiler's line
    _record_digests(hls_export)
    code, out, err = _verify(hls_export, capsys)
    assert code == 1 and "Traceback" not in out + err
    rows = _rows(_report(hls_export))
    note = rows["hls_csim"]["note"]
    assert rows["hls_csim"]["status"] == "failed"
    assert note.startswith("C simulation did not compile:") and "error" in note
    assert "qflow_model.cpp" in note
    assert rows["qonnx"]["status"] == "ok" and rows["int_onnx"]["status"] == "ok"
