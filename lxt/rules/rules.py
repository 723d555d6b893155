"""The LRP rules (AttnLRP, Achtibat et al., ICML 2024; CP-LRP, Ali et al., ICML 2022).

Notation: ``x`` an input, ``z`` the output, ``R`` the output relevance, ``stab`` the
sign-aware stabiliser of :func:`lxt.rules.stabilize`.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (EPSILON, Rule, _Call, _RatioGradient, compute_dtype, n_variable, plain_call,
                   stabilised_share, stabilize)

__all__ = [
    "EpsilonRule",
    "UniformEpsilonRule",
    "UniformRule",
    "IdentityRule",
    "StopRelevanceRule",
    "GammaRule",
    "TaylorDecompositionRule",
    "SoftmaxDTRule",
    "AttnLRPAttentionRule",
    "CPLRPAttentionRule",
]


def _check_number(name: str, value, rule: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"lxt: {rule}{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def _check_epsilon(epsilon: float) -> float:
    return _check_number("epsilon", epsilon)


class EpsilonRule(Rule):
    r"""Epsilon-LRP (AttnLRP Eq. 8): ``R_x = x * J^T (R / stab(z))``.

    For a linear layer ``z = W x + b`` this is ``R_x = x * W^T (R / stab(z))``; the bias absorbs
    its share of relevance.  Applied to any differentiable callable it uses the callable's own
    Jacobian (the gradient), so it also covers ``a + b`` (Eq. 8 for two variable inputs:
    ``R_a = a R / stab(a + b)``), convolutions, means and LayerNorm with the std detached.

    Parameters
    ----------
    epsilon : float
        Stabiliser, default :data:`lxt.rules.EPSILON` (1e-6).
    """

    keeps_graph = True

    def __init__(self, epsilon: float = EPSILON):
        self.epsilon = _check_epsilon(epsilon)

    def _params(self):
        return {"epsilon": self.epsilon}

    def _denominator_scale(self, call: _Call) -> int:
        return 1

    @property
    def plain_gradient_module(self) -> bool:
        # the gradient form below: the plain gradient (of a module called with its inputs)
        return type(self) is EpsilonRule and self._limit

    @property
    def _limit(self) -> bool:
        """Whether this rule is its epsilon -> 0 limit (epsilon at most the default): its
        gradient form is then the plain gradient; a larger epsilon scales the gradient by
        ``z / stab(z)`` at the output (both forms give the same relevance)."""
        return self.epsilon <= EPSILON

    def gradient_at(self, fn, args, kwargs, positions, label=None):
        # R_x = x * J^T (R / stab(z)) with R = z * g gives g_x = R_x / x = J^T (g z / stab(z)):
        # for eps -> 0 the plain gradient (nothing wrapped, nothing kept beyond what autograd
        # keeps); for a larger epsilon the gradient scaled by z / stab(z) at the output.
        if not self._limit:
            return stabilised_share(plain_call(fn, args, kwargs, positions), self.epsilon)
        return plain_call(fn, args, kwargs, positions)

    def relevance(self, call, relevance):
        out = call.output
        ct = compute_dtype(out.dtype)
        n = self._denominator_scale(call)
        z = out.to(ct)
        denom = stabilize(z * n if n != 1 else z, self.epsilon)
        g = torch.div(relevance.to(ct), denom, out=denom)  # reuse the temporary
        grads = call.vjp(g)
        del g, denom
        ptrs = [gr.data_ptr() for gr in grads if gr is not None]
        return [
            None if gr is None else _times(x, gr, ct, inplace=ptrs.count(gr.data_ptr()) == 1)
            for x, gr in zip(call.inputs, grads)
        ]


def _times(x: Tensor, grad: Tensor, ct: torch.dtype, inplace: bool) -> Tensor:
    """``x * grad`` in the compute dtype, in place on the (fresh, unshared) gradient where
    possible."""
    grad = grad.to(ct)
    if inplace and grad.shape == x.shape and not grad.requires_grad and grad._base is None:
        return grad.mul_(x.to(ct))
    return x.to(ct) * grad


class UniformEpsilonRule(EpsilonRule):
    r"""Epsilon rule with relevance shared uniformly among the variable inputs (AttnLRP
    Prop. 3.3, matrix multiplication).

    For ``z = A @ B`` with both factors variable: ``R_A = A * ((R / stab(2 z)) B^T)`` and
    ``R_B = B * (A^T (R / stab(2 z)))``.  With ``n`` variable inputs the denominator is
    ``stab(n z)``; with one variable input it is the epsilon rule.
    """

    def _denominator_scale(self, call):
        return max(call.n_variable, 1)

    def gradient_at(self, fn, args, kwargs, positions, label=None):
        # R_x = x * J_x^T (R / stab(n z)) with R = z * g gives g_x = J_x^T (g z / stab(n z)):
        # for eps -> 0 the plain gradient of each of the n variable inputs divided by n.
        n = max(n_variable(args, positions), 1)
        if not self._limit:
            return stabilised_share(plain_call(fn, args, kwargs, positions), self.epsilon, n)
        return plain_call(fn, args, kwargs, positions, [1.0 / n] * len(positions))


class UniformRule(Rule):
    r"""Uniform rule (AttnLRP Prop. 3.2): every variable input gets ``R / n``.

    For ``z = a * b`` with both factors variable ``R_a = R_b = R / 2``; with one factor
    constant (a tensor without ``requires_grad``, or a number) this is the identity rule
    ``R_x = R``.  Broadcast inputs get the relevance summed back to their shape.
    """

    def relevance(self, call, relevance):
        n = max(call.n_variable, 1)
        return [
            (relevance / n).sum_to_size(x.shape) if need else None
            for x, need in zip(call.inputs, call.needs)
        ]

    def gradient_at(self, fn, args, kwargs, positions, label=None):
        # R_a = R / n with R = z * g gives g_a = z g / (n a).  For a product z = a * b,
        # z / a = b = dz/da, so g_a is the plain gradient divided by n (n = 1, one constant
        # factor: the identity rule, also the plain gradient).  Other callables: explicit.
        if fn in _PRODUCTS:
            n = max(n_variable(args, positions), 1)
            return plain_call(fn, args, kwargs, positions, [1.0 / n] * len(positions))
        return super().gradient_at(fn, args, kwargs, positions, label)


_PRODUCTS = (operator.mul, torch.mul, torch.Tensor.mul, operator.imul)
#: elementwise functions with y = f'(x) * x (f' constant): their identity rule is the gradient
_LINEAR_ELEMENTWISE = (operator.neg, torch.neg, torch.Tensor.neg, operator.pos)
#: ``x / c`` with the divisor a constant of the rule: linear in x, so its identity rule is the
#: gradient with ``c`` detached
_SCALES = (operator.truediv, torch.div, torch.true_divide, torch.Tensor.div)


class IdentityRule(Rule):
    r"""Identity rule (AttnLRP Eq. 9 for elementwise activations, Prop. 3.4 for RMSNorm):
    ``R_x = R``.

    For a callable with one variable input whose output has the input's shape (or broadcasts
    to it).  With several variable inputs use :class:`UniformRule`.

    Parameters (the gradient form only; the relevance is ``R`` either way)
    ----------
    ratio : callable, optional
        ``y / x`` in closed form, called with the call's arguments (SiLU: ``sigmoid(x)``, one
        operation and no division by ``x``).
    gradient_form : callable, optional
        For a normalisation ``y = x * s(x)``: a function of the call's arguments computing
        ``x * s(x).detach()``, whose plain gradient is the rule's (``s`` is kept alone: one
        number per row for RMSNorm).
    """

    def __init__(self, ratio: Optional[Any] = None, gradient_form: Optional[Any] = None):
        self.ratio, self.gradient_form = ratio, gradient_form

    def _params(self):
        return {k: v for k, v in (("ratio", self.ratio), ("gradient_form", self.gradient_form)) if v is not None}

    def relevance(self, call, relevance):
        if call.n_variable > 1:
            raise ValueError(
                f"lxt: IdentityRule gives all relevance to one input, but {call.n_variable} "
                "inputs of this call require grad; use UniformRule to share it."
            )
        return [
            relevance.sum_to_size(x.shape) if need else None
            for x, need in zip(call.inputs, call.needs)
        ]

    def gradient_at(self, fn, args, kwargs, positions, label=None):
        # R_x = R with R = y * g gives g_x = g * y / x (x stabilised like the epsilon rule
        # stabilises the layer that produced x, so both forms agree exactly).  Keeps y / x,
        # one tensor of x's size (what plain autograd keeps for the activation).  For a
        # linear elementwise map (negation) y / x is its derivative: the plain gradient.
        var = [p for p in positions if args[p].requires_grad]
        if len(var) > 1:
            raise ValueError(
                f"lxt: IdentityRule gives all relevance to one input, but {len(var)} "
                "inputs of this call require grad; use UniformRule to share it."
            )
        if fn in _LINEAR_ELEMENTWISE or (fn in _SCALES and var == [0]):
            return plain_call(fn, args, kwargs, positions)
        if self.gradient_form is not None:
            return plain_call(self.gradient_form, args, kwargs, positions)
        (p,) = var
        template = list(args)
        template[p] = None
        return _RatioGradient.apply(fn, template, p, kwargs, args[p], self.ratio)


class StopRelevanceRule(Rule):
    """No relevance flows through: every variable input gets zero relevance."""

    def relevance(self, call, relevance):
        return [
            torch.zeros(x.shape, dtype=x.dtype, device=relevance.device) if need else None
            for x, need in zip(call.inputs, call.needs)
        ]


class GammaRule(Rule):
    r"""Gamma-LRP for linear and convolution layers (used for ViTs, AttnLRP appendix).

    Positive contributions are favoured by ``gamma``: for an output with ``z >= 0``

    ``R_x = x+ * (W + g W+)^T g_+ + x- * (W + g W-)^T g_+``,
    ``g_+ = R / stab((W + g W+) x+ + (W + g W-) x- + b + g b+)``,

    and for ``z < 0`` the roles of ``W+`` and ``W-`` swap (negative contributions favoured).
    For ``x >= 0`` and positive outputs this is ``x * ((W + g W+)^T (R / stab((W + g W+) x)))``
    with the (modified) bias in the denominator, absorbing its share like in the epsilon rule;
    ``gamma = 0`` is the epsilon rule.

    Parameters
    ----------
    gamma : float
        Weight of the positive (resp. negative) parts, ``>= 0``; default 0.25.
    epsilon : float
        Stabiliser.
    """

    saves_tensors = True

    def __init__(self, gamma: float = 0.25, epsilon: float = EPSILON):
        self.gamma = _check_number("gamma", gamma, "GammaRule needs gamma >= 0: ")
        self.epsilon = _check_epsilon(epsilon)

    def _params(self):
        return {"gamma": self.gamma, "epsilon": self.epsilon}

    _LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)

    def check_module(self, module):
        if not isinstance(module, self._LAYERS):
            raise TypeError(
                f"lxt: GammaRule applies to nn.Linear and nn.Conv1d/2d/3d layers, not "
                f"{type(module).__name__}; use EpsilonRule for other modules."
            )

    def apply(self, fn, *args, label=None, **kwargs):
        if isinstance(fn, torch.nn.Module):
            self.check_module(fn)
            if kwargs or len(args) != 1:
                raise TypeError("lxt: GammaRule on a layer takes exactly one input tensor.")
            layer = fn
            if isinstance(layer, torch.nn.Linear):
                call = lambda x, w, b: F.linear(x, w, b)  # noqa: E731
            else:
                call = layer._conv_forward
            return self.apply_at(_GammaLayer(call, layer.weight, layer.bias),
                                 [args[0]], {}, [0], label=label)
        raise TypeError(
            "lxt: GammaRule wraps a layer module; for the functional form use "
            "lxt.functional.linear_gamma."
        )

    def relevance(self, call, relevance):
        out, (x,) = call.output, call.inputs
        layer: _GammaLayer = call.fn
        ct = compute_dtype(out.dtype)
        x = x.to(ct)
        w = layer.weight.detach().to(ct)
        b = None if layer.bias is None else layer.bias.detach().to(ct)
        g = self.gamma
        w_pos = w + g * w.clamp(min=0)
        w_neg = w + g * w.clamp(max=0)
        b_pos = None if b is None else b + g * b.clamp(min=0)
        b_neg = None if b is None else b + g * b.clamp(max=0)
        R = relevance.to(ct)
        positive = out.to(ct) >= 0
        with torch.enable_grad():
            xp = x.clamp(min=0).requires_grad_()
            xn = x.clamp(max=0).requires_grad_()
            z_pos = layer.call(xp, w_pos, b_pos) + layer.call(xn, w_neg, None)
            z_neg = layer.call(xp, w_neg, b_neg) + layer.call(xn, w_pos, None)
            s_pos = torch.where(positive, R / stabilize(z_pos.detach(), self.epsilon), 0)
            s_neg = torch.where(positive, 0, R / stabilize(z_neg.detach(), self.epsilon))
            total = (z_pos * s_pos).sum() + (z_neg * s_neg).sum()
            gp, gn = torch.autograd.grad(total, (xp, xn))
        return [xp.detach() * gp + xn.detach() * gn]


class _GammaLayer:
    """A layer's forward as ``call(x, weight, bias)`` with its own weights bound."""

    def __init__(self, call, weight, bias):
        self.call, self.weight, self.bias = call, weight, bias
        self.__name__ = getattr(call, "__name__", "layer")

    def __call__(self, x):
        return self.call(x, self.weight, self.bias)


