"""Tiny random-config builders of STOCK transformers vision-language models + tiny offline processors.

Model types: qwen2_vl, qwen2_5_vl, idefics3, smolvlm (transformers 5.23, CPU, no hub access).

Builders (all return ``model.eval()`` in ``dtype``; seed controls init + the non-zero fills)::

    tiny_qwen2_vl(dtype=torch.float32, attn="sdpa", seed=0)
    tiny_qwen2_5_vl(dtype=torch.float32, attn="sdpa", seed=0)
    tiny_idefics3(dtype=torch.float32, attn="sdpa", seed=0)
    tiny_smolvlm(dtype=torch.float32, attn="sdpa", seed=0)

    tiny_qwen2_vl_processor()    -> Qwen2VLProcessor   (Qwen2VLImageProcessorPil, 56x84 px for a 40x30 input)
    tiny_qwen2_5_vl_processor()  -> Qwen2_5_VLProcessor
    tiny_idefics3_processor(split=True)  -> Idefics3Processor (Idefics3ImageProcessorPil)
    tiny_smolvlm_processor(split=True)   -> SmolVLMProcessor  (SmolVLMImageProcessorPil)

    PROMPTS[model_type]      a short prompt containing the single image placeholder the processor expects
    BUILDERS[model_type]     (model_builder, processor_builder)

Layout helpers (map pixel_values-shaped tensors, e.g. a relevance map, back to image space)::

    qwen_patches_to_image(x, grid_thw, patch_size=14, merge_size=2, temporal_patch_size=2, reduce="sum")
        (num_patches, C*T*P*P) -> list of (C, H, W) per image (T copies summed or averaged)
    idefics3_tiles_to_image(x, rows, cols)  (N_tiles+1, C, t, t) -> (tile mosaic (C, rows*t, cols*t), global (C, t, t))

Quirks: Qwen forward needs ``mm_token_type_ids`` (returned by the processor) whenever ``image_grid_thw`` is
given (M-RoPE); image features replace the placeholder embeddings via ``inputs_embeds.masked_scatter``
in all four models. No torchvision here: the PIL image-processor backends are used, and the mandatory
``video_processor`` argument is satisfied by a relaxed type check (None for Qwen, a stub for SmolVLM);
SmolVLMProcessor's num2words requirement (video prompts only) is shimmed with ``str``.

Run ``python group_b.py`` for the self-check (fwd+bwd for all types x {float32, float64} x {sdpa, eager}).
"""
import contextlib
import time

import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor,
                          PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor,
                          SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available
from transformers.video_processing_utils import VideoProcessorMixin

VOCAB = 128
WORDS = ("the capital of france germany italy is paris berlin rome a cat sat on mat and dog ran "
         "in park big small red blue green city country river mountain what image describe this "
         "user assistant system User Assistant : ? . ,").split()

# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def _vocab(specials, vocab_size=VOCAB, words=WORDS):
    """[PAD]=0 [UNK]=1 [EOS]=2, words, filler w{i}, and ``specials`` occupying the LAST ids."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    first_special = vocab_size - len(specials)
    assert len(vocab) <= first_special, "vocab too small"
    for i in range(len(vocab), first_special):
        vocab[f"w{i}"] = i
    for j, s in enumerate(specials):
        vocab[s] = first_special + j
    return vocab


def _special_ids(specials, vocab_size=VOCAB):
    first = vocab_size - len(specials)
    return {s: first + j for j, s in enumerate(specials)}


def _tokenizer(specials, vocab_size=VOCAB, chat_template=None):
    """Offline WordLevel/Whitespace tokenizer; ``specials`` are registered as special added tokens
    (so that e.g. ``<|image_pad|><|image_pad|>`` or ``<image><image>`` split before pre-tokenization)."""
    vocab = _vocab(specials, vocab_size)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    if chat_template is not None:
        fast.chat_template = chat_template
    for s, i in _special_ids(specials, vocab_size).items():
        assert fast.convert_tokens_to_ids(s) == i, (s, i)
    return fast


@contextlib.contextmanager
def _allow_missing_video_processor():
    """Without torchvision, transformers 5.23 cannot type-check a ``video_processor`` argument at all
    (``transformers.VideoProcessorMixin`` is not exported and VIDEO_PROCESSOR_MAPPING is a dummy), so every
    image+video processor's __init__ raises. Temporarily accept None / a VideoProcessorMixin instance there."""
    orig = ProcessorMixin.check_argument_for_proper_class

    def relaxed(self, argument_name, argument):
        if argument_name == "video_processor" and (argument is None or isinstance(argument, VideoProcessorMixin)):
            return VideoProcessorMixin
        return orig(self, argument_name, argument)

    ProcessorMixin.check_argument_for_proper_class = relaxed
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = orig


