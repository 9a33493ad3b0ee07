"""QONNX export of a QGraph: real-valued in, real-valued out, bit-exact under qonnx's executor.

``export_qonnx(graph, path)`` writes a QONNX-dialect model: standard ONNX ops plus the
``Quant`` op of the ``qonnx.custom_op.general`` domain (power-of-two scales, zero point
0). It takes the real input ``x`` (float64, shape ``[N, *input_shape]``, ``N`` symbolic)
and returns the real output values; output / output LSB equals the emulator's output
codes. ``run_qonnx(path, x)`` runs it with ``qonnx.core.onnx_exec.execute_onnx`` and
returns those codes.

Mapping (ONNX nodes are named after QGraph nodes; helper nodes ``<node>/<role>``; the
ONNX tensor named after a QGraph tensor holds its real values code · 2^-f):

=================== ===============================================================
input quantizer      Quant of the input type (the cast route below, from float64 x)
dense                MatMul(x, Wᵀ) (+ Add bias)
conv2d               Conv (+ bias) in float32; float64 models split wide weights
scale_shift          Mul(scale) + Add(shift), per-channel constants shaped (C, 1, 1)
relu / add           Relu / Add
maxpool2d            MaxPool (ONNX pads with -inf: padding never wins)
avgpool2d            exact window sums (Reshape + ReduceSum, or strided Slices) · 1/n
global_avgpool2d     ReduceSum over H, W · 1/n
reshape              Reshape to [0, *shape]
concat               Concat (axis + 1: the batch comes first)
cast                 the cast route: Quant with the output type
sign                 BipolarQuant (scale 1): qonnx gives +1 where x >= 0, else -1,
                     the QGraph's sign (sign(0) = +1)
softmax, layernorm,  refused (:func:`qonnx_problem`, a one-line error naming the node):
gelu, matmul and     qonnx's executor computes in float, and these ops' integer steps
the token ops        (row divisions, a bitwise square root) have no exact float form
                     here; ``qflow export`` then writes no QONNX artifact and says so
=================== ===============================================================

Every constant (weights, biases, BN scales and shifts, reciprocals) is a float32
initializer holding the exact quantized values, followed by a Quant that states its grid
(per-channel power-of-two scale tensors where the fractional bits differ per channel,
the narrowest bit width holding the codes: the QGraph keeps codes, not the weight type).
Binary weights (every code ±1 on fraction 0) are a ``BipolarQuant`` of their ±1
initializer instead, so that qonnx's datatype inference reads them, like every sign
output, as ``BIPOLAR``. The exact qflow type of every QGraph tensor is in ``metadata_props``
(``qflow.type.<tensor>`` → ``ap_fixed<...>``) and, for casts, in the Quant's
``doc_string``; ``qflow.dtype`` records the float type chosen below.

Exactness. A value n · 2^e is exact in a float with a p-bit significand when |n| < 2^p
(p = 24 for float32, 53 for float64) and e is in range (fractional bits are limited to
±100). Scaling by powers of two is exact. Sums and products of exact values are exact
when every result, and every partial sum in any order, is an integer below 2^p in units
of the finest LSB involved. So the exporter uses float32 when every QGraph tensor type
has at most 24 bits and every bound below fits 2^24, otherwise float64 (53 bits),
otherwise it refuses, naming node and op:

- dense/conv2d: per output channel Σ|w| · max|x| + |bias| (aligned to the accumulator
  LSB) < 2^p; scale_shift: max|scale| · max|x| < 2^p; pooling: n · max|x| < 2^p; add,
  relu, reshape, concat, max pooling: the result type (≤ p bits) holds every value.
- ONNX Runtime has no float64 Conv, so convolutions always run in float32 (the input type
  must have ≤ 24 bits). When a channel sum can reach 2^24, a float64 model writes the
  weight codes in base 2^k digits (w = Σ_j d_j 2^(jk), k as large as allows each digit
  convolution Σ|d_j| · max|x| < 2^24), runs one float32 Conv per digit and adds the
  results, scaled by 2^(jk), in float64 (bound checked < 2^53).
- qonnx's Quant executes in numpy and returns float32, so every Quant's codes need
  ≤ 24 bits; float64 models Cast its output back to float64.

Cast route (qflow ``requantize`` / ``to_codes`` semantics: round first, overflow second).
qonnx's Quant computes clamp(x / scale) and then rounds; clamping to integer bounds
before a monotone rounding that fixes integers equals clamping after it.

- Rounding: RND_CONV → ROUND (half-even), TRN → FLOOR, TRN_ZERO → DOWN, RND_INF →
  HALF_UP, RND_ZERO → HALF_DOWN, RND → FLOOR after adding half an LSB, RND_MIN_INF →
  CEIL after subtracting half an LSB. FLOOR/CEIL/DOWN/ROUND are exact on any float.
  HALF_DOWN computes sign(t) · ceil(|t| − ½): |t| − ½ is exact for |t| ∈ [¼, 2^(p−1)]
  (Sterbenz below 1, a multiple of ulp(t) ≤ ½ above), and for |t| < ¼ any rounding
  stays in (−½, 0], so ceil gives 0. HALF_UP (floor(|t| + ½)) and t ± ½ need t ± ½ to
  be exact: inside the graph t = x / LSB lies on the input grid 2^-s (s = input minus
  output fractional bits) with |t| · 2^s ≤ max|code| of the input type, so t ± ½ is
  exact when max|code| + 2^(s−1) < 2^p; if that fails in float32 the steps before the
  Quant run in float64, and the Quant's own clamp range must stay below 2^(p−1). When
  s ≤ 0 nothing is rounded (t is an integer) and the ±½ is skipped.
- The model input x is an arbitrary float64, so for the tie-sensitive modes (RND,
  RND_MIN_INF, RND_INF) it is first clamped to ±2^W LSB (values beyond saturate or
  zero exactly as before) and "quarter-snapped": with t = x · 2^f = n + r (n = floor t,
  r = t − n), r is replaced by 0, ¼, ½ or ¾ as r is 0, in (0, ½), ½ or in (½, 1)
  (r' = (sign r + sign(r − ½) + 1) / 4, all exact but r itself). Every rounding mode rounds the
  snapped value as the original, and t ± ½ is then exact in float64. (r = t − n is the
  same float64 subtraction qflow's kernel makes, so the two agree even where it rounds:
  t ∈ (−1, 0) with bits below 2^-53.)
- Overflow: SAT → narrow=0; SAT_SYM on a signed type → narrow=1 ([−qmax, qmax]);
  SAT_ZERO → a Quant one bit wider (what it clamps stays out of range, or becomes 0,
  the right result, for an unsigned type) then Where(Less(y, min) or Greater(y, max),
  0, y); WRAP → Mod(x, 2^W·LSB, fmod=1) first (fmod is exact and keeps the sign,
  fraction and parity the rounding looks at, as qflow's kernel does), a Quant W + 2
  bits wide that never clamps, then
  y − R · Floor((y − min) / R) with R = 2^W · LSB, exact in float32 since
  |codes| ≤ 2^(W+1) ≤ 2^23. A 1-bit signed type (codes {−1, 0}; qonnx executes 1-bit
  signed Quants as bipolar ±1) uses a 2-bit Quant and a Clip. With Quants limited to
  24 bits, cast types may have up to 24 bits (SAT, SAT_SYM), 23 (SAT_ZERO), 22 (WRAP).

Batch: qonnx's executor allocates every tensor from its ValueInfo and needs fixed
shapes, so ``run_qonnx`` writes the batch size into a copy of the model (one copy per
chunk size) and runs the input in chunks of ``CHUNK`` samples, each chunk as one batch.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np

from qflow.errors import QflowError
from qflow.graph.ir import QGraph
from qflow.numerics import FixedType

from .qonnx_ops import DOMAIN, EMITTERS, F32, F64, FRAC_LIMIT, Builder, InexactError, emit_cast

FORMAT_VERSION = 1
OPSET = 13
IR_VERSION = 8  # enough for opset 13; readable by ONNX Runtime >= 1.10
INPUT = "x"
CHUNK = 2048  # samples per qonnx executor call (one fixed-batch copy of the model)


def qonnx_problem(graph: QGraph) -> str:
    """Why ``graph`` has no QONNX form ('' when it has one): the first node whose op is
    one of the transformer or token ops, which qonnx's float executor cannot compute
    exactly here (their integer routes are in the integer ONNX and the hls4ml project)."""
    node = next((n for n in graph.nodes if n.op not in EMITTERS), None)
    if node is None:
        return ""
    return (f"node {node.name!r} (op {node.op!r}) has no exact QONNX form (the integer "
            "ONNX, TVM and hls4ml artifacts compute it)")


def export_qonnx(graph: QGraph, path: str | Path) -> Path:
    """Write ``graph`` as a QONNX model to ``path`` (atomically) and return the path.

    Raises QflowError, naming node and op, when part of the graph has no exact form
    (:func:`qonnx_problem`: the transformer and token ops have none).
    """
    import onnx

    graph.validate()
    problem = qonnx_problem(graph)
    if problem:
        raise QflowError(f"QONNX export: {problem}")
    path = Path(path)
    if INPUT in graph.tensors:
        raise QflowError(f"QONNX export: QGraph tensor name {INPUT!r} clashes with the ONNX "
                         "input name")
    try:
        model = _build(graph, F32)
    except InexactError:
        try:
            model = _build(graph, F64)
        except InexactError as exc:
            raise QflowError(f"QONNX export: {exc}") from None
    onnx.checker.check_model(model)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _producer(graph: QGraph, tensor: str) -> str:
    if tensor == graph.input:
        return f"input {tensor!r} (input quantizer)"
    node = next((n for n in graph.nodes if n.output == tensor), None)
    return f"node {node.name!r} (op {node.op!r})" if node else f"tensor {tensor!r}"


def _build(graph: QGraph, dtype: int):
    from onnx import helper

    b = Builder(graph, dtype)
    for name, info in graph.tensors.items():
        t = info.type
        if t.width > b.p or abs(t.fractional) > FRAC_LIMIT:
            kind = "float32" if dtype == F32 else "float64"
            raise InexactError(f"{_producer(graph, name)}: type {t.to_ap()} is not exact in "
                               f"{kind}")
    shape = tuple(graph.tensors[graph.input].shape)
    b.names.add(INPUT)
    b.infos[INPUT] = (F64, ("N", *shape))
    try:
        emit_cast(b, graph.input, INPUT, None, graph.input_type, graph.input)
    except InexactError as exc:
        raise InexactError(f"{_producer(graph, graph.input)}: {exc}") from None
    for node in graph.nodes:
        try:
            EMITTERS[node.op](b, node)
        except InexactError as exc:
            raise InexactError(f"node {node.name!r} (op {node.op!r}): {exc}") from None

    def info(name):
        elem, dims = b.infos[name]
        return helper.make_tensor_value_info(name, elem, list(dims))

    out = graph.output
    value_info = [info(n) for n in b.infos if n not in (INPUT, out)]
    onnx_graph = helper.make_graph(b.nodes, f"qflow_{graph.meta.get('frozen_from', 'model')}",
                                   [info(INPUT)], [info(out)], initializer=b.inits,
                                   value_info=value_info)
    onnx_graph.doc_string = ("qflow QGraph as QONNX: real values in and out; output / output "
                             "LSB = the emulator's output codes")
    model = helper.make_model(onnx_graph, producer_name="qflow",
                              opset_imports=[helper.make_opsetid("", OPSET),
                                             helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = IR_VERSION
    meta = {
        "qflow.export": "qonnx",
        "qflow.format": str(FORMAT_VERSION),
        "qflow.dtype": "float32" if dtype == F32 else "float64",
        "qflow.input": INPUT,
        "qflow.input_tensor": graph.input,
        "qflow.input_shape": json.dumps(list(shape)),
        "qflow.output": out,
        "qflow.graph_meta": json.dumps(graph.meta),
    }
    meta.update({f"qflow.type.{n}": t.type.to_ap() for n, t in graph.tensors.items()})
    helper.set_model_props(model, meta)
    return model


# -- running ---------------------------------------------------------------------------
def _load(path: Path):
    import onnx

    if not path.is_file():
        raise QflowError(f"QONNX model not found: {path}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, ValidationError, OSError
        raise QflowError(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("qflow.export") != "qonnx" or len(model.graph.output) != 1:
        raise QflowError(f"{path}: not a qflow QONNX export (qflow metadata missing)")
    return model, meta


def _with_batch(model, n: int):
    fixed = copy.deepcopy(model)
    g = fixed.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and dims[0].dim_param == "N":
            dims[0].dim_value = n
    return fixed


def run_qonnx(path: str | Path, x) -> np.ndarray:
    """Run a model written by :func:`export_qonnx` with qonnx's executor; int64 output codes.

    ``x`` holds real values, batch first (cast to float64, exactly for float32 data).
    qonnx's executor needs fixed shapes: the batch size is written into a copy of the
    model and the input runs in chunks of ``CHUNK`` samples. Output values that are not
    on the output type's grid raise QflowError, as do an unreadable file, a wrong input
    shape and non-finite inputs (the file is named).
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    path = Path(path)
    model, meta = _load(path)
    in_name, out_name = model.graph.input[0].name, model.graph.output[0].name
    try:
        out_type = FixedType.parse(meta[f"qflow.type.{meta['qflow.output']}"])
        shape = tuple(json.loads(meta["qflow.input_shape"]))
    except (KeyError, ValueError) as exc:
        raise QflowError(f"{path}: malformed qflow metadata ({exc})") from None
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise QflowError(f"{path}: input is not a numeric array ({exc})") from None
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise QflowError(f"{path}: input has shape {x.shape}, the model expects "
                         f"[N, {', '.join(map(str, shape))}]")
    if not np.isfinite(x).all():
        raise QflowError(f"{path}: input holds NaN or infinite values")
    out_dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim[1:]]
    if len(x) == 0:
        return np.zeros((0, *out_dims), dtype=np.int64)
    wrappers: dict[int, ModelWrapper] = {}
    outputs = []
    for start in range(0, len(x), CHUNK):
        part = np.ascontiguousarray(x[start:start + CHUNK])
        if len(part) not in wrappers:
            wrappers[len(part)] = ModelWrapper(_with_batch(model, len(part)))
        try:
            result = execute_onnx(wrappers[len(part)], {in_name: part})[out_name]
        except Exception as exc:  # ORT or qonnx failures on a damaged model
            raise QflowError(f"{path}: qonnx executor failed ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        outputs.append(np.asarray(result, dtype=np.float64))
    scaled = np.ldexp(np.concatenate(outputs), out_type.fractional)
    codes = np.rint(scaled)
    if not np.array_equal(codes, scaled):
        bad = int((codes != scaled).sum())
        raise QflowError(f"{path}: {bad} output values are not on the grid of "
                         f"{out_type.to_ap()}")
    return codes.astype(np.int64)


__all__ = ["CHUNK", "export_qonnx", "qonnx_problem", "run_qonnx"]
