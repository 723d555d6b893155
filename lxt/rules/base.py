"""The one autograd Function every LRP rule runs through, the stabiliser, and the two engines.

Every rule in lxt — whether reached through a drop-in functional (``lxt.functional``), a
drop-in module (``lxt.modules``), a rule wrapping a module (``lxt.rules``) or a graph rewrite
(``lxt.Composite``) — is a :class:`Rule` whose :meth:`Rule.relevance` turns the relevance of an
output into the relevance of the inputs.  :class:`Rule.apply` runs the wrapped callable in
forward exactly as torch would and installs a single autograd node whose backward calls that
method, so ``y.backward(R); x.grad`` *is* the relevance of ``x`` (explicit LRP).

The same rule also has a *gradient form* (:meth:`Rule.gradient_at`), used by composites with
``engine="gradient"`` (the default of every shipped table): backward then carries
``g = R / activation`` instead of ``R``, so ``R = x * g`` at any tensor.  In that form the
epsilon rule *is* the plain gradient (nothing to wrap, nothing extra kept for backward) and
most other rules only rescale or detach; rules without a gradient form run explicitly between
two boundary conversions (:func:`relevance_to_gradient`, :func:`gradient_to_relevance`).
Which form a rule call takes is decided by :data:`lxt.core.engine.ENGINE`, set by the
composite around the calls it rewrote (:func:`bind_engine`); outside a composite every rule
is explicit.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..core.engine import ENGINE, EPSILON
from torch import nn

from ..core.opaque import _KEYS, _MODULES, opaque_module_call, snapshot as _snapshot


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


def bind_engine(fn: Callable, gradient: bool, epsilon: float = EPSILON) -> Callable:
    """``fn`` running its rule calls in the gradient form (``gradient=True``, divisions
    stabilised with ``epsilon``) or explicitly.

    The form is bound to the call site, not to a period of time, so a forward recomputed in
    backward (activation checkpointing) takes the same form as the original forward.
    """

    def bound(*args, **kwargs):
        previous = ENGINE.set(gradient, epsilon)
        try:
            return fn(*args, **kwargs)
        finally:
            ENGINE.restore(previous)

    bound.__name__ = getattr(fn, "__name__", "bound")
    bound.__qualname__ = getattr(fn, "__qualname__", bound.__name__)
    bound.__wrapped__ = fn
    bound.lxt_engine = "gradient" if gradient else "explicit"
    return bound


# ---------------------------------------------------------------------- gradient form
#
# In the gradient form a tensor t carries g = R / t in backward, i.e. R = t * g.  Two
# identity functions convert at the border between the forms:
#
#   relevance_to_gradient(t): backward receives R (from an explicit rule, or from the user
#       at a model output) and passes g = R / stab(t) upstream.  Dividing by stab(t) is what
#       the epsilon rule of the layer that produced t would do (R_in = x * J^T (R / stab(t))),
#       so explicit and gradient forms agree exactly across the border.
#   gradient_to_relevance(t): backward receives g and passes R = t * g upstream (to an
#       explicit rule, or to the user at a model input).
#
# Both keep only t, which is alive anyway (an input or output of the surrounding call).


class _RelevanceToGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, epsilon):
        ctx.save_for_backward(t)
        ctx.epsilon = epsilon
        return _snapshot(t.detach())  # not a view: later code may change it in place

    @staticmethod
    def backward(ctx, relevance):
        (t,) = ctx.saved_tensors
        ct = compute_dtype(t.dtype)
        g = relevance.to(ct) / stabilize(t.detach().to(ct), ctx.epsilon)
        for report in RECORDER.reports:  # the gradient engine's rules are not recorded
            report.gradient_engine = True
        return g.to(relevance.dtype), None


class _GradientToRelevance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        ctx.save_for_backward(t)
        return _snapshot(t.detach())  # not a view: later code may change it in place

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        ct = compute_dtype(t.dtype)
        r = t.detach().to(ct) * grad.to(ct)
        if torch.isinf(t).any():
            r = torch.where(torch.isinf(t), 0, r)  # -inf mask entries count as 0 (softmax rule)
        return r.to(grad.dtype)


class _ScaleGradient(torch.autograd.Function):
    """Identity in forward; multiplies the gradient by a constant in backward (keeps nothing)."""

    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _RatioGradient(torch.autograd.Function):
    """``fn(x)`` in forward; ``g_x = g * fn(x) / stab(x)`` in backward (identity rule), or
    ``g * ratio_of(x)`` where the rule knows ``y / x`` in closed form."""

    @staticmethod
    def forward(ctx, fn, template, position, kwargs, x, ratio_of=None):
        args = _fill(template, [position], [x.detach()])
        y = fn(*args, **kwargs)
        if not isinstance(y, Tensor):
            raise TypeError(f"lxt: IdentityRule needs {_name_of(fn)} to return one tensor, "
                            f"it returned {type(y).__name__}.")
        ct = compute_dtype(x.dtype)
        ctx.epsilon = epsilon = ENGINE.epsilon
        if y.shape == x.shape and ratio_of is not None:
            ctx.save_for_backward(ratio_of(*args, **kwargs).to(x.dtype))
            ctx.broadcast = False
        elif y.shape == x.shape:
            ratio = y.detach().to(ct) / stabilize(x.detach().to(ct), epsilon)
            ctx.save_for_backward(ratio.to(x.dtype))
            ctx.broadcast = False
        else:  # output broadcast beyond the input: R_x = (y * g) summed back to x's shape
            ctx.save_for_backward(y.detach(), x.detach())
            ctx.broadcast = True
        return y.detach()

    @staticmethod
    def backward(ctx, grad):
        if not ctx.broadcast:
            (ratio,) = ctx.saved_tensors
            return None, None, None, None, grad * ratio, None
        y, x = ctx.saved_tensors
        ct = compute_dtype(x.dtype)
        r = (y.to(ct) * grad.to(ct)).sum_to_size(x.shape)
        return None, None, None, None, (r / stabilize(x.to(ct), ctx.epsilon)).to(x.dtype), None


def relevance_to_gradient(t: Tensor, epsilon: float | None = None) -> Tensor:
    """``t`` unchanged; in backward the incoming relevance ``R`` leaves as ``g = R / stab(t)``
    (``epsilon``: default the engine's)."""
    return _RelevanceToGradient.apply(t, ENGINE.epsilon if epsilon is None else epsilon)


def gradient_to_relevance(t: Tensor) -> Tensor:
    """``t`` unchanged; in backward the incoming ``g`` leaves as the relevance ``R = t * g``."""
    return _GradientToRelevance.apply(t)


def scale_gradient(t: Tensor, scale: float) -> Tensor:
    """``t`` unchanged; its gradient multiplied by ``scale`` in backward."""
    if scale == 1:
        return t
    return _ScaleGradient.apply(t, scale)


class _StabilisedShare(torch.autograd.Function):
    """Identity in forward on an output ``z``; in backward ``g * z / stab(n z)``."""

    @staticmethod
    def forward(ctx, z, epsilon, n):
        ctx.save_for_backward(z)
        ctx.epsilon, ctx.n = epsilon, n
        return _snapshot(z.detach())

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        ct = compute_dtype(z.dtype)
        zc = z.to(ct)
        share = zc / stabilize(zc * ctx.n if ctx.n != 1 else zc, ctx.epsilon)
        return (grad.to(ct) * share).to(grad.dtype), None, None


def stabilised_share(z: Tensor, epsilon: float, n: int = 1) -> Tensor:
    """``z`` unchanged; in backward the gradient times ``z / stab(n z)``: the gradient form of
    an epsilon rule's division ``R / stab(n z)`` for any epsilon (with ``R = z g``; ``1 / n``
    in the limit epsilon -> 0).  Keeps ``z``."""
    return _StabilisedShare.apply(z, epsilon, n)


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
                leaves = [_snapshot(t.detach()).requires_grad_(n) for t, n in zip(inputs, needs)]
                out = fn(*_fill(template, positions, leaves), **kwargs)
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"lxt: {type(rule).__name__} needs {_name_of(fn)} to return one tensor, "
                    f"it returned {type(out).__name__}."
                )
            ctx.save_for_backward(out, *leaves)
        else:
            leaves = [_snapshot(t.detach()) for t in inputs]
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
        # the caller's tensor is a copy-on-write view of the kept one: code that changes it in
        # place later (``h += x``) gets its own copy and leaves what the rule kept intact
        return _snapshot(out.detach())

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
    (The published module-first form ``EpsilonRule(module, epsilon)`` is
    :mod:`lxt.explicit.rules`.)
    """

    #: run the wrapped call under grad mode and keep its sub-graph (rules that need
    #: vector-Jacobian products of the wrapped call)
    keeps_graph = False
    #: keep the inputs and output values for backward (without a graph)
    saves_tensors = False

    @property
    def plain_gradient_module(self) -> bool:
        """Whether this rule on a module is, in the gradient engine, the module's plain
        gradient (a composite then leaves the module as it is: no wrapper)."""
        return False

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
        if ENGINE.gradient:
            return self.gradient_at(fn, args, kwargs, positions, label=label)
        return self.explicit_at(fn, args, kwargs, positions, label=label)

    def explicit_at(self, fn: Callable, args: Sequence, kwargs: dict, positions: Sequence[int],
                    label: str | None = None):
        """The explicit form: backward receives ``R`` and returns the inputs' ``R``."""
        inputs = [args[p] for p in positions]
        template = list(args)
        for p in positions:
            template[p] = None
        return _RuleFunction.apply(self, fn, template, list(positions), kwargs, label, *inputs)

    def gradient_at(self, fn: Callable, args: Sequence, kwargs: dict, positions: Sequence[int],
                    label: str | None = None):
        """The gradient form: backward receives ``g = R / output`` and returns ``R_x / x`` for
        each input ``x``.

        This default holds for every rule: it runs the explicit form between two boundary
        conversions (``R = output * g`` before it, ``g = R / stab(x)`` after it).  Rules whose
        gradient form is cheaper override it.
        """
        args = list(args)
        for p in positions:
            if args[p].requires_grad:
                args[p] = relevance_to_gradient(args[p])
        return gradient_to_relevance(self.explicit_at(fn, args, kwargs, positions, label=label))

    def relevance(self, call: _Call, relevance: Tensor) -> list:
        """Relevance of each input of ``call`` given the relevance of its output."""
        raise NotImplementedError


