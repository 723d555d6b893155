"""The structural table: AttnLRP / CP-LRP for a model no table names, built from what it holds.

The table is read off the model: its linear-like layers (``nn.Linear``, convolutions,
transformers' ``Conv1D``: epsilon), its normalisation modules (``nn.LayerNorm``: the LayerNorm
rule; RMSNorm-like modules, recognised by name and checked to be a scale-invariant map of one
tensor: identity on their own forward), its activation modules (identity), ``nn.MultiheadAttention``
(:class:`lxt.modules.MultiheadAttention`), mixture-of-experts
layers in the transformers 5 layout (:class:`lxt.modules.MoEExperts`), plus the calls every
table maps (attention, products, sums, divisions, activations, ``F.linear``,
``F.layer_norm``).

Such a table is only as good as its coverage, so the composite is strict: the first forward
refuses, naming each operation and the modules that hold it, when an operation on the
relevance path is left without a rule (an ``einsum``, an ``exp``, a norm computed inline).
Gated products get the uniform rule in both methods (the gate branch cannot be told apart by
structure); CP-LRP detaches attention (and routing) weights.
"""
from __future__ import annotations

import inspect
import operator
import re

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as lf
from .. import modules as lm
from .. import rules
from ..core.composite import Composite
from . import native
from ._common import (activation_calls, arithmetic, attention_calls, epsilon_rule, experts_module,
                      identity_module, layer_norm_module, linear_calls, python_activations,
                      with_epsilon)

_RMS_NAME = re.compile(r"rms_?norm", re.IGNORECASE)
#: activation modules named for their function (``BloomGelu``, ``QuickGELU``): identity rule
_ACTIVATION_NAME = re.compile(r"(gelu|silu|swish|mish|relu)(activation)?$", re.IGNORECASE)


def _one_tensor_forward(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1


@torch.no_grad()
def _is_rms_like(module: nn.Module) -> bool:
    """A module named like an RMSNorm that maps one tensor ``x`` to ``x * w / rms(x)`` for some
    fixed ``w`` (checked on a small random input: scale-invariant, and ``y / x * rms(x)`` the
    same for two rows)."""
    if not _RMS_NAME.search(type(module).__name__) or not _one_tensor_forward(module):
        return False
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    if set(params) - {"weight"} or weight is None or weight.dim() != 1 or weight.is_meta:
        return False
    x = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0))
    x = x.to(device=weight.device, dtype=weight.dtype)
    try:
        y, y3 = module(x), module(3 * x)
    except Exception:  # noqa: BLE001 - not the kind of module we know
        return False
    if not (isinstance(y, torch.Tensor) and y.shape == x.shape):
        return False
    x, y, y3 = x.double(), y.double(), y3.double()
    # y = x * w / rms(x): scale-invariant, and y / x * rms(x) is the same vector for every row
    weight = y / x * x.pow(2).mean(-1, keepdim=True).sqrt()
    return (torch.allclose(y, y3, rtol=1e-2, atol=1e-3)
            and torch.allclose(weight[0], weight[1], rtol=1e-2, atol=1e-3))


def _is_activation(module: nn.Module) -> bool:
    """A module named like an activation, without parameters, mapping one tensor to one of the
    same shape (checked on a small input)."""
    if not _ACTIVATION_NAME.search(type(module).__name__) or not _one_tensor_forward(module):
        return False
    if any(True for _ in module.parameters(recurse=True)):
        return False
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            y = module(x)
    except Exception:  # noqa: BLE001 - not the kind of module we know
        return False
    return isinstance(y, torch.Tensor) and y.shape == x.shape


def _is_experts(module: nn.Module) -> bool:
    """transformers 5's fused experts: 3-d ``gate_up_proj`` / ``down_proj`` and ``act_fn``,
    called with ``(hidden_states, top_k_index, top_k_weights)``."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3
            and down.dim() == 3 and hasattr(module, "act_fn")):
        return False
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(names) == 3 and set(dict(module.named_parameters(recurse=False))) == {"gate_up_proj", "down_proj"}


def _conv1d_types() -> tuple:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (Conv1D,)


def layer_map(model: nn.Module, cp: bool = False, epsilon=None) -> dict:
    """The structural table of ``model`` (first match wins)."""
    eps = epsilon_rule(epsilon)
    table = {nn.Linear: eps, nn.Conv1d: eps, nn.Conv2d: eps, nn.Conv3d: eps}
    table.update({t: eps for t in _conv1d_types()})
    table[nn.LayerNorm] = layer_norm_module(epsilon)
    table[nn.MultiheadAttention] = native.multihead_attention(cp, epsilon)
    kinds = {}
    for module in model.modules():
        t = type(module)
        if t in kinds or t in table:
            continue
        if _is_rms_like(module) or _is_activation(module):
            kinds[t] = identity_module
        elif _is_experts(module):
            kinds[t] = experts_module(cp, epsilon)
    table.update(kinds)
    table.update({nn.GELU: lm.GELUIdentity, nn.SiLU: lm.SiLUIdentity, nn.ReLU: lm.ReLUIdentity,
                  nn.Tanh: lm.TanhIdentity})
    table.update({cls: identity_module for cls in python_activations()})
    table.update({
        F.layer_norm: with_epsilon(lf.layer_norm, epsilon),
        F.rms_norm: lf.rms_norm,
        F.normalize: lf.normalize,
        torch.bmm: with_epsilon(lf.matmul, epsilon),
        "bmm": with_epsilon(lf.matmul, epsilon),
        # bias + q @ k^T (ALiBi attention): the matmul rule, the bias absorbing its share
        torch.baddbmm: rules.UniformEpsilonRule(**({} if epsilon is None else {"epsilon": epsilon})),
        "matmul": with_epsilon(lf.matmul, epsilon),
        operator.matmul: with_epsilon(lf.matmul, epsilon),
    })
    table.update(activation_calls())
    table.update(linear_calls(epsilon))
    table.update(attention_calls(cp, epsilon))
    table.update(arithmetic(epsilon))
    return table


def _name(method: str, model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{method}[structural: {model_type or type(model).__name__}]"


def attnlrp(model: nn.Module, overrides=None, epsilon=None, engine: str = "gradient",
            strict: bool = True, **kwargs) -> Composite:
    """The structural AttnLRP composite of ``model`` (strict: see the module docstring)."""
    return Composite(layer_map(model, False, epsilon), overrides, engine=engine, epsilon=epsilon,
                     name=_name("AttnLRP", model), method="attnlrp", strict=strict, **kwargs)


def cp_lrp(model: nn.Module, overrides=None, epsilon=None, engine: str = "gradient",
           strict: bool = True, **kwargs) -> Composite:
    """The structural CP-LRP composite of ``model``."""
    return Composite(layer_map(model, True, epsilon), overrides, engine=engine, epsilon=epsilon,
                     name=_name("CP-LRP", model), method="cp-lrp", strict=strict, **kwargs)
