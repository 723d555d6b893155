"""Every family a table names, and the structural fallback, on stock transformers classes.

For each family (tiny random float64 configs): ``lxt.composites.attnlrp`` / ``cp_lrp`` picks
the family's table (no structural notice), the forward is unchanged, no operation on the
relevance path is left without a rule, the relevance equals the independent gradient
formulation of test_reference_formulation.py (extended there for Gemma's ``1 + w`` RMSNorm,
Phi-3's fused MLP, MoE experts and routers), the model is restored exactly, and CP-LRP with
biases (and learned position embeddings) zeroed conserves the explained logit.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers as tr

import lxt
import lxt.composites
from models import FAMILY_CONFIGS, text_batch, tiny_family, zero_biases, zero_position_embeddings
from helpers import assert_restored, snapshot
from reference import _targets, assert_relevance_close, lxt_relevance, reference_model, reference_relevance

pytestmark = pytest.mark.usefixtures("reference_attention")  # the reference's attention functions

EPS = 1e-12
D = torch.float64

#: model_type -> (stock class, attention implementations to check, how to feed it)
FAMILIES = {
    "qwen3": (tr.Qwen3ForCausalLM, ("sdpa",), "text"),
    "smollm3": (tr.SmolLM3ForCausalLM, ("sdpa",), "text"),
    "qwen3_moe": (tr.Qwen3MoeForCausalLM, ("sdpa",), "text"),
    "mixtral": (tr.MixtralForCausalLM, ("sdpa",), "text"),
    "phi3": (tr.Phi3ForCausalLM, ("sdpa",), "text"),
    "gemma": (tr.GemmaForCausalLM, ("sdpa",), "text"),
    # transformers has no sdpa Gemma 2; its soft-capping (tanh) is tested below
    "gemma2": (tr.Gemma2ForCausalLM, ("eager",), "text"),
    "gemma3_text": (tr.Gemma3ForCausalLM, ("sdpa",), "text"),
    "gpt2": (tr.GPT2LMHeadModel, ("sdpa",), "text"),
    "roberta": (tr.RobertaForMaskedLM, ("sdpa",), "text"),
    "distilbert": (tr.DistilBertForMaskedLM, ("sdpa",), "text"),
    "deit": (tr.DeiTForImageClassification, ("sdpa",), "image"),
}
#: (model_type, attention, method): both methods on each family's main attention; eager
#: attention (AttnLRP: the matmul / softmax rules) on the decoders that have both
CASES = [(mt, attns[0], method) for mt, (_, attns, _) in FAMILIES.items()
         for method in ("attnlrp", "cp_lrp")]
CASES += [(mt, "eager", "attnlrp") for mt in ("qwen3", "gemma3_text", "gpt2")]


def _model(model_type, attn, cls=None, cp=False):
    default, _, _ = FAMILIES[model_type]
    kw = {}
    if model_type == "gemma2":  # the reference differentiates tanh; see the soft-capping test
        kw = dict(attn_logit_softcapping=None, final_logit_softcapping=None)
    model = tiny_family(model_type, cls or default, attn=attn, dtype=D, initializer_range=0.2, **kw)
    if cp:  # conservation: no biases, no learned position embeddings
        zero_position_embeddings(zero_biases(model))
    return model


def _inputs(model, kind, attn):
    if kind == "image":
        g = torch.Generator().manual_seed(1)
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g, dtype=D)}
    # HF eager attention in float64 turns fully masked pad rows into NaN (see
    # test_reference_formulation): padding on the sdpa cases only
    ids, mask = text_batch(pad_first=2 if attn == "sdpa" else 0)
    return {"inputs_embeds": model.get_input_embeddings()(ids).detach(), "attention_mask": mask}


def _factory(method, engine, model_type):
    table = getattr(lxt.composites, method)
    kw = {"conv_gamma": 0.0, "mlp_gamma": 0.0} if model_type == "deit" else {}  # gamma: no gradient form

    def factory(model, epsilon):
        return table(model, epsilon=epsilon, engine=engine, **kw)

    return factory


def check_family(model, inputs, method, engine, model_type, rtol=1e-6, atol_frac=1e-6):
    """Forward, coverage, reference, restore (and conservation for CP-LRP); returns the worst
    ``max|err| / max|R|``."""
    cp = method == "cp_lrp"
    ref = reference_model(model, cp=cp)
    with torch.no_grad():
        stock = model(**inputs).logits
    targets = _targets(stock)
    snap = snapshot(model)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        comp = _factory(method, engine, model_type)(model, epsilon=EPS)
        # the family's own table (a VLM's: "[gemma3: gemma3_text + siglip_vision_model]")
        assert comp.name.endswith(f"[{model_type}]") or f"[{model_type}: " in comp.name, comp.name
        results = []
        with comp.context(model):
            for t in targets:
                results.append(lxt_relevance(comp, model, t, **dict(inputs)))
            summary = comp.summary()
    assert not [str(w.message) for w in seen if str(w.message).startswith("lxt")]
    assert summary.failure is None and summary.calls >= 1
    assert summary.unsafe == [], summary
    assert_restored(model, snap)
    worst = 0.0
    for t, (rel, out) in zip(targets, results):
        torch.testing.assert_close(out, stock, rtol=1e-12, atol=1e-12)  # forward unchanged
        expected, _ = reference_relevance(ref, t, **dict(inputs))
        worst = max(worst, assert_relevance_close(rel, expected, rtol=rtol, atol_frac=atol_frac))
        if cp:  # sum of relevance = the explained logit, per sample
            logit = (out[:, -1] if out.dim() == 3 else out)[torch.arange(out.shape[0]), t]
            flat = rel.flatten(1)
            # (HF's RMSNorms round to float32: 1e-6 of the relevance's scale)
            for s, l, r in zip(flat.sum(-1).tolist(), logit.tolist(), flat.abs().sum(-1).tolist()):
                assert math.isclose(s, l, rel_tol=1e-6, abs_tol=1e-6 * r), (s, l)
    return worst


@pytest.mark.parametrize("model_type,attn,method", CASES)
def test_family_matches_reference(model_type, attn, method):
    _, _, kind = FAMILIES[model_type]
    model = _model(model_type, attn, cp=method == "cp_lrp")
    inputs = _inputs(model, kind, attn)
    worst = check_family(model, inputs, method, "gradient", model_type)
    print(f"{model_type} {attn} {method}: max|err|/max|R| {worst:.2e}")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gemma"])
def test_family_explicit_engine_matches_reference(model_type):
    """The explicit engine on the families with new module rules (MoE experts; the Gemma norm
    under the identity rule; GPT-2's Conv1D is the generic epsilon rule on a module, as the
    torchvision table's layers)."""
    _, _, kind = FAMILIES[model_type]
    model = _model(model_type, "sdpa")
    check_family(model, _inputs(model, kind, "sdpa"), "attnlrp", "explicit", model_type)


#: the other heads of each family: the same table, covered end to end
HEADS = [
    # (the decoders' sequence-classification heads are transformers' one generic class, tested
    # with Llama in test_reference_formulation.py; GPT-2 has its own)
    ("gpt2", tr.GPT2ForSequenceClassification),
    ("roberta", tr.RobertaForSequenceClassification),
    ("distilbert", tr.DistilBertForSequenceClassification),
    ("deit", tr.DeiTForImageClassificationWithTeacher),
]


@pytest.mark.parametrize("model_type,cls", HEADS, ids=[c.__name__ for _, c in HEADS])
def test_family_heads(model_type, cls):
    _, _, kind = FAMILIES[model_type]
    extra = {"num_labels": 3, "pad_token_id": 0} if kind == "text" else {}
    model = tiny_family(model_type, cls, dtype=D, initializer_range=0.2, **extra)
    inputs = _inputs(model, kind, "sdpa")
    check_family(model, inputs, "attnlrp", "gradient", model_type)


def test_gemma2_soft_capping_is_covered_and_conserves():
    """Attention and final-logit soft-capping (``c * tanh(x / c)``): a constant scale and the
    identity rule on tanh, so CP-LRP still conserves."""
    model = zero_biases(tiny_family("gemma2", tr.Gemma2ForCausalLM, attn="eager", dtype=D,
                                    initializer_range=0.2))
    assert model.config.attn_logit_softcapping and model.config.final_logit_softcapping
    ids, _ = text_batch(pad_first=0)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    with torch.no_grad():
        stock = model(inputs_embeds=emb).logits
    comp = lxt.composites.cp_lrp(model, epsilon=EPS, strict=True)
    with comp.context(model):
        logits = model(inputs_embeds=emb).logits
        logit = logits[0, -1].max()
        logit.backward(logit)
        ops = {(r.op, r.status) for r in comp.captured_ops if r.rewritten}
    torch.testing.assert_close(logits.detach(), stock, rtol=1e-12, atol=1e-12)
    assert ("tanh", "tanh") in ops
    assert math.isclose(emb.grad[0].sum().item(), logit.item(), rel_tol=1e-6)


# ---------------------------------------------------------------------- structural fallback
#: families no table names, explained by the structural table (RMSNorm with q / k norms,
#: embedding and residual multipliers, LayerNorm with GELU-tanh)
STRUCTURAL = {
    "olmo2": tr.Olmo2ForCausalLM,
    "granite": tr.GraniteForCausalLM,
    "starcoder2": tr.Starcoder2ForCausalLM,
}


def _structural_model(model_type, cp):
    from transformers import AutoConfig

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                               max_position_embeddings=64, initializer_range=0.2)
    cfg._attn_implementation = "sdpa"
    model = STRUCTURAL[model_type](cfg).to(D).eval()
    return zero_biases(model) if cp else model


