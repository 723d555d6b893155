"""Tiny random-config builders of STOCK transformers (5.23) image / text-image encoders
plus tiny processors built entirely offline (no hub, no torchvision needed).

    clip     : CLIPModel (also CLIPTextModel / CLIPVisionModel / *WithProjection /
               CLIPForImageClassification on the matching sub-config)  + CLIPProcessor
    siglip   : SiglipModel (also Siglip{Text,Vision}Model, SiglipForImageClassification)
               + SiglipProcessor (padding="max_length")
    siglip2  : Siglip2Model (NaFlex) (also Siglip2{Text,Vision}Model, Siglip2ForImageClassification)
               + Siglip2Processor
    dinov2   : Dinov2Model / Dinov2ForImageClassification + BitImageProcessor(Pil)

Builders: ``tiny_<type>(dtype=torch.float32, attn="sdpa", seed=0, cls=None)`` -> model in eval().
Processors: ``tiny_<type>_processor()``.
Run ``python group_c.py`` for the self-check (f32/f64 x sdpa/eager, grads to pixels + text embeds).
"""
import math
import time

import torch
import transformers
from transformers import (CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig,
                          Dinov2Config, Dinov2ForImageClassification, Dinov2Model,
                          PreTrainedTokenizerFast, Siglip2Config, Siglip2Model, Siglip2Processor,
                          SiglipConfig, SiglipModel, SiglipProcessor)

VOCAB = 101
TEXT_LEN = 16          # max_position_embeddings of every text tower == tokenizer model_max_length
HIDDEN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

# ids of the offline word-level vocabulary (shared by all text towers)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, VOCAB - 2, VOCAB - 1   # BOS=99, EOS=100 (EOS = highest id)
WORDS = ("a photo of the cat dog car tree red blue green big small on in and house river mountain "
         "city bird sky sea road man woman child").split()


def _img_proc(name):
    """Stock image-processor class; ``<Name>Pil`` (the PIL backend) when torchvision is absent
    (``<Name>`` itself then falls back to ``<Name>Pil`` with a warning)."""
    try:
        import torchvision  # noqa: F401
        return getattr(transformers, name)
    except ImportError:
        return getattr(transformers, name + "Pil")


