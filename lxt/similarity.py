"""Explain a dual encoder's similarity logit over its text and its image
(``lxt.explain(clip, processor, text, image=...)``): stock ``CLIPModel``, ``SiglipModel`` and
``Siglip2Model``.

The explained value is ``logits_per_image[0, 0]``, the similarity logit of the one text and the
one image, ``t / |t| @ (i / |i|)^T * exp(logit_scale)`` (SigLIP: ``+ logit_bias``).  Its rules
(:mod:`lxt.composites.table`): each normalisation is a division by a constant (identity on the
numerator), the text-image product a matmul of two variables (uniform: half of the relevance
to each tower), ``exp(logit_scale)`` a constant scale, ``logit_bias`` a constant summand that
absorbs its share.  With LRP the relevance of the text tokens and of the pixels sums (up to
what biases, position embeddings and ``logit_bias`` absorb) to the logit.

The relevance of the text tokens is that of the text tower's token embedding output (a forward
hook makes it a leaf), the relevance of the image that of ``pixel_values``, summed over colour
channels: one value per pixel of the image as the model saw it (after the processor's resize
and crop).  SigLIP2 (NaFlex) sees its image as ``(1, N, p * p * C)`` patches, row-major over
``spatial_shapes`` and channel-last inside a patch, padded to ``N`` (``pixel_attention_mask``):
:func:`naflex_to_image` puts them back into an ``(C, h * p, w * p)`` image.

The explanation's first entry, ``<image>``, carries the image's total relevance (as in
:mod:`lxt.multimodal`), then come the text's tokens (a trailing run of padding tokens, which
SigLIP's processor adds up to the text length the model was trained on, is one entry carrying
their total).  ``contrast=`` another text explains the difference of the two similarity
logits with the same image; the contrast text is one entry ``<contrast: ...>`` at the end,
carrying its tokens' total, so that the entries (with the image) still add up to the explained
difference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .multimodal import IMAGE_ENTRY, _as_pil, _display


def is_dual_encoder(model) -> bool:
    """Whether ``model`` is a text-image dual encoder (a text and a vision tower, a similarity
    logit): ``CLIPModel``, ``SiglipModel``, ``Siglip2Model`` and their kind."""
    return all(callable(getattr(model, n, None)) for n in ("get_text_features", "get_image_features")) \
        and hasattr(model, "logit_scale") and hasattr(model, "text_model")


def naflex_to_image(patches: Tensor, spatial_shape, patch_size: int, channels: int) -> Tensor:
    """SigLIP2's patches ``(N, p * p * C)`` of one image as the image ``(C, h * p, w * p)``.

    ``spatial_shape`` is ``(h, w)``, the patch grid (``spatial_shapes[b]``); the first
    ``h * w`` patches are the image (row-major), the rest padding, dropped.  The inverse of the
    image processor's ``convert_image_to_patches`` (each patch ``(p, p, C)``, channel-last)."""
    h, w = (int(v) for v in spatial_shape)
    p, c = int(patch_size), int(channels)
    if patches.dim() != 2 or patches.shape[-1] != p * p * c or patches.shape[0] < h * w:
        raise ValueError(f"lxt: {tuple(patches.shape)} patches do not hold a {h} x {w} grid of "
                         f"{p} x {p} x {c} patches.")
    grid = patches[:h * w].reshape(h, w, p, p, c)
    return grid.permute(4, 0, 2, 1, 3).reshape(c, h * p, w * p)


def _token_embedding(model):
    emb = getattr(getattr(getattr(model, "text_model", None), "embeddings", None), "token_embedding", None)
    if emb is None:
        raise TypeError(f"lxt: cannot find the text tower's token embedding of {type(model).__name__} "
                        "(text_model.embeddings.token_embedding).")
    return emb


def _check_text(text, what: str) -> str:
    if isinstance(text, (list, tuple)):
        raise ValueError(f"lxt: with image=, a dual encoder explains one text and one image at a time; "
                         f"got a list of {len(text)} for {what}. Call explain once per text.")
    if not isinstance(text, str) or not text.strip():
        raise TypeError(f"lxt: with image=, {what} is a text (a non-empty str), got {text!r}.")
    return text


def _padding(model) -> str:
    # SigLIP's text tower is trained on texts padded to their full length (its processor's
    # documented call); CLIP pools at the end-of-text token, padding changes nothing there
    return "max_length" if getattr(model.config, "model_type", "").startswith("siglip") else "longest"


def _batch(model, processor, texts: list, image) -> dict:
    batch = dict(processor(text=texts, images=[image], return_tensors="pt", padding=_padding(model)))
    ids = batch["input_ids"]
    limit = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    if limit is not None and ids.shape[1] > limit:
        raise ValueError(f"lxt: the text is {ids.shape[1]} tokens, longer than the text tower's "
                         f"{limit} positions.")
    return batch


