"""Decoder tables (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral, Phi-3, Gemma, Gemma 2,
Gemma 3): AttnLRP and CP-LRP.

AttnLRP: epsilon on linear layers, identity on RMSNorm (Qwen3's q / k norms included; Gemma's
``x / rms * (1 + w)`` keeps its own forward under the identity rule) and on the activations,
uniform on the gate * up product, epsilon on residual adds and the rotary-embedding sum (cos /
sin are constants: identity through the products), scaled embeddings and soft-capping (Gemma 2)
as constant scales with identity on tanh, AttnLRP attention (sdpa and eager, grouped-query and
sliding-window included).  Mixture-of-experts layers (Qwen3-MoE, Mixtral) run
:class:`lxt.modules.MoEExperts`: the routing weight times an expert's output is a product
(uniform, half of it through the router's softmax and linear layer).
CP-LRP: the same, with q and k detached in attention, the gate branch detached in the MLP and
the routing weights detached in MoE layers.
"""
from __future__ import annotations

import importlib
import operator
from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..core.composite import Composite
from ..rules import IdentityRule
from ._common import (activation_calls, arithmetic, attention_calls, detached_mul, epsilon_rule,
                      experts_module, identity_module, layer_norm_module, linear_calls,
                      python_activations, rms_norm_module)


@dataclass(frozen=True)
class Family:
    """Where a decoder family's classes live and how its blocks differ."""

    module: str  # transformers modeling module
    norm: str  # RMSNorm class
    mlp: Optional[str] = None  # gated MLP class (CP-LRP detaches its gate branch)
    gate_position: int = 0  # which factor of the MLP's product is the gate
    one_plus_weight: bool = False  # Gemma: x / rms * (1 + w)
    experts: Optional[str] = None  # MoE experts class (transformers 5 layout)
    vision: bool = False  # a vision tower too (LayerNorm, patch convolution, pooling, GELU)


_M = "transformers.models.{0}.modeling_{0}"

#: model_type -> family
FAMILIES = {
    "llama": Family(_M.format("llama"), "LlamaRMSNorm", "LlamaMLP"),
    "mistral": Family(_M.format("mistral"), "MistralRMSNorm", "MistralMLP"),
    "qwen2": Family(_M.format("qwen2"), "Qwen2RMSNorm", "Qwen2MLP"),
    "qwen3": Family(_M.format("qwen3"), "Qwen3RMSNorm", "Qwen3MLP"),
    "qwen3_moe": Family(_M.format("qwen3_moe"), "Qwen3MoeRMSNorm", "Qwen3MoeMLP",
                        experts="Qwen3MoeExperts"),
    "mixtral": Family(_M.format("mixtral"), "MixtralRMSNorm", experts="MixtralExperts"),
    # Phi-3: fused gate_up projection, ``up * act(gate)``
    "phi3": Family(_M.format("phi3"), "Phi3RMSNorm", "Phi3MLP", gate_position=1),
    "gemma": Family(_M.format("gemma"), "GemmaRMSNorm", "GemmaMLP", one_plus_weight=True),
    "gemma2": Family(_M.format("gemma2"), "Gemma2RMSNorm", "Gemma2MLP", one_plus_weight=True),
    "gemma3_text": Family(_M.format("gemma3"), "Gemma3RMSNorm", "Gemma3MLP", one_plus_weight=True),
    # Gemma 3 with its SigLIP vision tower and projector (Gemma3ForConditionalGeneration)
    "gemma3": Family(_M.format("gemma3"), "Gemma3RMSNorm", "Gemma3MLP", one_plus_weight=True,
                     vision=True),
}


def _class(family: Family, name: Optional[str], model_type: str):
    if name is None:
        return None
    mod = importlib.import_module(family.module)
    cls = getattr(mod, name, None)
    if cls is None:
        import transformers

        raise ValueError(f"lxt: the {model_type} table needs {name} from {family.module}, which "
                         f"transformers {transformers.__version__} does not have (the {model_type} "
                         "table is written for transformers 5).")
    return cls


def layer_map(cp: bool = False, model_type: str = "llama", epsilon=None) -> dict:
    """The table (a dict, first match wins) for one model type of the family; ``epsilon``
    sets the stabiliser of every epsilon-family rule (default :data:`lxt.rules.EPSILON`)."""
    if model_type not in FAMILIES:
        raise ValueError(f"lxt: no decoder table for model_type {model_type!r}; known: "
                         f"{', '.join(FAMILIES)}.")
    family = FAMILIES[model_type]
    norm = _class(family, family.norm, model_type)
    table = {
        nn.Linear: epsilon_rule(epsilon),
        norm: identity_module if family.one_plus_weight else rms_norm_module,
        nn.SiLU: IdentityRule,
    }
    if family.vision:
        table.update({nn.LayerNorm: layer_norm_module(epsilon), nn.Conv2d: epsilon_rule(epsilon),
                      nn.AvgPool2d: epsilon_rule(epsilon)})
        table.update({cls: identity_module for cls in python_activations()})
    if family.experts is not None:
        experts = _class(family, family.experts, model_type)
        table[experts] = experts_module(cp, epsilon)
    mlp = _class(family, family.mlp, model_type)
    if cp and mlp is not None:
        table[(mlp, operator.mul)] = detached_mul(family.gate_position)
    table.update(activation_calls())
    table.update(linear_calls(epsilon))
    table.update(attention_calls(cp, epsilon))
    table.update(arithmetic(epsilon))
    return table


def _name(method: str, model_type: str) -> str:
    return f"{method}[{model_type}]"


def attnlrp(overrides=None, model_type: str = "llama", epsilon=None, engine: str = "gradient",
            **kwargs) -> Composite:
    """A fresh AttnLRP composite for a decoder family (``*ForCausalLM``, ``*Model``,
    ``*ForSequenceClassification``; ``model_type`` names the family, see :data:`FAMILIES`).
    ``overrides`` are per-layer maps applied on top of the table."""
    return Composite(layer_map(False, model_type, epsilon), overrides, engine=engine, epsilon=epsilon,
                     name=_name("AttnLRP", model_type), method="attnlrp", **kwargs)


def cp_lrp(overrides=None, model_type: str = "llama", epsilon=None, engine: str = "gradient",
           **kwargs) -> Composite:
    """A fresh CP-LRP composite for a decoder family."""
    return Composite(layer_map(True, model_type, epsilon), overrides, engine=engine, epsilon=epsilon,
                     name=_name("CP-LRP", model_type), method="cp-lrp", **kwargs)
