"""The tiny ViT on the Ultra96, as a user runs it: ``qflow quantize --model tiny-vit`` on
digits (a short schedule), ``qflow export --target ultra96`` and ``qflow verify``: the
integer ONNX model and the hls4ml project's C simulation give the emulator's codes on
every sample, and the export prints the resource estimate's verdict on the board.

The patch embedding's ``flatten(2).transpose(1, 2)`` is exported as one in-place
Reshape of the channels-last convolution output to (tokens, channels)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from transformer_graphs import ACT, TMaker, attention_block, two_head_block

from qflow.cli.main import main
from qflow.export.hls.estimate import estimate_resources
from qflow.export.hls.onnx_graph import HlsExportError, hls_graph
from qflow.numerics import FixedType
from qflow.targets import load_target

PIXELS = FixedType.parse("ap_ufixed<8,1,AP_RND_CONV,AP_SAT>")


def _patch_graph(perm=(1, 0), reader: str = "transpose"):
    """A 2×2-patch embedding of a 1×4×4 image: conv2d (8, 2, 2) -> reshape (8, 4) ->
    ``reader`` (a transpose by ``perm`` to tokens, or a layernorm of the reshape itself)
    -> layernorm."""
    m = TMaker(PIXELS, (1, 4, 4))
    m.add("conv2d", (8, 2, 2), name="embed",
          attrs={"stride": [2, 2], "padding": [0, 0], "dilation": [1, 1], "groups": 1},
          weight=m.rng.integers(-128, 128, (8, 1, 2, 2)), weight_frac=np.full(8, 7))
    m.cast(ACT)
    m.add("reshape", (8, 4), attrs={"shape": [8, 4]}, name="flatten")
    if reader == "transpose":
        m.op("transpose", attrs={"perm": list(perm)}, name="tokens")
    m.layernorm("ln")
    return m.graph()


def test_patch_embedding_is_one_in_place_reshape():
    form = hls_graph(_patch_graph())
    ops = [(n.op_type, n.name) for n in form.model.graph.node]
    assert ("Reshape", "flatten") in ops and all(name != "tokens" for _, name in ops), ops
    reshape = next(n for n in form.model.graph.node if n.op_type == "Reshape")
    shape = next(t for t in form.model.graph.initializer if t.name == reshape.input[1])
    assert list(shape.int64_data or np.frombuffer(shape.raw_data, np.int64)) == [-1, 4, 8]
    assert form.layer_names["flatten"] == "flatten" and "tokens" not in form.layer_names
    # wires: neither node costs anything
    est = estimate_resources(_patch_graph(), load_target("ultra96"), io_type="io_parallel",
                             reuse_factor=1, strategy="Latency")
    rows = {x.node: x for x in est.layers}
    assert (rows["flatten"].ff, rows["tokens"].ff, rows["tokens"].lut) == (0, 0, 0)


@pytest.mark.parametrize("perm, reader", [((0, 1), "transpose"), (None, "layernorm")])
def test_other_reshapes_are_refused_naming_the_node(perm, reader):
    with pytest.raises(HlsExportError) as info:
        hls_graph(_patch_graph(perm, reader))
    assert str(info.value) == ("node 'flatten' (reshape): only flattening is exported to "
                               "hls4ml, not a reshape to (8, 4)")


def test_reuse_folds_matmul_only():
    target = load_target("ultra96")
    one, four = (estimate_resources(two_head_block(), target, io_type="io_parallel",
                                    reuse_factor=r, strategy="Latency") for r in (1, 4))
    rows1, rows4 = ({x.node: x for x in e.layers} for e in (one, four))
    # 5 x 4 x 5 products of 8-bit operands: one DSP each, a quarter of them at R = 4
    assert (rows1["scores_h0"].dsp, rows4["scores_h0"].dsp) == (100, 25)
    assert rows4["scores_h0"].ii == 4
    for name in ("softmax_h0", "ln1", "gelu", "pos", "token_mean"):
        a, b = rows1[name], rows4[name]
        assert (a.dsp, a.lut, a.ff) == (b.dsp, b.lut, b.ff), name
    assert one.unfolded == four.unfolded and one.unfolded["dsp"] > 0


def test_the_project_folds_matmul_by_the_reuse_factor(tmp_path):
    pytest.importorskip("hls4ml")
    from qflow.export.hls.convert import convert

    convert(attention_block(), tmp_path / "hls", part=load_target("ultra96").part,
            clock_mhz=100, io_type="io_parallel", reuse_factor=4, strategy="Latency",
            log=tmp_path / "hls4ml.log")
    text = (tmp_path / "hls" / "firmware" / "parameters.h").read_text()
    configs = re.findall(r"struct config\d+ : nnet::qflow_matmul_config \{(.*?)\};", text,
                         re.S)
    assert len(configs) == 2, text
    for config in configs:  # 6 x 8 x 6 products
        assert "static const unsigned reuse_factor = 4;" in config
        assert f"static const unsigned multiplier_limit = {math.ceil(6 * 8 * 6 / 4)};" in config


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-vit-fpga") / "run"
    code = main(["quantize", "--model", "tiny-vit", "--bits", "8", "--epochs", "3",
                 "--qat-epochs", "1", "--quiet", "--out", str(out)])
    assert code == 0
    return out


@pytest.mark.slow
def test_ultra96_export_verify_and_verdict(vit_run, tmp_path, capsys):
    export = tmp_path / "export-ultra96"
    capsys.readouterr()
    assert main(["export", str(vit_run), "--target", "ultra96", "--out", str(export)]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    report = json.loads((export / "report.json").read_text())
    estimate = report["estimate"]
    # the verdict, as recorded, is what the export printed, and it answers the question
    assert " ".join(estimate["verdict"].split()) in printed
    assert estimate["verdict"].startswith(
        "fits ultra96" if estimate["fits"] else "does NOT fit ultra96")
    assert "Estimated resources on ultra96" in printed and "reuse factor auto" in printed
    # it does not fit: its softmax, layernorm, gelu, casts and adds are fully parallel at
    # any reuse factor, so auto takes 1 and the verdict says why
    assert not estimate["fits"] and not estimate["fits_at_some_reuse"]
    assert report["settings"]["reuse_factor"] == 1
    assert "; at any reuse factor: the layers it does not fold alone need" in printed
    # the patch embedding is one Reshape: no layer of its own for the transpose
    layers = {row["qgraph_node"]: row["class"] for row in report["layers"]}
    assert layers["flatten"] == "Reshape" and "transpose" not in layers
    assert main(["verify", str(export)]) == 0
    result = json.loads((export / "verify.json").read_text())
    assert result["passed"] and result["mismatching_samples"] == 0
    ran = [r for r in result["results"] if r["role"] != "reference"]
    assert {r["artifact"] for r in ran} == {"QAT model (torch eval)", "int_onnx", "hls_csim"}
    for row in ran:
        assert (row["status"], row["mismatching_samples"]) == ("ok", 0), row
        assert row["samples"] == result["samples"] > 1000, row
