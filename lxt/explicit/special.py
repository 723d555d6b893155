"""The published lxt 2.1 ``lxt.explicit.special``: CP-LRP multi-head attention.

:func:`multi_head_attention_cp` is ``nn.MultiheadAttention``'s forward with the CP-LRP rule
(Ali et al., 2022; AttnLRP appendix A.2.3) in the published signature: the attention weights
are constants, relevance reaches the inputs only through the value projection, and the value
and output projections are modules a layer map can give rules to.  The attention itself is
:func:`lxt.functional.scaled_dot_product_attention_cp`, and masks are converted as
:class:`lxt.modules.MultiheadAttention` (``cp=True``: the same attention as one module) does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as _lf
from ..modules import _additive_mask

__all__ = ["multi_head_attention_cp"]


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = not allowed) as an additive float mask; float masks as given (the
    converter of :class:`lxt.modules.MultiheadAttention`)."""
    return _additive_mask(mask, dtype).to(dtype)


@torch.no_grad()
def _prepare_key_padding_mask(mask: Tensor, attn_mask, query: Tensor) -> Tensor:
    """``key_padding_mask`` ``(batch, keys)`` as an additive mask ``(batch, 1, 1, keys)``."""
    if mask.dim() != 2:
        raise ValueError(f"lxt: key_padding_mask must be (batch, keys), got {tuple(mask.shape)}.")
    return _additive(mask, query.dtype)[:, None, None, :]


@torch.no_grad()
def _prepare_attn_mask(mask: Tensor, query: Tensor) -> Tensor:
    """``attn_mask`` ``(queries, keys)`` or ``(batch * heads, queries, keys)`` as an additive
    mask that broadcasts against ``(batch, heads, queries, keys)``; ``query`` is
    ``(batch, heads, queries, head_dim)``."""
    if mask.dim() == 3:
        b, h = query.shape[:2]
        mask = mask.view(b, h, *mask.shape[-2:])
    elif mask.dim() != 2:
        raise ValueError("lxt: attn_mask must be (queries, keys) or (batch * heads, queries, keys), "
                         f"got {tuple(mask.shape)}.")
    return _additive(mask, query.dtype)


def multi_head_attention_cp(query, key, value, batch_first, num_heads, head_dim, q_proj_weight,
                            bias_q, k_proj_weight, bias_k, v_proj, out_proj,
                            key_padding_mask=None, need_weights=True, attn_mask=None,
                            average_attn_weights=True):
    """Multi-head attention with the CP-LRP rule (published signature).

    Parameters
    ----------
    query, key, value : Tensor
        ``(batch, seq, embed)`` if ``batch_first`` else ``(seq, batch, embed)``; only
        ``value`` receives relevance.
    batch_first : bool
    num_heads, head_dim : int
    q_proj_weight, bias_q, k_proj_weight, bias_k : Tensor or None
        Query and key projections (constants: no relevance flows through them).
    v_proj, out_proj : callable
        Value and output projections (modules that may carry a rule).
    key_padding_mask, attn_mask : Tensor, optional
        As for ``nn.MultiheadAttention`` (boolean True = not allowed, or additive float).
    need_weights, average_attn_weights : bool
        Return the attention weights (averaged over heads).

    Returns
    -------
    (Tensor, Tensor or None)
        The output and the attention weights (or ``None``).
    """
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    batch, n_q, embed = query.shape
    n_k = value.shape[1]
    with torch.no_grad():
        q = F.linear(query, q_proj_weight, bias_q)
        k = F.linear(key, k_proj_weight, bias_k)
    v = v_proj(value)
    q = q.view(batch, n_q, num_heads, head_dim).transpose(1, 2)
    k = k.view(batch, n_k, num_heads, head_dim).transpose(1, 2)
    v = v.view(batch, n_k, num_heads, head_dim).transpose(1, 2)
    mask = None
    if key_padding_mask is not None:
        mask = _prepare_key_padding_mask(key_padding_mask, attn_mask, q)
    if attn_mask is not None:
        extra = _prepare_attn_mask(attn_mask, q)
        mask = extra if mask is None else mask + extra
    out = _lf.scaled_dot_product_attention_cp(q, k, v, attn_mask=mask)
    out = out_proj(out.transpose(1, 2).reshape(batch, n_q, embed))
    if not batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    with torch.no_grad():
        logits = q @ k.transpose(-2, -1) * head_dim ** -0.5
        weights = torch.softmax(logits if mask is None else logits + mask, -1)
    return out, weights.mean(dim=1) if average_attn_weights else weights
