"""``quantize_``: swap the supported modules of a float model for QFX modules, in place."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from qflow import fxconvert
from qflow.config import ROLES, QFXConfig
from qflow.errors import ConfigError, QflowError
from qflow.methods import Method, Phase, method_of, register_method
from qflow.nn import (
    QGELU,
    Add,
    QAdaptiveAvgPool2d,
    QAdd,
    QAvgPool2d,
    QBatchNorm1d,
    QBatchNorm2d,
    QCat,
    QConv2d,
    QInput,
    QLayerNorm,
    QLinear,
    QMaxPool2d,
    QMulConst,
    QReLU,
    QSoftmax,
)
from qflow.nn.transformer import TRANSFORMER_TYPES
from qflow.numerics import FixedType
from qflow.quantizers import FixedQuantizer
from qflow.quantizers.scaled import InputScale

#: float module type -> constructor of its quantized replacement (exact type match).
SWAPS = {
    nn.Linear: QLinear.from_float,
    nn.Conv2d: QConv2d.from_float,
    nn.BatchNorm1d: QBatchNorm1d.from_float,
    nn.BatchNorm2d: QBatchNorm2d.from_float,
    nn.ReLU: QReLU.from_float,
    Add: QAdd.from_float,
    nn.AvgPool2d: QAvgPool2d.from_float,
    nn.AdaptiveAvgPool2d: QAdaptiveAvgPool2d.from_float,
    nn.MaxPool2d: QMaxPool2d.from_float,
    nn.LayerNorm: QLayerNorm.from_float,
    nn.GELU: QGELU.from_float,
    nn.Softmax: QSoftmax.from_float,
}
QUANTIZED_TYPES = (QLinear, QConv2d, QBatchNorm1d, QBatchNorm2d, QReLU, QAdd, QAvgPool2d,
                   QAdaptiveAvgPool2d, QMaxPool2d, QInput, QCat, QMulConst, *TRANSFORMER_TYPES)
#: modules that do no arithmetic on values, or only hold other modules.
PASSTHROUGH_TYPES = (nn.Flatten, nn.Identity, nn.Dropout, nn.Sequential, nn.ModuleList,
                     nn.ModuleDict)
_FOLDABLE = (nn.Conv2d, nn.Linear)
_KEPT_LEAVES = (nn.Flatten, nn.Identity, nn.Dropout)


def _is_leaf(module: nn.Module) -> bool:
    """Swapped, already quantized or kept as it is: its forward is not traced."""
    return type(module) in SWAPS or isinstance(module, QUANTIZED_TYPES + _KEPT_LEAVES)


def _quantize_input(module: nn.Module, args: tuple, kwargs: dict):
    if args:
        return (module.qflow_input(args[0]), *args[1:]), kwargs
    name = module.qflow_input_name
    if name not in kwargs:
        raise QflowError(f"{type(module).__name__}: no input given (expected argument {name!r})")
    return args, {**kwargs, name: module.qflow_input(kwargs[name])}


def quantize_(model: nn.Module, config=None) -> nn.Module:
    """Swap the supported modules of ``model`` for the QAT modules of ``config``'s method,
    in place; returns ``model``.

    The method is looked up by the config's type in :data:`qflow.methods.METHODS`
    (``QFXConfig`` -> QFX; an unknown type is a one-line ConfigError listing the
    registered methods). The default config is ``QFXConfig()``.

    >>> import torch
    >>> from torch import nn
    >>> import qflow
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> model = qflow.quantize_(model, qflow.QFXConfig.with_bits(4))
    >>> [type(m).__name__ for m in model]
    ['QInput', 'QLinear', 'QReLU', 'QLinear']
    >>> model(torch.rand(5, 4)).shape
    torch.Size([5, 2])
    >>> qflow.quantize_(nn.Sequential(nn.Linear(4, 2)), {"bits": 4})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    qflow.errors.ConfigError: quantize_ expects a method config, got dict; registered methods: ...
    """
    config = config if config is not None else QFXConfig()
    method = method_of(config)
    if hasattr(model, "qflow_input"):
        raise QflowError("model is already quantized (it has a qflow_input module)")
    if type(model) in SWAPS or isinstance(model, QUANTIZED_TYPES):
        raise QflowError(f"quantize_ swaps the modules inside a model; wrap the single "
                         f"{type(model).__name__} in a container, e.g. nn.Sequential(layer)")
    return method.quantize(model, config)


def quantize_qfx(model: nn.Module, config: QFXConfig) -> nn.Module:
    """QFX's handler (what :func:`quantize_` runs for a ``QFXConfig``): swap the supported
    modules of ``model`` for QFX fixed-point modules, in place.

    Supported modules are listed in :mod:`qflow.nn`; functional ops in a ``forward``
    (``F.relu``, ``a + b``, ``torch.cat``, ...) become such modules too, named after
    where they are (:mod:`qflow.fxconvert`). The model input is cast by a
    ``qflow_input`` module, run from a forward pre-hook (or, in a plain ``nn.Sequential``,
    inserted as its first element). Per-layer settings come from
    ``config.overrides``; an override whose pattern reaches no quantized tensor of its
    role raises :class:`ConfigError`, as does a module or functional op that qflow
    cannot make exact (it would stay float and could not be deployed), naming it.

    """
    originals = list(model.named_modules())
    traced = fxconvert.trace_reachable(model, _is_leaf)
    float_left = [f"{name} ({type(module).__name__})" for name, module in originals
                  if name and type(module) not in SWAPS and not isinstance(
                      module, PASSTHROUGH_TYPES) and not list(module.children())
                  and id(module) not in traced.ids]  # a forward of the user's own, traced
    if float_left:
        raise ConfigError("quantize_: no exact fixed-point form for "
                          + ", ".join(float_left) + "; supported layers: "
                          + ", ".join(sorted(t.__name__ for t in SWAPS)))
    folds = _batchnorm_folds(model) if config.fold_batchnorm else {}
    folded_bns = set(folds.values())
    by_name = dict(originals)
    recorder = _SpecRecorder(config)
    swaps = []
    for name, module in originals:
        make = SWAPS.get(type(module)) if name else None
        if name in folded_bns:
            swaps.append((name, nn.Identity()))
        elif make is not None:
            quantized = make(module, recorder, name)
            if name in folds:
                quantized.fold_batchnorm(by_name[folds[name]])
            swaps.append((name, quantized))
    functional = fxconvert.plan(model, traced, recorder)
    input_quant = QInput(recorder)
    recorder.check_overrides()
    for name, new in swaps:  # only now, so that an error above leaves the model untouched
        replace_module(model, name, new)
    functional.apply()
    functional.warn_untraced()
    _attach_input_quantizer(model, input_quant)
    model.qflow_config = config
    return model


register_method(Method(
    name="qfx", config_type=QFXConfig, quantize=quantize_qfx,
    phases=lambda config, epochs: [Phase("QAT", epochs, lr_scale=1 / 3)],
    tag=lambda c: f"w{c.weight.bits}a{c.activation.bits}",
    describe=lambda c: f"QFX, weights {c.weight.bits}-bit, activations "
                       f"{c.activation.bits}-bit"))


class _SpecRecorder:
    """Hands a config to the layer constructors and records which (layer, role) pairs
    they asked for, so that overrides reaching nothing are caught."""

    def __init__(self, config: QFXConfig):
        self._config = config
        self.asked: list[tuple[str, str]] = []

    def __getattr__(self, name: str):
        return getattr(self._config, name)

    def spec_for(self, layer: str, role: str):
        self.asked.append((layer, role))
        return self._config.spec_for(layer, role)

    def check_overrides(self) -> None:
        for override in self._config.overrides:
            for role in ROLES:
                if getattr(override, role) is None:
                    continue
                layers = sorted({layer for layer, r in self.asked if r == role})
                if not any(override.matches(layer) for layer in layers):
                    raise ConfigError(
                        f"override pattern {override.pattern!r} sets {role} but matches no "
                        f"layer with a {role} tensor (those are: {', '.join(layers) or 'none'})")


def _attach_input_quantizer(model: nn.Module, quant: QInput) -> None:
    # A plain nn.Sequential runs every child in order, so the input quantizer goes first
    # among its children (model[0] then is the input quantizer); any other model gets it
    # from a forward pre-hook.
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        children = list(model._modules.items())
        model._modules.clear()
        model._modules["qflow_input"] = quant
        model._modules.update(children)
    else:
        model.qflow_input = quant
        params = list(inspect.signature(model.forward).parameters)
        model.qflow_input_name = params[0] if params else "input"
        model.register_forward_pre_hook(_quantize_input, with_kwargs=True)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of ``model``'s submodule called ``name`` (dotted)."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _batchnorm_folds(model: nn.Module) -> dict[str, str]:
    """Map each conv/linear layer name to the BatchNorm that directly and only follows it."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types for untraceable code
        raise ConfigError(f"fold_batchnorm needs a model that torch.fx can trace: {exc}") from None
    modules = dict(model.named_modules())
    folds: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(
            modules[node.target], nn.BatchNorm1d | nn.BatchNorm2d
        ):
            continue
        source = node.args[0]
        ok = (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and type(modules[source.target]) in _FOLDABLE
            and len(source.users) == 1
            and source.target not in folds
        )
        if not ok:
            raise ConfigError(f"fold_batchnorm: {node.target} does not directly follow a conv "
                              "or linear layer used only by it; set fold_batchnorm: false")
        folds[source.target] = node.target
    return folds


