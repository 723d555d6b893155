"""The job users run: explain a prediction of a text or image model in one call.

>>> exp = lxt.explain(model, tokenizer, "The capital of France is")
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
        The explained output: a token string (language models) or a class index.
    target_id : int
        Its index in the output.
    logit : float
        The explained value: the target logit, or the logit difference with ``contrast``.
    method : str
        ``attnlrp``, ``cp-lrp``, ``input_x_gradient``, ``gradient`` or ``integrated_gradients``.
    prompt : str, optional
        The input text.
    contrast : str or int, optional
        The contrast output, when a logit difference was explained.
    latent : dict of str to Tensor
        Relevance of the outputs of the modules requested with ``layers=`` (per position and
        neuron).
    image : Tensor, optional
        The input image ``(C, H, W)`` (images).
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

    # ------------------------------------------------------------------ views
    def top(self, k: int = 5) -> list:
        """The ``k`` most relevant tokens as ``(token, relevance)`` pairs."""
        if self.tokens is None:
            raise ValueError("lxt: top() is for text explanations.")
        order = torch.argsort(self.relevance, descending=True)[:k]
        return [(self.tokens[i], float(self.relevance[i])) for i in order]

    def to_dict(self) -> dict:
        """A JSON-ready dict (tokens, relevance, target, logit, method, prompt)."""
        return {
            "prompt": self.prompt,
            "tokens": self.tokens,
            "relevance": self.relevance.tolist(),
            "target": self.target,
            "target_id": self.target_id,
            "contrast": self.contrast,
            "logit": self.logit,
            "method": self.method,
        }

    def show(self) -> None:
        """Coloured tokens in the terminal (HTML in a notebook); image overlay for images."""
        from . import viz

        if self.tokens is None:
            return viz.show_image(self)
        try:  # pragma: no cover - notebooks only
            from IPython import get_ipython
            from IPython.display import HTML, display

            if get_ipython() is not None and "IPKernelApp" in get_ipython().config:
                return display(HTML(viz.html_fragment(self)))
        except ImportError:
            pass
        print(viz.terminal(self))

    def to_html(self, path: Optional[str] = None) -> str:
        """A standalone HTML page (tokens coloured red / blue on a symmetric scale); written to
        ``path`` when given, returned in any case."""
        from . import viz

        page = viz.html_page([self])
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page

    def to_png(self, path: str) -> str:
        """A PNG heatmap (tokens, or the image overlay); returns ``path``."""
        from . import viz

        return viz.png(self, path)

    def __repr__(self):
        what = f"{len(self.tokens)} tokens" if self.tokens is not None else f"image {tuple(self.relevance.shape)}"
        return (f"Explanation({self.method}, target={self.target!r}, logit={self.logit:.4f}, {what})")


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
    m = method.lower().replace("_", "-")
    aliases = {"attnlrp": "attnlrp", "cp-lrp": "cp-lrp", "cplrp": "cp-lrp", "input-x-gradient": "input_x_gradient",
               "gradient": "gradient", "integrated-gradients": "integrated_gradients", "ig": "integrated_gradients"}
    if m not in aliases:
        raise ValueError(f"lxt: unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    return aliases[m]


@contextlib.contextmanager
def _patched(model, method, composite):
    """The model patched for the call: the LRP composite, or plain gradients for baselines."""
    if method in ("attnlrp", "cp-lrp"):
        from . import composites

        if composite is not None and composite.model is model:
            yield  # already registered by the caller: reuse its capture (no re-trace)
            return
        comp = composite or (composites.attnlrp(model) if method == "attnlrp" else composites.cp_lrp(model))
        with comp.context(model):
            yield
    else:
        with frozen_parameters(model):
            yield


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """Parameters without ``requires_grad`` inside the block (gradients only for the input);
    the flags are restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


