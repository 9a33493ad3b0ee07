"""Integer ONNX: a QGraph as a standard-ONNX model that ONNX Runtime runs bit-exactly.

The model takes the int64 input codes (``codes``, shape ``[N, *input_shape]``) and
returns the int64 output codes (``codes_out``), computing exactly what
:class:`qflow.graph.emulator.Emulator` computes. Only default-domain ops, opset 17.

Each node's codes are held in one of three arithmetics, the narrowest in which every
value the node forms is exact (:func:`node_arithmetic`; ``qflow.arithmetics`` and each
``qflow.route.<node>`` in the metadata say which):

- ``float32`` where every code, every partial sum of the node's products in any order
  plus the bias, and every scaled term is an integer below 2**24 in magnitude
  (``qflow.graph.infer.node_float_bounds``) and every power-of-two scaling stays in the
  exponent range: ``dense`` / ``conv2d`` are then ``MatMul`` / ``Conv`` on weights
  aligned to the accumulator's fraction, with the bias (the bound re-checked at export),
  so the runtimes' fast float kernels compute them exactly in any summation order;
- ``float64`` below 2**53 (the requantization after a wide accumulator, fixed-point
  BatchNorm). A ``cast`` in a float arithmetic scales by ``2**k`` and rounds and clamps
  by ``qflow.numerics.kernel.quantize_scaled`` itself, traced onto ONNX ``Floor``,
  ``Round`` (half to even), ``Clip``, ``Where`` and ``Mod``; the other ops are the int64
  routes below on float codes. One exact ``Cast`` moves codes between arithmetics; the
  input enters and the output leaves as int64;
  :mod:`qflow.export.int_onnx_fuse` drops the ReLUs whose cast clamps at 0 anyway and
  moves a cast's 2**k into the constants of the node before it; power-of-two average
  pools read only by a cast run as float32 ``AveragePool`` with it;
- ``int64`` otherwise (wider codes, larger sums, the transformer ops), and everywhere
  with ``arithmetic="int64"``, by these routes:

- ``dense`` / ``conv2d`` on raw weight codes, then a per-output-channel int64 ``Mul``
  by ``2**k`` (the alignment of the weights' fractional bits) and an int64 ``Add`` of
  the aligned bias. The products:

  * input codes of at most 8 bits and weight codes that fit 8 bits: ``MatMulInteger`` /
    ``ConvInteger`` with **uint8 operands on both sides**: signed codes are offset by
    128 and given zero point 128. The signed flavours are not used: on x86 CPUs without
    VNNI, ONNX Runtime's u8×s8 GEMM sums pairs of products in saturating int16
    (``vpmaddubsw``) and returns wrong results for weights outside [-64, 63] (on an AVX2
    machine: 2,210 of 2,214 digits-mlp samples wrong with int8 weights), and
    ``ConvInteger`` with int8 input and uint8 weights is wrong too. The u8×u8 kernels
    widen to int16 before multiplying.
    The fan-in is at most ``MAX_FAN_IN`` (14,639), so the int32 accumulator holds the
    sum of the magnitudes of every product and zero-point correction term: no partial
    sum can overflow, in any order. Padding uses the zero point, i.e. code 0.
  * otherwise, ``dense``: int64 ``MatMul`` (exact: every partial sum is at most
    ``max|x| · Σ|w|``, checked to be below 2**63);
  * otherwise, ``conv2d`` (ONNX Runtime has no int64 or double ``Conv``): both operands
    are split into 8-bit limbs (input in the graph with ``Mod``/``Div``, weights at
    export); low limbs are uint8, the top limb is signed when the codes are, offset as
    above. The sum of ``ConvInteger(x_i, w_j) · 2**(8(i+j))`` is accumulated in int64;
    each ConvInteger is int32-safe as above (large fan-ins are split into input-channel
    chunks) and the sum of the magnitude bounds is checked to be below 2**63.

- ``cast``: ``requantize`` in integers. A right shift by s > 0 takes
  ``r = Mod(q, 2**s)`` (fmod=0: 0 <= r < 2**s) and ``floor = (q - r) / 2**s`` (an exact
  ``Div``); the rounding increment is ``qflow.numerics.kernel.round_from_parts`` itself,
  traced onto ONNX values (r > 2**(s-1), r == 2**(s-1), r > 0, q < 0, floor odd), and so
  is the overflow rule (``apply_overflow``: ``Clip``, ``Where``, ``Mod``). A left shift
  first reduces q as ``numerics.convert`` does, then multiplies by 2**s.
- ``scale_shift``, ``add``: int64 ``Mul`` by the aligned per-channel constants, ``Add``.
- ``relu``: ``Max(x, 0)`` (no int64 ``Relu`` kernel).
- ``maxpool2d``: ``Cast`` to double, ``MaxPool``, ``Cast`` back: codes of at most 53
  bits are exact doubles and the maximum of exact values is exact; padding is -inf.
- ``avgpool2d``: int64 window sums, by ``Reshape`` + ``ReduceSum`` when the windows tile
  the input (stride == kernel), else as a sum of one strided ``Slice`` per kernel tap;
  ``global_avgpool2d``: ``ReduceSum`` over H, W. Both then ``Mul`` by the reciprocal code.
- ``reshape``: ``Reshape`` to ``[0, *shape]`` (0 keeps the batch size).
- ``sign``: ``Where(Less(x, 0), -1, 1)`` on int64 (ONNX ``Sign`` would give 0 at 0; the
  QGraph's sign(0) is +1). A binary layer (``sign`` -> ±1 weights) then takes the 8-bit
  route above: codes ±1 and weights ±1 both offset by 128 into ``MatMulInteger`` /
  ``ConvInteger``, whose padding (the zero point) is code 0, as the QGraph pads.
- ``concat``: each input ``Mul`` by 2**k (aligned to the output's fraction, when it
  differs), then ``Concat`` on int64.
- ``softmax``, ``layernorm``, ``gelu``, ``matmul`` and the token ops ``transpose``,
  ``slice``, ``add_const``, ``mean``: :mod:`qflow.export.int_onnx_transformer`, each the
  spec of ``docs/transformer_ops.md`` step by step in int64 (floor shifts by exact
  ``Div``, shifts by a tensor amount through a ``Gather`` of powers of two, one floor
  division per row, the 31-step square root unrolled).

Every arithmetic result fits int64 because its QGraph type (at most 62 bits) holds every
value the input types allow; the export re-derives those types (``qflow.graph.infer``)
and refuses a graph whose declared types are narrower. The graph input is the one
tensor whose range the graph cannot guarantee: its codes must lie in the input type's
range (the 8-bit routes cast them to uint8), which :func:`run_int_onnx` checks. Anything
that cannot be exported exactly raises :class:`~qflow.errors.QflowError` naming the node
and op.

ONNX nodes are named after QGraph nodes (``fc1/matmul``); every QGraph tensor keeps its
name and its type is in ``metadata_props`` as ``qflow.type.<tensor>``; the route taken
per node is in ``qflow.route.<node>``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from qflow.errors import QflowError
from qflow.graph import infer, transformer
from qflow.graph.ir import Node, QGraph
from qflow.numerics import FixedType

from .int_onnx_fuse import float32_pools, plan_fusions
from .int_onnx_ops import ARITHMETICS, Builder, aligned_products
from .int_onnx_ops import EMITTERS as BASE_EMITTERS
from .int_onnx_transformer import EMITTERS as TRANSFORMER_EMITTERS

#: QGraph op -> emitter: the ops above and the transformer and token ops
EMITTERS = {**BASE_EMITTERS, **TRANSFORMER_EMITTERS}

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17: readable by older runtimes too
INPUT_NAME, OUTPUT_NAME = "codes", "codes_out"
FORMAT = "qflow-int-onnx/1"
RUN_CHUNK = 4096  # samples per ONNX Runtime call: bounds the intermediate buffers


def export_int_onnx(graph: QGraph, path: str | Path, arithmetic: str = "auto") -> Path:
    """Write ``graph`` as a standard-ONNX model on integer codes to ``path``; return the path.

    The model maps int64 input codes ``codes`` ``[N, *input_shape]`` to int64 output
    codes ``codes_out``, equal bit for bit to ``Emulator(graph).run_codes(codes)``.
    ``arithmetic`` is ``"auto"`` (each node in the narrowest exact arithmetic) or
    ``"int64"`` (every node in integers). The file is written atomically (temporary file
    in the same directory, then rename). Raises :class:`QflowError` naming the node and
    op for anything not exportable exactly.
    """
    path = Path(path)
    model = build_int_onnx(graph, arithmetic)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        onnx.save_model(model, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def build_int_onnx(graph: QGraph, arithmetic: str = "auto") -> onnx.ModelProto:
    """The in-memory ONNX model of :func:`export_int_onnx` (checked with the ONNX checker)."""
    if arithmetic not in ("auto", "int64"):
        raise QflowError(f"int ONNX export: unknown arithmetic {arithmetic!r} (auto, int64)")
    graph.validate()
    _check_types(graph)
    b = Builder()
    names = {graph.input: INPUT_NAME}
    for tensor in graph.tensors:
        if tensor != graph.input:
            names[tensor] = tensor if tensor not in (INPUT_NAME, OUTPUT_NAME) else f"t_{tensor}"
    b.used.update(names.values())
    held = {graph.input: "int64"}  # tensor -> the arithmetic its codes are held in
    converted: dict[tuple[str, str], str] = {}

    def operand(tensor: str, wanted: str) -> str:
        """``tensor``'s value in arithmetic ``wanted``: a Cast (exact: the consumer's
        arithmetic holds every code of the tensor's type), made once per pair."""
        if held[tensor] == wanted:
            return names[tensor]
        if (tensor, wanted) not in converted:
            b.prefix = tensor
            converted[tensor, wanted] = b.op("Cast", [names[tensor]], f"as_{wanted}",
                                             to=ARITHMETICS[wanted][1])
        return converted[tensor, wanted]

    arithmetics = plan_arithmetics(graph, arithmetic)
    fusions = plan_fusions(graph, arithmetics)
    prescaled = fusions.prescaled
    routes, aliases = {}, set()
    for node in graph.nodes:
        if node.name in fusions.skipped_relus:  # its cast clamps at 0 (int_onnx_fuse)
            names[node.output], held[node.output] = names[node.inputs[0]], held[node.inputs[0]]
            aliases.add(node.output)
            routes[node.name] = "none: the cast after it clamps at 0"
            continue
        wanted = arithmetics[node.name]
        inputs = [operand(i, wanted) for i in node.inputs]
        b.prefix = node.name
        b.use(wanted)
        cast, b.scale_exp = fusions.scaled.get(node.name, (None, 0))
        b.prescaled = node.name in prescaled
        start = len(b.nodes)
        value, routes[node.name] = EMITTERS[node.op](b, graph, node, *inputs)
        if cast is not None:  # its values are scaled: not the QGraph tensor's codes
            routes[node.name] += f", times 2**{b.scale_exp} for {cast}"
            names[node.output] = b.fresh("scaled")
        b.rename_output(value, names[node.output], start)
        held[node.output] = wanted
    b.scale_exp, b.prescaled = 0, False
    b.prefix = "output"
    b.use("int64")
    b.nodes.append(helper.make_node("Identity", [operand(graph.output, "int64")],
                                    [OUTPUT_NAME], name="output/identity"))
    b.prune([OUTPUT_NAME])

    def info(name: str, tensor: str, elem_type: int | None = None):
        dims = ["N", *graph.tensors[tensor].shape]
        elem_type = elem_type or ARITHMETICS[held[tensor]][1]
        return helper.make_tensor_value_info(name, elem_type, dims)

    produced = {o for n in b.nodes for o in n.output}
    value_info = [info(names[t], t) for t in graph.tensors
                  if t not in (graph.input, graph.output, *aliases) and names[t] in produced]
    if graph.output != graph.input:
        value_info.append(info(names[graph.output], graph.output))
    onnx_graph = helper.make_graph(
        b.nodes, f"qflow_int_{graph.meta.get('model') or 'model'}",
        [info(INPUT_NAME, graph.input, TensorProto.INT64)],
        [info(OUTPUT_NAME, graph.output, TensorProto.INT64)],
        initializer=b.inits, value_info=value_info)
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qflow", ir_version=IR_VERSION)
    model.doc_string = (
        f"qflow integer ONNX: int64 input codes of {graph.input_type.to_ap()} "
        f"('{INPUT_NAME}', [N, {', '.join(map(str, graph.tensors[graph.input].shape))}]) -> "
        f"int64 output codes of {graph.output_type.to_ap()} ('{OUTPUT_NAME}'); "
        "bit-exact with the qflow QGraph emulator. Real value = code * 2**-fractional.")
    meta = {"qflow.format": FORMAT, "qflow.input_tensor": graph.input,
            "qflow.output_tensor": graph.output, "qflow.arithmetic": arithmetic,
            "qflow.arithmetics": ",".join(sorted(set(held.values())))}
    meta.update({f"qflow.type.{t}": info_.type.to_ap() for t, info_ in graph.tensors.items()})
    meta.update({f"qflow.route.{n}": r for n, r in routes.items()})
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


