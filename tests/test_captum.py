"""lxt.captum: captum's interface for AttnLRP / CP-LRP, checked against lxt.explain (the same
relevance), a plain forward (the convergence delta) and a closed form (a linear model); and
what captum's own classes give inside a ``comp.context(model)`` in each engine."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertForMaskedLM

import lxt
import lxt.composites
from lxt.explain import registered_composite
from models import text_batch, tiny_bert, tiny_llama, tiny_tokenizer, tiny_vit
from helpers import assert_restored, snapshot

captum_attr = pytest.importorskip("captum.attr")
from lxt.captum import CPLRP, AttnLRP, LayerAttnLRP, LayerCPLRP  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "the capital of france is"
METHODS = {"attnlrp": (AttnLRP, LayerAttnLRP), "cp-lrp": (CPLRP, LayerCPLRP)}
ENGINES = ("gradient", "explicit")
TOL = dict(rtol=1e-5, atol=1e-6)


def composite(model, method, engine):
    build = lxt.composites.attnlrp if method == "attnlrp" else lxt.composites.cp_lrp
    return build(model, engine=engine)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def ids_of(tok, text=PROMPT):
    return tok(text, return_tensors="pt").input_ids


# ---------------------------------------------------------------------- imports
def test_import_lxt_does_not_import_captum():
    code = "import sys, lxt, lxt.composites; print('captum' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_lxt_captum_without_captum_names_the_extra():
    code = "import sys; sys.modules['captum'] = None; import lxt.captum"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert "ImportError: lxt: lxt.captum needs captum: pip install lxt[captum]" in out.stderr


def test_classes_are_captum_attributions(llama):
    lrp, layer = AttnLRP(llama), LayerCPLRP(llama, llama.model.layers[0])
    assert isinstance(lrp, captum_attr.GradientAttribution)
    assert isinstance(layer, captum_attr.LayerAttribution) and layer.layer is llama.model.layers[0]
    assert lrp.has_convergence_delta() and layer.has_convergence_delta()


# ---------------------------------------------------------------------- = lxt.explain
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_causal_lm_token_ids_equal_explain(llama, tok, method, engine):
    exp = lxt.explain(llama, tok, PROMPT, method=method, composite=composite(llama, method, engine))
    ids = ids_of(tok)
    lrp = METHODS[method][0](llama, engine=engine)
    rel = lrp.attribute(ids, target=exp.target_id)
    assert rel.shape == ids.shape
    torch.testing.assert_close(rel[0], exp.relevance, **TOL)
    # the attention mask as captum passes it: an additional positional argument
    masked = lrp.attribute(ids, target=exp.target_id, additional_forward_args=torch.ones_like(ids))
    torch.testing.assert_close(masked[0], exp.relevance, **TOL)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_bert_classifier_equals_explain(tok, method, engine):
    bert = tiny_bert()
    exp = lxt.explain(bert, tok, PROMPT, target=2, method=method, composite=composite(bert, method, engine))
    ids = ids_of(tok)
    rel = METHODS[method][0](bert, engine=engine).attribute(ids, target=2, additional_forward_args=torch.ones_like(ids))
    torch.testing.assert_close(rel[0], exp.relevance, **TOL)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_vit_pixels_equal_explain(method, engine):
    vit = tiny_vit()
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    exp = lxt.explain(vit, None, pixels[0], target=1, method=method, composite=composite(vit, method, engine))
    rel = METHODS[method][0](vit, engine=engine).attribute(pixels, target=1)
    assert rel.shape == pixels.shape
    torch.testing.assert_close(rel[0].sum(0), exp.relevance, **TOL)  # explain: summed over channels


def test_masked_lm_target_is_position_and_token(tok):
    mlm = tiny_bert(cls=BertForMaskedLM)
    prompt = "the capital of france is [MASK]"
    exp = lxt.explain(mlm, tok, prompt, target="paris")
    rel = AttnLRP(mlm).attribute(ids_of(tok, prompt), target=(exp.position, exp.target_id))
    torch.testing.assert_close(rel[0], exp.relevance, **TOL)


def test_embeddings_as_float_input_equal_token_ids(llama, tok):
    ids = ids_of(tok)
    emb = llama.get_input_embeddings()(ids).detach()
    lrp = AttnLRP(llama)
    per_dim = lrp.attribute(emb, target=7)  # a float in the input_ids place: inputs_embeds
    assert per_dim.shape == emb.shape
    torch.testing.assert_close(per_dim.sum(-1), lrp.attribute(ids, target=7), **TOL)


# ---------------------------------------------------------------------- batches, tuples, delta
def test_left_padded_batch_equals_each_alone(llama):
    ids, mask = text_batch(batch=2, seq=6, pad_first=2)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    targets = [5, 40]
    lrp = AttnLRP(llama)
    batch, delta = lrp.attribute(ids, target=targets, additional_forward_args=(mask, positions),
                                 return_convergence_delta=True)
    for b in range(2):
        keep = mask[b].bool()
        alone, d = lrp.attribute(ids[b:b + 1, keep], target=targets[b], return_convergence_delta=True)
        torch.testing.assert_close(batch[b, keep], alone[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(delta[b], d[0], rtol=1e-4, atol=1e-6)
    assert batch[1, ~mask[1].bool()].abs().max() < 1e-6  # padding gets nothing
    # a tensor of targets is the same as the list
    torch.testing.assert_close(lrp.attribute(ids, target=torch.tensor(targets),
                                             additional_forward_args=(mask, positions)), batch)


class TwoInputs(nn.Module):
    """``W1 a + W2 b``: epsilon-LRP (epsilon -> 0) gives ``a * W1[t]`` and ``b * W2[t]``."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Linear(4, 3, bias=False), nn.Linear(5, 3, bias=False)

    def forward(self, a, b):
        return self.left(a) + self.right(b)


