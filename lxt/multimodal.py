"""Explain a vision-language model's next token over its prompt and its image (``lxt.explain(vlm,
processor, prompt, image=...)``).

The model is called as its processor prepares it (``input_ids``, ``pixel_values``, ...); the
relevance of the text tokens is that of the input embeddings' output (a forward hook makes it a
leaf), the relevance of the image that of ``pixel_values``.  The image tokens of the prompt are
overwritten by the image features (``masked_scatter``), so their embeddings get no relevance;
each run of them is shown as one ``<image>`` entry that carries the image's total.

The image as the model saw it (:attr:`Explanation.image`, one frame) and its per-pixel relevance
(:attr:`Explanation.image_relevance`, summed over colour channels) are read back from each
family's ``pixel_values`` layout (:func:`image_layout`):

- one image ``(1, C, H, W)``: LLaVA, PaliGemma, Gemma 3;
- LLaVA-NeXT's ``anyres`` crops: a base view (the whole image at crop size) and the tiles of a
  padded high-resolution canvas; the frame is the canvas;
- Qwen2-VL / Qwen2.5-VL's flattened patches ``(N, C * T * P * P)`` with ``image_grid_thw``: the
  frame is the resized image, the ``T`` temporal copies of a still image summed;
- Idefics3 / SmolVLM's tiles ``(1, rows * cols + 1, C, t, t)``: the frame is the mosaic of the
  tiles, the last view the whole image at tile size.

A view that covers a region of the frame at another resolution (LLaVA-NeXT's base view,
Idefics3's global image) is resampled onto it by area overlap: a linear map whose columns sum to
one, so every view's relevance keeps its total and the frame's total is the image's.
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
    """The prompt with the processor's image placeholder in front if it has none (Qwen's
    ``<|image_pad|>`` inside its ``<|vision_start|>`` / ``<|vision_end|>`` pair)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise TypeError(f"lxt: with image=, inputs is the prompt (a non-empty str), got {prompt!r}.")
    placeholder = getattr(processor, "boi_token", None) or getattr(processor, "image_token", None)
    if placeholder is None:
        raise TypeError(f"lxt: {type(processor).__name__} has no image_token: pass the model's processor "
                        "(AutoProcessor), not its tokenizer.")
    if placeholder in prompt:
        return prompt
    vocab = processor.tokenizer.get_vocab()
    if all(t in vocab for t in ("<|vision_start|>", "<|vision_end|>")):
        placeholder = f"<|vision_start|>{placeholder}<|vision_end|>"
    return placeholder + prompt


def _area_matrix(n_out: int, n_in: int) -> Tensor:
    """``(n_out, n_in)``: input pixel ``j`` spread over the output pixels its footprint
    ``[j, j + 1) * n_out / n_in`` overlaps, by overlap; each column sums to one."""
    scale = n_out / n_in
    edges = torch.arange(n_in + 1, dtype=torch.float64) * scale
    out = torch.arange(n_out + 1, dtype=torch.float64)
    lo = torch.maximum(edges[:-1][None, :], out[:-1][:, None])
    hi = torch.minimum(edges[1:][None, :], out[1:][:, None])
    return (hi - lo).clamp_min(0) / scale


