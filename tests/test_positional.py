"""Positional relevance (``positional=True``, PA-LRP; lxt/positional.py).

Each rule is checked against the independent reference of tests/reference.py
(``reference_positional_relevance``: rotary cos / sin and learned position / token-type
embeddings as leaves, the uniform rule on the rotary products as both factors' gradients
halved), per token and per position, on tiny float64 stock models (Llama with rotary, GPT-2,
BERT with token types, ViT); CP-LRP with biases zeroed conserves over tokens, positions and
token types; without the option nothing changes; the model comes back exactly.
"""
import copy
import math

import pytest
import torch
import transformers as tr

import lxt
from lxt.positional import PositionalSources, find_sources
from helpers import assert_restored, forward_refused, snapshot
from models import text_batch, tiny_bert, tiny_family, tiny_llama, tiny_tokenizer, tiny_vit, zero_biases
from reference import (EPS, _select, assert_relevance_close, reference_model,
                       reference_positional_relevance)

pytestmark = pytest.mark.usefixtures("reference_attention")  # the reference's attention functions

D = torch.float64
RTOL = 1e-6


def _llama(**kw):
    return tiny_llama("sdpa", D, initializer_range=0.2, **kw)  # attention far from uniform


def _gpt2():
    return tiny_family("gpt2", tr.GPT2LMHeadModel, dtype=D, initializer_range=0.2)


def _bert():
    return tiny_bert("sdpa", D)


def _vit():
    return tiny_vit("sdpa", D)


MODELS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert, "vit": _vit}
KINDS = {"llama": ["rotary"], "gpt2": ["position"], "bert": ["position", "token_type"], "vit": ["position"]}


def _inputs(name, model):
    if name == "vit":
        g = torch.Generator().manual_seed(1)
        return {"pixel_values": torch.randn(1, 3, 16, 16, generator=g, dtype=D)}
    ids, mask = text_batch(pad_first=2)  # two sequences, the second left padded
    return {"inputs_embeds": model.get_input_embeddings()(ids).detach(), "attention_mask": mask}


def _composite(name, model, cp, engine):
    table = lxt.composites.cp_lrp if cp else lxt.composites.attnlrp
    kw = {"conv_gamma": 0.0, "mlp_gamma": 0.0} if name == "vit" else {}  # the reference has no gamma
    return table(model, epsilon=EPS, engine=engine, **kw)


def lxt_positional(comp, model, targets, inputs, method):
    """Per-token relevance and ``kind -> (batch, T)`` positional relevance from lxt."""
    key = "pixel_values" if "pixel_values" in inputs else "inputs_embeds"
    x = inputs[key].detach().clone().requires_grad_(True)
    src = PositionalSources(model)
    with comp.context(model), src.attached(batch_size=x.shape[0], method=method):
        out = model(**dict(inputs, **{key: x})).logits
        logit = _select(out, targets)
        logit.backward(logit.detach())  # explicit LRP starts with R = the logit
        pos = src.relevance(gradient_engine=comp.engine == "gradient")
    return x.grad.sum(1 if key == "pixel_values" else -1), pos, logit.detach()


CASES = [(n, cp, engine) for n in ("llama", "gpt2", "bert") for cp in (False, True)
         for engine in ("explicit", "gradient")]
CASES += [("vit", False, "explicit"), ("vit", True, "gradient")]


@pytest.mark.parametrize("name,cp,engine", CASES, ids=[f"{n}-{'cp' if c else 'attnlrp'}-{e}" for n, c, e in CASES])
def test_positional_relevance_matches_reference(name, cp, engine):
    """Per token and per position (each kind of source) lxt equals the reference to 1e-6 of
    the largest relevance; rotary gets a real share under AttnLRP and none under CP-LRP."""
    model = MODELS[name]()
    inputs = _inputs(name, model)
    with torch.no_grad():
        stock = model(**inputs).logits
    targets = (stock[:, -1] if stock.dim() == 3 else stock).argmax(-1)
    tok, pos, _ = lxt_positional(_composite(name, model, cp, engine), model, targets, inputs,
                                 "cp-lrp" if cp else "attnlrp")
    ref_tok, ref_pos = reference_positional_relevance(reference_model(model, cp=cp), targets, **dict(inputs))
    assert sorted(pos) == sorted(ref_pos) == sorted(KINDS[name])
    assert_relevance_close(tok, ref_tok, rtol=RTOL, atol_frac=RTOL)
    for kind in pos:
        assert pos[kind].shape == ref_pos[kind].shape
        if name == "llama" and cp:  # q and k detached: no relevance reaches cos / sin
            assert (pos[kind] == 0).all() and (ref_pos[kind] == 0).all()
            continue
        assert_relevance_close(pos[kind], ref_pos[kind], rtol=RTOL, atol_frac=RTOL)
        # a share that matters, not round-off
        assert pos[kind].abs().sum() > 1e-3 * tok.abs().sum(), (kind, pos[kind], tok)
    if name in ("llama", "gpt2"):  # padded positions get nothing (BERT pools position 0: a pad here)
        for kind in pos:
            assert (pos[kind][inputs["attention_mask"] == 0] == 0).all()


