"""qflow's ``FixedCast`` hls4ml layer: a requantization to any ``ap_fixed`` type.

hls4ml's Quant handler only states RND_CONV or TRN with SAT / SAT_SYM; a QGraph ``cast``
with any other of the 7 rounding and 4 overflow modes becomes this layer (ONNX domain
``qflow``, op ``FixedCast``, attribute ``qflow_type``), whose C++ is
``hls/qflow_fixed_cast.h``: the element-wise assignment to ``result_t``.
"""

from __future__ import annotations

from .custom import ExtensionLayer, constants


def _initialize(layer) -> None:
    layer.add_output_variable(layer.get_input_variable().shape)


LAYER = ExtensionLayer(
    name="FixedCast",
    function="qflow_fixed_cast",
    config=constants(("n_in",)),
    initialize=_initialize,
    parse=lambda attribute: {"qflow_type": attribute("qflow_type")},
    config_params=lambda layer: {"n_in": layer.get_input_variable().size_cpp()},
)