@pytest.mark.parametrize("model_type,method", [("olmo2", "attnlrp"), ("olmo2", "cp_lrp"),
                                               ("granite", "attnlrp"), ("starcoder2", "cp_lrp")])
def test_structural_fallback_explains_families_no_table_names(model_type, method):
    assert model_type not in lxt.composites.FAMILIES
    model = _structural_model(model_type, method == "cp_lrp")
    ids, mask = text_batch()
    inputs = {"inputs_embeds": model.get_input_embeddings()(ids).detach(), "attention_mask": mask}
    # the structural table cannot tell a gate from the value it gates: uniform on gated
    # products in both methods
    ref = reference_model(model, cp=method == "cp_lrp", cp_mlp=False)
    with torch.no_grad():
        stock = model(**inputs).logits
    snap = snapshot(model)
    with pytest.warns(UserWarning, match=f"no table for model_type '{model_type}'; using the structural table"):
        comp = getattr(lxt.composites, method)(model, epsilon=EPS)
    assert comp.strict
    target = _targets(stock, n_other=0)[0]
    with comp.context(model):
        rel, out = lxt_relevance(comp, model, target, **dict(inputs))
        assert comp.summary().unsafe == []
    assert_restored(model, snap)
    torch.testing.assert_close(out, stock, rtol=1e-12, atol=1e-12)
    expected, _ = reference_relevance(ref, target, **dict(inputs))
    assert_relevance_close(rel, expected, rtol=1e-6, atol_frac=1e-6)
    if method == "cp_lrp":
        logit = out[:, -1][torch.arange(2), target]
        torch.testing.assert_close(rel.sum(-1), logit, rtol=1e-6, atol=1e-9)