def _fill_image_path(model, prefixes, seed, std=0.2):
    """Give every all-zero parameter on the image path (biases, LayerNorm biases, zero-init
    projector weights) randn*std under ``seed`` so no relevance path is trivially dead."""
    g = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.startswith(pf) for pf in prefixes) and not bool(p.ne(0).all()):
                z = p.eq(0)
                p[z] = (torch.randn(p.shape, generator=g, dtype=torch.float32) * std).to(p.dtype)[z]
    return model


def _finish(model, dtype, attn, prefixes, seed):
    _fill_image_path(model, prefixes, seed)
    model = model.to(dtype).eval()
    for name, p in model.named_parameters():
        if any(name.startswith(pf) for pf in prefixes):
            assert bool(p.ne(0).all()), f"zero entries left in {name}"
    return model


def _set_attn(cfg, attn):
    cfg._attn_implementation = attn
    for sub in ("text_config", "vision_config"):
        sc = getattr(cfg, sub, None)
        if sc is not None and sc._attn_implementation != attn:
            sc._attn_implementation = attn
    return cfg


# ---------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL
# ---------------------------------------------------------------------------------------------
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
QWEN_IDS = _special_ids(QWEN_SPECIALS)
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 14, 2, 2
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_QWEN_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, initializer_range=0.2, bos_token_id=None, eos_token_id=2, pad_token_id=0,
                  # head_dim = 32/4 = 8 -> rotary half-dim 4 = sum(mrope_section) (t, h, w)
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
_QWEN_TOP = dict(image_token_id=QWEN_IDS["<|image_pad|>"], video_token_id=QWEN_IDS["<|video_pad|>"],
                 vision_start_token_id=QWEN_IDS["<|vision_start|>"], vision_end_token_id=QWEN_IDS["<|vision_end|>"],
                 tie_word_embeddings=False)


def tiny_qwen2_vl(dtype=torch.float32, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    vision = dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=4, in_channels=3,
                  patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL,
                  hidden_act="quick_gelu", initializer_range=0.2)
    cfg = Qwen2VLConfig(text_config=dict(_QWEN_TEXT), vision_config=vision, **_QWEN_TOP)
    _set_attn(cfg, attn)
    model = Qwen2VLForConditionalGeneration(cfg)
    return _finish(model, dtype, attn, ("model.visual.",), seed)


def tiny_qwen2_5_vl(dtype=torch.float32, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    # window_size 56 px = 2x2 merged tokens per window; block 0 windowed, block 1 full attention
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, out_hidden_size=32,
                  patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL,
                  window_size=56, fullatt_block_indexes=[1], hidden_act="silu", initializer_range=0.2,
                  tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=dict(_QWEN_TEXT), vision_config=vision, **_QWEN_TOP)
    _set_attn(cfg, attn)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    return _finish(model, dtype, attn, ("model.visual.",), seed)


def _qwen_image_processor():
    # a 40x30 image -> smart_resize -> 56x84 (min_pixels forces upscaling) -> grid 4x6 = 24 patches -> 6 tokens
    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 84, patch_size=QWEN_PATCH,
                                    merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL)


def _qwen_processor(cls):
    tok = _tokenizer(QWEN_SPECIALS, chat_template=QWEN_CHAT_TEMPLATE)
    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor
        vp = Qwen2VLVideoProcessor(patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL,
                                   min_pixels=56 * 56, max_pixels=56 * 84)
        return cls(image_processor=_qwen_image_processor(), tokenizer=tok, video_processor=vp,
                   chat_template=QWEN_CHAT_TEMPLATE)
    with _allow_missing_video_processor():
        return cls(image_processor=_qwen_image_processor(), tokenizer=tok, video_processor=None,
                   chat_template=QWEN_CHAT_TEMPLATE)


def tiny_qwen2_vl_processor():
    return _qwen_processor(Qwen2VLProcessor)


def tiny_qwen2_5_vl_processor():
    return _qwen_processor(Qwen2_5_VLProcessor)


