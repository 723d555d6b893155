"""Dual encoders (issue 21): the similarity logit of a text and an image, explained over both,
for stock ``CLIPModel``, ``SiglipModel`` and ``Siglip2Model`` (NaFlex) on tiny random configs
(tests/vlm_builders/) and their offline processors, with a bundled photograph.

Checked: the forward is unchanged and the model restored exactly; the relevance of every text
token and every pixel equals the independent gradient-modification reference
(tests/reference.py, the similarity head and SigLIP's attention-pooling head written out) in
float64, AttnLRP and CP-LRP, both engines, sdpa and eager; with biases, position embeddings,
CLIP's class embedding and ``logit_bias`` zeroed, CP-LRP conserves over text tokens + pixels;
SigLIP2's patches map back onto the processor's image; ``lxt.explain(model, processor, text,
image=)`` with its picture, ``contrast=`` and bad inputs."""
import sys
from pathlib import Path

import pytest
import torch

import lxt
from lxt.similarity import naflex_to_image
from helpers import assert_restored, snapshot
from models import zero_biases, zero_position_embeddings
from reference import EPS, assert_relevance_close, reference_model

sys.path.insert(0, str(Path(__file__).parent / "vlm_builders"))
import clip_siglip_dinov2 as builders  # noqa: E402

D = torch.float64
TEXT = "a photo of the cat"


@pytest.fixture(scope="module")
def image():
    from lxt_data import load_image

    return load_image("chelsea", size=48)  # 48 x 32: SigLIP2 gets 3 x 5 patches, one padding patch


def build(model_type, attn="sdpa"):
    make, make_processor = builders.BUILDERS[model_type]
    return make(dtype=D, attn=attn), make_processor()


def pair_inputs(model_type, processor, image, texts=(TEXT,)):
    padding = "max_length" if model_type.startswith("siglip") else "longest"
    batch = processor(text=list(texts), images=[image], return_tensors="pt", padding=padding)
    return {k: (v.to(D) if v.is_floating_point() else v) for k, v in batch.items()}


def relevance(model, inputs, lrp: bool, gradient_engine: bool = False):
    """``(text (T,), pixel_values relevance, logits_per_image, value)`` for ``logits_per_image[0, 0]``:
    the text tower's token embedding output made a leaf by a forward hook, pixel_values a leaf."""
    leaves = []

    def hook(module, args, out):
        leaves.append(out.detach().requires_grad_())
        return leaves[-1]

    handle = model.text_model.embeddings.token_embedding.register_forward_hook(hook)
    try:
        px = inputs["pixel_values"].detach().clone().requires_grad_()
        out = model(**{**inputs, "pixel_values": px}).logits_per_image
        value = out[0, 0]
        value.backward(value.detach() if lrp else torch.ones_like(value))
    finally:
        handle.remove()
    emb = leaves[0]
    if lrp:
        text, pixels = (emb.grad * emb.detach() if gradient_engine else emb.grad), px.grad
    else:
        text, pixels = emb.grad * emb.detach(), px.grad * px.detach()
    return text.detach().sum(-1)[0], pixels.detach()[0], out.detach(), float(value.detach())


CASES = [("clip", "attnlrp", "gradient", "sdpa"), ("clip", "cp_lrp", "explicit", "eager"),
         ("siglip", "attnlrp", "explicit", "eager"), ("siglip", "cp_lrp", "gradient", "sdpa"),
         ("siglip2", "attnlrp", "gradient", "eager"), ("siglip2", "cp_lrp", "explicit", "sdpa")]


