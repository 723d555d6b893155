"""An independent formulation agrees with the Composite.

AttnLRP and CP-LRP (with epsilon -> 0) can be written as *gradient modifications*: with the
modified gradient ``g``, the relevance of a tensor ``x`` is ``x * g``.  The reference below is
written without lxt, on a ``copy.deepcopy`` of the stock HuggingFace model:

- identity rule on an elementwise activation ``y = f(x)``: gradient ``f(x) / x``;
- uniform rule on a product of two variables ``a * b``: both factors' gradients halved;
- attention (AttnLRP): q and k gradients divided by 4, v by 2, softmax unchanged (two
  matmuls, each uniform + epsilon, and the DTD softmax rule, which *is* the gradient);
  CP-LRP: q and k detached, v unscaled;
- RMSNorm / LayerNorm: the standard deviation detached (identity on ``1/std``);
- CP-LRP gated MLP: the gate branch detached;
- everything else (linear layers and biases, residual adds, rotary embedding, embedding sums,
  reshapes) keeps its plain gradient: the epsilon rule with epsilon -> 0 is input * gradient.

The Composite's relevance (``inputs_embeds.grad``, explicit LRP) must match
``inputs_embeds * reference_grad`` per token: tiny float64 configs to 1e-6 relative, and on
the real SmolLM2-135M weights (float32, slow) with a Pearson correlation >= 0.99 per prompt.
"""
from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, LlamaForSequenceClassification
from transformers.activations import GELUActivation, SiLUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

import lxt.composites
from lxt.composites import vit as lxt_vit

from models import text_batch, tiny_bert, tiny_llama, tiny_vit

EPS = 1e-12  # lxt stabiliser: epsilon -> 0 (float64 tests)
RTOL = 1e-6

# ----------------------------------------------------------------------------------------
# The reference formulation: gradient modifications, written without lxt
# ----------------------------------------------------------------------------------------


def scale_grad(t, s):
    """Value ``t`` (exactly), gradient scaled by ``s``."""
    d = t.detach()
    return d + (t - d) * s


def identity_grad(f, x):
    """Value ``f(x)`` (exactly), gradient ``f(x) / x`` (identity rule: ``x * grad = f(x) * g``).

    At ``x == 0`` the ratio is set to 0: a zero input gets (and passes on) no relevance, as
    the explicit rule does there (``R = f(0) * g = 0`` for the activations used here)."""
    y = f(x)
    safe = torch.where(x == 0, torch.ones_like(x), x)
    ratio = torch.where(x == 0, torch.zeros_like(y), y / safe).detach()
    return y.detach() + (x - x.detach()) * ratio


def _rms_norm_std_detached(norm):
    """``x * rsqrt(mean(x^2) + eps).detach() * w``.  HF computes the statistics in float32;
    so does this for float32 / bfloat16 inputs.  A float64 input stays in float64 (HF
    would round it to float32 and back; the forward check below bounds the difference)."""

    def forward(x):
        dtype = x.dtype
        h = x if dtype == torch.float64 else x.to(torch.float32)
        inv_std = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).detach()
        return norm.weight * (h * inv_std).to(dtype)

    return forward


def _layer_norm_std_detached(norm):
    """``(x - mean) / std.detach() * w + b`` (biased variance, as nn.LayerNorm)."""

    def forward(x):
        centred = x - x.mean(-1, keepdim=True)
        std = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
        out = centred / std.detach()
        if norm.weight is not None:
            out = out * norm.weight
        if norm.bias is not None:
            out = out + norm.bias
        return out

    return forward


def _gated_mlp(mlp, cp):
    """Llama MLP ``down(act(gate(x)) * up(x))``: uniform rule on the product (AttnLRP: both
    factors' gradients halved) or the gate branch detached (CP-LRP)."""

    def forward(x):
        gate = mlp.act_fn(mlp.gate_proj(x))
        up = mlp.up_proj(x)
        if cp:
            return mlp.down_proj(gate.detach() * up)
        return mlp.down_proj(scale_grad(gate, 0.5) * scale_grad(up, 0.5))

    return forward