class TaylorDecompositionRule(Rule):
    r"""First-order Taylor decomposition at a reference point ``x0``.

    ``f(x) ~ f(x0) + J(x0) (x - x0)``; the relevance of input ``i`` is its term of the
    expansion, normalised to the output relevance:

    ``R_i = (x_i - x0_i) * J_i(x0)^T (R / stab(d))``, with ``d = f(x0) + sum_i J_i(x0)(x_i - x0_i)``
    when ``bias=True`` (the constant ``f(x0)`` absorbs its share, like a bias; for a linear
    layer and ``x0 = 0`` this is the epsilon rule), or ``d = sum_i J_i(x0)(x_i - x0_i)`` when
    ``bias=False`` (all relevance is distributed, conservative).

    Parameters
    ----------
    reference : float, Tensor or callable, optional
        The root point ``x0``: a number, a tensor broadcastable to every input, or a function
        ``x -> x0`` applied to each input.  Default 0.
    bias : bool
        Whether ``f(x0)`` absorbs relevance (see above).
    epsilon : float
        Stabiliser.
    """

    saves_tensors = True

    def __init__(self, reference: Any = 0.0, bias: bool = True, epsilon: float = EPSILON):
        if not (isinstance(reference, (int, float, Tensor)) or callable(reference)):
            raise TypeError(
                "lxt: TaylorDecompositionRule reference must be a number, a tensor or a "
                f"callable x -> x0, got {type(reference).__name__}."
            )
        self.reference = reference
        self.bias = bool(bias)
        self.epsilon = _check_epsilon(epsilon)

    def _params(self):
        ref = self.reference
        ref = ("tensor", id(ref)) if isinstance(ref, Tensor) else ref
        return {"reference": ref, "bias": self.bias, "epsilon": self.epsilon}

    def __repr__(self):
        ref = self.reference
        ref = f"tensor{tuple(ref.shape)}" if isinstance(ref, Tensor) else repr(ref)
        return f"TaylorDecompositionRule(reference={ref}, bias={self.bias}, epsilon={self.epsilon})"

    def _root(self, x: Tensor) -> Tensor:
        ref = self.reference
        if callable(ref) and not isinstance(ref, Tensor):
            ref = ref(x)
        return torch.as_tensor(ref, dtype=x.dtype, device=x.device).expand_as(x).clone()

    def relevance(self, call, relevance):
        var = [i for i, n in enumerate(call.needs) if n]
        xs = [x.detach() for x in call.inputs]
        roots = [self._root(x) if n else x for x, n in zip(xs, call.needs)]
        tangents = tuple(xs[i] - roots[i] for i in var)

        def f(*var_values):
            vals = list(roots)
            for i, v in zip(var, var_values):
                vals[i] = v
            return call.call(*vals)

        with torch.enable_grad():
            prim = tuple(roots[i].clone().requires_grad_() for i in var)
            f0 = f(*prim)
            _, jd = torch.func.jvp(f, tuple(r.detach() for r in prim), tangents)
            denom = jd + f0.detach() if self.bias else jd
            g = relevance.to(denom.dtype) / stabilize(denom, self.epsilon)
            grads = torch.autograd.grad(f0, prim, g, allow_unused=True)
        res = [None] * len(xs)
        for i, d, gr in zip(var, tangents, grads):
            res[i] = torch.zeros_like(d) if gr is None else d * gr
        return res


