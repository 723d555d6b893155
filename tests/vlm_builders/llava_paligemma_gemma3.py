"""Tiny random-config builders of STOCK transformers vision-language models + offline processors.

Model types: llava, llava_next, paligemma, gemma3 (with images).  Nothing is loaded from the hub.

Builders
--------
``tiny_<type>(dtype=torch.float32, attn="sdpa", seed=0, fill_zero=True)`` -> model (eval mode)
``tiny_<type>_processor()`` -> stock processor (tokenizer built offline with ``tokenizers``)
``inputs_<type>(processor, dtype)`` -> dict of model kwargs for a fixed PIL image + prompt
``check()`` runs the gradient smoke test for every type / dtype / attention implementation.

Only torch, transformers, tokenizers and PIL are imported.
"""
import time

import torch
from PIL import Image
from transformers import (CLIPVisionConfig, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor,
                          Gemma3TextConfig, GemmaConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor,
                          PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                          PreTrainedTokenizerFast, SiglipVisionConfig)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

# ----------------------------------------------------------------------------------------------
# shared sizes / vocabulary
# ----------------------------------------------------------------------------------------------
WORDS = ("the capital of france germany italy is paris berlin rome a cat sat on mat and dog ran "
         "in park big small red blue green city country river mountain what picture show user "
         "assistant model describe image").split()
PROMPT_WORDS = "what is in the picture"

IMG = 16          # vision image size (px)
PATCH = 4         # vision patch size -> 4x4 = 16 patches per crop
VOCAB = 110       # llava / llava_next / paligemma text vocab
VOCAB_G3 = 120    # gemma3 text vocab
PAD, UNK, EOS, BOS = 0, 1, 2, 3

_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256, initializer_range=0.2,
             pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)

#: simple chat templates: {"type": "image"} -> the processor's image placeholder string
_CHAT = ("{% for m in messages %}{{ m['role'] }} : "
         "{% if m['content'] is string %}{{ m['content'] }}"
         "{% else %}{% for c in m['content'] %}"
         "{% if c['type'] == 'image' %}{{ PLACEHOLDER }} {% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}"
         "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")


def chat_template(placeholder):
    return _CHAT.replace("{{ PLACEHOLDER }}", placeholder)


