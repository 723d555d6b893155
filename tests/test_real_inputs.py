"""Right answers on the models and inputs users bring (the list of silent wrong answers found
by trying lxt as a new user would; each test names its item)."""
import copy
import functools
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lxt
import lxt.functional as lf
import lxt.modules as lm
from lxt import Composite, composites, rules
from models import text_batch, tiny_llama, zero_biases
from test_composite import assert_restored, snapshot

D = torch.float64


def _llama_relevance(model, method="cp_lrp", engine="gradient", epsilon=1e-12, target=3):
    ids, mask = text_batch()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    with getattr(composites, method)(model, engine=engine, epsilon=epsilon).context(model):
        logit = model(inputs_embeds=emb, attention_mask=mask).logits[0, -1, target]
        logit.backward(logit)
    return emb.grad[0].sum(-1), logit.item()


# ---------------------------------------------------------------------- 1: models holding drop-ins
@pytest.mark.parametrize("engine", ["gradient", "explicit"])
def test_a_model_built_from_drop_ins_is_explained_as_the_drop_ins_say(engine):
    """A bias-free net of published-style drop-ins: inside a composite the relevance is the
    drop-ins' own (as without any composite), in either engine, and sums to the output."""
    torch.manual_seed(0)
    net = nn.Sequential(lm.LinearEpsilon(6, 8, bias=False), nn.ReLU(),
                        lm.LinearEpsilon(8, 1, bias=False)).to(D)
    x = torch.rand(3, 6, dtype=D)
    alone = x.clone().requires_grad_()
    y = net[2](lf.relu(net[0](alone)))
    y.backward(y)
    inside = x.clone().requires_grad_()
    with Composite({nn.ReLU: rules.IdentityRule}, engine=engine, strict=True).context(net):
        y2 = net(inside)
        y2.backward(y2)
    torch.testing.assert_close(inside.grad, alone.grad, rtol=1e-12, atol=1e-14)
    assert math.isclose(inside.grad.sum().item(), y.sum().item(), rel_tol=1e-4)  # eps 1e-6


@pytest.mark.parametrize("engine", ["gradient", "explicit"])
def test_a_drop_in_lm_head_changes_nothing(engine):
    model = zero_biases(tiny_llama("sdpa", D))
    swapped = copy.deepcopy(model)
    swapped.lm_head = lm.LinearEpsilon.from_module(swapped.lm_head, epsilon=1e-12)
    rel, logit = _llama_relevance(model, engine=engine)
    rel2, logit2 = _llama_relevance(swapped, engine=engine)
    torch.testing.assert_close(rel2, rel, rtol=1e-9, atol=1e-12)
    assert math.isclose(rel2.sum().item(), logit2, rel_tol=1e-6)  # CP-LRP conserves


# ---------------------------------------------------------------------- 2: no cache by address
def test_attention_masks_are_read_every_call_never_recognised_by_address():
    """Masks made and freed in turn (the allocator hands out the same blocks): each call
    attends as its own mask says."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    padded = causal.clone()
    padded[1, :, :, :2] = False  # left padding in the second row
    padded[1, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # (padded queries see themselves)
    # one buffer, new contents written behind torch's back (as a reused block has): same
    # address, same version counter, other values
    buffer = torch.zeros(2, 1, 6, 6, dtype=torch.bool).numpy()
    mask = torch.from_numpy(buffer)
    for i in range(6):
        buffer[...] = (causal if i % 2 == 0 else padded).numpy()
        for fn in (lf.sdpa, lf.sdpa_cp):
            torch.testing.assert_close(fn(q, k, v, attn_mask=mask),
                                       F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                       rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- 6: epsilon of a table
@pytest.mark.parametrize("epsilon", [1e-2, 1e-1])
@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_a_large_table_epsilon_means_the_same_in_both_engines(epsilon, method):
    """``epsilon=`` on a table is the stabiliser of its epsilon-family rules; the gradient
    engine's conversions stay exact (their stabiliser never exceeds the default), so both
    engines give the same relevance (to the default stabiliser's 1e-6 in the conversions)."""
    model = tiny_llama("sdpa", D)
    grad, _ = _llama_relevance(model, method, "gradient", epsilon)
    explicit, _ = _llama_relevance(model, method, "explicit", epsilon)
    scale = explicit.abs().max().item()
    torch.testing.assert_close(grad, explicit, rtol=0, atol=1e-3 * scale)
    assert math.isclose(grad.sum().item(), explicit.sum().item(), rel_tol=1e-3)
    # and the epsilon does what it says: relevance shrinks as it grows
    small, _ = _llama_relevance(model, method, "gradient", 1e-12)
    assert explicit.abs().sum() < small.abs().sum()


# ---------------------------------------------------------------------- 7: in-place flags
class _InplaceRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)

    def forward(self, x):
        h = self.a(x)
        F.relu(h, inplace=True)  # h itself is rectified
        return self.b(h) + h


@pytest.mark.parametrize("engine", ["gradient", "explicit"])
def test_an_inplace_flag_keeps_its_semantics(engine):
    torch.manual_seed(0)
    model = _InplaceRelu().to(D).eval()
    x = torch.randn(5, 4, dtype=D)
    ref = model(x)
    table = {nn.Linear: rules.EpsilonRule(epsilon=1e-12), F.relu: lf.relu,
             operator.add: functools.partial(lf.add2, epsilon=1e-12)}
    with Composite(table, engine=engine, epsilon=1e-12, strict=True).context(model):
        xx = x.clone().requires_grad_()
        y = model(xx)
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
        y.backward(y)
    wa, wb = model.a.weight.detach(), model.b.weight.detach()
    h = torch.relu(x @ wa.T)
    out = h @ wb.T + h
    share = y.detach() / out  # epsilon rule on the sum, R = y
    r_h = h * share + h * ((share) @ wb)  # both summands; b by epsilon
    r_z = r_h  # identity on the rectifier
    expected = x * ((r_z / (x @ wa.T)) @ wa)
    torch.testing.assert_close(xx.grad, expected, rtol=1e-7, atol=1e-9 * expected.abs().max().item())


