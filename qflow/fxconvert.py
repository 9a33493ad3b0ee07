"""Functional ops in a model's ``forward`` -> QFX modules, with torch.fx (for ``quantize_``).

Users write ``F.relu(x)``, ``out + identity``, ``torch.cat([a, b], 1)`` and
``F.max_pool2d(x, 2)`` in ``forward`` rather than modules. :func:`trace_reachable`
traces the forward of the model and of every module a call from it reaches (each one on
its own, its submodules as leaves); :func:`plan` turns each such op into a qflow module
registered on the module whose forward holds it:

=====================================================  ==================  ===============
op in ``forward``                                       becomes             named
=====================================================  ==================  ===============
``F.relu``, ``torch.relu``, ``x.relu()`` (in place     QReLU               ``relu``
too, on a tensor nothing else reads)
``a + b``, ``a += b``, ``torch.add``, ``a.add(b)``     QAdd                ``add``
``torch.cat`` / ``torch.concat`` along dim 1           QCat                ``cat``
``F.max_pool2d``                                        QMaxPool2d          ``maxpool``
``F.avg_pool2d``                                        QAvgPool2d          ``avgpool``
``F.adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3))``    QAdaptiveAvgPool2d  ``gap``
``F.softmax``, ``torch.softmax``, ``x.softmax``        QSoftmax            ``softmax``
``F.gelu``                                              QGELU               ``gelu``
``F.layer_norm`` (last dim; weight, bias parameters)    QLayerNorm          ``layernorm``
``a @ b``, ``torch.matmul``, ``a.matmul(b)``            QMatmul             ``matmul``
``x + self.param`` (an ``nn.Parameter`` or buffer)     QAddConst           ``add_const``
``x.mean(d)``, ``torch.mean(x, d)`` over one dim d     QMean               ``mean``
``x * c``, ``c * x``, ``torch.mul``, ``x.mul(c)``       QMulConst           ``mul``
(``c`` a Python int or float: ``0.5``, ``self.scale``)
``x / c``, ``torch.div``, ``x.div(c)``                  QMulConst (1/c)     ``div``
=====================================================  ==================  ===============

Names: the first of ``<base>``, ``<base>_1``, ``<base>_2``, ... that the owning module
does not already have, in the order the ops run; the layer name (for overrides,
``describe`` and the state dict) is the owner's path plus that, e.g. ``layer1.0.relu_1``.
The same code gives the same names, so a checkpoint loads into a model built and
quantized again.

Reshapes (``torch.flatten``, ``x.view(x.size(0), -1)``, ``reshape``, ``contiguous``),
moves of token axes (``x.transpose(1, 2)``, ``x.permute(0, 2, 1)``), basic slicing
(``q[:, :, 0:16]``, ``x[:, 0]``) and size arithmetic stay as they are (``qflow.freeze``
turns them into ``reshape``, ``transpose`` and ``slice`` nodes; the batch dim must stay
where it is). Anything else that computes on tensors (``sigmoid``, ``x * y``, a scalar
added to a tensor, in-place ops, ...) has no exact fixed-point form here and is refused
with a one-line ConfigError naming the node and the op, before the model is changed. A
product by a constant is one by a number known when the forward is traced (a Python
int or float, also as an attribute such as ``self.scale``), finite and nonzero; a
product of two tensors, by a parameter or by a size computed in forward is refused.

In place: a module whose forward held such ops keeps its identity, submodules,
parameters, buffers and hooks; its class becomes a subclass (made for that object, as
torch.fx's GraphModule does) whose ``forward`` is the traced, rewritten one. Python
control flow in that forward is fixed at tracing time, so a forward that differs
between training and evaluation mode is refused. A forward that torch.fx cannot trace
keeps its code (a warning says so): only its modules are swapped, and ``qflow.freeze``
reports what it cannot freeze.
"""

from __future__ import annotations