class SoftmaxDTRule(Rule):
    r"""Deep Taylor decomposition of softmax with bias (AttnLRP Prop. 3.1).

    ``R_x = x * (R - s * sum(R))`` along ``dim``, with ``s = softmax(x)``.  Inputs at
    ``-inf`` (masked positions) count as 0.  Not conservative: the bias term absorbs relevance.

    Parameters
    ----------
    dim : int
        The softmax dimension.
    """

    saves_tensors = True

    def __init__(self, dim: int):
        self.dim = dim

    def _params(self):
        return {"dim": self.dim}

    def relevance(self, call, relevance):
        (x,), s = call.inputs, call.output
        ct = compute_dtype(s.dtype)
        x = x.to(ct)
        x = torch.where(torch.isinf(x), torch.zeros_like(x), x)
        s = s.to(ct)
        R = relevance.to(ct)
        return [x * (R - s * R.sum(self.dim, keepdim=True))]

    def gradient_at(self, fn, args, kwargs, positions, label=None):
        # R_x = x * (R - s sum(R)) with R = s * g gives g_x = s * (g - sum(s * g)): the
        # plain gradient of softmax.
        return plain_call(fn, args, kwargs, positions)


class AttnLRPAttentionRule(Rule):
    r"""AttnLRP for scaled dot-product attention ``o = softmax(q k^T * scale + mask) v``.

    Composes matmul (Prop. 3.3) -> softmax (Prop. 3.1) -> matmul (Prop. 3.3) in one fused
    attention backward, without the ``n x n`` matrix: with ``g = R / stab(m o)``

    ``R_v = v * do/dv(g)``, ``R_q = q * do/dq(g) / k``, ``R_k = k * do/dk(g) / k``

    where ``m`` (2 when both the attention weights and ``v`` are variable) and ``k`` (2 when
    both ``q`` and ``k`` are variable) are the uniform shares of the two matrix products.
    Masks are constants.
    """

    keeps_graph = True

    def __init__(self, epsilon: float = EPSILON):
        self.epsilon = _check_epsilon(epsilon)

    def _params(self):
        return {"epsilon": self.epsilon}

    def relevance(self, call, relevance):
        out = call.output
        ct = compute_dtype(out.dtype)
        need_q, need_k, need_v = call.needs
        n_qk = int(need_q) + int(need_k)
        m = int(n_qk > 0) + int(need_v)
        g = relevance.to(ct) / stabilize(m * out.to(ct), self.epsilon)
        dq, dk, dv = call.vjp(g)
        q, k, v = call.inputs
        return [
            None if dq is None else q.to(ct) * dq.to(ct) / n_qk,
            None if dk is None else k.to(ct) * dk.to(ct) / n_qk,
            None if dv is None else v.to(ct) * dv.to(ct),
        ]

    def gradient_at(self, fn, args, kwargs, positions, label=None):
        # Matmul rule (A, v) -> g_A, g_v = plain / m; softmax DT with bias -> plain gradient;
        # matmul rule (q, k) -> g_q, g_k = plain / n_qk.  So q and k get their plain
        # gradient / (m n_qk) (1/4 when all three are variable), v its plain gradient / m.
        # (A larger epsilon: g / m becomes g o / stab(m o) at the output.)
        need_q, need_k, need_v = (args[p].requires_grad for p in positions)
        n_qk = int(need_q) + int(need_k)
        m = int(n_qk > 0) + int(need_v)
        if self.epsilon > EPSILON:
            qk = 1.0 / max(n_qk, 1)
            out = plain_call(fn, args, kwargs, positions, [qk, qk, 1.0])
            return stabilised_share(out, self.epsilon, max(m, 1))
        qk = 1.0 / (max(m, 1) * max(n_qk, 1))
        return plain_call(fn, args, kwargs, positions, [qk, qk, 1.0 / max(m, 1)])