def qwen_patches_to_image(x, grid_thw, patch_size=QWEN_PATCH, merge_size=QWEN_MERGE,
                          temporal_patch_size=QWEN_TEMPORAL, channels=3, reduce="sum"):
    """Invert Qwen2VLImageProcessor.patchify: ``x`` (num_patches, C*T*P*P) -> [ (C, H, W) per image ].

    Row r of image i (offset by earlier images' t*h*w) = ((bh*(gw/m) + bw)*m + mh)*m + mw, column
    k = ((c*T + t)*P + ph)*P + pw, pixel (c, y, x) with y = (bh*m + mh)*P + ph, x = (bw*m + mw)*P + pw.
    The T temporal copies of a still image are identical inputs; ``reduce`` = "sum" (relevance) or "mean"."""
    out, off = [], 0
    P, m, T, C = patch_size, merge_size, temporal_patch_size, channels
    for t, gh, gw in grid_thw.tolist():
        n = t * gh * gw
        blk = x[off:off + n].reshape(t, gh // m, gw // m, m, m, C, T, P, P)
        blk = blk.sum(6) if reduce == "sum" else blk.mean(6)          # (t, bh, bw, mh, mw, C, P, P)
        img = blk.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(t, C, gh * P, gw * P)
        out.append(img[0] if t == 1 else img)
        off += n
    return out


# ---------------------------------------------------------------------------------------------
# Idefics3 / SmolVLM
# ---------------------------------------------------------------------------------------------
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
IDEFICS_SPECIALS = ["<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>",
                    "<video>"] + ROW_COL + ["<image>"]
IDEFICS_IDS = _special_ids(IDEFICS_SPECIALS)
IDEFICS_TILE, IDEFICS_PATCH, IDEFICS_SCALE = 16, 4, 2          # 16px tiles, 4x4 patches, pixel-shuffle 2
IDEFICS_SEQ = (IDEFICS_TILE // IDEFICS_PATCH) ** 2 // IDEFICS_SCALE ** 2    # 4 <image> tokens per tile
IDEFICS_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %} {{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def _idefics_cfg(cls, attn):
    text = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=None, eos_token_id=2, pad_token_id=0,
                tie_word_embeddings=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_channels=3,
                  image_size=IDEFICS_TILE, patch_size=IDEFICS_PATCH, hidden_act="gelu_pytorch_tanh",
                  initializer_range=0.2)
    cfg = cls(text_config=text, vision_config=vision, scale_factor=IDEFICS_SCALE,
              image_token_id=IDEFICS_IDS["<image>"], tie_word_embeddings=False, pad_token_id=0)
    return _set_attn(cfg, attn)


_IDEFICS_PREFIXES = ("model.vision_model.", "model.connector.")


def tiny_idefics3(dtype=torch.float32, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(_idefics_cfg(Idefics3Config, attn))
    return _finish(model, dtype, attn, _IDEFICS_PREFIXES, seed)


def tiny_smolvlm(dtype=torch.float32, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(_idefics_cfg(SmolVLMConfig, attn))
    return _finish(model, dtype, attn, _IDEFICS_PREFIXES, seed)


def _idefics_image_kwargs(split):
    # split=True : resize longest edge to 32, pad up to multiples of 16 -> 2x2 tiles of 16 + a 16x16 global image
    # split=False: one 16x16 (aspect-distorting) resize, rows = cols = 0 -> only the "global" image
    return dict(do_resize=True, size={"longest_edge": 2 * IDEFICS_TILE}, max_image_size={"longest_edge": IDEFICS_TILE},
                do_image_splitting=split, do_pad=True)


def tiny_idefics3_processor(split=True):
    tok = _tokenizer(IDEFICS_SPECIALS, chat_template=IDEFICS_CHAT_TEMPLATE)
    ip = Idefics3ImageProcessorPil(**_idefics_image_kwargs(split))
    return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=IDEFICS_SEQ,
                             chat_template=IDEFICS_CHAT_TEMPLATE)


class _ImageOnlyVideoProcessor(VideoProcessorMixin):
    """Placeholder for SmolVLMProcessor's mandatory ``video_processor`` (the stock SmolVLMVideoProcessor needs
    torchvision, which is not installed). Carries num_frames/fps for apply_chat_template; refuses videos."""
    num_frames = 1
    fps = 1

    def preprocess(self, videos, **kwargs):
        raise NotImplementedError("tiny SmolVLM processor: videos unsupported (no torchvision)")


def tiny_smolvlm_processor(split=True):
    import transformers.models.smolvlm.processing_smolvlm as psm
    if not psm.num2words:      # only used to spell frame counts in *video* prompts; package not installed here
        psm.num2words = lambda n, **kw: str(n)
    tok = _tokenizer(IDEFICS_SPECIALS, chat_template=IDEFICS_CHAT_TEMPLATE)
    ip = SmolVLMImageProcessorPil(**_idefics_image_kwargs(split))
    if is_torchvision_available():
        from transformers import SmolVLMVideoProcessor
        vp = SmolVLMVideoProcessor(size={"longest_edge": 2 * IDEFICS_TILE},
                                   max_image_size={"longest_edge": IDEFICS_TILE})
        return SmolVLMProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                image_seq_len=IDEFICS_SEQ, chat_template=IDEFICS_CHAT_TEMPLATE)
    with _allow_missing_video_processor():
        return SmolVLMProcessor(image_processor=ip, tokenizer=tok, video_processor=_ImageOnlyVideoProcessor(),
                                image_seq_len=IDEFICS_SEQ, chat_template=IDEFICS_CHAT_TEMPLATE)


def idefics3_tiles_to_image(x, rows, cols):
    """``x``: (rows*cols + 1, C, t, t) pixel-shaped tensor of ONE image (pixel_values[b, :n] with padding images
    dropped). Returns (mosaic (C, rows*t, cols*t) of the split tiles in the frame of the resized image, global
    (C, t, t) = whole image resized to t x t). rows == cols == 0 (no splitting): mosaic is None."""
    glob = x[rows * cols]
    if rows == 0 and cols == 0:
        return None, glob
    C, t = x.shape[1], x.shape[-1]
    mosaic = x[:rows * cols].reshape(rows, cols, C, t, t).permute(2, 0, 3, 1, 4).reshape(C, rows * t, cols * t)
    return mosaic, glob


PROMPTS = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|> what is the capital of france",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|> what is the capital of france",
    "idefics3": "User:<image> what is the capital of france<end_of_utterance>\nAssistant:",
    "smolvlm": "User:<image> what is the capital of france<end_of_utterance>\nAssistant:",
}
BUILDERS = {
    "qwen2_vl": (tiny_qwen2_vl, tiny_qwen2_vl_processor),
    "qwen2_5_vl": (tiny_qwen2_5_vl, tiny_qwen2_5_vl_processor),
    "idefics3": (tiny_idefics3, tiny_idefics3_processor),
    "smolvlm": (tiny_smolvlm, tiny_smolvlm_processor),
}
IMAGE_TOKEN_IDS = {"qwen2_vl": QWEN_IDS["<|image_pad|>"], "qwen2_5_vl": QWEN_IDS["<|image_pad|>"],
                   "idefics3": IDEFICS_IDS["<image>"], "smolvlm": IDEFICS_IDS["<image>"]}


# ---------------------------------------------------------------------------------------------
# self-check
# ---------------------------------------------------------------------------------------------


def _noise_image(w=40, h=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    return Image.frombytes("RGB", (w, h), bytes(data.flatten().tolist()))


def _run_once(mtype, dtype, attn, image, proc):
    build = BUILDERS[mtype][0]
    model = build(dtype=dtype, attn=attn)
    model_in = proc(text=PROMPTS[mtype], images=image, return_tensors="pt")
    inputs = {k: v for k, v in model_in.items()}
    pv = inputs["pixel_values"].to(dtype).requires_grad_()
    inputs["pixel_values"] = pv
    with torch.no_grad():                               # warm-up (first call pays lazy-init costs)
        t0 = time.perf_counter()
        model(**inputs, use_cache=False)
        t_cold = time.perf_counter() - t0
    kept = []
    h = model.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: kept.append(out.detach().requires_grad_()) or kept[-1])
    try:
        t0 = time.perf_counter()
        out = model(**inputs, use_cache=False)
        t_fwd = time.perf_counter() - t0
    finally:
        h.remove()
    assert len(kept) == 1
    logits = out.logits
    assert logits.dtype == dtype, (logits.dtype, dtype)
    logits[0, -1].max().backward()
    emb = kept[0]
    assert emb.grad is not None and pv.grad is not None
    assert torch.isfinite(emb.grad).all() and torch.isfinite(pv.grad).all()
    assert pv.grad.abs().sum() > 0, "pixel_values grad is zero"
    img_pos = inputs["input_ids"][0] == IMAGE_TOKEN_IDS[mtype]
    assert img_pos.any()
    assert emb.grad[0, ~img_pos].abs().sum() > 0, "text embedding grad is zero"
    assert emb.grad[0, img_pos].abs().sum() == 0   # image positions are overwritten by the vision features
    return (t_cold, t_fwd), dict(seq=inputs["input_ids"].shape[1], n_img_tok=int(img_pos.sum()),
                       pixel_values=tuple(pv.shape), keys=sorted(inputs))


def check(num_threads=1):
    """fwd + bwd for every type x {float32, float64} x {sdpa, eager}; asserts finite, non-zero gradients on
    pixel_values and on the text positions of the hooked input embeddings. One CPU thread by default (on a
    loaded 2-core box the default thread pool makes these 3 ms forwards take 100-200 ms)."""
    prev_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        _check()
    finally:
        torch.set_num_threads(prev_threads)


def _check():
    image = _noise_image()
    for mtype, (_, build_proc) in BUILDERS.items():
        proc = build_proc()
        for dtype in (torch.float32, torch.float64):
            for attn in ("sdpa", "eager"):
                (t_cold, t_fwd), info = _run_once(mtype, dtype, attn, image, proc)
                print(f"{mtype:11s} {str(dtype)[6:]:8s} {attn:5s} fwd first {1e3 * t_cold:6.1f} ms, "
                      f"with-grad {1e3 * t_fwd:6.1f} ms  {info}")
    print("all ok")


if __name__ == "__main__":
    check()
