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

from pathlib import Path

HEADER = Path(__file__).resolve().parents[3] / "hls" / "qflow_max_pool.h"

_CONFIG_TEMPLATE = """struct config{index} : nnet::qflow_max_pool_config {{
    static const unsigned in_height = {in_height};
    static const unsigned in_width = {in_width};
    static const unsigned n_chan = {n_chan};
    static const unsigned pool_height = {pool_height};
    static const unsigned pool_width = {pool_width};
    static const unsigned stride_height = {stride_height};
    static const unsigned stride_width = {stride_width};
    static const unsigned pad_top = {pad_top};
    static const unsigned pad_left = {pad_left};
    static const unsigned out_height = {out_height};
    static const unsigned out_width = {out_width};
}};\n"""
_FUNCTION_TEMPLATE = ("nnet::qflow_max_pool<{input_t}, {output_t}, {config}>({input}, "
                      "{output});")
#: attributes the ONNX handler reads (pads: top, left, bottom, right)
GEOMETRY = ("pool_height", "pool_width", "stride_height", "stride_width", "pad_top",
            "pad_left", "pad_bottom", "pad_right")


def pooled_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int) -> int:
    """Output rows (or columns) of a window sliding over ``size`` padded values (floor).

    >>> pooled_size(8, 3, 2, 1, 1), pooled_size(4, 3, 1, 1, 1)
    (4, 4)
    """
    return (size + pad_before + pad_after - kernel) // stride + 1


def register(layer_base) -> tuple[type, type]:
    """Register the FixedMaxPool layer and its ONNX handler; return its config and
    function templates (the caller registers them and ``HEADER`` with each backend)."""
    import hls4ml
    from hls4ml.backends.template import FunctionCallTemplate, LayerConfigTemplate
    from hls4ml.model.attributes import Attribute
    from hls4ml.model.layers import register_layer

    class FixedMaxPool(layer_base):
        _expected_attributes = tuple(Attribute(name) for name in GEOMETRY)

        def initialize(self):
            in_h, in_w, chans = self.get_input_variable().shape
            a = self.get_attr
            out_h = pooled_size(in_h, a("pool_height"), a("stride_height"), a("pad_top"),
                                a("pad_bottom"))
            out_w = pooled_size(in_w, a("pool_width"), a("stride_width"), a("pad_left"),
                                a("pad_right"))
            for key, value in zip(("in_height", "in_width", "n_chan", "out_height", "out_width"),
                                  (in_h, in_w, chans, out_h, out_w), strict=True):
                self.set_attr(key, value)
            self.add_output_variable([out_h, out_w, chans])

    class FixedMaxPoolConfigTemplate(LayerConfigTemplate):
        def __init__(self):
            super().__init__(FixedMaxPool)
            self.template = _CONFIG_TEMPLATE

        def format(self, node):
            return self.template.format(**self._default_config_params(node))

    class FixedMaxPoolFunctionTemplate(FunctionCallTemplate):
        def __init__(self):
            super().__init__(FixedMaxPool, include_header=["nnet_utils/qflow_max_pool.h"])
            self.template = _FUNCTION_TEMPLATE

        def format(self, node):
            return self.template.format(**self._default_function_params(node))

    def parse_fixed_max_pool(node, input_names, input_shapes, graph):
        from hls4ml.converters.onnx_to_hls import get_onnx_attribute

        (ph, pw), (sh, sw) = (get_onnx_attribute(node, k) for k in ("kernel_shape", "strides"))
        top, left, bottom, right = get_onnx_attribute(node, "pads")
        values = (ph, pw, sh, sw, top, left, bottom, right)
        return {"class_name": "FixedMaxPool", "name": node.name, "inputs": input_names,
                "outputs": list(node.output),
                **{k: int(v) for k, v in zip(GEOMETRY, values, strict=True)}}

    register_layer("FixedMaxPool", FixedMaxPool)
    hls4ml.converters.register_onnx_layer_handler("FixedMaxPool", parse_fixed_max_pool)
    return FixedMaxPoolConfigTemplate, FixedMaxPoolFunctionTemplate
