"""torchvision ``VisionTransformer`` tables (``vit_b_16`` and friends): AttnLRP and CP-LRP.

The rules of the HuggingFace ViT table (:mod:`lxt.composites.vit`) on torchvision's modules:
the gamma rule on the patch convolution (``conv_proj``) and on the two linears of every
``MLPBlock`` (AttnLRP paper appendix, noise in ViTs), the epsilon rule on every other linear
(``heads``), the LayerNorm rule, identity on GELU (and on the ``pre_logits`` tanh),
``nn.MultiheadAttention`` replaced by :class:`lxt.modules.MultiheadAttention` (epsilon on its
projections, AttnLRP or CP-LRP attention), epsilon on the residual sums and on the position
embedding sum (a constant: it absorbs its share, like a bias).  The class token is a
constant too; concatenating it, reshapes and indexing pass relevance unchanged.

torchvision itself is imported only when a table is built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as lf
from .. import modules as lm
from ..core.composite import Composite
from ..rules import GammaRule
from ._common import arithmetic, epsilon_rule, layer_norm_module, with_epsilon
from .native import attention_entries
from .vit import CONV_GAMMA, MLP_GAMMA


def _mlp_block():
    try:
        from torchvision.models.vision_transformer import MLPBlock
    except ImportError as err:  # pragma: no cover - only without torchvision
        raise ImportError("lxt: the torchvision ViT table needs torchvision (its MLPBlock class); "
                          f"import failed: {err}") from err
    return MLPBlock


def layer_map(cp: bool = False, epsilon=None, conv_gamma: float = CONV_GAMMA,
              mlp_gamma: float = MLP_GAMMA) -> dict:
    """The table (first match wins); the gammas and ``epsilon`` are parameters."""
    eps = {} if epsilon is None else {"epsilon": epsilon}
    table = {
        nn.Conv2d: GammaRule(gamma=conv_gamma, **eps),
        (_mlp_block(), nn.Linear): GammaRule(gamma=mlp_gamma, **eps),
        nn.Linear: epsilon_rule(epsilon),
        nn.LayerNorm: layer_norm_module(epsilon),
        nn.GELU: lm.GELUIdentity,
        nn.Tanh: lm.TanhIdentity,
        F.layer_norm: with_epsilon(lf.layer_norm, epsilon),
        F.gelu: lf.gelu,
        torch.tanh: lf.tanh,
    }
    table.update(attention_entries(cp, epsilon))
    table.update(arithmetic(epsilon))
    return table


def attnlrp(overrides=None, epsilon=None, engine: str = "gradient", conv_gamma: float = CONV_GAMMA,
            mlp_gamma: float = MLP_GAMMA, model_type: str = "torchvision-vit",
            **kwargs) -> Composite:
    """A fresh AttnLRP composite for torchvision's ``VisionTransformer`` (``model_type`` is
    accepted for the registry's calling convention and unused)."""
    return Composite(layer_map(False, epsilon, conv_gamma, mlp_gamma), overrides, engine=engine,
                     epsilon=epsilon, name="AttnLRP[torchvision-vit]", method="attnlrp", **kwargs)


def cp_lrp(overrides=None, epsilon=None, engine: str = "gradient", conv_gamma: float = CONV_GAMMA,
           mlp_gamma: float = MLP_GAMMA, model_type: str = "torchvision-vit",
           **kwargs) -> Composite:
    """A fresh CP-LRP composite for torchvision's ``VisionTransformer``."""
    return Composite(layer_map(True, epsilon, conv_gamma, mlp_gamma), overrides, engine=engine,
                     epsilon=epsilon, name="CP-LRP[torchvision-vit]", method="cp-lrp", **kwargs)


__all__ = ["layer_map", "attnlrp", "cp_lrp", "CONV_GAMMA", "MLP_GAMMA"]