def tiny_tokenizer(template="bos_eos", vocab_size=VOCAB, max_len=TEXT_LEN, input_names=None):
    """Offline WordLevel tokenizer (Whitespace pre-tokenizer, lower-casing) wrapped in
    PreTrainedTokenizerFast.  ``template``: "bos_eos" ([BOS] $A [EOS], CLIP style), "eos"
    ($A [EOS], SigLIP/Gemma style), or None.  Ids: PAD 0, UNK 1, words..., BOS 99, EOS 100."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": PAD_ID, "[UNK]": UNK_ID}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), BOS_ID):
        vocab[f"w{i}"] = i
    vocab["[BOS]"], vocab["[EOS]"] = BOS_ID, EOS_ID
    assert len(vocab) == vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template == "bos_eos":
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A [EOS]", pair="[BOS] $A [EOS] $B [EOS]",
            special_tokens=[("[BOS]", BOS_ID), ("[EOS]", EOS_ID)])
    elif template == "eos":
        tok.post_processor = processors.TemplateProcessing(
            single="$A [EOS]", pair="$A [EOS] $B [EOS]", special_tokens=[("[EOS]", EOS_ID)])
    kw = {}
    if input_names is not None:
        kw["model_input_names"] = list(input_names)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]", model_max_length=max_len,
                                   **kw)


def _text_kw(**extra):
    return dict(HIDDEN, vocab_size=VOCAB, max_position_embeddings=TEXT_LEN, pad_token_id=PAD_ID,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, **extra)


def _pick_config(cls, full, text, vision):
    """A sub-model class (CLIPTextModel, SiglipVisionModel, ...) gets its own sub-config."""
    cc = getattr(cls, "config_class", None)
    for c in (full, text, vision):
        if cc is not None and isinstance(c, cc):
            return c
    return full


def _finish(model, dtype, attn):
    model = model.to(dtype).eval()
    # propagates recursively to sub-configs (text_config / vision_config)
    model.config._attn_implementation = attn
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if isinstance(cfg, transformers.PreTrainedConfig):
            cfg._attn_implementation = attn
    return model


# ----------------------------------------------------------------------------------------- CLIP
CLIP_IMAGE, CLIP_PATCH = 16, 4


def tiny_clip(dtype=torch.float32, attn="sdpa", seed=0, cls=None, **kw):
    """CLIPModel by default; cls=CLIPTextModel(/WithProjection) gets the text config,
    CLIPVisionModel(/WithProjection) the vision config, CLIPForImageClassification the full one."""
    torch.manual_seed(seed)
    cls = cls or CLIPModel
    tcfg = CLIPTextConfig(**_text_kw(projection_dim=16, hidden_act="quick_gelu",
                                     initializer_range=0.1, initializer_factor=1.0))
    vcfg = CLIPVisionConfig(**HIDDEN, image_size=CLIP_IMAGE, patch_size=CLIP_PATCH, num_channels=3,
                            projection_dim=16, hidden_act="quick_gelu", initializer_range=0.1,
                            initializer_factor=1.0)
    cfg = CLIPConfig(text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(), projection_dim=16,
                     initializer_factor=1.0, num_labels=3, **kw)
    for c in (cfg, tcfg, vcfg):
        c._attn_implementation = attn
    model = cls(_pick_config(cls, cfg, tcfg, vcfg))
    return _finish(model, dtype, attn)


def tiny_clip_processor():
    ip = _img_proc("CLIPImageProcessor")(size={"shortest_edge": CLIP_IMAGE + 4},
                                        crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE})
    return CLIPProcessor(image_processor=ip, tokenizer=tiny_tokenizer("bos_eos"))


# --------------------------------------------------------------------------------------- SigLIP
SIGLIP_IMAGE, SIGLIP_PATCH = 16, 4


def _nontrivial_logit_scale(model):
    # stock _init_weights zeroes logit_scale and logit_bias; give them real-looking values
    if hasattr(model, "logit_scale") and hasattr(model, "logit_bias"):
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-2.0)
    return model


def tiny_siglip(dtype=torch.float32, attn="sdpa", seed=0, cls=None, **kw):
    """SiglipModel by default (cls=SiglipTextModel / SiglipVisionModel get their sub-config)."""
    from transformers import SiglipTextConfig, SiglipVisionConfig
    torch.manual_seed(seed)
    cls = cls or SiglipModel
    tcfg = SiglipTextConfig(**_text_kw(projection_size=32))
    vcfg = SiglipVisionConfig(**HIDDEN, image_size=SIGLIP_IMAGE, patch_size=SIGLIP_PATCH,
                              num_channels=3, vision_use_head=True)
    cfg = SiglipConfig(text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(),
                       initializer_factor=1.0, num_labels=3, **kw)
    for c in (cfg, tcfg, vcfg):
        c._attn_implementation = attn
    model = _nontrivial_logit_scale(cls(_pick_config(cls, cfg, tcfg, vcfg)))
    return _finish(model, dtype, attn)


def tiny_siglip_processor():
    """Call with padding="max_length" (SigLIP pools the LAST position).  Like the stock
    SiglipTokenizer, returns input_ids only (no attention_mask)."""
    ip = _img_proc("SiglipImageProcessor")(size={"height": SIGLIP_IMAGE, "width": SIGLIP_IMAGE})
    tok = tiny_tokenizer("eos", input_names=["input_ids"])
    return SiglipProcessor(image_processor=ip, tokenizer=tok)


# -------------------------------------------------------------------------------------- SigLIP2
SIGLIP2_PATCH, SIGLIP2_NUM_PATCHES = 4, 16     # position grid 4x4 (num_patches must be a square)


def tiny_siglip2(dtype=torch.float32, attn="sdpa", seed=0, cls=None, **kw):
    """Siglip2Model (NaFlex) by default.  Inputs: pixel_values (B, 16, 4*4*3) (patch-major,
    channel-LAST inside a patch), pixel_attention_mask (B, 16), spatial_shapes (B, 2)."""
    from transformers import Siglip2TextConfig, Siglip2VisionConfig
    torch.manual_seed(seed)
    cls = cls or Siglip2Model
    tcfg = Siglip2TextConfig(**_text_kw(projection_size=32))
    vcfg = Siglip2VisionConfig(**HIDDEN, patch_size=SIGLIP2_PATCH, num_patches=SIGLIP2_NUM_PATCHES,
                               num_channels=3, vision_use_head=True)
    cfg = Siglip2Config(text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(),
                        initializer_factor=1.0, num_labels=3, **kw)
    for c in (cfg, tcfg, vcfg):
        c._attn_implementation = attn
    model = _nontrivial_logit_scale(cls(_pick_config(cls, cfg, tcfg, vcfg)))
    return _finish(model, dtype, attn)


def tiny_siglip2_processor():
    """Siglip2Processor; its CLASS attributes text_kwargs/images_kwargs (max_length 64,
    patch_size 16, max_num_patches 256) override the sub-processors at call time, so they are
    overridden on the instance here."""
    ip = _img_proc("Siglip2ImageProcessor")(patch_size=SIGLIP2_PATCH,
                                           max_num_patches=SIGLIP2_NUM_PATCHES)
    proc = Siglip2Processor(image_processor=ip, tokenizer=tiny_tokenizer("eos"))
    proc.text_kwargs = {"padding": "max_length", "truncation": True, "max_length": TEXT_LEN}
    proc.images_kwargs = {"max_num_patches": SIGLIP2_NUM_PATCHES, "patch_size": SIGLIP2_PATCH}
    return proc


# --------------------------------------------------------------------------------------- DINOv2
DINO_IMAGE, DINO_PATCH = 16, 4


def tiny_dinov2(dtype=torch.float32, attn="sdpa", seed=0, cls=None, **kw):
    """Dinov2Model by default, or cls=Dinov2ForImageClassification (3 labels)."""
    torch.manual_seed(seed)
    cls = cls or Dinov2Model
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                       image_size=DINO_IMAGE, patch_size=DINO_PATCH, num_channels=3,
                       initializer_range=0.1, layerscale_value=0.5, num_labels=3,
                       attn_implementation=attn, **kw)
    return _finish(cls(cfg), dtype, attn)


def tiny_dinov2_processor():
    """Image processor only (stock DINOv2 uses BitImageProcessor, ImageNet mean/std)."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return _img_proc("BitImageProcessor")(size={"shortest_edge": DINO_IMAGE + 4},
                                         crop_size={"height": DINO_IMAGE, "width": DINO_IMAGE},
                                         image_mean=IMAGENET_DEFAULT_MEAN,
                                         image_std=IMAGENET_DEFAULT_STD)


