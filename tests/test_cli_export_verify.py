"""`qflow quantize` -> `qflow export --target onnx|ultra96` -> `qflow verify`, and bad inputs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qflow.cli.main import main


def _qflow(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "qflow.cli.main", *args], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A quick digits-cnn run, exported once for the module."""
    root = tmp_path_factory.mktemp("e2e")
    code, _, err = _qflow("quantize", "--model", "digits-cnn", "--epochs", "2",
                          "--qat-epochs", "1", "--quiet", "--out", "run", cwd=root)
    assert code == 0, err
    code, _, err = _qflow("export", "run", "--target", "onnx", cwd=root)
    assert code == 0, err
    return root, root / "run" / "export-onnx"


def test_export_writes_every_artifact(exported):
    _, out = exported
    info = json.loads((out / "export.json").read_text())
    assert info["target"] == "onnx"
    assert set(info["artifacts"]) == {"qonnx", "int_onnx"}
    for name in ("model.qgraph", "model.qonnx.onnx", "model.int.onnx"):
        assert (out / name).is_file()
    onnx.checker.check_model(onnx.load(out / "model.int.onnx"))
    assert not list(out.parent.glob(".*tmp*")), "temporary directories left behind"


def test_verify_reports_zero_mismatches(exported):
    root, out = exported
    code, stdout, err = _qflow("verify", str(out), "--corners", "300", cwd=root)
    assert code == 0, stdout + err
    report = json.loads((out / "verify.json").read_text())
    names = {r["artifact"] for r in report["results"]}
    assert {"emulator (reference)", "QAT model (torch eval)", "qonnx", "int_onnx"} <= names
    # digits has 540 test images: the default 2,000 data samples add the training
    # split (1,257) and perturbed test images (203)
    assert report["sample_kinds"] == {"test": 540, "train": 1257, "perturbed test": 203,
                                      "corner": 300}
    for r in report["results"]:
        assert r["samples"] == 2300
        assert r["mismatching_samples"] == 0, r
    assert "OK: 0 mismatching samples" in stdout


def _copy_export(out, dest):
    """A copy of the export directory whose run reference still resolves."""
    dest.mkdir()
    for f in out.iterdir():
        if f.is_file():
            (dest / f.name).write_bytes(f.read_bytes())
    info = json.loads((dest / "export.json").read_text())
    info["run"] = str((out / info["run"]).resolve())
    (dest / "export.json").write_text(json.dumps(info))
    return dest


def _record_digests(export_dir):
    """Record the current files' digests in export.json, as if exported like this."""
    from qflow.export.manifest import digest_files

    info = json.loads((export_dir / "export.json").read_text())
    info["files"] = digest_files(export_dir)
    (export_dir / "export.json").write_text(json.dumps(info))


def test_verify_detects_a_tampered_artifact(exported, tmp_path):
    """The check can fail: change one weight code in the integer ONNX by one LSB."""
    root, out = exported
    tampered = _copy_export(out, tmp_path / "tampered")
    model = onnx.load(tampered / "model.int.onnx")
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(init).copy()
    integer = values.dtype.kind in "iu"  # weights are float32 on the float32 route
    values.flat[0] = (values.flat[0] + 1 if not integer
                      or values.flat[0] < np.iinfo(values.dtype).max else 0)
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, tampered / "model.int.onnx")
    _record_digests(tampered)  # else verify stops at the changed file, running nothing
    code, _, _ = _qflow("verify", str(tampered), cwd=root)
    assert code == 1
    report = json.loads((tampered / "verify.json").read_text())
    bad = {r["artifact"]: r["mismatching_samples"] for r in report["results"]}
    assert bad["int_onnx"] > 0 and bad["qonnx"] == 0 and bad["emulator (reference)"] == 0


# a corrupt artifact is exit 1, not bad input: tests/test_verify_contract.py
@pytest.mark.parametrize("case", ["truncated_qgraph", "missing_dir", "unknown_target",
                                  "not_a_run"])
