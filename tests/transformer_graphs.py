"""Hand-built transformer QGraphs for ``test_transformer_graph_ops.py``, 8-bit types:

- ``attention_block``: one head, layernorm -> dense q, k, v -> matmul q·kᵀ -> cast ->
  softmax -> matmul with v -> cast -> dense -> add residual -> cast -> layernorm ->
  dense -> cast -> gelu -> dense -> cast, after a position embedding (``add_const``);
- ``two_head_block``: the same with two heads taken by ``slice``, kᵀ by ``transpose``,
  the heads joined by ``concat``, and a token ``mean`` before a classifier;
- ``ops_graph``: softmax, layernorm, gelu and x·xᵀ applied to the input itself and
  joined by ``concat``, so that chosen input rows (equal, one huge logit, all negative,
  zero variance, most negative codes) reach every op directly.

Output types use several rounding and overflow modes, Quant-stated ones and others.
"""

from __future__ import annotations

import numpy as np
from binary_graphs import Maker

from qflow.graph import infer, transformer
from qflow.graph.ir import Node, QGraph, TensorInfo
from qflow.numerics import FixedType, to_codes
from qflow.numerics.corners import corner_inputs

ACT = FixedType.parse("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
TOKENS = FixedType.parse("ap_fixed<8,2,AP_RND_CONV,AP_SAT>")
GAMMA = FixedType.parse("ap_fixed<8,1,AP_RND_CONV,AP_SAT>")
BETA = FixedType.parse("ap_fixed<8,1,AP_RND_CONV,AP_SAT>")
LOGITS = FixedType.parse("ap_fixed<8,4,AP_RND_CONV,AP_SAT>")
PROBS = FixedType.parse("ap_ufixed<8,0,AP_RND_CONV,AP_SAT>")
PROBS_RND = FixedType.parse("ap_ufixed<9,1,AP_RND,AP_SAT>")
NORM = FixedType.parse("ap_fixed<8,3,AP_RND_INF,AP_SAT>")
GELU = FixedType.parse("ap_fixed<8,3,AP_TRN,AP_SAT>")
OUT = FixedType.parse("ap_fixed<12,6,AP_RND_CONV,AP_SAT>")


class TMaker(Maker):
    """``Maker`` with the transformer and token ops' shapes and types
    (``qflow.graph.transformer.output_info``)."""

    def op(self, op, inputs=None, out_type=None, attrs=None, name=None, **consts) -> str:
        name = name or f"{op}{len(self.nodes)}"
        inputs = list(inputs or [self.last])
        node = Node(op, name, inputs, name, attrs or {},
                    {k: np.asarray(v, dtype=np.int64) for k, v in consts.items()})
        shape, t = transformer.output_info(node, [self.tensors[i] for i in inputs], out_type)
        self.tensors[name] = TensorInfo(name, shape, t)
        self.nodes.append(node)
        self.last = name
        return name

    def dense(self, width: int, name: str, x=None, frac: int = 7) -> str:
        fan_in = self.tensors[x or self.last].shape[-1]
        return self.add("dense", (*self.tensors[x or self.last].shape[:-1], width),
                        inputs=[x or self.last], name=name,
                        weight=self.rng.integers(-128, 128, (width, fan_in)),
                        weight_frac=np.full(width, frac),
                        bias=self.rng.integers(-300, 300, width), bias_frac=np.full(width, 9))

    def layernorm(self, name: str, out_type: FixedType = ACT, axis: int = 1, x=None) -> str:
        length = self.tensors[x or self.last].shape[axis]
        return self.op("layernorm", [x or self.last], out_type, {
            "axis": axis, "gamma_type": GAMMA.to_ap(), "beta_type": BETA.to_ap()}, name,
            gamma=self.rng.integers(-128, 128, length), beta=self.rng.integers(-128, 128, length))

    def position(self, name: str = "pos") -> str:
        t = self.tensors[self.last]
        self.op("add_const", attrs={"value_frac": 6}, name=name,
                value=self.rng.integers(-64, 64, t.shape))
        return self.cast(ACT)


def _attention(m: TMaker, x: str, tokens: int, width: int, heads: int) -> str:
    """Multi-head self-attention of ``x`` (tokens, width) and its projection."""
    ln = m.layernorm("ln1", x=x)
    q, k, v = (m.dense(width, n, ln, frac=8) for n in ("q", "k", "v"))
    q, k, v = (m.add("cast", inputs=[t], out_type=ACT, name=f"{t}_cast") for t in (q, k, v))
    per = width // heads
    outs = []
    for h in range(heads):
        if heads == 1:
            qh, kh, vh = q, k, v
            scores = m.op("matmul", [qh, kh], attrs={"transpose_b": True}, name="scores")
        else:
            qh, kh, vh = (m.op("slice", [t], attrs={"axis": 1, "start": h * per,
                                                    "stop": (h + 1) * per},
                               name=f"{t}_h{h}") for t in (q, k, v))
            kt = m.op("transpose", [kh], attrs={"perm": [1, 0]}, name=f"kT_h{h}")
            scores = m.op("matmul", [qh, kt], attrs={"transpose_b": False},
                          name=f"scores_h{h}")
        m.add("cast", inputs=[scores], out_type=LOGITS, name=f"logits_h{h}")
        m.op("softmax", out_type=PROBS if h == 0 else PROBS_RND, attrs={"axis": 1},
             name=f"softmax_h{h}")
        m.op("matmul", [m.last, vh], attrs={"transpose_b": False}, name=f"context_h{h}")
        outs.append(m.cast(ACT))
    if heads > 1:
        m.add("concat", (tokens, width), inputs=outs, attrs={"axis": 1}, name="heads")
    m.dense(width, "proj")
    m.cast(ACT)
    m.add("add", inputs=[m.last, x], name="residual")
    return m.cast(ACT)


def _mlp(m: TMaker, width: int) -> str:
    m.layernorm("ln2", NORM)
    m.dense(2 * width, "fc1")
    m.cast(ACT)
    m.op("gelu", out_type=GELU, name="gelu")
    m.dense(width, "fc2")
    return m.cast(OUT)


def attention_block(seed: int = 0, tokens: int = 6, width: int = 8) -> QGraph:
    m = TMaker(TOKENS, (tokens, width), seed)
    x = m.position()
    _attention(m, x, tokens, width, heads=1)
    _mlp(m, width)
    return m.graph()


def two_head_block(seed: int = 1, tokens: int = 5, width: int = 8, classes: int = 4) -> QGraph:
    m = TMaker(TOKENS, (tokens, width), seed)
    x = m.position()
    _attention(m, x, tokens, width, heads=2)
    _mlp(m, width)
    m.op("mean", attrs={"axis": 0, "reciprocal_frac": 18},
         reciprocal=round(2**18 / tokens), name="token_mean")
    m.cast(ACT)
    m.dense(classes, "head")
    m.cast(OUT)
    return m.graph()


def ops_graph(seed: int = 2, tokens: int = 6, width: int = 8, act: FixedType = ACT,
              probs: FixedType = PROBS, gelu: FixedType = GELU) -> QGraph:
    """Each op reads the input codes (type ``act``) themselves; their results, cast to
    ``act``, joined along axis 1."""
    m = TMaker(act, (tokens, width), seed)
    x = m.last
    parts = [m.op("softmax", [x], probs, {"axis": 1}, "softmax_rows")]
    parts.append(m.add("cast", inputs=[parts[-1]], out_type=act, name="softmax_cast"))
    parts.append(m.layernorm("layernorm_rows", act, x=x))
    parts.append(m.op("gelu", [x], gelu, name="gelu_x"))
    m.op("matmul", [x, x], attrs={"transpose_b": True}, name="gram")
    parts.append(m.add("cast", inputs=["gram"], out_type=act, name="gram_cast"))
    m.add("concat", (tokens, 3 * width + tokens), inputs=parts[1:], attrs={"axis": 1},
          name="joined", out_type=infer.infer_concat([m.tensors[p].type for p in parts[1:]]))
    return m.graph()


def extreme_codes(t: FixedType, shape, seed: int = 0) -> np.ndarray:
    """Samples whose rows are the ops' extremes: equal rows, one huge element over the
    most negative ones, all negative, zero variance at every level, alternating extremes,
    the most negative code everywhere, single steps; then random codes."""
    rng = np.random.default_rng(seed)
    tokens, width = shape
    rows = [np.full(width, t.qmin), np.full(width, t.qmax), np.zeros(width, np.int64),
            np.full(width, -1), np.where(np.arange(width) == 0, t.qmax, t.qmin),
            np.where(np.arange(width) == width - 1, t.qmax, t.qmin),
            np.where(np.arange(width) % 2 == 0, t.qmax, t.qmin),
            np.where(np.arange(width) == 3, 0, t.qmin), np.full(width, t.qmin + 1),
            np.where(np.arange(width) == 2, 1, 0), -np.arange(width) - 1,
            np.arange(width) * (t.qmax // width)]
    rows = np.array(rows, dtype=np.int64)
    samples = [np.resize(np.roll(rows, k, axis=0), (tokens, width)) for k in range(len(rows))]
    samples += [np.full((tokens, width), c) for c in (t.qmin, t.qmax, 0, 1, -1)]
    rand = rng.integers(t.qmin, t.qmax, (200, tokens, width), endpoint=True)
    near = rng.integers(t.qmax - 12, t.qmax, (100, tokens, width), endpoint=True)
    return np.concatenate([np.array(samples), rand, near])


def sample_codes(graph: QGraph, count: int = 400, seed: int = 0) -> np.ndarray:
    """Input codes: random reals slightly beyond the type's range, corner cases, and
    the extreme rows."""
    t, shape = graph.input_type, graph.tensors[graph.input].shape
    rng = np.random.default_rng(seed)
    x = rng.uniform(t.min_value * 1.1, t.max_value * 1.1, (count, *shape))
    codes = to_codes(np.concatenate([x, corner_inputs(t, shape, 128)]), t)
    return np.concatenate([codes, extreme_codes(t, shape, seed)])