class CPLRPAttentionRule(EpsilonRule):
    r"""CP-LRP attention (Ali et al., 2022): the attention weights are constants, relevance
    flows only through ``v`` with the epsilon rule on ``A @ v``: ``R_v = v * do/dv(R / stab(o))``.
    ``q`` and ``k`` receive none.

    For a call ``fn(query, key, value, ...)`` (``F.scaled_dot_product_attention``'s signature):
    the rule itself detaches ``query`` and ``key``, wherever it is used."""

    def apply_at(self, fn, args, kwargs, positions, label=None):
        args = list(args)
        for p in (0, 1):
            if p < len(args) and isinstance(args[p], Tensor):
                args[p] = args[p].detach()
        if any(k in kwargs for k in ("query", "key")):
            kwargs = {k: (v.detach() if k in ("query", "key") and isinstance(v, Tensor) else v)
                      for k, v in kwargs.items()}
        return super().apply_at(fn, args, kwargs, [p for p in positions if p >= 2], label)


# ---------------------------------------------------------------------------- the drop-ins
# (lxt.functional re-exports them; the tables map F.scaled_dot_product_attention to them)

def _is_causal_mask(mask: Tensor, query: Tensor, key: Tensor) -> bool:
    """Whether a boolean ``attn_mask`` is exactly the causal mask of ``query`` x ``key`` (every
    batch and head).  Checked on every call (nothing is kept: a tensor's address says nothing
    about its values); a mask with padding fails on its last row, in O(n)."""
    n = query.shape[-2]
    if mask.dtype != torch.bool or key.shape[-2] != n or mask.shape[-2:] != (n, n):
        return False
    if not bool(mask[..., -1, :].all()):  # padding masks out keys in the last row too
        return False
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril_()
    return bool(torch.equal(mask, causal.expand_as(mask)))


