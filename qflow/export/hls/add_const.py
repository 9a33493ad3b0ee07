"""qflow's ``FixedAddConst`` hls4ml layer: the QGraph's ``add_const`` (a position
embedding), x + value with the constant's codes in the config (a table, one code per
element in hls4ml's memory order) read as ``value_t`` (its type, the node's
``value_frac``); ``result_t`` (the QGraph's exact type) holds every sum. C++
``hls/qflow_add_const.h``."""

from __future__ import annotations

from .custom import ExtensionLayer, code_table, constants, table_params, typedefs

LAYER = ExtensionLayer(
    name="FixedAddConst",
    function="qflow_add_const",
    config=(*constants(("n_in",)), *typedefs(("value_t", "value_code_t")), code_table("value")),
    initialize=lambda layer: layer.add_output_variable(layer.get_input_variable().shape),
    parse=lambda attribute: {key: attribute(key) for key in
                             ("n_in", "value_t", "value_code_t", "value")},
    attributes=("n_in", "value_t", "value_code_t", "value"),
    config_params=lambda layer: table_params(layer, ("value",)),
    includes=("qflow_codes.h",),
    text=("value_t", "value_code_t"),
    lists=("value",),
)
