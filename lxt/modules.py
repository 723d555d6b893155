"""Drop-in modules: ``nn.Module`` replacements whose backward carries relevance.

Each is built from the module it replaces with ``from_module``, sharing (not copying) its
parameters, and calls the matching :mod:`lxt.functional` rule.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as lf
from .rules.base import LxtModule
from .rules.base import EPSILON

__all__ = [
    "LinearEpsilon",
    "SoftmaxDT",
    "RMSNormIdentity",
    "LayerNormEpsilon",
    "SiLUIdentity",
    "GELUIdentity",
    "TanhIdentity",
    "ReLUIdentity",
    "MoEExperts",
    "MultiheadAttention",
]


def _check(cls, module, expected: tuple) -> None:
    if not isinstance(module, expected):
        names = " or ".join(t.__name__ for t in expected)
        raise TypeError(f"lxt: {cls.__name__}.from_module needs a {names}, got {type(module).__name__}.")


def _adopt(cls, module: nn.Module, expected: tuple, **attrs):
    """A ``cls`` instance that shares ``module``'s parameters and buffers (no copy)."""
    _check(cls, module, expected)
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, p in module.named_parameters(recurse=False):
        new.register_parameter(name, p)
    for name, b in module.named_buffers(recurse=False):
        new.register_buffer(name, b)
    for k, v in attrs.items():
        setattr(new, k, v)
    new.train(module.training)
    return new


class LinearEpsilon(LxtModule, nn.Linear):
    r"""``nn.Linear`` with the epsilon rule (AttnLRP Eq. 8), see
    :func:`lxt.functional.linear_epsilon`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, epsilon: float = EPSILON):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.epsilon = epsilon

    @classmethod
    def from_module(cls, module: nn.Linear, epsilon: float = EPSILON) -> "LinearEpsilon":
        """Wrap ``module``'s weight and bias (shared)."""
        _check(cls, module, (nn.Linear,))
        new = _adopt(cls, module, (nn.Linear,), in_features=module.in_features,
                     out_features=module.out_features, epsilon=epsilon)
        if "bias" not in new._parameters:
            new.register_parameter("bias", None)
        return new

    def lrp_forward(self, input):
        return lf.linear_epsilon(input, self.weight, self.bias, self.epsilon)

    def extra_repr(self):
        return super().extra_repr() + f", epsilon={self.epsilon}"


class SoftmaxDT(LxtModule, nn.Softmax):
    r"""``nn.Softmax`` with deep Taylor decomposition with bias (AttnLRP Prop. 3.1), see
    :func:`lxt.functional.softmax`."""

    @classmethod
    def from_module(cls, module: nn.Softmax) -> "SoftmaxDT":
        _check(cls, module, (nn.Softmax,))
        return _adopt(cls, module, (nn.Softmax,), dim=module.dim)

    def lrp_forward(self, input):
        return lf.softmax(input, self.dim)


