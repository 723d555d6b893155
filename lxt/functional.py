"""Drop-in functionals: the forward of torch, relevance in backward.

Each function mirrors the signature of the torch function it replaces (so a graph rewrite can
swap a call's target and keep its arguments) plus an optional ``epsilon``.  Run forward, then
``y.backward(R)``: ``x.grad`` is the relevance of ``x``.  Inputs that do not require grad get
no relevance; weights, masks and numbers are constants of the rule.

>>> import lxt.functional as lf
>>> y = lf.linear_epsilon(x, W, b)
>>> y.backward(y)
>>> relevance = x.grad
"""
from __future__ import annotations

from typing import Optional, Sequence

import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules.base import EPSILON
from .rules.rules import (
    EpsilonRule,
    GammaRule,
    IdentityRule,
    SoftmaxDTRule,
    UniformEpsilonRule,
    UniformRule,
    _GammaLayer,
    scaled_dot_product_attention,  # defined beside their rules
    scaled_dot_product_attention_cp,
)

__all__ = [
    "linear_epsilon",
    "linear_gamma",
    "add2",
    "softmax",
    "detached_softmax",
    "mul2",
    "index_add",
    "div",
    "div_const",
    "matmul",
    "rms_norm_identity",
    "rms_norm",
    "layer_norm",
    "mean",
    "normalize",
    "identity",
    "silu",
    "gelu",
    "tanh",
    "relu",
    "sigmoid",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_cp",
    "sdpa",
    "sdpa_cp",
]

_UNIFORM = UniformRule()
_IDENTITY = IdentityRule()
_EPSILON = {}


def _epsilon_rule(epsilon: float) -> EpsilonRule:
    rule = _EPSILON.get(("eps", epsilon))
    if rule is None:
        rule = _EPSILON[("eps", epsilon)] = EpsilonRule(epsilon)
    return rule


def _tensors(*values) -> list[int]:
    return [i for i, v in enumerate(values) if isinstance(v, Tensor) and v.is_floating_point()]


def linear_epsilon(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                   epsilon: float = EPSILON) -> Tensor:
    r"""``F.linear`` with the epsilon rule (AttnLRP Eq. 8): ``R_x = x * W^T (R / stab(z))``.

    Parameters
    ----------
    input : Tensor
        ``(..., in_features)``; receives relevance.
    weight, bias : Tensor
        Layer parameters (constants of the rule; the bias absorbs its share).
    epsilon : float
        Stabiliser.
    """
    if input.shape[-1:] != weight.shape[-1:]:
        raise ValueError(
            f"lxt.linear_epsilon: input has {input.shape[-1]} features but weight expects "
            f"{weight.shape[-1]} (input {tuple(input.shape)}, weight {tuple(weight.shape)})."
        )
    return _epsilon_rule(epsilon).apply_at(F.linear, (input, weight, bias), {}, [0])


def linear_gamma(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                 gamma: float = 0.25, epsilon: float = EPSILON) -> Tensor:
    r"""``F.linear`` with the gamma rule (see :class:`lxt.rules.GammaRule`)."""
    if input.shape[-1:] != weight.shape[-1:]:
        raise ValueError(
            f"lxt.linear_gamma: input has {input.shape[-1]} features but weight expects "
            f"{weight.shape[-1]}."
        )
    layer = _GammaLayer(F.linear, weight, bias)
    return GammaRule(gamma, epsilon).apply_at(layer, (input,), {}, [0])


def add2(input, other, *, alpha=1, epsilon: float = EPSILON) -> Tensor:
    r"""``input + alpha * other`` with the epsilon rule (AttnLRP Eq. 8):
    ``R_a = a R / stab(a + b)``, ``R_b = b R / stab(a + b)``, summed back over broadcast
    dimensions.  A constant operand (number, or tensor without ``requires_grad``) absorbs its
    share like a bias."""
    fn, kwargs = (operator.add, {}) if alpha == 1 else (torch.add, {"alpha": alpha})
    return _epsilon_rule(epsilon).apply_at(fn, (input, other), kwargs, _tensors(input, other))


def index_add(input: Tensor, dim: int, index: Tensor, source: Tensor, *, alpha=1,
              epsilon: float = EPSILON) -> Tensor:
    r"""``torch.index_add`` (out of place) with the epsilon rule: each output row is a sum of
    ``input``'s row and the ``source`` rows added to it, ``R_a = a R / stab(sum)``."""
    kwargs = {} if alpha == 1 else {"alpha": alpha}
    return _epsilon_rule(epsilon).apply_at(torch.index_add, (input, dim, index, source), kwargs,
                                           _tensors(input, None, None, source))


def mul2(input, other) -> Tensor:
    r"""``input * other`` with the uniform rule (AttnLRP Prop. 3.2): ``R_a = R_b = R / 2``.
    With one constant factor it is the identity rule ``R_x = R``."""
    return _UNIFORM.apply_at(operator.mul, (input, other), {}, _tensors(input, other))


