"""The job users run: explain a prediction of a text or image model in one call.

>>> exp = lxt.explain(model, tokenizer, "The capital of France is")
>>> exp = lxt.explain(pipe, "The capital of France is")       # a transformers pipeline
>>> exp = lxt.explain(model, tokenizer, [{"role": "user", "content": "Hi"}])  # chat messages
>>> exp = lxt.explain(model, tokenizer, [1, 504, 3575])         # token ids
>>> exp.tokens, exp.relevance, exp.target, exp.logit
>>> exp.show(); exp.to_html("out.html"); exp.to_png("out.png")
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

METHODS = ("attnlrp", "cp-lrp", "input_x_gradient", "gradient", "integrated_gradients")
#: the methods that run an LRP composite (the others are baselines on the unpatched model)
LRP_METHODS = ("attnlrp", "cp-lrp")


@dataclass
class Explanation:
    """One explained prediction.

    Attributes
    ----------
    tokens : list of str or None
        The input tokens (text models); ``None`` for images.
    relevance : Tensor
        Per-token relevance ``(T,)`` (text) or per-pixel relevance ``(H, W)`` (images),
        float32, on the CPU.  For LRP methods it sums (up to absorbed bias terms) to
        :attr:`logit`.
    target : str or int
        The explained output: a token string (language models), a class index, or the text
        scored against the image (dual encoders).
    target_id : int
        Its index in the output.
    logit : float
        The explained value: the target logit, or the logit difference with ``contrast``.
    method : str
        ``attnlrp``, ``cp-lrp``, ``input_x_gradient``, ``gradient`` or ``integrated_gradients``.
    prompt : str, optional
        The input text: the prompt, the conversation as the chat template rendered it, or the
        decoded token ids.
    contrast : str or int, optional
        The contrast output, when a logit difference was explained.
    latent : dict of str to Tensor
        Relevance of the outputs of the modules requested with ``layers=`` (per position and
        neuron).
    image : Tensor, optional
        The input image ``(C, H, W)`` (images).
    position : int, optional
        Language models: the index in :attr:`tokens` whose output (next-token or masked-token
        prediction) was explained.
    partial : str, optional
        LRP methods: what ran without an LRP rule on the relevance path (operations the
        composite has no rule for), when the result was asked for with ``partial=True``;
        ``None`` when every operation had its rule.
    image_relevance : Tensor, optional
        Text with an image (``explain(vlm, processor, prompt, image=...)``): per-pixel
        relevance ``(H, W)`` of the image as the model saw it (:attr:`image`, after the
        processor's resize and crop; tiled views resampled onto one frame, see
        :mod:`lxt.multimodal`); its sum is that of the ``<image>`` entries of :attr:`relevance`.
    in_user_message : list of bool, optional
        Chat messages: per entry of :attr:`tokens`, whether it is part of a user message's
        content (the rest is the chat template: role headers, special tokens, a system
        message).  ``None`` for other inputs, or where the user's text cannot be located in
        the rendered conversation (a template that rewrites it; a tokenizer without offsets).
    position_relevance : Tensor, optional
        With ``positional=True``: per-position relevance ``(T,)`` (float32, CPU) of the
        model's positional encodings (rotary cos / sin, learned position embeddings; images:
        per patch position, the class token's first), beside :attr:`relevance`, which is then
        what remains on the tokens themselves (PA-LRP, :mod:`lxt.positional`).  ``None``
        without the option.
    token_type_relevance : Tensor, optional
        With ``positional=True`` on a model with token-type embeddings (BERT): their relevance
        per position ``(T,)``.  With biases zeroed, CP-LRP conserves over :attr:`relevance`,
        :attr:`position_relevance` and this together.
    """

    tokens: Optional[list]
    relevance: Tensor
    target: Any
    target_id: int
    logit: float
    method: str
    prompt: Optional[str] = None
    contrast: Any = None
    latent: dict = field(default_factory=dict)
    image: Optional[Tensor] = None
    position: Optional[int] = None
    partial: Optional[str] = None
    in_user_message: Optional[list] = None
    image_relevance: Optional[Tensor] = None
    position_relevance: Optional[Tensor] = None
    token_type_relevance: Optional[Tensor] = None

    # ------------------------------------------------------------------ views
    @property
    def first_token_share(self) -> float:
        """The first token's share of the total absolute relevance, ``|R_0| / sum_i |R_i|``
        over :attr:`relevance` (0 when all relevance is 0); text explanations only.

        The first token (a BOS, or the first word) can take a large share: models park
        attention on it (an attention sink) and the value path through it carries relevance
        (SmolLM2-135M, median over the shipped prompts: 0.47 with CP-LRP, 0.08 with AttnLRP;
        ``lxt bench sink``).  It is part of the explanation; ``to_html(sink="separate")`` /
        ``to_png(..., sink="separate")`` draw it apart so that the other tokens' contrast
        shows.  The signed share is ``relevance[0] / relevance.abs().sum()``; with
        ``positional=True`` this is the share among the tokens, and position 0's relevance is
        ``position_relevance[0]``.
        """
        if self.tokens is None:
            raise ValueError("lxt: first_token_share is for text explanations (an image has no first token).")
        r = self.relevance.detach().double().reshape(-1)
        total = float(r.abs().sum())
        return abs(float(r[0])) / total if total > 0 else 0.0

    def top(self, k: int = 5) -> list:
        """The ``k`` most relevant tokens as ``(token, relevance)`` pairs."""
        if self.tokens is None:
            raise ValueError("lxt: top() is for text explanations.")
        order = torch.argsort(self.relevance, descending=True)[:k]
        return [(self.tokens[i], float(self.relevance[i])) for i in order]

    def to_dict(self) -> dict:
        """A JSON-ready dict (tokens, relevance, target, logit, method, prompt, ...)."""
        return {
            "prompt": self.prompt,
            "tokens": self.tokens,
            "relevance": self.relevance.tolist(),
            "target": self.target,
            "target_id": self.target_id,
            "contrast": self.contrast,
            "logit": self.logit,
            "method": self.method,
            "position": self.position,
            "partial": self.partial,
            "in_user_message": self.in_user_message,
            "image_relevance": None if self.image_relevance is None else self.image_relevance.tolist(),
            "position_relevance": None if self.position_relevance is None else self.position_relevance.tolist(),
            "token_type_relevance": (None if self.token_type_relevance is None
                                     else self.token_type_relevance.tolist()),
        }

    def show(self, sink: str = "inline") -> None:
        """Coloured tokens in the terminal (HTML in a notebook); image overlay for images.
        ``sink``: as in :meth:`to_html`."""
        from . import viz

        if self.tokens is None:
            viz._separate(self, sink)
            return viz.show_image(self)
        try:  # pragma: no cover - notebooks only
            from IPython import get_ipython
            from IPython.display import HTML, display

            if get_ipython() is not None and "IPKernelApp" in get_ipython().config:
                return display(HTML(viz.html_fragment(self, sink)))
        except ImportError:
            pass
        print(viz.terminal(self, sink))

    def to_html(self, path: Optional[str] = None, sink: str = "inline") -> str:
        """A standalone HTML page (tokens coloured red / blue on a symmetric scale); written to
        ``path`` when given, returned in any case.

        ``sink="separate"`` draws the first token apart: boxed, with its share of the total
        absolute relevance written beside it (:attr:`first_token_share`), the colours of the
        other tokens scaled by them alone, and a caption saying what the first token's
        relevance means (``lxt.viz.SINK_NOTE``).  Nothing is hidden or removed: the values,
        and their sum, are the same.  Default ``"inline"``: every token on one scale."""
        from . import viz

        page = viz.html_page([self], sink)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page

    def to_png(self, path: str, sink: str = "inline") -> str:
        """A PNG heatmap (tokens, or the image overlay); returns ``path``.  ``sink``: as in
        :meth:`to_html` (text only)."""
        from . import viz

        return viz.png(self, path, sink)

    def __repr__(self):
        what = f"{len(self.tokens)} tokens" if self.tokens is not None else f"image {tuple(self.relevance.shape)}"
        part = ", PARTIAL" if self.partial else ""
        return (f"Explanation({self.method}, target={self.target!r}, logit={self.logit:.4f}, {what}{part})")


# ---------------------------------------------------------------------- helpers
def _embedding(model: nn.Module) -> nn.Module:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        raise TypeError(f"lxt: cannot find the input embeddings of {type(model).__name__} "
                        "(it has no get_input_embeddings()).")
    return emb


def _context_length(model) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None


def _single_token(tokenizer, text, what: str) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if not isinstance(text, str):
        raise ValueError(f"lxt: {what} must be a token string or a token id, got {text!r}.")
    ids = tokenizer.encode(text, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids and (tokenizer.unk_token or "") not in text:
        raise ValueError(f"lxt: {what} {text!r} is not in the tokenizer's vocabulary.")
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(f"lxt: {what} {text!r} is {len(ids)} tokens {pieces}, not one; pass a "
                         "single token (e.g. with its leading space) or a token id.")
    return ids[0]


def _check_method(method: str) -> str:
    if not isinstance(method, str):
        raise TypeError(f"lxt: method must be a string, one of {', '.join(METHODS)}; got {method!r}.")
    m = method.lower().replace("_", "-")
    aliases = {"attnlrp": "attnlrp", "cp-lrp": "cp-lrp", "cplrp": "cp-lrp", "input-x-gradient": "input_x_gradient",
               "gradient": "gradient", "integrated-gradients": "integrated_gradients", "ig": "integrated_gradients"}
    if m not in aliases:
        raise ValueError(f"lxt: unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    return aliases[m]


def registered_composite(model: nn.Module):
    """The composite ``model`` is registered with, or ``None``."""
    return getattr(model.__dict__.get("forward"), "lxt_composite", None)


@contextlib.contextmanager
def _patched(model, method, composite):
    """The model patched for the call: the LRP composite, or the unpatched model with plain
    gradients for baselines (also inside a user's ``comp.context(model)``)."""
    registered = registered_composite(model)
    if method in LRP_METHODS:
        from . import composites

        if composite is None and registered is not None:
            composite = registered  # its method was checked by _check_composite
        if composite is not None and composite.model is model:
            yield  # already registered by the caller: used as it is
            return
        comp = composite or (composites.attnlrp(model) if method == "attnlrp" else composites.cp_lrp(model))
        with comp.context(model):
            yield
    else:
        from .core.quantized import cpu_layout_kept

        with (registered.suspended() if registered is not None else contextlib.nullcontext()), \
                frozen_parameters(model), cpu_layout_kept(model):
            yield


def _check_composite(model, method, composite) -> None:
    """The composite (given, or registered on the model) fits the model and the method."""
    from .core.composite import Composite

    if composite is not None and not isinstance(composite, Composite):
        raise TypeError(
            f"lxt: composite must be an lxt.Composite (e.g. lxt.composites.attnlrp(model)), got "
            f"{type(composite).__name__}; to choose the method pass method= instead.")
    registered = registered_composite(model)
    if method not in LRP_METHODS:
        if composite is not None:
            raise ValueError(
                f"lxt: method={method!r} is a baseline, computed on the unpatched model; "
                "composite= is for the LRP methods (attnlrp, cp-lrp). Drop composite=, or pass "
                "method='attnlrp' / 'cp-lrp'.")
        return
    if composite is not None and composite.model is not None and composite.model is not model:
        raise ValueError(
            f"lxt: the composite {composite.name} is registered on another model "
            f"({type(composite.model).__name__}); a composite serves one model at a time. Leave "
            "its context (or call its remove()) first, or pass a composite for this model.")
    if composite is not None and registered is not None and registered is not composite:
        raise ValueError(
            f"lxt: the model is registered with another composite ({registered.name}); leave "
            "its context (or call its remove()) first, or pass that composite.")
    comp = composite if composite is not None else registered
    if comp is not None and comp.method is not None and comp.method != method:
        other = (f"a {method} composite (lxt.composites.{method.replace('-', '_')}(model))"
                 if comp.model is None else f"leave its context for {method}")
        raise ValueError(
            f"lxt: method={method!r}, but the composite {comp.name} "
            f"{'registered on the model ' if comp is registered else ''}implements "
            f"{comp.method!r}; pass method={comp.method!r}, or {other}.")


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """Parameters without ``requires_grad`` inside the block (gradients only for the input);
    the flags are restored on exit."""
    named = list(model.named_parameters(remove_duplicate=False))
    flags = [(p, p.requires_grad) for _, p in named]
    by_name = {n: p.requires_grad for n, p in named}
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        # parameters replaced meanwhile (accelerate's offloading swaps the objects): by name
        for n, p in model.named_parameters(remove_duplicate=False):
            if n in by_name and p.requires_grad != by_name[n]:
                p.requires_grad_(by_name[n])


@contextlib.contextmanager
def _latent_hooks(model, patterns, store, bypassed: Optional[nn.Module] = None):
    """Keep the relevance (gradient) of the outputs of the modules matching ``patterns``
    (``bypassed``: a module the explanation does not run, the input embedding of a text
    model, which explain starts after)."""
    from .core.opaque import add_tap, remove_tap, tap

    handles, keys = [], []
    if patterns:
        modules = _user_modules(model)
        inside = {id(m) for m in bypassed.modules()} if bypassed is not None else set()
        for pattern in patterns:
            matched = [m for n, m in modules if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise ValueError(f"lxt: layers pattern {pattern!r} matches no module of {type(model).__name__}.")
            if all(id(m) in inside for m in matched):
                raise ValueError(
                    f"lxt: layers pattern {pattern!r} names the input embedding, which explain does "
                    "not run (it starts from its output, the token embeddings): their relevance is "
                    "Explanation.relevance (summed per token).")
        for name, module in modules:
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                key = add_tap(lambda g, t, name=name: store.__setitem__(name, _tap_relevance(model, g, t)))
                keys.append(key)

                def hook(mod, args, out, key=key):
                    # an identity node that reports the relevance of the module's output
                    if isinstance(out, Tensor):
                        return tap(key, out)
                    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
                        return (tap(key, out[0]),) + tuple(out[1:])
                    return out

                handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for k in keys:
            remove_tap(k)


def _user_modules(model: nn.Module) -> list:
    """``(name, module)`` of the model's submodules as the user has them: an lxt module stands
    where the module it replaces was (same name); what is inside it is lxt's own."""
    from .rules.base import LxtModule

    out, seen = [], set()

    def visit(parent, prefix):
        for child_name, child in parent._modules.items():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            name = f"{prefix}.{child_name}" if prefix else child_name
            out.append((name, child))
            if not isinstance(child, LxtModule):
                visit(child, name)

    visit(model, "")
    visit = None  # noqa: F841 - the recursive closure refers to itself: free it now, not by gc
    return out


def gradient_engine(model: nn.Module) -> bool:
    """Whether ``model`` is registered with a composite of the gradient engine (its backward
    then carries ``R / activation``)."""
    comp = registered_composite(model)
    return comp is not None and comp.engine == "gradient"


def _tap_relevance(model, grad, value):
    """Relevance of a tapped tensor from the gradient reaching it."""
    if gradient_engine(model):
        return (grad.detach().float() * value.detach().float()).cpu()
    return grad.detach().float().cpu()


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


# ---------------------------------------------------------------------- text inputs
#: the pipelines explain takes (class name in transformers.pipelines -> task)
PIPELINES = {"TextGenerationPipeline": "text-generation",
             "TextClassificationPipeline": "text-classification",
             "FillMaskPipeline": "fill-mask"}


@dataclass
class _Text:
    """One text input, tokenized: ``ids`` as the model gets them, the ``prompt`` text, and per
    id whether it lies in a user message (``user``; chat messages only)."""

    ids: list
    prompt: str
    user: Optional[list] = None


def _unpack_pipeline(model, tokenizer, inputs):
    """``(model, tokenizer, inputs, prefix)``: a pipeline's model and tokenizer (its inputs are
    the second positional argument), and the text a text-generation pipeline puts before each
    prompt (``model.config.prefix``); anything else passes through."""
    import sys

    base = sys.modules.get("transformers.pipelines.base")  # imported if model is a pipeline
    if base is None or not isinstance(model, base.Pipeline):
        return model, tokenizer, inputs, ""
    names = {c.__name__ for c in type(model).__mro__}
    task = next((t for n, t in PIPELINES.items() if n in names), None)
    if task is None:
        raise TypeError(
            f"lxt: explain takes text-generation, text-classification and fill-mask pipelines, not "
            f"{getattr(model, 'task', None) or type(model).__name__!r}; pass its model: "
            "lxt.explain(pipe.model, pipe.tokenizer, ...) (images: pipe.model with pixel_values).")
    if inputs is None:
        tokenizer, inputs = None, tokenizer
    if tokenizer is not None and tokenizer is not model.tokenizer:
        raise TypeError("lxt: a pipeline brings its own tokenizer; call lxt.explain(pipe, inputs).")
    prefix = getattr(model, "prefix", None) if task == "text-generation" else None
    return model.model, model.tokenizer, inputs, prefix if isinstance(prefix, str) else ""


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _integer_tensor(x) -> bool:
    """An integer tensor of token ids (``uint8`` and ``bool`` are images or masks, not ids)."""
    return (isinstance(x, Tensor) and not x.is_floating_point() and not x.is_complex()
            and x.dtype not in (torch.bool, torch.uint8))


def _encode(tokenizer, inputs, prefix: str = "") -> tuple:
    """``(texts, single)``: the text inputs as :class:`_Text`, checked before any model runs.

    A prompt or a list of prompts is tokenized as the tokenizer does by default (its special
    tokens added); a conversation (a list of message dicts), or a list of them, is rendered
    with the chat template; token ids (ints, a 1-D or 2-D integer tensor, a list of lists) are
    taken as they are."""
    if isinstance(inputs, Tensor):
        if not _integer_tensor(inputs) or inputs.dim() not in (1, 2):
            raise TypeError(f"lxt: inputs is a {inputs.dtype} tensor of shape {tuple(inputs.shape)}: "
                            "token ids are a 1-D or 2-D integer tensor, an image is float pixel_values.")
        rows = inputs.tolist() if inputs.dim() == 2 else [inputs.tolist()]
        if not rows:
            raise ValueError("lxt: no prompt given.")
        return [_from_ids(tokenizer, r, i, len(rows)) for i, r in enumerate(rows)], inputs.dim() == 1
    if isinstance(inputs, str):
        return _from_prompts(tokenizer, [inputs], prefix), True
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"lxt: inputs must be a prompt (str), a list of prompts, chat messages (a "
                        "list of {'role': ..., 'content': ...} dicts), token ids (ints or an "
                        "integer tensor) or pixel_values (a float tensor), got "
                        f"{type(inputs).__name__}.")
    if not inputs:
        raise ValueError("lxt: no prompt given.")
    first = inputs[0]
    if isinstance(first, dict):
        return [_from_chat(tokenizer, inputs, 0, 1)], True
    if _is_id(first):
        return [_from_ids(tokenizer, inputs, 0, 1)], True
    n = len(inputs)
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], dict):
        return [_from_chat(tokenizer, c, i, n) for i, c in enumerate(inputs)], False
    if isinstance(first, (list, tuple)) or _integer_tensor(first):
        return [_from_ids(tokenizer, r, i, n) for i, r in enumerate(inputs)], False
    return _from_prompts(tokenizer, inputs, prefix), False


