"""Vision-language models and image encoders (issue 21, first part): LLaVA on tiny random
configs of the stock class, its image features written into the text stream by masked_scatter.

Checked: the forward is unchanged and the model restored exactly; the relevance of every text
token and every pixel equals the independent gradient-modification reference
(tests/reference.py) in float64; with biases zeroed, CP-LRP conserves over text tokens and
pixels together; pixel relevance is finite and non-zero (the projector's init is not zero)."""
import pytest
import torch
import transformers as tr

import lxt
from helpers import assert_restored, snapshot, vlm_relevance
from reference import EPS, assert_relevance_close, reference_model
from models import zero_biases, zero_position_embeddings

D = torch.float64
IMAGE_TOKEN = 100


def tiny_llava(attn="sdpa", seed=0, cls=tr.LlavaForConditionalGeneration):
    torch.manual_seed(seed)
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=128,
                initializer_range=0.2)
    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, image_size=16, patch_size=4, projection_dim=16, initializer_factor=2.0)
    cfg = tr.LlavaConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    return cls(cfg).to(D).eval()


def llava_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    n_image = (16 // 4) ** 2  # patches; the CLS token is dropped ("default" strategy)
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * n_image + [7, 8, 9]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, 16, 16, generator=g, dtype=D)}


def relevance(model, inputs, target, lrp: bool, gradient_engine: bool = False):
    """Per text token and per pixel (pixel_values' relevance summed over colour channels)."""
    text, pixels, out, value = vlm_relevance(model, inputs, target, lrp, gradient_engine)
    return text, pixels.sum(1)[0], out, value


@pytest.mark.parametrize("method,engine,attn", [("attnlrp", "gradient", "sdpa"), ("attnlrp", "explicit", "eager"),
                                                ("cp_lrp", "gradient", "eager"), ("cp_lrp", "explicit", "sdpa")])
def test_llava_matches_the_reference_and_restores(method, engine, attn, reference_attention):
    model = tiny_llava(attn)
    inputs = llava_inputs()
    with torch.no_grad():
        stock = model(**inputs).logits
    target = int(stock[0, -1].argmax())
    snap = snapshot(model)
    comp = getattr(lxt.composites, method)(model, epsilon=EPS, engine=engine)
    assert "llava: llama + clip_vision_model" in comp.name and comp.strict
    with comp.context(model):
        text, pixels, out, _ = relevance(model, inputs, target, True, engine == "gradient")
        assert comp.summary().unsafe == []
    assert_restored(model, snap)
    torch.testing.assert_close(out, stock, rtol=1e-12, atol=1e-12)
    ref = reference_model(model, cp=method == "cp_lrp")
    ref_text, ref_pixels, _, _ = relevance(ref, inputs, target, False)
    assert_relevance_close(text, ref_text, rtol=1e-6, atol_frac=1e-6)
    assert_relevance_close(pixels, ref_pixels, rtol=1e-6, atol_frac=1e-6)
    image = inputs["input_ids"][0] == IMAGE_TOKEN
    assert (text[image] == 0).all()  # overwritten by the image features: their relevance is the pixels'
    assert torch.isfinite(pixels).all() and pixels.abs().max() > 1e-3 * text.abs().max()


def test_llava_cp_lrp_conserves_over_text_and_pixels():
    model = zero_position_embeddings(zero_biases(tiny_llava("sdpa")))
    with torch.no_grad():  # CLIP's class token: a constant that absorbs relevance like a bias
        next(m for m in model.modules() if hasattr(m, "class_embedding")).class_embedding.zero_()
    inputs = llava_inputs()
    with lxt.composites.cp_lrp(model, epsilon=EPS).context(model):
        text, pixels, _, value = relevance(model, inputs, 7, True, True)
    total = float(text.sum() + pixels.sum())
    assert abs(total - value) <= 1e-6 * abs(value), (total, value)
    assert abs(float(pixels.sum())) > 1e-3 * abs(value)  # the image carries part of it


_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=16, patch_size=4, num_labels=3)
_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=101)
ENCODERS = {  # model_type -> (config, classifier class)
    "dinov2": (lambda: tr.Dinov2Config(**_ENCODER, initializer_range=0.2, layerscale_value=0.5),
               tr.Dinov2ForImageClassification),
    "clip": (lambda: tr.CLIPConfig(text_config=_TEXT, vision_config=_ENCODER, num_labels=3, initializer_factor=2.0),
             tr.CLIPForImageClassification),
    "siglip": (lambda: tr.SiglipConfig(text_config=_TEXT, vision_config=_ENCODER, num_labels=3),
               tr.SiglipForImageClassification),
}


