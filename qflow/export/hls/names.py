"""ONNX names that hls4ml reads safely, whatever the QGraph's node names are.

The exporter first writes the hls4ml form with names taken from the QGraph (``fc1``,
``fc1_weight``, ...), then renames every ONNX node, tensor and initializer with
:func:`rename_graph`. Module names are not always identifiers (a plain ``nn.Sequential``
names its children ``0``, ``1``, ...; an imported graph may use ``/conv/Conv_output_0``),
and hls4ml 1.3 depends on names in ways that break on such names:

- its ONNX reader renames a layer or an initializer whose name starts with a digit
  (node ``1`` becomes layer ``matmul1``, initializer ``1_weight`` becomes constant
  ``constant1_weight``) but not the references to it: the MatMul of ``1`` then has no
  weight input and fails with ``'NoneType' object has no attribute 'shape'``, and the
  per-layer config keyed ``1`` no longer matches any layer;
- it replaces ``.`` by ``_`` in input and initializer names only, with the same effect;
- it looks precisions up by the lower-cased layer name and writes C++ type names from
  it (``<layer>_accum_t``): names must be C identifiers, distinct ignoring case;
- its passes name the layers they make after the node they replace (``Dense_<n>`` for a
  MatMul with constant weights, ``bn_<n>`` for an Add of a constant, ``<n>_act`` for a
  Quant), and those names must not be taken either.

The rule: a name that is an identifier starting with a letter, and clashes with nothing
(ignoring case, the names hls4ml derives from it included), is kept; any other becomes
``q_`` followed by the name with every character outside ``[A-Za-z0-9_]`` replaced by
``_`` (``0`` → ``q_0``, ``1_weight`` → ``q_1_weight``, ``features.3`` → ``q_features_3``),
with ``_2``, ``_3``, ... appended until nothing clashes. The same string always gets
the same new name, so a node and the tensor named like it stay paired.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import onnx

#: a name hls4ml keeps as it is and C++ accepts inside a type name
IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
#: hls4ml's reserved layer name (its ModelGraph calls the graph input ``input``)
RESERVED = ("input",)
#: a layer named after its ONNX node
SAME = "{}"


def escape(name: str) -> str:
    """``name`` when it is an identifier starting with a letter, else ``q_<name>`` with
    every other character replaced by ``_``.

    >>> escape("fc1"), escape("0"), escape("features.3"), escape("/conv/Conv_output_0")
    ('fc1', 'q_0', 'q_features_3', 'q__conv_Conv_output_0')
    """
    if IDENTIFIER.match(name):
        return name
    return "q_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


class Namer:
    """Gives each string a new name, distinct ignoring case from every name given before
    and from the names derived from those (``templates``, e.g. ``Dense_{}``)."""

    def __init__(self, reserved: Iterable[str] = RESERVED):
        self.used: set[str] = {r.lower() for r in reserved}
        self.names: dict[str, str] = {}

    def __call__(self, name: str, templates: Iterable[str] = (SAME,)) -> str:
        if name in self.names:
            return self.names[name]
        templates = {SAME, *templates}
        base = candidate = escape(name)
        i = 1
        while any(t.format(candidate).lower() in self.used for t in templates):
            i += 1
            candidate = f"{base}_{i}"
        self.used.update(t.format(candidate).lower() for t in templates)
        self.names[name] = candidate
        return candidate


def rename_graph(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
                 keep: Iterable[str], templates: dict[str, str]) -> dict[str, str]:
    """Rename, in place, every node, tensor and initializer of ``nodes`` and ``inits``;
    return old name -> new name. ``keep``: names that stay as they are (the graph
    input); ``templates``: ONNX node name -> the name hls4ml gives its layer."""
    namer = Namer()
    for name in keep:
        if namer(name) != name:
            raise ValueError(f"{name!r} cannot be kept as an hls4ml name")
    for node in nodes:  # nodes first: their names and what hls4ml derives from them
        node.name = namer(node.name, (templates.get(node.name, SAME),))
    for node in nodes:
        for i, tensor in enumerate(node.input):
            node.input[i] = namer(tensor)
        for i, tensor in enumerate(node.output):
            node.output[i] = namer(tensor)
    for init in inits:
        init.name = namer(init.name)
    return namer.names