def _from_prompts(tokenizer, prompts, prefix: str) -> list:
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"lxt: prompts must be strings, got {type(p).__name__} ({p!r}).")
        if not p.strip():
            raise ValueError("lxt: empty prompt: give some text to explain.")
    texts = [prefix + p for p in prompts]
    return [_Text(list(ids), t) for ids, t in zip(tokenizer(texts)["input_ids"], texts)]


def _which(i: int, n: int, what: str) -> str:
    return f"the {what}" if n == 1 else f"{what} {i + 1}"


def _from_ids(tokenizer, ids, i: int, n: int) -> _Text:
    which = _which(i, n, "input")
    if _integer_tensor(ids) and ids.dim() == 1:
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"lxt: {which} is a {type(ids).__name__}; a batch of token ids is a list of "
                        "lists of ints (or a 2-D integer tensor).")
    if not ids:
        raise ValueError(f"lxt: empty prompt: {which} has no token ids.")
    bad = next((t for t in ids if not _is_id(t)), None)
    if bad is not None:
        raise TypeError(f"lxt: token ids must be ints; {which} holds {bad!r}.")
    if min(ids) < 0:
        raise ValueError(f"lxt: token ids must be >= 0; {which} holds {min(ids)}.")
    return _Text(list(ids), tokenizer.decode(list(ids)))


