"""Per-architecture composites: ``llama``, ``bert``, ``vit`` (AttnLRP and CP-LRP each).

>>> from lxt.composites import llama
>>> comp = llama.attnlrp()
>>> comp = lxt.composites.attnlrp(model)     # picks the table from model.config.model_type
"""
from __future__ import annotations

from . import bert, llama, vit

#: model_type -> table module
REGISTRY = {
    "llama": llama,
    "mistral": llama,
    "qwen2": llama,
    "bert": bert,
    "vit": vit,
}


def _family(model):
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in REGISTRY:
        supported = ", ".join(sorted(REGISTRY))
        raise ValueError(
            f"lxt: no composite for model_type {model_type!r}. Supported: {supported}. For another "
            "architecture pass a layer map yourself, e.g. lxt.Composite({nn.Linear: "
            "lxt.rules.EpsilonRule, operator.add: lxt.functional.add2, "
            "F.scaled_dot_product_attention: lxt.functional.scaled_dot_product_attention, ...})."
        )
    return REGISTRY[model_type], model_type


def attnlrp(model, overrides=None, **kwargs):
    """The AttnLRP composite for ``model`` (chosen by ``model.config.model_type``)."""
    family, model_type = _family(model)
    return family.attnlrp(overrides, model_type=model_type, **kwargs)


def cp_lrp(model, overrides=None, **kwargs):
    """The CP-LRP composite for ``model`` (chosen by ``model.config.model_type``)."""
    family, model_type = _family(model)
    return family.cp_lrp(overrides, model_type=model_type, **kwargs)


__all__ = ["attnlrp", "cp_lrp", "llama", "bert", "vit", "REGISTRY"]
