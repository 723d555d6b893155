"""GPT-2 tables: AttnLRP and CP-LRP.

GPT-2's projections are ``Conv1D`` modules (an affine map computed with ``addmm``): the epsilon
rule, as every linear layer.  LayerNorm rule (identity on 1/std, epsilon on the centring),
identity on ``gelu_new`` (a tanh formula of x, kept as its own forward), AttnLRP (or CP-LRP)
attention in both implementations (the 1/sqrt(d) scaling is a constant), epsilon on the
residual and position-embedding sums.
"""
from __future__ import annotations

from torch import nn

from ..core.composite import Composite
from ._common import (activation_calls, arithmetic, attention_calls, epsilon_rule,
                      identity_module, layer_norm_module, linear_calls, python_activations)


def layer_map(cp: bool = False, model_type: str = "gpt2", epsilon=None) -> dict:
    """The table (first match wins); ``epsilon`` sets every epsilon-family stabiliser."""
    from transformers.pytorch_utils import Conv1D

    table = {
        nn.Linear: epsilon_rule(epsilon),
        Conv1D: epsilon_rule(epsilon),
        nn.LayerNorm: layer_norm_module(epsilon),
    }
    table.update({cls: identity_module for cls in python_activations()})
    table.update(activation_calls())
    table.update(linear_calls(epsilon))
    table.update(attention_calls(cp, epsilon))
    table.update(arithmetic(epsilon))
    return table


def attnlrp(overrides=None, model_type: str = "gpt2", epsilon=None, engine: str = "gradient",
            **kwargs) -> Composite:
    """A fresh AttnLRP composite for GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``,
    ``GPT2ForSequenceClassification``)."""
    return Composite(layer_map(False, epsilon=epsilon), overrides, engine=engine, epsilon=epsilon,
                     name="AttnLRP[gpt2]", method="attnlrp", **kwargs)


def cp_lrp(overrides=None, model_type: str = "gpt2", epsilon=None, engine: str = "gradient",
           **kwargs) -> Composite:
    """A fresh CP-LRP composite for GPT-2."""
    return Composite(layer_map(True, epsilon=epsilon), overrides, engine=engine, epsilon=epsilon,
                     name="CP-LRP[gpt2]", method="cp-lrp", **kwargs)