def div(input, other, *, rounding_mode: Optional[str] = None) -> Tensor:
    r"""``input / other`` with the identity rule on the numerator: ``R_input = R``.

    The divisor is a constant of the rule, also when it requires grad (``x / x.norm()``,
    ``e / e.sum()``): it is detached, as the standard deviation in the LayerNorm rule
    (AttnLRP Prop. 3.4), so the numerator keeps all relevance and the divisor gets none.
    Dividing by a number, or by a tensor without ``requires_grad``, is a scale (Eq. 9).
    A ``rounding_mode`` (integer division) has no relevance to pass and runs as torch does.
    """
    if rounding_mode is not None:
        return torch.div(input, other, rounding_mode=rounding_mode)
    if isinstance(other, Tensor):
        other = other.detach()
    if not (isinstance(input, Tensor) and input.is_floating_point()):
        return operator.truediv(input, other)
    return _IDENTITY.apply_at(operator.truediv, (input, other), {}, [0])


#: the published name (a division by a constant); the same rule as :func:`div`
div_const = div


def matmul(input: Tensor, other: Tensor, epsilon: float = EPSILON) -> Tensor:
    r"""``torch.matmul`` with the epsilon + uniform rule (AttnLRP Prop. 3.3):
    ``R_A = A * ((R / stab(2 A@B)) B^T)``, ``R_B = B * (A^T (R / stab(2 A@B)))``; the
    epsilon rule when one factor is constant."""
    return UniformEpsilonRule(epsilon).apply_at(torch.matmul, (input, other), {},
                                                _tensors(input, other))


def softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
            dtype: Optional[torch.dtype] = None) -> Tensor:
    r"""``F.softmax`` with deep Taylor decomposition with bias (AttnLRP Prop. 3.1):
    ``R_x = x * (R - s * sum(R))``; ``-inf`` inputs (masks) count as 0."""
    if dim is None:
        raise ValueError("lxt.softmax needs an explicit dim (as torch.softmax recommends).")
    kwargs = {"dim": dim} if dtype is None else {"dim": dim, "dtype": dtype}
    return SoftmaxDTRule(dim).apply_at(F.softmax, (input,), kwargs, [0])


def detached_softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
                     dtype: Optional[torch.dtype] = None) -> Tensor:
    """``F.softmax`` for CP-LRP (Ali et al., 2022): the attention weights are constants, so
    no relevance reaches the scores (and through them q and k)."""
    return F.softmax(input, dim=dim, dtype=dtype).detach()