def _resample(x: Tensor, size) -> Tensor:
    """``(C, h, w)`` onto ``(C, *size)``, each channel's total kept (:func:`_area_matrix`)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    rows = _area_matrix(size[0], x.shape[-2]).to(x.dtype)
    cols = _area_matrix(size[1], x.shape[-1]).to(x.dtype)
    return rows @ x @ cols.T


class ImageLayout:
    """How one image's ``pixel_values`` map onto the frame it is shown in.

    ``to_frame(x)``: a tensor shaped like ``pixel_values`` (their relevance, their gradient)
    as ``(C, H, W)`` on the frame, every view's values resampled onto the region it
    covers and summed (totals kept); ``display``: the pixels of the frame as the model saw them
    (normalised), ``(C, H, W)``; ``views(x)``: ``x`` split per run of image tokens in the
    prompt, in their order (Idefics3: one run per tile, then the global image; else the frame).
    """

    def __init__(self, name, to_frame, display, views=None):
        self.name, self.to_frame, self.display = name, to_frame, display
        self.views = views or (lambda x: [to_frame(x)])


def _mosaic(tiles: Tensor, rows: int, cols: int) -> Tensor:
    """``(rows * cols, C, h, w)`` row-major tiles -> ``(C, rows * h, cols * w)``."""
    c, h, w = tiles.shape[1:]
    return tiles.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


def _llava_next_layout(model, batch) -> ImageLayout:
    """Crop 0: the whole image resized to crop size (aspect not kept); crops 1..: the row-major
    tiles of the canvas of the best resolution, into which the image was resized keeping its
    aspect and centred, the rest padding."""
    import math

    from transformers.image_processing_utils import select_best_resolution

    crops = batch["pixel_values"][0]
    c = crops.shape[-1]
    h0, w0 = (int(v) for v in batch["image_sizes"][0])
    bh, bw = select_best_resolution((h0, w0), model.config.image_grid_pinpoints)
    rows, cols = bh // c, bw // c
    if crops.shape[0] < 1 + rows * cols:
        raise ValueError(f"lxt: LLaVA-NeXT pixel_values has {crops.shape[0]} crops, its layout needs {1 + rows * cols}.")
    sw, sh = bw / w0, bh / h0
    h, w = (min(math.ceil(h0 * sw), bh), bw) if sw < sh else (bh, min(math.ceil(w0 * sh), bw))
    top, left = (bh - h) // 2, (bw - w) // 2

    def to_frame(x):
        x = x[0]
        frame = _mosaic(x[1:1 + rows * cols], rows, cols).clone()
        frame[:, top:top + h, left:left + w] += _resample(x[0], (h, w))
        return frame

    return ImageLayout("llava_next", to_frame, _mosaic(crops[1:1 + rows * cols], rows, cols))


def _qwen_layout(processor, batch) -> ImageLayout:
    """Rows of ``pixel_values``: the patches of the image in merge-window order; row
    ``((bh * gw / m + bw) * m + mh) * m + mw``, column ``((c * T + t) * P + ph) * P + pw`` is
    pixel ``(c, (bh * m + mh) * P + ph, (bw * m + mw) * P + pw)`` of temporal copy ``t``."""
    ip = processor.image_processor
    p, m, T = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    t, gh, gw = (int(v) for v in batch["image_grid_thw"][0])
    if t != 1:
        raise ValueError(f"lxt: image_grid_thw {t, gh, gw}: one still image has one temporal patch.")

    def image(x, reduce):
        n, c = gh * gw, x.shape[-1] // (T * p * p)
        blk = x[:n].reshape(gh // m, gw // m, m, m, c, T, p, p)
        blk = blk.sum(5) if reduce == "sum" else blk.mean(5)
        return blk.permute(4, 0, 2, 5, 1, 3, 6).reshape(c, gh * p, gw * p)

    return ImageLayout("qwen2_vl", lambda x: image(x, "sum"), image(batch["pixel_values"], "mean"))


def _idefics3_layout(processor, batch, pil) -> ImageLayout:
    """``rows * cols`` row-major tiles of the resized image, then the whole image at tile size
    (the global image); without splitting, the global image alone."""
    info = processor.image_processor(pil, return_row_col_info=True, return_tensors="pt")
    rows, cols = int(info["rows"][0][0]), int(info["cols"][0][0])
    views = batch["pixel_values"][0]
    if views.shape[0] < rows * cols + 1:
        raise ValueError(f"lxt: Idefics3 pixel_values has {views.shape[0]} views, its layout needs {rows * cols + 1}.")

    def to_frame(x):
        x = x[0]
        if rows * cols == 0:
            return x[0]
        frame = _mosaic(x[:rows * cols], rows, cols)
        return frame + _resample(x[rows * cols], frame.shape[-2:])

    display = views[0] if rows * cols == 0 else _mosaic(views[:rows * cols], rows, cols)
    return ImageLayout("idefics3", to_frame, display, lambda x: list(x[0, :rows * cols + 1]))


def image_layout(model, processor, batch, pil) -> ImageLayout:
    """The :class:`ImageLayout` of one image's ``batch`` (the processor's output)."""
    pixels = batch["pixel_values"]
    if "image_grid_thw" in batch:
        return _qwen_layout(processor, batch)
    if pixels.dim() == 4 and pixels.shape[0] == 1:
        return ImageLayout("image", lambda x: x[0], pixels[0])
    if pixels.dim() == 5 and pixels.shape[0] == 1 and "image_sizes" in batch \
            and getattr(model.config, "image_grid_pinpoints", None):
        return _llava_next_layout(model, batch)
    if pixels.dim() == 5 and pixels.shape[0] == 1 and "pixel_attention_mask" in batch:
        return _idefics3_layout(processor, batch, pil)
    raise ValueError(f"lxt: {type(model).__name__}'s processor gives pixel_values of shape {tuple(pixels.shape)} "
                     f"with {sorted(batch)}: a layout explain(image=) does not know (it knows one image "
                     "(1, C, H, W), LLaVA-NeXT crops, Qwen2-VL patches and Idefics3 tiles).")


def _display(processor, pixels: Tensor) -> Tensor:
    """``(C, H, W)`` in [0, 1]: the processor's normalisation undone."""
    ip = getattr(processor, "image_processor", None)
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    img = pixels.detach().float().cpu()
    if mean is not None and std is not None:
        img = img * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    return img.clamp(0, 1)