@pytest.mark.parametrize("engine", ENGINES)
def test_tuple_inputs_give_a_tuple_against_the_closed_form(engine):
    torch.manual_seed(0)
    model = TwoInputs().double()
    a, b = torch.randn(2, 4, dtype=torch.double), torch.randn(2, 5, dtype=torch.double)
    comp = lxt.composites.attnlrp(model, family="structural", epsilon=1e-12, engine=engine)
    (ra, rb), delta = AttnLRP(model, composite=comp).attribute((a, b), target=[0, 2],
                                                                return_convergence_delta=True)
    t = torch.tensor([0, 2])
    torch.testing.assert_close(ra, a * model.left.weight[t].detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rb, b * model.right.weight[t].detach(), rtol=1e-9, atol=1e-12)
    assert delta.abs().max() < 1e-9
    single = AttnLRP(model, composite=comp).attribute((a, b), target=1)
    assert isinstance(single, tuple) and [r.shape for r in single] == [a.shape, b.shape]


@pytest.mark.parametrize("method", METHODS)
def test_convergence_delta_is_value_minus_relevance(llama, method):
    ids, _ = text_batch(batch=2, seq=5, pad_first=0)
    targets = [3, 60]
    rel, delta = METHODS[method][0](llama).attribute(ids, target=targets, return_convergence_delta=True)
    with torch.no_grad():  # the explained value, from a plain forward of the unpatched model
        value = llama(input_ids=ids).logits[torch.arange(2), -1, targets]
    assert delta.shape == (2,)
    torch.testing.assert_close(delta, value - rel.sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(AttnLRP(llama).compute_convergence_delta(rel, value), value - rel.sum(-1))


# ---------------------------------------------------------------------- the model is restored
@pytest.mark.parametrize("make", [
    lambda m: AttnLRP(m), lambda m: CPLRP(m, engine="explicit"),
    lambda m: LayerAttnLRP(m, m.model.layers[1]), lambda m: LayerCPLRP(m, "model.layers.0", engine="explicit"),
])
def test_model_restored_also_when_attribute_raises(make):
    model = tiny_llama()
    model.train()  # attribute runs in eval mode and gives the flags back
    snap = snapshot(model)
    ids = torch.randint(3, 100, (1, 5))
    make(model).attribute(ids, target=4)
    assert_restored(model, snap)
    with pytest.raises(ValueError, match="lxt: target 1000 does not select"):
        make(model).attribute(ids, target=1000)  # found after the forward, while registered
    assert_restored(model, snap)
    with pytest.raises(ValueError, match="target=None, but the model gives 101 outputs"):
        make(model).attribute(ids)
    assert_restored(model, snap)


def test_inside_a_context_the_registered_composite_is_used(llama, tok):
    comp = lxt.composites.attnlrp(llama, engine="explicit")
    ids = ids_of(tok)
    with comp.context(llama):
        rel = AttnLRP(llama).attribute(ids, target=9)
        assert registered_composite(llama) is comp
        with pytest.raises(ValueError, match="implements 'attnlrp', not 'cp-lrp': use AttnLRP"):
            CPLRP(llama).attribute(ids, target=9)
        with pytest.raises(ValueError, match="used as it is: drop epsilon"):
            AttnLRP(llama, engine="gradient").attribute(ids, target=9)
        assert registered_composite(llama) is comp
    exp = lxt.explain(llama, tok, PROMPT, target=9, composite=lxt.composites.attnlrp(llama, engine="explicit"))
    torch.testing.assert_close(rel[0], exp.relevance, **TOL)


def test_bad_arguments_fail_early(llama):
    ids = torch.randint(3, 100, (2, 5))
    with pytest.raises(TypeError, match="needs the model"):
        AttnLRP(lambda x: x)
    with pytest.raises(ValueError, match="composite= or epsilon= / engine=, not both"):
        AttnLRP(llama, composite=lxt.composites.attnlrp(llama), engine="explicit")
    with pytest.raises(ValueError, match="use CPLRP"):
        AttnLRP(llama, composite=lxt.composites.cp_lrp(llama))
    with pytest.raises(ValueError, match="3 targets for a batch of 2"):
        AttnLRP(llama).attribute(ids, target=[1, 2, 3])
    with pytest.raises(TypeError, match="input 1 is a torch.int64 tensor"):
        AttnLRP(llama).attribute((ids, torch.ones_like(ids)), target=1)
    with pytest.raises(ValueError, match="no submodule 'model.nope'"):
        LayerAttnLRP(llama, "model.nope")
    with pytest.raises(ValueError, match="engine must be one of 'gradient', 'explicit'"):
        AttnLRP(llama, engine="fast")
    emb = llama.get_input_embeddings()(ids).detach()
    with pytest.raises(ValueError, match="model.embed_tokens did not run in the forward"):
        LayerAttnLRP(llama, llama.get_input_embeddings()).attribute(emb, target=1)


# ---------------------------------------------------------------------- layers
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_layer_relevance_equals_explain_latent(llama, tok, method, engine):
    name = "model.layers.0"
    exp = lxt.explain(llama, tok, PROMPT, method=method, layers=[name],
                      composite=composite(llama, method, engine))
    layer_cls = METHODS[method][1]
    rel, delta = layer_cls(llama, llama.model.layers[0], engine=engine).attribute(
        ids_of(tok), target=exp.target_id, return_convergence_delta=True)
    assert rel.shape == (1, 5, 32)
    torch.testing.assert_close(rel[0], exp.latent[name], **TOL)
    torch.testing.assert_close(delta[0], torch.tensor(exp.logit) - rel.sum(), rtol=1e-5, atol=1e-6)
    by_name = layer_cls(llama, name, engine=engine).attribute(ids_of(tok), target=exp.target_id)
    torch.testing.assert_close(by_name, rel)


@pytest.mark.parametrize("engine", ENGINES)
def test_layer_at_the_input_embedding_is_per_dimension(llama, tok, engine):
    ids = ids_of(tok)
    per_dim = LayerAttnLRP(llama, llama.get_input_embeddings(), engine=engine).attribute(ids, target=11)
    assert per_dim.shape == (1, 5, 32)
    torch.testing.assert_close(per_dim.sum(-1), AttnLRP(llama, engine=engine).attribute(ids, target=11), **TOL)


# ---------------------------------------------------------------------- captum's classes inside a context
def embeds_and_value(model, ids, target):
    emb = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        y = model(inputs_embeds=emb).logits[:, -1, target]
    return emb, y


def next_token(model):
    return lambda x: model(inputs_embeds=x, use_cache=False).logits[:, -1]


def next_token_from_ids(model):
    return lambda i: model(input_ids=i, use_cache=False).logits[:, -1]


@pytest.mark.parametrize("engine", ENGINES)
def test_captum_saliency_inside_a_context_is_relevance_over_value(llama, tok, engine):
    """Both engines: Saliency(abs=False) * y == R (captum seeds backward with 1, lxt with y)."""
    ids = torch.cat([ids_of(tok), ids_of(tok, "the capital of italy is")])
    emb, y = embeds_and_value(llama, ids, 7)
    R = AttnLRP(llama, engine=engine).attribute(emb, target=7)
    with composite(llama, "attnlrp", engine).context(llama):
        sal = captum_attr.Saliency(next_token(llama)).attribute(emb.clone().requires_grad_(), target=7, abs=False)
    torch.testing.assert_close(sal * y[:, None, None], R, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("engine", ENGINES)
def test_captum_input_x_gradient_inside_a_context_is_not_relevance(llama, tok, engine):
    """Both engines: InputXGradient * y == x * R (the input counted twice)."""
    emb, y = embeds_and_value(llama, ids_of(tok), 7)
    R = AttnLRP(llama, engine=engine).attribute(emb, target=7)
    with composite(llama, "attnlrp", engine).context(llama):
        ixg = captum_attr.InputXGradient(next_token(llama)).attribute(emb.clone().requires_grad_(), target=7)
    torch.testing.assert_close(ixg * y, emb * R, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("where", ["embedding", "decoder layer"])
@pytest.mark.parametrize("engine", ENGINES)
def test_captum_layer_gradient_x_activation_inside_a_context(llama, tok, engine, where):
    """Gradient engine: LayerGradientXActivation * y == R and, with multiply_by_inputs=False,
    * a * y == R; explicit engine: * y == a * R and, with multiply_by_inputs=False, * y == R."""
    ids = ids_of(tok)
    _, y = embeds_and_value(llama, ids, 7)
    name = "model.embed_tokens" if where == "embedding" else "model.layers.0"
    layer = llama.get_submodule(name)
    R = LayerAttnLRP(llama, name, engine=engine).attribute(ids, target=7)
    with composite(llama, "attnlrp", engine).context(llama):
        f = next_token_from_ids(llama)
        lgxa = captum_attr.LayerGradientXActivation(f, layer).attribute(ids, target=7)
        lg = captum_attr.LayerGradientXActivation(f, layer, multiply_by_inputs=False).attribute(ids, target=7)
        a = captum_attr.LayerActivation(f, layer).attribute(ids)
    if engine == "gradient":
        torch.testing.assert_close(lgxa * y, R, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(lg * a * y, R, rtol=1e-4, atol=1e-7)
    else:
        torch.testing.assert_close(lgxa * y, a * R, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(lg * y, R, rtol=1e-4, atol=1e-7)
