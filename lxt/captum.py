"""AttnLRP and CP-LRP with captum's interface: swap one class name.

>>> from lxt.captum import AttnLRP, LayerAttnLRP
>>> attributions, delta = AttnLRP(model).attribute(input_ids, target=token_id,
...                                                 return_convergence_delta=True)
>>> layer_relevance = LayerAttnLRP(model, model.model.layers[0]).attribute(input_ids, target=token_id)

The classes follow captum's conventions (``captum.attr.LRP``, ``LayerLRP``): ``inputs`` is a
tensor or a tuple of tensors whose first dimension is the batch, the model is called as
``model(*inputs, *additional_forward_args)``, ``target`` selects one output per example as in
captum (an int, a tuple, a list with one per example, a tensor), and the attributions have the
shape of the inputs (a tuple for a tuple).  The relevance is LRP: the model is registered with
``lxt.composites.attnlrp(model)`` (``cp_lrp``) for the call only, the backward pass starts with
``R`` = the selected output, so relevance is in the units of that output and sums (up to what
biases absorb) to it; ``delta`` is that output minus the sum of each example's relevance.

- **Float inputs** (``pixel_values``, ``inputs_embeds``, a plain model's input): relevance of
  the same shape.  A float tensor in the ``input_ids`` place of a HuggingFace text model is
  passed as ``inputs_embeds``.
- **Token ids** (an integer ``input_ids``): they run through ``model.get_input_embeddings()``,
  the model gets ``inputs_embeds=``, and the relevance is per token, ``(batch, seq)`` (summed
  over the hidden dimension).
- **Outputs**: a model output with ``.logits`` gives its logits.  A causal language model's
  ``(batch, seq, vocab)`` logits are taken at the last position (the next token; pad on the
  left, and pass ``attention_mask`` in ``additional_forward_args``); other 3-d outputs (a
  masked LM) keep every position: select with ``target=(position, token)``.
- The model runs in eval mode; ``use_cache=False`` (and ``logits_to_keep=1`` for a causal LM)
  is passed where the forward takes it and the call does not set it.  Afterwards the model is
  exactly as it was, also when the call raises.  Inside ``with comp.context(model):`` the
  registered composite is used as it is.

captum's own classes inside a ``comp.context(model)``
------------------------------------------------------
captum starts the backward pass with 1, lxt with the explained value ``y``, so inside a
context captum's gradients are the relevance divided by ``y`` (per example).  With ``x`` an
input of the registered forward (embeddings, pixels; ``f`` a function calling the model),
``a`` a layer's output and ``R`` the lxt relevance:

===========================================================  ===============  ===============
captum class, inside the context                             gradient engine  explicit engine
===========================================================  ===============  ===============
``Saliency(f).attribute(x, target, abs=False)``              ``R / y``        ``R / y``
``InputXGradient(f)``                                        ``x R / y``      ``x R / y``
``LayerGradientXActivation(f, layer)``                       ``R / y``        ``a R / y``
``LayerGradientXActivation(..., multiply_by_inputs=False)``  ``R / (a y)``    ``R / y``
===========================================================  ===============  ===============

(``layer``: the input embedding fed with token ids, or any inner layer.)  So ``Saliency``
times ``y`` is LRP in both engines, the layer classes in one engine each, and
``InputXGradient`` in none; :class:`AttnLRP` / :class:`LayerAttnLRP` give ``R`` in either.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

try:
    from captum.attr import GradientAttribution, LayerAttribution
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("lxt: lxt.captum needs captum: pip install lxt[captum]") from e

from .explain import (_eval_mode, _kind, _patched, _uncovered, _user_modules, gradient_engine,
                      registered_composite)

__all__ = ["AttnLRP", "CPLRP", "LayerAttnLRP", "LayerCPLRP"]


def _positional_names(model: nn.Module) -> tuple:
    """``(positional parameter names, all parameter names)`` of ``model.forward``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return [], set()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [n for n, p in params.items() if p.kind in kinds], set(params)