#: what stands in for a user message's content to find where the template puts it
_PROBE = "LXT-USER-CONTENT-PROBE"


def _from_chat(tokenizer, messages, i: int, n: int) -> _Text:
    """A conversation rendered with the tokenizer's chat template (its special tokens once, as
    the template writes them): with the generation prompt, or continuing a final assistant
    message (as transformers' text-generation pipeline does)."""
    which = _which(i, n, "conversation")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"lxt: the tokenizer ({type(tokenizer).__name__}) has no chat template, so "
                         "it cannot render chat messages; give the prompt as text, or set "
                         "tokenizer.chat_template.")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"lxt: {which} has no messages; a conversation is a list of "
                         "{'role': ..., 'content': ...} dicts.")
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            shown = repr(m) if len(repr(m)) <= 60 else repr(m)[:57] + "..."
            raise TypeError(f"lxt: message {j + 1} of {which} must be a dict with 'role' and "
                            f"'content' strings, got {shown}.")
    messages = list(messages)
    final = messages[-1]["role"] == "assistant"
    how = {"add_generation_prompt": not final, "continue_final_message": final}
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, **how)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **how)["input_ids"]
    except Exception as err:  # noqa: BLE001 - a template's raise_exception, a missing variable
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"lxt: the chat template cannot render {which}: {line}") from err
    if not ids:
        raise ValueError(f"lxt: the chat template renders {which} as no tokens.")
    return _Text(list(ids), rendered, _user_tokens(tokenizer, messages, how, rendered, list(ids)))


