"""qflow's ``FixedLayerNorm`` hls4ml layer: the integer LayerNorm of
docs/transformer_ops.md (exact integer variance, a 31-step square root, one division per
row).

ONNX domain ``qflow``, op ``FixedLayerNorm``; C++ ``hls/qflow_layernorm.h``. Its
attributes, written by :mod:`.transformer_graph` from the node's ``LayerNormWidths``: the
row geometry in hls4ml's memory order, K (``reciprocal_frac``), Z (``norm_frac``),
``beta_shift``, the width of the variance (``var_bits``, for the leading-zero count), the
C++ type of every intermediate, and the codes of gamma and beta, one per element of a
row (constant tables in the config). ``result_t`` is the QGraph's output type.
"""

from __future__ import annotations

from .custom import ExtensionLayer, code_table, constants, table_params, typedefs

NUMBERS = ("n_in", "outer", "length", "inner", "var_bits", "reciprocal_frac", "norm_frac",
           "beta_shift")
TYPES = ("code_t", "sum_t", "squares_t", "moment_t", "var_t", "centred_t", "rec_t",
         "norm_t", "gamma_t", "beta_t", "affine_t", "value_t")
TABLES = ("gamma", "beta")


def _initialize(layer) -> None:
    layer.add_output_variable(layer.get_input_variable().shape)


LAYER = ExtensionLayer(
    name="FixedLayerNorm",
    function="qflow_layernorm",
    config=(*constants(NUMBERS), *typedefs(TYPES), *(code_table(t) for t in TABLES)),
    initialize=_initialize,
    parse=lambda attribute: {key: attribute(key) for key in NUMBERS + TYPES + TABLES},
    attributes=NUMBERS + TYPES + TABLES,
    config_params=lambda layer: table_params(layer, TABLES),
    includes=("qflow_codes.h",),
    text=TYPES,
    lists=TABLES,
)