def _messages(processor, messages: list) -> str:
    """A conversation (``[{"role": ..., "content": ...}]``) rendered by the processor's chat
    template with the generation prompt; an image entry is put in front of the first user
    message's content if none has one (the image itself comes from ``image=``)."""
    import copy

    if not all(isinstance(m, dict) and "role" in m for m in messages):
        raise TypeError("lxt: with image=, inputs is a prompt (str) or a conversation (a list of "
                        "{'role': ..., 'content': ...} messages).")
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"lxt: {type(processor).__name__} has no chat template: pass the prompt as a str.")
    messages = copy.deepcopy(messages)

    def parts(m):
        if isinstance(m["content"], str):
            m["content"] = [{"type": "text", "text": m["content"]}]
        return m["content"]

    if not any(c.get("type") == "image" for m in messages for c in parts(m)):
        user = next((m for m in messages if m["role"] == "user"), None)
        if user is None:
            raise ValueError("lxt: the conversation has no user message to show the image in.")
        user["content"] = [{"type": "image"}] + user["content"]
    for m in messages:  # the image is image=; the template only places it
        m["content"] = [{"type": "image"} if c.get("type") == "image" else c for c in m["content"]]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _extended(model, batch: dict, token: int) -> dict:
    """``batch`` with ``token`` appended: its attention-mask entry 1; its token type that of a
    generated token (PaliGemma: 1, the causal suffix; Gemma 3, Qwen: 0, not an image token)."""
    out = dict(batch)
    n = batch["input_ids"].shape[1]
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() == 2 and value.shape == (1, n) and key != "input_ids":
            fill = 1 if key == "attention_mask" or (key == "token_type_ids" and
                                                    model.config.model_type == "paligemma") else 0
            out[key] = torch.cat([value, torch.full((1, 1), fill, dtype=value.dtype)], dim=1)
    out["input_ids"] = torch.cat([batch["input_ids"], torch.tensor([[token]])], dim=1)
    return out


