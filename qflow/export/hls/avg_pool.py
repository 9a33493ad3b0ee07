"""qflow's ``FixedAvgPool`` hls4ml layer: average pooling over any window, exactly.

The QGraph's ``avgpool2d`` and ``global_avgpool2d`` multiply the window's integer sum by
the exact reciprocal code of 1/n; hls4ml's Pooling2D divides by the count, which equals
that only for windows of 2^k values. Other windows become this layer (ONNX domain
``qflow``, op ``FixedAvgPool``, attributes ``kernel_shape``, ``strides`` and
``reciprocal``, the integer code of 1/n), whose C++ is ``hls/qflow_avg_pool.h``: the sum
in ``accum_t`` times the reciprocal in ``scale_t``, into ``result_t``. Its types come from
the per-layer config as any layer's. Windows are unpadded.
"""

from __future__ import annotations

from .custom import WINDOW, ExtensionLayer, constants, initialize_pool

#: FixedAvgPool attributes that go into its C++ config as they are
POOL_GEOMETRY = (*WINDOW, "out_height", "out_width")


def _initialize(layer) -> None:
    initialize_pool(layer)
    layer._set_type_t("scale")


def _parse(attribute) -> dict:
    (ph, pw), (sh, sw) = (attribute(k) for k in ("kernel_shape", "strides"))
    return {"pool_height": ph, "pool_width": pw, "stride_height": sh, "stride_width": sw,
            "reciprocal": int(attribute("reciprocal"))}


LAYER = ExtensionLayer(
    name="FixedAvgPool",
    function="qflow_avg_pool",
    config=(*constants(POOL_GEOMETRY),
            "static const unsigned long long reciprocal = {reciprocal}ULL;",
            "typedef {accum_t.name} accum_t;",
            "typedef {scale_t.name} scale_t;"),
    initialize=_initialize,
    parse=_parse,
    attributes=(*POOL_GEOMETRY[3:7], "reciprocal"),
    types=("accum", "scale"),
    includes=("qflow_window.h",),
)