@contextlib.contextmanager
def _latent_hooks(model, patterns, store):
    """Keep the relevance (gradient) of the outputs of the modules matching ``patterns``."""
    from .core.opaque import add_tap, remove_tap, tap

    handles, keys = [], []
    if patterns:
        names = [n for n, _ in model.named_modules() if n]
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f"lxt: layers pattern {pattern!r} matches no module of {type(model).__name__}.")
        for name, module in model.named_modules():
            if name and any(fnmatch.fnmatchcase(name, p) for p in patterns):
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


def gradient_engine(model: nn.Module) -> bool:
    """Whether ``model`` is registered with a composite of the gradient engine (its backward
    then carries ``R / activation``)."""
    comp = getattr(model.__dict__.get("forward"), "lxt_composite", None)
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


# ---------------------------------------------------------------------- text
def _tokenize(tokenizer, prompts, causal: bool):
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("lxt: empty prompt: give some text to explain.")
    side = getattr(tokenizer, "padding_side", "right")
    pad = tokenizer.pad_token_id
    try:
        tokenizer.padding_side = "left" if causal else "right"
        if pad is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None
    return enc["input_ids"], enc["attention_mask"]


def _accepts(model, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _forward_text(model, emb, mask, last_only: bool = False):
    kwargs = {"inputs_embeds": emb, "attention_mask": mask}
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    if last_only and _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1  # only the explained position goes through the LM head
    return model(**kwargs).logits


def _is_causal(model) -> bool:
    return getattr(model, "can_generate", lambda: False)() and not getattr(
        getattr(model, "config", None), "is_encoder_decoder", False)


def _explain_text_batch(model, tokenizer, prompts, targets, contrast, method, steps, layers):
    causal = _is_causal(model)
    ids, mask = _tokenize(tokenizer, prompts, causal)
    return _explain_ids(model, tokenizer, ids, mask, prompts, targets, contrast, method, steps,
                        layers, causal)


def _explain_ids(model, tokenizer, ids, mask, prompts, targets, contrast, method, steps, layers,
                 causal):
    limit = _context_length(model)
    if limit is not None and ids.shape[1] > limit:
        raise ValueError(f"lxt: the prompt is {ids.shape[1]} tokens, longer than the model's context of {limit}.")
    emb_layer = _embedding(model)
    param = next(model.parameters())
    with torch.no_grad():
        base = emb_layer(ids.to(param.device))
    if not torch.isfinite(base).all():
        raise ValueError("lxt: the input embeddings contain NaN or inf (check the model's "
                         "embedding weights); relevance would be NaN.")
    store: dict = {}
    with _latent_hooks(model, layers, store):
        if method == "integrated_gradients":
            grads = torch.zeros_like(base, dtype=torch.float32)
            for a in (torch.arange(steps, dtype=torch.float32) + 0.5) / steps:  # midpoint rule
                x = (base * a).detach().requires_grad_()
                logits = _forward_text(model, x, mask, causal)
                values, tid, cid, parts = _select(logits, mask, targets, contrast, tokenizer, causal)
                values.sum().backward()
                grads += x.grad.float()
            rel_full = base.float() * grads / steps
            with torch.no_grad():
                logits = _forward_text(model, base, mask, causal)
                values, tid, cid, parts = _select(logits, mask, targets, contrast, tokenizer, causal)
        else:
            x = base.detach().clone().requires_grad_()
            logits = _forward_text(model, x, mask, causal)
            values, tid, cid, parts = _select(logits, mask, targets, contrast, tokenizer, causal)
            if method in ("attnlrp", "cp-lrp"):
                _backward_lrp(values, parts)  # start with R = the explained value
                rel_full = x.grad.float()
            else:
                values.sum().backward()
                rel_full = x.grad.float() * (x.detach().float() if method == "input_x_gradient" else 1.0)
    if method == "gradient":
        per_token = rel_full.norm(dim=-1)
    else:
        per_token = rel_full.sum(-1)
    out = []
    for b, prompt in enumerate(prompts):
        keep = mask[b].bool()
        toks = [tokenizer.decode([int(i)]) for i in ids[b][keep]]
        latent = {k: v[b][keep.to(v.device)] if v.dim() >= 2 and v.shape[1] == mask.shape[1] else v[b]
                  for k, v in store.items()}
        out.append(Explanation(
            tokens=toks, relevance=per_token[b][keep].detach().cpu(),
            target=tokenizer.decode([tid[b]]) if causal else tid[b], target_id=tid[b],
            logit=float(values[b].detach()), method=method, prompt=prompt,
            contrast=None if cid[b] is None else (tokenizer.decode([cid[b]]) if causal else cid[b]),
            latent=latent))
    return out


def _backward_lrp(values, parts) -> None:
    """Start LRP: R = the target logit at the target and, for a contrast, R = -logit at the
    contrast, i.e. the epsilon rule on the difference ``(w_t - w_c) . h`` (relevance sums to
    the difference, not to zero)."""
    t, c = parts
    if c is None:
        values.backward(values.detach())
    else:
        torch.autograd.backward([t, c], [t.detach(), -c.detach()])


def _select(logits, mask, targets, contrast, tokenizer, causal):
    """The explained value per sequence: target logit (minus the contrast logit)."""
    if logits.dim() == 3:  # language model: next token after the last position
        last = logits[:, -1, :] if causal else logits[torch.arange(len(mask)), mask.sum(1) - 1]
    else:  # classifier
        last = logits
    tids, cids, vals, tparts, cparts = [], [], [], [], []
    for b in range(last.shape[0]):
        t = targets[b]
        tid = int(last[b].argmax()) if t is None else (_single_token(tokenizer, t, "target") if causal or isinstance(t, str) else int(t))
        if not 0 <= tid < last.shape[-1]:
            raise ValueError(f"lxt: target id {tid} is outside the output of size {last.shape[-1]}.")
        v = last[b, tid]
        tparts.append(v)
        cid = None
        if contrast is not None:
            cid = _single_token(tokenizer, contrast, "contrast") if (causal or isinstance(contrast, str)) else int(contrast)
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
def _explain_image(model, pixel_values, target, method, steps, layers, composite, channel_dim=1):
    if pixel_values.dim() == 3:
        pixel_values = pixel_values[None]
    if not torch.isfinite(pixel_values).all():
        raise ValueError("lxt: the image contains NaN or inf values.")
    param = next(model.parameters())
    base = pixel_values.to(param.device, param.dtype)
    store: dict = {}
    with _patched(model, method, composite), _latent_hooks(model, layers, store):
        def run(x):
            logits = model(pixel_values=x).logits
            tid = int(logits[0].argmax()) if target is None else int(target)
            if not 0 <= tid < logits.shape[-1]:
                raise ValueError(f"lxt: target class {tid} is outside 0..{logits.shape[-1] - 1}.")
            return logits[0, tid], tid

        if method == "integrated_gradients":
            grads = torch.zeros_like(base, dtype=torch.float32)
            for a in (torch.arange(steps, dtype=torch.float32) + 0.5) / steps:
                x = (base * a).detach().requires_grad_()
                v, tid = run(x)
                v.backward()
                grads += x.grad.float()
            rel = base.float() * grads / steps
            with torch.no_grad():
                v, tid = run(base)
        else:
            x = base.detach().clone().requires_grad_()
            v, tid = run(x)
            if method in ("attnlrp", "cp-lrp"):
                v.backward(v.detach())
                rel = x.grad.float()
            else:
                v.backward()
                rel = x.grad.float() * (x.detach().float() if method == "input_x_gradient" else 1.0)
    per_pixel = rel[0].norm(dim=0) if method == "gradient" else rel[0].sum(0)
    return Explanation(tokens=None, relevance=per_pixel.detach().cpu(), target=tid, target_id=tid,
                       logit=float(v.detach()), method=method, latent={k: v_[0] for k, v_ in store.items()},
                       image=pixel_values[0].detach().float().cpu())


# ---------------------------------------------------------------------- public
def explain(model: nn.Module, tokenizer=None, inputs=None, *, target=None, contrast=None,
            generate: int = 0, method: str = "attnlrp", steps: int = 50,
            layers: Optional[Sequence[str]] = None, batch_size: int = 8,
            composite=None, progress: Optional[bool] = None):
    """Explain a prediction with one forward and one backward pass.

    Parameters
    ----------
    model : nn.Module
        A stock HuggingFace model (causal LM, sequence classifier, or image classifier).
        It is patched only during the call and left exactly as it was.
    tokenizer : tokenizer or image processor or None
        The model's tokenizer (text).  For images pass ``None`` (or the image processor,
        unused: give already processed ``pixel_values``).
    inputs : str, list of str, or Tensor
        A prompt, a list of prompts (batched, one explanation each), or ``pixel_values``.
    target : str or int, optional
        The output to explain: a single token (``" Paris"``) or a class index.  Default: the
        model's prediction.
    contrast : str or int, optional
        Explain ``logit(target) - logit(contrast)`` instead.
    generate : int
        Greedily generate this many tokens and explain each (returns a list).
    method : str
        ``"attnlrp"`` (default), ``"cp-lrp"``, ``"input_x_gradient"``, ``"gradient"`` (L2 norm
        of the gradient per token) or ``"integrated_gradients"`` (``steps`` midpoint steps
        from a zero baseline).
    layers : list of str, optional
        Glob patterns of modules (``"model.layers.*.mlp"``) whose output relevance is
        returned in ``Explanation.latent``.
    batch_size : int
        Prompts per forward pass when ``inputs`` is a list.
    composite : lxt.Composite, optional
        Use this composite instead of the default table for ``model.config.model_type``.  If
        it is already registered on ``model`` (``with comp.context(model):``), it is used as
        is: many calls then share one capture instead of re-tracing the model each call.
    progress : bool, optional
        Show a progress bar (default: on for more than one batch).

    Returns
    -------
    Explanation, or list of Explanation (for a list of prompts or ``generate``).
    """
    method = _check_method(method)
    if not isinstance(model, nn.Module):
        raise TypeError(f"lxt: explain needs a torch model, got {type(model).__name__}.")
    if model.training:
        model_was_training = True
        model.eval()
    else:
        model_was_training = False
    try:
        if isinstance(inputs, Tensor):
            return _explain_image(model, inputs, target, method, steps, layers, composite)
        if tokenizer is None:
            raise TypeError("lxt: text inputs need the model's tokenizer.")
        if generate:
            with _patched(model, method, composite):
                return _explain_generation(model, tokenizer, inputs, generate, method, steps, layers)
        single = isinstance(inputs, str)
        prompts = [inputs] if single else list(inputs or [])
        if not prompts:
            raise ValueError("lxt: no prompt given.")
        targets = target if isinstance(target, (list, tuple)) else [target] * len(prompts)
        if len(targets) != len(prompts):
            raise ValueError(f"lxt: {len(targets)} targets for {len(prompts)} prompts.")
        out = []
        batches = range(0, len(prompts), batch_size)
        show = progress if progress is not None else len(batches) > 1
        with _patched(model, method, composite):  # registered once for all batches
            for start in _progress(batches, len(batches), "lxt explain", show):
                out.extend(_explain_text_batch(model, tokenizer, prompts[start:start + batch_size],
                                               targets[start:start + batch_size], contrast, method,
                                               steps, layers))
        return out[0] if single else out
    finally:
        if model_was_training:
            model.train()


def _explain_generation(model, tokenizer, prompt, n, method, steps, layers):
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("lxt: empty prompt: give some text to explain.")
    ids, mask = _tokenize(tokenizer, [prompt], True)
    out = []
    for _ in range(int(n)):
        with torch.no_grad():
            kwargs = {"input_ids": ids, "attention_mask": mask}
            if _accepts(model, "use_cache"):
                kwargs["use_cache"] = False
            nxt = int(model(**kwargs).logits[0, -1].argmax())
        text = tokenizer.decode(ids[0])
        out.append(_explain_ids(model, tokenizer, ids, mask, [text], [nxt], None, method, steps,
                                layers, True)[0])
        if tokenizer.eos_token_id is not None and nxt == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    return out