def _user_tokens(tokenizer, messages, how, rendered, ids) -> Optional[list]:
    """Per id of the rendered conversation, whether it lies in a user message's content;
    ``None`` if no user content is found.  Each user message is located by rendering the
    conversation with a probe in its place (what precedes the probe must match the real
    rendering), and the tokens by their character offsets (fast tokenizers)."""
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "user" or not m["content"].strip():
            continue
        probe = [dict(x, content=_PROBE) if j == k else x for j, x in enumerate(messages)]
        try:
            other = tokenizer.apply_chat_template(probe, tokenize=False, **how)
        except Exception:  # noqa: BLE001 - a template that inspects the content: no marking
            continue
        at = other.find(_PROBE)
        if at < 0 or other[:at] != rendered[:at]:
            continue
        for text in (m["content"], m["content"].strip()):  # a template may trim it
            if rendered.startswith(text, at):
                spans.append((at, at + len(text)))
                break
    if not spans:
        return None
    try:
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer has no offsets
        return None
    if list(enc["input_ids"]) != ids:
        return None
    return [e > s and any(s < b and a < e for a, b in spans) for s, e in enc["offset_mapping"]]


def _check_vocabulary(model, texts) -> None:
    """Every token id is a row of the model's input embedding."""
    size = getattr(_embedding(model), "num_embeddings", None)
    if not isinstance(size, int):
        return
    for i, t in enumerate(texts):
        bad = next((x for x in t.ids if x >= size), None)
        if bad is not None:
            which = _which(i, len(texts), "input")
            raise ValueError(f"lxt: {which} holds token id {bad}, outside the model's vocabulary of "
                             f"{size} (ids of another tokenizer?).")


# ---------------------------------------------------------------------- text
def _batch(tokenizer, seqs: list, left: bool) -> tuple:
    """``(input_ids, attention_mask)`` of the id lists, padded on the left or the right (with the
    tokenizer's pad id, else its end-of-sequence id; padding is masked either way)."""
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else tokenizer.eos_token_id
    pad = pad if pad is not None else 0
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        where = slice(width - len(s), width) if left else slice(0, len(s))
        ids[b, where] = torch.tensor(s, dtype=torch.long)
        mask[b, where] = 1
    return ids, mask


def _accepts(model, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _forward_text(model, emb, mask, last_only: bool = False):
    kwargs = {"inputs_embeds": emb, "attention_mask": mask.to(emb.device)}  # a model on a GPU
    if bool((mask[:, 0] == 0).any()) and _accepts(model, "position_ids"):
        # left padding: each prompt's tokens at the positions they have alone (learned
        # position embeddings, GPT-2, count from the first real token, not from the padding)
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(emb.device)
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    if last_only and _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1  # only the explained position goes through the LM head
    return model(**kwargs).logits


def _is_causal(model) -> bool:
    return getattr(model, "can_generate", lambda: False)() and not getattr(
        getattr(model, "config", None), "is_encoder_decoder", False)


def _kind(model) -> str:
    """``"causal"`` (next-token LM), ``"masked"`` (masked LM: explains a [MASK] position) or
    ``"classifier"`` (one output per sequence)."""
    if _is_causal(model):
        return "causal"
    get = getattr(model, "get_output_embeddings", None)
    if callable(get) and get() is not None:
        return "masked"
    return "classifier"


@contextlib.contextmanager
def _pad_id_set(model, tokenizer, ids, kind: str):
    """A decoder classifier without ``config.pad_token_id`` refuses batches (transformers looks
    for padding in ``input_ids``; it gets embeddings, left padded, and pools the last position
    either way): the tokenizer's pad id for the call, the config's own value back after."""
    cfg = getattr(model, "config", None)
    if not (ids.shape[0] > 1 and cfg is not None and getattr(cfg, "pad_token_id", 0) is None
            and _pools_last_token(model, kind)):
        yield
        return
    cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        yield
    finally:
        cfg.pad_token_id = None


def _pools_last_token(model, kind: str) -> bool:
    """A classifier on a decoder (``LlamaForSequenceClassification``, GPT-2's): transformers
    pools its last position when it is given embeddings (it cannot see padding in them), so
    its batches are padded on the left.  Encoders (BERT) pool their first token."""
    if kind != "classifier":
        return False
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if flags:
        return any(flags)
    try:  # no attention module says: a family with a causal LM and no masked LM is a decoder
        from transformers.models.auto import modeling_auto as auto

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return (model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                and model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    except ImportError:  # pragma: no cover
        return False


def _output_id(model, tokenizer, value, what: str, kind: str) -> Optional[int]:
    """``target`` / ``contrast`` as an output index (``None``: the prediction), checked before
    any forward pass."""
    if value is None:
        return None
    if kind == "classifier" and isinstance(value, str):
        labels = getattr(getattr(model, "config", None), "label2id", None) or {}
        if value in labels:
            value = int(labels[value])
        elif value.strip().lstrip("-").isdigit():
            value = int(value)
        else:
            raise ValueError(f"lxt: {what} {value!r} is neither a class index nor a label of the "
                             f"model ({', '.join(map(repr, labels)) or 'no labels'}).")
    if kind != "classifier":
        value = _single_token(tokenizer, value, what)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"lxt: {what} must be a token string or an output index, got {value!r}.")
    size = _output_size(model, kind)
    if size is not None and not 0 <= value < size:
        raise ValueError(f"lxt: {what} id {value} is outside the output of size {size}.")
    return value


def _output_size(model, kind: str) -> Optional[int]:
    cfg = getattr(model, "config", None)
    if kind == "classifier":
        n = getattr(cfg, "num_labels", None)
        return n if isinstance(n, int) else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, Tensor) else None