import inspect
import itertools
import linecache
import math
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from qflow.errors import ConfigError
from qflow.nn import (
    QGELU,
    QAdaptiveAvgPool2d,
    QAdd,
    QAddConst,
    QAvgPool2d,
    QCat,
    QLayerNorm,
    QMatmul,
    QMaxPool2d,
    QMean,
    QMulConst,
    QReLU,
    QSoftmax,
)
from qflow.nn.transformer import softmax_output_spec

#: modules whose call returns (a view of) their input: an in-place op after them would
#: change a tensor that something else may read
_ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Flatten)
_META_METHODS = {"size", "dim", "numel"}
_META_ATTRS = {"shape", "ndim", "dtype", "device"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous"}
#: moves of per-sample axes and basic slicing: kept, frozen to transpose and slice nodes
_MOVE_FUNCTIONS = {torch.transpose, torch.permute, operator.getitem}
_MOVE_METHODS = {"transpose", "permute"}


# -- signatures of the functional ops, to read their arguments ------------------------------
def _sig_relu(input, inplace=False): ...
def _sig_add(input, other, *, alpha=1, out=None): ...
def _sig_cat(tensors, dim=0, *, out=None): ...
def _sig_max_pool(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                  return_indices=False): ...
def _sig_avg_pool(input, kernel_size, stride=None, padding=0, ceil_mode=False,
                  count_include_pad=True, divisor_override=None): ...
def _sig_adaptive(input, output_size): ...
def _sig_mean(input, dim=None, keepdim=False, *, dtype=None, out=None): ...
def _sig_f_softmax(input, dim=None, _stacklevel=3, dtype=None): ...
def _sig_softmax(input, dim, dtype=None): ...
def _sig_gelu(input, approximate="none"): ...
def _sig_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5): ...
def _sig_matmul(input, other, *, out=None): ...
def _sig_mul(input, other, *, out=None): ...
def _sig_div(input, other, *, rounding_mode=None, out=None): ...


#: (op, target) -> (kind, signature, in place)
_OPS: dict[tuple[str, object], tuple[str, Callable, bool]] = {
    ("call_function", F.relu): ("relu", _sig_relu, False),
    ("call_function", torch.relu): ("relu", _sig_relu, False),
    ("call_function", torch.relu_): ("relu", _sig_relu, True),
    ("call_method", "relu"): ("relu", _sig_relu, False),
    ("call_method", "relu_"): ("relu", _sig_relu, True),
    ("call_function", operator.add): ("add", _sig_add, False),
    ("call_function", operator.iadd): ("add", _sig_add, True),
    ("call_function", torch.add): ("add", _sig_add, False),
    ("call_method", "add"): ("add", _sig_add, False),
    ("call_method", "add_"): ("add", _sig_add, True),
    ("call_function", torch.cat): ("cat", _sig_cat, False),
    ("call_function", torch.concat): ("cat", _sig_cat, False),
    ("call_function", torch.concatenate): ("cat", _sig_cat, False),
    ("call_function", F.max_pool2d): ("maxpool", _sig_max_pool, False),
    ("call_function", torch.max_pool2d): ("maxpool", _sig_max_pool, False),
    ("call_function", F.avg_pool2d): ("avgpool", _sig_avg_pool, False),
    ("call_function", F.adaptive_avg_pool2d): ("gap", _sig_adaptive, False),
    ("call_function", torch.mean): ("gap", _sig_mean, False),
    ("call_method", "mean"): ("gap", _sig_mean, False),
    ("call_function", F.softmax): ("softmax", _sig_f_softmax, False),
    ("call_function", torch.softmax): ("softmax", _sig_softmax, False),
    ("call_method", "softmax"): ("softmax", _sig_softmax, False),
    ("call_function", F.gelu): ("gelu", _sig_gelu, False),
    ("call_function", F.layer_norm): ("layernorm", _sig_layer_norm, False),
    ("call_function", operator.matmul): ("matmul", _sig_matmul, False),
    ("call_function", torch.matmul): ("matmul", _sig_matmul, False),
    ("call_method", "matmul"): ("matmul", _sig_matmul, False),
    ("call_function", operator.mul): ("mul", _sig_mul, False),
    ("call_function", torch.mul): ("mul", _sig_mul, False),
    ("call_method", "mul"): ("mul", _sig_mul, False),
    ("call_function", operator.truediv): ("div", _sig_div, False),
    ("call_function", torch.div): ("div", _sig_div, False),
    ("call_function", torch.true_divide): ("div", _sig_div, False),
    ("call_method", "div"): ("div", _sig_div, False),
}


