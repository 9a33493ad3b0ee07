"""qflow's ``FixedGELU`` hls4ml layer: the integer GELU of docs/transformer_ops.md
(I-BERT's erf polynomial), element-wise.

ONNX domain ``qflow``, op ``FixedGELU``; C++ ``hls/qflow_gelu.h``. Its attributes, written
by :mod:`.transformer_graph` from the node's ``GeluWidths``: the shift of |q| to 12
fractional bits (``arg_right`` or ``arg_left``, with the clamp ``arg_limit`` before a left
shift) and the C++ types of the code, |q|, the argument, the product q·(1 + erf) and its
value at f + 37 fractional bits. ``result_t`` is the QGraph's output type.
"""

from __future__ import annotations

from .custom import ExtensionLayer, constants, typedefs

SHIFTS = ("n_in", "arg_right", "arg_left")
TYPES = ("code_t", "mag_t", "arg_t", "prod_t", "value_t")


def _initialize(layer) -> None:
    layer.add_output_variable(layer.get_input_variable().shape)


LAYER = ExtensionLayer(
    name="FixedGELU",
    function="qflow_gelu",
    config=(*constants(SHIFTS), "static const unsigned long long arg_limit = {arg_limit}ULL;",
            *typedefs(TYPES)),
    initialize=_initialize,
    parse=lambda attribute: {key: attribute(key) for key in (*SHIFTS, "arg_limit", *TYPES)},
    attributes=(*SHIFTS, "arg_limit", *TYPES),
    includes=("qflow_codes.h",),
    text=TYPES,
)