# ---------------------------------------------------------------------- 13: a rule means one thing
def test_cp_lrp_attention_rule_detaches_queries_and_keys_wherever_it_is_used():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=D, requires_grad=True) for _ in range(3))
    y = rules.CPLRPAttentionRule()(F.scaled_dot_product_attention)(q, k, v, is_causal=True)
    y.backward(y.detach())
    assert q.grad is None and k.grad is None
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    y2 = lf.sdpa_cp(q2, k2, v2, is_causal=True)
    y2.backward(y2.detach())
    torch.testing.assert_close(v.grad, v2.grad, rtol=0, atol=0)
    # as a table entry, in a model: the same as the shipped CP-LRP table
    model = tiny_llama("sdpa", D)
    table = dict(composites.llama.layer_map(cp=True, epsilon=1e-12))
    table[F.scaled_dot_product_attention] = rules.CPLRPAttentionRule(epsilon=1e-12)
    ids, mask = text_batch()
    rels = []
    for comp in (Composite(table, method="cp-lrp", epsilon=1e-12), composites.cp_lrp(model, epsilon=1e-12)):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        with comp.context(model):
            logit = model(inputs_embeds=emb, attention_mask=mask).logits[0, -1, 3]
            logit.backward(logit)
        rels.append(emb.grad)
    torch.testing.assert_close(rels[0], rels[1], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------- 3, 4: batch = single
_HEADS = {  # model_type -> (language-model class, classifier class, attention)
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification", "sdpa"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification", "sdpa"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeForSequenceClassification", "sdpa"),
    "mixtral": ("MixtralForCausalLM", "MixtralForSequenceClassification", "sdpa"),
    "phi3": ("Phi3ForCausalLM", "Phi3ForSequenceClassification", "sdpa"),
    "gemma": ("GemmaForCausalLM", "GemmaForSequenceClassification", "sdpa"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification", "eager"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification", "sdpa"),
    "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification", "sdpa"),
    "bert": ("BertForMaskedLM", "BertForSequenceClassification", "sdpa"),
    "roberta": ("RobertaForMaskedLM", "RobertaForSequenceClassification", "sdpa"),
    "distilbert": ("DistilBertForMaskedLM", "DistilBertForSequenceClassification", "sdpa"),
}
_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
_BERT_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=101, max_position_embeddings=64, pad_token_id=0)


def _head(model_type, which):
    import transformers as tr
    from models import FAMILY_CONFIGS, tiny_family

    lm_name, cls_name, attn = _HEADS[model_type]
    cls = getattr(tr, cls_name if which == "classifier" else lm_name, None)
    if cls is None:
        pytest.skip(f"transformers {tr.__version__} has no {cls_name}")
    extra = {"num_labels": 3}
    # transformers' eager Gemma 2 attention is NaN in float64 with left padding (without lxt)
    dtype = torch.float32 if attn == "eager" else D
    if model_type in FAMILY_CONFIGS:
        return tiny_family(model_type, cls, attn=attn, dtype=dtype, initializer_range=0.2,
                           **(extra if which == "classifier" else {}))
    cfg = tr.AutoConfig.for_model(model_type, **(_LLAMA_LIKE if model_type == "llama" else _BERT_LIKE),
                                  **(extra if which == "classifier" else {}))
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return cls(cfg).to(D).eval()


@pytest.mark.parametrize("which", ["language model", "classifier"])
@pytest.mark.parametrize("model_type", sorted(_HEADS))
def test_a_batch_of_prompts_of_different_lengths_equals_each_prompt_alone(model_type, which):
    """Every shipped family, its LM head (next token; the mask token of a masked LM) and its
    sequence-classification head: explained in one padded batch, each prompt gets what it gets
    alone (left padding with the positions it has alone for decoders and decoder classifiers,
    right padding for encoders), whatever padding side the tokenizer came with."""
    from models import tiny_tokenizer

    model = _head(model_type, which)
    masked = which == "language model" and model_type in ("bert", "roberta", "distilbert")
    prompts = ["red blue", "the capital of france is", "a cat sat on the mat and the dog"]
    if masked:
        prompts = [p + " [MASK]" for p in prompts]
    tok = tiny_tokenizer()
    for side in ("left", "right"):
        tok.padding_side = side
        batch = lxt.explain(model, tok, prompts, batch_size=8)
        tol = 1e-5 if next(model.parameters()).dtype == torch.float32 else 1e-9
        for prompt, b in zip(prompts, batch):
            alone = lxt.explain(model, tok, prompt)
            assert b.tokens == alone.tokens and b.target_id == alone.target_id, (side, prompt)
            assert math.isclose(b.logit, alone.logit, rel_tol=tol, abs_tol=tol), (side, prompt)
            torch.testing.assert_close(b.relevance, alone.relevance, rtol=100 * tol,
                                       atol=tol * alone.relevance.abs().max().item())
        assert tok.padding_side == side  # the tokenizer's own setting is left as it was
