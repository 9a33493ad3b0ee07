"""Target data files: every one loads and is complete; broken files give one-line errors;
`qflow targets` lists them."""

import pytest
import yaml

from qflow.cli.main import main
from qflow.errors import QflowError
from qflow.targets import RESOURCE_KEYS, TARGETS_DIR, all_targets, load_target

FPGA_BOARDS = {"ultra96", "pynq-z2", "zcu104", "kv260"}


def test_every_target_file_loads():
    targets = {t.name: t for t in all_targets()}
    assert FPGA_BOARDS | {"onnx", "cpu", "arm64", "cuda"} <= set(targets)
    for name in FPGA_BOARDS:
        t = targets[name]
        assert t.kind == "fpga" and t.backend == "hls4ml" and t.part and t.board_part
        assert set(t.resources) == set(RESOURCE_KEYS) and t.resources["dsp"] > 0
        assert t.clock_period_ns == pytest.approx(1000 / t.clock_mhz)
        assert t.processing_system["family"] in ("zynq", "zynq_ultrascale")
    assert targets["ultra96"].part == "xczu3eg-sbva484-1-i"
    assert targets["arm64"].tvm["mtriple"] == "aarch64-linux-gnu"


def _write(tmp_path, name, data):
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))


@pytest.mark.parametrize(("change", "message"), [
    ({"resources": {"dsp": 1}}, "resources must give"),
    ({"clock_mhz": 0}, "clock_mhz"),
    ({"kind": "asic"}, "kind must be one of"),
    ({"backend": "vendor"}, "backend must be one of"),
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"defaults": {"io_type": "io_serial", "strategy": "Latency", "reuse_factor": 1}},
     "defaults need"),
])
def test_broken_target_files_are_refused(tmp_path, change, message):
    data = yaml.safe_load((TARGETS_DIR / "ultra96.yaml").read_text())
    data.update(change)
    _write(tmp_path, "ultra96", data)
    with pytest.raises(QflowError, match=message):
        load_target("ultra96", tmp_path)


def test_missing_key_and_malformed_yaml(tmp_path):
    data = yaml.safe_load((TARGETS_DIR / "ultra96.yaml").read_text())
    del data["part"]
    _write(tmp_path, "ultra96", data)
    with pytest.raises(QflowError, match="missing part"):
        load_target("ultra96", tmp_path)
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(QflowError, match="malformed target file"):
        load_target("bad", tmp_path)


def test_cli_lists_targets_and_refuses_unknown_ones(capsys, tmp_path):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in FPGA_BOARDS:
        assert name in out
    assert "xczu3eg-sbva484-1-i" in out and "360" in out
    assert main(["export", str(tmp_path), "--target", "ultra69"]) == 2
    assert "unknown target 'ultra69'" in capsys.readouterr().err
