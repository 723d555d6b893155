"""``Composite``: patch an unmodified model so that backward carries relevance, and restore it.

A composite is a layer map (``matcher -> rule``; first match wins) plus per-layer override
maps.  ``register(model)``

1. replaces the modules the map names (``nn.Linear -> EpsilonRule``) by rule-carrying modules
   (in the gradient engine a layer whose rule is its plain gradient stays as it is),
2. hooks the model's modules so that, while it runs, every functional call the map names
   (``operator.add -> lf.add2``, ``"mul" -> lf.mul2``) runs that rule instead
   (:mod:`lxt.core.dispatch`: nothing is captured or compiled),
3. freezes the parameters (weights are constants of the rules; no relevance flows to them).

Every change is recorded before it is made; ``remove()`` undoes all of them.
"""
from __future__ import annotations

import contextlib
import fnmatch
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from ..rules.base import EPSILON, LxtModule, Rule
from .dispatch import (CHOSEN_PLAIN, PLAIN_OK, Dispatcher, OpRecord, PatchedForward,
                       describe_ops, op_name, unsafe_ops)
from .quantized import keep_cpu_layout

__all__ = ["Composite", "LayerMap", "ENGINES", "METHODS"]

#: the execution forms of a composite (see :class:`Composite`)
ENGINES = ("gradient", "explicit")
#: the LRP methods a shipped table implements (:attr:`Composite.method`)
METHODS = ("attnlrp", "cp-lrp")


def _describe(obj) -> str:
    if isinstance(obj, type):
        return obj.__name__
    if isinstance(obj, Rule):
        return repr(obj)
    if isinstance(obj, tuple):
        return "(" + ", ".join(_describe(o) for o in obj) + ")"
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)


def _is_module_type(key) -> bool:
    return isinstance(key, type) and issubclass(key, nn.Module)


def _is_rule_value(value) -> bool:
    return isinstance(value, Rule) or (isinstance(value, type) and issubclass(value, Rule))


