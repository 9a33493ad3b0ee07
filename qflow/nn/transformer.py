"""Fixed-point transformer layers: LayerNorm, GELU, softmax, the product of two
activations, a learned constant added to tokens (a position embedding) and a token mean.

The forward pass of each layer is the exact integer op of ``docs/transformer_ops.md``
through its torch twin (:mod:`qflow.ops.transformer`), so QAT trains through the
arithmetic that deploys; its gradient is the twin's surrogate (the float op's). An op's
input type must be known to run it, and a tensor does not carry one: each layer casts
its inputs with its own QFX quantizer first (a cast to the type a tensor already has is
exact, and ``qflow.freeze`` then leaves it out). Output types come from QFX quantizers
as in every QFX layer; their binary point starts from the float op's output on the
first batch and learns from it (see :func:`_with_point_gradient`).

=============  ===========================================  ==============================
layer          what is fixed point (config role)            QGraph (``qflow.freeze``)
=============  ===========================================  ==============================
QLayerNorm     input (``intermediate``), γ (``norm_scale``,  cast, ``layernorm``
               per tensor), β (``bias``), output
               (``activation``)
QGELU          input (``intermediate``), output              cast, ``gelu``
               (``activation``)
QSoftmax       input (``intermediate``), output: unsigned,   cast, ``softmax``
               ``activation`` bits, 0 integer bits (1 under
               WRAP or SAT_ZERO, which must hold 1.0)
QMatmul        both operands (``activation``; probabilities  casts, ``matmul``
               keep their softmax's type); the output is
               the exact accumulator
QAddConst      the constant (``bias``), output              ``add_const``, cast
               (``intermediate``)
QMean          output (``intermediate``)                     ``mean``, cast
=============  ===========================================  ==============================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qflow.config import QFXConfig
from qflow.errors import ConfigError, QflowError
from qflow.numerics import FixedType, Overflow
from qflow.ops import transformer as ops
from qflow.quantizers import FixedQuantizer

from .elementwise import _reciprocal
from .functional import exact_dtype

#: overflow modes under which a softmax output type must hold 1.0 (docs/transformer_ops.md)
_MUST_HOLD_ONE = (Overflow.WRAP, Overflow.SAT_ZERO)


def _name(module: nn.Module) -> str:
    return getattr(module, "qflow_name", type(module).__name__)


def _checked(module: nn.Module, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run an integer op; a type its width rule refuses is a one-line QflowError naming
    the layer."""
    try:
        return run()
    except ValueError as exc:
        raise QflowError(f"{_name(module)}: {exc}") from None


def _out_type(quant: FixedQuantizer, reference: Callable[[], torch.Tensor]) -> FixedType:
    """The output quantizer's type, its binary point first set from the float op's output
    (``reference``) when it has seen no data yet."""
    if not quant.is_initialized:
        with torch.no_grad():
            quant.initialize(reference())
    return quant.fixed_type()


