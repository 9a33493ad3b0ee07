"""Hand-built binary QGraphs for ``test_binary_ops.py``: an MLP and a CNN with a
shortcut, whose hidden layers are ``sign`` -> dense/conv2d with +-1 weights ->
``scale_shift`` (alpha and BatchNorm) -> ``cast``, between 8-bit first and last layers.

The scale_shift constants are chosen so that many accumulator values land exactly on the
cast's rounding ties and on 0 (where sign(0) = +1 matters).
"""

from __future__ import annotations

import itertools

import numpy as np

from qflow.graph import infer
from qflow.graph.ir import Node, QGraph, TensorInfo
from qflow.numerics import FixedType
from qflow.numerics.corners import corner_inputs

ACT = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
INPUT = FixedType.parse("ap_fixed<8,1,AP_RND_CONV,AP_SAT>")
INPUT_NAME = "input"  # as freeze names it (the QONNX export reserves "x")


class Maker:
    """Builds a QGraph node by node, with exact types from ``qflow.graph.infer``."""

    def __init__(self, input_type: FixedType, shape, seed: int = 0):
        self.tensors = {INPUT_NAME: TensorInfo(INPUT_NAME, tuple(shape), input_type)}
        self.nodes: list[Node] = []
        self.last = INPUT_NAME
        self.rng = np.random.default_rng(seed)

    def add(self, op, shape=None, out_type=None, inputs=None, attrs=None, name=None,
            **consts):
        name = name or f"{op}{len(self.nodes)}"
        inputs = inputs or [self.last]
        node = Node(op, name, list(inputs), name, attrs or {},
                    {k: np.asarray(v, dtype=np.int64) for k, v in consts.items()})
        t = [self.tensors[i].type for i in inputs]
        if out_type is None:
            if op in ("dense", "conv2d"):
                out_type = infer.infer_weighted(node, t[0])
            elif op == "scale_shift":
                out_type = infer.infer_scale_shift(node, t[0])
            elif op == "add":
                out_type = infer.infer_add(*t)
            elif op == "sign":
                out_type = infer.infer_sign(t[0])
            else:
                out_type = t[0]
        shape = self.tensors[inputs[0]].shape if shape is None else tuple(shape)
        self.tensors[name] = TensorInfo(name, tuple(shape), out_type)
        self.nodes.append(node)
        self.last = name
        return name

    def binary_weights(self, shape) -> np.ndarray:
        return self.rng.choice(np.array([-1, 1]), size=shape)

    def bn(self, channels: int, frac: int = 6, spread: int = 40) -> str:
        """A scale_shift with small scales (alpha x BatchNorm) and shifts on the grid of
        the products, so that accumulator values hit 0 and the casts' ties."""
        scale = self.rng.integers(1, spread, channels) * self.rng.choice([-1, 1], channels)
        shift = self.rng.integers(-4 * spread, 4 * spread, channels)
        return self.add("scale_shift", scale=scale, scale_frac=np.full(channels, frac),
                        shift=shift, shift_frac=np.full(channels, frac))

    def cast(self, t: FixedType = ACT) -> str:
        return self.add("cast", out_type=t)

    def graph(self) -> QGraph:
        return QGraph(INPUT_NAME, self.last, self.tensors, self.nodes).validate()


def binary_mlp(seed: int = 0, widths=(24, 20, 16, 12), classes: int = 5) -> QGraph:
    """input (8 bit) -> dense 8-bit -> bn -> cast -> [sign -> dense +-1 -> bn -> cast]
    x len(widths)-1 -> dense 8-bit -> cast; one binary layer has a bias, one does not."""
    m = Maker(INPUT, (16,), seed)
    m.add("dense", (widths[0],), weight=m.rng.integers(-128, 128, (widths[0], 16)),
          weight_frac=np.full(widths[0], 7), bias=m.rng.integers(-500, 500, widths[0]),
          bias_frac=np.full(widths[0], 10), name="fc_in")
    m.bn(widths[0], frac=4, spread=12)
    m.cast()
    for k, (fan_in, width) in enumerate(itertools.pairwise(widths)):
        m.add("sign", name=f"sign{k}")
        consts = {"weight": m.binary_weights((width, fan_in)),
                  "weight_frac": np.zeros(width)}
        if k == 1:
            consts.update(bias=m.rng.integers(-8, 8, width), bias_frac=np.zeros(width))
        m.add("dense", (width,), name=f"bin{k}", **consts)
        m.bn(width)
        m.cast()
    m.add("dense", (classes,), weight=m.rng.integers(-128, 128, (classes, widths[-1])),
          weight_frac=np.full(classes, 7), name="fc_out")
    m.cast(FixedType.parse("ap_fixed<12,6,AP_RND_CONV,AP_SAT>"))
    return m.graph()