#: float formats by arithmetic, narrowest first
FLOAT_FORMATS = {"float32": infer.FLOAT32, "float64": infer.FLOAT64}


def plan_arithmetics(graph: QGraph, arithmetic: str = "auto") -> dict[str, str]:
    """QGraph node -> the arithmetic it is emitted in (:func:`node_arithmetic`)."""
    if arithmetic == "int64":
        return {node.name: "int64" for node in graph.nodes}
    pools = float32_pools(graph)
    return {node.name: "float32" if node.name in pools else node_arithmetic(graph, node)
            for node in graph.nodes}


def node_arithmetic(graph: QGraph, node: Node) -> str:
    """The arithmetic ``node`` is emitted in: the narrowest exact float format, else
    int64. float32 is taken after float64 too: one ``Cast``, then every later pass reads
    half the bytes. ``dense`` and ``conv2d`` take float32 (the runtimes' fast float
    kernels) or int64 (the integer kernels and limbs)."""
    if node.op in ("dense", "conv2d"):
        return "float32" if exact_in(graph, node, "float32") else "int64"
    return next((a for a in FLOAT_FORMATS if exact_in(graph, node, a)), "int64")


def exact_in(graph: QGraph, node: Node, arithmetic: str) -> bool:
    """Is every value ``node`` forms (its codes in and out, its sums, products and
    scalings) exact in float ``arithmetic``?"""
    if node.op not in BASE_EMITTERS:  # the transformer ops compute in int64
        return False
    fmt = FLOAT_FORMATS[arithmetic]
    widths = [graph.tensors[t].type.width for t in (*node.inputs, node.output)]
    if node.op in ("dense", "conv2d"):  # with the bias on top of any partial sum
        in_t = graph.tensors[node.inputs[0]].type
        peak = aligned_products(node, in_t, graph.tensors[node.output].type.fractional)[2]
        shift = 0
    else:
        peak, shift = infer.node_float_bounds(graph, node)
    return max(widths) < fmt.bits and peak < 2**fmt.bits and shift <= fmt.max_shift


