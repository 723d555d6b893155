"""The published lxt 2.1 rules (``lxt.explicit.rules``), as adapters onto :mod:`lxt.rules`.

A published rule is constructed around the module or function it wraps,
``EpsilonRule(module, epsilon=1e-8)``, and *is* the wrapped module.  Here each rule is the
:mod:`lxt.rules` class of the same name with the published constructor and defaults:
called with a module (or function) first it returns that module wrapped (an
:class:`lxt.rules.RuleModule`, published ``WrapModule``) or the wrapped function; called
without one it is a rule template, as in :mod:`lxt.rules` (``EpsilonRule()``), which is what
a layer map of :class:`lxt.explicit.core.Composite` instantiates.

>>> import lxt.explicit.rules as rules
>>> layer = rules.EpsilonRule(nn.Linear(4, 3))          # the wrapped module
>>> fn = rules.EpsilonRule(partial(F.linear, weight=W))  # a wrapped function
"""
from __future__ import annotations

from torch import Tensor, nn

from .. import functional as _lf
from .. import rules as _rules
from ..rules import RuleModule

__all__ = [
    "WrapModule",
    "IdentityRule",
    "StopRelevanceRule",
    "EpsilonRule",
    "UniformEpsilonRule",
    "TaylorDecompositionRule",
    "UniformRule",
    "identity",
    "epsilon_lrp",
    "identity_fn",
    "stop_relevance_fn",
    "epsilon_lrp_fn",
    "uniform_epsilon_lrp_fn",
    "taylor_decomposition_fn",
    "uniform_rule_fn",
]

#: What the published rules return when applied to a module (for ``isinstance`` checks).
#: Unlike the published base class it is built as ``RuleModule(rule, module)``.
WrapModule = RuleModule


def _is_target(obj) -> bool:
    return isinstance(obj, nn.Module) or (callable(obj) and not isinstance(obj, (type, Tensor)))


class _Published:
    """Published construction: ``Rule(module_or_fn, *params)`` returns the wrapped target."""

    def __new__(cls, *args, **kwargs):
        if args and _is_target(args[0]):
            return cls(*args[1:], **kwargs)(args[0])
        return object.__new__(cls)


class IdentityRule(_Published, _rules.IdentityRule):
    """``IdentityRule(module)``: relevance passes unchanged to the single input (AttnLRP
    Eq. 9); see :class:`lxt.rules.IdentityRule`."""


class StopRelevanceRule(_Published, _rules.StopRelevanceRule):
    """``StopRelevanceRule(module)``: no relevance reaches the input; see
    :class:`lxt.rules.StopRelevanceRule`."""


class EpsilonRule(_Published, _rules.EpsilonRule):
    """``EpsilonRule(module, epsilon=1e-8)``: epsilon-LRP through the module's own Jacobian
    (AttnLRP Eq. 8); see :class:`lxt.rules.EpsilonRule`."""

    def __init__(self, epsilon: float = 1e-8):
        super().__init__(epsilon)


class UniformEpsilonRule(_Published, _rules.UniformEpsilonRule):
    """``UniformEpsilonRule(module, epsilon=1e-6)``: epsilon rule shared uniformly among the
    variable inputs (AttnLRP Prop. 3.3); see :class:`lxt.rules.UniformEpsilonRule`."""

    def __init__(self, epsilon: float = 1e-6):
        super().__init__(epsilon)


class UniformRule(_Published, _rules.UniformRule):
    """``UniformRule(module)``: every variable input gets ``R / n`` (AttnLRP Prop. 3.2); see
    :class:`lxt.rules.UniformRule`.  The published rule divided by the number of all inputs,
    also those without ``requires_grad``."""


class TaylorDecompositionRule(_Published, _rules.TaylorDecompositionRule):
    """``TaylorDecompositionRule(module, ref=0, bias=False, distribute_bias=None)``: first-order
    Taylor decomposition at ``ref``; see :class:`lxt.rules.TaylorDecompositionRule`.

    Parameters
    ----------
    ref : number, Tensor, or a sequence of one Tensor
        The root point, the same for every input.
    bias : bool
        Whether ``f(ref)`` absorbs relevance (the published rule failed with ``bias=True``).
    distribute_bias : None
        Not supported (raises); with ``bias=True`` the bias share stays with ``f(ref)``.
    """

    def __init__(self, ref=0, bias: bool = False, distribute_bias=None):
        if distribute_bias is not None:
            raise NotImplementedError(
                "lxt: TaylorDecompositionRule(distribute_bias=...) is not supported; use "
                "bias=False to distribute all relevance to the inputs.")
        if isinstance(ref, (tuple, list)):
            if len(ref) != 1:
                raise ValueError(
                    f"lxt: TaylorDecompositionRule takes one reference point for every input, "
                    f"got {len(ref)}; pass a number, a tensor, or a callable x -> x0 to "
                    "lxt.rules.TaylorDecompositionRule(reference=...).")
            (ref,) = ref
        super().__init__(reference=ref, bias=bias)


def identity(fn, input: Tensor) -> Tensor:
    """``fn(input)`` with the identity rule (AttnLRP Eq. 9); :func:`lxt.functional.identity`."""
    return _lf.identity(fn, input)


def epsilon_lrp(fn, epsilon: float, *inputs) -> Tensor:
    """``fn(*inputs)`` with the epsilon rule (AttnLRP Eq. 8); every input that requires grad
    receives relevance.  :meth:`lxt.rules.EpsilonRule.apply`."""
    return _rules.EpsilonRule(epsilon).apply(fn, *inputs)


class _Function:
    """Stands for the published autograd Function of the same name: only ``apply`` is kept."""

    def __init__(self, name: str, apply):
        self.__name__ = self.__qualname__ = name
        self.apply = apply

    def __repr__(self) -> str:
        return f"<lxt.explicit.rules.{self.__name__}>"


identity_fn = _Function("identity_fn", identity)
stop_relevance_fn = _Function(
    "stop_relevance_fn", lambda fn, input: _rules.StopRelevanceRule().apply(fn, input))
epsilon_lrp_fn = _Function("epsilon_lrp_fn", epsilon_lrp)
uniform_epsilon_lrp_fn = _Function(
    "uniform_epsilon_lrp_fn",
    lambda fn, epsilon, *inputs: _rules.UniformEpsilonRule(epsilon).apply(fn, *inputs))
taylor_decomposition_fn = _Function(
    "taylor_decomposition_fn",
    lambda fn, ref, bias, distribute_bias, *inputs:
        TaylorDecompositionRule(ref, bias, distribute_bias).apply(fn, *inputs))
uniform_rule_fn = _Function(
    "uniform_rule_fn", lambda fn, *inputs: _rules.UniformRule().apply(fn, *inputs))