class LayerMap:
    """An ordered ``matcher -> value`` table; the first matching entry wins.

    Matchers
    --------
    - an ``nn.Module`` subclass: modules of that type (subclasses included);
    - a function (``operator.add``, ``F.scaled_dot_product_attention``, ``torch.matmul``):
      calls of it in the forward;
    - a string: calls of that ``torch.Tensor`` method in the forward (``"mul"``).  A call
      matches by op, however it is spelled: ``operator.add``, ``torch.add``, ``"add"`` and
      ``a + b`` are one op, and it matches the in-place form too (``x += y``, ``"add_"``; a key
      ``"add_"`` matches only that);
    - a pair ``(ModuleType, function_or_method)``: such calls made directly inside modules of
      that type (e.g. ``(LlamaMLP, operator.mul)``);
    - a pair ``(ParentType, ModuleType)``: modules of the second type that are children of a
      module of the first (e.g. ``(ViTIntermediate, nn.Linear)``).

    Values
    ------
    - for modules: a :class:`lxt.rules.Rule` (class or instance), an lxt module class with
      ``from_module`` (``lxt.modules.LinearEpsilon``) or a callable ``module -> nn.Module``;
    - for calls: an lxt functional (or any callable with the signature of the call it
      replaces) or a Rule;
    - ``None``: leave it with plain gradients (useful in overrides).
    """

    def __init__(self, entries: Mapping | Iterable | None = None, *, where: str = "layer map"):
        self.entries: list[tuple[Any, Any]] = []
        if entries is None:
            return
        if isinstance(entries, LayerMap):
            self.entries = list(entries.entries)
            return
        items = entries.items() if isinstance(entries, Mapping) else entries
        for item in items:
            try:
                key, value = item
            except (TypeError, ValueError):
                raise TypeError(f"lxt: {where} entries are (matcher, rule) pairs, got {item!r}.") from None
            self._check(key, value, where)
            self.entries.append((key, value))

    @staticmethod
    def _check(key, value, where: str) -> None:
        hint = ("Use a module type (nn.Linear), a function seen in the forward (operator.add, "
                "F.scaled_dot_product_attention), a Tensor method name ('mul') or a pair "
                "(ModuleType, function).")
        if isinstance(key, tuple):
            if len(key) != 2 or not _is_module_type(key[0]) or isinstance(key[1], tuple):
                raise TypeError(f"lxt: {where} key {key!r} is not a (ModuleType, function) or "
                                f"(ParentType, ModuleType) pair. {hint}")
            LayerMap._check(key[1], value, where)
            return
        if isinstance(key, nn.Module):
            raise TypeError(f"lxt: {where} key {type(key).__name__}(...) is a module instance; use its "
                            "type, or an override pattern with its qualified name. " + hint)
        if _is_module_type(key):
            ok = (value is None or _is_rule_value(value) or hasattr(value, "from_module")
                  or (callable(value) and not isinstance(value, type)))
            if not ok:
                raise TypeError(
                    f"lxt: {where} maps module type {key.__name__} to {_describe(value)}, which "
                    "is neither a Rule, an lxt module class (with from_module) nor a factory "
                    "module -> nn.Module."
                )
            return
        if isinstance(key, str):
            if not hasattr(torch.Tensor, key):
                raise TypeError(f"lxt: {where} key {key!r} is not a torch.Tensor method name. {hint}")
        elif isinstance(key, type) or not callable(key):
            raise TypeError(f"lxt: {where} key {key!r} ({type(key).__name__}) is neither a module type, "
                            f"a function nor a Tensor method name. {hint}")
        if not (value is None or _is_rule_value(value) or callable(value)):
            raise TypeError(f"lxt: {where} maps {_describe(key)} to {value!r}, which is not callable.")
        if isinstance(value, type) and issubclass(value, nn.Module):
            raise TypeError(f"lxt: {where} maps the call {_describe(key)} to the module class "
                            f"{value.__name__}; calls take a functional or a Rule.")

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    def module_value(self, module: nn.Module, parent: Optional[nn.Module] = None):
        for key, value in self.entries:
            if _is_module_type(key) and isinstance(module, key):
                return True, value, key
            if (isinstance(key, tuple) and _is_module_type(key[1]) and parent is not None
                    and isinstance(parent, key[0]) and isinstance(module, key[1])):
                return True, value, key
        return False, None, None

    def call_value(self, target, owner_type):
        """The first entry matching a call of ``target`` made directly inside a module of type
        ``owner_type``: ``(found, value, key)``.  Calls match by op, whatever alias spells
        them (``operator.add``, ``torch.add`` and ``"add"`` are one op; ``add_`` its in-place
        form, matched by either key)."""
        op = op_name(target)
        # an in-place form (``add_``, ``x += y``) is its op too: ``"add"`` matches it
        base = op[:-1] if isinstance(op, str) and op.endswith("_") and len(op) > 1 else None
        calls = self.__dict__.get("_calls")
        if calls is None:  # (op, scope or None, value, key) of the call entries, in order
            calls = self._calls = [
                (op_name(key[1]), key[0], value, key) if isinstance(key, tuple) else (op_name(key), None, value, key)
                for key, value in self.entries
                if not (_is_module_type(key) or (isinstance(key, tuple) and _is_module_type(key[1])))]
        for k, scope, value, key in calls:
            if (k == op or k == base if isinstance(k, str) or isinstance(op, str) else k is op) and (
                    scope is None or (owner_type is not None and issubclass(owner_type, scope))):
                return True, value, key
        return False, None, None

    def __repr__(self):
        rows = ", ".join(f"{_describe(k)}: {_describe(v)}" for k, v in self.entries)
        return f"LayerMap({{{rows}}})"