@pytest.mark.parametrize("model_type,method,engine,attn", CASES)
def test_similarity_matches_the_reference_and_restores(model_type, method, engine, attn, image,
                                                       reference_attention):
    model, processor = build(model_type, attn)
    inputs = pair_inputs(model_type, processor, image)
    with torch.no_grad():
        stock = model(**inputs).logits_per_image
    snap = snapshot(model)
    comp = getattr(lxt.composites, method)(model, epsilon=EPS, engine=engine)
    assert comp.name.endswith(f"[{model_type}]")  # its own row, not the structural table
    with comp.context(model):
        text, pixels, out, _ = relevance(model, inputs, True, engine == "gradient")
        assert comp.summary().unsafe == []
    assert_restored(model, snap)
    torch.testing.assert_close(out, stock, rtol=1e-12, atol=1e-12)
    ref = reference_model(model, cp=method == "cp_lrp")
    ref_text, ref_pixels, ref_out, _ = relevance(ref, inputs, False)
    torch.testing.assert_close(ref_out, stock, rtol=1e-12, atol=1e-12)  # it changes gradients only
    assert_relevance_close(text, ref_text, rtol=1e-6, atol_frac=1e-6)
    assert_relevance_close(pixels.sum(-1 if model_type == "siglip2" else 0),
                           ref_pixels.sum(-1 if model_type == "siglip2" else 0), rtol=1e-6, atol_frac=1e-6)
    assert pixels.abs().max() > 1e-3 * text.abs().max()  # the image carries relevance


@pytest.mark.parametrize("model_type", ["clip", "siglip", "siglip2"])
def test_cp_lrp_conserves_over_text_and_pixels(model_type, image):
    """Biases (``logit_bias`` too), position embeddings and CLIP's class embedding zeroed:
    every other constant of the head (the norms, ``exp(logit_scale)``) is a scale, so text
    tokens and pixels together carry the whole logit, half each."""
    model, processor = build(model_type)
    model = zero_position_embeddings(zero_biases(model))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "class_embedding"):
                m.class_embedding.zero_()
    inputs = pair_inputs(model_type, processor, image)
    with lxt.composites.cp_lrp(model, epsilon=EPS).context(model):
        text, pixels, _, value = relevance(model, inputs, True, True)
    total = float(text.sum() + pixels.sum())
    assert abs(total - value) <= 1e-6 * abs(value), (total, value)
    for tower in (text, pixels):  # the uniform rule on t @ i^T: half of the logit to each tower
        assert abs(float(tower.sum()) - value / 2) <= 1e-6 * abs(value), (float(tower.sum()), value)


def test_naflex_patches_map_back_onto_the_processors_image(image):
    """SigLIP2's processor resizes the photograph to a whole number of patches, cuts it into
    patches (channel-last inside a patch) and pads them: the inverse gives back the image
    (PIL's resize of the photograph to that size, normalised as the processor does), and
    patching it again with transformers' own function gives the processor's patches."""
    import numpy as np
    from PIL import Image
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    processor = builders.tiny_siglip2_processor()
    for photo in (image, image.transpose(Image.Transpose.ROTATE_90)):
        batch = processor(text=[TEXT], images=[photo], return_tensors="pt")
        patches, (h, w) = batch["pixel_values"][0].double(), batch["spatial_shapes"][0].tolist()
        p = builders.SIGLIP2_PATCH
        assert h * w < patches.shape[0] and int(batch["pixel_attention_mask"][0].sum()) == h * w  # padded
        back = naflex_to_image(patches, (h, w), p, 3)
        assert back.shape == (3, h * p, w * p)
        again = torch.from_numpy(convert_image_to_patches(back.numpy(), p))
        torch.testing.assert_close(again, patches[:h * w], rtol=0, atol=0)
        resized = photo.resize((w * p, h * p), Image.Resampling.BILINEAR)
        expected = (torch.from_numpy(np.array(resized)).to(D).permute(2, 0, 1)
                    / 255 - 0.5) / 0.5
        assert (back - expected).abs().max() < 1e-6  # float32 round-off (a patch transposed: 0.85)
    with pytest.raises(ValueError, match="do not hold a 4 x 4 grid"):
        naflex_to_image(patches[:3], (4, 4), p, 3)


