"""The one autograd Function every LRP rule runs through, and the stabiliser.

Every rule in lxt — whether reached through a drop-in functional (``lxt.functional``), a
drop-in module (``lxt.modules``), a rule wrapping a module (``lxt.rules``) or a graph rewrite
(``lxt.Composite``) — is a :class:`Rule` whose :meth:`Rule.relevance` turns the relevance of an
output into the relevance of the inputs.  :class:`Rule.apply` runs the wrapped callable in
forward exactly as torch would and installs a single autograd node whose backward calls that
method, so ``y.backward(R); x.grad`` *is* the relevance of ``x`` (explicit LRP).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..core.opaque import LxtModule

#: Default stabiliser of the epsilon family (linear, add, matmul, mean, layer norm, attention).
#: Small enough to leave float32 relevance unchanged to round-off, large enough to keep
#: ``R / z`` finite where an output is exactly zero.
EPSILON = 1e-6


def stabilize(z: Tensor, epsilon: float = EPSILON) -> Tensor:
    """Sign-aware stabiliser ``z + epsilon * sign(z)`` with ``sign(0) = +1``.

    Parameters
    ----------
    z : Tensor
        The denominator of an LRP rule (usually a layer's output).
    epsilon : float
        Magnitude added away from zero.

    Returns
    -------
    Tensor
        ``z`` moved away from zero by ``epsilon``; never exactly zero for ``epsilon > 0``.
    """
    # (z >= 0) * 2eps - eps + z, with one float temporary (these tensors can be large: logits)
    return (z >= 0).to(z.dtype).mul_(2 * epsilon).sub_(epsilon).add_(z)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision the rules compute in: at least float32 (bfloat16 relevance is computed in
    float32 and stored back in bfloat16)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class _Recorder(threading.local):
    """Thread-local hook for :func:`lxt.conservation` (inactive unless a report is open)."""

    def __init__(self):
        self.reports: list = []


RECORDER = _Recorder()


def _check_dtype(t: Tensor, rule: "Rule", fn: Callable) -> None:
    if t.dtype == torch.float16:
        raise TypeError(
            f"lxt: {type(rule).__name__} on {_name_of(fn)} got a float16 tensor. float16 is not "
            "supported: relevance (R / z) overflows and underflows its 5-bit exponent. Use "
            "bfloat16 (model.to(torch.bfloat16)) or float32 instead."
        )


def _name_of(fn: Any) -> str:
    if isinstance(fn, torch.nn.Module):
        return type(fn).__name__
    return getattr(fn, "__name__", None) or getattr(fn, "__qualname__", None) or repr(fn)


class _RuleFunction(torch.autograd.Function):
    """Forward: ``fn(*args, **kwargs)`` as torch computes it.  Backward: ``rule.relevance``.

    ``template`` holds the positional arguments with ``None`` at the positions of the
    relevance-receiving tensors, which arrive separately in ``inputs`` so that autograd sees
    them.  Every other argument (weights, masks, numbers) is a constant of the rule.
    """

    @staticmethod
    def forward(ctx, rule, fn, template, positions, kwargs, label, *inputs):
        needs = [t.requires_grad for t in inputs]
        if rule.keeps_graph and any(needs):
            # Run fn on detached copies under grad mode: the sub-graph gives the rule exact
            # vector-Jacobian products later, at the cost plain autograd would pay anyway.
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs, needs)]
                out = fn(*_fill(template, positions, leaves), **kwargs)
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"lxt: {type(rule).__name__} needs {_name_of(fn)} to return one tensor, "
                    f"it returned {type(out).__name__}."
                )
            ctx.save_for_backward(out, *leaves)
        else:
            leaves = [t.detach() for t in inputs]
            out = fn(*_fill(template, positions, leaves), **kwargs)
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"lxt: {type(rule).__name__} needs {_name_of(fn)} to return one tensor, "
                    f"it returned {type(out).__name__}."
                )
            if rule.saves_tensors:
                ctx.save_for_backward(out.detach(), *leaves)
            else:
                ctx.shapes = [t.shape for t in inputs]
                ctx.dtypes = [t.dtype for t in inputs]
        ctx.rule, ctx.fn, ctx.template, ctx.positions = rule, fn, template, positions
        ctx.kwargs, ctx.label, ctx.needs = kwargs, label, needs
        return out.detach()

    @staticmethod
    def backward(ctx, relevance):
        rule = ctx.rule
        if rule.keeps_graph or rule.saves_tensors:
            out, *inputs = ctx.saved_tensors
        else:
            out, inputs = None, [_Meta(s, d) for s, d in zip(ctx.shapes, ctx.dtypes)]
        rels = rule.relevance(_Call(ctx, inputs, out), relevance)
        rels = [
            None if (r is None or not need) else r.to(x.dtype)
            for r, x, need in zip(rels, inputs, ctx.needs)
        ]
        if RECORDER.reports:
            for report in RECORDER.reports:
                report._record(ctx.label or _name_of(ctx.fn), rule, relevance, rels)
        return (None,) * 6 + tuple(rels)


class _Meta:
    """Shape and dtype of an input a rule did not need to keep."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


class _Call:
    """What a rule's backward sees of one forward call."""

    def __init__(self, ctx, inputs, out):
        self.inputs: list = inputs
        self.output: Tensor | None = out
        self.needs: list[bool] = ctx.needs
        self.fn: Callable = ctx.fn
        self.template, self.positions, self.kwargs = ctx.template, ctx.positions, ctx.kwargs

    @property
    def n_variable(self) -> int:
        """Number of inputs that receive relevance (require grad)."""
        return sum(self.needs)

    def vjp(self, grad_output: Tensor) -> list:
        """Vector-Jacobian product of the recorded call at ``grad_output`` (rules that keep
        the graph); ``None`` for inputs that need no relevance."""
        wanted = [x for x, n in zip(self.inputs, self.needs) if n]
        grads = iter(
            torch.autograd.grad(
                self.output, wanted, grad_output.to(self.output.dtype), retain_graph=True,
                allow_unused=True,
            )
        )
        res = []
        for x, n in zip(self.inputs, self.needs):
            if not n:
                res.append(None)
                continue
            g = next(grads)
            res.append(torch.zeros_like(x) if g is None else g)
        return res

    def call(self, *inputs) -> Tensor:
        """Run the wrapped callable again on new values of the relevance inputs."""
        return self.fn(*_fill(self.template, self.positions, inputs), **self.kwargs)


def _fill(template: Sequence, positions: Sequence[int], values: Sequence) -> list:
    args = list(template)
    for p, v in zip(positions, values):
        args[p] = v
    return args


class Rule:
    """Base class of all LRP rules: a template with parameters, applied to a module or a
    callable.

    A rule instance is reusable and stateless: ``EpsilonRule(epsilon=1e-3)`` can be applied to
    any number of modules.  Applying it to an ``nn.Module`` gives a wrapping module
    (:class:`RuleModule`), applying it to a callable gives a wrapped callable; both compute the
    same forward and carry relevance in backward.  Subclasses implement :meth:`relevance`.

    For code written against the published lxt, ``EpsilonRule(module, epsilon=...)`` (module
    first) also works and returns the wrapped module directly.
    """

    #: run the wrapped call under grad mode and keep its sub-graph (rules that need
    #: vector-Jacobian products of the wrapped call)
    keeps_graph = False
    #: keep the inputs and output values for backward (without a graph)
    saves_tensors = False

    def __new__(cls, *args, **kwargs):
        if args and (isinstance(args[0], torch.nn.Module) or callable(args[0])) and not isinstance(args[0], (int, float)):
            target, rest = args[0], args[1:]
            return cls(*rest, **kwargs)(target)
        return super().__new__(cls)

    # -- parameters, for repr / equality -------------------------------------------------
    def _params(self) -> dict:
        return {}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._params() == other._params()

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self._params().items()))))

    # -- application --------------------------------------------------------------------
    def __call__(self, target):
        """Wrap ``target``: an ``nn.Module`` gives a :class:`RuleModule`, a callable gives a
        function with the same signature."""
        if isinstance(target, torch.nn.Module):
            self.check_module(target)
            return RuleModule(self, target)
        if callable(target):
            rule = self

            def wrapped(*args, **kwargs):
                return rule.apply(target, *args, **kwargs)

            wrapped.__name__ = getattr(target, "__name__", "wrapped")
            wrapped.__qualname__ = f"{self!r}({_name_of(target)})"
            wrapped.__doc__ = getattr(target, "__doc__", None)
            wrapped.__wrapped__ = target
            wrapped.lxt_rule = self
            return wrapped
        raise TypeError(
            f"lxt: {type(self).__name__} wraps an nn.Module or a callable, got {type(target).__name__}."
        )

    def check_module(self, module: torch.nn.Module) -> None:
        """Raise a clear error when this rule cannot be built from ``module``."""

    def apply(self, fn: Callable, *args, label: str | None = None, **kwargs):
        """Call ``fn(*args, **kwargs)`` under this rule.

        Every floating-point tensor among the positional arguments receives relevance; keyword
        arguments are constants.
        """
        positions = [
            i for i, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point()
        ]
        return self.apply_at(fn, args, kwargs, positions, label=label)

    def apply_at(self, fn: Callable, args: Sequence, kwargs: dict, positions: Sequence[int],
                 label: str | None = None):
        """Call ``fn(*args, **kwargs)`` under this rule, with relevance for ``args[positions]``
        only (the other arguments are constants of the rule)."""
        inputs = [args[p] for p in positions]
        for t in inputs:
            _check_dtype(t, self, fn)
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in inputs):
            return fn(*args, **kwargs)
        template = list(args)
        for p in positions:
            template[p] = None
        return _RuleFunction.apply(self, fn, template, list(positions), kwargs, label, *inputs)

    def relevance(self, call: _Call, relevance: Tensor) -> list:
        """Relevance of each input of ``call`` given the relevance of its output."""
        raise NotImplementedError


def _bind_positionally(module, args, kwargs):
    import inspect

    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    return bound.args, bound.kwargs


class RuleModule(LxtModule):
    """An ``nn.Module`` that runs a wrapped module under a :class:`Rule`.

    The wrapped module is kept as the child ``module`` (same object, weights shared), so
    removing the wrapper gives the original back unchanged.
    """

    def __init__(self, rule: Rule, module: torch.nn.Module):
        super().__init__()
        self.rule = rule
        self.module = module

    def lrp_forward(self, *args, **kwargs):
        if kwargs:
            # tensors passed by keyword (HF: attn(hidden_states=...)) receive relevance too
            args, kwargs = _bind_positionally(self.module, args, kwargs)
        return self.rule.apply(self.module, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # attribute reads on the wrapped module (weight, in_features, ...) keep working
            return getattr(super().__getattr__("module"), name)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}"
