"""The published lxt 2.1 drop-in functionals (``lxt.explicit.functional``), as adapters.

Names, positional order and default epsilons are those of the published lxt 2.1; every
function forwards to the one implementation of its rule in :mod:`lxt.functional` (whose
signatures follow torch, for the graph rewrite).  Differences, all in
``docs/migration.md``:

- ``inplace`` is accepted and has no effect: lxt never overwrites the incoming relevance.
- The stabiliser is lxt's sign-aware ``z + epsilon * sign(z)`` (:func:`lxt.rules.stabilize`);
  the published one added ``+epsilon`` whatever the sign.  Same result away from zero.
- :func:`softmax` uses its ``dim`` in backward too (the published backward summed over the
  last dimension whatever ``dim`` was).

>>> import lxt.explicit.functional as lf
>>> y = lf.add2(a, b, False, 1e-8)
>>> y.backward(y)
>>> relevance_a, relevance_b = a.grad, b.grad
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import functional as _lf

__all__ = [
    "add2",
    "softmax",
    "linear_epsilon",
    "matmul",
    "rms_norm_identity",
    "mul2",
    "mean",
    "layer_norm",
    "normalize",
]


def _check_inplace(name: str, inplace) -> None:
    # the published third positional argument of add2 / matmul / mul2 is `inplace`; a number
    # there is almost always an epsilon meant for lxt.functional's keyword
    if not isinstance(inplace, bool):
        raise TypeError(
            f"lxt: {name}'s argument after the inputs is inplace (a bool) in the published "
            f"signature, got {inplace!r}; pass epsilon= by keyword."
        )


def add2(input_a: Tensor, input_b: Tensor, inplace: bool = False, epsilon: float = 1e-8) -> Tensor:
    """``input_a + input_b`` with the epsilon rule (AttnLRP Eq. 8).

    Published signature of :func:`lxt.functional.add2`; ``inplace`` has no effect.
    """
    _check_inplace("add2", inplace)
    return _lf.add2(input_a, input_b, epsilon=epsilon)


def softmax(input: Tensor, dim: int, dtype: Optional[torch.dtype] = None,
            temperature: float = 1.0, inplace: bool = False) -> Tensor:
    """``softmax(input / temperature, dim)`` with deep Taylor decomposition with bias
    (AttnLRP Prop. 3.1).

    Published signature of :func:`lxt.functional.softmax`.  A temperature other than 1 is
    the identity rule on ``input / temperature`` (:func:`lxt.functional.div_const`) followed
    by the softmax rule, which is what the published function computed.

    Parameters
    ----------
    input : Tensor
        Receives relevance.
    dim : int
        Softmax dimension (also in backward).
    dtype : torch.dtype, optional
        Compute the softmax in this dtype.
    temperature : float
        Positive divisor of the input.  A ``bool`` here is read as the ``inplace`` flag that
        the published tests pass in this position (``softmax(x, -1, torch.float32, False)``,
        written before ``temperature`` existed; the published package divides by
        ``False`` there and returns NaN relevance).  Temperature then stays 1.0 and a
        ``UserWarning`` says so.
    inplace : bool
        No effect.
    """
    if isinstance(temperature, bool):
        warnings.warn(
            f"lxt: softmax got temperature={temperature!r}; a bool here is read as the "
            "inplace flag of older call sites and temperature stays 1.0 (pass temperature= "
            "and inplace= by keyword).", UserWarning, stacklevel=2)
        temperature = 1.0
    if isinstance(temperature, (int, float)) and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"lxt: softmax temperature must be a finite number > 0, got {temperature!r}.")
    if not (isinstance(temperature, (int, float)) and temperature == 1):
        input = _lf.div_const(input, temperature)
    return _lf.softmax(input, dim, dtype=dtype)


def linear_epsilon(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                   epsilon: float = 1e-6) -> Tensor:
    """``F.linear`` with the epsilon rule (AttnLRP Eq. 8); same signature as
    :func:`lxt.functional.linear_epsilon`."""
    return _lf.linear_epsilon(input, weight, bias, epsilon)


def matmul(input_a: Tensor, input_b: Tensor, inplace: bool = False, epsilon: float = 1e-8) -> Tensor:
    """``torch.matmul`` with the epsilon + uniform rule (AttnLRP Prop. 3.3).

    Published signature of :func:`lxt.functional.matmul`; ``inplace`` has no effect.
    """
    _check_inplace("matmul", inplace)
    return _lf.matmul(input_a, input_b, epsilon=epsilon)


def rms_norm_identity(hidden_states: Tensor, weight: Tensor, variance_epsilon: float) -> Tensor:
    """Llama RMSNorm with the identity rule (AttnLRP Prop. 3.4); same signature as
    :func:`lxt.functional.rms_norm_identity`."""
    return _lf.rms_norm_identity(hidden_states, weight, variance_epsilon)


def mul2(input_a, input_b, inplace: bool = False) -> Tensor:
    """``input_a * input_b`` with the uniform rule (AttnLRP Prop. 3.2); the identity rule
    when one factor is constant.

    Published signature of :func:`lxt.functional.mul2`; ``inplace`` has no effect.
    """
    _check_inplace("mul2", inplace)
    return _lf.mul2(input_a, input_b)


def mean(x: Tensor, dim, keep_dim: bool, epsilon: float = 1e-6) -> Tensor:
    """``x.mean(dim, keep_dim)`` with the epsilon rule: ``R_x = x * R / stab(sum(x))``.

    Published signature of :func:`lxt.functional.mean` (``mean(input, dim, keepdim, *,
    epsilon)``).  The published ``epsilon`` stabilises the sum; :func:`lxt.functional.mean`
    stabilises the mean, so it is given ``epsilon / N`` (``N`` elements per mean).
    """
    dims = [dim] if isinstance(dim, int) else list(dim)
    n = math.prod(x.shape[d] for d in dims)
    return _lf.mean(x, dim, keep_dim, epsilon=epsilon / max(n, 1))


def layer_norm(hidden_states: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               variance_epsilon: float) -> Tensor:
    """LayerNorm over the last dimension with the AttnLRP LayerNorm rule (Prop. 3.4).

    Published signature of :func:`lxt.functional.layer_norm` (which takes torch's
    ``(input, normalized_shape, weight, bias, eps)``): ``variance_epsilon`` is torch's ``eps``.
    """
    return _lf.layer_norm(hidden_states, (hidden_states.shape[-1],), weight, bias,
                          variance_epsilon)


def _layer_norm_slower(hidden_states: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       variance_epsilon: float) -> Tensor:
    """The same LayerNorm rule as :func:`layer_norm`, composed of the elementary rules:
    epsilon on the mean and on the centring, identity on the constant ``1/std``, ``weight``
    and ``bias``.  Kept for the published tests, which compare the two."""
    centre = mean(hidden_states, -1, True)
    with torch.no_grad():
        std = torch.sqrt((hidden_states - centre).pow(2).mean(-1, keepdim=True) + variance_epsilon)
    out = mul2(add2(hidden_states, mul2(centre, -1)), 1 / std)
    if weight is not None:
        out = mul2(out, weight.detach())
    if bias is not None:
        out = add2(out, bias.detach())
    return out


def normalize(input: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out=None) -> Tensor:
    """``F.normalize`` with the identity rule (AttnLRP Prop. 3.4); same signature as
    :func:`lxt.functional.normalize`."""
    return _lf.normalize(input, p, dim, eps, out)
