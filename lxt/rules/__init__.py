"""LRP rules that wrap any module or callable.

A rule is a template with parameters: ``GammaRule(gamma=0.25)`` can be applied to any number
of layers.  ``rule(module)`` returns a wrapping module, ``rule(fn)`` a wrapped function,
``rule.apply(fn, *args)`` runs one call under the rule.
"""
from .base import EPSILON, Rule, RuleModule, stabilize
from .rules import (
    AttnLRPAttentionRule,
    CPLRPAttentionRule,
    EpsilonRule,
    GammaRule,
    IdentityRule,
    SoftmaxDTRule,
    StopRelevanceRule,
    TaylorDecompositionRule,
    UniformEpsilonRule,
    UniformRule,
)

__all__ = [
    "EPSILON",
    "Rule",
    "RuleModule",
    "stabilize",
    "EpsilonRule",
    "GammaRule",
    "UniformRule",
    "UniformEpsilonRule",
    "IdentityRule",
    "StopRelevanceRule",
    "TaylorDecompositionRule",
    "SoftmaxDTRule",
    "AttnLRPAttentionRule",
    "CPLRPAttentionRule",
]
