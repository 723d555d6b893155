"""Positional relevance: positional encodings as relevance sources of their own (PA-LRP).

AttnLRP (Achtibat et al., ICML 2024) treats every positional encoding as a constant: the rotary
``cos`` / ``sin`` enter the products ``q * cos + rotate_half(q) * sin`` as constant factors
(identity rule, all relevance stays with ``q``), and learned position / token-type embeddings
absorb their share of the embedding sum like a bias, so that share is lost.  PA-LRP (Bakish,
Zimerman, Chefer and Wolf, 2025, "Revisiting LRP: Positional Attribution as the Missing
Ingredient for Transformer Explainability", arXiv:2506.02138) reformulates the input of a
transformer as *position-token pairs* and propagates relevance into the positional encodings
too, with LRP rules for rotary, learnable and absolute encodings (its method section; cited
here by the paper and by the authors' code, whose rules are quoted below, since the equation
numbers could not be checked offline).  With ``positional=True`` lxt does the same, with the
rules it already has:

- **Rotary embeddings** (Llama, Qwen, Mistral, Gemma, ...): ``cos`` and ``sin`` become
  variables, so each product ``q * cos`` is a product of two variables and takes the uniform
  rule (AttnLRP Prop. 3.2): ``R_q = R_cos = R / 2``; the sum of the two products keeps the
  epsilon rule (AttnLRP Eq. 8).  This is what the authors' reference implementation does
  (github.com/YardenBakish/PE-AWARE-LRP, ``NLP/lxt/models/llama_PE.py``:
  ``lf.add2(lf.mul2(q, cos), lf.mul2(rotate_half(q), sin))`` with ``cos`` / ``sin`` leaves
  that require grad, their relevance read as ``pos_embed.grad.sum(-1)``), so lxt implements
  the uniform rule, not a rule of its own.  (The authors make one leaf pair per layer and
  sum them; lxt's one ``(cos, sin)`` shared by all layers accumulates the same sum.  Their
  evaluation then adds the normalised, absolute positional relevance onto the tokens; lxt
  reports it beside them, signed and unnormalised.)  Relevance reaches the rotary factors only
  through ``q`` and ``k``: under CP-LRP (q and k detached) rotary encodings get none.
- **Learned absolute positions** (GPT-2 ``wpe``, BERT / RoBERTa / DistilBERT
  ``position_embeddings``, ViT / DeiT's ``position_embeddings`` parameter) and **token-type
  embeddings** (BERT): summed into the token embeddings; the epsilon rule on that sum
  (AttnLRP Eq. 8) gives each summand its share ``R_p = p R / stab(sum)`` once the summand is a
  variable rather than a constant.

Mechanism: forward hooks make each source's output (the rotary module's ``(cos, sin)``, the
embedding's output) a fresh leaf tensor that requires grad, expanded to the batch so that each
sequence gets its own relevance; a positional parameter is swapped for such a leaf for the
duration of its module's forward.  The composite's own rules (``torch.mul`` -> ``lf.mul2``,
``+`` -> ``lf.add2``) then see variable factors.  After the backward pass the leaves hold the
relevance: ``.grad`` (explicit engine) or ``leaf * .grad`` (gradient engine, where the
gradient is ``R / leaf``; and the ``input_x_gradient`` baseline), summed per position.
With biases zeroed, CP-LRP then conserves over tokens, positions and token types together.

>>> src = PositionalSources(model)
>>> with comp.context(model), src.attached(batch_size=1, method="attnlrp"):
...     logit = model(inputs_embeds=x).logits[0, -1, target]
...     logit.backward(logit)
>>> src.relevance()["position"]          # (batch, T): per-position relevance
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["PositionalSources", "find_sources", "KINDS"]

#: what a source is: rotary cos / sin, a learned (or fixed) absolute position embedding added
#: to the token embeddings, a token-type (segment) embedding added to them
KINDS = ("rotary", "position", "token_type")

#: attribute names of absolute position embeddings (nn.Embedding children, or parameters)
_POSITION_NAMES = ("wpe", "position_embeddings", "position_embedding", "embed_positions", "pos_embed")
_TOKEN_TYPE_NAMES = ("token_type_embeddings",)


@dataclass
class Source:
    """One positional input of a model: ``module`` (qualified name ``name``) produces it, or
    holds it as the parameter ``parameter``."""

    kind: str
    name: str
    module: nn.Module
    parameter: Optional[str] = None


def find_sources(model: nn.Module) -> list:
    """The positional sources of ``model``, read off its modules: rotary-embedding modules
    (class name ending in ``RotaryEmbedding``, returning ``(cos, sin)``), ``nn.Embedding``
    children named as position (``wpe``, ``position_embeddings``, ...) or token-type embeddings,
    and position-embedding parameters of a module (ViT's ``position_embeddings``)."""
    out = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if type(module).__name__.endswith("RotaryEmbedding"):
            out.append(Source("rotary", name, module))
        elif isinstance(module, nn.Embedding) and last in _POSITION_NAMES:
            out.append(Source("position", name, module))
        elif isinstance(module, nn.Embedding) and last in _TOKEN_TYPE_NAMES:
            out.append(Source("token_type", name, module))
        else:
            for pname in _POSITION_NAMES:
                p = module._parameters.get(pname)
                if isinstance(p, Tensor) and p.dim() >= 2:
                    out.append(Source("position", f"{name}.{pname}" if name else pname, module, pname))
    return out


@dataclass
class _Leaf:
    source: Source
    tensor: Tensor


class PositionalSources:
    """The positional sources of one model, and the relevance they received in one backward.

    Parameters
    ----------
    model : nn.Module
        A model with at least one positional source (see :func:`find_sources`); one without
        is refused (``ValueError``).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.sources = find_sources(model)
        self.leaves: list = []
        self.method = "attnlrp"
        if not self.sources:
            raise ValueError(
                f"lxt: positional=True, but {type(model).__name__} has no positional encoding "
                "lxt can attribute to (no rotary-embedding module, no position or token-type "
                "embedding); call explain without positional=True.")

    def __repr__(self):
        return f"PositionalSources({', '.join(f'{s.kind}: {s.name}' for s in self.sources)})"

    @property
    def kinds(self) -> list:
        """The kinds of source the model has, in :data:`KINDS` order."""
        have = {s.kind for s in self.sources}
        return [k for k in KINDS if k in have]

    # ------------------------------------------------------------------ hooks
    def _leaf(self, source: Source, t, batch_size: Optional[int]) -> Tensor:
        if not (isinstance(t, Tensor) and t.is_floating_point()):
            raise TypeError(f"lxt: positional=True: {source.name} ({type(source.module).__name__}) "
                            f"returned {type(t).__name__}, not a float tensor lxt can attribute to.")
        t = t.detach()
        if batch_size is not None and t.dim() >= 2 and t.shape[0] == 1 and batch_size > 1:
            t = t.expand(batch_size, *t.shape[1:])  # one leaf row per sequence: relevance per sample
        leaf = t.clone().requires_grad_(True)
        self.leaves.append(_Leaf(source, leaf))
        return leaf

    def _output_hook(self, source: Source, batch_size):
        def hook(module, args, out):
            if source.kind == "rotary":
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(f"lxt: positional=True: the rotary embedding {source.name} "
                                    f"({type(module).__name__}) returned {type(out).__name__}, not "
                                    "(cos, sin).")
                return tuple(self._leaf(source, t, batch_size) for t in out)
            return self._leaf(source, out, batch_size)

        return hook

    @contextlib.contextmanager
    def attached(self, batch_size: Optional[int] = None, method: str = "attnlrp"):
        """Inside the block each forward of the model makes its positional inputs leaves
        (``batch_size``: expand batch-shared encodings to it).  ``method``: ``"attnlrp"`` /
        ``"cp-lrp"`` (LRP: see :meth:`relevance`), ``"input_x_gradient"`` or ``"gradient"``
        (plain gradients, on the unpatched model).  The hooks go, and swapped parameters come
        back, on exit, also when the body raises."""
        self.leaves, self.method = [], method
        handles, swapped = [], []

        def restore():
            while swapped:
                module, pname, original = swapped.pop()
                module._parameters[pname] = original

        try:
            for source in self.sources:
                if source.parameter is None:
                    handles.append(source.module.register_forward_hook(self._output_hook(source, batch_size)))
                    continue

                def pre(module, args, source=source):
                    # the parameter itself stays frozen and untouched: a leaf copy stands in for it
                    original = module._parameters[source.parameter]
                    leaf = nn.Parameter(original.detach().clone(), requires_grad=True)
                    self.leaves.append(_Leaf(source, leaf))
                    swapped.append((module, source.parameter, original))
                    module._parameters[source.parameter] = leaf

                def post(module, args, out):
                    restore()

                handles.append(source.module.register_forward_pre_hook(pre))
                handles.append(source.module.register_forward_hook(post, always_call=True))
            yield self
        finally:
            for h in handles:
                h.remove()
            restore()

    # ------------------------------------------------------------------ results
    def relevance(self, gradient_engine: bool = False) -> dict:
        """``kind -> (batch, T)`` relevance of each kind of source the model has, summed over
        the leaves of that kind and their feature dimensions (``cos`` and ``sin`` together), in
        the leaves' dtype, after the backward pass.

        LRP methods: the leaf's ``.grad`` in the explicit engine; ``leaf * .grad`` in the
        gradient engine (``gradient_engine=True``: the gradient reaching a tensor there is
        ``R / tensor``).  ``input_x_gradient``: ``leaf * .grad``; ``gradient``: the L2 norm of
        the gradient per position.  A source whose leaf got no gradient gives zeros (CP-LRP
        detaches q and k, so rotary encodings get none).
        """
        out = {}
        lrp = self.method in ("attnlrp", "cp-lrp")
        times_input = self.method == "input_x_gradient" or (lrp and gradient_engine)
        for kind in self.kinds:
            total = None
            for leaf in self.leaves:
                if leaf.source.kind != kind:
                    continue
                t = leaf.tensor.detach()
                g = leaf.tensor.grad
                g = torch.zeros_like(t) if g is None else g.detach()
                r = g.pow(2) if self.method == "gradient" else (t * g if times_input else g)
                r = r.reshape(r.shape[0], r.shape[1], -1).sum(-1) if r.dim() >= 3 else r.reshape(r.shape[0], -1)
                total = r if total is None else total + r
            if total is not None:
                out[kind] = total.sqrt() if self.method == "gradient" else total
        return out