def test_structural_fallback_refuses_what_it_cannot_cover():
    """Qwen2-MoE gates its shared expert with a sigmoid (a product with a nonlinearity of the
    input, which no structural rule knows): refused at the first forward, naming the operation
    and its modules; the model is left as it was."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2_moe", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                               shared_expert_intermediate_size=32)
    cfg._experts_implementation = "eager"
    model = tr.Qwen2MoeForCausalLM(cfg).eval()
    snap = snapshot(model)
    ids, _ = text_batch()
    with pytest.warns(UserWarning, match="structural"):
        comp = lxt.composites.attnlrp(model)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    with pytest.raises(ValueError, match=r"no LRP rule: sigmoid in model\.layers\.\*\.mlp \(2 modules\)"):
        with comp.context(model):
            model(inputs_embeds=emb)
    assert_restored(model, snap)


def test_structural_table_recognises_rms_norms_by_behaviour():
    """A module named like an RMSNorm gets the identity rule only if it maps one tensor to a
    rescaling of it (scale-invariant); one that is not (a bias) is left to the graph, where
    its operations are refused."""
    from lxt.composites.structural import _is_rms_like
    from torch import nn

    class FakeRMSNorm(nn.Module):  # named like one, but adds a bias: not scale-invariant
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight + 1.0

    assert _is_rms_like(nn.RMSNorm(8))
    assert _is_rms_like(tr.models.gemma.modeling_gemma.GemmaRMSNorm(8))
    assert not _is_rms_like(FakeRMSNorm())
    assert not _is_rms_like(nn.LayerNorm(8))


def test_gemma3_multimodal_class_on_text():
    """Gemma3ForConditionalGeneration (model_type gemma3, a SigLIP tower beside the language
    model) gets the Gemma 3 table; on text it matches the reference like gemma3_text."""
    torch.manual_seed(0)
    text = dict(FAMILY_CONFIGS["gemma3_text"], initializer_range=0.2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=4)
    cfg = tr.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=100, boi_token_index=98, eoi_token_index=99)
    cfg._attn_implementation = "sdpa"
    model = tr.Gemma3ForConditionalGeneration(cfg).to(D).eval()
    assert model.config.model_type == "gemma3"
    check_family(model, _inputs(model, "text", "sdpa"), "cp_lrp", "gradient", "gemma3")