def tiny_encoder(model_type, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    config, cls = ENCODERS[model_type]
    cfg = config()
    for c in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "vision_config", None)):
        if c is not None:
            c._attn_implementation = attn
    return cls(cfg).to(D).eval()


@pytest.mark.parametrize("model_type,method,engine", [
    ("dinov2", "attnlrp", "gradient"), ("dinov2", "cp_lrp", "explicit"),
    ("clip", "attnlrp", "explicit"), ("clip", "cp_lrp", "gradient"),
    ("siglip", "attnlrp", "gradient"), ("siglip", "cp_lrp", "explicit")])
def test_image_encoder_classifiers_match_the_reference(model_type, method, engine, reference_attention):
    """DINOv2 (layer scale: a product with a parameter, i.e. a scale; the classifier on the
    class token and the mean of the patch tokens: the epsilon rule on the mean), CLIP's and
    SigLIP's vision towers (quick_gelu / gelu_pytorch_tanh: identity; mean pooling)."""
    from reference import check_against_reference

    model = tiny_encoder(model_type)
    assert lxt.composites.family_of(model)[0] == model_type
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=D)
    with torch.no_grad():
        stock = model(pixel_values=x).logits
    snap = snapshot(model)
    factory = lambda m, epsilon: getattr(lxt.composites, method)(m, epsilon=epsilon, engine=engine)
    check_against_reference(model, factory, {"pixel_values": x}, [stock.argmax(-1)], method == "cp_lrp",
                            rtol=1e-6, atol_frac=1e-6)
    assert_restored(model, snap)
    exp = lxt.explain(model, None, x[:1], method=method.replace("_", "-"))
    assert exp.relevance.shape == (16, 16) and torch.isfinite(exp.relevance).all()


def test_real_photograph_through_the_stock_image_processor():
    """A bundled photograph (scikit-image's Chelsea, no download) through the stock CLIP image
    processor into the tiny LLaVA: finite, non-zero pixel relevance; unknown names refused."""
    from lxt_data import IMAGES, load_image

    image = load_image("chelsea", size=48)
    assert image.mode == "RGB" and max(image.size) == 48 and set(IMAGES) >= {"chelsea", "astronaut"}
    with pytest.raises(ValueError, match="no image 'dog'"):
        load_image("dog")
    processor = tr.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    pixels = processor(images=image, return_tensors="pt")["pixel_values"].to(D)
    assert pixels.shape == (1, 3, 16, 16)
    model = tiny_llava()
    inputs = {**llava_inputs(), "pixel_values": pixels}
    with lxt.composites.attnlrp(model).context(model):
        text, px, _, value = relevance(model, inputs, 7, True, True)
    assert torch.isfinite(px).all() and px.abs().sum() > 0