@pytest.mark.parametrize("model_type,method", [("clip", "attnlrp"), ("siglip", "input_x_gradient"),
                                               ("siglip2", "cp-lrp")])
def test_explain_a_text_image_pair(model_type, method, image, tmp_path):
    """``lxt.explain(model, processor, text, image=)``: ``<image>`` first, carrying the pixel
    total, then the text's tokens (SigLIP's padding as one entry); the numbers equal those
    computed by hand; the model left as it was; HTML with the heatmap, PNG."""
    model, processor = build(model_type)
    inputs = pair_inputs(model_type, processor, image)
    with torch.no_grad():  # transformers marks the towers on their first call (output capturing)
        model(**inputs)
    snap = snapshot(model)
    exp = lxt.explain(model, processor, TEXT, image=image, method=method)
    assert_restored(model, snap)
    words = TEXT.split()
    assert exp.tokens[0] == "<image>" and exp.target == TEXT and exp.prompt == TEXT
    assert exp.tokens[1:] == (["[BOS]"] + words + ["[EOS]"] if model_type == "clip" else
                              words + ["[EOS]", f"[PAD] x{builders.TEXT_LEN - len(words) - 1}"])
    if method == "input_x_gradient":
        text, px, out, value = relevance(model, inputs, False)
    else:
        with getattr(lxt.composites, method.replace("-", "_"))(model).context(model):
            text, px, out, value = relevance(model, inputs, True, True)
    assert abs(exp.logit - value) < 1e-6
    if model_type == "siglip2":
        h, w = inputs["spatial_shapes"][0].tolist()
        px = naflex_to_image(px, (h, w), builders.SIGLIP2_PATCH, 3)
        assert exp.image.shape == (3, 4 * h, 4 * w)
    per_pixel = px.sum(0).float()
    torch.testing.assert_close(exp.image_relevance, per_pixel, rtol=1e-5, atol=1e-7)
    assert abs(float(exp.relevance[0]) - float(per_pixel.sum())) < 1e-5
    n = len(words) + (2 if model_type == "clip" else 1)  # with the special tokens; then the padding
    torch.testing.assert_close(exp.relevance[1:n + 1], text[:n].float(), rtol=1e-5, atol=1e-7)
    if model_type != "clip":
        assert abs(float(exp.relevance[-1]) - float(text[n:].sum())) < 1e-6
    if method != "input_x_gradient":  # the two engines give the same explanation (epsilon -> 0)
        make = getattr(lxt.composites, method.replace("-", "_"))
        exp, other = (lxt.explain(model, processor, TEXT, image=image, method=method,
                                  composite=make(model, engine=engine, epsilon=EPS))
                      for engine in ("gradient", "explicit"))
        torch.testing.assert_close(other.relevance, exp.relevance, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(other.image_relevance, exp.image_relevance, rtol=1e-5, atol=1e-7)
        assert_restored(model, snap)
    page = exp.to_html(str(tmp_path / "e.html"))
    assert "data:image/png;base64," in page and page.count('class="tok"') == len(exp.tokens)
    assert exp.to_png(str(tmp_path / "e.png")) and (tmp_path / "e.png").stat().st_size > 0


def test_contrast_explains_the_difference_of_two_similarity_logits(image):
    """``contrast=`` another text: ``logit(text) - logit(contrast)`` with the same image; the
    contrast text is one last entry; with biases zeroed (CP-LRP) the entries add up to it."""
    model, processor = build("siglip2")
    model = zero_position_embeddings(zero_biases(model))
    exp = lxt.explain(model, processor, TEXT, image=image, contrast="a red car", method="cp-lrp")
    with torch.no_grad():
        logits = model(**pair_inputs("siglip2", processor, image, (TEXT, "a red car"))).logits_per_image
    assert exp.contrast == "a red car" and exp.tokens[-1] == "<contrast: a red car>"
    assert abs(exp.logit - float(logits[0, 0] - logits[0, 1])) < 1e-9
    assert abs(float(exp.relevance.double().sum()) - exp.logit) <= 1e-5 * abs(exp.logit)
    assert exp.relevance[-1] != 0


def test_bad_inputs_are_refused_before_the_model_runs(image):
    from helpers import forward_refused

    model, processor = build("clip")
    with forward_refused(model):
        for kwargs, error, message in [
                (dict(inputs=TEXT), TypeError, "scores a text against an image"),
                (dict(inputs="", image=image), TypeError, "non-empty str"),
                (dict(inputs=[TEXT, "a dog"], image=image), ValueError, "one text and one image at a time"),
                (dict(inputs=TEXT, image=image, target=1), ValueError, "similarity logit"),
                (dict(inputs=TEXT, image=image, contrast=""), TypeError, "contrast is a text"),
                (dict(inputs=TEXT, image=image, method="integrated_gradients"), ValueError, "not offered"),
                (dict(inputs=TEXT, image=[image, image]), TypeError, "image must be a PIL image"),
                (dict(inputs=TEXT, image=image, generate=2), ValueError, "generate= is for vision-language")]:
            with pytest.raises(error, match=message):
                lxt.explain(model, processor, **kwargs)
        with pytest.raises(TypeError, match="needs the model's processor"):
            lxt.explain(model, processor.tokenizer, TEXT, image=image)
        with pytest.raises(ValueError, match="longer than the text tower"):
            lxt.explain(model, processor, " ".join(["cat"] * 20), image=image)


def test_siglip2_towers_have_their_rows(image):
    """SigLIP2's towers on their own rows; the NaFlex vision tower (resized position
    embeddings, padding mask, attention-pooling head) runs with every op on the relevance path
    under a rule."""
    from transformers import Siglip2TextModel, Siglip2VisionModel

    for cls, row in ((None, "siglip2"), (Siglip2VisionModel, "siglip2_vision_model"),
                     (Siglip2TextModel, "siglip2_text_model")):
        model = builders.tiny_siglip2(dtype=D, cls=cls)
        assert lxt.composites.family_of(model)[0] == row
    batch = pair_inputs("siglip2", builders.tiny_siglip2_processor(), image)
    px = batch["pixel_values"].requires_grad_()
    model = builders.tiny_siglip2(dtype=D, cls=Siglip2VisionModel)
    comp = lxt.composites.attnlrp(model)
    with comp.context(model):
        pooled = model(pixel_values=px, pixel_attention_mask=batch["pixel_attention_mask"],
                       spatial_shapes=batch["spatial_shapes"]).pooler_output
        pooled[0, 0].backward(pooled[0, 0].detach())
        assert comp.summary().unsafe == [] and comp.name == "AttnLRP[siglip2_vision_model]"
    assert torch.isfinite(px.grad).all() and px.grad.abs().sum() > 0


def test_command_line_with_a_dual_encoder(image, tmp_path):
    """``lxt explain TEXT --model CLIP_FOLDER --image FILE``: the similarity logit (AutoModel for a
    dual encoder's folder), saved tiny CLIP and processor, the JSON record."""
    import json

    from lxt.cli import main

    model, processor = build("clip")
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image.save(tmp_path / "cat.png")
    out = tmp_path / "e.jsonl"
    assert main(["explain", TEXT, "--model", str(folder), "--image", str(tmp_path / "cat.png"), "--quiet",
                 "--jsonl", str(out)]) == 0
    row = json.loads(out.read_text())
    loaded = type(model).from_pretrained(folder, dtype=torch.float32).eval()
    expected = lxt.explain(loaded, processor, TEXT, image=image)
    assert row["tokens"] == expected.tokens and row["target"] == expected.target
    assert abs(row["logit"] - expected.logit) < 1e-6 and row["image_relevance"] is not None
