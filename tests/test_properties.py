"""Property-based tests over random small Llama, BERT and ViT configurations.

For every drawn configuration (layers 1-3, heads, kv-heads dividing heads, hidden sizes,
padding patterns, float32 / float64, sdpa / eager):

- round trip exact: the forward is unchanged while registered, and after ``remove`` the
  model is the same objects, state and flags, with bit-identical outputs;
- relevance is finite (and not all zero);
- Llama, CP-LRP, zero biases, float64, ``epsilon=1e-12``: the relevance of inputs_embeds sums
  to the explained logit (``logit.backward(logit)``) to 1e-4 relative; padded positions and
  other sequences of the batch get none.

Examples are derandomized, so the module is deterministic (25 per property; nothing is
captured, so each costs a registration and a forward of a tiny model).
"""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig,
                          LlamaForCausalLM, ViTConfig, ViTForImageClassification)

import lxt.composites as composites
from models import zero_biases
from helpers import assert_restored, snapshot

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
DTYPES = st.sampled_from([torch.float32, torch.float64])
METHODS = st.sampled_from(["attnlrp", "cp_lrp"])
VOCAB = 37


# --------------------------------------------------------------------------------- strategies
@st.composite
def heads_and_dims(draw, head_dims=(2, 4, 8)):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))
    head_dim = draw(st.sampled_from(head_dims))
    return heads, kv, head_dim


@st.composite
def padded_batch(draw, left: bool):
    """(ids, mask): batch 1-3, length 2-7, each row with >= 1 real token."""
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(2, 7))
    pads = [draw(st.integers(0, seq - 1)) for _ in range(batch)]
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b, p in enumerate(pads):
        if p:
            if left:
                mask[b, :p], ids[b, :p] = 0, 0
            else:
                mask[b, seq - p:], ids[b, seq - p:] = 0, 0
    return ids, mask


@st.composite
def llama_case(draw, dtype=DTYPES):
    heads, kv, head_dim = draw(heads_and_dims(head_dims=(2, 4, 8)))
    dt = draw(dtype)
    ids, mask = draw(padded_batch(left=True))
    padded = bool((mask == 0).any())
    # HF's eager Llama attention is NaN in float64 with left padding (README, Limits)
    attn = "sdpa" if (dt == torch.float64 and padded) else draw(st.sampled_from(["sdpa", "eager"]))
    cfg = dict(hidden_size=heads * head_dim, intermediate_size=draw(st.sampled_from([8, 24, 48])),
               num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=heads,
               num_key_value_heads=kv, vocab_size=VOCAB, max_position_embeddings=32,
               attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()),
               tie_word_embeddings=draw(st.booleans()), attn_implementation=attn)
    seed = draw(st.integers(0, 1000))
    return cfg, dt, ids, mask, seed


@st.composite
def bert_case(draw):
    heads, _, head_dim = draw(heads_and_dims(head_dims=(4, 8)))
    ids, mask = draw(padded_batch(left=False))
    cfg = dict(hidden_size=heads * head_dim, intermediate_size=draw(st.sampled_from([8, 24, 48])),
               num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=heads,
               vocab_size=VOCAB, max_position_embeddings=32, num_labels=draw(st.integers(2, 4)),
               attn_implementation=draw(st.sampled_from(["sdpa", "eager"])))
    return cfg, draw(DTYPES), ids, mask, draw(st.integers(0, 1000))


@st.composite
def vit_case(draw):
    heads, _, head_dim = draw(heads_and_dims(head_dims=(4, 8)))
    patch = draw(st.sampled_from([2, 4]))
    image = patch * draw(st.integers(1, 3))
    cfg = dict(image_size=image, patch_size=patch, num_channels=draw(st.integers(1, 3)),
               hidden_size=heads * head_dim, intermediate_size=draw(st.sampled_from([8, 24, 48])),
               num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=heads,
               num_labels=draw(st.integers(2, 4)), qkv_bias=draw(st.booleans()),
               attn_implementation=draw(st.sampled_from(["sdpa", "eager"])))
    batch = draw(st.integers(1, 2))
    return cfg, draw(DTYPES), batch, draw(st.integers(0, 1000))


def build(cls, config_cls, cfg, dtype, seed):
    torch.manual_seed(seed)
    return cls(config_cls(**cfg)).to(dtype).eval()