def _positions(model, tokenizer, texts, position, kind) -> list:
    """Per text, the index (into its tokens) whose output is explained; checked (and the
    lengths too) before any forward pass."""
    limit = _context_length(model)
    mask_id = getattr(tokenizer, "mask_token_id", None)
    out = []
    for i, text in enumerate(texts):
        ids, prompt = text.ids, text.prompt
        n = len(ids)
        which = f"the prompt {_short(prompt)}" if len(texts) == 1 else f"prompt {i + 1} {_short(prompt)}"
        if limit is not None and n > limit:
            raise ValueError(f"lxt: {which} is {n} tokens, longer than the model's context of {limit}.")
        if kind == "classifier":
            out.append(None)
        elif position is not None:
            if not -n <= position < n:
                raise ValueError(f"lxt: position={position} is outside {which} ({n} tokens).")
            out.append(position % n)
        elif kind == "causal":
            out.append(n - 1)
        else:
            found = [j for j, t in enumerate(ids) if mask_id is not None and t == mask_id]
            if len(found) != 1:
                mask = getattr(tokenizer, "mask_token", None) or "[MASK]"
                what = f"no {mask} token" if not found else f"{len(found)} {mask} tokens"
                raise ValueError(
                    f"lxt: {type(model).__name__} is a masked language model and {which} has "
                    f"{what}; put exactly one {mask} where the prediction is to be explained, or "
                    "pass position= (command line: --position).")
            out.append(found[0])
    return out


def _short(prompt: str, n: int = 40) -> str:
    return repr(prompt if len(prompt) <= n else prompt[: n - 3] + "...")


def _explain_text_batch(model, tokenizer, texts, targets, contrast, method, steps, layers,
                        positions, partial=False, sources=None):
    kind = _kind(model)
    ids, mask = _batch(tokenizer, [t.ids for t in texts], kind == "causal" or _pools_last_token(model, kind))
    return _explain_ids(model, tokenizer, ids, mask, [t.prompt for t in texts], targets, contrast,
                        method, steps, layers, kind, positions, partial, [t.user for t in texts],
                        sources=sources)


def _attached(sources, batch_size, method):
    """The positional sources' hooks for one forward and backward (``sources=None``: none)."""
    return contextlib.nullcontext() if sources is None else sources.attached(batch_size, method)


def _positional_rows(rel: dict, b: int, keep: Optional[Tensor], groups: Optional[list]) -> tuple:
    """``(position_relevance, token_type_relevance)`` of sequence ``b`` from the per-kind
    ``(batch, T)`` relevance of :meth:`lxt.positional.PositionalSources.relevance` (rotary and
    learned positions together), float32 on the CPU; ``None`` for a kind the model lacks."""
    def row(kinds):
        parts = [rel[k] for k in kinds if k in rel]
        if not parts:
            return None
        t = sum(parts)
        t = t[b if t.shape[0] > 1 else 0].detach().float().cpu()
        if keep is not None:
            t = t[keep.cpu()]
        return t if groups is None else _merged(t, groups)

    return row(("rotary", "position")), row(("token_type",))


def _uncovered(model, method: str, partial: bool) -> Optional[str]:
    """LRP methods, after the forward: what the registered composite left without an LRP rule
    on the relevance path (``None``: nothing).  Refused (``ValueError``, before the backward)
    unless ``partial``: an LRP result never turns partial without the caller asking."""
    from .core.dispatch import describe_ops

    comp = registered_composite(model) if method in LRP_METHODS else None
    if comp is None:
        return None
    summary = comp.summary()
    what = ([summary.failure] if summary.failure else []) + (
        [describe_ops(summary.unsafe)] if summary.unsafe else [])
    if not what:
        return None
    text = "; ".join(what)
    if not partial:
        raise ValueError(
            f"lxt: {method} would be partial: no LRP rule on the relevance path for {text}. Map "
            "them in the composite's layer map (lxt.Composite), or pass partial=True to get the "
            "partial result (Explanation.partial names what it lacks).")
    return text


def _explain_ids(model, tokenizer, ids, mask, prompts, targets, contrast, method, steps, layers,
                 kind, positions, partial=False, users=None, sources=None):
    limit = _context_length(model)
    if limit is not None and ids.shape[1] > limit:
        raise ValueError(f"lxt: the prompt is {ids.shape[1]} tokens, longer than the model's context of {limit}.")
    # the explained position of each row, as an index into the padded batch
    rows = [None if p is None else int(mask[b].nonzero()[p]) for b, p in enumerate(positions)]
    last_only = kind == "causal" and all(r == ids.shape[1] - 1 for r in rows)
    emb_layer = _embedding(model)
    param = next(model.parameters())
    with torch.no_grad():
        base = emb_layer(ids.to(param.device))
    if not torch.isfinite(base).all():
        raise ValueError("lxt: the input embeddings contain NaN or inf (check the model's "
                         "embedding weights); relevance would be NaN.")
    store: dict = {}
    pos_rel: dict = {}
    with _latent_hooks(model, layers, store, bypassed=emb_layer), _pad_id_set(model, tokenizer, ids, kind), \
            _attached(sources, ids.shape[0], method):
        if method == "integrated_gradients":
            grads = torch.zeros_like(base, dtype=torch.float32)
            for a in (torch.arange(steps, dtype=torch.float32) + 0.5) / steps:  # midpoint rule
                x = (base * a).detach().requires_grad_()
                logits = _forward_text(model, x, mask, last_only)
                values, tid, cid, parts = _select(logits, rows, targets, contrast)
                values.sum().backward()
                grads += x.grad.float()
            rel_full = base.float() * grads / steps
            with torch.no_grad():
                logits = _forward_text(model, base, mask, last_only)
                values, tid, cid, parts = _select(logits, rows, targets, contrast)
        else:
            x = base.detach().clone().requires_grad_()
            logits = _forward_text(model, x, mask, last_only)
            values, tid, cid, parts = _select(logits, rows, targets, contrast)
            missing = _uncovered(model, method, partial)
            if method in LRP_METHODS:
                _backward_lrp(values, parts)  # start with R = the explained value
                rel_full = x.grad.float()
            else:
                values.sum().backward()
                rel_full = x.grad.float() * (x.detach().float() if method == "input_x_gradient" else 1.0)
            if sources is not None:  # PA-LRP: what the positional encodings received
                pos_rel = sources.relevance(gradient_engine(model))
    if method == "gradient":
        per_token = rel_full.norm(dim=-1)
    else:
        per_token = rel_full.sum(-1)
    lm = kind != "classifier"
    out = []
    for b, prompt in enumerate(prompts):
        keep = mask[b].bool()
        toks, groups = _token_texts(tokenizer, [int(i) for i in ids[b][keep]])
        latent = {k: _merged(v[b][keep.to(v.device)], groups) if v.dim() >= 2 and v.shape[1] == mask.shape[1]
                  else v[b] for k, v in store.items()}
        pos = positions[b]
        user = users[b] if users is not None else None
        position_rel, token_type_rel = _positional_rows(pos_rel, b, keep, groups)
        out.append(Explanation(
            tokens=toks, relevance=_merged(per_token[b][keep].detach().cpu(), groups),
            target=tokenizer.decode([tid[b]]) if lm else tid[b], target_id=tid[b],
            logit=float(values[b].detach()), method=method, prompt=prompt,
            contrast=None if cid[b] is None else (tokenizer.decode([cid[b]]) if lm else cid[b]),
            latent=latent, position=None if pos is None else next(g for g, idx in enumerate(groups) if pos in idx),
            partial=missing if method in LRP_METHODS else None,
            in_user_message=None if user is None else [any(user[j] for j in g) for g in groups],
            position_relevance=position_rel, token_type_relevance=token_type_rel))
    return out