def explain_with_image(ex, model, processor, prompt, image, *, target, contrast, method, partial, composite,
                       generate=0):
    """``ex``: the module :mod:`lxt.explain`, whose checks and selection this reuses (passed by
    it, so that this module does not import it back).  ``generate=N``: greedily generate N
    tokens and explain each over the prompt, the image and the tokens before it."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise TypeError(f"lxt: image= needs the model's processor (AutoProcessor: tokenizer and image "
                        f"processor), got {type(processor).__name__}.")
    if method == "integrated_gradients":
        raise ValueError("lxt: integrated_gradients is not offered with image= (choose attnlrp, cp-lrp, "
                         "input_x_gradient or gradient).")
    if generate and (target is not None or contrast is not None):
        raise ValueError("lxt: generate= explains the model's own tokens: no target= or contrast=.")
    image_id = _image_token_id(model)
    pil = _as_pil(image)
    text = _messages(processor, prompt) if isinstance(prompt, list) else _render(processor, prompt)
    batch = dict(processor(text=[text], images=[pil], return_tensors="pt"))
    batch.pop("labels", None)  # PaliGemma's processor adds them
    layout = image_layout(model, processor, batch, pil)
    cid = ex._output_id(model, tokenizer, contrast, "contrast", "causal")
    param = next(model.parameters())
    out = []
    with ex._eval_mode(model), ex._patched(model, method, composite):
        for step in range(max(generate, 1)):
            kwargs = {k: (v.to(param.device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
            kwargs["pixel_values"] = kwargs["pixel_values"].to(param.dtype)
            if ex._accepts(model, "use_cache"):
                kwargs["use_cache"] = False
            if generate:
                with torch.no_grad():
                    tid = int(model(**kwargs).logits[0, -1].argmax())
            else:
                tid = ex._output_id(model, tokenizer, target, "target", "causal")
            out.append(_explain_once(ex, model, processor, tokenizer, kwargs, layout, image_id, tid, cid,
                                     method, partial))
            if step + 1 >= generate or tid == tokenizer.eos_token_id:
                break
            batch = _extended(model, batch, tid)
    return out if generate else out[0]


def _explain_once(ex, model, processor, tokenizer, kwargs, layout, image_id, tid, cid, method, partial):
    """One next-token explanation of the prepared model inputs ``kwargs``."""
    leaves = []

    def leaf(module, args, out):
        leaves.append(out.detach().requires_grad_())
        return leaves[-1]

    ids = kwargs["input_ids"]
    handle = ex._embedding(model).register_forward_hook(leaf)
    try:
        px = kwargs["pixel_values"].detach().clone().requires_grad_()
        logits = model(**{**kwargs, "pixel_values": px}).logits
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
    frame = layout.to_frame(pix)
    if method == "gradient":
        per_token, per_pixel = text[0].norm(dim=-1), frame.norm(dim=0)
    else:
        per_token, per_pixel = text[0].sum(-1), frame.sum(0)
    per_token, per_pixel = per_token.detach().float().cpu(), per_pixel.detach().float().cpu()
    per_view = [float(v.norm(dim=0).sum() if method == "gradient" else v.sum()) for v in layout.views(pix)]
    tokens, rel = _collapse(ex._token_texts, tokenizer, ids[0].tolist(), per_token, image_id, per_view)
    return ex.Explanation(
        tokens=tokens, relevance=rel, target=tokenizer.decode([tids[0]]), target_id=tids[0],
        logit=float(values[0].detach()), method=method, prompt=tokenizer.decode(ids[0]),
        contrast=None if cids[0] is None else tokenizer.decode([cids[0]]),
        position=len(tokens) - 1, partial=missing if method in ex.LRP_METHODS else None,
        image=_display(processor, layout.display), image_relevance=per_pixel)


def _collapse(_token_texts, tokenizer, ids: list, per_token: Tensor, image_id: int, per_view: list) -> tuple:
    """Tokens (``_token_texts``: their texts, as explain shows them) with each run of image
    tokens as one :data:`IMAGE_ENTRY` entry carrying its view's total (``per_view``, one per
    run; where the runs are not the views, the image's total goes to the first run)."""
    n_runs = sum(1 for k, i in enumerate(ids) if i == image_id and (k == 0 or ids[k - 1] != image_id))
    totals = per_view if len(per_view) == n_runs else [sum(per_view)] + [0.0] * (n_runs - 1)
    tokens, values, i, run = [], [], 0, 0
    while i < len(ids):
        if ids[i] == image_id:
            j = i
            while j < len(ids) and ids[j] == image_id:
                j += 1
            tokens.append(IMAGE_ENTRY)
            values.append(totals[run])
            run, i = run + 1, j
            continue
        j = i
        while j < len(ids) and ids[j] != image_id:
            j += 1
        texts, groups = _token_texts(tokenizer, ids[i:j])
        tokens.extend(texts)
        values.extend(float(per_token[i:j][g].sum()) for g in groups)
        i = j
    return tokens, torch.tensor(values, dtype=torch.float32)

