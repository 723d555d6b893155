"""Vision-language families beyond LLaVA (issue 21): LLaVA-NeXT, PaliGemma, Gemma 3 with images,
Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, on tiny random configs of the stock classes with their
stock processors (tests/vlm_builders/: offline tokenizers, non-zero projector init).

Checked per family: the forward is unchanged and the model restored exactly; the table joins the
rows of the language model and the vision tower, strict, nothing unsafe; the relevance of every
text token and every element of ``pixel_values`` equals the independent gradient-modification
reference (tests/reference.py) in float64; the image tokens' embeddings get exactly 0 (the image
features overwrite them); with biases and additive constants zeroed, CP-LRP conserves over text
tokens + pixels.  Then the layouts that map each family's ``pixel_values`` back to one frame
(lxt.multimodal.image_layout): totals kept, the frame shows the photograph (correlation with the
photograph resized independently with PIL), and ``lxt.explain(vlm, processor, prompt,
image=...)`` gives the reference's image total on that frame."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lxt
import lxt_data
import lxt.multimodal
from helpers import assert_restored, snapshot, vlm_relevance as relevance
from models import zero_biases, zero_position_embeddings
from reference import EPS, assert_relevance_close, reference_model

sys.path.insert(0, str(Path(__file__).parent / "vlm_builders"))
import llava_paligemma_gemma3 as _A  # noqa: E402
import qwen_idefics_smolvlm as _B  # noqa: E402

D = torch.float64
#: kind -> (model builder, processor builder, the rows its table joins)
FAMILIES = {
    "llava_next": (*_A.BUILDERS["llava_next"], "llava_next: llama + clip_vision_model"),
    "paligemma": (*_A.BUILDERS["paligemma"], "paligemma: gemma + siglip_vision_model"),
    "gemma3": (*_A.BUILDERS["gemma3"], "gemma3: gemma3_text + siglip_vision_model"),
    "qwen2_vl": (*_B.BUILDERS["qwen2_vl"], "qwen2_vl: qwen2_vl_text + qwen2_vl_vision"),
    "qwen2_5_vl": (*_B.BUILDERS["qwen2_5_vl"], "qwen2_5_vl: qwen2_5_vl_text + qwen2_5_vl_vision"),
    "idefics3": (*_B.BUILDERS["idefics3"], "idefics3: llama + idefics3_vision"),
    "smolvlm": (*_B.BUILDERS["smolvlm"], "smolvlm: llama + smolvlm_vision"),
}
IMAGE_TOKEN = {**_A.IMAGE_TOKEN_ID, **_B.IMAGE_TOKEN_IDS}
_PROCESSORS = {}


def processor(kind):
    if kind not in _PROCESSORS:
        _PROCESSORS[kind] = FAMILIES[kind][1]()
    return _PROCESSORS[kind]


def photo():
    """A non-square photograph (scikit-image's astronaut, 96 x 60), so tiles and padding show."""
    return lxt_data.load_image("astronaut", size=96).crop((0, 10, 96, 70))


def inputs(kind):
    proc = processor(kind)
    text = lxt.multimodal._render(proc, "what is the capital of france")
    batch = dict(proc(text=[text], images=[photo()], return_tensors="pt"))
    batch.pop("labels", None)
    return {k: (v.to(D) if v.is_floating_point() else v) for k, v in batch.items()}


CASES = [(kind, *combo) for kind in FAMILIES
         for combo in (("attnlrp", "gradient", "sdpa"), ("cp_lrp", "explicit", "eager"))]


@pytest.mark.parametrize("kind,method,engine,attn", CASES)
def test_family_matches_the_reference_and_restores(kind, method, engine, attn, reference_attention):
    model = FAMILIES[kind][0](dtype=D, attn=attn)
    batch = inputs(kind)
    with torch.no_grad():
        stock = model(**batch, use_cache=False).logits
    target = int(stock[0, -1].argmax())
    snap = snapshot(model)
    comp = getattr(lxt.composites, method)(model, epsilon=EPS, engine=engine)
    assert FAMILIES[kind][2] in comp.name and comp.strict, comp.name
    with comp.context(model):
        text, pixels, out, _ = relevance(model, batch, target, True, engine == "gradient")
        assert comp.summary().unsafe == []
    assert_restored(model, snap)
    torch.testing.assert_close(out, stock, rtol=1e-12, atol=1e-12)
    ref_text, ref_pixels, _, _ = relevance(reference_model(model, cp=method == "cp_lrp"), batch, target, False)
    assert_relevance_close(text, ref_text, rtol=1e-6, atol_frac=1e-6)
    assert_relevance_close(pixels.flatten(), ref_pixels.flatten(), rtol=1e-6, atol_frac=1e-6)
    image = batch["input_ids"][0] == IMAGE_TOKEN[kind]
    assert image.any() and (text[image] == 0).all()
    assert torch.isfinite(pixels).all() and pixels.abs().max() > 1e-3 * text.abs().max()


def _zero_constants(model):
    """Biases, learned position embeddings, and the parameters added as constants (LLaVA-NeXT's
    image_newline, CLIP's class embedding): what absorbs relevance without being an input."""
    zero_position_embeddings(zero_biases(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("image_newline", "class_embedding")):
                p.zero_()
    return model


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_cp_lrp_conserves_over_text_and_pixels(kind):
    model = _zero_constants(FAMILIES[kind][0](dtype=D, attn="sdpa"))
    batch = inputs(kind)
    with lxt.composites.cp_lrp(model, epsilon=EPS).context(model):
        text, pixels, _, value = relevance(model, batch, 7, True, True)
    total = float(text.sum() + pixels.sum())
    assert abs(total - value) <= 1e-6 * abs(value), (total, value)
    assert abs(float(pixels.sum())) > 1e-3 * abs(value)  # the image carries part of it


# ----------------------------------------------------------------------------------------
# Layouts: pixel_values back to one frame
# ----------------------------------------------------------------------------------------


def test_area_matrix_against_overlaps():
    from lxt.multimodal import _area_matrix

    # 2 -> 4: each input pixel covers two output pixels fully; 4 -> 2: pairs; 3 -> 2: thirds
    torch.testing.assert_close(_area_matrix(4, 2), torch.tensor([[.5, 0], [.5, 0], [0, .5], [0, .5]], dtype=D))
    torch.testing.assert_close(_area_matrix(2, 4), torch.tensor([[1., 1, 0, 0], [0, 0, 1, 1]], dtype=D))
    # input pixel j covers [j, j+1) * 2/3 of the output: pixel 1 is [2/3, 4/3): half in each
    torch.testing.assert_close(_area_matrix(2, 3), torch.tensor([[1., .5, 0], [0, .5, 1]], dtype=D))
    for n_out, n_in in ((7, 3), (3, 7), (16, 16), (5, 32)):
        torch.testing.assert_close(_area_matrix(n_out, n_in).sum(0), torch.ones(n_in, dtype=D))


def _resized(pil, size):
    """The photograph resized with PIL to (H, W) = size, (C, H, W) in [0, 1]."""
    arr = np.asarray(pil.resize((size[1], size[0]), resample=3))
    return torch.tensor(arr, dtype=D).permute(2, 0, 1) / 255


def _r(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten().to(D), b.flatten().to(D)]))[0, 1])


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_layout_frame_shows_the_photo_and_keeps_totals(kind):
    from lxt.multimodal import _display, image_layout

    model, proc, batch = FAMILIES[kind][0](), processor(kind), inputs(kind)
    layout = image_layout(model, proc, batch, photo())
    x = torch.randn_like(batch["pixel_values"])
    frame = layout.to_frame(x)
    assert frame.dim() == 3 and frame.shape[0] == 3
    assert abs(float(frame.sum() - x.sum())) < 1e-9 * float(x.abs().sum())
    shown = _display(proc, layout.display).to(D)
    assert shown.shape == frame.shape
    if kind == "llava_next":  # the image resized keeping its aspect, centred in the padded canvas
        h = round(60 * shown.shape[-1] / 96)
        top = (shown.shape[-2] - h) // 2
        region = shown[:, top:top + h]
        assert shown[:, :top].flatten(1).std(-1).max() < 1e-6  # padding rows
        assert _r(region, _resized(photo(), region.shape[-2:])) > 0.99
        base = _display(proc, batch["pixel_values"][0, 0])  # the base view: the whole image
        assert _r(base, _resized(photo(), base.shape[-2:])) > 0.95
    else:
        assert _r(shown, _resized(photo(), shown.shape[-2:])) > (0.95 if kind in ("paligemma", "gemma3") else 0.99), kind


