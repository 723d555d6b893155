"""Calls rewritten while the model runs (lxt.core.dispatch): nothing captured, nothing kept
between explain calls, every change of the model seen, nothing partial without asking."""
import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import MistralConfig, MistralForCausalLM

import lxt
from lxt import composites
from models import text_batch, tiny_llama, tiny_tokenizer
from helpers import assert_restored, snapshot

D = torch.float64


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _relevance(model, ids, mask, method="attnlrp", engine="gradient", target=7):
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    comp = getattr(composites, method.replace("-", "_"))(model, engine=engine)
    with comp.context(model):
        logit = model(inputs_embeds=emb, attention_mask=mask, use_cache=False).logits[:, -1, target]
        logit.backward(logit.detach())
    return emb.grad.sum(-1)


# ---------------------------------------------------------------------- what is touched
@pytest.mark.parametrize("engine", ["gradient", "explicit"])
def test_gradient_engine_leaves_layers_whose_rule_is_their_gradient_as_they_are(engine):
    model = tiny_llama("sdpa", D)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    comp = composites.attnlrp(model, engine=engine)
    with comp.context(model):
        now = dict(model.named_modules())
        same = [n for n, m in linears.items() if now.get(n) is m]
        summary = comp.summary()
    if engine == "gradient":  # epsilon on linear layers is their plain gradient: no wrapper
        assert same == list(linears)
    else:
        assert same == []
    # the summary names them with their rule either way
    assert sum(1 for _, typ, rule in summary.modules if typ == "Linear" and rule == "EpsilonRule") == len(linears)


