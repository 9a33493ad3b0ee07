"""qflow's own hls4ml layer, added through hls4ml's extension API (hls4ml is not patched).

``FixedCast`` (ONNX domain ``qflow``, attribute ``qflow_type``) requantizes a tensor to
an ``ap_fixed`` type with any rounding and overflow mode; its C++ is
``hls/qflow_fixed_cast.h`` in the source tree, copied into every project that uses it.
"""

from __future__ import annotations

from pathlib import Path

from qflow.errors import QflowError

HEADER = Path(__file__).resolve().parents[3] / "hls" / "qflow_fixed_cast.h"
BACKENDS = ("Vivado", "Vitis")

_CONFIG_TEMPLATE = """struct config{index} : nnet::qflow_fixed_cast_config {{
    static const unsigned n_in = {n_in};
}};\n"""
_FUNCTION_TEMPLATE = "nnet::qflow_fixed_cast<{input_t}, {output_t}, {config}>({input}, {output});"

_registered = False


def register() -> None:
    """Register FixedCast with hls4ml once per process (idempotent)."""
    global _registered
    if _registered:
        return
    if not HEADER.is_file():
        raise QflowError(f"qflow's HLS header is missing: {HEADER} (install qflow from its "
                         "source tree)")
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
    for name in BACKENDS:
        backend = hls4ml.backends.get_backend(name)
        backend.register_template(FixedCastConfigTemplate)
        backend.register_template(FixedCastFunctionTemplate)
        backend.register_source(HEADER)
    _registered = True