def _rms_norm_llama(hidden_states: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    input_dtype = hidden_states.dtype
    h = hidden_states.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(input_dtype)
    return h if weight is None else weight * h


def _rms_norm_llama_detached(hidden_states: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    input_dtype = hidden_states.dtype
    h = hidden_states.to(torch.float32)
    h = h * torch.rsqrt(h.detach().pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(input_dtype)
    return h if weight is None else weight * h




def rms_norm_identity(hidden_states: Tensor, weight: Optional[Tensor],
                      variance_epsilon: float = 1e-6) -> Tensor:
    r"""Llama's RMSNorm (normalise in float32, cast back, scale by ``weight``) with the
    identity rule (AttnLRP Prop. 3.4): ``R_x = R``."""
    return _NORM_LLAMA.apply_at(_rms_norm_llama, (hidden_states, weight, variance_epsilon), {}, [0])


def rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    r"""``F.rms_norm`` with the identity rule (AttnLRP Prop. 3.4): ``R_x = R``."""
    return _NORM.apply_at(_rms_norm, (input, normalized_shape, weight, eps), {}, [0])


def _rms_norm(input, normalized_shape, weight=None, eps=None):
    return F.rms_norm(input, normalized_shape, weight, eps)


def _exact(formula: Tensor, native: Tensor) -> Tensor:
    """``formula``'s gradient with ``native``'s values: a rule that differentiates a formula of
    an op leaves the op's forward unchanged, bit for bit, and in its memory layout (a
    non-contiguous input gives torch's contiguous output, so the caller's ``.view`` works:
    Idefics3's pixel shuffle after the vision tower's LayerNorm)."""
    out = formula + (native - formula).detach()
    return out.contiguous() if native.is_contiguous() and not out.is_contiguous() else out


def _rms_norm_detached(input, normalized_shape, weight=None, eps=None):
    dims = tuple(range(-len(normalized_shape), 0))
    native = F.rms_norm(input.detach(), normalized_shape, None if weight is None else weight.detach(), eps)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    out = input * torch.rsqrt(input.detach().pow(2).mean(dims, keepdim=True) + eps)
    return _exact(out if weight is None else out * weight, native)


def _normalize(input, p=2.0, dim=1, eps=1e-12):
    return F.normalize(input, p=p, dim=dim, eps=eps)


def _normalize_detached(input, p=2.0, dim=1, eps=1e-12):
    return input / input.detach().norm(p, dim, keepdim=True).clamp_min(eps)


# The identity rule on normalisations, with their gradient forms (IdentityRule.gradient_form):
# the normaliser detached, so backward multiplies by it and keeps nothing else.
_NORM_LLAMA = IdentityRule(gradient_form=_rms_norm_llama_detached)
_NORM = IdentityRule(gradient_form=_rms_norm_detached)
_NORMALIZE = IdentityRule(gradient_form=_normalize_detached)


def _layer_norm_std_detached(input, normalized_shape, weight, bias, eps):
    dims = tuple(range(-len(normalized_shape), 0))
    var, mu = torch.var_mean(input, dim=dims, unbiased=False, keepdim=True)
    out = (input - mu) / torch.sqrt(var + eps).detach()
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    with torch.no_grad():  # the forward's values are torch's own layer norm's
        native = F.layer_norm(input, normalized_shape, weight, bias, eps)
    return _exact(out, native)


def layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5,
               epsilon: float = EPSILON) -> Tensor:
    r"""``F.layer_norm`` with the AttnLRP LayerNorm rule (Prop. 3.4): identity on ``1/std``,
    epsilon rule on the centring and the affine map, i.e. the epsilon rule applied to
    ``(x - mean(x)) / std.detach() * w + b``."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    if tuple(input.shape[-len(normalized_shape):]) != normalized_shape:
        raise ValueError(
            f"lxt.layer_norm: input {tuple(input.shape)} does not end in normalized_shape "
            f"{normalized_shape}."
        )
    return _epsilon_rule(epsilon).apply_at(
        _layer_norm_std_detached, (input, normalized_shape, weight, bias, eps), {}, [0]
    )


def mean(input: Tensor, dim=None, keepdim: bool = False, *, dtype=None,
         epsilon: float = EPSILON) -> Tensor:
    r"""``torch.mean`` with the epsilon rule: ``R_x = x * R / stab(sum(x))`` (the mean is the
    linear map ``sum(x) / N``; the stabiliser is applied to the mean, ``N * stab(mean)``)."""
    kwargs = {"keepdim": keepdim}
    if dim is not None:
        kwargs["dim"] = dim
    if dtype is not None:
        kwargs["dtype"] = dtype
    return _epsilon_rule(epsilon).apply_at(torch.mean, (input,), kwargs, [0])


def normalize(input: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12,
              out=None) -> Tensor:
    r"""``F.normalize`` with the identity rule (the norm is a scale, as in RMSNorm,
    AttnLRP Prop. 3.4): ``R_x = R``."""
    if out is not None:
        raise ValueError("lxt.normalize does not support out=.")
    return _NORMALIZE.apply_at(_normalize, (input,), {"p": p, "dim": dim, "eps": eps}, [0])


def identity(fn, input: Tensor, *args, **kwargs) -> Tensor:
    r"""``fn(input, *args, **kwargs)`` for an elementwise ``fn`` with the identity rule
    (AttnLRP Eq. 9): ``R_x = R``."""
    return _IDENTITY.apply_at(fn, (input, *args), kwargs, [0])


def _silu(input):
    return F.silu(input)


def _gelu(input, approximate="none"):
    return F.gelu(input, approximate=approximate)


def _gelu_ratio(input, approximate="none"):
    if approximate == "tanh":
        inner = math.sqrt(2 / math.pi) * (input + 0.044715 * input.pow(3))
        return 0.5 * (1 + torch.tanh(inner))
    return 0.5 * (1 + torch.erf(input * (1 / math.sqrt(2))))


# The identity rule's gradient form multiplies the gradient by y / x; for x * s(x) activations
# that ratio is s(x), one operation, with no division by x (IdentityRule.ratio).
_SILU = IdentityRule(ratio=torch.sigmoid)
_GELU = IdentityRule(ratio=_gelu_ratio)


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    """``F.silu`` with the identity rule (AttnLRP Eq. 9)."""
    return _SILU.apply_at(_silu, (input,), {}, [0])


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu`` with the identity rule (AttnLRP Eq. 9)."""
    return _GELU.apply_at(_gelu, (input,), {"approximate": approximate}, [0])


def tanh(input: Tensor) -> Tensor:
    """``torch.tanh`` with the identity rule (AttnLRP Eq. 9)."""
    return identity(torch.tanh, input)


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """``F.relu`` with the identity rule (AttnLRP Eq. 9)."""
    return identity(F.relu, input)


def sigmoid(input: Tensor) -> Tensor:
    """``torch.sigmoid`` with the identity rule (AttnLRP Eq. 9)."""
    return identity(torch.sigmoid, input)


sdpa = scaled_dot_product_attention
sdpa_cp = scaled_dot_product_attention_cp