def plain_call(fn: Callable, args: Sequence, kwargs: dict, positions: Sequence[int],
               scales: Sequence[float] | None = None):
    """``fn(*args, **kwargs)`` with plain autograd, for gradient forms.

    Only ``args[positions]`` receive a gradient (as in the explicit form, every other tensor is
    a constant of the rule), each multiplied by its entry of ``scales``.
    """
    args = list(args)
    if any(isinstance(a, Tensor) and a.requires_grad for i, a in enumerate(args) if i not in positions):
        args = [a.detach() if isinstance(a, Tensor) and i not in positions else a
                for i, a in enumerate(args)]
    if any(isinstance(v, Tensor) and v.requires_grad for v in kwargs.values()):
        kwargs = {k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
    if scales is not None:
        for p, s in zip(positions, scales):
            args[p] = scale_gradient(args[p], s)
    return fn(*args, **kwargs)


def n_variable(args: Sequence, positions: Sequence[int]) -> int:
    """Number of the inputs at ``positions`` that receive relevance."""
    return sum(1 for p in positions if args[p].requires_grad)


class LxtModule(nn.Module):
    """Base of every lxt module (the rule modules here, :mod:`lxt.modules`): ``forward`` runs
    :meth:`lrp_forward` in the engine the composite set (``_lxt_engine``), as one opaque node
    when TorchDynamo compiles the model (:mod:`lxt.core.opaque`)."""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        key = next(_KEYS)
        obj.__dict__["_lxt_key"] = key
        _MODULES[key] = obj
        return obj

    def __deepcopy__(self, memo):
        # a copy is a new module: it gets its own key
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        import copy

        for k, v in self.__dict__.items():
            if k != "_lxt_key":
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return opaque_module_call(self.__dict__["_lxt_key"], *args, **kwargs)
        return self._lrp_call(*args, **kwargs)

    def _lrp_call(self, *args, **kwargs):
        hook = self.__dict__.get("_lxt_offload")
        if hook is not None:
            # the module this one replaces had accelerate's hook (offloaded weights): the hook
            # loads this module's weights (the same names) around the rule, as it did there
            args, kwargs = hook.pre_forward(self, *args, **kwargs)
            return hook.post_forward(self, self._engine_call(*args, **kwargs))
        return self._engine_call(*args, **kwargs)

    def _engine_call(self, *args, **kwargs):
        # a composite sets the engine its modules run in (``_lxt_engine``: gradient form?,
        # its stabiliser); a module built by hand follows the caller's
        engine = self.__dict__.get("_lxt_engine")  # (gradient, epsilon)
        if engine is None:
            return self.lrp_forward(*args, **kwargs)
        previous = ENGINE.set(*engine)
        try:
            return self.lrp_forward(*args, **kwargs)
        finally:
            ENGINE.restore(previous)

    def lrp_forward(self, *args, **kwargs):  # pragma: no cover - abstract
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
        # checkpoints keep the wrapped module's keys (``lm_head.weight``, not
        # ``lm_head.module.weight``): saved inside a composite, loaded outside, and back
        self._register_load_state_dict_pre_hook(_into_wrapped)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        return self.module.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

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


def _into_wrapped(state_dict, prefix, *args):
    """Load hook of a :class:`RuleModule`: the wrapped module's keys as the model has them."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "module.")]:
        state_dict[prefix + "module." + key[len(prefix):]] = state_dict.pop(key)
