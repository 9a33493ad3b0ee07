"""qflow's own hls4ml layers, added through hls4ml's extension API (hls4ml is not patched).

- ``FixedCast`` (:mod:`.fixed_cast`, ``hls/qflow_fixed_cast.h``) requantizes a tensor to
  an ``ap_fixed`` type with any rounding and overflow mode.
- ``FixedAvgPool`` (:mod:`.avg_pool`, ``hls/qflow_avg_pool.h``) is the QGraph's average
  pooling: the window's integer sum in ``accum_t`` times the reciprocal in ``scale_t``.
- ``FixedMaxPool`` (:mod:`.max_pool`, ``hls/qflow_max_pool.h``) is the QGraph's padded max
  pooling, in which padding never wins.
- ``FixedSign`` (:mod:`.sign`, ``hls/qflow_sign.h``) is the QGraph's ``sign``, in hls4ml's
  binary {0, 1} type for XNOR layers or as ``ap_fixed<2,2>``.
- ``FixedSoftmax``, ``FixedLayerNorm``, ``FixedGELU`` (:mod:`.softmax`, :mod:`.layernorm`,
  :mod:`.gelu`) are the integer ops of ``docs/transformer_ops.md``; ``ActivationMatMul``
  (:mod:`.matmul`) the product of two activations; ``FixedTranspose``, ``FixedSlice``,
  ``FixedMean`` and ``FixedAddConst`` (:mod:`.transpose`, :mod:`.token_slice`,
  :mod:`.token_mean`, :mod:`.add_const`) the token ops. Their geometry and every
  intermediate width come from the QGraph (:mod:`.transformer_graph`).

Each is an :class:`ExtensionLayer` (ONNX domain ``qflow``, op = the layer's name): its
hls4ml layer class, ONNX handler, config and function templates and C++ header are made
from it by :func:`register`. The C++ headers live in the source tree's ``hls/`` and are
copied into every project.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

from qflow.errors import QflowError

HLS_SOURCES = Path(__file__).resolve().parents[3] / "hls"
BACKENDS = ("Vivado", "Vitis")
#: the window geometry at the start of both pooling layers' C++ configs
WINDOW = ("in_height", "in_width", "n_chan", "pool_height", "pool_width", "stride_height",
          "stride_width")


@dataclass(frozen=True)
class ExtensionLayer:
    """One of qflow's hls4ml layers, as :func:`register` adds it.

    The header ``hls/<function>.h`` defines ``nnet::<function>`` (an io_parallel and an
    io_stream overload, called ``function<input_t, output_t, config>(input, output)``) and
    its config base ``nnet::<function>_config``.
    """

    #: the hls4ml layer class and the ONNX op
    name: str
    #: the C++ function, its header and config base are named after it
    function: str
    #: the members of the layer's C++ config struct, ``str.format`` fields taking the
    #: layer's attributes (and ``config_params``)
    config: tuple[str, ...]
    #: ``Layer.initialize``: sets the derived attributes, adds the output variable
    initialize: Callable[[Any], None]
    #: the layer's attributes from its ONNX node, given ``attribute(key)``
    parse: Callable[[Callable[[str], Any]], dict[str, Any]] = lambda attribute: {}
    #: the hls4ml attributes it expects besides ``Layer``'s, and its types besides result
    attributes: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    #: which of ``attributes`` hold text (C++ type names) or lists; the others integers
    text: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()
    #: more config template parameters, from the hls4ml layer
    config_params: Callable[[Any], dict[str, Any]] = lambda layer: {}
    #: other headers in ``hls/`` that its header includes
    includes: tuple[str, ...] = ()
    #: the C++ call, when not ``function<input_t, output_t, config>(input, output)``
    #: (``str.format`` fields: hls4ml's function parameters and ``function_params``)
    call: str = ""
    #: more function call parameters, from the hls4ml layer (a second input's names)
    function_params: Callable[[Any], dict[str, Any]] = lambda layer: {}

    @property
    def sources(self) -> tuple[Path, ...]:
        """Its header and the ones that header includes, copied into every project."""
        return tuple(HLS_SOURCES / name for name in (f"{self.function}.h", *self.includes))

    @property
    def config_template(self) -> str:
        members = "".join(f"    {line}\n" for line in self.config)
        return f"struct config{{index}} : nnet::{self.function}_config {{{{\n{members}}}}};\n"

    @property
    def function_template(self) -> str:
        if self.call:
            return self.call
        return (f"nnet::{self.function}<{{input_t}}, {{output_t}}, {{config}}>({{input}}, "
                "{output});")


def constants(names: Sequence[str]) -> tuple[str, ...]:
    """C++ config members ``static const unsigned <name> = {<name>};``."""
    return tuple(f"static const unsigned {name} = {{{name}}};" for name in names)


def typedefs(names: Sequence[str]) -> tuple[str, ...]:
    """C++ config members ``typedef <type> <name>;``, the type a string attribute."""
    return tuple(f"typedef {{{name}}} {name};" for name in names)


def code_table(name: str) -> str:
    """A C++ config member ``static long long <name>(unsigned i)`` returning element i of
    the integer attribute ``<name>`` (a constant table: a ROM in hardware); filled in by
    :func:`table_params`."""
    return (f"static long long {name}(unsigned i) {{{{ static const long long codes[] = "
            f"{{{{{{{name}_codes}}}}}}; return codes[i]; }}}}")


def table_params(layer, names: Sequence[str]) -> dict[str, str]:
    """The ``<name>_codes`` fields of :func:`code_table`: the codes as C++ literals."""
    return {f"{name}_codes": ", ".join(f"{int(v)}LL" for v in layer.get_attr(name))
            for name in names}


def pooled_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int) -> int:
    """Output rows (or columns) of a window sliding over ``size`` padded values (floor).

    >>> pooled_size(8, 3, 2, 1, 1), pooled_size(4, 3, 1, 1, 1)
    (4, 4)
    """
    return (size + pad_before + pad_after - kernel) // stride + 1


def initialize_pool(layer, top: int = 0, left: int = 0, bottom: int = 0, right: int = 0) -> None:
    """Set a pooling layer's input and output sizes (channels-last) from its kernel, strides
    and padding, and add its output variable."""
    in_h, in_w, chans = layer.get_input_variable().shape
    a = layer.get_attr
    out_h = pooled_size(in_h, a("pool_height"), a("stride_height"), top, bottom)
    out_w = pooled_size(in_w, a("pool_width"), a("stride_width"), left, right)
    for key, value in zip(("in_height", "in_width", "n_chan", "out_height", "out_width"),
                          (in_h, in_w, chans, out_h, out_w), strict=True):
        layer.set_attr(key, value)
    layer.add_output_variable([out_h, out_w, chans])


_registered = False


def register() -> None:
    """Register FixedCast, FixedAvgPool, FixedMaxPool, FixedSign and the transformer and
    token layers with hls4ml once per process (idempotent)."""
    global _registered
    if _registered:
        return
    from . import (
        add_const,
        avg_pool,
        fixed_cast,
        gelu,
        layernorm,
        matmul,
        max_pool,
        sign,
        softmax,
        token_mean,
        token_slice,
        transpose,
    )

    layers = (fixed_cast.LAYER, avg_pool.LAYER, max_pool.LAYER, sign.LAYER, softmax.LAYER,
              layernorm.LAYER, gelu.LAYER, matmul.LAYER, transpose.LAYER, token_slice.LAYER,
              token_mean.LAYER, add_const.LAYER)
    for header in (path for layer in layers for path in layer.sources):
        if not header.is_file():
            raise QflowError(f"qflow's HLS header is missing: {header} (install qflow from "
                             "its source tree)")
    for layer in layers:
        _register(layer)
    _registered = True


def _register(spec: ExtensionLayer) -> None:
    """Add one layer to hls4ml: its layer class, ONNX handler, templates and sources."""
    import hls4ml
    from hls4ml.backends.template import FunctionCallTemplate, LayerConfigTemplate
    from hls4ml.model.attributes import Attribute, TypeAttribute
    from hls4ml.model.layers import Layer, register_layer

    def kind(name: str) -> type:
        return str if name in spec.text else list if name in spec.lists else Integral

    expected = (*(Attribute(name, value_type=kind(name)) for name in spec.attributes),
                *(TypeAttribute(name) for name in spec.types))
    layer_class = type(spec.name, (Layer,), {
        "_expected_attributes": expected, "initialize": spec.initialize})
    config, call = spec.config_template, spec.function_template
    header = [f"nnet_utils/{spec.function}.h"]

    class ConfigTemplate(LayerConfigTemplate):
        def __init__(self):
            super().__init__(layer_class)
            self.template = config

        def format(self, node):
            return self.template.format(**{**self._default_config_params(node),
                                           **spec.config_params(node)})

    class FunctionTemplate(FunctionCallTemplate):
        def __init__(self):
            super().__init__(layer_class, include_header=header)
            self.template = call

        def format(self, node):
            return self.template.format(**{**self._default_function_params(node),
                                           **spec.function_params(node)})

    def parse(node, input_names, input_shapes, graph):
        from hls4ml.converters.onnx_to_hls import get_onnx_attribute

        return {"class_name": spec.name, "name": node.name, "inputs": input_names,
                "outputs": list(node.output),
                **spec.parse(lambda key: get_onnx_attribute(node, key))}

    register_layer(spec.name, layer_class)
    hls4ml.converters.register_onnx_layer_handler(spec.name, parse)
    for name in BACKENDS:
        backend = hls4ml.backends.get_backend(name)
        backend.register_template(ConfigTemplate)
        backend.register_template(FunctionTemplate)
        for source in spec.sources:
            backend.register_source(source)