def _sdpa_kwargs(attn_mask, dropout_p, is_causal, scale, enable_gqa, query, key) -> dict:
    if attn_mask is not None and not is_causal and _is_causal_mask(attn_mask, query, key):
        # the same attention through torch's fused causal kernel: no n x n mask kept for backward
        attn_mask, is_causal = None, True
    kw = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
    if enable_gqa:
        kw["enable_gqa"] = True
    return kw


def _check_qkv(name, query, key, value):
    for t, n in ((query, "query"), (key, "key"), (value, "value")):
        if not isinstance(t, Tensor):
            raise TypeError(f"lxt.{name}: {n} must be a tensor, got {type(t).__name__}.")
    if not (query.dim() == key.dim() == value.dim()) or query.dim() < 2:
        raise ValueError(
            f"lxt.{name}: query, key and value need the same number (>= 2) of dimensions, got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}."
        )
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"lxt.{name}: incompatible shapes query {tuple(query.shape)}, key "
            f"{tuple(key.shape)}, value {tuple(value.shape)} (need query[-1] == key[-1] and "
            "key[-2] == value[-2])."
        )


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *,
                                 epsilon: float = EPSILON) -> Tensor:
    r"""``F.scaled_dot_product_attention`` with the AttnLRP rule (matmul, Prop. 3.3 ->
    softmax, Prop. 3.1 -> matmul, Prop. 3.3), fused: with ``g = R / stab(2 o)``,
    ``R_v = v * do/dv(g)``, ``R_q = q * do/dq(g) / 2``, ``R_k = k * do/dk(g) / 2``.  No
    ``n x n`` matrix beyond what torch's own attention backward uses.  Supports causal,
    boolean and float masks, ``scale``, grouped-query attention (``enable_gqa``) and batches.
    """
    _check_qkv("scaled_dot_product_attention", query, key, value)
    return AttnLRPAttentionRule(epsilon).apply_at(
        F.scaled_dot_product_attention, (query, key, value),
        _sdpa_kwargs(attn_mask, dropout_p, is_causal, scale, enable_gqa, query, key), [0, 1, 2])


def scaled_dot_product_attention_cp(query: Tensor, key: Tensor, value: Tensor,
                                    attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                    is_causal: bool = False, scale: Optional[float] = None,
                                    enable_gqa: bool = False, *,
                                    epsilon: float = EPSILON) -> Tensor:
    r"""``F.scaled_dot_product_attention`` with the CP-LRP rule (Ali et al., 2022): attention
    weights are constants, ``R_v = v * do/dv(R / stab(o))``; ``q`` and ``k`` get none."""
    _check_qkv("scaled_dot_product_attention_cp", query, key, value)
    return CPLRPAttentionRule(epsilon).apply_at(  # the rule detaches query and key
        F.scaled_dot_product_attention, (query, key, value),
        _sdpa_kwargs(attn_mask, dropout_p, is_causal, scale, enable_gqa, query, key), [0, 1, 2])