def _rms_eps(module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise TypeError(
        f"lxt: RMSNormIdentity.from_module cannot find the epsilon of {type(module).__name__} "
        "(looked for variance_epsilon, eps, epsilon)."
    )


class RMSNormIdentity(LxtModule):
    r"""Llama-style RMSNorm with the identity rule (AttnLRP Prop. 3.4), see
    :func:`lxt.functional.rms_norm_identity`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    @classmethod
    def from_module(cls, module: nn.Module) -> "RMSNormIdentity":
        """Wrap any RMSNorm module with a ``weight`` (shared) and an epsilon attribute
        (``variance_epsilon`` as in HF Llama, or ``eps`` as in ``nn.RMSNorm``)."""
        if "weight" not in dict(module.named_parameters(recurse=False)) and getattr(module, "weight", 1) is not None:
            raise TypeError(f"lxt: RMSNormIdentity.from_module needs a module with a weight, got {type(module).__name__}.")
        return _adopt(cls, module, (nn.Module,), variance_epsilon=_rms_eps(module))

    def lrp_forward(self, hidden_states):
        return lf.rms_norm_identity(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LayerNormEpsilon(LxtModule, nn.LayerNorm):
    r"""``nn.LayerNorm`` with the AttnLRP LayerNorm rule (Prop. 3.4), see
    :func:`lxt.functional.layer_norm`."""

    @classmethod
    def from_module(cls, module: nn.LayerNorm, epsilon: float = EPSILON) -> "LayerNormEpsilon":
        _check(cls, module, (nn.LayerNorm,))
        new = _adopt(cls, module, (nn.LayerNorm,), normalized_shape=module.normalized_shape,
                     eps=module.eps, elementwise_affine=module.elementwise_affine,
                     epsilon=epsilon)
        for name in ("weight", "bias"):
            if name not in new._parameters:
                new.register_parameter(name, None)
        return new

    def lrp_forward(self, input):
        return lf.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                             epsilon=getattr(self, "epsilon", EPSILON))


class _ActivationIdentity(LxtModule):
    _fn = None
    _replaces: tuple = ()

    @classmethod
    def from_module(cls, module: nn.Module):
        """Build from the activation module it replaces."""
        return _adopt(cls, module, cls._replaces, **cls._attrs(module))

    @classmethod
    def _attrs(cls, module):
        return {}

    def lrp_forward(self, input):  # the drop-in the call entries use: one path per activation
        return type(self)._fn(input, **self._kwargs())

    def _kwargs(self):
        return {}


class SiLUIdentity(_ActivationIdentity):
    """``nn.SiLU`` with the identity rule (AttnLRP Eq. 9)."""

    _fn = staticmethod(lf.silu)
    _replaces = (nn.SiLU,)


class GELUIdentity(_ActivationIdentity):
    """``nn.GELU`` with the identity rule (AttnLRP Eq. 9)."""

    _fn = staticmethod(lf.gelu)
    _replaces = (nn.GELU,)

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    @classmethod
    def _attrs(cls, module):
        return {"approximate": module.approximate}

    def _kwargs(self):
        return {"approximate": self.approximate}


class TanhIdentity(_ActivationIdentity):
    """``nn.Tanh`` with the identity rule (AttnLRP Eq. 9)."""

    _fn = staticmethod(lf.tanh)
    _replaces = (nn.Tanh,)


class ReLUIdentity(_ActivationIdentity):
    """``nn.ReLU`` with the identity rule (AttnLRP Eq. 9)."""

    _fn = staticmethod(lf.relu)
    _replaces = (nn.ReLU,)


class MoEExperts(LxtModule):
    r"""The experts of a sparse mixture-of-experts layer (transformers 5 ``Qwen3MoeExperts``,
    ``MixtralExperts``: ``gate_up_proj`` ``(E, 2I, H)``, ``down_proj`` ``(E, H, I)``,
    ``act_fn``), same forward, with LRP rules inside.

    Each routed token ``x`` gets ``y = sum_k w_k * down_k(act(gate_k(x)) * up_k(x))`` over its
    top-k experts.  Rules: epsilon on the projections and on the sum over experts, identity
    on the activation, uniform on ``act(gate) * up`` (AttnLRP Prop. 3.2).  The routing weight
    ``w_k`` is a factor of a product too: AttnLRP splits ``w_k * expert_k(x)`` uniformly,
    half of it through the router (linear, softmax, top-k: the rules of the table), exactly
    as it treats attention weights times values; CP-LRP (``cp=True``) detaches the routing
    weights and the gate branch, as it detaches attention weights, so all relevance goes
    through the experts' value path.
    """

    def __init__(self, num_experts: int, cp: bool = False, epsilon: float = EPSILON):
        super().__init__()
        self.num_experts = num_experts
        self.cp = cp
        self.epsilon = epsilon

    @classmethod
    def from_module(cls, module: nn.Module, cp: bool = False, epsilon: float = EPSILON) -> "MoEExperts":
        """Share ``module``'s expert weights (``gate_up_proj``, ``down_proj``) and
        activation."""
        name = type(module).__name__
        missing = [a for a in ("gate_up_proj", "down_proj", "act_fn") if not hasattr(module, a)]
        if missing:
            raise TypeError(f"lxt: MoEExperts.from_module needs the transformers 5 experts layout "
                            f"(gate_up_proj, down_proj, act_fn); {name} has no {', '.join(missing)}.")
        extra = sorted(set(dict(module.named_parameters(recurse=False))) - {"gate_up_proj", "down_proj"})
        if extra:
            raise TypeError(f"lxt: MoEExperts supports experts without biases; {name} also has {extra}.")
        # transformers' experts decorator states the layout; the default is ours
        layout = {"is_transposed": False, "has_bias": False, "has_post_expert_norm": False,
                  "has_gate": True, "is_concatenated": True}
        odd = [f"{k}={getattr(module, k)!r}" for k, v in layout.items() if getattr(module, k, v) != v]
        apply_gate = getattr(type(module), "_apply_gate", None)
        if apply_gate is not None and getattr(apply_gate, "__name__", "") != "_default_apply_gate":
            odd.append("its own _apply_gate")
        if odd:
            raise TypeError(f"lxt: MoEExperts supports experts computing act(gate) * up with "
                            f"concatenated, untransposed weights and no bias; {name} has "
                            f"{', '.join(odd)}.")
        new = _adopt(cls, module, (nn.Module,), num_experts=int(module.gate_up_proj.shape[0]),
                     cp=cp, epsilon=epsilon)
        new.act_fn = module.act_fn
        return new

    def fake_forward(self, hidden_states, top_k_index, top_k_weights):
        # shape propagation under TorchDynamo: the routing depends on the data
        return hidden_states.clone()

    def lrp_forward(self, hidden_states, top_k_index, top_k_weights):
        eps = self.epsilon
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
        weights = top_k_weights.detach() if self.cp else top_k_weights
        for e in hit:
            if e == self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            gate, up = lf.linear_epsilon(hidden_states[tok], self.gate_up_proj[e], epsilon=eps).chunk(2, dim=-1)
            act = lf.identity(self.act_fn, gate)
            h = lf.mul2(act.detach() if self.cp else act, up)
            y = lf.linear_epsilon(h, self.down_proj[e], epsilon=eps)
            y = lf.mul2(y, weights[tok, pos, None]).to(out.dtype)
            # the sum over experts: epsilon rule on each accumulation (same kernel and order
            # as the in-place index_add_ of transformers, so the forward is bit-identical)
            out = lf.index_add(out, 0, tok, y, epsilon=eps)
        return out

    def extra_repr(self):
        return f"num_experts={self.num_experts}, cp={self.cp}"
def _additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = may not attend) as an additive float mask (``-inf`` there), as
    ``nn.MultiheadAttention`` converts it; a float mask as given."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"lxt: MultiheadAttention masks are boolean or float, got {mask.dtype}.")
    return mask


class MultiheadAttention(LxtModule, nn.MultiheadAttention):
    r"""``nn.MultiheadAttention`` with AttnLRP (or CP-LRP) attention.

    The forward is ``nn.MultiheadAttention``'s (same arguments, same outputs to float
    round-off); the rules are the epsilon rule (AttnLRP Eq. 8, :func:`lxt.functional.linear_epsilon`)
    on the in- and out-projections, and :func:`lxt.functional.scaled_dot_product_attention`
    (AttnLRP: matmul Prop. 3.3 -> softmax Prop. 3.1 -> matmul Prop. 3.3) or, with ``cp=True``,
    :func:`lxt.functional.scaled_dot_product_attention_cp` (CP-LRP, Ali et al. 2022: the
    attention weights are constants, relevance flows through the values only) on the
    attention.  torch's fused inference path (``torch._native_multi_head_attention``) is never
    taken: the attention always runs through the rule.

    Build it with :meth:`from_module`; it shares (does not copy) the original's parameters and
    its ``out_proj`` module.  Supported: ``batch_first`` both ways, unbatched inputs, packed
    (``in_proj_weight``) and separate (``kdim`` / ``vdim``) projection weights, biases,
    ``add_bias_kv`` and ``add_zero_attn`` (their keys and values are constants: their share
    of relevance is absorbed like a bias's), ``key_padding_mask`` and ``attn_mask`` (boolean
    or float), ``is_causal``.  Dropout only in eval mode (or with ``dropout=0``).

    ``need_weights=True`` returns the attention weights too, computed the plain way and
    detached: they are not on the relevance path (nothing that uses them receives relevance
    through them).

    Parameters
    ----------
    cp : bool
        CP-LRP attention instead of AttnLRP.
    epsilon : float
        Stabiliser of the projections and the attention rule, default :data:`lxt.rules.EPSILON`.
    """

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention, cp: bool = False,
                    epsilon: Optional[float] = None) -> "MultiheadAttention":
        """Share ``module``'s parameters (and its ``out_proj``)."""
        _check(cls, module, (nn.MultiheadAttention,))
        attrs = {k: getattr(module, k) for k in (
            "embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout",
            "batch_first", "head_dim", "add_zero_attn")}
        new = _adopt(cls, module, (nn.MultiheadAttention,), cp=bool(cp),
                     epsilon=EPSILON if epsilon is None else float(epsilon), **attrs)
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                     "in_proj_bias", "bias_k", "bias_v"):
            if name not in new._parameters:
                new.register_parameter(name, None)
        new.out_proj = module.out_proj
        return new

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}, cp={self.cp}, epsilon={self.epsilon}")

    def lrp_forward(self, query: Tensor, key: Tensor, value: Tensor,
                    key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                    attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                    is_causal: bool = False):
        if self.training and self.dropout > 0:
            raise RuntimeError(
                f"lxt: MultiheadAttention with dropout={self.dropout} in training mode: its "
                "random attention dropout has no LRP rule here. Call model.eval() first.")
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"lxt: MultiheadAttention takes 2-D (unbatched) or 3-D query, key and value, got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}.")
        if is_causal and attn_mask is None:
            raise RuntimeError("lxt: MultiheadAttention(is_causal=True) needs the causal mask as "
                               "attn_mask too (as nn.MultiheadAttention does).")
        batched = query.dim() == 3
        q_in, k_in, v_in = query, key, value
        if not batched:
            q_in, k_in, v_in = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            q_in, k_in, v_in = (t.transpose(0, 1) for t in (query, key, value))
        if query is key and key is value:  # self-attention: one packed projection, as torch
            q_in = k_in = v_in
        q, k, v = self._project(q_in, k_in, v_in)
        n, tgt, _ = q.shape
        h, d = self.num_heads, self.head_dim
        mask, causal = self._mask(attn_mask, key_padding_mask, need_weights, is_causal, n, tgt,
                                  k.shape[1], q.dtype)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1)], dim=1)
        q, k, v = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = torch.zeros((n, h, 1, d), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        attention = lf.scaled_dot_product_attention_cp if self.cp else lf.scaled_dot_product_attention
        out = attention(q, k, v, attn_mask=mask, is_causal=causal, epsilon=self.epsilon)
        out = out.transpose(1, 2).flatten(-2)
        out = lf.linear_epsilon(out, self.out_proj.weight, self.out_proj.bias, self.epsilon)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = self._weights(q, k, mask, average_attn_weights, batched)
        return out, weights

    def _project(self, query, key, value):
        """q, k, v projections, each ``(batch, seq, embed_dim)`` (epsilon rule)."""
        eps, b = self.epsilon, self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if not self._qkv_same_embed_dim:
            return (lf.linear_epsilon(query, self.q_proj_weight, bq, eps),
                    lf.linear_epsilon(key, self.k_proj_weight, bk, eps),
                    lf.linear_epsilon(value, self.v_proj_weight, bv, eps))
        if query is key and key is value:
            return lf.linear_epsilon(query, self.in_proj_weight, b, eps).chunk(3, dim=-1)
        wq, wk, wv = self.in_proj_weight.chunk(3)
        return (lf.linear_epsilon(query, wq, bq, eps), lf.linear_epsilon(key, wk, bk, eps),
                lf.linear_epsilon(value, wv, bv, eps))

    def _mask(self, attn_mask, key_padding_mask, need_weights, is_causal, n, tgt, src, dtype):
        """The additive mask ``(n or 1, heads or 1, tgt, src')`` for the attention (``src'``
        counts the bias / zero keys), and whether the attention is causal instead."""
        if is_causal and key_padding_mask is None and not need_weights:
            return None, True  # torch hands the causal hint to its attention
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)
        mask = None
        if attn_mask is not None:
            mask = _additive_mask(attn_mask, dtype)
            if mask.dim() == 2:
                if mask.shape != (tgt, src):
                    raise ValueError(f"lxt: the 2-D attn_mask is {tuple(mask.shape)}, but should be "
                                     f"{(tgt, src)}.")
                mask = mask.view(1, 1, tgt, src)
            elif mask.dim() == 3:
                expected = (n * self.num_heads, tgt, src)
                if mask.shape != expected:
                    raise ValueError(f"lxt: the 3-D attn_mask is {tuple(mask.shape)}, but should be "
                                     f"{expected} (batch * heads, target, source).")
                mask = mask.view(n, self.num_heads, tgt, src)
            else:
                raise ValueError(f"lxt: attn_mask must be 2-D or 3-D, got {mask.dim()}-D.")
            if extra:
                mask = torch.nn.functional.pad(mask, (0, extra))
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (n, src):
                raise ValueError(f"lxt: key_padding_mask is {tuple(key_padding_mask.shape)}, but "
                                 f"should be {(n, src)} (batch, source).")
            pad = _additive_mask(key_padding_mask, dtype)
            if extra:
                pad = torch.nn.functional.pad(pad, (0, extra))
            pad = pad.view(n, 1, 1, src + extra)
            mask = pad if mask is None else mask + pad
        return mask, False

    @torch.no_grad()
    def _weights(self, q, k, mask, average, batched):
        """The attention weights ``softmax(q k^T / sqrt(d) + mask)`` (plain, detached)."""
        scores = (q * (1.0 / self.head_dim) ** 0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(-1)
        if average:
            weights = weights.mean(dim=1)
        return weights if batched else weights.squeeze(0)
