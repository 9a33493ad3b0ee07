"""qflow's ``ActivationMatMul`` hls4ml layer: the QGraph's ``matmul``, the product of two
activations (attention's q·kᵀ and probabilities·v).

ONNX domain ``qflow``, op ``ActivationMatMul``, two inputs a (rows × depth) and b
(depth × cols, or cols × depth with ``transpose_b``); C++ ``hls/qflow_matmul.h``. Products
of two ap_fixed values are exact and ``accum_t`` (per-layer config: the QGraph's exact
accumulator type, also ``result_t``) holds every partial sum. Per-sample matrices only
(rank 2): hls4ml's channels-last layout would reorder a stack of them.

The model's reuse factor R folds it as hls4ml's Latency Dense: the config gets
``reuse_factor`` = R (the function is pipelined with II = R) and ``multiplier_limit`` =
ceil(rows · cols · depth / R), the multipliers the C++ allocates.
"""

from __future__ import annotations

import math

from .custom import ExtensionLayer, constants

GEOMETRY = ("rows", "depth", "cols")


def _initialize(layer) -> None:
    layer.add_output_variable([layer.get_attr("rows"), layer.get_attr("cols")])


def _folding(layer) -> dict:
    """``reuse_factor`` (the model's R) and ``multiplier_limit`` of the C++ config."""
    reuse = int(layer.model.config.get_reuse_factor(layer))
    products = layer.get_attr("rows") * layer.get_attr("cols") * layer.get_attr("depth")
    return {"reuse_factor": reuse, "multiplier_limit": math.ceil(products / reuse),
            "transpose_b_cpp": "true" if layer.get_attr("transpose_b") else "false"}


def _inputs(layer) -> dict:
    a, b = (layer.get_input_variable(name) for name in layer.inputs[:2])
    return {"input1": a.name, "input2": b.name, "input1_t": a.type.name,
            "input2_t": b.type.name}


LAYER = ExtensionLayer(
    name="ActivationMatMul",
    function="qflow_matmul",
    config=(*constants(GEOMETRY), "static const bool transpose_b = {transpose_b_cpp};",
            *constants(("reuse_factor", "multiplier_limit")), "typedef {accum_t.name} accum_t;"),
    initialize=_initialize,
    parse=lambda attribute: {**{key: attribute(key) for key in GEOMETRY},
                             "transpose_b": bool(attribute("transpose_b"))},
    attributes=(*GEOMETRY, "transpose_b"),
    types=("accum",),
    config_params=_folding,
    call=("nnet::qflow_matmul<{input1_t}, {input2_t}, {output_t}, {config}>({input1}, "
          "{input2}, {output});"),
    function_params=_inputs,
)