def test_layout_refuses_an_unknown_shape():
    from lxt.multimodal import image_layout

    model, proc = FAMILIES["paligemma"][0](), processor("paligemma")
    with pytest.raises(ValueError, match="a layout explain.image=. does not know"):
        image_layout(model, proc, {"pixel_values": torch.zeros(2, 3, 8, 8)}, photo())


@pytest.mark.parametrize("kind,method", [("llava_next", "attnlrp"), ("qwen2_vl", "cp-lrp"),
                                         ("idefics3", "attnlrp"), ("paligemma", "input_x_gradient"),
                                         ("gemma3", "attnlrp"), ("smolvlm", "gradient")])
def test_explain_with_image_on_every_layout(kind, method, reference_attention):
    model = FAMILIES[kind][0](dtype=D)
    proc = processor(kind)
    with torch.no_grad():  # transformers marks its towers at the first call: before the snapshot
        model(**inputs(kind), use_cache=False)
    snap = snapshot(model)
    ex = lxt.explain(model, proc, "what is the capital of france", image=photo(), method=method)
    assert_restored(model, snap)
    assert lxt.multimodal.IMAGE_ENTRY in ex.tokens
    assert ex.image.shape[-2:] == ex.image_relevance.shape and ex.image.min() >= 0 and ex.image.max() <= 1
    assert torch.isfinite(ex.image_relevance).all() and ex.image_relevance.abs().max() > 0
    if method == "gradient":
        return  # a norm per pixel: no total to compare
    # the image's total equals the reference's (or the plain input x gradient) on the raw pixel_values
    batch = inputs(kind)
    ref = model if method == "input_x_gradient" else reference_model(model, cp=method == "cp-lrp")
    _, ref_pixels, _, _ = relevance(ref, batch, ex.target_id, False)
    total = float(ref_pixels.sum())
    assert abs(float(ex.image_relevance.sum()) - total) <= 1e-4 * float(ref_pixels.abs().sum())
    runs = torch.tensor([t == lxt.multimodal.IMAGE_ENTRY for t in ex.tokens])
    assert abs(ex.relevance[runs].sum() - ex.image_relevance.sum()) < 1e-4
    if kind == "idefics3":  # one run per tile and the global image, each with its view's total
        per_view = ref_pixels[0].sum((1, 2, 3))
        torch.testing.assert_close(ex.relevance[runs].double(), per_view, rtol=1e-4, atol=1e-4 * float(per_view.abs().max()))
    assert "data:image/png;base64" in ex.to_html()