def _as_tuple(value) -> tuple:
    if value is None:
        return ()
    return value if isinstance(value, tuple) else (value,)


def _check_inputs(inputs) -> tuple:
    xs = _as_tuple(inputs)
    if not xs:
        raise ValueError("lxt: no inputs given; pass a tensor or a tuple of tensors.")
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"lxt: inputs must be tensors (first dimension the batch); input {i} "
                            f"is {type(x).__name__}. Pass other arguments in additional_forward_args.")
        if x.dim() == 0:
            raise ValueError(f"lxt: input {i} is a scalar; its first dimension must be the batch.")
    sizes = {x.shape[0] for x in xs}
    if len(sizes) > 1:
        raise ValueError(f"lxt: the inputs have different batch sizes {sorted(sizes)}.")
    return xs


def _check_target(target, batch: int) -> None:
    """What can be checked before the forward: one target per example where a list is given."""
    if isinstance(target, bool) or (target is not None and not isinstance(target, (int, tuple, list, Tensor))):
        raise TypeError(f"lxt: target must be an int, a tuple, a list or a tensor (as in captum), "
                        f"got {target!r}.")
    n = len(target) if isinstance(target, list) else (
        target.numel() if isinstance(target, Tensor) and target.numel() > 1 else None)
    if n is not None and n != batch:
        raise ValueError(f"lxt: {n} targets for a batch of {batch}; give one per example, or one "
                         "int for all.")


def _selected(output, target, batch: int, causal: bool) -> Tensor:
    """The explained value per example, ``(batch,)``, picked by captum's own target rule."""
    from captum._utils.common import _select_targets

    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor):
        raise TypeError(f"lxt: the model returned {type(output).__name__}; attribution needs a "
                        "tensor (batch, ...) or an output with .logits.")
    if causal and logits.dim() == 3:
        logits = logits[:, -1]  # the next token
    try:
        values = _select_targets(logits, target)
    except (AssertionError, IndexError, RuntimeError) as e:
        raise ValueError(f"lxt: target {target!r} does not select an output of shape "
                         f"{tuple(logits.shape)}: {e}") from None
    if values.numel() != batch:
        hint = (f"target=None, but the model gives {values.numel() // batch} outputs per example"
                if target is None else f"target {target!r} selects shape {tuple(values.shape)}")
        raise ValueError(f"lxt: {hint}, not one value per example; pass target= (a class or token "
                         "index, a list with one per example, or a tuple of indices).")
    return values.reshape(batch)


