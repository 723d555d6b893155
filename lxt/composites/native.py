"""Entries for torch-native attention, shared by the tables of models built from torch modules
(torchvision, OpenCLIP, hand-written models): ``nn.MultiheadAttention`` (replaced by
:class:`lxt.modules.MultiheadAttention`) and ``F.scaled_dot_product_attention`` /
eager ``matmul -> softmax -> matmul`` calls.

>>> table = {**native.attention_entries(cp=False), nn.Linear: EpsilonRule, ...}
"""
from __future__ import annotations

from torch import nn

from .. import modules as lm
from ._common import attention_calls


def multihead_attention(cp: bool = False, epsilon=None):
    """Layer-map value for ``nn.MultiheadAttention``: a factory ``module ->``
    :class:`lxt.modules.MultiheadAttention` (parameters shared) with AttnLRP attention, or
    CP-LRP attention with ``cp=True``; ``epsilon`` sets the stabiliser of its projections and
    attention rule."""

    def factory(module: nn.MultiheadAttention) -> lm.MultiheadAttention:
        return lm.MultiheadAttention.from_module(module, cp=cp, epsilon=epsilon)

    name = "MultiheadAttention[" + ("cp-lrp" if cp else "attnlrp")
    name += "]" if epsilon is None else f", epsilon={epsilon:g}]"
    factory.__name__ = factory.__qualname__ = name
    return factory


def attention_entries(cp: bool = False, epsilon=None) -> dict:
    """``nn.MultiheadAttention`` modules and attention calls (fused sdpa, eager softmax and
    matmul) with AttnLRP, or CP-LRP with ``cp=True``."""
    return {nn.MultiheadAttention: multihead_attention(cp, epsilon), **attention_calls(cp, epsilon)}


__all__ = ["multihead_attention", "attention_entries"]
