"""qflow's ``FixedMaxPool`` hls4ml layer: max pooling in which padding never wins.

The QGraph's ``maxpool2d`` ignores padded positions: each output is the maximum of the
input values its window covers inside the image. hls4ml's Pooling2D cannot state that
(in io_parallel it fills padded positions with the value whose top bit alone is set,
which is the largest value of an unsigned type; its io_stream pooling takes no padding),
so padded max pools become this layer (ONNX domain ``qflow``, op ``FixedMaxPool``,
attributes ``kernel_shape``, ``strides`` and ``pads``), whose C++ is
``hls/qflow_max_pool.h``. Its only type is ``result_t``, which holds every input value.
Unpadded max pools stay on hls4ml's Pooling2D, which is exact for them.
"""

from __future__ import annotations

from .custom import WINDOW, ExtensionLayer, constants, initialize_pool, pooled_size

__all__ = ["GEOMETRY", "HEADER", "LAYER", "pooled_size"]

#: attributes the ONNX handler reads (pads: top, left, bottom, right)
GEOMETRY = ("pool_height", "pool_width", "stride_height", "stride_width", "pad_top",
            "pad_left", "pad_bottom", "pad_right")


def _initialize(layer) -> None:
    initialize_pool(layer, *(layer.get_attr(k) for k in GEOMETRY[4:]))


def _parse(attribute) -> dict:
    (ph, pw), (sh, sw) = (attribute(k) for k in ("kernel_shape", "strides"))
    top, left, bottom, right = attribute("pads")
    values = (ph, pw, sh, sw, top, left, bottom, right)
    return {k: int(v) for k, v in zip(GEOMETRY, values, strict=True)}


LAYER = ExtensionLayer(
    name="FixedMaxPool",
    function="qflow_max_pool",
    config=constants((*WINDOW, "pad_top", "pad_left", "out_height", "out_width")),
    initialize=_initialize,
    parse=_parse,
    attributes=GEOMETRY,
    includes=("qflow_window.h",),
)
HEADER = LAYER.sources[0]