class AttnLRP(GradientAttribution):
    """AttnLRP (Achtibat et al., ICML 2024) as a captum attribution class.

    Parameters
    ----------
    model : nn.Module
        The model (a HuggingFace model, or any ``nn.Module`` a composite covers), called as
        ``model(*inputs, *additional_forward_args)``.
    epsilon : float, optional
        Stabiliser of the epsilon-family rules (``lxt.composites.attnlrp(model, epsilon=)``).
    engine : {"gradient", "explicit"}, optional
        The composite's engine (default ``"gradient"``).
    composite : lxt.Composite, optional
        Use this composite instead of ``lxt.composites.attnlrp(model)`` (not with ``epsilon``
        or ``engine``).
    partial : bool
        An operation on the relevance path without an LRP rule raises ``ValueError`` (as in
        :func:`lxt.explain`); ``True`` returns the result with a warning instead.

    Examples
    --------
    >>> lrp = AttnLRP(model)
    >>> relevance = lrp.attribute(input_ids, target=token_id)            # (batch, seq)
    >>> relevance, delta = lrp.attribute(pixel_values, target=[3, 5], return_convergence_delta=True)
    """

    method = "attnlrp"

    def __init__(self, model: nn.Module, *, epsilon: Optional[float] = None,
                 engine: Optional[str] = None, composite=None, partial: bool = False):
        from .core.composite import ENGINES, Composite

        if not isinstance(model, nn.Module):
            raise TypeError(f"lxt: {type(self).__name__} needs the model (an nn.Module) to register "
                            f"its rules on, got {type(model).__name__}.")
        if composite is not None:
            if not isinstance(composite, Composite):
                raise TypeError(f"lxt: composite must be an lxt.Composite, got {type(composite).__name__}.")
            if epsilon is not None or engine is not None:
                raise ValueError("lxt: pass composite= or epsilon= / engine=, not both (a composite "
                                 "has its own).")
            self._check_method(composite)
        if engine is not None and engine not in ENGINES:
            raise ValueError(f"lxt: engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}.")
        if not isinstance(partial, bool):
            raise TypeError(f"lxt: partial must be True or False, got {partial!r}.")
        GradientAttribution.__init__(self, model)
        self.epsilon, self.engine, self.composite, self.partial = epsilon, engine, composite, partial

    # ------------------------------------------------------------------ captum API
    def attribute(self, inputs, target=None, additional_forward_args=None,
                  return_convergence_delta: bool = False):
        """LRP relevance of each input for the selected output.

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            First dimension the batch.  Float tensors get relevance of their own shape;
            token ids (an integer ``input_ids``) per token, ``(batch, seq)``.
        target : int, tuple, list or Tensor, optional
            The output to explain, as in captum (``None``: the model gives one value per
            example).
        additional_forward_args : object or tuple, optional
            Further positional arguments of the model (``attention_mask``, ...).
        return_convergence_delta : bool
            Also return ``delta``, ``(batch,)``: the selected output minus the sum of the
            example's relevance.

        Returns
        -------
        attributions, or ``(attributions, delta)``
        """
        xs = _check_inputs(inputs)
        rel, values = self._run(xs, target, additional_forward_args)
        out = rel if isinstance(inputs, tuple) else rel[0]
        return (out, self.compute_convergence_delta(out, values)) if return_convergence_delta else out

    def has_convergence_delta(self) -> bool:
        return True

    def compute_convergence_delta(self, attributions, output: Tensor) -> Tensor:
        """``output`` (one value per example) minus the sum of each example's attributions."""
        total = sum(a.reshape(a.shape[0], -1).sum(1) for a in _as_tuple(attributions))
        return output.detach().reshape(-1) - total.to(output.dtype)

    @property
    def multiplies_by_inputs(self) -> bool:
        return True

    # ------------------------------------------------------------------ work
    def _check_method(self, comp) -> None:
        if comp.method is not None and comp.method != self.method:
            other = {"attnlrp": "AttnLRP", "cp-lrp": "CPLRP"}[comp.method]
            layer = "Layer" if isinstance(self, LayerAttribution) else ""
            raise ValueError(f"lxt: the composite {comp.name} implements {comp.method!r}, not "
                             f"{self.method!r}: use {layer}{other}, or a {self.method} composite.")

    def _composite_for(self, model):
        from . import composites
        from .explain import _check_composite

        registered = registered_composite(model)
        if registered is not None:
            if self.epsilon is not None or self.engine is not None:
                raise ValueError(f"lxt: the model is registered with {registered.name} "
                                 "(comp.context(model)), which is used as it is: drop epsilon= / "
                                 "engine=, or leave the context.")
            self._check_method(registered)
        comp = self.composite if self.composite is not None else registered
        _check_composite(model, self.method, comp)
        if comp is None:
            options = {k: v for k, v in (("epsilon", self.epsilon), ("engine", self.engine)) if v is not None}
            build = composites.attnlrp if self.method == "attnlrp" else composites.cp_lrp
            comp = build(model, **options)
        return comp

    def _run(self, xs: tuple, target, extra, layer: Optional[str] = None):
        """``(relevance of each input, values)``, or ``(relevance of layer's output, values)``."""
        model = self.forward_func
        _check_target(target, xs[0].shape[0])
        with torch.inference_mode(False), torch.enable_grad(), _eval_mode(model), \
                _patched(model, self.method, self._composite_for(model)):
            (args, kwargs), leaves, embedded = _arguments(model, xs, _as_tuple(extra))
            # the input embedding fed with token ids does not run: its output is a leaf
            at_embedding = layer is not None and embedded is not None and layer == embedded[1]
            found: dict = {}
            with (_layer_tap(model, layer, found) if layer is not None and not at_embedding
                  else contextlib.nullcontext()):
                out = model(*args, **kwargs)
                values = _selected(out, target, xs[0].shape[0], _kind(model) == "causal")
                missing = _uncovered(model, self.method, self.partial)
                if missing:
                    warnings.warn(f"lxt: partial {self.method} result: {missing}", UserWarning,
                                  stacklevel=3)
                grads = torch.autograd.grad(values, leaves, values.detach(), allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g.detach() for leaf, g in zip(leaves, grads)]
        values = values.detach()
        if at_embedding:
            return grads[embedded[0]], values
        if layer is not None:
            return _layer_result(found, layer), values
        return tuple(g.sum(-1) if embedded is not None and i == embedded[0] else g
                     for i, g in enumerate(grads)), values