@pytest.mark.parametrize("kind", ["paligemma", "gemma3", "qwen2_vl", "idefics3"])
def test_generate_with_an_image_follows_model_generate(kind):
    """generate=N explains the tokens greedy decoding gives (model.generate, with its cache and
    its own token types: PaliGemma's generated tokens are its causal suffix), each over the
    prompt, the image and the tokens before it."""
    model, proc = FAMILIES[kind][0](), processor(kind)
    exs = lxt.explain(model, proc, "what is the capital", image=photo(), generate=3)
    batch = dict(proc(text=[lxt.multimodal._render(proc, "what is the capital")], images=[photo()],
                      return_tensors="pt"))
    batch.pop("labels", None)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)[0, batch["input_ids"].shape[1]:]
    assert [e.target_id for e in exs] == generated.tolist()[:len(exs)] and len(exs) == 3
    for k, e in enumerate(exs):  # each next one sees the tokens generated before it
        assert len(e.tokens) == len(exs[0].tokens) + k and e.image_relevance.abs().sum() > 0
    with pytest.raises(ValueError, match="no target= or contrast="):
        lxt.explain(model, proc, "what is", image=photo(), generate=2, target=5)


def test_a_conversation_with_an_image():
    """Messages go through the processor's chat template; the image entry is placed in the
    first user message when the conversation has none (the image is image=)."""
    model, proc = FAMILIES["qwen2_vl"][0](), processor("qwen2_vl")
    ex = lxt.explain(model, proc, [{"role": "user", "content": "what is the capital"}], image=photo())
    rendered = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the capital"}]}],
        add_generation_prompt=True, tokenize=False)
    batch = proc(text=[rendered], images=[photo()], return_tensors="pt")
    assert ex.prompt == proc.tokenizer.decode(batch["input_ids"][0])
    assert ex.tokens.count(lxt.multimodal.IMAGE_ENTRY) == 1 and ex.image_relevance.abs().sum() > 0
    same = lxt.explain(model, proc, [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                      "text": "what is the capital"}]}], image=photo())
    torch.testing.assert_close(same.relevance, ex.relevance)
    with pytest.raises(TypeError, match="a conversation"):
        lxt.explain(model, proc, [{"content": "no role"}], image=photo())
    with pytest.raises(ValueError, match="no user message"):
        lxt.explain(model, proc, [{"role": "system", "content": "hi"}], image=photo())
