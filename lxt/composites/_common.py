"""Entries shared by the architecture tables (data, not code: each table lists its own)."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from .. import functional as lf
from .. import modules as lm
from ..core.opaque import LxtModule
from ..rules import EpsilonRule, IdentityRule


def detached_softmax(input, dim=None, _stacklevel=3, dtype=None):
    """CP-LRP in eager attention: the attention weights are constants (no relevance to q, k)."""
    return F.softmax(input, dim=dim, dtype=dtype).detach()


def with_epsilon(fn, epsilon):
    """``fn`` with its ``epsilon`` keyword fixed (``fn`` itself for the default)."""
    if epsilon is None:
        return fn

    def wrapped(*args, **kwargs):
        kwargs.setdefault("epsilon", epsilon)
        return fn(*args, **kwargs)

    wrapped.__name__ = wrapped.__qualname__ = f"{fn.__name__}[epsilon={epsilon:g}]"
    wrapped.__doc__ = fn.__doc__
    wrapped.__wrapped__ = fn
    return wrapped


def attention_calls(cp: bool, epsilon=None) -> dict:
    """Attention in both implementations: fused sdpa, and eager matmul -> softmax -> matmul."""
    sdpa = lf.scaled_dot_product_attention_cp if cp else lf.scaled_dot_product_attention
    softmax = detached_softmax if cp else lf.softmax
    return {
        F.scaled_dot_product_attention: with_epsilon(sdpa, epsilon),
        F.softmax: softmax,
        "softmax": softmax,
        torch.matmul: with_epsilon(lf.matmul, epsilon),
    }


def arithmetic(epsilon=None) -> dict:
    """Elementwise arithmetic (``a + b``, ``torch.add``, ``x.add(y)`` are one op; the in-place
    forms another)."""
    add = with_epsilon(lf.add2, epsilon)
    return {
        operator.add: add,
        torch.add: add,
        "add": add,
        # in-place forms (``x += y`` in BERT-style embeddings): the rule runs on a copy and
        # its result is written back (lxt.core.dispatch), so the forward is unchanged
        operator.iadd: add,
        "add_": add,
        operator.mul: lf.mul2,
        torch.mul: lf.mul2,
        "mul": lf.mul2,
        operator.imul: lf.mul2,
        "mul_": lf.mul2,
        operator.neg: IdentityRule,  # rotate_half: -x carries x's relevance, not -R
        # a / b: identity on the numerator, the divisor a constant (also when it requires
        # grad: x / x.norm(), e / e.sum())
        operator.truediv: lf.div,
        torch.div: lf.div,
        "div": lf.div,
        operator.itruediv: lf.div,
        "div_": lf.div,
    }


def epsilon_rule(epsilon):
    return EpsilonRule if epsilon is None else EpsilonRule(epsilon)


def rms_norm_module(module):
    """RMSNorm modules -> :class:`lxt.modules.RMSNormIdentity` (sharing the weight; its gradient
    form detaches the normaliser and keeps one number per row)."""
    return lm.RMSNormIdentity.from_module(module)


def layer_norm_module(epsilon):
    """LayerNorm modules -> :class:`lxt.modules.LayerNormEpsilon` (sharing the weights)."""
    if epsilon is None:
        return lm.LayerNormEpsilon
    factory = lambda module: lm.LayerNormEpsilon.from_module(module, epsilon=epsilon)  # noqa: E731
    factory.__name__ = factory.__qualname__ = f"LayerNormEpsilon[epsilon={epsilon:g}]"
    return factory


def identity_module(module):
    """Any elementwise-scaling module (Gemma's ``x / rms * (1 + w)`` RMSNorm, a Python GELU
    formula) under the identity rule, its own forward kept: ``R_x = R`` (AttnLRP Eq. 9,
    Prop. 3.4)."""
    if isinstance(module, LxtModule):
        return module
    return IdentityRule()(module)


def activation_calls() -> dict:
    """Elementwise activations as calls: the identity rule (AttnLRP Eq. 9)."""
    return {
        F.silu: lf.silu,
        F.gelu: lf.gelu,
        F.relu: lf.relu,
        torch.relu: lf.relu,
        "relu": lf.relu,
        torch.tanh: lf.tanh,
        "tanh": lf.tanh,
    }


def linear_calls(epsilon=None) -> dict:
    """``F.linear`` called with a weight tensor (MoE routers, fused projections): epsilon."""
    return {F.linear: with_epsilon(lf.linear_epsilon, epsilon)}


def detached_mul(position: int):
    """CP-LRP gated MLP: the product with the factor at ``position`` (0 or 1) detached, so
    relevance goes through the other one (identity rule on the product)."""

    def mul(a, b):
        return lf.mul2(a.detach(), b) if position == 0 else lf.mul2(a, b.detach())

    mul.__name__ = mul.__qualname__ = f"gate_detached_mul[{position}]"
    return mul


def python_activations() -> tuple:
    """transformers' activation modules that compute their formula in Python (``gelu_new``,
    ``quick_gelu``, ``gelu_fast``, ...): elementwise, so the identity rule on the whole module
    (a graph rewrite would see their inner products and tanh).  Activations that call one torch
    function (``GELUActivation``, ``SiLUActivation``) are left to the call entries."""
    from transformers import activations

    names = ("NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
             "AccurateGELUActivation", "MishActivation", "LaplaceActivation",
             "ReLUSquaredActivation", "ClippedGELUActivation", "GELUTanh", "PytorchGELUTanh")
    return tuple(getattr(activations, n) for n in names if hasattr(activations, n))


def experts_module(cp: bool, epsilon=None):
    """MoE experts (transformers 5 layout) -> :class:`lxt.modules.MoEExperts` (weights shared)."""
    from .. import modules as lm

    kw = {} if epsilon is None else {"epsilon": epsilon}

    def experts(module):
        return lm.MoEExperts.from_module(module, cp=cp, **kw)

    experts.__name__ = experts.__qualname__ = "MoEExperts" + ("[cp]" if cp else "")
    return experts
