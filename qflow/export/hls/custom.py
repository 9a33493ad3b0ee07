"""qflow's own hls4ml layers, added through hls4ml's extension API (hls4ml is not patched).

- ``FixedCast`` (ONNX domain ``qflow``, attribute ``qflow_type``) requantizes a tensor to
  an ``ap_fixed`` type with any rounding and overflow mode (``hls/qflow_fixed_cast.h``).
- ``FixedAvgPool`` (ONNX domain ``qflow``, attributes ``kernel_shape``, ``strides`` and
  ``reciprocal``, the integer code of 1/n) is the QGraph's average pooling: the window's
  integer sum in ``accum_t`` times the reciprocal in ``scale_t``, into ``result_t``
  (``hls/qflow_avg_pool.h``). Its types come from the per-layer config as any layer's.
- ``FixedMaxPool`` (ONNX domain ``qflow``) is the QGraph's padded max pooling, in which
  padding never wins (:mod:`.max_pool`, ``hls/qflow_max_pool.h``).

The C++ headers live in the source tree's ``hls/`` and are copied into every project.
"""

from __future__ import annotations

from pathlib import Path

from qflow.errors import QflowError

from . import max_pool

HLS_SOURCES = Path(__file__).resolve().parents[3] / "hls"
HEADER = HLS_SOURCES / "qflow_fixed_cast.h"
POOL_HEADER = HLS_SOURCES / "qflow_avg_pool.h"
BACKENDS = ("Vivado", "Vitis")

_CONFIG_TEMPLATE = """struct config{index} : nnet::qflow_fixed_cast_config {{
    static const unsigned n_in = {n_in};
}};\n"""
_FUNCTION_TEMPLATE = "nnet::qflow_fixed_cast<{input_t}, {output_t}, {config}>({input}, {output});"

_POOL_CONFIG_TEMPLATE = """struct config{index} : nnet::qflow_avg_pool_config {{
    static const unsigned in_height = {in_height};
    static const unsigned in_width = {in_width};
    static const unsigned n_chan = {n_chan};
    static const unsigned pool_height = {pool_height};
    static const unsigned pool_width = {pool_width};
    static const unsigned stride_height = {stride_height};
    static const unsigned stride_width = {stride_width};
    static const unsigned out_height = {out_height};
    static const unsigned out_width = {out_width};
    static const unsigned long long reciprocal = {reciprocal}ULL;
    typedef {accum_t.name} accum_t;
    typedef {scale_t.name} scale_t;
}};\n"""
_POOL_FUNCTION_TEMPLATE = ("nnet::qflow_avg_pool<{input_t}, {output_t}, {config}>({input}, "
                           "{output});")
#: FixedAvgPool attributes that go into its C++ config as they are
POOL_GEOMETRY = ("in_height", "in_width", "n_chan", "pool_height", "pool_width",
                 "stride_height", "stride_width", "out_height", "out_width")

_registered = False


