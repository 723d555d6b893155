"""The structural table's entries: read off a model no row of :data:`lxt.composites.FAMILIES` names.

On top of the base map (linear-like layers, ``nn.LayerNorm``, ``nn.MultiheadAttention``,
activation modules, the calls every table maps): modules named like an RMSNorm that behave like
one (checked on a small input: ``x * w / rms(x)``) and modules named like an activation get the
identity rule on their own forward; transformers 5 experts get :class:`lxt.modules.MoEExperts`.
Such a table is only as good as its coverage, so the composite is strict: the first forward
refuses, naming each operation and its modules, what is left without a rule.  Gated products get
the uniform rule in both methods (the gate cannot be told apart by structure).
"""
from __future__ import annotations

import inspect
import re

import torch
from torch import nn

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
def _probe(module: nn.Module, x):
    """``module(x)`` if that is a tensor of ``x``'s shape, else None."""
    try:
        y = module(x)
    except Exception:  # noqa: BLE001 - not the kind of module we know
        return None
    return y if isinstance(y, torch.Tensor) and y.shape == x.shape else None


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
    y, y3 = _probe(module, x), _probe(module, 3 * x)
    if y is None or y3 is None:
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
    return _probe(module, torch.randn(2, 3, generator=torch.Generator().manual_seed(0))) is not None


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


def detected(model: nn.Module, identity, experts) -> dict:
    """The entries read off ``model``: RMSNorm-like and activation modules (``identity``, the
    identity rule on their own forward) and transformers 5 experts (``experts``), for the types
    the base map does not name."""
    from transformers.pytorch_utils import Conv1D

    named = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D, nn.LayerNorm, nn.MultiheadAttention)
    kinds = {}
    for module in model.modules():
        t = type(module)
        if t in kinds or issubclass(t, named):
            continue
        if _is_rms_like(module) or _is_activation(module):
            kinds[t] = identity
        elif _is_experts(module):
            kinds[t] = experts
    return kinds