def _zeroed(name):
    model = zero_biases(MODELS[name]())
    if name == "vit":
        with torch.no_grad():
            model.vit.embeddings.cls_token.zero_()  # a learned constant input, like a bias
    return model


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "vit"])
def test_cp_lrp_conserves_over_tokens_and_positions(name):
    """Biases zeroed, CP-LRP: sum over tokens + positions (+ token types) = the explained logit
    (1e-6 relative), per sequence; without positional relevance the learned positions' share
    is missing (GPT-2, BERT, ViT)."""
    model = _zeroed(name)
    inputs = _inputs(name, model)
    with torch.no_grad():
        stock = model(**inputs).logits
    targets = (stock[:, -1] if stock.dim() == 3 else stock).argmax(-1)
    tok, pos, logit = lxt_positional(_composite(name, model, True, "explicit"), model, targets, inputs, "cp-lrp")
    total = tok.flatten(1).sum(-1) + sum(p.sum(-1) for p in pos.values())
    for t, l in zip(total.tolist(), logit.tolist()):
        assert math.isclose(t, l, rel_tol=RTOL, abs_tol=1e-12), (name, t, l)
    if name != "llama":
        missing = sum(p.sum(-1) for p in pos.values())
        assert (missing.abs() > 1e-4 * logit.abs()).all(), missing


def test_explain_positional_fields_and_conservation():
    """explain(positional=True): per-position fields (float32, CPU, one per token), in to_dict;
    BERT with biases zeroed under CP-LRP sums to the logit over the three."""
    tok = tiny_tokenizer()
    model = _zeroed("bert")
    exp = lxt.explain(model, tok, "the capital of france is", method="cp-lrp", positional=True,
                      composite=lxt.composites.cp_lrp(model, epsilon=EPS))
    assert exp.position_relevance.shape == exp.token_type_relevance.shape == exp.relevance.shape
    assert exp.position_relevance.dtype == torch.float32 and exp.position_relevance.device.type == "cpu"
    total = float(exp.relevance.double().sum() + exp.position_relevance.double().sum()
                  + exp.token_type_relevance.double().sum())
    assert math.isclose(total, exp.logit, rel_tol=1e-5), (total, exp.logit)
    d = exp.to_dict()
    assert d["position_relevance"] == exp.position_relevance.tolist()
    assert d["token_type_relevance"] == exp.token_type_relevance.tolist()
    html = exp.to_html()
    assert html.count('class="positions"') == 2  # positions and token types, under the tokens
    assert html.count('class="pos"') == 2 * len(exp.tokens)


def test_explain_positional_matches_reference_per_prompt():
    """explain(positional=True) on a batch of two prompts of different lengths (left padded
    inside explain) equals the reference run on each prompt alone (float32 results)."""
    tok = tiny_tokenizer()
    model = _llama()
    prompts = ["the capital of france is", "a cat sat"]
    exps = lxt.explain(model, tok, prompts, positional=True,
                       composite=lxt.composites.attnlrp(model, epsilon=EPS, engine="explicit"))
    ref = reference_model(model)
    for prompt, exp in zip(prompts, exps):
        ids = tok(prompt, return_tensors="pt").input_ids
        emb = model.get_input_embeddings()(ids).detach()
        ref_tok, ref_pos = reference_positional_relevance(ref, torch.tensor([exp.target_id]), inputs_embeds=emb)
        assert_relevance_close(exp.relevance.double(), ref_tok[0], rtol=1e-5, atol_frac=1e-5)
        assert_relevance_close(exp.position_relevance.double(), ref_pos["rotary"][0], rtol=1e-5, atol_frac=1e-5)
        assert exp.token_type_relevance is None