def _conv(m: Maker, name, shape, weight, padding=1, **consts) -> str:
    attrs = {"stride": [1, 1], "padding": [padding, padding], "dilation": [1, 1], "groups": 1}
    return m.add("conv2d", shape, attrs=attrs, name=name, weight=weight,
                 weight_frac=np.zeros(len(weight)) + consts.pop("frac", 0), **consts)


def binary_cnn(seed: int = 1, padding: int = 1, flatten_first: bool = False) -> QGraph:
    """input (3, 8, 8) -> conv 8-bit -> bn -> cast -> sign -> conv +-1 -> bn -> cast ->
    add (shortcut from the first cast) -> cast -> sign -> conv +-1 -> bn -> cast ->
    maxpool -> sign -> reshape -> dense +-1 -> bn -> cast -> dense 8-bit -> cast.

    ``padding`` is the binary convolutions' zero padding (1: 'same'; 0: 'valid'; the
    shortcut needs 'same'). ``flatten_first`` swaps the last sign and the reshape (the
    sign then reads a flattened tensor)."""
    m = Maker(INPUT, (3, 8, 8), seed)
    c = 6
    _conv(m, "conv_in", (c, 8, 8), m.rng.integers(-128, 128, (c, 3, 3, 3)), frac=7,
          bias=m.rng.integers(-300, 300, c), bias_frac=np.full(c, 9))
    m.bn(c, frac=4, spread=10)
    skip = m.cast()
    m.add("sign", name="sign_a")
    size = 8 - 2 * (1 - padding)
    _conv(m, "bin_a", (c, size, size), m.binary_weights((c, c, 3, 3)), padding)
    m.bn(c)
    m.cast()
    if padding:
        m.add("add", inputs=[m.last, skip], name="shortcut")
        m.cast()
    m.add("sign", name="sign_b")
    size2 = size - 2 * (1 - padding)
    _conv(m, "bin_b", (8, size2, size2), m.binary_weights((8, c, 3, 3)), padding,
          bias=m.rng.integers(-4, 4, 8), bias_frac=np.zeros(8))
    m.bn(8)
    m.cast()
    pooled = size2 // 2
    m.add("maxpool2d", (8, pooled, pooled), attrs={
        "kernel": [2, 2], "stride": [2, 2], "padding": [0, 0], "dilation": [1, 1],
        "ceil_mode": False})
    flat = 8 * pooled * pooled
    if flatten_first:
        m.add("reshape", (flat,), attrs={"shape": [flat]})
        m.add("sign", name="sign_c")
    else:
        m.add("sign", name="sign_c")
        m.add("reshape", (flat,), attrs={"shape": [flat]})
    m.add("dense", (10,), weight=m.binary_weights((10, flat)), weight_frac=np.zeros(10),
          name="bin_fc")
    m.bn(10)
    m.cast()
    m.add("dense", (4,), weight=m.rng.integers(-128, 128, (4, 10)),
          weight_frac=np.full(4, 7), name="fc_out")
    m.cast(FixedType.parse("ap_fixed<12,6,AP_RND_CONV,AP_SAT>"))
    return m.graph()


def sample_inputs(graph: QGraph, count: int = 600, seed: int = 0) -> np.ndarray:
    """Random real inputs slightly beyond the input type's range, then its corner cases."""
    t, shape = graph.input_type, graph.tensors[graph.input].shape
    rng = np.random.default_rng(seed)
    x = rng.uniform(t.min_value * 1.1, t.max_value * 1.1, (count, *shape))
    return np.concatenate([x, corner_inputs(t, shape, 256)])


def mismatches(got: np.ndarray, want: np.ndarray) -> int:
    """Samples with any differing code."""
    assert got.shape == want.shape
    return int((np.asarray(got) != np.asarray(want)).reshape(len(got), -1).any(axis=1).sum())