def _matches(pattern: str, names: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def _ancestors(qualname: str) -> list[str]:
    """``a.b.c`` -> ``['a', 'a.b', 'a.b.c']``."""
    parts = qualname.split(".") if qualname else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


class Composite:
    """Patch an existing model so that backward carries LRP relevance; restore it exactly.

    Parameters
    ----------
    layer_map : mapping or iterable of pairs
        ``matcher -> rule`` entries, first match wins (see :class:`LayerMap`).
    overrides : mapping of str to layer map, optional
        ``{"model.layers.0.*": {nn.Linear: GammaRule(gamma=0.25)}}``: for modules whose
        qualified name (or an ancestor's) matches the glob pattern, and for graph calls owned
        by such modules, these entries come before the layer map.  Earlier patterns first.
    trace : bool
        Rewrite functional calls while the model runs (default).  With ``False`` only
        modules are replaced.
    freeze_parameters : bool
        Set ``requires_grad=False`` on every parameter while registered (restored by
        ``remove``), so weights are constants of the rules.
    name : str, optional
        Shown by :meth:`summary`.
    engine : {"gradient", "explicit"}
        How the rules run.  ``"gradient"`` (default): backward carries ``g = R / activation``
        through the graph, so rules that equal the plain gradient in that form (epsilon on
        linear layers and sums, softmax) cost nothing and keep nothing; relevance is converted
        at the registered forward's inputs and outputs, so ``x.grad`` is still the relevance.
        ``"explicit"``: backward carries ``R`` through every rule (what
        :func:`lxt.conservation` reports on).  Both give the same relevance as epsilon -> 0.
    epsilon : float, optional
        Stabiliser of the divisions the gradient engine makes (converting relevance at the
        forward's inputs and outputs and around rules without a gradient form, the identity
        rule's ``y / x``); default :data:`lxt.rules.EPSILON`, and never larger (those divisions
        convert, they do not stabilise a rule: a larger value would change the relevance).
        The rules' own ``epsilon`` is theirs (set in the layer map, e.g. by
        ``lxt.composites.attnlrp(model, epsilon=)``, which passes it here too, clipped): a rule
        with a larger one than the default has its own gradient form (``z / stab(z)`` at its
        output), so both engines give the same relevance.
    strict : bool
        Operations on the relevance path that the layer map leaves with plain gradients
        (products, nonlinearities, custom ``torch.autograd.Function`` classes ...
        ``summary().unsafe``) make the relevance not LRP there: by default a ``UserWarning``
        names each such operation and module at the first forward that runs them; with
        ``strict=True`` that forward raises ``ValueError`` instead (its output is discarded).
    partial : bool
        Part of a forward that lxt cannot see at all (a ``torch.compile``'d region inside the
        model) runs without any rule: by default the forward raises ``RuntimeError`` naming
        it; ``partial=True`` accepts such a partial result with a warning
        (``summary().failure`` says what was not covered).  ``strict=True`` always refuses.
    method : {"attnlrp", "cp-lrp"}, optional
        The method the layer map implements (set by the shipped tables; ``None`` for a
        custom map).  :func:`lxt.explain` refuses a composite of another method.

    Examples
    --------
    >>> comp = Composite({nn.Linear: rules.EpsilonRule, operator.add: lf.add2})
    >>> with comp.context(model) as m:
    ...     logits = m(inputs_embeds=emb).logits
    ...     logits[0, -1, target].backward()
    >>> relevance = emb.grad.sum(-1)
    """

    def __init__(self, layer_map=None, overrides: Optional[Mapping] = None, *, trace: bool = True,
                 freeze_parameters: bool = True, name: Optional[str] = None,
                 engine: str = "gradient", epsilon: Optional[float] = None, strict: bool = False,
                 method: Optional[str] = None, partial: bool = False):
        if engine not in ENGINES:
            raise ValueError(f"lxt: engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}.")
        if method not in (None,) + METHODS:
            raise ValueError(f"lxt: method must be one of {', '.join(map(repr, METHODS))} or None "
                             f"(a custom layer map), got {method!r}.")
        self.engine = engine
        from ..rules.rules import _check_epsilon

        # the gradient engine's divisions convert R <-> g = R / x and back: exact inverses up
        # to their stabiliser, which therefore never exceeds the default (a table's larger
        # epsilon is its rules', see the epsilon parameter)
        self.epsilon = EPSILON if epsilon is None else min(EPSILON, _check_epsilon(epsilon))
        self.strict = bool(strict)
        self.partial = bool(partial)
        self.method = method
        self.layer_map = LayerMap(layer_map)
        if overrides is not None and not isinstance(overrides, Mapping):
            raise TypeError("lxt: overrides is a dict {'qualified.name.pattern*': {matcher: rule}}.")
        self.overrides: list[tuple[str, LayerMap]] = []
        for pattern, sub in (overrides or {}).items():
            if not isinstance(pattern, str):
                raise TypeError(f"lxt: override keys are qualified-name patterns (str), got {pattern!r}.")
            if not isinstance(sub, (Mapping, LayerMap)):
                raise TypeError(f"lxt: override {pattern!r} must map to a layer map dict, got {type(sub).__name__}.")
            self.overrides.append((pattern, LayerMap(sub, where=f"override {pattern!r}")))
        self.trace = trace
        self.freeze_parameters = freeze_parameters
        self.name = name or "Composite"
        self.model: Optional[nn.Module] = None
        self._undo: list[Callable[[], None]] = []
        self._modules: list[tuple[str, str, str, bool]] = []  # (name, type, rule, kept as it is)
        self._dispatcher: Optional[Dispatcher] = None
        self._warned: set = set()  # (op, module) pairs already warned about
        self._resolved: dict = {}  # (target, module type, override maps) -> (replacement, label)
        self._module_values: dict = {}  # (module type, parent type, override maps) -> (found, value)
        self._swaps: list = []  # (parent, name, original, replacement), for suspended()
        self._installed: Optional[tuple] = None  # (had forward, previous, installed)

    # ------------------------------------------------------------------ lookup
    def _maps_for(self, names: list[str]) -> list[LayerMap]:
        maps = [m for pattern, m in self.overrides if _matches(pattern, names)]
        return maps + [self.layer_map]

    def _module_value(self, qualname: str, module: nn.Module, parent: Optional[nn.Module] = None):
        maps = self._maps_for(_ancestors(qualname))
        key = (type(module), type(parent), tuple(map(id, maps)))  # what the answer depends on
        found = self._module_values.get(key)
        if found is None:
            found = False, None
            for lm in maps:
                hit, value, _ = lm.module_value(module, parent)
                if hit:
                    found = True, value
                    break
            self._module_values[key] = found
        return found

    def _resolve_call(self, target, info):
        """(replacement, label) for a call of ``target`` inside the module ``info`` (a
        :class:`lxt.core.dispatch.ModuleInfo`); (None, None) for plain gradient, or
        (None, CHOSEN_PLAIN) where the map says ``None``.  The answer depends on the op, the
        module's type and the override patterns its name matches: looked up once for each."""
        maps = self._maps_for(info.names)
        key = (target, info.type, tuple(map(id, maps)))
        try:
            found = self._resolved.get(key)
        except TypeError:  # an unhashable target
            found, key = None, None
        if found is None:
            found = (None, None)
            for lm in maps:
                hit, value, _ = lm.call_value(target, info.type)
                if hit:
                    found = ((None, CHOSEN_PLAIN) if value is None  # plain gradient by the user's choice
                             else (_call_replacement(value, target), _describe(value)))
                    break
            if key is not None:
                self._resolved[key] = found
        return found

    @property
    def _gradient(self) -> bool:
        return self.engine == "gradient"

    # ------------------------------------------------------------------ register / remove
    def register(self, model: nn.Module) -> nn.Module:
        """Patch ``model`` in place and return it.

        Registering the same model again with this composite first restores the previous
        registration.  A composite serves one model at a time: registering it on another model
        while it is registered is refused (call ``remove()`` first, or use a second
        composite), and so is a model registered by another composite (call that composite's
        ``remove``).  Nothing is left half-patched: if building a rule fails, every change is
        undone and the error names the module.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"lxt: Composite.register needs an nn.Module, got {type(model).__name__}.")
        if self.model is not None and self.model is not model:
            raise RuntimeError(
                f"lxt: {self.name} is registered on a {type(self.model).__name__}; a composite "
                "serves one model at a time. Call its remove() (or leave its context) first, or "
                "build a second composite for this model."
            )
        self.remove()
        named = list(model.named_modules())  # one walk, for the checks and records below
        other = getattr(model.__dict__.get("forward"), "lxt_composite", None)
        if other is not None or _holds_lxt_wrappers(named):
            raise RuntimeError(
                "lxt: this model is already registered with another composite; call its "
                "remove() (or leave its context) before registering a new one."
            )
        if model.training:
            warnings.warn("lxt: the model is in training mode (dropout is active); call "
                          "model.eval() for deterministic explanations.", stacklevel=2)
        self._check_overrides(model, named)
        plan, covered = self._plan_modules(model)  # builds every replacement before changing anything
        self.model = model
        try:
            self._undo.append(keep_cpu_layout(named))  # bitsandbytes 4-bit layers keep a backward
            self._record_training(named)
            for parent, child_name, original, replacement, qualname, label in plan:
                if replacement is not original:
                    self._swap(parent, child_name, original, replacement)
                self._modules.append((qualname, type(original).__name__, label, replacement is original))
            if self.freeze_parameters:
                self._freeze(model)
            self._patch_forward(model, covered)
        except BaseException:
            self.remove()
            raise
        return model

    def remove(self) -> None:
        """Undo every change of :meth:`register` (in reverse order). Safe to call twice."""
        while self._undo:
            undo = self._undo.pop()
            undo()
        self.model = None
        self._modules = []
        self._swaps = []
        self._installed = None

    @contextlib.contextmanager
    def context(self, model: nn.Module):
        """``with comp.context(model) as m:`` registers, yields the model, and restores it on
        exit — also when the body raises (KeyboardInterrupt included)."""
        self.register(model)
        try:
            yield model
        finally:
            self.remove()

    @contextlib.contextmanager
    def suspended(self):
        """Inside the block the registered model computes as if unregistered (its own modules
        and forward, plain gradients); on exit the registration is back as it was, what it
        learned included.  Parameters stay frozen and training flags untouched.  Used by
        :func:`lxt.explain` for the baseline methods."""
        if self.model is None:
            yield
            return
        model = self.model
        swaps = list(self._swaps)
        had, previous, installed = self._installed or (False, None, None)
        dispatcher, was = self._dispatcher, self._dispatcher.suspended if self._dispatcher else False
        for parent, name, original, _ in reversed(swaps):
            parent._modules[name] = original
        if installed is not None:
            if had:
                model.__dict__["forward"] = previous
            else:
                model.__dict__.pop("forward", None)
        if dispatcher is not None:
            dispatcher.suspended = True
        try:
            yield
        finally:
            if dispatcher is not None:
                dispatcher.suspended = was
            for parent, name, _, replacement in swaps:
                parent._modules[name] = replacement
            if installed is not None:
                model.__dict__["forward"] = installed

    def __enter__(self):
        raise TypeError("lxt: use `with composite.context(model) as m:`.")

    def __exit__(self, *exc):  # pragma: no cover - symmetric to __enter__
        return False

    # ------------------------------------------------------------------ pieces
    def _check_overrides(self, model: nn.Module, named: list) -> None:
        names = [n for n, _ in named if n]
        for pattern, _ in self.overrides:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                warnings.warn(f"lxt: override pattern {pattern!r} matches no module of "
                              f"{type(model).__name__}; it has no effect.", stacklevel=3)

    def _plan_modules(self, model: nn.Module) -> tuple:
        """``(plan, covered)``: the module swaps to make (``(parent, name, original,
        replacement, qualname, label)``; a replacement that is the original stays as it is)
        and the ids of modules that already run their own rule."""
        plan, covered = [], set()

        def visit(parent: nn.Module, prefix: str):
            for child_name, child in list(parent._modules.items()):
                if child is None:
                    continue
                qualname = f"{prefix}.{child_name}" if prefix else child_name
                if isinstance(child, LxtModule):
                    covered.add(id(child))  # already carries a rule: never nest
                    continue
                if type(child).__name__ == "OptimizedModule" and isinstance(
                        getattr(child, "_orig_mod", None), nn.Module):
                    # a torch.compile'd submodule runs as its original module while registered
                    # (compiled code would run without the rules)
                    original = child._orig_mod
                    plan.append((parent, child_name, child, original, qualname, "its uncompiled module"))
                    child = original
                found, value = self._module_value(qualname, child, parent)
                if found and value is not None:
                    replacement = self._module_rule(value, child, qualname)
                    if isinstance(replacement, LxtModule):
                        replacement.__dict__["_lxt_engine"] = (self._gradient, self.epsilon)
                        hook = getattr(child, "_hf_hook", None)
                        if hook is not None and not isinstance(child, LxtModule):
                            replacement.__dict__["_lxt_offload"] = hook  # accelerate's offloading
                    covered.add(id(replacement))  # runs its own rule: nothing rewritten inside
                    if plan and plan[-1][3] is child and plan[-1][2] is not child:  # uncompiled, then replaced
                        plan[-1] = plan[-1][:3] + (replacement,) + plan[-1][4:5] + (_describe(value),)
                    else:
                        plan.append((parent, child_name, child, replacement, qualname, _describe(value)))
                    continue
                visit(child, qualname)

        visit(model, "")
        visit = None  # noqa: F841 - the recursive closure refers to itself: free it now, not by gc
        return plan, covered

    def _module_rule(self, value, module: nn.Module, qualname: str) -> nn.Module:
        """The module that runs ``module`` under ``value``; ``module`` itself where the rule
        is its plain gradient in this engine (the gradient engine leaves such layers, e.g.
        linear layers under the epsilon rule, as they are)."""
        if self._gradient:
            rule = value() if isinstance(value, type) and issubclass(value, Rule) else value
            if isinstance(rule, Rule) and rule.plain_gradient_module:
                try:
                    rule.check_module(module)
                except Exception as err:
                    raise TypeError(f"lxt: cannot build {_describe(value)} for module '{qualname}' "
                                    f"({type(module).__name__}): {err}") from err
                return module
        return _build_module(value, module, qualname)

    def _swap(self, parent: nn.Module, name: str, original: nn.Module, replacement: nn.Module):
        def undo(parent=parent, name=name, original=original):
            parent._modules[name] = original

        self._undo.append(undo)
        parent._modules[name] = replacement
        self._swaps.append((parent, name, original, replacement))

    def _record_training(self, named: list) -> None:
        """``remove`` gives every module its own training flag back (``model.train()`` /
        ``eval()`` while registered set them all)."""
        flags = [(m, m.training) for _, m in named]

        def undo(flags=flags):
            for m, f in flags:
                m.training = f

        self._undo.append(undo)

    def _freeze(self, model: nn.Module) -> None:
        named = list(model.named_parameters(remove_duplicate=False))
        flags = [p.requires_grad for _, p in named]
        by_name = {n: f for (n, _), f in zip(named, flags)}

        def undo(model=model, named=named, flags=flags, by_name=by_name):
            for (_, p), f in zip(named, flags):
                p.requires_grad_(f)
            # parameters replaced meanwhile (accelerate's offloading swaps the objects)
            for n, p in model.named_parameters(remove_duplicate=False):
                if n in by_name and p.requires_grad != by_name[n]:
                    p.requires_grad_(by_name[n])

        self._undo.append(undo)
        for _, p in named:
            p.requires_grad_(False)

    def _patch_forward(self, model: nn.Module, covered: set) -> None:
        had = "forward" in model.__dict__
        previous = model.__dict__.get("forward")

        def undo(model=model, had=had, previous=previous):
            if had:
                model.__dict__["forward"] = previous
            else:
                model.__dict__.pop("forward", None)

        self._undo.append(undo)
        dispatcher = self._dispatcher = Dispatcher(self._resolve_call, self._gradient, self.epsilon,
                                                   trace=self.trace)
        self._undo.append(dispatcher.remove)
        self._warned = set()
        root = dispatcher.install(model, covered)
        original = model.forward  # bound method (or a previous instance forward, e.g. accelerate's)
        forward = PatchedForward(original, dispatcher, root, check=self._after_forward,
                                 gradient=self._gradient, epsilon=self.epsilon, composite=self)
        model.__dict__["forward"] = forward
        self._installed = (had, previous, forward)

    def _after_forward(self, records) -> None:
        """After a forward that ran operations not seen before: refuse (``strict``, or a part
        lxt could not see) or warn once per operation and module about unsafe ones."""
        unsafe = unsafe_ops(records)
        failure = self._dispatcher.failure if self._dispatcher is not None else None
        if self.strict and unsafe:
            raise ValueError(
                f"lxt: strict {self.name}: operations on the relevance path have no LRP rule: "
                f"{describe_ops(unsafe)}. Map them in the layer map ({suggest(unsafe)}), or map "
                "them to None to accept plain gradients there."
            )
        compiled = [r for r in records if r.status == "compiled region"]
        if compiled and (self.strict or not self.partial):
            raise RuntimeError(
                f"lxt: {failure}, so the relevance would not be LRP there; explain the model "
                "without torch.compile inside it, or pass partial=True to accept a partial result.")
        fresh = [r for r in unsafe if (r.op, r.module) not in self._warned]
        if compiled:
            warnings.warn(f"lxt: {failure}: the result is partial (partial=True).", UserWarning, stacklevel=4)
        if fresh:
            self._warned.update((r.op, r.module) for r in fresh)
            warnings.warn(
                f"lxt: operations on the relevance path have no LRP rule and pass plain gradients, "
                f"so the relevance is not LRP there: {describe_ops(fresh)}. Map them in the "
                f"composite's layer map ({suggest(fresh)}), or pass strict=True to the Composite "
                "to make this an error. Composite.summary() lists every operation.",
                UserWarning, stacklevel=4)

    # ------------------------------------------------------------------ report
    @property
    def captured_ops(self) -> list[OpRecord]:
        """Every floating-point operation the registered forward has run (after at least one
        forward; nothing is captured, the name is historical)."""
        return list(self._dispatcher.records.values()) if self._dispatcher is not None else []

    def summary(self) -> "Summary":
        """What every module with a rule and every operation seen in the forward got.

        Modules are known after ``register``; operations after the first forward.  Operations
        left with plain gradients are marked *compatible* (their gradient is the relevance:
        reshapes, indexing, dtype casts), *not LRP-safe* (they need a rule: products, sums,
        nonlinearities) or *unknown*.
        """
        return Summary(self)

    def __repr__(self):
        state = f"registered on {type(self.model).__name__}" if self.model is not None else "not registered"
        return (f"<{self.name}: {len(self.layer_map)} entries, {len(self.overrides)} overrides, "
                f"{self.engine} engine, {state}>")


_ELEMENTWISE = "lxt.rules.IdentityRule (an elementwise function)"
#: what fits each op, for the messages about operations without a rule
SUGGESTIONS = {
    "add": "operator.add: lxt.functional.add2", "sub": "operator.sub: lxt.rules.EpsilonRule",
    "mul": "operator.mul: lxt.functional.mul2", "div": "operator.truediv: lxt.functional.div",
    "neg": "operator.neg: lxt.rules.IdentityRule", "matmul": "torch.matmul: lxt.functional.matmul",
    "bmm": "torch.bmm: lxt.functional.matmul", "mm": "torch.mm: lxt.functional.matmul",
    "baddbmm": "torch.baddbmm: lxt.rules.UniformEpsilonRule",
    "einsum": "torch.einsum: lxt.rules.UniformEpsilonRule",
    "addmm": "torch.addmm: lxt.rules.EpsilonRule", "linear": "F.linear: lxt.functional.linear_epsilon",
    "softmax": "F.softmax: lxt.functional.softmax", "sigmoid": "torch.sigmoid: lxt.functional.sigmoid",
    "tanh": "torch.tanh: lxt.functional.tanh", "silu": "F.silu: lxt.functional.silu",
    "gelu": "F.gelu: lxt.functional.gelu", "relu": "F.relu: lxt.functional.relu",
    "layer_norm": "F.layer_norm: lxt.functional.layer_norm", "rms_norm": "F.rms_norm: lxt.functional.rms_norm",
    "normalize": "F.normalize: lxt.functional.normalize", "mean": "torch.mean: lxt.functional.mean",
    "sum": "torch.sum: lxt.rules.EpsilonRule", "index_add": "torch.index_add: lxt.functional.index_add",
    "scaled_dot_product_attention": "F.scaled_dot_product_attention: lxt.functional.sdpa",
}


def suggest(records) -> str:
    """What to map each op of ``records`` to (``operator.mul: lxt.functional.mul2``; an
    elementwise function: the identity rule; a custom autograd Function: its module)."""
    out = []
    for op in dict.fromkeys(r.op for r in records):
        if op.startswith("autograd.Function"):
            hint = "the module that calls the Function, e.g. {ThatModule: lxt.rules.IdentityRule}"
        else:
            hint = SUGGESTIONS.get(op) or f"'{op}': {_ELEMENTWISE}"
        if hint not in out:
            out.append(hint)
    return "; ".join(out)


def _holds_lxt_wrappers(named: list) -> bool:
    from ..rules.base import RuleModule

    return any(isinstance(m, RuleModule) for _, m in named)


def _build_module(value, module: nn.Module, qualname: str) -> nn.Module:
    try:
        if isinstance(value, type) and issubclass(value, Rule):
            value = value()
        if isinstance(value, Rule):
            return value(module)
        if hasattr(value, "from_module"):
            new = value.from_module(module)
        else:
            new = value(module)
        if not isinstance(new, nn.Module):
            raise TypeError(f"the factory returned {type(new).__name__}, not an nn.Module")
        return new
    except Exception as err:
        raise TypeError(
            f"lxt: cannot build {_describe(value)} for module '{qualname}' "
            f"({type(module).__name__}): {err}"
        ) from err


def _call_replacement(value, target) -> Callable:
    if isinstance(value, type) and issubclass(value, Rule):
        value = value()
    if isinstance(value, Rule):
        fn = getattr(torch.Tensor, target) if isinstance(target, str) else target
        return value(fn)
    return value


class Summary:
    """Table of what a composite did to a model (``print(comp.summary())``)."""

    def __init__(self, comp: Composite):
        self.name = comp.name
        self.engine = comp.engine
        self.model_type = type(comp.model).__name__ if comp.model is not None else None
        self.modules = [m[:3] for m in comp._modules]  # (name, type, rule)
        self._kept = [m[3] for m in comp._modules]
        ops = comp.captured_ops
        if any(r.on_path for r in ops):
            ops = [r for r in ops if r.on_path]
        self.ops = ops
        d = comp._dispatcher
        self.failure = d.failure if d is not None else None
        self.calls = d.calls if d is not None else 0

    @property
    def plain(self) -> list[OpRecord]:
        """Operations left with plain gradients."""
        return [r for r in self.ops if not r.rewritten]

    @property
    def unsafe(self) -> list[OpRecord]:
        """Operations left with plain gradients that need an LRP rule."""
        return [r for r in self.ops if not r.rewritten and r.status not in PLAIN_OK]

    def __str__(self) -> str:
        lines = [f"{self.name} on {self.model_type or '(no model)'} ({self.engine} engine)"]
        kept = sum(self._kept)
        lines.append(f"  modules with a rule: {len(self.modules)}"
                     + (f" ({kept} kept as they are: their rule is their plain gradient)" if kept else ""))
        agg: dict = {}
        for name, typ, rule in self.modules:
            agg.setdefault((typ, rule), []).append(name)
        for (typ, rule), names in agg.items():
            lines.append(f"    {len(names):4d} x {typ:<28} -> {rule}   e.g. {names[0]}")
        if self.failure:
            lines.append(f"  NOT COVERED: {self.failure}")
        if self.calls == 0:
            lines.append("  operations: none seen yet (run a forward first)")
        else:
            lines.append(f"  operations seen in {self.calls} forward call{'s' if self.calls != 1 else ''}")
            groups: dict = {}
            for r in self.ops:
                groups.setdefault((r.op, r.status, r.rewritten), []).append(r.module or "(top level)")
            lines.append("  operations rewritten:")
            for (op, status, rewritten), owners in sorted(groups.items(), key=lambda kv: str(kv[0])):
                if rewritten:
                    lines.append(f"    {len(owners):4d} x {op:<30} -> {status}   e.g. in {owners[0]}")
            lines.append("  operations left with plain gradient:")
            for (op, status, rewritten), owners in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                if not rewritten:
                    lines.append(f"    {len(owners):4d} x {op:<30} [{status}]   e.g. in {owners[0]}")
        return "\n".join(lines)

    def __repr__(self):
        return str(self)