# ---------------------------------------------------------------------- custom autograd Functions
class _OwnBackward(torch.autograd.Function):
    """SiLU with a backward of its own (like transformers' GeLUFunction)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s + x * s * (1 - s))


class _FunctionAct(nn.Module):
    def forward(self, x):
        return _OwnBackward.apply(x)


def _with_function_act(model):
    for layer in model.model.layers:
        layer.mlp.act_fn = _FunctionAct()
    return model


def test_custom_autograd_function_on_the_relevance_path_is_named_warned_and_refused_when_strict():
    model = _with_function_act(tiny_llama("sdpa", D))
    ids, mask = text_batch()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    comp = composites.attnlrp(model)
    with comp.context(model):
        with pytest.warns(UserWarning, match=r"no LRP rule.*autograd.Function .*_OwnBackward in "
                                             r"model\.layers\.\*\.mlp\.act_fn \(2 modules\)"):
            model(inputs_embeds=emb, attention_mask=mask).logits.sum().backward()
        unsafe = comp.summary().unsafe
    assert {r.op for r in unsafe} == {"autograd.Function test_dispatch._OwnBackward"}
    strict = composites.attnlrp(model, strict=True)
    with strict.context(model):
        with pytest.raises(ValueError, match=r"strict .*autograd.Function .*_OwnBackward"):
            model(inputs_embeds=emb, attention_mask=mask)
    # the Function's own forward (x * sigmoid(x)) ran with grad disabled: not on the path
    assert not any(r.op in ("mul", "sigmoid") and r.module.endswith("act_fn") and r.on_path
                   for r in comp.captured_ops)


def test_explain_refuses_a_partial_result_unless_asked(tok):
    model = _with_function_act(tiny_llama("sdpa", torch.float32))
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"lxt: attnlrp would be partial: .*_OwnBackward.*partial=True"):
            lxt.explain(model, tok, "the capital of france is")
        assert_restored(model, snap)
        exp = lxt.explain(model, tok, "the capital of france is", partial=True)
        assert "_OwnBackward" in exp.partial and "PARTIAL" in repr(exp)
        assert exp.to_dict()["partial"] == exp.partial
        # a strict composite refuses whatever partial says
        with pytest.raises(ValueError, match="strict"):
            lxt.explain(model, tok, "the capital of france is", partial=True,
                        composite=composites.attnlrp(model, strict=True))
    assert_restored(model, snap)
    full = lxt.explain(tiny_llama("sdpa", torch.float32), tok, "the capital of france is")
    assert full.partial is None


# ---------------------------------------------------------------------- calls without a context
def test_explain_calls_without_a_context_leave_nothing_and_equal_a_registered_call(tok):
    model = tiny_llama("sdpa", torch.float32)
    snap = snapshot(model)
    prompts = ["the capital of france is", "a cat sat on the mat and", "red"]
    alone = [lxt.explain(model, tok, p) for p in prompts]
    assert_restored(model, snap)
    comp = composites.attnlrp(model)
    with comp.context(model):
        inside = [lxt.explain(model, tok, p, composite=comp) for p in prompts]
    for a, b in zip(alone, inside):
        torch.testing.assert_close(a.relevance, b.relevance, rtol=0, atol=0)
    assert_restored(model, snap)


def _fresh_like(model, **config):
    """A new model of the same class, config (with ``config`` changes) and weights."""
    cfg = copy.deepcopy(model.config)
    for k, v in config.items():
        setattr(cfg, k, v)
    fresh = type(model)(cfg).to(next(model.parameters()).dtype).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh


def _explained(model, tok, prompts=("the capital of france is", "a cat sat")):
    return [e.relevance for e in lxt.explain(model, tok, list(prompts))]


def _same(a, b, rtol=1e-6):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * y.abs().max().item())


def test_a_module_replaced_between_calls_is_explained_as_the_new_model(tok):
    model = tiny_llama("sdpa", torch.float32)
    before = _explained(model, tok)
    other = tiny_llama("sdpa", torch.float32, seed=3)
    model.model.layers[1].mlp = other.model.layers[1].mlp  # new weights in one block
    after = _explained(model, tok)
    _same(after, _explained(_fresh_like(model), tok))
    assert not torch.allclose(before[0], after[0])


def test_a_new_attention_implementation_between_calls_is_explained_as_such(tok):
    model = tiny_llama("sdpa", torch.float32)
    sdpa = _explained(model, tok)
    model.set_attn_implementation("eager")
    eager = _explained(model, tok)
    _same(eager, _explained(_fresh_like(model, _attn_implementation="eager"), tok))
    _same(eager, sdpa, rtol=1e-4)  # the same attention, computed another way
    assert model.config._attn_implementation == "eager"


def test_a_dtype_change_between_calls_is_explained_in_the_new_dtype(tok):
    model = tiny_llama("sdpa", torch.float32)
    single = lxt.explain(model, tok, "the capital of france is")
    model.to(torch.float64)
    double = lxt.explain(model, tok, "the capital of france is")
    fresh = lxt.explain(_fresh_like(model), tok, "the capital of france is")
    torch.testing.assert_close(double.relevance, fresh.relevance, rtol=0, atol=0)
    torch.testing.assert_close(double.relevance, single.relevance, rtol=1e-4, atol=1e-6)


def test_a_config_change_between_calls_is_explained_as_the_new_model(tok):
    torch.manual_seed(0)
    cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                        max_position_embeddings=64, sliding_window=None, attn_implementation="sdpa")
    model = MistralForCausalLM(cfg).eval()
    full = _explained(model, tok, ["a cat sat on the mat and the dog ran in the park"])
    model.config.sliding_window = 3  # read by the mask at every forward
    windowed = _explained(model, tok, ["a cat sat on the mat and the dog ran in the park"])
    _same(windowed, _explained(_fresh_like(model), tok, ["a cat sat on the mat and the dog ran in the park"]))
    assert not torch.allclose(full[0], windowed[0])


# ---------------------------------------------------------------------- compiled parts
def test_a_compiled_submodule_is_explained_as_its_original_and_given_back(tok):
    model = tiny_llama("sdpa", torch.float32)
    ref = lxt.explain(model, tok, "the capital of france is")
    compiled = torch.compile(model.model.layers[0], backend="aot_eager")
    model.model.layers[0] = compiled
    snap = snapshot(model)
    exp = lxt.explain(model, tok, "the capital of france is")
    assert_restored(model, snap)
    assert model.model.layers[0] is compiled
    torch.testing.assert_close(exp.relevance, ref.relevance, rtol=0, atol=0)
    assert exp.partial is None


def test_register_runs_no_forward_and_visits_each_module_once():
    """Registering does not trace: per module, a table lookup and two hooks (timed against
    depth in ``lxt bench speed``)."""
    model = tiny_llama("sdpa", torch.float32, layers=30)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    comp = composites.attnlrp(model)
    with comp.context(model):
        assert calls == [] and comp.summary().calls == 0
        assert len(comp._dispatcher.infos) == len(list(model.modules()))