def _arguments(model: nn.Module, xs: tuple, extra: tuple):
    """``((args, kwargs), leaves, embedded)`` of the call ``model(*inputs, *extra)``: a leaf per
    input, token ids replaced by their embeddings (``inputs_embeds=``); ``embedded`` is
    ``(index of the token-id input, name of the input embedding)`` or ``None``."""
    from .explain import _embedding

    names, params = _positional_names(model)
    text = "input_ids" in params and "inputs_embeds" in params
    slot = names.index("input_ids") if text and "input_ids" in names[:len(xs)] else None
    leaves, embedded = [], None
    for i, x in enumerate(xs):
        if x.is_floating_point():
            leaves.append(x.detach().requires_grad_())
        elif i == slot:
            layer = _embedding(model)
            with torch.no_grad():
                base = layer(x)
            if not torch.isfinite(base).all():
                raise ValueError("lxt: the input embeddings contain NaN or inf; relevance would be NaN.")
            leaves.append(base.detach().requires_grad_())
            embedded = i, next((n for n, m in _user_modules(model) if m is layer), None)
        else:
            where = ("takes no inputs_embeds" if not text else
                     f"takes it as {names[i]!r}" if i < len(names) else "takes it as an extra argument")
            raise TypeError(f"lxt: input {i} is a {x.dtype} tensor and {type(model).__name__}.forward "
                            f"{where}: relevance goes to float inputs and to token ids (input_ids). "
                            "Pass other integer arguments in additional_forward_args.")
    args = [*leaves, *extra]
    taken = set(names[:len(args)])
    kwargs = {}
    if slot is not None:  # a float in the input_ids place, or token ids: inputs_embeds=
        if len(args) > len(names):
            raise TypeError(f"lxt: {len(args)} positional arguments (inputs, then "
                            f"additional_forward_args) for {type(model).__name__}.forward, which "
                            f"takes {len(names)}.")
        kwargs = dict(zip(names, args))
        kwargs["inputs_embeds"] = kwargs.pop("input_ids")
        args = []
    if "use_cache" in params and "use_cache" not in taken:
        kwargs["use_cache"] = False
    if "logits_to_keep" in params and "logits_to_keep" not in taken and _kind(model) == "causal":
        kwargs["logits_to_keep"] = 1  # only the explained position goes through the head
    return (args, kwargs), leaves, embedded


class CPLRP(AttnLRP):
    """CP-LRP (Ali et al., ICML 2022) as a captum attribution class; the parameters are
    :class:`AttnLRP`'s (``composite=`` a CP-LRP composite, default
    ``lxt.composites.cp_lrp(model)``)."""

    method = "cp-lrp"


