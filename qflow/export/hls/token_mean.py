"""qflow's ``FixedMean`` hls4ml layer: the QGraph's ``mean`` along an axis (a token mean):
the integer sum in ``accum_t`` times the reciprocal code in ``scale_t``, as
``FixedAvgPool``; C++ ``hls/qflow_mean.h``. Attributes: the geometry
(``outer``, ``length``, ``inner``, in hls4ml's memory order), the reciprocal's code and
its code type, and the output shape."""

from __future__ import annotations

from .custom import ExtensionLayer, constants, typedefs

GEOMETRY = ("outer", "length", "inner")


def _initialize(layer) -> None:
    layer.add_output_variable(list(layer.get_attr("shape")))
    layer._set_type_t("scale")


LAYER = ExtensionLayer(
    name="FixedMean",
    function="qflow_mean",
    config=(*constants(GEOMETRY), "static const unsigned long long reciprocal = {reciprocal}ULL;",
            "typedef {accum_t.name} accum_t;", "typedef {scale_t.name} scale_t;",
            *typedefs(("scale_code_t",))),
    initialize=_initialize,
    parse=lambda attribute: {**{key: attribute(key) for key in
                                (*GEOMETRY, "reciprocal", "scale_code_t")},
                             "shape": list(attribute("shape"))},
    attributes=(*GEOMETRY, "reciprocal", "scale_code_t", "shape"),
    types=("accum", "scale"),
    includes=("qflow_codes.h",),
    text=("scale_code_t",),
    lists=("shape",),
)