def _token_texts(tokenizer, ids: list) -> tuple:
    """``(texts, groups)``: the text of each token, where byte-level tokens that spell one
    character only together (an emoji, a letter split into bytes) are one entry with that
    character (``groups[i]``: the token indices of entry ``i``), as the tokenizer's own decoder
    joins them; a single token of a byte that spells nothing would read U+FFFD."""
    texts, groups, start = [], [], 0
    for i in range(len(ids)):
        text = tokenizer.decode(ids[start:i + 1])
        if text.endswith("\ufffd") and i + 1 < len(ids):
            continue  # an incomplete character: it ends in a later token
        texts.append(text)
        groups.append(list(range(start, i + 1)))
        start = i + 1
    return texts, groups


def _merged(values: Tensor, groups: list) -> Tensor:
    """Per-token ``values`` (first dimension) summed over each entry of ``groups``."""
    if all(len(g) == 1 for g in groups):
        return values
    return torch.stack([values[g].sum(0) for g in groups])


def _backward_lrp(values, parts) -> None:
    """Start LRP: R = the target logit at the target and, for a contrast, R = -logit at the
    contrast, i.e. the epsilon rule on the difference ``(w_t - w_c) . h`` (relevance sums to
    the difference, not to zero)."""
    t, c = parts
    if c is None:
        values.backward(values.detach())
    else:
        torch.autograd.backward([t, c], [t.detach(), -c.detach()])


def _select(logits, rows, targets, contrast):
    """The explained value per sequence: target logit (minus the contrast logit) at the
    explained position ``rows[b]`` (language models) or of the sequence (classifiers).
    ``targets`` and ``contrast`` are output ids (``None`` for a target: the prediction)."""
    if logits.dim() == 3:  # language model
        if logits.shape[1] == 1:  # only the last position went through the head
            last = logits[:, -1, :]
        else:
            last = logits[torch.arange(logits.shape[0]), torch.tensor(rows)]
    else:  # classifier
        last = logits
    tids, cids, vals, tparts, cparts = [], [], [], [], []
    for b in range(last.shape[0]):
        tid = int(last[b].argmax()) if targets[b] is None else targets[b]
        if not 0 <= tid < last.shape[-1]:
            raise ValueError(f"lxt: target id {tid} is outside the output of size {last.shape[-1]}.")
        v = last[b, tid]
        tparts.append(v)
        cid = contrast
        if cid is not None:
            if not 0 <= cid < last.shape[-1]:
                raise ValueError(f"lxt: contrast id {cid} is outside the output of size {last.shape[-1]}.")
            cparts.append(last[b, cid])
            v = v - last[b, cid]
        tids.append(tid)
        cids.append(cid)
        vals.append(v)
    parts = (torch.stack(tparts), torch.stack(cparts) if cparts else None)
    return torch.stack(vals), tids, cids, parts


# ---------------------------------------------------------------------- images
def _explain_image(model, pixel_values, target, method, steps, layers, composite, partial=False,
                   contrast=None, sources=None):
    if pixel_values.dim() == 3:
        pixel_values = pixel_values[None]
    if pixel_values.dim() != 4 or pixel_values.shape[0] != 1:
        raise ValueError(f"lxt: pixel_values of shape {tuple(pixel_values.shape)}: explain gives one "
                         "image (C, H, W) or (1, C, H, W) at a time; call it once per image.")
    if not torch.isfinite(pixel_values).all():
        raise ValueError("lxt: the image contains NaN or inf values.")
    target = _output_id(model, None, target, "target", "classifier")
    contrast = _output_id(model, None, contrast, "contrast", "classifier")
    param = next(model.parameters())
    base = pixel_values.to(param.device, param.dtype)
    store: dict = {}
    pos_rel: dict = {}
    with _patched(model, method, composite), _latent_hooks(model, layers, store), _attached(sources, 1, method):
        def run(x):
            logits = _image_logits(model, x)
            values, tids, _, parts = _select(logits, [None], [target], contrast)
            return values[0], tids[0], parts

        if method == "integrated_gradients":
            grads = torch.zeros_like(base, dtype=torch.float32)
            for a in (torch.arange(steps, dtype=torch.float32) + 0.5) / steps:
                x = (base * a).detach().requires_grad_()
                v, tid, _ = run(x)
                v.backward()
                grads += x.grad.float()
            rel = base.float() * grads / steps
            with torch.no_grad():
                v, tid, _ = run(base)
        else:
            x = base.detach().clone().requires_grad_()
            v, tid, parts = run(x)
            missing = _uncovered(model, method, partial)
            if method in LRP_METHODS:
                _backward_lrp(v[None], parts)  # R = the explained value (target minus contrast)
                rel = x.grad.float()
            else:
                v.backward()
                rel = x.grad.float() * (x.detach().float() if method == "input_x_gradient" else 1.0)
            if sources is not None:  # PA-LRP: per patch position (the class token's first)
                pos_rel = sources.relevance(gradient_engine(model))
    per_pixel = rel[0].norm(dim=0) if method == "gradient" else rel[0].sum(0)
    position_rel, token_type_rel = _positional_rows(pos_rel, 0, None, None)
    return Explanation(tokens=None, relevance=per_pixel.detach().cpu(), target=tid, target_id=tid,
                       logit=float(v.detach()), method=method, contrast=contrast,
                       latent={k: v_[0] for k, v_ in store.items()},
                       partial=missing if method in LRP_METHODS else None,
                       image=pixel_values[0].detach().float().cpu(),
                       position_relevance=position_rel, token_type_relevance=token_type_rel)


def _image_logits(model, x):
    """Logits ``(1, classes)`` of an image model: a HuggingFace model (``pixel_values=``,
    ``.logits``) or a plain ``nn.Module`` taking the image tensor and returning logits
    (torchvision)."""
    if _accepts(model, "pixel_values"):
        out = model(pixel_values=x)
    else:
        out = model(x)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise TypeError(f"lxt: {type(model).__name__} returned {type(out).__name__}; explain needs "
                        "logits (batch, classes), or an output with .logits.")
    return logits


