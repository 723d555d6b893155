"""peft LoRA adapters: a model with unmerged adapters is explained exactly as the same model
with the adapters merged into its weights (both methods, both engines)."""
import copy

import pytest
import torch

import lxt
from models import tiny_llama, tiny_tokenizer
from helpers import assert_restored, snapshot

peft = pytest.importorskip("peft")

PROMPTS = ["the capital of france is", "red blue"]


@pytest.mark.parametrize("engine, epsilon", [("gradient", None), ("explicit", 1e-12)])
@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_lora_model_equals_its_merged_twin(method, engine, epsilon):
    """The explicit engine stabilises each linear layer's own output, so with the default
    epsilon the rank-4 bottleneck ``A x`` (small values) adds a difference of ~1e-3 of the
    relevance; with a negligible epsilon the two are equal there too."""
    base, tok = tiny_llama(), tiny_tokenizer()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)  # random B: the adapters change the output
    torch.manual_seed(3)
    lora = peft.get_peft_model(base, config).eval()
    merged = copy.deepcopy(lora).merge_and_unload().eval()
    with torch.no_grad():
        ids = tok(PROMPTS[0], return_tensors="pt").input_ids
        with lora.disable_adapter():
            plain = lora(input_ids=ids).logits
        assert (lora(input_ids=ids).logits - plain).abs().max() > 1e-3  # the adapters matter
    factory = getattr(lxt.composites, method)
    options = {"engine": engine} if epsilon is None else {"engine": engine, "epsilon": epsilon}
    snap = snapshot(lora)
    got = lxt.explain(lora, tok, PROMPTS, method=method.replace("_", "-"),
                      composite=factory(lora, **options))
    assert_restored(lora, snap)
    want = lxt.explain(merged, tok, PROMPTS, method=method.replace("_", "-"),
                       composite=factory(merged, **options))
    for g, w in zip(got, want):
        assert g.target == w.target and g.logit == pytest.approx(w.logit, abs=1e-5)
        torch.testing.assert_close(g.relevance, w.relevance, rtol=1e-4, atol=1e-6)
