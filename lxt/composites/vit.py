"""ViT tables: AttnLRP and CP-LRP.

Relevance reaches ``pixel_values`` through the patch-embedding convolution.  Following the
AttnLRP paper's appendix on noise in ViTs, the gamma rule is applied to the patch convolution
and to the two MLP linears of every block (which favours positive contributions and gives less
noisy heatmaps); every other linear layer gets the epsilon rule.  The gammas are parameters:
``vit.attnlrp(conv_gamma=..., mlp_gamma=...)``, or per layer through ``overrides``.  LayerNorm
rule, identity on GELU, AttnLRP (or CP-LRP) attention.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .. import functional as lf
from .. import modules as lm
from ..core.composite import Composite
from ..rules import GammaRule
from ._common import arithmetic, attention_calls, epsilon_rule, layer_norm_module, with_epsilon

#: defaults of the gamma rule (see module docstring)
CONV_GAMMA = 0.25
MLP_GAMMA = 0.05


#: model_type -> (modeling module, class-name prefix)
FAMILIES = {"vit": ("transformers.models.vit.modeling_vit", "ViT"),
            "deit": ("transformers.models.deit.modeling_deit", "DeiT")}


def _mlp_classes(model_type: str = "vit") -> tuple:
    """The MLP block classes of the installed transformers (``ViTMLP`` in 5.x;
    ``ViTIntermediate`` / ``ViTOutput`` in 4.x; the same for DeiT)."""
    import importlib

    if model_type not in FAMILIES:
        raise ValueError(f"lxt: no ViT table for model_type {model_type!r}; known: {', '.join(FAMILIES)}.")
    path, prefix = FAMILIES[model_type]
    mv = importlib.import_module(path)
    names = (f"{prefix}MLP", f"{prefix}Intermediate", f"{prefix}Output")
    return tuple(getattr(mv, n) for n in names if hasattr(mv, n))


def layer_map(cp: bool = False, model_type: str = "vit", conv_gamma: float = CONV_GAMMA,
              mlp_gamma: float = MLP_GAMMA, epsilon=None) -> dict:
    """The table (first match wins); the gammas and ``epsilon`` are parameters."""
    eps = {} if epsilon is None else {"epsilon": epsilon}
    table = {nn.Conv2d: GammaRule(gamma=conv_gamma, **eps)}
    for mlp in _mlp_classes(model_type):
        table[(mlp, nn.Linear)] = GammaRule(gamma=mlp_gamma, **eps)
    table.update({
        nn.Linear: epsilon_rule(epsilon),
        nn.LayerNorm: layer_norm_module(epsilon),
        nn.GELU: lm.GELUIdentity,
        F.layer_norm: with_epsilon(lf.layer_norm, epsilon),
        F.gelu: lf.gelu,
    })
    table.update(attention_calls(cp, epsilon))
    table.update(arithmetic(epsilon))
    return table


def attnlrp(overrides=None, model_type: str = "vit", conv_gamma: float = CONV_GAMMA,
            mlp_gamma: float = MLP_GAMMA, epsilon=None, engine: str = "gradient",
           **kwargs) -> Composite:
    """A fresh AttnLRP composite for ``ViTForImageClassification`` / ``ViTModel`` (and DeiT's
    classes with ``model_type="deit"``)."""
    return Composite(layer_map(False, model_type, conv_gamma=conv_gamma, mlp_gamma=mlp_gamma, epsilon=epsilon),
                     overrides, engine=engine, epsilon=epsilon, name=f"AttnLRP[{model_type}]", method="attnlrp", **kwargs)


def cp_lrp(overrides=None, model_type: str = "vit", conv_gamma: float = CONV_GAMMA,
           mlp_gamma: float = MLP_GAMMA, epsilon=None, engine: str = "gradient",
           **kwargs) -> Composite:
    """A fresh CP-LRP composite for ViT."""
    return Composite(layer_map(True, model_type, conv_gamma=conv_gamma, mlp_gamma=mlp_gamma, epsilon=epsilon),
                     overrides, engine=engine, epsilon=epsilon, name=f"CP-LRP[{model_type}]", method="cp-lrp", **kwargs)