# ---------------------------------------------------------------------- arguments
def _check_count(name: str, value, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum`` (``2.5``, ``"2"``, ``True`` are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"lxt: {name} must be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"lxt: {name} must be an integer >= {minimum}, got {value!r}.")
    return value


def _check_layers(layers) -> Optional[list]:
    if layers is None:
        return None
    if isinstance(layers, str):
        return [layers]  # one pattern
    if not isinstance(layers, (list, tuple)) or not all(isinstance(p, str) for p in layers):
        raise TypeError(f"lxt: layers must be a list of module-name patterns such as "
                        f"['model.layers.*.mlp'], got {layers!r}.")
    return list(layers)


def _check_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise TypeError("lxt: text inputs need the model's tokenizer "
                        "(explain(model, tokenizer, prompt)).")
    if not (callable(tokenizer) and hasattr(tokenizer, "decode") and hasattr(tokenizer, "encode")):
        raise TypeError(f"lxt: tokenizer must be the model's tokenizer (e.g. "
                        f"AutoTokenizer.from_pretrained(...)), got {type(tokenizer).__name__}.")


def _takes_embeddings(model) -> bool:
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return "inputs_embeds" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()) and \
        getattr(model, "get_input_embeddings", None) is not None and not _accepts(model, "pixel_values")


def _check_image_input(model, inputs: Tensor) -> None:
    if not inputs.is_floating_point():
        raise TypeError(f"lxt: inputs is a {inputs.dtype} tensor of shape {tuple(inputs.shape)}: "
                        "for images give float pixel_values; token ids are a 1-D or 2-D integer "
                        "tensor.")
    plain = getattr(model, "config", None) is None  # a plain nn.Module (torchvision): model(image)
    if not plain and not _accepts(model, "pixel_values"):
        raise TypeError(f"lxt: {type(model).__name__} takes no pixel_values: a float tensor input is "
                        "an image; for text give the prompt as a string (or token ids as an "
                        "integer tensor).")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model.eval()`` inside the block; every module's own training flag back on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


# ---------------------------------------------------------------------- public
def explain(model: nn.Module, tokenizer=None, inputs=None, *, target=None, contrast=None,
            generate: int = 0, method: str = "attnlrp", steps: int = 50,
            layers: Optional[Sequence[str]] = None, batch_size: int = 8,
            composite=None, progress: Optional[bool] = None, position: Optional[int] = None,
            partial: bool = False, image=None, positional: bool = False):
    """Explain a prediction with one forward and one backward pass.

    Every argument is checked before the model runs; a bad one raises ``TypeError`` or
    ``ValueError`` with a one-line message.

    Parameters
    ----------
    model : nn.Module or transformers.Pipeline
        A stock HuggingFace model (causal LM, masked LM, sequence classifier, or image
        classifier), or a plain ``nn.Module`` image classifier called as ``model(image)``
        and returning logits (torchvision; pass its ``composite=`` if
        ``lxt.composites.attnlrp(model)`` has no table for it).  It is patched only during the call and left exactly as it was.
        Or a ``text-generation``, ``text-classification`` or ``fill-mask`` pipeline:
        ``explain(pipe, inputs)`` explains ``pipe.model`` with ``pipe.tokenizer``, prompts
        tokenized as the pipeline does (a text-generation pipeline's ``prefix`` included).
    tokenizer : tokenizer or image processor or None
        The model's tokenizer (text).  For images pass ``None`` (or the image processor,
        unused: give already processed ``pixel_values``).
    inputs : str, list, or Tensor
        A prompt (tokenized with the tokenizer's special tokens); chat messages, a list of
        ``{"role": ..., "content": ...}`` dicts, rendered with the tokenizer's chat template
        (with the generation prompt, or continuing a final assistant message; special tokens
        as the template writes them, once); token ids (a list of ints or a 1-D integer
        tensor), taken as they are; a list of any one of these, or a 2-D integer tensor
        (batched, one explanation each); or ``pixel_values`` (float, one image).
    target : str or int, optional
        The output to explain: a single token (``" Paris"``), a class index or label, or a
        list with one per prompt.  Default: the model's prediction.
    contrast : str or int, optional
        Explain ``logit(target) - logit(contrast)`` instead.
    generate : int
        Greedily generate this many tokens from one prompt (or conversation, or ids) and
        explain each (returns a list; no ``target`` / ``contrast``).
    method : str
        ``"attnlrp"`` (default), ``"cp-lrp"``, ``"input_x_gradient"``, ``"gradient"`` (L2 norm
        of the gradient per token) or ``"integrated_gradients"`` (``steps`` midpoint steps
        from a zero baseline).  Baselines are computed on the unpatched model, also inside a
        ``comp.context(model)``.
    steps : int
        Integrated-gradients steps (>= 1).
    layers : list of str, optional
        Glob patterns of modules (``"model.layers.*.mlp"``; one pattern may be given as a
        string) whose output relevance is returned in ``Explanation.latent``.
    batch_size : int
        Prompts per forward pass when ``inputs`` is a list (>= 1).
    composite : lxt.Composite, optional
        Use this composite instead of the default table for ``model.config.model_type`` (LRP
        methods only; its method must be ``method``).  If it is already registered on
        ``model`` (``with comp.context(model):``), it is used as is (many calls then share one
        registration; without it each call registers the model and restores it, about 15 ms
        for a 30-layer model).  A composite registered on another model is refused.
    progress : bool, optional
        Show a progress bar (default: on for more than one batch).
    position : int, optional
        Language models: explain the prediction at this token index of the prompt (negative
        counts from the end).  Default: the last token (causal LMs) or the prompt's one
        mask token (masked LMs such as ``BertForMaskedLM``).
    partial : bool
        LRP methods: an operation on the relevance path that the composite has no rule for
        (a custom ``torch.autograd.Function``, an op missing from a custom layer map) makes
        the relevance not LRP there, so by default the call raises ``ValueError`` naming it
        (after the forward, before the backward).  ``partial=True`` returns the result
        anyway, with :attr:`Explanation.partial` saying what it lacks.  A ``strict``
        composite refuses in any case.
    positional : bool
        Positional relevance (PA-LRP, Bakish et al. 2025; :mod:`lxt.positional`): the model's
        positional encodings (rotary cos / sin, learned position and token-type embeddings)
        become relevance sources of their own, reported per position in
        :attr:`Explanation.position_relevance` (and :attr:`Explanation.token_type_relevance`);
        :attr:`Explanation.relevance` is then what remains on the tokens.  For the LRP
        methods and the ``input_x_gradient`` / ``gradient`` baselines (positional input times
        gradient, gradient norm); refused for ``integrated_gradients``, for image= and for a
        model without positional encodings.  Under CP-LRP rotary encodings get no relevance
        (they act only through the attention weights, which CP-LRP holds constant).
    image : PIL image, file path, ``(H, W, C)`` uint8 array or ``(C, H, W)`` tensor, optional
        With a vision-language model (LLaVA, LLaVA-NeXT, PaliGemma, Gemma 3, Qwen2-VL,
        Qwen2.5-VL, Idefics3, SmolVLM) and its processor as ``tokenizer``: explain the next
        token (or ``generate=`` tokens; ``target=`` / ``contrast=`` as for text) of the prompt
        (or conversation) about the image, over the text tokens and the image's pixels
        (:attr:`Explanation.image_relevance`; the image tokens as ``<image>`` entries, see
        :mod:`lxt.multimodal`).  With a dual encoder (``CLIPModel``, ``SiglipModel``,
        ``Siglip2Model``): explain the similarity logit of the text ``inputs`` and the image
        (``contrast=`` another text: the difference of their logits; :mod:`lxt.similarity`).

    Returns
    -------
    Explanation, or list of Explanation (for a batch or ``generate``).

    Called inside ``torch.no_grad()`` or ``torch.inference_mode()``, it still explains: the
    backward pass needs gradients, so the call turns them back on for itself.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _explain(model, tokenizer, inputs, target=target, contrast=contrast,
                        generate=generate, method=method, steps=steps, layers=layers,
                        batch_size=batch_size, composite=composite, progress=progress,
                        position=position, partial=partial, image=image, positional=positional)


def _positional_sources(model, method, positional):
    """The model's positional sources for ``positional=True`` (checked before any forward),
    or ``None``."""
    if not isinstance(positional, bool):
        raise TypeError(f"lxt: positional must be True or False, got {positional!r}.")
    if not positional:
        return None
    if method == "integrated_gradients":
        raise ValueError("lxt: positional=True is for the LRP methods (attnlrp, cp-lrp) and the "
                         "input_x_gradient / gradient baselines; integrated gradients scales the "
                         "token embeddings only, so it has no positional counterpart.")
    if not isinstance(model, nn.Module):
        return None  # a pipeline: its model is checked once unpacked
    from .positional import PositionalSources

    return PositionalSources(model)


def _explain(model, tokenizer, inputs, *, target, contrast, generate, method, steps, layers,
             batch_size, composite, progress, position, partial, image=None, positional=False):
    method = _check_method(method)
    if image is not None and positional is not False:
        raise ValueError("lxt: positional=True is not available with image= (vision-language "
                         "models) yet; explain without it.")
    if image is not None:
        if not isinstance(model, nn.Module) or not isinstance(partial, bool):
            raise TypeError("lxt: explain(model, processor, prompt, image=...) needs a torch model and "
                            "partial=True / False.")
        if position is not None or layers:
            raise ValueError("lxt: with image=, explain gives the next token (or generate= tokens) of one "
                             "prompt (no position= or layers= yet).")
        generate = _check_count("generate", generate, 0)
        _check_composite(model, method, composite)
        import sys

        from .multimodal import explain_with_image
        from .similarity import explain_pair, is_dual_encoder

        if is_dual_encoder(model):  # CLIP, SigLIP: the similarity logit of the text and the image
            if generate:
                raise ValueError(f"lxt: {type(model).__name__} scores a text against an image; generate= is "
                                 "for vision-language models.")
            return explain_pair(sys.modules[__name__], model, tokenizer, inputs, image, target=target,
                                contrast=contrast, method=method, partial=partial, composite=composite)
        return explain_with_image(sys.modules[__name__], model, tokenizer, inputs, image, target=target,
                                  contrast=contrast, method=method, partial=partial, composite=composite,
                                  generate=generate)
    from .similarity import is_dual_encoder

    if is_dual_encoder(model):
        raise TypeError(f"lxt: {type(model).__name__} scores a text against an image: call "
                        "lxt.explain(model, processor, text, image=IMAGE).")
    model, tokenizer, inputs, prefix = _unpack_pipeline(model, tokenizer, inputs)
    sources = _positional_sources(model, method, positional)
    if not isinstance(partial, bool):
        raise TypeError(f"lxt: partial must be True or False, got {partial!r}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"lxt: explain needs a torch model, got {type(model).__name__}.")
    steps = _check_count("steps", steps, 1)
    generate = _check_count("generate", generate, 0)
    batch_size = _check_count("batch_size", batch_size, 1)
    layers = _check_layers(layers)
    if position is not None and (isinstance(position, bool) or not isinstance(position, int)):
        raise TypeError(f"lxt: position must be a token index (int), got {position!r}.")
    _check_composite(model, method, composite)
    if isinstance(inputs, Tensor) and not _integer_tensor(inputs):
        _check_image_input(model, inputs)
        if generate or position is not None:
            raise ValueError("lxt: generate= and position= are for text models; an image is "
                             "explained as a whole.")
        with _eval_mode(model):
            return _explain_image(model, inputs, target, method, steps, layers, composite, partial,
                                  contrast, sources=sources)
    _check_tokenizer(tokenizer)
    texts, single = _encode(tokenizer, inputs, prefix)
    if not _takes_embeddings(model):
        raise TypeError(f"lxt: {type(model).__name__} takes no token embeddings (inputs_embeds), so "
                        "it is not a text model lxt can explain; for an image model give pixel_values "
                        "(a float tensor) as inputs.")
    kind = _kind(model)
    if position is not None and kind == "classifier":
        raise ValueError(f"lxt: position= is for language models; {type(model).__name__} "
                         "classifies the whole sequence.")
    _check_vocabulary(model, texts)
    if generate:
        if not single:
            raise ValueError(f"lxt: generate= continues one prompt; got a list of {len(texts)}. "
                             "Call explain once per prompt.")
        if target is not None or contrast is not None or position is not None:
            raise ValueError("lxt: generate= explains each generated token (the model's own "
                             "choice); it takes no target=, contrast= or position=.")
        if kind != "causal":
            raise ValueError(f"lxt: generate= needs a causal language model; "
                             f"{type(model).__name__} does not generate.")
        _positions(model, tokenizer, texts, None, kind)  # context length
        with _eval_mode(model), _patched(model, method, composite):
            return _explain_generation(model, tokenizer, texts[0], generate, method, steps, layers,
                                       partial, sources=sources)
    targets = list(target) if isinstance(target, (list, tuple)) else [target] * len(texts)
    if len(targets) != len(texts):
        raise ValueError(f"lxt: {len(targets)} targets for {len(texts)} prompts.")
    targets = [_output_id(model, tokenizer, t, "target", kind) for t in targets]
    contrast = _output_id(model, tokenizer, contrast, "contrast", kind)
    positions = _positions(model, tokenizer, texts, position, kind)
    out = []
    batches = range(0, len(texts), batch_size)
    show = progress if progress is not None else len(batches) > 1
    with _eval_mode(model), _patched(model, method, composite):  # registered once for all batches
        for start in _progress(batches, len(batches), "lxt explain", show):
            stop = start + batch_size
            out.extend(_explain_text_batch(model, tokenizer, texts[start:stop], targets[start:stop],
                                           contrast, method, steps, layers, positions[start:stop],
                                           partial, sources=sources))
    return out[0] if single else out


def _explain_generation(model, tokenizer, text, n, method, steps, layers, partial=False, sources=None):
    ids, mask = _batch(tokenizer, [text.ids], True)
    user = text.user
    limit = _context_length(model)
    if limit is not None and ids.shape[1] + n - 1 > limit:
        raise ValueError(
            f"lxt: the prompt is {ids.shape[1]} tokens; explaining {n} generated tokens needs "
            f"{ids.shape[1] + n - 1}, more than the model's context of {limit}. Ask for at most "
            f"generate={limit - ids.shape[1] + 1}.")
    out = []
    for _ in range(n):
        with torch.no_grad():
            kwargs = {"input_ids": ids, "attention_mask": mask}
            if _accepts(model, "use_cache"):
                kwargs["use_cache"] = False
            nxt = int(model(**kwargs).logits[0, -1].argmax())
        shown = tokenizer.decode(ids[0])
        out.append(_explain_ids(model, tokenizer, ids, mask, [shown], [nxt], None, method, steps,
                                layers, "causal", [ids.shape[1] - 1], partial, [user], sources=sources)[0])
        if tokenizer.eos_token_id is not None and nxt == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
        user = None if user is None else user + [False]
    return out
