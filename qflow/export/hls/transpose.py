"""qflow's ``FixedTranspose`` hls4ml layer: the QGraph's ``transpose`` of a per-sample
matrix (rows × cols → cols × rows), pure data movement; C++ ``hls/qflow_transpose.h``.
hls4ml's own Transpose is not used: its optimizer passes may remove or merge transposes
next to Flatten and Dense layers."""

from __future__ import annotations

from .custom import ExtensionLayer, constants

GEOMETRY = ("rows", "cols")

LAYER = ExtensionLayer(
    name="FixedTranspose",
    function="qflow_transpose",
    config=constants(GEOMETRY),
    initialize=lambda layer: layer.add_output_variable(
        [layer.get_attr("cols"), layer.get_attr("rows")]),
    parse=lambda attribute: {key: attribute(key) for key in GEOMETRY},
    attributes=GEOMETRY,
)
