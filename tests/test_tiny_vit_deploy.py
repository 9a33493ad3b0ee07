"""The tiny ViT deployed end to end, as a user runs it: ``qflow quantize --model tiny-vit``
on digits (a short schedule), ``qflow export`` to each target and ``qflow verify``: every
artifact gives the emulator's codes on every sample (ultra96: test_tiny_vit_fpga.py)."""

from __future__ import annotations

import json

import pytest

from qflow.cli.main import main


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-vit") / "run"
    code = main(["quantize", "--model", "tiny-vit", "--bits", "8", "--epochs", "3",
                 "--qat-epochs", "1", "--quiet", "--out", str(out)])
    assert code == 0
    return out


@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_export_and_verify_every_artifact(vit_run, target, tmp_path):
    export = tmp_path / f"export-{target}"
    assert main(["export", str(vit_run), "--target", target, "--out", str(export)]) == 0
    assert main(["verify", str(export)]) == 0
    report = json.loads((export / "verify.json").read_text())
    assert report["passed"] and report["mismatching_samples"] == 0
    ran = [r for r in report["results"] if r["role"] != "reference"]
    assert ran and all(r["status"] == "ok" and r["mismatching_samples"] == 0 for r in ran), ran
    assert report["samples"] > 1000
    artifacts = {r["artifact"] for r in ran}
    # the QAT model's eval output is checked against the emulator too
    expected = {"QAT model (torch eval)", "int_onnx"} | ({"tvm"} if target == "cpu" else set())
    assert artifacts == expected, artifacts
