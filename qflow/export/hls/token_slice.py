"""qflow's ``FixedSlice`` hls4ml layer: the QGraph's ``slice`` (attention heads, a class
token), the elements [start, start + out_len) of the middle axis of an
(outer, in_len, inner) tensor in hls4ml's memory order; C++ ``hls/qflow_slice.h``.
The output shape (``shape``, channels last) comes from :mod:`.transformer_graph`."""

from __future__ import annotations

from .custom import ExtensionLayer, constants

GEOMETRY = ("outer", "in_len", "start", "out_len", "inner")

LAYER = ExtensionLayer(
    name="FixedSlice",
    function="qflow_slice",
    config=constants(GEOMETRY),
    initialize=lambda layer: layer.add_output_variable(list(layer.get_attr("shape"))),
    parse=lambda attribute: {**{key: attribute(key) for key in GEOMETRY},
                             "shape": list(attribute("shape"))},
    attributes=(*GEOMETRY, "shape"),
    lists=("shape",),
)
