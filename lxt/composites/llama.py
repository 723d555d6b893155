"""Llama-family tables (Llama, Mistral, Qwen2): AttnLRP and CP-LRP.

AttnLRP: epsilon on linear layers, identity on RMSNorm and SiLU, uniform on the gate * up
product, epsilon on residual adds and the rotary-embedding sum (cos / sin are constants:
identity through the products), AttnLRP attention (sdpa and eager, grouped-query included).
CP-LRP: the same, with q and k detached in attention and the gate branch detached in the MLP.
"""
from __future__ import annotations

import importlib
import operator

import torch.nn.functional as F
from torch import nn

from .. import functional as lf
from ..core.composite import Composite
from ..rules import IdentityRule
from ._common import rms_norm_module, arithmetic, attention_calls, epsilon_rule, gate_detached_mul

#: model_type -> (module path, RMSNorm class, MLP class)
FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "LlamaMLP"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", "MistralMLP"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "Qwen2MLP"),
}


def _classes(model_type: str):
    path, norm, mlp = FAMILIES[model_type]
    mod = importlib.import_module(path)
    return getattr(mod, norm), getattr(mod, mlp)


def layer_map(cp: bool = False, model_type: str = "llama", epsilon=None) -> dict:
    """The table (a dict, first match wins) for one model type of the family; ``epsilon``
    sets the stabiliser of every epsilon-family rule (default :data:`lxt.rules.EPSILON`)."""
    norm, mlp = _classes(model_type)
    table = {
        nn.Linear: epsilon_rule(epsilon),
        norm: rms_norm_module,
        nn.SiLU: IdentityRule,
        F.silu: lf.silu,
    }
    if cp:
        table[(mlp, operator.mul)] = gate_detached_mul
    table.update(attention_calls(cp, epsilon))
    table.update(arithmetic(epsilon))
    return table


def attnlrp(overrides=None, model_type: str = "llama", epsilon=None, engine: str = "gradient",
           **kwargs) -> Composite:
    """A fresh AttnLRP composite for Llama-family models (``LlamaForCausalLM``,
    ``LlamaModel``, ``LlamaForSequenceClassification``; Mistral and Qwen2 with ``model_type``).
    ``overrides`` are per-layer maps applied on top of the table."""
    return Composite(layer_map(False, model_type, epsilon), overrides, engine=engine, epsilon=epsilon, name=f"AttnLRP[{model_type}]", method="attnlrp",
                     **kwargs)


def cp_lrp(overrides=None, model_type: str = "llama", epsilon=None, engine: str = "gradient",
           **kwargs) -> Composite:
    """A fresh CP-LRP composite for Llama-family models."""
    return Composite(layer_map(True, model_type, epsilon), overrides, engine=engine, epsilon=epsilon, name=f"CP-LRP[{model_type}]", method="cp-lrp",
                     **kwargs)
