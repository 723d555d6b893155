"""bitsandbytes 4-bit and 8-bit layers (CPU backend): explained with the full rules, equal to
the same model with de-quantised float weights."""
import logging
import warnings

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import lxt
from lxt import composites
from models import text_batch, tiny_tokenizer
from helpers import assert_restored, snapshot

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama whose layer sizes fit bitsandbytes' CPU kernels (multiples of 64)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                      max_position_embeddings=64, tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("tiny-llama-64")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def load(saved, kind):
    if kind == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(saved, quantization_config=qc, device_map="cpu",
                                                 dtype=torch.float32)
    return model.eval()


def dequantised_twin(saved, quantised):
    """The same model in float32 with every quantised weight replaced by its de-quantised
    value (bitsandbytes' own de-quantisation)."""
    twin = LlamaForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    layers = dict(twin.named_modules())
    n = 0
    with torch.no_grad():
        for name, m in quantised.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            elif isinstance(m, bnb.nn.Linear8bitLt):
                cb = m.weight.CB if m.weight.CB is not None else m.state.CB
                scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
                w = cb.float() * (scb.float()[:, None] / 127)
            else:
                continue
            layers[name].weight.copy_(w.float())
            n += 1
    assert n == 14  # q, k, v, o, gate, up, down in two layers (lm_head stays float)
    return twin


def relevance(model, method, engine="gradient"):
    ids, mask = text_batch(batch=2, seq=7)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    comp = getattr(composites, method)(model, engine=engine)
    with comp.context(model), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        logit = model(inputs_embeds=emb, attention_mask=mask, use_cache=False).logits[:, -1, 5]
        logit.backward(logit.detach())
        summary = comp.summary()
    assert summary.unsafe == [] and summary.failure is None
    assert not [str(w.message) for w in seen if str(w.message).startswith("lxt")]
    return emb.grad.sum(-1)


@pytest.mark.parametrize("kind,engine", [("nf4", "gradient"), ("nf4", "explicit"), ("fp4", "gradient")])
@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_4bit_relevance_equals_the_dequantised_twin(saved, kind, engine, method):
    model = load(saved, kind)
    snap = snapshot(model)
    rel = relevance(model, method, engine)
    assert_restored(model, snap)
    expected = relevance(dequantised_twin(saved, model), method, engine)
    assert rel.abs().sum() > 0
    torch.testing.assert_close(rel, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_8bit_relevance_is_close_to_the_dequantised_twin(saved, method):
    """Linear8bitLt in eval mode also quantises its inputs (int8 rows, float16 scales), so the
    forward itself differs from the de-quantised twin's by about 1e-3 of the logits; the
    relevance follows it that closely (measured: 2.7e-3 of the largest token relevance,
    per-token correlation 0.999998; asserted: 1e-2 and 0.9999)."""
    model = load(saved, "int8")
    rel = relevance(model, method)
    expected = relevance(dequantised_twin(saved, model), method)
    scale = expected.abs().max().item()
    assert (rel - expected).abs().max().item() < 1e-2 * scale
    r = torch.corrcoef(torch.stack([rel.flatten(), expected.flatten()]))[0, 1].item()
    assert r > 0.9999


def test_4bit_generate_while_explaining_keeps_the_backward(saved):
    """Generating runs forwards without gradients, after which bitsandbytes would repack a
    4-bit layer for a kernel with no backward: while lxt holds the model it does not."""
    model = load(saved, "nf4")
    tok = tiny_tokenizer()
    snap = snapshot(model)
    exps = lxt.explain(model, tok, PROMPT, generate=3)
    assert_restored(model, snap)
    twin = lxt.explain(dequantised_twin(saved, model), tok, PROMPT, generate=3)
    assert [e.target_id for e in exps] == [e.target_id for e in twin]
    for a, b in zip(exps, twin):
        torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-5, atol=1e-6 * b.relevance.abs().max().item())


@pytest.mark.parametrize("method", ["attnlrp", "input_x_gradient"])
def test_4bit_model_repacked_before_is_refused_with_the_fix(saved, method):
    model = load(saved, "nf4")
    tok = tiny_tokenizer()
    with torch.no_grad():
        model(**tok(PROMPT, return_tensors="pt"))  # outside lxt: bitsandbytes repacks here
    # (no snapshot: bitsandbytes' state_dict() undoes the repacking, lossily)
    flags = [m.__dict__.get("support_avx512bf16_for_cpu") for m in model.modules()]
    with pytest.raises(RuntimeError, match=r"lxt: the 4-bit layer '.*' .*repacked by bitsandbytes.*Reload"):
        lxt.explain(model, tok, PROMPT, method=method)
    assert [m.__dict__.get("support_avx512bf16_for_cpu") for m in model.modules()] == flags
    assert not any(type(m).__module__.startswith("lxt") for m in model.modules())
    assert "forward" not in model.__dict__