# --------------------------------------------------------------------------------- checks
def round_trip(model, method, kwargs, key, explain):
    """Register, check the forward, explain, remove, check the exact restore."""
    with torch.no_grad():
        ref = model(**kwargs).logits
    snap = snapshot(model)
    comp = getattr(composites, method)(model)
    x = kwargs[key].detach().clone().requires_grad_()
    with comp.context(model):
        out = model(**{**kwargs, key: x}).logits
        tol = 1e-5 if ref.dtype == torch.float32 else 1e-10
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        value = explain(out)
        value.backward(value.detach())
    assert x.grad is not None
    assert torch.isfinite(x.grad).all(), "relevance is not finite"
    assert x.grad.abs().sum() > 0
    assert_restored(model, snap)
    with torch.no_grad():
        assert torch.equal(model(**kwargs).logits, ref), "output after remove is not bit-identical"
    assert all(p.requires_grad for p in model.parameters())
    return x.grad


def text_kwargs(model, ids, mask):
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
    return {"inputs_embeds": emb, "attention_mask": mask}


# --------------------------------------------------------------------------------- tests
@settings(max_examples=25, **SETTINGS)
@given(case=llama_case(), method=METHODS, data=st.data())
def test_llama_round_trip_and_finite_relevance(case, method, data):
    cfg, dtype, ids, mask, seed = case
    model = build(LlamaForCausalLM, LlamaConfig, cfg, dtype, seed)
    row = data.draw(st.integers(0, ids.shape[0] - 1), label="row")
    target = data.draw(st.integers(0, VOCAB - 1), label="target")
    kwargs = {**text_kwargs(model, ids, mask), "use_cache": False}
    grad = round_trip(model, method, kwargs, "inputs_embeds", lambda out: out[row, -1, target])
    # padded positions and the other sequences get no relevance
    assert (grad[mask == 0] == 0).all()
    others = [b for b in range(ids.shape[0]) if b != row]
    assert (grad[others] == 0).all()


@settings(max_examples=25, **SETTINGS)
@given(case=llama_case(dtype=st.just(torch.float64)), data=st.data())
def test_llama_cp_lrp_conserves_with_zero_biases(case, data):
    cfg, dtype, ids, mask, seed = case
    model = zero_biases(build(LlamaForCausalLM, LlamaConfig, cfg, dtype, seed))
    row = data.draw(st.integers(0, ids.shape[0] - 1), label="row")
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    with composites.cp_lrp(model, epsilon=1e-12).context(model):
        logits = model(inputs_embeds=emb, attention_mask=mask, use_cache=False).logits
        logit = logits[row, -1, data.draw(st.integers(0, VOCAB - 1), label="target")]
        logit.backward(logit)
    total = emb.grad[row].sum().item()
    assert math.isfinite(total)
    assert math.isclose(total, logit.item(), rel_tol=1e-4, abs_tol=1e-10), (total, logit.item())
    assert (emb.grad[row][mask[row] == 0] == 0).all()


@settings(max_examples=25, **SETTINGS)
@given(case=bert_case(), method=METHODS, data=st.data())
def test_bert_round_trip_and_finite_relevance(case, method, data):
    cfg, dtype, ids, mask, seed = case
    model = build(BertForSequenceClassification, BertConfig, cfg, dtype, seed)
    row = data.draw(st.integers(0, ids.shape[0] - 1), label="row")
    label = data.draw(st.integers(0, cfg["num_labels"] - 1), label="label")
    grad = round_trip(model, method, text_kwargs(model, ids, mask), "inputs_embeds",
                      lambda out: out[row, label])
    others = [b for b in range(ids.shape[0]) if b != row]
    assert (grad[others] == 0).all()


@settings(max_examples=25, **SETTINGS)
@given(case=vit_case(), method=METHODS, data=st.data())
def test_vit_round_trip_and_finite_relevance(case, method, data):
    cfg, dtype, batch, seed = case
    model = build(ViTForImageClassification, ViTConfig, cfg, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, cfg["num_channels"], cfg["image_size"], cfg["image_size"],
                         generator=g).to(dtype)
    row = data.draw(st.integers(0, batch - 1), label="row")
    label = data.draw(st.integers(0, cfg["num_labels"] - 1), label="label")
    grad = round_trip(model, method, {"pixel_values": pixels}, "pixel_values",
                      lambda out: out[row, label])
    others = [b for b in range(batch) if b != row]
    assert (grad[others] == 0).all()