def _metadata(model_or_path) -> dict[str, str]:
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(
        model_or_path, load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def export_routes(model_or_path) -> dict[str, str]:
    """QGraph node -> the route its export took (from the model's metadata)."""
    prefix = "qflow.route."
    return {key[len(prefix):]: value for key, value in _metadata(model_or_path).items()
            if key.startswith(prefix)}


def export_arithmetics(model_or_path) -> set[str]:
    """The arithmetics (``int64``, ``float32``, ``float64``) an integer ONNX model's codes
    are held in."""
    return set(_metadata(model_or_path).get("qflow.arithmetics", "int64").split(","))


# -- checks --------------------------------------------------------------------------------
def _contains(outer: FixedType, inner: FixedType) -> bool:
    """Do the codes of ``inner``, aligned to ``outer``'s fraction, lie in ``outer``'s range?"""
    shift = outer.fractional - inner.fractional
    if shift < 0:
        return False
    return outer.qmin <= inner.qmin << shift and inner.qmax << shift <= outer.qmax


def _check_types(graph: QGraph) -> None:
    """Refuse a graph whose declared types do not hold the values their inputs allow.

    The routes rely on tensor types: 8-bit operands, exact doubles, int64 sums.
    """
    for node in graph.nodes:
        if node.op in TRANSFORMER_EMITTERS:  # shapes, width rule, the declared type
            try:
                transformer.check_node(graph, node)
            except QflowError as exc:
                raise QflowError(f"int ONNX export: {exc}") from None
            continue
        ins = [graph.tensors[i].type for i in node.inputs]
        out = graph.tensors[node.output].type
        try:
            needed = _needed_type(graph, node, ins)
        except QflowError as exc:
            raise QflowError(f"int ONNX export: node {node.name!r} (op {node.op!r}): "
                             f"{exc}") from None
        if needed is not None and not _contains(out, needed):
            raise QflowError(f"int ONNX export: node {node.name!r} (op {node.op!r}): declared "
                             f"type {out.to_ap()} does not hold its values ({needed.to_ap()})")


def _needed_type(graph: QGraph, node: Node, ins: list[FixedType]) -> FixedType | None:
    if node.op in ("dense", "conv2d"):
        return infer.infer_weighted(node, ins[0])
    if node.op == "scale_shift":
        return infer.infer_scale_shift(node, ins[0])
    if node.op == "add":
        return infer.infer_add(*ins)
    if node.op == "concat":
        return infer.infer_concat(ins)
    if node.op == "relu":
        return infer.infer_relu(ins[0])
    if node.op == "sign":
        return infer.infer_sign(ins[0])
    if node.op in ("avgpool2d", "global_avgpool2d"):
        if node.op == "avgpool2d":
            count = int(np.prod(node.attrs["kernel"]))
        else:
            count = int(np.prod(graph.tensors[node.inputs[0]].shape[-2:]))
        return infer.infer_pool_sum(ins[0], count, int(node.consts["reciprocal"]),
                                    int(node.attrs["reciprocal_frac"]))
    if node.op in ("maxpool2d", "reshape"):  # codes pass through: same code range
        t, frac = ins[0], graph.tensors[node.output].type.fractional
        return FixedType(signed=t.signed, integer=t.width - int(t.signed) - frac,
                         fractional=frac)
    return None  # cast: apply_overflow puts every code in range


# -- running -------------------------------------------------------------------------------
def run_int_onnx(path: str | Path, codes, *, optimized: bool = False) -> np.ndarray:
    """Run an integer ONNX file on int64 input ``codes`` (batch first); return output codes.

    Uses ONNX Runtime (CPU) with graph optimizations disabled, so that the graph runs as
    written; ``optimized=True`` runs it as ``onnxruntime.InferenceSession(path)`` does by
    default (every graph optimization, e.g. its blocked-layout convolutions), which must
    give the same codes (the tests check both). A missing, corrupt or truncated file,
    input of the wrong shape or dtype, or codes outside the input type's range raise
    :class:`QflowError` naming the file.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise QflowError(f"{path}: integer ONNX file not found")
    try:
        model = onnx.load(path, load_external_data=False)
        options = ort.SessionOptions()
        if not optimized:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # protobuf, checker and runtime errors alike
        raise QflowError(f"{path}: not a readable integer ONNX model ({_one_line(exc)})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if (meta.get("qflow.format") != FORMAT or [i.name for i in inputs] != [INPUT_NAME]
            or [o.name for o in outputs] != [OUTPUT_NAME]):
        raise QflowError(f"{path}: not a qflow integer ONNX model (expected input "
                         f"'{INPUT_NAME}' and output '{OUTPUT_NAME}')")
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iub":
        raise QflowError(f"{path}: input codes must be integers, got dtype {codes.dtype}")
    expected = tuple(inputs[0].shape[1:])
    if codes.ndim != len(inputs[0].shape) or tuple(codes.shape[1:]) != expected:
        raise QflowError(f"{path}: input has shape {tuple(codes.shape)}, the model expects "
                         f"(N, {', '.join(map(str, expected))})")
    codes = codes.astype(np.int64)
    in_type = meta.get(f"qflow.type.{meta.get('qflow.input_tensor')}")
    if in_type is not None and codes.size:
        t = FixedType.parse(in_type)
        if codes.min() < t.qmin or codes.max() > t.qmax:
            raise QflowError(f"{path}: input codes span [{codes.min()}, {codes.max()}], outside "
                             f"the range [{t.qmin}, {t.qmax}] of {in_type}")
    outs = []
    try:
        for i in range(0, max(len(codes), 1), RUN_CHUNK):
            outs.append(session.run([OUTPUT_NAME], {INPUT_NAME: codes[i:i + RUN_CHUNK]})[0])
    except Exception as exc:
        raise QflowError(f"{path}: ONNX Runtime failed ({_one_line(exc)})") from None
    return np.concatenate(outs).astype(np.int64, copy=False)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")