_ROLE_OF_ATTR = {
    "quant": "input",
    "weight_quant": "weight",
    "bias_quant": "bias",
    "scale_quant": "scale",
    "shift_quant": "shift",
    "in_quant": "op input",
    "a_quant": "operand a",
    "b_quant": "operand b",
    "gamma_quant": "gamma",
    "beta_quant": "beta",
    "value_quant": "constant",
    "out_quant": "output",
}


@dataclass(frozen=True)
class FormatRow:
    """One quantized tensor of a model and its current fixed-point format."""

    layer: str
    tensor: str
    width: int
    int_width_min: int
    int_width_max: int
    signed: bool
    rounding: str
    overflow: str
    khot: int
    #: each channel's integer width, for a per-channel format (empty otherwise)
    int_widths: tuple[int, ...] = ()

    @property
    def int_width(self) -> str:
        lo, hi = self.int_width_min, self.int_width_max
        return str(lo) if lo == hi else f"{lo}..{hi}"


def describe(model: nn.Module) -> list[FormatRow]:
    """One row per quantized tensor: word length W, ap_fixed integer width I (a range
    over channels when per channel), rounding and overflow."""
    rows = []
    modules = sorted(model.named_modules(), key=lambda item: not isinstance(item[1], QInput))
    for name, module in modules:
        # QFX modules, and those of other methods that name their layer (BiPer's binary
        # layers: their scale, shift and output formats)
        if not isinstance(module, QUANTIZED_TYPES) and not hasattr(module, "qflow_name"):
            continue
        layer = getattr(module, "qflow_name", name)
        codes = getattr(module, "input_quant", None)  # dyadic / LSQ input codes
        if isinstance(codes, InputScale) and bool(codes.ready):
            t = codes.input_type()
            rows.append(FormatRow(layer=layer, tensor="input codes", width=t.width,
                                  int_width_min=t.int_width, int_width_max=t.int_width,
                                  signed=t.signed, rounding=str(t.rounding),
                                  overflow=str(t.overflow), khot=0))
        for attr, role in _ROLE_OF_ATTR.items():
            quant = getattr(module, attr, None)
            if not isinstance(quant, FixedQuantizer) or not bool(quant.initialized):
                continue
            if role == "bias" and getattr(module, "bias", None) is None and not getattr(
                module, "folded_bn", None
            ):
                continue
            types: list[FixedType] = quant.fixed_types()
            rows.append(FormatRow(
                layer=layer, tensor=role, width=types[0].width,
                int_width_min=min(t.int_width for t in types),
                int_width_max=max(t.int_width for t in types),
                signed=types[0].signed, rounding=str(types[0].rounding),
                overflow=str(types[0].overflow), khot=quant.spec.khot,
                int_widths=tuple(t.int_width for t in types) if len(types) > 1 else (),
            ))
    return rows
