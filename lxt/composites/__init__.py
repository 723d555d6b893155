"""Per-architecture composites (AttnLRP and CP-LRP each), and a structural fallback.

>>> from lxt.composites import llama
>>> comp = llama.attnlrp()
>>> comp = lxt.composites.attnlrp(model)     # picks the table from model.config.model_type

``lxt.composites.attnlrp(model)`` on a model whose ``model_type`` no table names builds the
structural table from what the model holds (:mod:`lxt.composites.structural`), with a one-line
notice; that composite is strict: its first forward refuses operations it cannot cover.
"""
from __future__ import annotations

import warnings

from . import bert, gpt2, llama, structural, vit

#: model_type -> table module
REGISTRY = {
    **{model_type: llama for model_type in llama.FAMILIES},
    "gpt2": gpt2,
    "bert": bert,
    "roberta": bert,
    "distilbert": bert,
    "vit": vit,
    "deit": vit,
}


def model_type_of(model):
    return getattr(getattr(model, "config", None), "model_type", None)


def _torchvision_vit(model) -> bool:
    import sys

    tv = sys.modules.get("torchvision.models.vision_transformer")  # imported if model is one
    return tv is not None and isinstance(model, tv.VisionTransformer)


def _family(model):
    model_type = model_type_of(model)
    if model_type is None and _torchvision_vit(model):
        from . import torchvision_vit

        return torchvision_vit, "torchvision-vit"
    return REGISTRY.get(model_type), model_type


def _structural(model, method, overrides, kwargs):
    model_type = model_type_of(model)
    what = f"model_type {model_type!r}" if model_type else f"{type(model).__name__} (no config.model_type)"
    warnings.warn(
        f"lxt: no table for {what}; using the structural table built from the model's layers "
        f"(it refuses, at the first forward, operations it cannot cover). Tables: "
        f"{', '.join(sorted(REGISTRY))}.", UserWarning, stacklevel=3)
    return getattr(structural, method)(model, overrides, **kwargs)


def attnlrp(model, overrides=None, **kwargs):
    """The AttnLRP composite for ``model`` (chosen by ``model.config.model_type``; the
    structural table for any other model)."""
    family, model_type = _family(model)
    if family is None:
        return _structural(model, "attnlrp", overrides, kwargs)
    return family.attnlrp(overrides, model_type=model_type, **kwargs)


def cp_lrp(model, overrides=None, **kwargs):
    """The CP-LRP composite for ``model`` (chosen by ``model.config.model_type``; the
    structural table for any other model)."""
    family, model_type = _family(model)
    if family is None:
        return _structural(model, "cp_lrp", overrides, kwargs)
    return family.cp_lrp(overrides, model_type=model_type, **kwargs)


__all__ = ["attnlrp", "cp_lrp", "llama", "bert", "gpt2", "vit", "structural", "REGISTRY"]
