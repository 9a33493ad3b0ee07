"""qflow's ``FixedSign`` hls4ml layer: the QGraph's ``sign``, +1 where x >= 0, else -1.

ONNX domain ``qflow``, op ``FixedSign``, attribute ``xnor``; C++ ``hls/qflow_sign.h``.
With ``xnor`` = 1 its output is hls4ml's binary type (:class:`XnorPrecisionType`,
``ap_uint<1>``: 1 for +1, 0 for -1), set here because hls4ml's precision strings cannot
name it, so that hls4ml's Dense and Conv2D that read it take their XNOR/popcount form.
Otherwise its ``result_t`` comes from the per-layer config (``ap_fixed<2,2>``: the
codes ±1 themselves). :mod:`.binary` decides which.
"""

from __future__ import annotations

from .custom import ExtensionLayer, constants


def _initialize(layer) -> None:
    shape = layer.get_input_variable().shape
    if layer.get_attr("xnor"):
        from hls4ml.model.types import XnorPrecisionType

        layer.add_output_variable(shape, precision=XnorPrecisionType())
    else:
        layer.add_output_variable(shape)


LAYER = ExtensionLayer(
    name="FixedSign",
    function="qflow_sign",
    config=(*constants(("n_in",)), "static const bool xnor = {xnor_cpp};"),
    initialize=_initialize,
    parse=lambda attribute: {"xnor": bool(attribute("xnor"))},
    attributes=("xnor",),
    config_params=lambda layer: {"n_in": layer.get_input_variable().size_cpp(),
                                 "xnor_cpp": "true" if layer.get_attr("xnor") else "false"},
)