def tiny_llava_processor():
    """The stock LlavaProcessor, offline: a word-level tokenizer with ``<image>`` at the
    config's image token id, the stock CLIP image processor at 16 x 16."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from models import WORDS

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), IMAGE_TOKEN):
        vocab[f"w{i}"] = i
    vocab["<image>"] = IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tr.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                           eos_token="[EOS]", additional_special_tokens=["<image>"])
    image_processor = tr.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return tr.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=4,
                             vision_feature_select_strategy="default", num_additional_image_tokens=1)


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp", "input_x_gradient"])
def test_explain_with_an_image(method, tmp_path):
    """``lxt.explain(vlm, processor, prompt, image=)`` on a bundled photograph: the image
    placeholder put in front, 16 image tokens shown as one ``<image>`` entry carrying the pixel
    total, per-pixel relevance equal to the one computed by hand, the model left as it was,
    HTML with the heatmap and a PNG."""
    from lxt_data import load_image

    model, processor = tiny_llava(), tiny_llava_processor()
    image = load_image("chelsea", size=48)
    with torch.no_grad():  # transformers marks the vision tower on its first call (output capturing)
        model(**llava_inputs())
    snap = snapshot(model)
    exp = lxt.explain(model, processor, "the cat sat on", image=image, method=method)
    assert_restored(model, snap)
    assert exp.tokens[0] == "<image>" and exp.tokens[1:] == ["the", "cat", "sat", "on"]
    assert exp.image_relevance.shape == (16, 16) and exp.image.shape == (3, 16, 16)
    assert abs(float(exp.relevance[0]) - float(exp.image_relevance.sum())) < 1e-6
    # the same numbers by hand
    batch = processor(text=["<image>the cat sat on"], images=[image], return_tensors="pt")
    inputs = {k: (v.to(D) if v.is_floating_point() else v) for k, v in batch.items()}
    if method == "input_x_gradient":
        text, px, _, _ = relevance(model, inputs, exp.target_id, False)
    else:
        with getattr(lxt.composites, method.replace("-", "_"))(model).context(model):
            text, px, _, _ = relevance(model, inputs, exp.target_id, True, True)
    torch.testing.assert_close(exp.image_relevance, px.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(exp.relevance[1:], text[-4:].float(), rtol=1e-5, atol=1e-7)
    page = exp.to_html(str(tmp_path / "e.html"))
    assert "data:image/png;base64," in page and page.count('class="tok"') == 5
    assert (tmp_path / "e.png").stat().st_size if exp.to_png(str(tmp_path / "e.png")) else False
    with pytest.raises(TypeError, match="needs the model's processor"):
        lxt.explain(model, processor.tokenizer, "the cat", image=image)
    for bad, error, message in [(123, TypeError, "image must be a PIL image"),
                                (str(tmp_path / "none.png"), ValueError, "image file not found"),
                                (torch.zeros(5, 4, 4), ValueError, r"\(C, H, W\) float")]:
        with pytest.raises(error, match=message):
            lxt.explain(model, processor, "the cat", image=bad)
    with pytest.raises(TypeError, match="non-empty str"):
        lxt.explain(model, processor, "", image=image)
    with torch.no_grad():  # explain turns gradients on for itself
        assert lxt.explain(model, processor, "the cat", image=image).tokens == ["<image>", "the", "cat"]
    assert_restored(model, snap)


@pytest.mark.parametrize("engine", ["explicit", "gradient"])
def test_weights_loaded_from_safetensors(engine, tmp_path):
    """``from_pretrained`` memory-maps safetensors weights, whose storage torch's lazy clone
    cannot share ("Expected storage != nullptr"): the explicit engine, whose rules snapshot
    their inputs (here DINOv2's position embeddings, an operand of the embedding sum), copies
    them instead; relevance equals the model's in memory."""
    model = tiny_encoder("dinov2")
    model.save_pretrained(tmp_path)
    loaded = tr.Dinov2ForImageClassification.from_pretrained(tmp_path, dtype=D).eval()
    loaded.config._attn_implementation = "sdpa"
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=D)
    comp = lambda m: lxt.composites.attnlrp(m, engine=engine)
    a = lxt.explain(model, None, x, composite=comp(model))
    b = lxt.explain(loaded, None, x, composite=comp(loaded))
    torch.testing.assert_close(b.relevance, a.relevance, rtol=1e-10, atol=1e-12)


def test_command_line_with_an_image(tmp_path, capsys):
    """``lxt explain PROMPT --model VLM_FOLDER --image FILE``: a saved tiny LLaVA and its
    processor, a bundled photograph written to disk; HTML with the heatmap, PNG, JSON."""
    import json

    from lxt.cli import main
    from lxt_data import load_image

    folder = tmp_path / "llava"
    tiny_llava().save_pretrained(folder)
    tiny_llava_processor().save_pretrained(folder)
    image = tmp_path / "cat.png"
    load_image("chelsea", size=48).save(image)
    out = tmp_path / "out"
    rc = main(["explain", "the cat sat on", "--model", str(folder), "--image", str(image), "--quiet",
               "--html", str(out / "e.html"), "--png", str(out / "e.png"), "--jsonl", str(out / "e.jsonl")])
    assert rc == 0
    assert "data:image/png;base64," in (out / "e.html").read_text()
    assert (out / "e.png").stat().st_size > 0
    row = json.loads((out / "e.jsonl").read_text())
    assert row["tokens"][0] == "<image>" and len(row["image_relevance"]) == 16
    assert main(["explain", "the cat", "--image", str(image)]) != 0
    assert "--image needs --model" in capsys.readouterr().err
    # --generate N: one JSON line per generated token
    rc = main(["explain", "the cat sat on", "--model", str(folder), "--image", str(image), "--quiet",
               "--generate", "2", "--jsonl", str(out / "g.jsonl")])
    rows = [json.loads(line) for line in (out / "g.jsonl").read_text().splitlines()]
    assert rc == 0 and len(rows) == 2 and len(rows[1]["tokens"]) == len(rows[0]["tokens"]) + 1