def register() -> None:
    """Register FixedCast, FixedAvgPool and FixedMaxPool with hls4ml once per process
    (idempotent)."""
    global _registered
    if _registered:
        return
    for header in (HEADER, POOL_HEADER, max_pool.HEADER):
        if not header.is_file():
            raise QflowError(f"qflow's HLS header is missing: {header} (install qflow from "
                             "its source tree)")
    import hls4ml
    from hls4ml.backends.template import FunctionCallTemplate, LayerConfigTemplate
    from hls4ml.model.layers import Layer, register_layer

    class FixedCast(Layer):
        def initialize(self):
            inp = self.get_input_variable()
            self.add_output_variable(inp.shape)

    class FixedCastConfigTemplate(LayerConfigTemplate):
        def __init__(self):
            super().__init__(FixedCast)
            self.template = _CONFIG_TEMPLATE

        def format(self, node):
            params = self._default_config_params(node)
            params["n_in"] = node.get_input_variable().size_cpp()
            return self.template.format(**params)

    class FixedCastFunctionTemplate(FunctionCallTemplate):
        def __init__(self):
            super().__init__(FixedCast, include_header=["nnet_utils/qflow_fixed_cast.h"])
            self.template = _FUNCTION_TEMPLATE

        def format(self, node):
            return self.template.format(**self._default_function_params(node))

    def parse_fixed_cast(node, input_names, input_shapes, graph):
        from hls4ml.converters.onnx_to_hls import get_onnx_attribute

        return {"class_name": "FixedCast", "name": node.name, "inputs": input_names,
                "outputs": list(node.output),
                "qflow_type": get_onnx_attribute(node, "qflow_type")}

    register_layer("FixedCast", FixedCast)
    hls4ml.converters.register_onnx_layer_handler("FixedCast", parse_fixed_cast)
    templates = [FixedCastConfigTemplate, FixedCastFunctionTemplate, *_avg_pool(Layer),
                 *max_pool.register(Layer)]
    for name in BACKENDS:
        backend = hls4ml.backends.get_backend(name)
        for template in templates:
            backend.register_template(template)
        backend.register_source(HEADER)
        backend.register_source(POOL_HEADER)
        backend.register_source(max_pool.HEADER)
    _registered = True


def _avg_pool(layer_base) -> tuple[type, type]:
    """Register the FixedAvgPool layer and its ONNX handler; return its config and
    function templates."""
    import hls4ml
    from hls4ml.backends.template import FunctionCallTemplate, LayerConfigTemplate
    from hls4ml.model.attributes import Attribute, TypeAttribute
    from hls4ml.model.layers import register_layer

    class FixedAvgPool(layer_base):
        _expected_attributes = (
            *(Attribute(name) for name in POOL_GEOMETRY[3:7]),
            Attribute("reciprocal"),
            TypeAttribute("accum"),
            TypeAttribute("scale"),
        )

        def initialize(self):
            in_h, in_w, chans = self.get_input_variable().shape
            out_h = (in_h - self.get_attr("pool_height")) // self.get_attr("stride_height") + 1
            out_w = (in_w - self.get_attr("pool_width")) // self.get_attr("stride_width") + 1
            for key, value in zip(("in_height", "in_width", "n_chan", "out_height", "out_width"),
                                  (in_h, in_w, chans, out_h, out_w), strict=True):
                self.set_attr(key, value)
            self.add_output_variable([out_h, out_w, chans])
            self._set_type_t("scale")

    class FixedAvgPoolConfigTemplate(LayerConfigTemplate):
        def __init__(self):
            super().__init__(FixedAvgPool)
            self.template = _POOL_CONFIG_TEMPLATE

        def format(self, node):
            return self.template.format(**self._default_config_params(node))

    class FixedAvgPoolFunctionTemplate(FunctionCallTemplate):
        def __init__(self):
            super().__init__(FixedAvgPool, include_header=["nnet_utils/qflow_avg_pool.h"])
            self.template = _POOL_FUNCTION_TEMPLATE

        def format(self, node):
            return self.template.format(**self._default_function_params(node))

    def parse_fixed_avg_pool(node, input_names, input_shapes, graph):
        from hls4ml.converters.onnx_to_hls import get_onnx_attribute

        (ph, pw), (sh, sw) = (get_onnx_attribute(node, k) for k in ("kernel_shape", "strides"))
        return {"class_name": "FixedAvgPool", "name": node.name, "inputs": input_names,
                "outputs": list(node.output), "pool_height": ph, "pool_width": pw,
                "stride_height": sh, "stride_width": sw,
                "reciprocal": int(get_onnx_attribute(node, "reciprocal"))}

    register_layer("FixedAvgPool", FixedAvgPool)
    hls4ml.converters.register_onnx_layer_handler("FixedAvgPool", parse_fixed_avg_pool)
    return FixedAvgPoolConfigTemplate, FixedAvgPoolFunctionTemplate
