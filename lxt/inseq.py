"""AttnLRP and CP-LRP as inseq attribution methods: ``"attnlrp"`` and ``"cp_lrp"``.

>>> import inseq, lxt
>>> model = inseq.load_model(hf_model, "attnlrp", tokenizer=tokenizer)
>>> out = model.attribute("The capital of France is", generation_args={"max_new_tokens": 3})
>>> out.show()

After ``import lxt`` the two names are in ``inseq.list_feature_attribution_methods()`` as soon
as inseq itself is imported (before or after lxt; ``import lxt`` does not import inseq).
Importing this module imports inseq (``pip install lxt[inseq]``).

What a step gives.  Each generation step explains the step's target token with one forward
and one LRP backward pass of the model registered with ``lxt.composites.attnlrp(model)`` (or
``cp_lrp``): the per-token signed relevance of the prefix, summed over the embedding
dimension, equal to ``lxt.explain(model, tokenizer, prompt, generate=N)`` step by step.  The
model is registered only while ``attribute`` runs (generation runs on the plain model) and is
the user's plain model again when it returns, also after an error.  A model the user has
registered (``with comp.context(model):``) is used with that composite as it is.

What is explained (``attributed_fn``).  LRP distributes a value over the inputs, so the
value must be an output of the network:

* ``"logit"`` (the default while these methods are loaded): the target token's logit;
  relevance sums to it up to absorbed bias terms.
* ``"contrast_logits_diff"`` with ``contrast_targets=``: the logit difference
  target - contrast, as ``lxt.explain(..., contrast=)`` explains it (the epsilon rule on
  ``(w_t - w_c) . h``).

A probability, log-probability, entropy or any other function of the whole output
distribution is refused: the softmax over the vocabulary is not part of the network whose
relevance LRP conserves, and its gradient would mix every other token's logit into the
explanation.  Explain the logit, or the logit difference to the competitor you care about.
``return_convergence_delta=True`` adds the step score ``deltas``: explained value minus the
sum of the relevance (what biases absorbed).
"""
from __future__ import annotations

import torch

try:
    from inseq.attr.feat.gradient_attribution import GradientAttributionRegistry
    from inseq.attr.step_functions import STEP_SCORES_MAP
    from inseq.data import CoarseFeatureAttributionStepOutput
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("lxt: lxt.inseq needs inseq (pip install lxt[inseq]).") from e

from .explain import _eval_mode, _patched, _check_composite

__all__ = ["AttnLRPAttribution", "CPLRPAttribution"]

_LOGIT = "logit"
_CONTRAST = "contrast_logits_diff"


def _explained_parts(attributed_fn):
    """``attributed_fn`` (a registered step function) as a function returning the parts of the
    explained value: ``(batch,)`` the target logit, or ``(batch, 2)`` target and contrast
    logits; ``None`` for a function LRP does not explain."""
    if attributed_fn is STEP_SCORES_MAP.get(_LOGIT):
        return attributed_fn
    if attributed_fn is STEP_SCORES_MAP.get(_CONTRAST):
        logit = STEP_SCORES_MAP[_LOGIT]
        contrast = STEP_SCORES_MAP["contrast_logits"]

        def parts(args, **kwargs):
            return torch.stack([logit(args), contrast(args, **kwargs).to(args.forward_output.logits.device)], -1)

        return parts
    return None


def _name_of(attributed_fn) -> str:
    for name, fn in STEP_SCORES_MAP.items():
        if fn is attributed_fn:
            return repr(name)
    return getattr(attributed_fn, "__name__", repr(attributed_fn))


class _Step:
    """What inseq calls at each step (in place of a captum method): one forward of the
    registered model and the LRP backward, started with R = the explained value."""

    def __init__(self, owner):
        self.owner = owner

    def has_convergence_delta(self) -> bool:
        return True

    def attribute(self, inputs, additional_forward_args, return_convergence_delta: bool = False):
        (embeds,) = inputs
        x = embeds.detach().clone().requires_grad_()
        args = list(additional_forward_args)
        args[2] = _explained_parts(args[2])  # the attributed function (checked in attribute)
        with torch.enable_grad():
            value = self.owner.attribution_model(x, *args)
            if value.dim() == 1:
                value.backward(value.detach())
                explained = value.detach()
            else:  # target and contrast logit: R = t at the target, -c at the contrast
                t, c = value.unbind(-1)
                torch.autograd.backward([t, c], [t.detach(), -c.detach()])
                explained = (t - c).detach()
        relevance = x.grad.float().sum(-1)
        if return_convergence_delta:
            return relevance, (explained.float() - relevance.sum(-1)).cpu()
        return relevance


class _Lxt:
    """What both lxt methods do in inseq (see the module docstring); a mixin, so that inseq's
    registry lists only the two methods."""

    lxt_method = "attnlrp"

    def __init__(self, attribution_model, composite=None, **kwargs):
        super().__init__(attribution_model, hook_to_model=False)
        self.composite = composite
        self.method = _Step(self)
        self.hook(**kwargs)

    def hook(self, **kwargs):
        super().hook(**kwargs)
        model = self.attribution_model
        if getattr(model, "is_encoder_decoder", False):
            raise ValueError(f"lxt: {self.method_name} in inseq explains decoder-only models; "
                             f"{model.model_name} is an encoder-decoder.")
        _check_composite(model.model, self.lxt_method, self.composite)
        if not hasattr(self, "_default_fn"):
            self._default_fn = model._default_attributed_fn_id
        model._default_attributed_fn_id = _LOGIT  # LRP explains a logit (module docstring)

    def unhook(self, **kwargs):
        super().unhook(**kwargs)
        if hasattr(self, "_default_fn"):
            self.attribution_model._default_attributed_fn_id = self._default_fn
            del self._default_fn

    def attribute(self, batch, attributed_fn, *args, **kwargs):
        if _explained_parts(attributed_fn) is None:
            raise ValueError(
                f"lxt: {self.method_name} explains a logit: attributed_fn='logit' (its default) or "
                f"'contrast_logits_diff' (with contrast_targets=); got {_name_of(attributed_fn)}, a function "
                "of the whole output distribution that LRP does not distribute (see lxt.inseq).")
        model = self.attribution_model.model
        with _eval_mode(model), _patched(model, self.lxt_method, self.composite):
            return super().attribute(batch, attributed_fn, *args, **kwargs)

    def attribute_step(self, attribute_fn_main_args, attribution_args=None):
        out = self.method.attribute(**attribute_fn_main_args, **(attribution_args or {}))
        deltas = None
        if isinstance(out, tuple):
            out, deltas = out
        return CoarseFeatureAttributionStepOutput(
            source_attributions=None, target_attributions=out,
            step_scores={"deltas": deltas} if deltas is not None else {})


class AttnLRPAttribution(_Lxt, GradientAttributionRegistry):
    """AttnLRP (Achtibat et al., 2024) in inseq: ``inseq.load_model(model, "attnlrp")``."""

    method_name = "attnlrp"
    lxt_method = "attnlrp"


class CPLRPAttribution(_Lxt, GradientAttributionRegistry):
    """CP-LRP (attention as a constant: Ali et al., 2022) in inseq:
    ``inseq.load_model(model, "cp_lrp")``."""

    method_name = "cp_lrp"
    lxt_method = "cp-lrp"