def _reference_attention(cp, kernel):
    """An attention function for transformers' AttentionInterface: the stock kernel (sdpa, or
    the model's own eager function) with AttnLRP / CP-LRP gradient scalings on q, k, v."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        if cp:
            query, key = query.detach(), key.detach()
        else:
            query, key, value = scale_grad(query, 0.25), scale_grad(key, 0.25), scale_grad(value, 0.5)
        if kernel == "sdpa":
            fn = sdpa_attention_forward
        else:
            fn = importlib.import_module(type(module).__module__).eager_attention_forward
        return fn(module, query, key, value, attention_mask, **kwargs)

    return attention


def _attention_name(cp, kernel):
    name = f"lxt_ref_{'cplrp' if cp else 'attnlrp'}_{kernel}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _reference_attention(cp, kernel))
        AttentionMaskInterface.register(name, sdpa_mask if kernel == "sdpa" else eager_mask)
    return name


_ACTIVATIONS = (nn.SiLU, nn.GELU, nn.Tanh, SiLUActivation, GELUActivation)


def reference_model(model, cp=False):
    """A patched deep copy of ``model`` whose gradient, times the input, is the relevance."""
    ref = copy.deepcopy(model)
    kernel = ref.config._attn_implementation
    assert kernel in ("sdpa", "eager"), kernel
    ref.set_attn_implementation(_attention_name(cp, kernel))
    assert ref.config._attn_implementation == _attention_name(cp, kernel)
    counts = {"act": 0, "norm": 0}
    for module in ref.modules():
        if isinstance(module, _ACTIVATIONS):
            module.forward = (lambda f: (lambda x: identity_grad(f, x)))(module.forward)
            counts["act"] += 1
        elif isinstance(module, nn.LayerNorm):
            module.forward = _layer_norm_std_detached(module)
            counts["norm"] += 1
        elif type(module).__name__.endswith("RMSNorm"):
            module.forward = _rms_norm_std_detached(module)
            counts["norm"] += 1
        elif hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
            module.forward = _gated_mlp(module, cp)
    assert counts["act"] and counts["norm"], counts
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


# ----------------------------------------------------------------------------------------
# Running both
# ----------------------------------------------------------------------------------------


def _select(out, targets):
    """The explained logits: ``targets[b]`` indexes ``out[b]`` (at the last position for
    causal LMs).  Samples of a batch are independent, so one backward explains each."""
    if out.dim() == 3:
        out = out[:, -1]
    return out[torch.arange(out.shape[0]), targets]


def lxt_relevance(comp, model, targets, **inputs):
    """Per-token (per-pixel) relevance from the registered composite ``comp``."""
    name, x = _leaf_input(inputs)
    out = model(**inputs).logits
    logit = _select(out, targets)
    logit.backward(logit.detach())  # explicit LRP starts with R = the logit's value
    return _per_position(name, x.grad), out.detach()


def reference_relevance(ref, targets, **inputs):
    name, x = _leaf_input(inputs)
    out = ref(**inputs).logits
    _select(out, targets).sum().backward()  # gradient 1: relevance logit * 1 at the top
    return _per_position(name, x * x.grad), out.detach()


def _leaf_input(inputs):
    name = "pixel_values" if "pixel_values" in inputs else "inputs_embeds"
    x = inputs[name].detach().clone().requires_grad_(True)
    inputs[name] = x
    return name, x


def _per_position(name, rel):
    return rel.detach().sum(1 if name == "pixel_values" else -1)


def assert_relevance_close(actual, expected, rtol=RTOL, atol_frac=1e-9):
    """Per token ``|a - e| <= rtol * |e| + atol_frac * max|e|``.  Returns the error relative to
    the largest reference relevance, ``max|a - e| / max|e|``."""
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    scale = expected.abs().max()
    assert scale > 0
    err = (actual - expected).abs()
    bound = rtol * expected.abs() + atol_frac * scale
    assert (err <= bound).all(), (
        f"relevance differs from the reference: max |error| / max |R| = {(err.max() / scale).item():.3g}, "
        f"worst token {(err / bound).argmax().item()} (flat index)\nlxt:\n{actual}\nreference:\n{expected}")
    return (err.max() / scale).item()


def pearson(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def check_against_reference(model, factory, inputs, target_sets, cp, rtol, atol_frac, fwd_rtol=1e-6,
                            epsilon=EPS):
    """Register ``factory(model, epsilon=epsilon)`` once, explain every target set with it, and
    compare each with the reference on a deep copy.  Returns the worst ``max|error| / max|R|`` seen."""
    ref = reference_model(model, cp=cp)
    with torch.no_grad():
        stock = model(**inputs).logits
        ref_out = ref(**inputs).logits
    # the reference changes gradients only (HF's float32 RMSNorm rounding aside)
    torch.testing.assert_close(ref_out, stock, rtol=fwd_rtol, atol=fwd_rtol * stock.abs().max().item())
    comp = factory(model, epsilon=epsilon)
    results = []
    with comp.context(model):
        for targets in target_sets:
            results.append(lxt_relevance(comp, model, targets, **dict(inputs)))
    assert all(not p.requires_grad for p in ref.parameters())
    worst = 0.0
    for targets, (rel, out) in zip(target_sets, results):
        torch.testing.assert_close(out, stock, rtol=1e-12 if stock.dtype == torch.float64 else 1e-5,
                                   atol=1e-12 if stock.dtype == torch.float64 else 1e-6)
        expected, _ = reference_relevance(ref, targets, **dict(inputs))
        worst = max(worst, assert_relevance_close(rel, expected, rtol=rtol, atol_frac=atol_frac))
    return worst


def _targets(logits, n_other=1, seed=0):
    """The predicted class (next token) of every sample, and ``n_other`` random classes."""
    last = logits[:, -1] if logits.dim() == 3 else logits
    g = torch.Generator().manual_seed(seed)
    others = [torch.randint(0, last.shape[-1], (last.shape[0],), generator=g) for _ in range(n_other)]
    return [last.argmax(-1)] + others


COMPOSITES = {
    "attnlrp": (lxt.composites.attnlrp, False),
    "cplrp": (lxt.composites.cp_lrp, True),
}

# ----------------------------------------------------------------------------------------
# Llama (grouped-query attention: 4 heads, 2 key/value heads)
# ----------------------------------------------------------------------------------------

# Tolerances.  Every tiny test runs in float64 with rtol 1e-6 per token and an absolute floor
# relative to the largest relevance: BERT and ViT reach ~1e-9 of max|R| (the epsilon = 1e-12
# stabiliser: a few pre-activations of random tiny weights are ~1e-5), floor 1e-7.  But HF's LlamaRMSNorm rounds its input to
# float32 and back, so a float64 Llama is float32-accurate there; the reference computes the
# detached std in float64, and the two differ by ~1e-7 of the largest relevance.  The
# epsilon = 1e-12 stabiliser adds about as much on random tiny weights (some pre-activations
# are ~1e-5).  Hence ``rtol 1e-6`` with an absolute floor of ``1e-6 * max|R|`` for Llama;
# ``test_llama_float64_exact`` removes both sources and agrees to 1e-9.
#
# Eager attention: HF's eager Llama in float64 with a padded mask gives NaN logits without
# lxt (the float64 mask minimum becomes -inf in its float32 softmax, fully masked pad rows turn
# NaN and the NaN reaches every position through the values).  So eager runs in float64
# without padding, and in float32 with padding at float32 tolerances.
LLAMA_CASES = [
    pytest.param("sdpa", torch.float64, 2, 1e-6, 1e-6, id="sdpa-f64-padded"),
    pytest.param("sdpa", torch.float64, 0, 1e-6, 1e-6, id="sdpa-f64"),
    pytest.param("eager", torch.float64, 0, 1e-6, 1e-6, id="eager-f64"),
    pytest.param("eager", torch.float32, 2, 1e-3, 1e-4, id="eager-f32-padded"),
]


@pytest.mark.parametrize("rule", sorted(COMPOSITES))
@pytest.mark.parametrize("attn,dtype,pad,rtol,atol_frac", LLAMA_CASES)
def test_llama_causal_lm_matches_reference(attn, dtype, pad, rtol, atol_frac, rule):
    factory, cp = COMPOSITES[rule]
    model = tiny_llama(attn=attn, dtype=dtype)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    ids, mask = text_batch(pad_first=pad)
    inputs = {"inputs_embeds": model.get_input_embeddings()(ids).detach(), "attention_mask": mask}
    with torch.no_grad():
        logits = model(**inputs).logits
    worst = check_against_reference(model, factory, inputs, _targets(logits), cp, rtol, atol_frac,
                                    fwd_rtol=1e-6 if dtype == torch.float64 else 1e-5)
    print(f"llama {attn} {dtype} pad={pad} {rule}: max|err|/max|R| {worst:.2e}")


def _float64_rms_norm(self, hidden_states):
    """LlamaRMSNorm without HF's float32 round trip (same formula, input dtype throughout)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.mark.parametrize("rule", sorted(COMPOSITES))
