"""Explain a vision-language model's next token over its prompt and its image (``lxt.explain(vlm,
processor, prompt, image=...)``).

The model is called as its processor prepares it (``input_ids``, ``pixel_values``, ...); the
relevance of the text tokens is that of the input embeddings' output (a forward hook makes it a
leaf), the relevance of the image that of ``pixel_values`` (summed over colour channels: one
value per pixel of the image as the model saw it, after the processor's resize and crop).  The
image tokens of the prompt are overwritten by the image features (``masked_scatter``), so their
embeddings get no relevance; each run of them is shown as one ``<image>`` entry that carries the
image's total.  This first version reads 4-D ``pixel_values`` ``(1, C, H, W)``: LLaVA, PaliGemma,
Gemma 3; models that tile or flatten their images (LLaVA-NeXT, Qwen2-VL, Idefics3) are refused
by name.
"""
from __future__ import annotations

import torch
from torch import Tensor

IMAGE_ENTRY = "<image>"


def _as_pil(image):
    """A PIL image from a PIL image, a file path, a ``(H, W[, C])`` uint8 array or a
    ``(C, H, W)`` tensor in [0, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, str) or hasattr(image, "__fspath__"):
        import os

        if not os.path.isfile(image):
            raise ValueError(f"lxt: image file not found: {image}")
        return Image.open(image).convert("RGB")
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3) or not image.is_floating_point():
            raise ValueError(f"lxt: image as a tensor is (C, H, W) float in [0, 1], got {image.dtype} "
                             f"{tuple(image.shape)}.")
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).squeeze(-1).numpy()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if np is not None and isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"lxt: image must be a PIL image, a file path, an array or a (C, H, W) tensor, got "
                    f"{type(image).__name__}.")


def _image_token_id(model) -> int:
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    raise TypeError(f"lxt: {type(model).__name__} names no image token in its config "
                    "(image_token_id): not a vision-language model lxt knows.")


def _render(processor, prompt: str) -> str:
    """The prompt with the processor's image placeholder in front if it has none."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise TypeError(f"lxt: with image=, inputs is the prompt (a non-empty str), got {prompt!r}.")
    placeholder = getattr(processor, "boi_token", None) or getattr(processor, "image_token", None)
    if placeholder is None:
        raise TypeError(f"lxt: {type(processor).__name__} has no image_token: pass the model's processor "
                        "(AutoProcessor), not its tokenizer.")
    return prompt if placeholder in prompt else placeholder + prompt


def _display(processor, pixels: Tensor) -> Tensor:
    """``(C, H, W)`` in [0, 1]: the processor's normalisation undone."""
    ip = getattr(processor, "image_processor", None)
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    img = pixels.detach().float().cpu()
    if mean is not None and std is not None:
        img = img * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    return img.clamp(0, 1)


def explain_with_image(ex, model, processor, prompt, image, *, target, contrast, method, partial, composite):
    """``ex``: the module :mod:`lxt.explain`, whose checks and selection this reuses (passed by
    it, so that this module does not import it back)."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise TypeError(f"lxt: image= needs the model's processor (AutoProcessor: tokenizer and image "
                        f"processor), got {type(processor).__name__}.")
    if method == "integrated_gradients":
        raise ValueError("lxt: integrated_gradients is not offered with image= (choose attnlrp, cp-lrp, "
                         "input_x_gradient or gradient).")
    image_id = _image_token_id(model)
    batch = processor(text=[_render(processor, prompt)], images=[_as_pil(image)], return_tensors="pt")
    pixels = batch["pixel_values"]
    if pixels.dim() != 4:
        raise ValueError(f"lxt: {type(model).__name__}'s processor gives pixel_values of shape "
                         f"{tuple(pixels.shape)} (tiled or flattened images); explain(image=) reads "
                         "(1, C, H, W) so far (LLaVA, PaliGemma, Gemma 3).")
    tid = ex._output_id(model, tokenizer, target, "target", "causal")
    cid = ex._output_id(model, tokenizer, contrast, "contrast", "causal")
    ids = batch["input_ids"]
    param = next(model.parameters())
    leaves = []

    def leaf(module, args, out):
        leaves.append(out.detach().requires_grad_())
        return leaves[-1]

    with ex._eval_mode(model), ex._patched(model, method, composite):
        handle = ex._embedding(model).register_forward_hook(leaf)
        try:
            kwargs = {k: (v.to(param.device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
            px = pixels.to(param.device, param.dtype).requires_grad_()
            kwargs["pixel_values"] = px
            if ex._accepts(model, "use_cache"):
                kwargs["use_cache"] = False
            logits = model(**kwargs).logits
        finally:
            handle.remove()
        values, tids, cids, parts = ex._select(logits, [ids.shape[1] - 1], [tid], cid)
        missing = ex._uncovered(model, method, partial)
        emb = leaves[0]
        if method in ex.LRP_METHODS:
            ex._backward_lrp(values, parts)
            text = emb.grad * emb.detach() if ex.gradient_engine(model) else emb.grad
            pix = px.grad
        else:
            values.sum().backward()
            text, pix = emb.grad, px.grad
            if method == "input_x_gradient":
                text, pix = text * emb.detach(), pix * px.detach()
    if method == "gradient":
        per_token, per_pixel = text[0].norm(dim=-1), pix[0].norm(dim=0)
    else:
        per_token, per_pixel = text[0].sum(-1), pix[0].sum(0)
    per_token, per_pixel = per_token.detach().float().cpu(), per_pixel.detach().float().cpu()
    tokens, rel = _collapse(ex._token_texts, tokenizer, ids[0].tolist(), per_token, image_id,
                            float(per_pixel.sum()))
    return ex.Explanation(
        tokens=tokens, relevance=rel, target=tokenizer.decode([tids[0]]), target_id=tids[0],
        logit=float(values[0].detach()), method=method, prompt=tokenizer.decode(ids[0]),
        contrast=None if cids[0] is None else tokenizer.decode([cids[0]]),
        position=len(tokens) - 1, partial=missing if method in ex.LRP_METHODS else None,
        image=_display(processor, pixels[0]), image_relevance=per_pixel)


def _collapse(_token_texts, tokenizer, ids: list, per_token: Tensor, image_id: int, image_total: float) -> tuple:
    """Tokens (``_token_texts``: their texts, as explain shows them) with each run of image
    tokens as one :data:`IMAGE_ENTRY` entry; the image's total relevance goes to the first run
    (a prompt has one image)."""
    tokens, values, i, first = [], [], 0, True
    while i < len(ids):
        if ids[i] == image_id:
            j = i
            while j < len(ids) and ids[j] == image_id:
                j += 1
            tokens.append(IMAGE_ENTRY)
            values.append(image_total if first else 0.0)
            first, i = False, j
            continue
        j = i
        while j < len(ids) and ids[j] != image_id:
            j += 1
        texts, groups = _token_texts(tokenizer, ids[i:j])
        tokens.extend(texts)
        values.extend(float(per_token[i:j][g].sum()) for g in groups)
        i = j
    return tokens, torch.tensor(values, dtype=torch.float32)

