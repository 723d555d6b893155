"""The published lxt 2.1 modules (``lxt.explicit.modules``), as adapters onto :mod:`lxt.modules`.

``LinearEpsilon``, ``RMSNormIdentity`` and ``LayerNormEpsilon`` are the :mod:`lxt.modules`
classes themselves (same constructors as published); ``SoftmaxDT`` adds the published
``dtype`` / ``temperature`` / ``inplace`` arguments.  ``INIT_MODULE_MAPPING[cls](original,
cls)`` builds ``cls`` from the module it replaces, sharing its parameters, as
``cls.from_module(original)`` does.

``MultiheadAttention_CP`` replaces ``nn.MultiheadAttention`` with CP-LRP attention (AttnLRP
appendix A.2.3, "Tackling noise in Vision Transformers"): relevance flows through the values
only, see :func:`lxt.explicit.special.multi_head_attention_cp`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import modules as _lm
from . import functional as _ef
from . import special as _special

__all__ = [
    "SoftmaxDT",
    "LinearEpsilon",
    "RMSNormIdentity",
    "LayerNormEpsilon",
    "LinearInProjection",
    "LinearOutProjection",
    "MultiheadAttention_CP",
    "INIT_MODULE_MAPPING",
]

LinearEpsilon = _lm.LinearEpsilon
RMSNormIdentity = _lm.RMSNormIdentity
LayerNormEpsilon = _lm.LayerNormEpsilon


class SoftmaxDT(_lm.SoftmaxDT):
    """``nn.Softmax`` with deep Taylor decomposition with bias (AttnLRP Prop. 3.1), with the
    published constructor ``SoftmaxDT(dim, dtype=None, temperature=1.0, inplace=False)``; see
    :func:`lxt.explicit.functional.softmax`."""

    def __init__(self, dim: int, dtype: Optional[torch.dtype] = None, temperature: float = 1.0,
                 inplace: bool = False, **kwargs):
        super().__init__(dim)
        self.dtype, self.temperature, self.inplace = dtype, temperature, inplace

    @classmethod
    def from_module(cls, module: nn.Softmax) -> "SoftmaxDT":
        new = super().from_module(module)
        new.dtype, new.temperature, new.inplace = None, 1.0, False
        return new

    def lrp_forward(self, input):
        return _ef.softmax(input, self.dim, self.dtype, self.temperature, self.inplace)


class _Projection(nn.Module):
    """``F.linear`` with weights shared with another module (a target for layer-map rules)."""

    def __init__(self, weight: Optional[Tensor], bias: Optional[Tensor]):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class LinearInProjection(_Projection):
    """The value projection of :class:`MultiheadAttention_CP` (attach a rule to it)."""


class LinearOutProjection(_Projection):
    """The output projection of :class:`MultiheadAttention_CP` (attach a rule to it)."""


class MultiheadAttention_CP(nn.Module):
    """``nn.MultiheadAttention`` with CP-LRP: the attention weights are constants and
    relevance flows only through the value path (Ali et al., 2022; AttnLRP appendix A.2.3).

    Build it with :meth:`from_module` (published: ``INIT_MODULE_MAPPING[MultiheadAttention_CP]``);
    the projections share the original's weights.  Attach rules to :class:`LinearInProjection`
    (values) and :class:`LinearOutProjection`, e.g. with
    ``Composite({LinearInProjection: EpsilonRule, LinearOutProjection: EpsilonRule})``.
    """

    def __init__(self):
        super().__init__()
        self.q_proj_weight = self.k_proj_weight = self.bias_q = self.bias_k = None
        self.v_proj = LinearInProjection(None, None)
        self.out_proj = LinearOutProjection(None, None)
        self.embed_dim = self.num_heads = self.head_dim = self.batch_first = None

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention) -> "MultiheadAttention_CP":
        """Share ``module``'s projection weights (query / key / value slices are views)."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"lxt: MultiheadAttention_CP.from_module needs a MultiheadAttention, "
                            f"got {type(module).__name__}.")
        if module.bias_k is not None:
            raise NotImplementedError("lxt: MultiheadAttention_CP does not support add_bias_kv=True.")
        if module.add_zero_attn:
            raise NotImplementedError("lxt: MultiheadAttention_CP does not support add_zero_attn=True.")
        e = module.embed_dim
        new = cls()
        if module._qkv_same_embed_dim:
            w = module.in_proj_weight.detach()
            wq, wk, wv = w[:e], w[e:2 * e], w[2 * e:]
        else:
            wq, wk, wv = (module.q_proj_weight.detach(), module.k_proj_weight.detach(),
                          module.v_proj_weight.detach())
        bq = bk = bv = None
        if module.in_proj_bias is not None:
            b = module.in_proj_bias.detach()
            bq, bk, bv = b[:e], b[e:2 * e], b[2 * e:]
        new.q_proj_weight, new.k_proj_weight, new.bias_q, new.bias_k = wq, wk, bq, bk
        new.v_proj.weight, new.v_proj.bias = wv, bv
        new.out_proj.weight, new.out_proj.bias = module.out_proj.weight, module.out_proj.bias
        new.embed_dim, new.num_heads = e, module.num_heads
        new.head_dim, new.batch_first = module.head_dim, module.batch_first
        new.train(module.training)
        return new

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if is_causal:
            raise ValueError("lxt: MultiheadAttention_CP does not take is_causal; pass the "
                             "causal mask as attn_mask.")
        return _special.multi_head_attention_cp(
            query, key, value, self.batch_first, self.num_heads, self.head_dim,
            self.q_proj_weight, self.bias_q, self.k_proj_weight, self.bias_k, self.v_proj,
            self.out_proj, key_padding_mask, need_weights, attn_mask, average_attn_weights)


def _from_module(original: nn.Module, replacement: type) -> nn.Module:
    """``replacement`` built from ``original`` (parameters shared): ``replacement.from_module``."""
    return replacement.from_module(original)


#: Published: ``INIT_MODULE_MAPPING[cls](original, cls)`` builds ``cls`` from ``original``.
INIT_MODULE_MAPPING = {
    SoftmaxDT: _from_module,
    LinearEpsilon: _from_module,
    RMSNormIdentity: _from_module,
    LayerNormEpsilon: _from_module,
    MultiheadAttention_CP: _from_module,
}