def tiny_tokenizer(vocab_size, named_specials, words=WORDS):
    """WordLevel + Whitespace tokenizer; ``named_specials`` ({attr_name: token}) take the LAST ids of
    the vocab in order, and become ``tok.<attr_name>`` / ``tok.<attr_name>_id`` (model-specific special
    tokens of transformers v5) so they are never split by the Whitespace pre-tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": PAD, "[UNK]": UNK, "[EOS]": EOS, "[BOS]": BOS}
    for w in words:
        vocab.setdefault(w, len(vocab))
    n_special = len(named_specials)
    for i in range(len(vocab), vocab_size - n_special):
        vocab[f"w{i}"] = i
    for i, tok in enumerate(named_specials.values()):
        vocab[tok] = vocab_size - n_special + i
    assert len(vocab) == vocab_size, len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                  eos_token="[EOS]", bos_token="[BOS]",
                                  extra_special_tokens=dict(named_specials))
    for name, t in named_specials.items():  # ids must be the vocab ids (not appended added tokens)
        assert tok.convert_tokens_to_ids(t) == vocab[t], (name, t)
        assert tok.encode(f"a {t} b", add_special_tokens=False)[1] == vocab[t]
    return tok


def _finish(model, dtype, seed, fill_zero):
    """Make every all-zero parameter non-zero (deterministically) and cast."""
    if fill_zero:
        g = torch.Generator().manual_seed(seed + 12345)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if torch.count_nonzero(p) == 0:
                    std = 0.2 if name.endswith("mm_input_projection_weight") else 0.05
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
    return model.to(dtype).eval()


def _clip_vision(**kw):
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=IMG, patch_size=PATCH, num_channels=3, projection_dim=32, **kw)


def _siglip_vision(**kw):
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMG, patch_size=PATCH, num_channels=3, vision_use_head=False, **kw)


# ----------------------------------------------------------------------------------------------
# LLaVA (CLIP vision + Llama)
# ----------------------------------------------------------------------------------------------
LLAVA_IMAGE_ID = VOCAB - 1           # "<image>"
LLAVA_N_IMAGE_TOKENS = (IMG // PATCH) ** 2   # 16 (CLS dropped by vision_feature_select_strategy="default")


def tiny_llava(dtype=torch.float32, attn="sdpa", seed=0, fill_zero=True, vision_feature_layer=-2):
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=_clip_vision(), text_config=LlamaConfig(vocab_size=VOCAB, **_TEXT),
                      image_token_index=LLAVA_IMAGE_ID, image_seq_length=LLAVA_N_IMAGE_TOKENS,
                      projector_hidden_act="gelu", vision_feature_select_strategy="default",
                      vision_feature_layer=vision_feature_layer, pad_token_id=PAD)
    cfg._attn_implementation = attn
    return _finish(LlavaForConditionalGeneration(cfg), dtype, seed, fill_zero)


def tiny_llava_processor():
    tok = tiny_tokenizer(VOCAB, {"image_token": "<image>"})
    ip = LlavaImageProcessorPil(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG},
                                do_center_crop=True, do_pad=False)
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>", chat_template=chat_template("<image>"))


# ----------------------------------------------------------------------------------------------
# LLaVA-NeXT (anyres crops, CLIP vision + Llama)
# ----------------------------------------------------------------------------------------------
LLAVA_NEXT_IMAGE_ID = VOCAB - 1
LLAVA_NEXT_PINPOINTS = [[IMG, 2 * IMG], [2 * IMG, IMG], [2 * IMG, 2 * IMG]]   # (height, width)


def tiny_llava_next(dtype=torch.float32, attn="sdpa", seed=0, fill_zero=True, vision_feature_layer=-2):
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(vision_config=_clip_vision(), text_config=LlamaConfig(vocab_size=VOCAB, **_TEXT),
                          image_token_index=LLAVA_NEXT_IMAGE_ID, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
                          projector_hidden_act="gelu", vision_feature_select_strategy="default",
                          vision_feature_layer=vision_feature_layer, image_seq_length=LLAVA_N_IMAGE_TOKENS,
                          pad_token_id=PAD)
    cfg._attn_implementation = attn
    return _finish(LlavaNextForConditionalGeneration(cfg), dtype, seed, fill_zero)


def llava_next_layout(image_size, pinpoints=LLAVA_NEXT_PINPOINTS, crop=IMG):
    """How LLaVA-NeXT's anyres crops map back to the original image (stock processor semantics).

    ``image_size`` = (H, W) of the ORIGINAL image (``inputs["image_sizes"][i]``).  pixel_values[i] is
    (crops, C, crop, crop): crop 0 = the whole image resized (aspect NOT kept) to crop x crop; crops 1.. =
    row-major tiles (rows x cols) of a canvas of size ``best`` = select_best_resolution(image_size, pinpoints)
    into which the image was resized keeping aspect (``resized`` = (h, w)) and pasted at (top, left), the
    rest zero-padded (before normalisation).  Returns dict(best, grid=(rows, cols), resized, offset)."""
    import math

    from transformers.image_processing_utils import select_best_resolution
    H, W = [int(v) for v in image_size]
    bh, bw = select_best_resolution((H, W), pinpoints)
    sw, sh = bw / W, bh / H
    if sw < sh:
        h, w = min(math.ceil(H * sw), bh), bw
    else:
        h, w = bh, min(math.ceil(W * sh), bw)
    return dict(best=(bh, bw), grid=(bh // crop, bw // crop), resized=(h, w), offset=((bh - h) // 2, (bw - w) // 2))


def llava_next_canvas(crops, image_size, pinpoints=LLAVA_NEXT_PINPOINTS):
    """Reassemble crops 1.. of ``pixel_values[i]`` (crops, C, h, w) (or their gradients / relevances) into the
    (C, best_h, best_w) canvas, and return (base_crop, canvas, original_region) where original_region is the
    canvas slice showing the (resized) original image."""
    c = crops.shape[-1]
    lay = llava_next_layout(image_size, pinpoints, c)
    rows, cols = lay["grid"]
    tiles = crops[1:1 + rows * cols]
    canvas = torch.cat([torch.cat(list(tiles[r * cols:(r + 1) * cols]), dim=-1) for r in range(rows)], dim=-2)
    (t, l), (h, w) = lay["offset"], lay["resized"]
    return crops[0], canvas, canvas[:, t:t + h, l:l + w]


def tiny_llava_next_processor():
    tok = tiny_tokenizer(VOCAB, {"image_token": "<image>"})
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG},
                                    image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, do_pad=True)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token="<image>", chat_template=chat_template("<image>"))


# ----------------------------------------------------------------------------------------------
# PaliGemma (SigLIP vision + Gemma, prefix-LM via token_type_ids)
# ----------------------------------------------------------------------------------------------
PALIGEMMA_IMAGE_ID = VOCAB - 1
PALIGEMMA_N_IMAGE_TOKENS = (IMG // PATCH) ** 2   # 16


def tiny_paligemma(dtype=torch.float32, attn="sdpa", seed=0, fill_zero=True):
    torch.manual_seed(seed)
    text = GemmaConfig(vocab_size=VOCAB, hidden_activation="gelu_pytorch_tanh", **_TEXT)
    cfg = PaliGemmaConfig(vision_config=_siglip_vision(), text_config=text, image_token_index=PALIGEMMA_IMAGE_ID,
                          vocab_size=VOCAB, projection_dim=32, hidden_size=32, pad_token_id=PAD)
    cfg._attn_implementation = attn
    return _finish(PaliGemmaForConditionalGeneration(cfg), dtype, seed, fill_zero)


def tiny_paligemma_processor():
    tok = tiny_tokenizer(VOCAB, {"image_token": "<image>"})
    ip = SiglipImageProcessorPil(size={"height": IMG, "width": IMG})
    ip.image_seq_length = PALIGEMMA_N_IMAGE_TOKENS   # PaliGemmaProcessor requires this attribute
    # NOTE: PaliGemmaProcessor.__init__ adds 1152 <locXXXX>/<segXXX> tokens to the tokenizer (ids >= VOCAB;
    # never produced by our prompts) and disables add_bos/add_eos.
    return PaliGemmaProcessor(image_processor=ip, tokenizer=tok, chat_template=chat_template("<image>"))


# ----------------------------------------------------------------------------------------------
# Gemma3 (SigLIP vision + avg-pool projector + Gemma3 text)
# ----------------------------------------------------------------------------------------------
G3_BOI_ID, G3_EOI_ID, G3_IMAGE_ID = VOCAB_G3 - 3, VOCAB_G3 - 2, VOCAB_G3 - 1
G3_MM_TOKENS = 4     # 4x4 patches -> AvgPool2d(kernel 2) -> 2x2 = 4 soft tokens per image


def tiny_gemma3(dtype=torch.float32, attn="sdpa", seed=0, fill_zero=True, sliding_window=8):
    torch.manual_seed(seed)
    text = Gemma3TextConfig(vocab_size=VOCAB_G3, query_pre_attn_scalar=8, sliding_window=sliding_window,
                            layer_types=["sliding_attention", "full_attention"], **_TEXT)
    cfg = Gemma3Config(vision_config=_siglip_vision(), text_config=text, mm_tokens_per_image=G3_MM_TOKENS,
                       boi_token_index=G3_BOI_ID, eoi_token_index=G3_EOI_ID, image_token_index=G3_IMAGE_ID,
                       initializer_range=0.2, pad_token_id=PAD)
    cfg._attn_implementation = attn
    return _finish(Gemma3ForConditionalGeneration(cfg), dtype, seed, fill_zero)


def tiny_gemma3_processor():
    tok = tiny_tokenizer(VOCAB_G3, {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                    "image_token": "<image_soft_token>"})
    ip = Gemma3ImageProcessorPil(size={"height": IMG, "width": IMG}, do_pan_and_scan=False)
    return Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=G3_MM_TOKENS,
                           chat_template=chat_template("<start_of_image>"))


# ----------------------------------------------------------------------------------------------
# inputs + check
# ----------------------------------------------------------------------------------------------
#: text placeholder per type (what goes into the prompt where the image is)
PLACEHOLDER = {"llava": "<image>", "llava_next": "<image>", "paligemma": "<image>", "gemma3": "<start_of_image>"}
BUILDERS = {"llava": (tiny_llava, tiny_llava_processor), "llava_next": (tiny_llava_next, tiny_llava_next_processor),
            "paligemma": (tiny_paligemma, tiny_paligemma_processor), "gemma3": (tiny_gemma3, tiny_gemma3_processor)}
IMAGE_TOKEN_ID = {"llava": LLAVA_IMAGE_ID, "llava_next": LLAVA_NEXT_IMAGE_ID, "paligemma": PALIGEMMA_IMAGE_ID,
                  "gemma3": G3_IMAGE_ID}


def test_image(size=(40, 30), seed=0):
    """A deterministic non-constant RGB PIL image (width, height) = size."""
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def inputs_for(kind, processor, dtype=torch.float32, image=None, prompt=PROMPT_WORDS):
    image = test_image() if image is None else image
    # PaliGemma convention: images first ("<image>" * N + <bos> + prompt + "\n" is built by the processor)
    text = f"{PLACEHOLDER[kind]} {prompt}" if kind == "paligemma" else f"user {PLACEHOLDER[kind]} {prompt}"
    enc = processor(text=text, images=image, return_tensors="pt")
    enc = dict(enc)
    enc.pop("labels", None)                # PaliGemma returns labels (BC); not wanted
    enc["pixel_values"] = enc["pixel_values"].to(dtype)
    return enc


def grad_check(model, enc, image_token_id):
    """Hook the input embeddings, backprop the max last-position logit; return grads and timing."""
    store = []

    def hook(mod, inp, out):
        leaf = out.detach().requires_grad_()
        store.append(leaf)
        return leaf

    h = model.get_input_embeddings().register_forward_hook(hook)
    try:
        enc = dict(enc)
        pv = enc["pixel_values"].detach().clone().requires_grad_()
        enc["pixel_values"] = pv
        t0 = time.perf_counter()
        out = model(**enc, use_cache=False)
        dt = time.perf_counter() - t0
        out.logits[0, -1].max().backward()
    finally:
        h.remove()
    emb = store[0]
    assert torch.isfinite(out.logits).all()
    assert pv.grad is not None and torch.isfinite(pv.grad).all(), "pixel grad not finite"
    assert emb.grad is not None and torch.isfinite(emb.grad).all(), "embedding grad not finite"
    assert pv.grad.abs().sum() > 0, "pixel_values.grad is zero"
    text_pos = enc["input_ids"][0] != image_token_id
    assert emb.grad[0, text_pos].abs().sum() > 0, "text-position embedding grad is zero"
    # masked_scatter: the embedding of the image-placeholder positions receives no gradient
    assert emb.grad[0, ~text_pos].abs().sum() == 0
    return pv.grad, emb.grad, dt


def check():
    torch.set_num_threads(4)
    for kind, (build, build_proc) in BUILDERS.items():
        proc = build_proc()
        for dtype in (torch.float32, torch.float64):
            for attn in ("sdpa", "eager"):
                model = build(dtype=torch.float32, attn=attn).to(dtype)     # also exercises .to(float64)
                assert model.config.get_text_config()._attn_implementation == attn
                assert model.config.vision_config._attn_implementation == attn
                zeros = [n for n, p in model.named_parameters() if torch.count_nonzero(p) == 0]
                assert not zeros, zeros
                enc = inputs_for(kind, proc, dtype)
                n_img = int((enc["input_ids"] == IMAGE_TOKEN_ID[kind]).sum())
                pg, eg, dt = grad_check(model, enc, IMAGE_TOKEN_ID[kind])
                extra = {k: tuple(v.shape) for k, v in enc.items() if k not in ("input_ids",)}
                print(f"{kind:11s} {str(dtype):14s} {attn:5s} seq={enc['input_ids'].shape[1]:3d} "
                      f"img_tokens={n_img:3d} fwd={dt * 1e3:7.1f} ms |pix.grad|={pg.abs().sum():.3e} "
                      f"|emb.grad|={eg.abs().sum():.3e} {extra}")
        if kind == "llava_next":   # crop layout helper: padding rows of the canvas are constant
            enc = inputs_for(kind, proc)
            base, canvas, region = llava_next_canvas(enc["pixel_values"][0], enc["image_sizes"][0])
            lay = llava_next_layout(enc["image_sizes"][0])
            (t, _), (h, _) = lay["offset"], lay["resized"]
            assert canvas[:, :t].flatten(1).std(-1).max() < 1e-6 and canvas[:, t + h:].flatten(1).std(-1).max() < 1e-6
            print(f"llava_next  layout {lay} canvas={tuple(canvas.shape)} region={tuple(region.shape)}")
        # chat template (processor.apply_chat_template with an image in the messages)
        msgs = [{"role": "user", "content": [{"type": "image", "image": test_image()},
                                             {"type": "text", "text": PROMPT_WORDS}]}]
        try:
            enc = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
            enc = dict(enc)
            enc.pop("labels", None)
            model = build()
            with torch.no_grad():
                model(**enc)
            print(f"{kind:11s} apply_chat_template OK: keys={sorted(enc)} seq={enc['input_ids'].shape[1]}")
        except Exception as e:  # report, don't fail
            print(f"{kind:11s} apply_chat_template FAILED: {type(e).__name__}: {e}")
    print("ALL OK")


if __name__ == "__main__":
    check()
