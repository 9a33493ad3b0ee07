"""Query-key reparameterization (QKR): one C×C weight per head in place of W_q and W_k.

The attention scores of head h are q_n · k_m with q = W_q,h x + b_q,h and
k = W_k,h x + b_k,h (W_q,h, W_k,h: d × C, the head's rows of the q and k layers), so

    q_n · k_m = (A_h x_n + c_h) · x_m  +  (terms of n alone)
    A_h = W_k,hᵀ W_q,h   (C × C)        c_h = W_k,hᵀ b_q,h   (C)

The terms of n alone (x_nᵀ W_q,hᵀ b_k,h and b_q,h · b_k,h) add one constant to every
score of row n, which the softmax over m does not see. QKR rewrites the attention's
forward to compute the scores as ``(x @ A_hᵀ + c_h) @ xᵀ``: a C → C linear layer
``qk_h`` per head (weight A_h, bias c_h, initialised from the float q and k layers) and a
product with the transposed input. OFQ then quantizes A_h, not W_q and W_k: the layer
becomes a StatsQ layer like any other (StatsQ per row of A_h, CGA on its elements, the
oscillation tracker on its codes), and the deployed graph holds the C × C products (C²
multiplications per token and head where q and k took 2·d·C: the export's estimate
counts them as the dense layers they are).

A_h is trained directly from its initial value (the reference code keeps W_q and W_k and
quantizes their product at every step). With d = C / heads, A_h has heads × C² weights
where W_q and W_k had 2 × C²; its rank is no longer bound to d.

What is matched, in a module's own forward (torch.fx): a product ``a @ b`` (``@``,
``torch.matmul``, ``.matmul``) whose only readers are softmaxes over the last axis
(directly, or through a product or quotient by a number), where ``a`` is the output of a
``nn.Linear`` on some tensor x or its slice ``[..., i:j]`` of the last axis, and ``b`` the
last two axes swapped (``.transpose(1, 2)``, ``(-2, -1)``, ...) of another ``nn.Linear``
on the same x, sliced the same way. The q and k layers are removed when nothing else
reads them. A forward torch.fx cannot trace is left as it is; one that traces differently
in training and evaluation mode (``if self.training``) is refused.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from qflow.errors import ConfigError
from qflow.fxconvert import _compile, _trace

_MATMULS = {("call_function", operator.matmul), ("call_function", torch.matmul),
            ("call_method", "matmul")}
_SOFTMAXES = {("call_function", F.softmax), ("call_function", torch.softmax),
              ("call_method", "softmax")}
_SCALINGS = {("call_function", operator.mul), ("call_function", operator.truediv),
             ("call_function", torch.mul), ("call_function", torch.div),
             ("call_method", "mul"), ("call_method", "div")}


@dataclass
class _Match:
    matmul: fx.Node
    x: fx.Node
    q: fx.Node  # the call of the q layer
    k: fx.Node
    part: slice  # the head's features


def _key(node: fx.Node) -> tuple[str, object]:
    return node.op, node.target


def _last_axis_slice(node: fx.Node) -> tuple[fx.Node, slice] | None:
    """(tensor, slice) when ``node`` is ``tensor[..., i:j]`` (full slices or an Ellipsis
    before the last); (node, slice(None)) for any other node."""
    if _key(node) != ("call_function", operator.getitem):
        return node, slice(None)
    source, index = node.args
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return None
    if any(not (i is Ellipsis or i == slice(None)) for i in index[:-1]):
        return None
    if index[-1].step not in (None, 1):
        return None
    return source, index[-1]


def _swaps_last_two(node: fx.Node) -> fx.Node | None:
    """The tensor whose last two axes ``node`` swaps (rank 3: ``transpose(1, 2)``)."""
    if _key(node) != ("call_method", "transpose") or len(node.args) != 3 or node.kwargs:
        return None
    dims = {int(d) % 3 if isinstance(d, int) else None for d in node.args[1:]}
    return node.args[0] if dims == {1, 2} else None


def _dim(node: fx.Node) -> object:
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    return node.args[1] if len(node.args) > 1 else None


def _read_by_softmax_only(node: fx.Node) -> bool:
    users = list(node.users)
    if not users:
        return False
    for user in users:
        if _key(user) in _SOFTMAXES:
            if _dim(user) not in (-1, 2):
                return False
        elif _key(user) in _SCALINGS and user.args[0] is node and isinstance(
                user.args[1], (int, float)):
            if not _read_by_softmax_only(user):
                return False
        else:
            return False
    return True


def _linear_call(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.Linear)


def _matches(graph: fx.Graph, owner: nn.Module) -> list[_Match]:
    modules = dict(owner.named_modules())
    found = []
    for node in graph.nodes:
        if _key(node) not in _MATMULS or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            continue
        kt = _swaps_last_two(b)
        qa, ka = _last_axis_slice(a), kt is not None and _last_axis_slice(kt)
        if not qa or not ka:
            continue
        (q, q_part), (k, k_part) = qa, ka
        if (q_part != k_part or not _linear_call(q, modules) or not _linear_call(k, modules)
                or q.target == k.target or len(q.args) != 1 or len(k.args) != 1
                or q.args[0] is not k.args[0] or not _read_by_softmax_only(node)):
            continue
        found.append(_Match(node, q.args[0], q, k, q_part))
    return found


def _qk_layer(q: nn.Linear, k: nn.Linear, part: slice) -> nn.Linear:
    """The C → C layer of one head: weight W_k,hᵀ W_q,h, bias W_k,hᵀ b_q,h."""
    wq, wk = q.weight.detach()[part], k.weight.detach()[part]
    layer = nn.Linear(q.in_features, q.in_features, bias=q.bias is not None)
    layer.to(device=q.weight.device, dtype=q.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(wk.t() @ wq)
        if q.bias is not None:
            layer.bias.copy_(wk.t() @ q.bias.detach()[part])
    return layer


def _fresh(owner: nn.Module, taken: set[str], base: str) -> str:
    i = 0
    while f"{base}_{i}" in taken or hasattr(owner, f"{base}_{i}"):
        i += 1
    taken.add(f"{base}_{i}")
    return f"{base}_{i}"


def _rewrite(owner: nn.Module, graph: fx.Graph, matches: list[_Match]) -> dict[str, int]:
    modules = dict(owner.named_modules())
    new: dict[str, nn.Module] = {}
    head_dims: dict[str, int] = {}
    for m in matches:
        name = _fresh(owner, set(new), f"{m.q.target}{m.k.target}".replace(".", "_"))
        new[name] = _qk_layer(modules[m.q.target], modules[m.k.target], m.part)
        head_dims[name] = len(range(modules[m.q.target].out_features)[m.part])
        with graph.inserting_before(m.matmul):
            y = graph.call_module(name, (m.x,))
            xt = graph.call_method("transpose", (m.x, -2, -1))
            scores = graph.call_function(operator.matmul, (y, xt))
        m.matmul.replace_all_uses_with(scores)
        chain = [*m.matmul.args, m.matmul.args[1].args[0], m.q, m.k]
        graph.erase_node(m.matmul)
        for node in chain:  # the slices, the transpose and the q, k calls, if unread now
            if node.graph is graph and not node.users and node in graph.nodes:
                graph.erase_node(node)
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    for m in matches:
        for target in (m.q.target, m.k.target):
            if target not in called and "." not in target and hasattr(owner, target):
                delattr(owner, target)  # no longer read: its weights live in the qk layers
    for name, module in new.items():
        owner.add_module(name, module)
    graph.lint()
    cls = type(owner)
    source = graph.python_code(root_module="self").src
    owner.__class__ = type(cls.__name__, (cls,), {
        "forward": _compile(source, graph, owner),
        "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "qflow_traced_forward": source,
        "qflow_original_class": getattr(cls, "qflow_original_class", cls)})
    return head_dims


def reparameterize_qk(model: nn.Module) -> dict[str, int]:
    """Rewrite every attention of ``model`` whose scores are ``q @ kᵀ`` of two linear
    layers (see the module docstring) to one C × C layer per head, in place; the new
    layers' names and the head width d each replaces (empty: no attention matched,
    nothing changed).

    >>> import torch
    >>> from torch import nn
    >>> class Attention(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
    ...     def forward(self, x):
    ...         heads = [torch.softmax(self.q(x)[:, :, h:h + 4]
    ...                                @ self.k(x)[:, :, h:h + 4].transpose(1, 2), dim=-1)
    ...                  for h in (0, 4)]
    ...         return torch.cat(heads, dim=-1)
    >>> model = Attention()
    >>> x = torch.randn(2, 5, 8)
    >>> before = model(x)
    >>> reparameterize_qk(model)
    {'qk_0': 4, 'qk_1': 4}
    >>> torch.allclose(model(x), before, atol=1e-5), hasattr(model, "q")
    (True, False)
    """
    names: dict[str, int] = {}
    for path, owner in list(model.named_modules()):
        if not any(isinstance(c, nn.Linear) for c in owner.children()):
            continue
        try:
            graph, same_in_both_modes = _trace(owner)
        except Exception:  # fx raises many types; such a forward stays as it is
            continue
        matches = _matches(graph, owner)
        if matches and not same_in_both_modes:  # the rewrite would fix one mode's code
            raise ConfigError(f"qkr: the forward of {path or 'the model'} "
                              f"({type(owner).__name__}) differs between training and "
                              "evaluation mode, so it cannot be rewritten; set qkr: false")
        if matches:
            prefix = f"{path}." if path else ""
            names.update((prefix + n, d) for n, d in _rewrite(owner, graph, matches).items())
    return names


def reparameterized(model: nn.Module) -> nn.Module:
    """A reparameterized copy of ``model`` (``model`` unchanged)."""
    trial = copy.deepcopy(model)
    reparameterize_qk(trial)
    return trial
