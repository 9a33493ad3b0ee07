"""A BiPer run deployed end to end, as a user runs it: ``qflow quantize --method biper
--model binary-cnn`` on digits, ``qflow export --target ultra96`` and ``--target cpu``,
``qflow verify``: every artifact (HLS C simulation and the TVM build included) gives the
emulator's codes on every sample, and the FPGA estimate spends no DSP on binary layers."""

from __future__ import annotations

import json

import pytest

from qflow.cli.main import main


@pytest.fixture(scope="module")
def biper_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("biper") / "run"
    code = main(["quantize", "--method", "biper", "--model", "binary-cnn", "--epochs", "1",
                 "--qat-epochs", "1", "--quiet", "--out", str(out)])
    assert code == 0
    return out


@pytest.mark.parametrize("target", ["ultra96", "cpu"])
def test_export_and_verify_every_artifact(biper_run, target, tmp_path):
    export = tmp_path / f"export-{target}"
    # io_stream: its C simulation compiles in a third of io_parallel's time (about 85 s
    # for this model); the binary layers in io_parallel are C-simulated in test_binary_ops.py
    io = ["--io-type", "stream"] if target == "ultra96" else []
    assert main(["export", str(biper_run), "--target", target, "--out", str(export), *io]) == 0
    assert main(["verify", str(export)]) == 0
    report = json.loads((export / "verify.json").read_text())
    assert report["passed"] and report["mismatching_samples"] == 0
    ran = [r for r in report["results"] if r["role"] != "reference"]
    assert all(r["status"] == "ok" and r["mismatching_samples"] == 0 for r in ran), ran
    artifacts = {r["artifact"] for r in ran}
    assert ("hls_csim" in artifacts) if target == "ultra96" else ("tvm" in str(artifacts))
    assert report["samples"] > 1000
    if target == "ultra96":
        estimate = json.loads((export / "report.json").read_text())["estimate"]
        rows = estimate["layers"]
        binary = [rows[i + 1] for i, r in enumerate(rows) if r["op"] == "sign"]
        assert [r["op"] for r in binary] == ["conv2d"] * 4  # the 4 binary 3x3 convolutions
        assert all(r["dsp"] == 0 and r["lut"] > 0 for r in binary), binary
        assert estimate["totals"]["dsp"] == sum(r["dsp"] for r in rows if r not in binary)
