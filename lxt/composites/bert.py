"""BERT-family tables (BERT, RoBERTa, DistilBERT): AttnLRP and CP-LRP.

Epsilon on linear layers and on the embedding sums (relevance lands on the word embeddings;
position and token-type embeddings are constants that absorb their share like biases), the
LayerNorm rule (identity on 1/std, epsilon on the centring), identity on GELU / ReLU and the
pooler's tanh, AttnLRP (or CP-LRP) attention with padding masks.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .. import functional as lf
from .. import modules as lm
from ..core.composite import Composite
from ._common import (activation_calls, arithmetic, attention_calls, epsilon_rule, identity_module,
                      layer_norm_module, python_activations, with_epsilon)


def layer_map(cp: bool = False, model_type: str = "bert", epsilon=None) -> dict:
    """The table (first match wins); ``epsilon`` sets every epsilon-family stabiliser."""
    table = {
        nn.Linear: epsilon_rule(epsilon),
        nn.LayerNorm: layer_norm_module(epsilon),
        nn.GELU: lm.GELUIdentity,
        nn.ReLU: lm.ReLUIdentity,
        nn.Tanh: lm.TanhIdentity,
        F.layer_norm: with_epsilon(lf.layer_norm, epsilon),
    }
    table.update({cls: identity_module for cls in python_activations()})
    table.update(activation_calls())
    table.update(attention_calls(cp, epsilon))
    table.update(arithmetic(epsilon))
    return table


def attnlrp(overrides=None, model_type: str = "bert", epsilon=None, engine: str = "gradient",
           **kwargs) -> Composite:
    """A fresh AttnLRP composite for BERT (``BertModel``, ``BertForSequenceClassification``,
    ``BertForMaskedLM``), RoBERTa and DistilBERT (``model_type`` names the family; the table
    is the same)."""
    return Composite(layer_map(False, epsilon=epsilon), overrides, engine=engine, epsilon=epsilon,
                     name=f"AttnLRP[{model_type}]", method="attnlrp",
                     **kwargs)


def cp_lrp(overrides=None, model_type: str = "bert", epsilon=None, engine: str = "gradient",
           **kwargs) -> Composite:
    """A fresh CP-LRP composite for BERT."""
    return Composite(layer_map(True, epsilon=epsilon), overrides, engine=engine, epsilon=epsilon,
                     name=f"CP-LRP[{model_type}]", method="cp-lrp",
                     **kwargs)