def test_llama_float64_exact(rule, monkeypatch):
    """Without the two error sources of the stock test (HF's float32 RMSNorm round trip, patched
    out here for the duration of the test, and a finite epsilon: 1e-20 is 0 next to every
    non-zero pre-activation) lxt and the reference agree to float64 round-off."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(LlamaRMSNorm, "forward", _float64_rms_norm)
    factory, cp = COMPOSITES[rule]
    model = tiny_llama(attn="sdpa", dtype=torch.float64)
    ids, mask = text_batch()
    inputs = {"inputs_embeds": model.get_input_embeddings()(ids).detach(), "attention_mask": mask}
    with torch.no_grad():
        logits = model(**inputs).logits
    worst = check_against_reference(model, factory, inputs, _targets(logits), cp, rtol=1e-9, atol_frac=1e-12,
                                    fwd_rtol=1e-13, epsilon=1e-20)
    print(f"llama float64-exact {rule}: max|err|/max|R| {worst:.2e}")


def test_llama_sequence_classification_matches_reference():
    """LlamaForSequenceClassification (AttnLRP; CP-LRP differs only inside the layers, covered
    above): the score head reads the last position (left padding).  Its first call costs ~6 s
    (HF logs a warning about padding in inputs_embeds inside forward: a graph break)."""
    rule = "attnlrp"
    factory, cp = COMPOSITES[rule]
    model = tiny_llama(attn="sdpa", dtype=torch.float64, cls=LlamaForSequenceClassification,
                       num_labels=3, pad_token_id=0)
    ids, mask = text_batch()
    inputs = {"inputs_embeds": model.get_input_embeddings()(ids).detach(), "attention_mask": mask}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (2, 3)
    worst = check_against_reference(model, factory, inputs, _targets(logits), cp, rtol=1e-6, atol_frac=1e-6)
    print(f"llama seq-cls {rule}: max|err|/max|R| {worst:.2e}")


# ----------------------------------------------------------------------------------------
# BERT: embedding sums (word + token type + position) keep the plain gradient in the
# reference: position and token-type embeddings are constants that absorb their share.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", sorted(COMPOSITES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_matches_reference(attn, rule):
    factory, cp = COMPOSITES[rule]
    model = tiny_bert(attn=attn, dtype=torch.float64)
    ids, mask = text_batch()  # padded batch
    inputs = {"inputs_embeds": model.get_input_embeddings()(ids).detach(), "attention_mask": mask}
    with torch.no_grad():
        logits = model(**inputs).logits
    worst = check_against_reference(model, factory, inputs, _targets(logits), cp, rtol=1e-6, atol_frac=1e-7,
                                    fwd_rtol=1e-12)
    print(f"bert {attn} {rule}: max|err|/max|R| {worst:.2e}")


# ----------------------------------------------------------------------------------------
# ViT: the default table puts the gamma rule on the patch convolution and the MLP linears,
# which has no gradient form; gamma = 0 is the epsilon rule (plain gradient as epsilon -> 0).
# ----------------------------------------------------------------------------------------

VIT_COMPOSITES = {
    "attnlrp": (lambda model, epsilon: lxt_vit.attnlrp(conv_gamma=0.0, mlp_gamma=0.0, epsilon=epsilon), False),
    "cplrp": (lambda model, epsilon: lxt_vit.cp_lrp(conv_gamma=0.0, mlp_gamma=0.0, epsilon=epsilon), True),
}


@pytest.mark.parametrize("rule", sorted(VIT_COMPOSITES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_vit_matches_reference(attn, rule):
    factory, cp = VIT_COMPOSITES[rule]
    model = tiny_vit(attn=attn, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)}
    with torch.no_grad():
        logits = model(**inputs).logits
    worst = check_against_reference(model, factory, inputs, _targets(logits), cp, rtol=1e-6, atol_frac=1e-7,
                                    fwd_rtol=1e-12)
    print(f"vit {attn} {rule}: max|err|/max|R| {worst:.2e}")


# ----------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9 / 3 heads)
# ----------------------------------------------------------------------------------------

PROMPTS = [
    "The capital of France is",
    "The largest planet in the solar system is",
    "Water freezes at a temperature of zero degrees",
    "The author of Romeo and Juliet is William",
    "The chemical symbol for gold is",
]


@pytest.fixture(scope="module")
def smollm2():
    load_smollm2 = pytest.importorskip("lxt.models").load_smollm2
    model, tokenizer = load_smollm2(dtype=torch.float32)
    return model, tokenizer


def _explain_prompts(model, comp, tokenizer, targets=None):
    """Per-token lxt relevance of the top next token (or ``targets``) for every prompt, with
    one registration.  Returns (relevances, targets)."""
    rels, tops = [], []
    with comp.context(model):
        for i, prompt in enumerate(PROMPTS):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            emb = model.get_input_embeddings()(ids).detach()
            with torch.no_grad():
                top = model(inputs_embeds=emb).logits[0, -1].argmax().view(1) if targets is None else targets[i]
            rel, _ = lxt_relevance(comp, model, top, inputs_embeds=emb)
            rels.append(rel[0].float())
            tops.append(top)
    return rels, tops


@pytest.mark.slow
@pytest.mark.parametrize("rule", sorted(COMPOSITES))
def test_smollm2_matches_reference(smollm2, rule):
    """float32, lxt's default epsilon: Pearson >= 0.99 per prompt with the reference."""
    model, tokenizer = smollm2
    factory, cp = COMPOSITES[rule]
    ref = reference_model(model, cp=cp)
    rels, tops = _explain_prompts(model, factory(model), tokenizer)
    for prompt, rel, top in zip(PROMPTS, rels, tops):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        emb = model.get_input_embeddings()(ids).detach()
        expected, _ = reference_relevance(ref, top, inputs_embeds=emb)
        r = pearson(rel, expected[0])
        print(f"smollm2 {rule} {prompt!r} -> {tokenizer.decode(top)!r}: pearson {r:.5f}")
        assert torch.isfinite(rel).all()
        assert r >= 0.99, (prompt, r, rel, expected)


@pytest.mark.slow
def test_smollm2_bfloat16_agrees_with_float32(smollm2):
    """SmolLM2 in bfloat16 with lxt AttnLRP: finite relevance, Pearson >= 0.95 per prompt with
    float32 (same target token)."""
    from lxt.models import load_smollm2

    model, tokenizer = smollm2
    rels32, tops = _explain_prompts(model, lxt.composites.attnlrp(model), tokenizer)
    model16, _ = load_smollm2(dtype=torch.bfloat16)
    rels16, _ = _explain_prompts(model16, lxt.composites.attnlrp(model16), tokenizer, targets=tops)
    for prompt, a, b in zip(PROMPTS, rels32, rels16):
        assert torch.isfinite(b).all(), prompt
        r = pearson(a, b)
        print(f"smollm2 bf16 vs f32 {prompt!r}: pearson {r:.5f}")
        assert r >= 0.95, (prompt, r, a, b)
