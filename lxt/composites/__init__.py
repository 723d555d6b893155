"""The AttnLRP and CP-LRP composites of every architecture lxt knows, from one data table.

>>> comp = lxt.composites.attnlrp(model)              # the table of model.config.model_type
>>> comp = lxt.composites.cp_lrp(family="llama", epsilon=1e-6, engine="explicit")
>>> table = lxt.composites.layer_map("bert", "attnlrp")  # the dict itself, to edit

The rows are :data:`FAMILIES` (:mod:`lxt.composites.table`, which says why each rule
conserves).  A model whose ``model_type`` no row names gets the structural table, read off the
modules it holds (:mod:`lxt.composites.structural`), with a one-line notice; that composite is
strict: its first forward refuses operations it cannot cover.
"""
from __future__ import annotations

import sys
import warnings

from ..core.composite import Composite
from .table import CONV_GAMMA, FAMILIES, MLP_GAMMA, Family, layer_map, part_families

__all__ = ["attnlrp", "cp_lrp", "layer_map", "family_of", "FAMILIES", "Family", "CONV_GAMMA", "MLP_GAMMA"]

_LABELS = {"attnlrp": ("AttnLRP", "attnlrp"), "cp_lrp": ("CP-LRP", "cp-lrp")}


def family_of(model) -> tuple:
    """``(row key, model_type)``: the row of :data:`FAMILIES` that explains ``model``
    (``"structural"`` where none names it)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    tv = sys.modules.get("torchvision.models.vision_transformer")  # imported if model is one
    if model_type is None and tv is not None and isinstance(model, tv.VisionTransformer):
        return "torchvision-vit", "torchvision-vit"
    if model_type in FAMILIES and model_type not in ("structural", "torch"):
        return model_type, model_type
    return "structural", model_type


def _build(method, model, family, overrides, epsilon, engine, conv_gamma, mlp_gamma, strict, kwargs):
    if family is None and model is None:
        raise ValueError(f"lxt: composites.{method}() needs the model, or the table's family= "
                         f"(one of {', '.join(FAMILIES)}).")
    if family is None:
        family, model_type = family_of(model)
        if family == "structural":
            what = f"model_type {model_type!r}" if model_type else f"{type(model).__name__} (no config.model_type)"
            warnings.warn(f"lxt: no table for {what}; using the structural table built from the model's layers "
                          f"(it refuses, at the first forward, operations it cannot cover). Tables: "
                          f"{', '.join(sorted(k for k in FAMILIES if k not in ('structural', 'torch')))}.",
                          UserWarning, stacklevel=3)
    label = family
    if family == "structural" and model is not None:
        label = f"structural: {family_of(model)[1] or type(model).__name__}"
    table = layer_map(family, method, epsilon, model=model, conv_gamma=conv_gamma, mlp_gamma=mlp_gamma)
    parts = part_families(family, model)
    if parts:  # a VLM: its language model's and vision tower's rows
        label = f"{family}: {' + '.join(key for _, key in parts)}"
    if strict is None:
        strict = FAMILIES[family].strict or any(key == "structural" for _, key in parts)
    name, tag = _LABELS[method]
    return Composite(table, overrides, engine=engine, epsilon=epsilon, name=f"{name}[{label}]", method=tag,
                     strict=strict, **kwargs)


def attnlrp(model=None, *, family: str = None, overrides=None, epsilon: float = None, engine: str = "gradient",
            conv_gamma: float = CONV_GAMMA, mlp_gamma: float = MLP_GAMMA, strict: bool = None,
            **kwargs) -> Composite:
    """A fresh AttnLRP composite for ``model`` (its table chosen by ``model.config.model_type``),
    or for the row ``family`` of :data:`FAMILIES`.

    ``overrides``: per-layer maps applied before the table (``{"model.layers.0.*": {...}}``);
    ``epsilon``: the stabiliser of every epsilon-family rule; ``engine``: ``"gradient"`` or
    ``"explicit"``; ``conv_gamma`` / ``mlp_gamma``: the ViT gamma rule; ``strict`` (default:
    the row's) refuses operations without a rule; other keywords go to :class:`lxt.Composite`."""
    return _build("attnlrp", model, family, overrides, epsilon, engine, conv_gamma, mlp_gamma, strict, kwargs)


def cp_lrp(model=None, *, family: str = None, overrides=None, epsilon: float = None, engine: str = "gradient",
           conv_gamma: float = CONV_GAMMA, mlp_gamma: float = MLP_GAMMA, strict: bool = None,
           **kwargs) -> Composite:
    """A fresh CP-LRP composite (the keywords of :func:`attnlrp`)."""
    return _build("cp_lrp", model, family, overrides, epsilon, engine, conv_gamma, mlp_gamma, strict, kwargs)
