"""QGraph: a small typed integer IR that imports without torch.

Every tensor holds int64 codes of a :class:`~qflow.numerics.FixedType`; every node is
integer arithmetic on codes. The op set and each op's exact semantics are in
``docs/qgraph.md``. A QGraph is saved as one ``.qgraph`` file: an ``.npz`` archive
(read with ``allow_pickle=False``) holding the integer constants and the graph as JSON.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qflow.errors import QflowError
from qflow.numerics import FixedType

FORMAT_VERSION = 1

#: op name -> (number of inputs, required constants, required attributes); ``None``
#: inputs: any number from one up
OP_SPECS: dict[str, tuple[int | None, tuple[str, ...], tuple[str, ...]]] = {
    "dense": (1, ("weight", "weight_frac"), ()),
    "conv2d": (1, ("weight", "weight_frac"), ("stride", "padding", "dilation", "groups")),
    "scale_shift": (1, ("scale", "scale_frac", "shift", "shift_frac"), ()),
    "relu": (1, (), ()),
    "add": (2, (), ()),
    "maxpool2d": (1, (), ("kernel", "stride", "padding", "dilation", "ceil_mode")),
    "avgpool2d": (1, ("reciprocal",), ("kernel", "stride", "reciprocal_frac")),
    "global_avgpool2d": (1, ("reciprocal",), ("reciprocal_frac",)),
    "reshape": (1, (), ("shape",)),
    "concat": (None, (), ("axis",)),
    "cast": (1, (), ()),
    "sign": (1, (), ()),
    # transformer ops (docs/transformer_ops.md) and token ops: qflow.graph.transformer
    "softmax": (1, (), ("axis",)),
    "layernorm": (1, ("gamma", "beta"), ("axis", "gamma_type", "beta_type")),
    "gelu": (1, (), ()),
    "matmul": (2, (), ("transpose_b",)),
    "transpose": (1, (), ("perm",)),
    "slice": (1, (), ("axis", "start", "stop")),
    "add_const": (1, ("value",), ("value_frac",)),
    "mean": (1, ("reciprocal",), ("axis", "reciprocal_frac")),
}


class QGraphError(QflowError):
    """A QGraph file or structure that cannot be used."""


@dataclass
class TensorInfo:
    """An edge: per-sample shape (batch excluded) and fixed-point type."""

    name: str
    shape: tuple[int, ...]
    type: FixedType

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "type": self.type.to_ap()}


@dataclass
class Node:
    """One integer operation. ``consts`` are int64 arrays; ``attrs`` are JSON values."""

    op: str
    name: str
    inputs: list[str]
    output: str
    attrs: dict = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""  # the model layer it came from

    def to_json(self) -> dict:
        return {"op": self.op, "name": self.name, "inputs": self.inputs, "output": self.output,
                "attrs": self.attrs, "consts": sorted(self.consts), "source": self.source}


@dataclass
class QGraph:
    """A frozen integer model: one input tensor (codes), nodes in execution order, one output."""

    input: str
    output: str
    tensors: dict[str, TensorInfo]
    nodes: list[Node]
    meta: dict = field(default_factory=dict)

    def tensor(self, name: str) -> TensorInfo:
        return self.tensors[name]

    @property
    def input_type(self) -> FixedType:
        return self.tensors[self.input].type

    @property
    def output_type(self) -> FixedType:
        return self.tensors[self.output].type

    def validate(self, where: str = "QGraph") -> QGraph:
        """Check the structure; raise QGraphError naming the node and problem."""
        if self.input not in self.tensors:
            raise QGraphError(f"{where}: input tensor {self.input!r} is not declared")
        known = {self.input}
        names = set()
        for node in self.nodes:
            label = f"{where}: node {node.name!r} (op {node.op!r})"
            if node.op not in OP_SPECS:
                raise QGraphError(f"{label}: unsupported op")
            if node.name in names:
                raise QGraphError(f"{label}: duplicate node name")
            names.add(node.name)
            n_in, consts, attrs = OP_SPECS[node.op]
            if n_in is None and not node.inputs:
                raise QGraphError(f"{label}: expects at least one input, has none")
            if n_in is not None and len(node.inputs) != n_in:
                raise QGraphError(f"{label}: expects {n_in} inputs, has {len(node.inputs)}")
            for name in node.inputs:
                if name not in known:
                    raise QGraphError(f"{label}: input {name!r} is not produced before it")
            for name in consts:
                if name not in node.consts:
                    raise QGraphError(f"{label}: missing constant {name!r}")
                if node.consts[name].dtype != np.int64:
                    raise QGraphError(f"{label}: constant {name!r} is not int64")
            for name in attrs:
                if name not in node.attrs:
                    raise QGraphError(f"{label}: missing attribute {name!r}")
            if node.output not in self.tensors:
                raise QGraphError(f"{label}: output {node.output!r} is not declared")
            known.add(node.output)
        if self.output not in known:
            raise QGraphError(f"{where}: output tensor {self.output!r} is never produced")
        return self

    # -- files ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the graph to ``path`` (atomically: temporary file, then rename)."""
        path = Path(path)
        graph = {
            "format": FORMAT_VERSION,
            "input": self.input,
            "output": self.output,
            "tensors": [t.to_json() for t in self.tensors.values()],
            "nodes": [n.to_json() for n in self.nodes],
            "meta": self.meta,
        }
        arrays = {f"{n.name}/{k}": v for n in self.nodes for k, v in n.consts.items()}
        arrays["__graph__"] = np.frombuffer(json.dumps(graph).encode(), dtype=np.uint8)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> QGraph:
        """Read a ``.qgraph`` file; a truncated or corrupted file raises QGraphError."""
        path = Path(path)
        if not path.is_file():
            raise QGraphError(f"QGraph file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise QGraphError(f"{path}: not a readable QGraph file ({exc})") from None
        if "__graph__" not in arrays:
            raise QGraphError(f"{path}: not a QGraph file (no graph description)")
        try:
            graph = json.loads(arrays.pop("__graph__").tobytes().decode())
            if graph.get("format") != FORMAT_VERSION:
                raise QGraphError(f"{path}: unsupported QGraph format {graph.get('format')!r}")
            tensors = {
                t["name"]: TensorInfo(t["name"], tuple(t["shape"]), FixedType.parse(t["type"]))
                for t in graph["tensors"]
            }
            nodes = []
            for n in graph["nodes"]:
                consts = {}
                for key in n["consts"]:
                    if f"{n['name']}/{key}" not in arrays:
                        raise QGraphError(f"{path}: node {n['name']!r} (op {n['op']!r}): "
                                          f"constant {key!r} is missing")
                    consts[key] = arrays[f"{n['name']}/{key}"]
                nodes.append(Node(n["op"], n["name"], list(n["inputs"]), n["output"],
                                  dict(n["attrs"]), consts, n.get("source", "")))
            qgraph = cls(graph["input"], graph["output"], tensors, nodes, graph.get("meta", {}))
        except QGraphError:
            raise
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise QGraphError(f"{path}: malformed QGraph description ({type(exc).__name__}: "
                              f"{exc})") from None
        return qgraph.validate(str(path))

    def consumers(self) -> dict[str, list[Node]]:
        """Tensor name -> the nodes that read it, in execution order."""
        readers: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                readers.setdefault(name, []).append(node)
        return readers

    def summary(self) -> list[dict]:
        """One row per node: name, op, output type and shape (for printing)."""
        return [{"node": n.name, "op": n.op, "source": n.source,
                 "type": self.tensors[n.output].type.to_ap(),
                 "shape": self.tensors[n.output].shape} for n in self.nodes]