def _pixels(model, batch, pix: Tensor) -> Tensor:
    """Per-channel relevance ``(C, H, W)`` of the image from that of ``pixel_values``."""
    if pix.dim() == 4:
        return pix[0]
    spatial = batch.get("spatial_shapes")
    if pix.dim() == 3 and spatial is not None:  # SigLIP2 (NaFlex)
        vision = model.config.vision_config
        return naflex_to_image(pix[0], spatial[0], vision.patch_size, vision.num_channels)
    raise ValueError(f"lxt: {type(model).__name__}'s processor gives pixel_values of shape "
                     f"{tuple(pix.shape)}; explain reads (1, C, H, W) or SigLIP2's patches.")


def _entries(ex, tokenizer, ids: list, per_token: Tensor) -> tuple:
    """The text's entries (a trailing run of padding tokens as one entry with their total)."""
    pad = tokenizer.pad_token_id
    end = len(ids)
    while pad is not None and end > 0 and ids[end - 1] == pad:
        end -= 1
    texts, groups = ex._token_texts(tokenizer, ids[:end])
    values = [float(per_token[g].sum()) for g in groups]
    if end < len(ids):
        texts.append(f"{tokenizer.pad_token} x{len(ids) - end}")
        values.append(float(per_token[end:].sum()))
    return texts, values


def explain_pair(ex, model, processor, text, image, *, target, contrast, method, partial, composite):
    """``ex``: the module :mod:`lxt.explain`, whose checks and helpers this reuses (passed by it,
    so that this module does not import it back)."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise TypeError(f"lxt: image= needs the model's processor (AutoProcessor: tokenizer and image "
                        f"processor), got {type(processor).__name__}.")
    text = _check_text(text, "inputs")
    if target is not None:
        raise ValueError("lxt: a dual encoder explains the similarity logit of the text and the image; "
                         "target= is for a model's output classes or tokens (give the text as inputs).")
    if contrast is not None:
        contrast = _check_text(contrast, "contrast")
    if method == "integrated_gradients":
        raise ValueError("lxt: integrated_gradients is not offered with image= (choose attnlrp, cp-lrp, "
                         "input_x_gradient or gradient).")
    emb_layer = _token_embedding(model)
    batch = _batch(model, processor, [text] if contrast is None else [text, contrast], _as_pil(image))
    pixels = batch["pixel_values"]
    param = next(model.parameters())
    leaves = []

    def leaf(module, args, out):
        leaves.append(out.detach().requires_grad_())
        return leaves[-1]

    with ex._eval_mode(model), ex._patched(model, method, composite):
        handle = emb_layer.register_forward_hook(leaf)
        try:
            kwargs = {k: (v.to(param.device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
            px = pixels.to(param.device, param.dtype).requires_grad_()
            kwargs["pixel_values"] = px
            logits = model(**kwargs).logits_per_image
        finally:
            handle.remove()
        t = logits[0, 0]
        c = None if contrast is None else logits[0, 1]
        value = t if c is None else t - c
        missing = ex._uncovered(model, method, partial)
        emb = leaves[0]
        if method in ex.LRP_METHODS:
            ex._backward_lrp(value[None], (t[None], None if c is None else c[None]))
            rel_text = emb.grad * emb.detach() if ex.gradient_engine(model) else emb.grad
            rel_pix = px.grad
        else:
            value.backward()
            rel_text, rel_pix = emb.grad, px.grad
            if method == "input_x_gradient":
                rel_text, rel_pix = rel_text * emb.detach(), rel_pix * px.detach()
    per_channel = _pixels(model, batch, rel_pix)
    if method == "gradient":
        per_token, per_pixel = rel_text.norm(dim=-1), per_channel.norm(dim=0)
    else:
        per_token, per_pixel = rel_text.sum(-1), per_channel.sum(0)
    per_token, per_pixel = per_token.detach().float().cpu(), per_pixel.detach().float().cpu()
    ids = batch["input_ids"].tolist()
    tokens, values = _entries(ex, tokenizer, ids[0], per_token[0])
    tokens, values = [IMAGE_ENTRY] + tokens, [float(per_pixel.sum())] + values
    if contrast is not None:
        tokens.append(f"<contrast: {contrast}>")
        values.append(float(per_token[1].sum()))
    return ex.Explanation(
        tokens=tokens, relevance=torch.tensor(values, dtype=torch.float32), target=text, target_id=0,
        logit=float(value.detach()), method=method, prompt=text, contrast=contrast,
        partial=missing if method in ex.LRP_METHODS else None,
        image=_display(processor, _pixels(model, batch, pixels.detach())), image_relevance=per_pixel)