def _with_point_gradient(quant: FixedQuantizer, y: torch.Tensor,
                         reference: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``y`` (the integer op's values, in the quantizer's type) plus an exact zero that
    gives the quantizer's trainable binary point the gradient of casting the float op's
    output (``reference``) to it: ``q - q.detach()`` is 0.0, so ``y`` is unchanged."""
    if not (quant.training and quant.integer_bits.requires_grad and torch.is_grad_enabled()):
        return y
    with torch.no_grad():
        ref = reference()
    q = quant(ref)
    return y + (q - q.detach())


@torch.no_grad()
def _initialize_covering(quant: FixedQuantizer, x: torch.Tensor) -> None:
    """Initialize ``quant`` from ``x``, then widen its integer part until no value of
    ``x`` saturates: γ starts at exactly 1.0, which the best-error start
    (``ceil(log2(1)) = 0`` integer bits) would saturate, leaving γ no gradient."""
    quant.initialize(x)
    peak = float(x.detach().abs().max())
    while quant.fixed_type().max_value < peak:
        quant.integer_bits.add_(1.0)


def _resolve_dim(module: nn.Module, dim: int, ndim: int) -> int:
    """``dim`` of an ``ndim``-D tensor, counted from 0; the batch dim 0 is refused."""
    resolved = dim + ndim if dim < 0 else dim
    if not 1 <= resolved < ndim:
        raise QflowError(f"{_name(module)}: dim {dim} of a {ndim}-D tensor is not a "
                         "per-sample dim (the batch dim 0 cannot be reduced over)")
    return resolved


class QLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim as the integer LayerNorm: exact integer mean and
    variance, a bitwise square root, fixed-point γ and β, no epsilon.

    >>> import torch
    >>> from qflow.config import QFXConfig
    >>> ln = QLayerNorm.from_float(torch.nn.LayerNorm(8), QFXConfig.with_bits(8), "ln")
    >>> y = ln(torch.arange(8.0).repeat(2, 3, 1))
    >>> y.shape, str(ln.out_quant.fixed_type())
    (torch.Size([2, 3, 8]), 'ap_fixed<8,2,AP_RND_CONV,AP_SAT>')
    >>> y[0, 0].tolist()
    [-1.53125, -1.09375, -0.65625, -0.21875, 0.21875, 0.65625, 1.09375, 1.53125]

    Made by ``F.layer_norm`` in a forward, the layer has no parameters of its own and
    takes ``weight`` and ``bias`` as arguments.
    """

    @classmethod
    def from_float(cls, module: nn.LayerNorm, config: QFXConfig, name: str) -> QLayerNorm:
        shape = tuple(module.normalized_shape)
        if len(shape) != 1:
            raise ConfigError(f"{name}: LayerNorm over {shape} is not supported (only over "
                              "the last dim: normalized_shape of one element)")
        affine = module.elementwise_affine
        has_bias = affine and getattr(module, "bias", None) is not None
        layer = cls(shape, eps=module.eps, elementwise_affine=affine, bias=has_bias)
        layer.load_state_dict(module.state_dict())
        layer._setup(config, name)
        return layer

    @classmethod
    def from_config(cls, config: QFXConfig, name: str, normalized_shape,
                    eps: float = 1e-5) -> QLayerNorm:
        """The layer of an ``F.layer_norm`` call: γ and β are given to each call."""
        layer = cls.from_float(nn.LayerNorm(normalized_shape, eps=eps,
                                            elementwise_affine=False), config, name)
        return layer

    def _setup(self, config: QFXConfig, name: str) -> None:
        self.qflow_name = name
        self.in_quant = FixedQuantizer(config.spec_for(name, "intermediate"), per_sample=True)
        self.gamma_quant = FixedQuantizer(config.spec_for(name, "norm_scale"))
        self.beta_quant = FixedQuantizer(config.spec_for(name, "bias"))
        self.out_quant = FixedQuantizer(config.spec_for(name, "activation"), per_sample=True)

    def quantized_gamma_beta(self, dtype: torch.dtype, weight=None, bias=None):
        """(γ values, γ type, β values, β type): the layer's own, or ``weight``/``bias``
        given to the call; a missing one is 1 (γ) or 0 (β)."""
        gamma = weight if weight is not None else self.weight
        beta = bias if bias is not None else self.bias
        gamma = torch.ones((), dtype=dtype) if gamma is None else gamma.to(dtype)
        if not self.gamma_quant.is_initialized:
            _initialize_covering(self.gamma_quant, gamma)
        gamma = self.gamma_quant(gamma)
        beta = self.beta_quant(torch.zeros((), dtype=dtype) if beta is None else beta.to(dtype))
        return gamma, self.gamma_quant.fixed_type(), beta, self.beta_quant.fixed_type()

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        dtype = exact_dtype(x, self)
        x = self.in_quant(x.to(dtype))
        gamma, gamma_t, beta, beta_t = self.quantized_gamma_beta(dtype, weight, bias)
        width = x.shape[-1]
        g, b = gamma.detach().expand(width), beta.detach().expand(width)

        def reference():
            return F.layer_norm(x.detach(), (width,), g, b, eps=self.eps)

        out_t = _out_type(self.out_quant, reference)
        y = _checked(self, lambda: ops.fixed_layernorm(
            x, self.in_quant.fixed_type(), gamma, gamma_t, beta, beta_t, out_t, axis=-1))
        return _with_point_gradient(self.out_quant, y, reference)


class QGELU(nn.GELU):
    """``nn.GELU`` as the integer GELU (I-BERT's erf polynomial; either of torch's forms,
    ``approximate='none'`` or ``'tanh'``, becomes it).

    >>> import torch
    >>> from qflow.config import QFXConfig
    >>> gelu = QGELU.from_float(torch.nn.GELU(), QFXConfig.with_bits(8), "gelu")
    >>> gelu(torch.tensor([[-3.0, 0.0, 1.0, 2.5]])).tolist()
    [[0.0, 0.0, 0.84375, 2.5]]
    """

    @classmethod
    def from_float(cls, module: nn.GELU, config: QFXConfig, name: str) -> QGELU:
        layer = cls(approximate=module.approximate)
        layer.qflow_name = name
        layer.in_quant = FixedQuantizer(config.spec_for(name, "intermediate"), per_sample=True)
        layer.out_quant = FixedQuantizer(config.spec_for(name, "activation"), per_sample=True)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_quant(x.to(exact_dtype(x, self)))

        def reference():
            return F.gelu(x.detach())

        out_t = _out_type(self.out_quant, reference)
        y = _checked(self, lambda: ops.fixed_gelu(x, self.in_quant.fixed_type(), out_t))
        return _with_point_gradient(self.out_quant, y, reference)


def softmax_output_spec(config: QFXConfig, name: str):
    """The spec of a softmax output: the ``activation`` spec of ``name`` made unsigned
    with 0 integer bits (1 when its overflow mode would wrap or zero a 1.0), not
    trained: probabilities lie in [0, 1]."""
    spec = config.spec_for(name, "activation")
    return dataclasses.replace(spec, signed=False, trainable=False, per_channel=False, khot=0,
                               integer_bits=1 if spec.overflow in _MUST_HOLD_ONE else 0)


class QSoftmax(nn.Module):
    """``softmax(x, dim)`` as the integer softmax (shift-based exp, one integer division
    per row); the largest element of a row never gets probability 0.

    >>> import torch
    >>> from qflow.config import QFXConfig
    >>> sm = QSoftmax.from_config(QFXConfig.with_bits(8), "softmax", dim=-1)
    >>> (sm(torch.tensor([[2.0, 0.0, -9.0]])) * 256).tolist()
    [[226.0, 30.0, 0.0]]
    """

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = int(dim)

    @classmethod
    def from_config(cls, config: QFXConfig, name: str, dim: int = -1) -> QSoftmax:
        layer = cls(dim)
        layer.qflow_name = name
        layer.in_quant = FixedQuantizer(config.spec_for(name, "intermediate"), per_sample=True)
        layer.out_quant = FixedQuantizer(softmax_output_spec(config, name), per_sample=True)
        return layer

    @classmethod
    def from_float(cls, module: nn.Softmax, config: QFXConfig, name: str) -> QSoftmax:
        if module.dim is None:
            raise ConfigError(f"{name}: nn.Softmax needs an explicit dim")
        return cls.from_config(config, name, module.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = _resolve_dim(self, self.dim, x.dim())
        x = self.in_quant(x.to(exact_dtype(x, self)))
        return _checked(self, lambda: ops.fixed_softmax(
            x, self.in_quant.fixed_type(), self.out_quant.fixed_type(), axis=dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class QMatmul(nn.Module):
    """``a @ b`` of two activations (attention's ``q @ k.transpose(-2, -1)`` and
    ``probabilities @ v``): both operands cast to fixed point, their product exact.

    >>> import torch
    >>> from qflow.config import QFXConfig
    >>> mm = QMatmul.from_config(QFXConfig.with_bits(8), "matmul")
    >>> mm(torch.ones(2, 3, 4), torch.ones(2, 4, 5)).shape
    torch.Size([2, 3, 5])
    """

    @classmethod
    def from_config(cls, config: QFXConfig, name: str, a_spec=None) -> QMatmul:
        """``a_spec`` replaces the first operand's spec: a softmax's output spec
        (:func:`softmax_output_spec`) when it multiplies probabilities, whose cast to
        the type they have is then exact."""
        layer = cls()
        layer.qflow_name = name
        layer.a_quant = FixedQuantizer(a_spec or config.spec_for(name, "activation"),
                                       per_sample=True)
        layer.b_quant = FixedQuantizer(config.spec_for(name, "activation"), per_sample=True)
        return layer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() < 3 or a.dim() != b.dim():
            raise QflowError(f"{_name(self)}: a product of tensors of shapes {tuple(a.shape)} "
                             f"and {tuple(b.shape)}: both must be batches of matrices (3 or "
                             "more dims, the same number)")
        dtype = exact_dtype(a, self)
        a, b = self.a_quant(a.to(dtype)), self.b_quant(b.to(dtype))
        return _checked(self, lambda: ops.fixed_matmul(
            a, self.a_quant.fixed_type(), b, self.b_quant.fixed_type())[0])


class QAddConst(nn.Module):
    """``x + value`` for a learned constant (a position embedding, an ``nn.Parameter``
    of the owning module, given to each call): the constant in fixed point, the sum
    exact, then a cast.

    >>> import torch
    >>> from qflow.config import QFXConfig
    >>> add = QAddConst.from_config(QFXConfig.with_bits(8), "pos")
    >>> add(torch.zeros(2, 3, 4), torch.full((1, 3, 4), 0.3)).shape
    torch.Size([2, 3, 4])
    """

    @classmethod
    def from_config(cls, config: QFXConfig, name: str) -> QAddConst:
        layer = cls()
        layer.qflow_name = name
        layer.value_quant = FixedQuantizer(config.spec_for(name, "bias"))
        layer.out_quant = FixedQuantizer(config.spec_for(name, "intermediate"), per_sample=True)
        return layer

    def forward(self, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        dtype = exact_dtype(x, self)
        if value.dim() > x.dim() or any(
                v not in (1, s) for v, s in zip(value.shape[::-1], x.shape[::-1], strict=False)
        ) or (value.dim() == x.dim() and value.shape[0] != 1):
            raise QflowError(f"{_name(self)}: a constant of shape {tuple(value.shape)} added to "
                             f"tensors of shape {tuple(x.shape)}: it must broadcast over the "
                             "batch only")
        return self.out_quant(x.to(dtype) + self.value_quant(value.to(dtype)))


class QMean(nn.Module):
    """``x.mean(dim)`` over one per-sample dim (a token mean): an exact sum times the
    fixed-point reciprocal of the count (as average pooling), then a cast.

    >>> import torch
    >>> from qflow.config import QFXConfig
    >>> mean = QMean.from_config(QFXConfig.with_bits(8), "mean", dim=1)
    >>> mean(torch.ones(2, 16, 4)).shape
    torch.Size([2, 4])
    """

    def __init__(self, dim: int = 1, keepdim: bool = False):
        super().__init__()
        self.dim, self.keepdim = int(dim), bool(keepdim)

    @classmethod
    def from_config(cls, config: QFXConfig, name: str, dim: int = 1,
                    keepdim: bool = False) -> QMean:
        layer = cls(dim, keepdim)
        layer.qflow_name = name
        layer.out_quant = FixedQuantizer(config.spec_for(name, "intermediate"), per_sample=True)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = _resolve_dim(self, self.dim, x.dim())
        x = x.to(exact_dtype(x, self))
        total = x.sum(dim=dim, keepdim=self.keepdim)
        return self.out_quant(total * _reciprocal(x.shape[dim]))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}"


#: the layers of this module, for ``qflow.quantize_`` and ``qflow.freeze``
TRANSFORMER_TYPES = (QLayerNorm, QGELU, QSoftmax, QMatmul, QAddConst, QMean)