def test_bad_input_exits_2_with_one_line(exported, tmp_path, case):
    root, out = exported
    work = _copy_export(out, tmp_path / "w")
    if case == "truncated_qgraph":
        data = (work / "model.qgraph").read_bytes()
        (work / "model.qgraph").write_bytes(data[: len(data) // 3])
        args, expect = ["verify", str(work)], "model.qgraph"
    elif case == "missing_dir":
        args, expect = ["verify", str(tmp_path / "nope")], "nope"
    elif case == "unknown_target":
        args, expect = ["export", str(root / "run"), "--target", "fpga9000"], "fpga9000"
    else:
        args, expect = ["export", str(tmp_path), "--target", "onnx"], "run"
    code, stdout, stderr = _qflow(*args, cwd=root)
    assert code == 2, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert expect in lines[0]


def test_in_process_main_returns_2_for_missing_run(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none"), "--target", "onnx"]) == 2
    assert "run directory not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ultra96_verified(exported):
    """The run exported for ultra96 in io_stream, then verified: (root, export stdout,
    verify's exit code, verify's output)."""
    root, _ = exported
    code, stdout, err = _qflow("export", "run", "--target", "ultra96", "--io-type", "stream",
                               cwd=root)
    assert code == 0, err
    sections = json.loads((root / "run" / "metrics.json").read_text())["report"]["sections"]
    verify = _qflow("verify", str(root / "run" / "export-ultra96"), cwd=root)
    return root, stdout, verify, sections


def test_quantize_and_export_write_the_run_report(exported):
    """The run's report.html is written by quantize; exports and verify add to it (what
    they add depends on the tests before this one: the module shares the run)."""
    root, _ = exported
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert metrics["report"]["sections"][:5] == ["summary", "training", "formats", "values",
                                                 "oscillation"]
    page = (root / "run" / "report.html").read_text(encoding="utf-8")
    assert "integer width per channel" in page  # digits-cnn's per-channel weights and scales
    assert page.count("<img ") >= 4  # training, strip, one histogram figure, oscillation


@pytest.mark.slow
def test_ultra96_export_and_csim_verify(ultra96_verified):
    """`qflow export --target ultra96 --io-type stream` then `qflow verify`: the HLS
    project's C simulation gives 0 mismatching samples on 2,000 data-derived inputs plus
    corner cases, and the export prints the resource summary."""
    root, stdout, (code, verify_out, err), _ = ultra96_verified
    assert "Estimated resources on ultra96" in stdout and "reuse factor auto" in stdout
    out = root / "run" / "export-ultra96"
    info = json.loads((out / "export.json").read_text())
    assert set(info["artifacts"]) == {"qonnx", "int_onnx", "hls_csim"}
    assert (out / "board" / "block_design.tcl").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["io_type"] == "io_stream"
    assert code == 0, verify_out + err
    results = {r["artifact"]: r for r in json.loads((out / "verify.json").read_text())["results"]}
    assert results["hls_csim"]["samples"] == 2256
    assert results["hls_csim"]["mismatching_samples"] == 0


REPORT_HEADINGS = ["Summary", "Training", "Formats", "Quantized values", "Oscillation",
                   "FPGA resources", "Verify"]


@pytest.mark.slow
def test_report_of_a_verified_ultra96_export_opens_in_a_browser(ultra96_verified, tmp_path):
    """`qflow report RUN EXPORT`: a page with every section, nothing fetched, its statistics
    in metrics.json; opened from disk in headless Chromium: no console errors, every image
    decoded at a non-zero size, every heading there. The screenshot is kept: in
    $QFLOW_TEST_ARTIFACTS when set, else beside this test's temporary files."""
    from browser import find_chromium, inspect_page

    root, export_out, (_, verify_out, _), sections = ultra96_verified
    # export and verify have updated the run's report already
    report_line = f"report: {Path('run') / 'report.html'}"
    assert report_line in export_out and "resources" in sections and "verify" not in sections
    assert f"report: {(root / 'run' / 'report.html').resolve()}" in verify_out
    assert json.loads((root / "run" / "metrics.json").read_text())["report"]["sections"][-2:] \
        == ["resources", "verify"]
    code, stdout, err = _qflow("report", "run", "run/export-ultra96", "--json", cwd=root)
    assert code == 0, err
    stats = json.loads(stdout)
    assert stats["tensors"][0]["tensor"] == "input"
    assert all(r["mismatching_samples"] == 0 for r in stats["verify"]["results"])
    assert stats["resources"]["budget"]["dsp"] == 360  # the Ultra96's ZU3EG
    assert json.loads((root / "run" / "metrics.json").read_text())["report"] == stats
    page = root / "run" / "report.html"
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text and not re.search(r"(src|href)=\"(https?:)?//", text)
    images = text.count("<img ")
    assert images >= 4
    if find_chromium() is None:
        pytest.skip("no Chromium to open the report in (scripts/setup.sh dev installs it as "
                    "root with apt-get; or apt-get install chromium)")
    artifacts = Path(os.environ.get("QFLOW_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / "report.png"
    seen = inspect_page(page, screenshot, tmp_path)
    assert seen["console"] == [] and seen["screenshot_returncode"] == 0, seen
    assert len(seen["images"]) == images
    assert all(done and width > 0 and height > 0 for _, done, width, height in seen["images"]), \
        seen["images"]
    assert seen["headings"] == REPORT_HEADINGS
    assert screenshot.stat().st_size > 10_000
    print(f"report screenshot: {screenshot}")


def test_report_refuses_a_missing_export_in_one_line(exported):
    root, _ = exported
    code, _, stderr = _qflow("report", "run", "no-such-export", cwd=root)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "export directory not found: no-such-export" in stderr


@pytest.mark.parametrize(("args", "expect"), [
    (["--reuse", "0"], "--reuse must be"),
    (["--reuse", "many"], "--reuse must be"),
])
def test_bad_fpga_options_exit_2(exported, args, expect):
    root, _ = exported
    code, _, stderr = _qflow("export", "run", "--target", "ultra96", *args, cwd=root)
    assert code == 2 and expect in stderr and len(stderr.strip().splitlines()) == 1