def test_input_x_gradient_positional_is_position_times_gradient():
    """The baseline's positional counterpart: wpe output times its plain gradient, computed
    here on a copy of the model with plain autograd."""
    tok = tiny_tokenizer()
    model = _gpt2()
    exp = lxt.explain(model, tok, "the capital of france is", method="input_x_gradient", positional=True)
    copy_ = copy.deepcopy(model)
    leaves = []

    def leaf(module, args, out):
        leaves.append(out.detach().clone().requires_grad_(True))
        return leaves[-1]

    copy_.transformer.wpe.register_forward_hook(leaf)
    ids = tok("the capital of france is", return_tensors="pt").input_ids
    copy_(input_ids=ids).logits[0, -1, exp.target_id].backward()
    expected = (leaves[0] * leaves[0].grad).sum(-1)[0]
    torch.testing.assert_close(exp.position_relevance.double(), expected, rtol=1e-5, atol=1e-7)
    grad = lxt.explain(model, tok, "the capital of france is", method="gradient", positional=True)
    torch.testing.assert_close(grad.position_relevance.double(), leaves[0].grad.norm(dim=-1)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_without_positional_nothing_changes(method):
    """Without positional=True the relevance is bit-identical to the plain composite run, and
    no positional field is set; with it the positional sources leave no hook behind."""
    tok = tiny_tokenizer()
    model = _llama()
    prompt = "the capital of france is"
    exp = lxt.explain(model, tok, prompt, method=method)
    assert exp.position_relevance is None and exp.token_type_relevance is None
    assert exp.to_dict()["position_relevance"] is None
    ids = tok(prompt, return_tensors="pt").input_ids
    x = model.get_input_embeddings()(ids).detach().clone().requires_grad_()
    comp = lxt.composites.attnlrp(model) if method == "attnlrp" else lxt.composites.cp_lrp(model)
    with comp.context(model):
        logits = model(inputs_embeds=x, attention_mask=torch.ones_like(ids), use_cache=False,
                       logits_to_keep=1).logits
        value = logits[0, -1, exp.target_id]
        value.backward(value.detach())
    assert torch.equal(exp.relevance, x.grad.float().sum(-1)[0])
    lxt.explain(model, tok, prompt, method=method, positional=True)
    assert torch.equal(lxt.explain(model, tok, prompt, method=method).relevance, exp.relevance)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "vit"])
def test_model_restored_exactly(name):
    model = MODELS[name]()
    snap = snapshot(model)
    params = {n: p for n, p in model.named_parameters()}
    if name == "vit":
        g = torch.Generator().manual_seed(1)
        lxt.explain(model, None, torch.randn(3, 16, 16, generator=g, dtype=D), positional=True)
    else:
        lxt.explain(model, tiny_tokenizer(), "the capital of france is", positional=True)
    assert_restored(model, snap)
    assert all(p is params[n] and p.grad is None for n, p in model.named_parameters())


def test_swapped_parameter_comes_back_when_the_forward_raises():
    """ViT's position-embedding parameter stands in as a leaf copy during its module's
    forward; it is the same Parameter object again after a forward that raises."""
    model = _vit()
    original = model.vit.embeddings.position_embeddings
    src = PositionalSources(model)

    def boom(module, args, out):
        raise RuntimeError("boom")

    handle = model.vit.embeddings.patch_embeddings.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"), src.attached(method="input_x_gradient"):
            model(pixel_values=torch.randn(1, 3, 16, 16, dtype=D))
    finally:
        handle.remove()
    assert model.vit.embeddings.position_embeddings is original
    assert all(not h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks))


def test_sources_are_found_per_family():
    kinds = {n: sorted({s.kind for s in find_sources(f())}) for n, f in MODELS.items()}
    assert kinds == {n: sorted(k) for n, k in KINDS.items()}


def test_bad_input_is_refused_before_the_model_runs():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    with forward_refused(model), pytest.raises(ValueError, match="no positional encoding"):
        lxt.explain(model, None, torch.randn(1, 3, 8, 8), positional=True)
    llama, tok = _llama(), tiny_tokenizer()
    with forward_refused(llama):
        with pytest.raises(TypeError, match="positional must be True or False"):
            lxt.explain(llama, tok, "the cat", positional="yes")
        with pytest.raises(ValueError, match="integrated gradients"):
            lxt.explain(llama, tok, "the cat", method="integrated_gradients", positional=True)


def test_generate_and_batches_carry_positional_relevance():
    """Each generated token's explanation, and each prompt of a padded batch, has one
    position value per token."""
    tok, model = tiny_tokenizer(), _gpt2()
    for exp in lxt.explain(model, tok, "the capital of", generate=2, positional=True):
        assert exp.position_relevance.shape == exp.relevance.shape and torch.isfinite(exp.position_relevance).all()
    exps = lxt.explain(model, tok, ["the capital of france is", "a cat"], positional=True, method="cp-lrp")
    assert [len(e.position_relevance) for e in exps] == [5, 2]