class _OwnerTracer(fx.Tracer):
    """Traces one module's own forward: every submodule it calls is a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


@dataclass
class _Rewrite:
    """One module whose forward is replaced: its new modules and its new forward."""

    path: str
    owner: nn.Module
    modules: dict[str, nn.Module]
    forward: Callable
    source: str


@dataclass
class Plan:
    """What :func:`plan` found: forwards to rewrite, forwards torch.fx could not trace."""

    rewrites: list[_Rewrite] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)

    def apply(self) -> None:
        """Register the new modules on their owners and swap in the new forwards."""
        for rw in self.rewrites:
            for name, module in rw.modules.items():
                rw.owner.add_module(name, module)
            cls = type(rw.owner)
            rw.owner.__class__ = type(cls.__name__, (cls,), {
                "forward": rw.forward, "__module__": cls.__module__,
                "__qualname__": cls.__qualname__, "qflow_traced_forward": rw.source,
                "qflow_original_class": cls})

    def warn_untraced(self) -> None:
        for path, reason in self.untraced:
            warnings.warn(
                f"quantize_: torch.fx cannot trace the forward of {_where(path)} ({reason}); "
                "only its modules are swapped: functional ops in it stay float, and "
                "qflow.freeze reports what it cannot freeze", stacklevel=3)


def _where(path: str) -> str:
    return path or "the model"


def _join(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(exc).__name__


def _traceable_owner(module: nn.Module, leaf: Callable[[nn.Module], bool]) -> bool:
    """Modules whose forward is traced: containers and user-written forwards."""
    if leaf(module) or isinstance(module, nn.ModuleList | nn.ModuleDict):
        return False
    forward = getattr(type(module).forward, "__module__", "") or ""
    return bool(list(module.children())) or not forward.startswith("torch.")


@dataclass
class Traced:
    """The forwards :func:`trace_reachable` traced, by module path."""

    graphs: dict[str, fx.Graph] = field(default_factory=dict)
    #: paths whose forward traces differently in training and evaluation mode
    mode_dependent: set[str] = field(default_factory=set)
    #: (path, reason) of the forwards torch.fx could not trace
    untraced: list[tuple[str, str]] = field(default_factory=list)
    #: ``id`` of every module whose forward was traced
    ids: set[int] = field(default_factory=set)


def trace_reachable(model: nn.Module, leaf: Callable[[nn.Module], bool]) -> Traced:
    """Trace the model's forward and, from it, every module a call reaches whose forward
    can hold functional ops (each forward on its own). Changes nothing."""
    traced = Traced()
    queue, seen = [""], {id(model)}  # a module shared under two names is traced once
    while queue:
        path = queue.pop(0)
        module = model.get_submodule(path) if path else model
        try:
            graph, same_in_both_modes = _trace(module)
        except Exception as exc:  # fx raises many types for untraceable code
            traced.untraced.append((path, _one_line(exc)))
            continue
        traced.graphs[path] = graph
        traced.ids.add(id(module))
        if not same_in_both_modes:
            traced.mode_dependent.add(path)
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            full = _join(path, node.target)
            sub = model.get_submodule(full)
            if id(sub) not in seen and _traceable_owner(sub, leaf):
                seen.add(id(sub))
                queue.append(full)
    return traced


def _trace(module: nn.Module) -> tuple[fx.Graph, bool]:
    """The module's own forward as an fx graph (in its current mode), and whether it
    traces the same in the other mode (a rewrite fixes the code it traced)."""
    graph = _OwnerTracer().trace(module)
    was = module.training
    try:
        module.training = not was
        other = _OwnerTracer().trace(module)
    finally:
        module.training = was
    return graph, _code(graph) == _code(other)


def _code(graph: fx.Graph) -> str:
    return graph.python_code(root_module="self").src


def plan(model: nn.Module, traced: Traced, config) -> Plan:
    """Check every traced forward and build the modules and forwards that replace its
    functional ops (their specs from ``config``); raises ConfigError (naming node and
    op) for any op with no exact form. The model is not changed (see :meth:`Plan.apply`)."""
    result = Plan(untraced=list(traced.untraced))
    for path, graph in traced.graphs.items():
        owner = model.get_submodule(path) if path else model
        rewrite = _convert(path, owner, graph, config, path in traced.mode_dependent)
        if rewrite is not None:
            result.rewrites.append(rewrite)
    return result


# -- one forward ------------------------------------------------------------------------------
def _target_name(node: fx.Node) -> str:
    if node.op != "call_function":
        return str(node.target)
    fn = node.target
    name = getattr(fn, "__name__", repr(fn))
    for prefix, namespace in (("operator", operator), ("torch.nn.functional", F),
                              ("torch", torch)):
        if getattr(namespace, name, None) is fn:
            return f"{prefix}.{name}"
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


def _nodes_in(value) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


class _Forward:
    """Classifies the nodes of one traced forward: tensor, size value or parameter."""

    def __init__(self, path: str, owner: nn.Module):
        self.path, self.owner = path, owner
        self.kind: dict[fx.Node, str] = {}

    def label(self, node: fx.Node) -> str:
        return (f"'{node.name}' in {_where(self.path)} ({node.op} {_target_name(node)})")

    def refuse(self, node: fx.Node, reason: str = "") -> ConfigError:
        if reason:
            return ConfigError(f"quantize_: {self.label(node)}: {reason}")
        return ConfigError(f"quantize_: no exact fixed-point form for {self.label(node)}")

    def tensor(self, node: fx.Node, value, what: str) -> fx.Node:
        """``value`` as a tensor node, or the refusal saying what it is instead."""
        if isinstance(value, fx.Node) and self.kind.get(value) == "tensor":
            return value
        if isinstance(value, fx.Node) and self.kind.get(value) == "param":
            raise self.refuse(node, f"{what} is the parameter or tensor attribute "
                                    f"{value.target!r}, used directly (only tensors computed "
                                    "by layers have a fixed-point form)")
        if isinstance(value, fx.Node):
            raise self.refuse(node, f"{what} is a size value, not a tensor")
        raise self.refuse(node, f"{what} is a Python {type(value).__name__} ({value!r}); only "
                                "tensors computed by layers have a fixed-point form")

    def constant(self, node: fx.Node, value, what: str):
        if _nodes_in(value):
            raise self.refuse(node, f"{what} must be a constant, not computed in forward")
        return value

    def fresh(self, node: fx.Node, value: fx.Node) -> None:
        """Refuse an in-place op on a tensor that something else may read: the rewrite
        computes it out of place."""
        current = value
        while True:
            if len(current.users) != 1:
                raise self.refuse(node, "in place on a tensor that is also read elsewhere; "
                                        "write it out of place (e.g. F.relu(x))")
            if current.op in ("placeholder", "get_attr"):
                raise self.refuse(node, "in place on an input of the forward; write it out "
                                        "of place (e.g. F.relu(x))")
            alias = None
            if current.op == "call_module":
                module = self.owner.get_submodule(current.target)
                if isinstance(module, _ALIAS_MODULES) or (
                        isinstance(module, nn.ReLU) and module.inplace):
                    alias = current.args[0] if current.args else None
            elif _is_reshape(current) or _OPS.get((current.op, current.target),
                                                  (None, None, False))[2]:
                alias = current.args[0]  # a view of its input, or the input changed in place
            if not isinstance(alias, fx.Node):
                return
            current = alias


def _is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS)


def _bind(node: fx.Node, signature: Callable):
    return inspect.signature(signature).bind(*node.args, **node.kwargs).arguments


def _is_meta(node: fx.Node, kinds: dict[fx.Node, str]) -> bool:
    """Size arithmetic: ``x.size(0)``, ``x.shape[1:]``, ``n * 2``."""
    args = _nodes_in((node.args, node.kwargs))
    if node.op == "call_method" and node.target in _META_METHODS:
        return bool(args) and kinds.get(args[0]) == "tensor"
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _META_ATTRS
    if not args or any(kinds.get(a) != "meta" for a in args):
        return False
    if node.op == "call_method":
        return True
    return node.op == "call_function" and (
        getattr(node.target, "__module__", None) in ("_operator", "operator")
        or node.target in (len, int, tuple, list))


def _convert(path: str, owner: nn.Module, graph: fx.Graph, config,
             mode_dependent: bool) -> _Rewrite | None:
    fwd = _Forward(path, owner)
    jobs: list[tuple[fx.Node, str, dict]] = []
    for node in graph.nodes:
        if node.op in ("placeholder", "call_module"):
            fwd.kind[node] = "tensor"
        elif node.op == "get_attr":
            fwd.kind[node] = "param"
        elif node.op == "output":
            continue
        elif _is_meta(node, fwd.kind):
            fwd.kind[node] = "meta"
        else:
            fwd.kind[node] = "tensor"
            job = _classify(fwd, node)
            if job is not None:
                jobs.append((node, *job))
    if not jobs:
        return None
    if mode_dependent:
        raise ConfigError(f"quantize_: the forward of {_where(path)} differs between training "
                          "and evaluation mode (it reads self.training): its functional ops "
                          "cannot be rewritten; use modules (nn.ReLU, qflow.nn.Add, ...) there")
    taken: set[str] = set()
    modules: dict[str, nn.Module] = {}
    replaced: dict[fx.Node, fx.Node] = {}  # rewritten node -> what stands for it now
    softmax_names: dict[fx.Node, str] = {}  # probabilities: their layer's name
    for node, kind, info in jobs:
        local = next(name for name in (kind if i == 0 else f"{kind}_{i}"
                                        for i in itertools.count())
                     if name not in taken and not hasattr(owner, name))
        taken.add(local)
        if kind == "softmax":
            softmax_names[node] = _join(path, local)
        if kind == "matmul":
            info["probabilities"] = _softmax_layer(owner, path, info["inputs"][0], softmax_names)
        modules[local] = _make(kind, info, config, _join(path, local))
        with graph.inserting_before(node):
            new = graph.call_module(local, tuple(replaced.get(x, x) for x in info["inputs"]))
            if info.get("flatten"):
                new = graph.call_function(torch.flatten, (new, 1))
        node.replace_all_uses_with(new)
        replaced[node] = new
        graph.erase_node(node)
    graph.lint()
    source = _code(graph)
    return _Rewrite(path, owner, modules, _compile(source, graph, owner), source)


def _is_move(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _MOVE_METHODS) or (
        node.op == "call_function" and node.target in _MOVE_FUNCTIONS)


def _check_move(fwd: _Forward, node: fx.Node) -> None:
    """A transpose, permute or slicing kept as it is: constant arguments, the batch dim
    (0) left in place; ``qflow.freeze`` checks the rest against the shapes."""
    fwd.tensor(node, node.args[0] if node.args else None, "its input")
    rest = fwd.constant(node, (node.args[1:], node.kwargs), "its dims or index")
    if node.target is operator.getitem:
        index = rest[0][0] if rest[0] else None
        if not isinstance(index, tuple) or not index or index[0] != slice(None):
            raise fwd.refuse(node, f"indexing with {index!r} selects along the batch dim; "
                                   "index per-sample dims only, e.g. x[:, 0] or q[:, :, 0:16]")
        return
    dims = [d for d in rest[0] for d in (d if isinstance(d, list | tuple) else [d])]
    dims += [d for v in rest[1].values() for d in (v if isinstance(v, list | tuple) else [v])]
    moved = dims[1:] if node.target in ("permute", torch.permute) else dims
    if (node.target in ("permute", torch.permute) and dims[:1] != [0]) or 0 in moved:
        raise fwd.refuse(node, "moves the batch dim 0; only per-sample dims may move")


def _softmax_layer(owner: nn.Module, path: str, value, softmax_names) -> str | None:
    """The layer name of the softmax whose output ``value`` is, if it is one."""
    if value in softmax_names:
        return softmax_names[value]
    if isinstance(value, fx.Node) and value.op == "call_module" and isinstance(
            owner.get_submodule(value.target), nn.Softmax | QSoftmax):
        return _join(path, value.target)
    return None


def _classify(fwd: _Forward, node: fx.Node) -> tuple[str, dict] | None:
    """(kind, arguments) of a functional op to rewrite; None for one kept as it is."""
    if _is_reshape(node):
        fwd.tensor(node, node.args[0] if node.args else None, "its input")
        return None
    if _is_move(node):
        _check_move(fwd, node)
        return None
    entry = _OPS.get((node.op, node.target)) if node.op in ("call_function",
                                                            "call_method") else None
    if node.op == "call_function" and node.target is F.dropout:
        raise fwd.refuse(node, "use the module nn.Dropout, which qflow keeps in training "
                               "and removes when it freezes the model")
    if entry is None:
        raise fwd.refuse(node)
    kind, signature, in_place = entry
    try:
        args = _bind(node, signature)
    except TypeError as exc:
        raise fwd.refuse(node, f"unexpected arguments ({exc})") from None
    if args.get("out") is not None:
        raise fwd.refuse(node, "out= is not supported")
    return {"relu": _relu, "add": _add, "cat": _cat, "maxpool": _maxpool, "avgpool": _avgpool,
            "gap": _gap, "softmax": _softmax, "gelu": _gelu, "layernorm": _layernorm,
            "matmul": _matmul, "mul": _mul, "div": _div}[kind](fwd, node, args, in_place)


def _relu(fwd, node, args, in_place):
    x = fwd.tensor(node, args["input"], "its input")
    if in_place or fwd.constant(node, args.get("inplace", False), "inplace"):
        fwd.fresh(node, x)
    return "relu", {"inputs": [x]}


def _is_param(fwd, value) -> bool:
    return isinstance(value, fx.Node) and fwd.kind.get(value) == "param"


def _add(fwd, node, args, in_place):
    if _is_param(fwd, args["input"]) != _is_param(fwd, args["other"]) and not in_place:
        param, x = ((args["input"], args["other"]) if _is_param(fwd, args["input"])
                    else (args["other"], args["input"]))
        x = fwd.tensor(node, x, "its tensor operand")
        if fwd.constant(node, args.get("alpha", 1), "alpha") != 1:
            raise fwd.refuse(node, "alpha other than 1 is not supported")
        return "add_const", {"inputs": [x, param]}
    a = fwd.tensor(node, args["input"], "its first operand")
    b = fwd.tensor(node, args["other"], "its second operand")
    if fwd.constant(node, args.get("alpha", 1), "alpha") != 1:
        raise fwd.refuse(node, "alpha other than 1 is not supported")
    if in_place:
        fwd.fresh(node, a)
    return "add", {"inputs": [a, b]}


def _cat(fwd, node, args, in_place):
    tensors = args["tensors"]
    if not isinstance(tensors, list | tuple) or not tensors:
        raise fwd.refuse(node, "expects a list of tensors")
    inputs = [fwd.tensor(node, t, f"input {i}") for i, t in enumerate(tensors)]
    dim = fwd.constant(node, args.get("dim", 0), "dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim == 0 or dim > 2:
        raise fwd.refuse(node, f"concatenation along dim {dim!r}: only the channel dim 1, "
                               "or the features (dim 2, -1) of token tensors, is supported")
    return "cat", {"inputs": inputs, "dim": dim}


def _maxpool(fwd, node, args, in_place):
    x = fwd.tensor(node, args["input"], "its input")
    for key in ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"):
        fwd.constant(node, args.get(key), key)
    if args.get("return_indices"):
        raise fwd.refuse(node, "return_indices is not supported")
    stride = args.get("stride") or None  # torch.max_pool2d's default is []
    module = nn.MaxPool2d(args["kernel_size"], stride, args.get("padding", 0),
                          args.get("dilation", 1), ceil_mode=bool(args.get("ceil_mode")))
    return "maxpool", {"inputs": [x], "module": module}


def _avgpool(fwd, node, args, in_place):
    x = fwd.tensor(node, args["input"], "its input")
    for key in ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                "divisor_override"):
        fwd.constant(node, args.get(key), key)
    module = nn.AvgPool2d(args["kernel_size"], args.get("stride") or None,
                          args.get("padding", 0), bool(args.get("ceil_mode")),
                          bool(args.get("count_include_pad", True)),
                          args.get("divisor_override"))
    return "avgpool", {"inputs": [x], "module": module}


def _gap(fwd, node, args, in_place):
    x = fwd.tensor(node, args["input"], "its input")
    if "output_size" in args:  # adaptive_avg_pool2d
        size = fwd.constant(node, args["output_size"], "output_size")
        if size not in (1, (1, 1), [1, 1]):
            raise fwd.refuse(node, f"adaptive average pooling to {size!r}: only output size 1 "
                                   "(global pooling) is supported")
        return "gap", {"inputs": [x]}
    dim = fwd.constant(node, args.get("dim"), "dim")
    dims = dim if isinstance(dim, list | tuple) else [dim]
    keep = fwd.constant(node, args.get("keepdim", False), "keepdim")
    if (len(dims) == 1 and isinstance(dims[0], int) and not isinstance(dims[0], bool)
            and dims[0] != 0 and args.get("dtype") is None):
        return "mean", {"inputs": [x], "dim": dims[0], "keepdim": bool(keep)}
    if args.get("dtype") is not None or sorted(
            d + 4 if isinstance(d, int) and d < 0 else d for d in dims) != [2, 3]:
        raise fwd.refuse(node, f"a mean over dims {dim!r}: only the global mean over H and W "
                               "(dims (2, 3) of an N, C, H, W tensor) or over one "
                               "per-sample dim is supported")
    return "gap", {"inputs": [x], "flatten": not keep}


def _softmax(fwd, node, args, in_place):
    x = fwd.tensor(node, args["input"], "its input")
    dim = fwd.constant(node, args.get("dim"), "dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim == 0:
        raise fwd.refuse(node, f"softmax along dim {dim!r}: give one per-sample dim")
    if args.get("dtype") is not None:
        raise fwd.refuse(node, "dtype= is not supported")
    return "softmax", {"inputs": [x], "dim": dim}


def _gelu(fwd, node, args, in_place):
    x = fwd.tensor(node, args["input"], "its input")
    approximate = fwd.constant(node, args.get("approximate", "none"), "approximate")
    if approximate not in ("none", "tanh"):
        raise fwd.refuse(node, f"approximate={approximate!r} is not a GELU form")
    return "gelu", {"inputs": [x], "approximate": approximate}


def _layernorm(fwd, node, args, in_place):
    x = fwd.tensor(node, args["input"], "its input")
    shape = args["normalized_shape"]  # (x.shape[-1],) is a size computed in forward
    shape = [shape] if isinstance(shape, int | fx.Node) else list(shape)
    if len(shape) != 1:
        raise fwd.refuse(node, f"normalized_shape {shape}: only the last dim is supported")
    shape = [shape[0] if isinstance(shape[0], int) else 1]  # the layer reads the input's
    params = []
    for key in ("weight", "bias"):
        value = args.get(key)
        if value is not None and not _is_param(fwd, value):
            raise fwd.refuse(node, f"{key} must be a parameter of the module (or None)")
        params.append(value)
    eps = fwd.constant(node, args.get("eps", 1e-5), "eps")
    return "layernorm", {"inputs": [x, *params], "shape": shape, "eps": eps}


def _matmul(fwd, node, args, in_place):
    a = fwd.tensor(node, args["input"], "its first operand")
    b = fwd.tensor(node, args["other"], "its second operand")
    return "matmul", {"inputs": [a, b]}


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _by_constant(fwd, node, x, c, kind: str):
    """A product (or quotient) of the tensor ``x`` by the constant ``c``."""
    if isinstance(c, fx.Node) and fwd.kind.get(c) == "meta":
        raise fwd.refuse(node, "the constant is a size computed in forward; use a number "
                               "fixed when the module is built (self.scale = d ** -0.5)")
    if not _is_number(c):
        raise fwd.refuse(node)  # two tensors, a parameter, ...: no exact form
    if c == 0 or not math.isfinite(c):
        raise fwd.refuse(node, f"{'division' if kind == 'div' else 'product'} by {c!r}: the "
                               "constant must be finite and nonzero")
    x = fwd.tensor(node, x, "its tensor operand")
    return kind, {"inputs": [x], "constant": c, "divide": kind == "div"}


def _mul(fwd, node, args, in_place):
    a, b = args["input"], args["other"]
    if (_is_number(a) and not _is_number(b)) or (
            isinstance(a, fx.Node) and fwd.kind.get(a) == "meta"):
        a, b = b, a  # c * x
    return _by_constant(fwd, node, a, b, "mul")


def _div(fwd, node, args, in_place):
    if fwd.constant(node, args.get("rounding_mode"), "rounding_mode") is not None:
        raise fwd.refuse(node, "rounding_mode= is not supported")
    if _is_number(args["input"]):
        raise fwd.refuse(node)  # c / x: no exact form
    return _by_constant(fwd, node, args["input"], args["other"], "div")


def _make(kind: str, info: dict, config, name: str) -> nn.Module:
    if kind in ("mul", "div"):
        return QMulConst.from_config(config, name, info["constant"], info["divide"])
    if kind == "softmax":
        return QSoftmax.from_config(config, name, info["dim"])
    if kind == "gelu":
        return QGELU.from_float(nn.GELU(approximate=info["approximate"]), config, name)
    if kind == "layernorm":
        return QLayerNorm.from_config(config, name, info["shape"], info["eps"])
    if kind == "matmul":  # probabilities keep the softmax's type (an exact cast)
        probs = info.get("probabilities")
        return QMatmul.from_config(config, name, a_spec=None if probs is None
                                   else softmax_output_spec(config, probs))
    if kind == "add_const":
        return QAddConst.from_config(config, name)
    if kind == "mean":
        return QMean.from_config(config, name, info["dim"], info["keepdim"])
    if kind == "relu":
        return QReLU.from_float(nn.ReLU(), config, name)
    if kind == "add":
        return QAdd.from_float(None, config, name)
    if kind == "cat":
        return QCat.from_config(config, name, info["dim"])
    if kind == "maxpool":
        return QMaxPool2d.from_float(info["module"], config, name)
    if kind == "avgpool":
        return QAvgPool2d.from_float(info["module"], config, name)
    return QAdaptiveAvgPool2d.from_float(nn.AdaptiveAvgPool2d(1), config, name)


def _compile(source: str, graph: fx.Graph, owner: nn.Module) -> Callable:
    """The ``forward`` function of ``source`` (fx's generated code), registered with
    linecache so that tracebacks show its lines."""
    code = graph.python_code(root_module="self")
    filename = f"<qflow: traced forward of {type(owner).__qualname__} {id(owner):x}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(source, filename, "exec"), namespace)  # fx's own generated code
    return namespace["forward"]