def randomize_affine(model, std=0.1, seed=0):
    """Optional: stock init leaves every bias 0 and every LayerNorm at (1, 0); this draws
    biases ~ N(0, std) and LayerNorm weights ~ 1 + N(0, std) (in place, returns model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                m.weight.add_(torch.randn(m.weight.shape, generator=g).to(m.weight) * std)
            for pname in ("bias", "in_proj_bias"):
                b = getattr(m, pname, None)
                if isinstance(b, torch.nn.Parameter):
                    b.copy_(torch.randn(b.shape, generator=g).to(b) * std)
    return model


BUILDERS = {"clip": (tiny_clip, tiny_clip_processor), "siglip": (tiny_siglip, tiny_siglip_processor),
            "siglip2": (tiny_siglip2, tiny_siglip2_processor),
            "dinov2": (tiny_dinov2, tiny_dinov2_processor)}


# ----------------------------------------------------------------------------------------- check
def _text_embedding_module(model):
    for path in ("text_model.embeddings.token_embedding", "embeddings.token_embedding"):
        mod = model
        try:
            for p in path.split("."):
                mod = getattr(mod, p)
            return mod
        except AttributeError:
            continue
    return None


def _run(model, inputs, target_fn):
    """Forward with a detach/requires_grad hook on the token embedding; backprop target_fn(out)."""
    store = {}
    emb = _text_embedding_module(model)
    handle = None
    if emb is not None and "input_ids" in inputs:
        def hook(_m, _i, out):
            out = out.detach().requires_grad_()
            store["emb"] = out
            return out
        handle = emb.register_forward_hook(hook)
    inputs = dict(inputs)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype).detach().requires_grad_()
    try:
        out = model(**inputs)
        target = target_fn(out)
        target.backward()
    finally:
        if handle is not None:
            handle.remove()
    grads = {}
    if "pixel_values" in inputs:
        grads["pixels"] = inputs["pixel_values"].grad
    if "emb" in store:
        grads["text_emb"] = store["emb"].grad
    return out, target, grads


def _assert_grads(tag, grads, want):
    for k in want:
        g = grads.get(k)
        assert g is not None, f"{tag}: no grad for {k}"
        assert torch.isfinite(g).all(), f"{tag}: non-finite grad for {k}"
        assert g.abs().sum() > 0, f"{tag}: zero grad for {k}"


def _proj_target(out):
    """sum(pooler_output * w) with a fixed random w (pooler_output.sum() of a LayerNorm output
    with zero bias is constant, so its gradient vanishes)."""
    pooled = out.pooler_output
    w = torch.randn(pooled.shape[-1], generator=torch.Generator().manual_seed(123)).to(pooled.dtype)
    return (pooled * w).sum()


def check():
    from PIL import Image
    from transformers import CLIPTextModel, CLIPVisionModel
    image = Image.new("RGB", (40, 30), (200, 30, 90))
    # a non-constant image so the pixel grads are not trivially uniform
    image.paste((10, 220, 40), (0, 0, 20, 15))
    texts = ["a photo of a cat", "a big red car on the road"]
    tstart = time.perf_counter()

    for dtype in (torch.float32, torch.float64):
        for attn in ("sdpa", "eager"):
            for name, (build, build_proc) in BUILDERS.items():
                proc = build_proc()
                variants = {"clip": [None, CLIPVisionModel, CLIPTextModel],
                            "dinov2": [None, Dinov2ForImageClassification]}.get(name, [None])
                for cls in variants:
                    t0 = time.perf_counter()
                    model = build(dtype=dtype, attn=attn, cls=cls)
                    for m in model.modules():
                        cfg = getattr(m, "config", None)
                        if isinstance(cfg, transformers.PreTrainedConfig):
                            assert cfg._attn_implementation == attn, (name, type(m), cfg._attn_implementation)
                    t1 = time.perf_counter()
                    if name == "dinov2":
                        inputs = proc(images=image, return_tensors="pt")
                    else:
                        kw = {"padding": "max_length"} if name in ("siglip", "siglip2") else {"padding": True}
                        inputs = proc(text=texts, images=image, return_tensors="pt", **kw)
                    inputs = dict(inputs)
                    cname = type(model).__name__
                    # NB: pooler_output.sum() is degenerate for these three: their pooler is a
                    # LayerNorm output (bias 0 at init) whose feature-sum is constant -> grad ~0.
                    # Use a fixed random projection of the pooled vector instead.
                    if cname == "CLIPVisionModel":
                        inputs = {"pixel_values": inputs["pixel_values"]}
                        target_fn, want = _proj_target, ["pixels"]
                    elif cname == "CLIPTextModel":
                        inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
                        target_fn, want = _proj_target, ["text_emb"]
                    elif cname == "Dinov2Model":
                        target_fn, want = _proj_target, ["pixels"]
                    elif cname == "Dinov2ForImageClassification":
                        target_fn, want = (lambda o: o.logits[0].max()), ["pixels"]
                    else:
                        target_fn, want = (lambda o: o.logits_per_image[0, 0]), ["pixels", "text_emb"]
                    t2 = time.perf_counter()
                    out, target, grads = _run(model, inputs, target_fn)
                    t3 = time.perf_counter()
                    tag = f"{cname}/{str(dtype)[6:]}/{attn}"
                    assert torch.isfinite(target), tag
                    _assert_grads(tag, grads, want)
                    shapes = {k: tuple(v.shape) for k, v in inputs.items()}
                    print(f"{tag:45s} target={target.item():+.4f} build={1e3*(t1-t0):6.1f}ms "
                          f"proc={1e3*(t2-t1):5.1f}ms fwd+bwd={1e3*(t3-t2):6.1f}ms "
                          f"|g|={ {k: f'{v.abs().sum().item():.3g}' for k, v in grads.items()} } {shapes}")
    print(f"all checks passed in {time.perf_counter() - tstart:.2f}s")


if __name__ == "__main__":
    check()