# ---------------------------------------------------------------------- layers
def _layer_name(model: nn.Module, layer) -> str:
    modules = _user_modules(model)
    if isinstance(layer, str):
        if layer not in dict(modules):
            raise ValueError(f"lxt: {type(model).__name__} has no submodule {layer!r}.")
        return layer
    if not isinstance(layer, nn.Module):
        raise TypeError(f"lxt: layer must be a submodule of the model or its name, got {type(layer).__name__}.")
    name = next((n for n, m in modules if m is layer), None)
    if name is None:
        raise ValueError(f"lxt: the layer {type(layer).__name__} is not a submodule of "
                         f"{type(model).__name__} (inside a comp.context(model) a module with a "
                         "rule is replaced: give the layer's name instead).")
    return name


@contextlib.contextmanager
def _layer_tap(model, name: str, found: dict):
    """Keep the relevance of the output of the submodule ``name`` in ``found``."""
    from .core.opaque import add_tap, remove_tap, tap

    module = dict(_user_modules(model))[name]
    gradient = gradient_engine(model)  # backward carries R / activation there

    def keep(grad, value):
        found["relevance"] = (grad * value if gradient else grad).detach()

    key = add_tap(keep)

    def hook(mod, args, out):
        found["runs"] = found.get("runs", 0) + 1
        first = out[0] if isinstance(out, tuple) and out and isinstance(out[0], Tensor) else out
        if not isinstance(first, Tensor):
            raise TypeError(f"lxt: the layer {name} returned {type(out).__name__}; a layer's "
                            "relevance is that of its output tensor (or the first of a tuple).")
        found["output"] = first.detach()
        return tap(key, out) if first is out else (tap(key, first),) + tuple(out[1:])

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        remove_tap(key)


def _layer_result(found: dict, name: str) -> Tensor:
    runs = found.get("runs", 0)
    if runs == 0:
        raise ValueError(f"lxt: the layer {name} did not run in the forward (given inputs_embeds, "
                         "the input embedding does not run: pass the token ids).")
    if runs != 1:
        raise ValueError(f"lxt: the layer {name} ran {runs} times in the forward; its relevance is "
                         "defined for a layer that runs once.")
    if "relevance" not in found:  # not on the relevance path
        return torch.zeros_like(found["output"])
    return found["relevance"]


class LayerAttnLRP(AttnLRP, LayerAttribution):
    """AttnLRP relevance of a layer's output, as captum's ``LayerLRP``.

    Parameters
    ----------
    model : nn.Module
        As for :class:`AttnLRP`.
    layer : nn.Module or str
        A submodule of ``model`` (or its qualified name, ``"model.layers.0"``) that runs once
        per forward; its output (the first tensor of a tuple) is attributed.  The input
        embedding fed with token ids gives the relevance of each embedding dimension.
    epsilon, engine, composite, partial
        As for :class:`AttnLRP`.

    Examples
    --------
    >>> relevance = LayerAttnLRP(model, model.model.layers[0]).attribute(input_ids, target=token_id)
    >>> relevance.shape                                          # (batch, seq, hidden)
    """

    def __init__(self, model: nn.Module, layer, *, epsilon: Optional[float] = None,
                 engine: Optional[str] = None, composite=None, partial: bool = False):
        AttnLRP.__init__(self, model, epsilon=epsilon, engine=engine, composite=composite, partial=partial)
        LayerAttribution.__init__(self, model, layer)
        _layer_name(model, layer)  # fail early

    def attribute(self, inputs, target=None, additional_forward_args=None,
                  return_convergence_delta: bool = False):
        """LRP relevance of the layer's output for the selected output.

        Parameters are :meth:`AttnLRP.attribute`'s.

        Returns
        -------
        attributions, or ``(attributions, delta)``
            The relevance of the layer's output (its shape), and ``delta``, ``(batch,)``: the
            selected output minus the sum of the example's layer relevance.
        """
        xs = _check_inputs(inputs)
        name = _layer_name(self.forward_func, self.layer)
        rel, values = self._run(xs, target, additional_forward_args, layer=name)
        return (rel, self.compute_convergence_delta(rel, values)) if return_convergence_delta else rel


class LayerCPLRP(LayerAttnLRP):
    """CP-LRP relevance of a layer's output; the parameters are :class:`LayerAttnLRP`'s."""

    method = "cp-lrp"
