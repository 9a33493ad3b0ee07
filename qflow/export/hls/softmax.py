"""qflow's ``FixedSoftmax`` hls4ml layer: the integer softmax of docs/transformer_ops.md.

ONNX domain ``qflow``, op ``FixedSoftmax``; C++ ``hls/qflow_softmax.h``. Its attributes,
written by :mod:`.transformer_graph` from the QGraph node's ``SoftmaxWidths``: the row
geometry in hls4ml's memory order (``outer``, ``length``, ``inner``), the shifts of the
exponent (``arg_right``, ``arg_left``), K (``reciprocal_frac``) and the C++ type of every
intermediate, each as wide as the spec's bound on it. ``result_t`` is the QGraph's output
type (per-layer config).
"""

from __future__ import annotations

from .custom import ExtensionLayer, constants, typedefs

GEOMETRY = ("n_in", "outer", "length", "inner")
SHIFTS = ("arg_right", "arg_left", "reciprocal_frac")
TYPES = ("code_t", "diff_t", "scaled_t", "arg_t", "exp_t", "sum_t", "rec_t", "prod_t",
         "value_t")


def _initialize(layer) -> None:
    layer.add_output_variable(layer.get_input_variable().shape)


LAYER = ExtensionLayer(
    name="FixedSoftmax",
    function="qflow_softmax",
    config=(*constants(GEOMETRY + SHIFTS), *typedefs(TYPES)),
    initialize=_initialize,
    parse=lambda attribute: {key: attribute(key) for key in GEOMETRY + SHIFTS + TYPES},
    attributes=GEOMETRY + SHIFTS + TYPES,
    includes=("qflow_codes.h",),
    text=TYPES,
)
