"""The Composite on stock transformers models: round trip, relevance through every layer,
overrides, errors, trace once."""
import copy
import gc
import math
import operator
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import lxt
import lxt.composites as composites
import lxt.functional as lf
from lxt import Composite, rules
from lxt.rules import RuleModule
from models import text_batch, tiny_bert, tiny_llama, tiny_vit, zero_biases

D = torch.float64


def snapshot(model):
    """Everything register may touch."""
    return {
        "modules": [(n, m) for n, m in model.named_modules()],
        "forward_in_dict": "forward" in model.__dict__,
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "dicts": {n: sorted(m.__dict__) for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()},
    }


def assert_restored(model, snap):
    now = snapshot(model)
    assert [n for n, _ in now["modules"]] == [n for n, _ in snap["modules"]]
    for (n, a), (_, b) in zip(now["modules"], snap["modules"]):
        assert a is b, f"module {n} is not the original object"
    assert now["forward_in_dict"] == snap["forward_in_dict"]
    assert now["requires_grad"] == snap["requires_grad"]
    assert now["state"].keys() == snap["state"].keys()
    for k in snap["state"]:
        assert torch.equal(now["state"][k], snap["state"][k]), k
    assert now["dicts"] == snap["dicts"], "an attribute was left on a module"
    assert now["hooks"] == snap["hooks"]
    for m in model.modules():
        assert not type(m).__module__.startswith("lxt"), f"lxt module left: {type(m)}"


def run_text(model, emb, mask, **kw):
    return model(inputs_embeds=emb, attention_mask=mask, **kw).logits


CASES = {
    "llama-sdpa": lambda: tiny_llama("sdpa", D),
    "llama-eager": lambda: tiny_llama("eager", torch.float32),  # HF eager Llama is NaN in float64 with padding
    "bert-sdpa": lambda: tiny_bert("sdpa", D),
    "bert-eager": lambda: tiny_bert("eager", D),
    "vit-sdpa": lambda: tiny_vit("sdpa", D),
    "vit-eager": lambda: tiny_vit("eager", D),
}


def inputs_for(name, model):
    if name.startswith("vit"):
        x = torch.randn(2, 3, 16, 16, dtype=next(model.parameters()).dtype)
        return {"pixel_values": x}, "pixel_values"
    ids, mask = text_batch()
    emb = model.get_input_embeddings()(ids).detach()
    return {"inputs_embeds": emb, "attention_mask": mask}, "inputs_embeds"


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_round_trip_exact(name, method):
    model = CASES[name]()
    kwargs, key = inputs_for(name, model)
    ref = model(**kwargs).logits
    snap = snapshot(model)
    comp = getattr(composites, method)(model)
    assert comp.register(model) is model
    x = kwargs[key].clone().requires_grad_()
    out = model(**{**kwargs, key: x}).logits
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # same forward
    out[..., 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert any(isinstance(m, lxt.core.opaque.LxtModule) for m in model.modules())
    comp.remove()
    assert_restored(model, snap)
    torch.testing.assert_close(model(**kwargs).logits, ref, rtol=0, atol=0)
    comp.remove()  # twice is harmless
    assert_restored(model, snap)


def test_context_restores_when_body_raises_and_on_keyboard_interrupt():
    model = tiny_llama("sdpa", D)
    snap = snapshot(model)
    comp = composites.attnlrp(model)
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with comp.context(model) as m:
                assert m is model and "forward" in model.__dict__
                raise exc
        assert_restored(model, snap)


@pytest.mark.parametrize("engine", ["gradient", "explicit"])
def test_cp_lrp_conserves_through_every_layer_llama(engine):
    """With zero biases, tiny eps and CP-LRP, sum of input relevance == explained logit."""
    model = zero_biases(tiny_llama("sdpa", D, layers=3))
    ids, mask = text_batch()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    with composites.cp_lrp(model, epsilon=1e-12, engine=engine).context(model):
        logits = run_text(model, emb, mask)
        target = logits[1, -1].argmax()
        logit = logits[1, -1, target]
        logit.backward(logit)  # start with R = the logit
    R = emb.grad[1].sum()
    assert math.isclose(R.item(), logit.item(), rel_tol=1e-4), (R.item(), logit.item())
    assert emb.grad[0].abs().sum() == 0  # the other sequence of the batch gets none
    assert (emb.grad[1, :2] == 0).all()  # padded positions get none


@pytest.mark.parametrize("engine", ["gradient", "explicit"])
def test_relevance_reaches_every_layer(engine):
    from lxt.core.opaque import add_tap, remove_tap, tap

    model = tiny_llama("sdpa", D, layers=3)
    ids, mask = text_batch()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    seen = {}
    comp = composites.cp_lrp(model, epsilon=1e-12, engine=engine)

    def relevance(g, t):  # the gradient engine carries R / t: the relevance is t * g
        return (g * t if engine == "gradient" else g).sum().item()

    keys = [add_tap(lambda g, t, i=i: seen.__setitem__(i, relevance(g, t))) for i in range(3)]
    with comp.context(model):
        # identity nodes that report the relevance of each layer's output (no graph break)
        hooks = [layer.register_forward_hook(lambda mod, args, out, k=k: tap(k, out))
                 for k, layer in zip(keys, model.model.layers)]
        logits = run_text(model, emb, mask)
        logit = logits[0, -1, 3]
        logit.backward(logit)
        assert comp.summary().graph_breaks == 0
        for h in hooks:
            h.remove()
    for k in keys:
        remove_tap(k)
    assert sorted(seen) == [0, 1, 2]
    # CP-LRP without biases conserves layer by layer
    for i in range(3):
        assert math.isclose(seen[i], logit.item(), rel_tol=1e-4), (i, seen[i], logit.item())


def test_override_changes_exactly_the_named_layers():
    model = tiny_llama("sdpa", D, layers=3)
    comp = composites.llama.attnlrp(overrides={
        "model.layers.1.*": {nn.Linear: rules.GammaRule(gamma=0.5), operator.add: None},
    })
    with comp.context(model):
        for name, m in model.named_modules():
            if isinstance(m, RuleModule) and isinstance(m.module, nn.Linear):
                expected = rules.GammaRule(gamma=0.5) if name.startswith("model.layers.1.") else rules.EpsilonRule()
                assert m.rule == expected, name
        ids, mask = text_batch()
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        run_text(model, emb, mask)[0, -1, 0].backward()
        ops = comp.summary().ops
    adds = [r for r in ops if r.op == "add"]
    in_layer1 = [r for r in adds if r.module.startswith("model.layers.1.")]
    elsewhere = [r for r in adds if not r.module.startswith("model.layers.1.")]
    assert in_layer1 and all(not r.rewritten for r in in_layer1)  # the override unmapped them
    assert elsewhere and all(r.rewritten for r in elsewhere)


def test_override_pattern_matching_nothing_warns():
    model = tiny_llama("sdpa", D)
    comp = composites.llama.attnlrp(overrides={"model.layers.9.*": {nn.Linear: rules.GammaRule}})
    with pytest.warns(UserWarning, match="matches no module"):
        comp.register(model)
    comp.remove()


@pytest.mark.parametrize("bad", [{42: rules.EpsilonRule}, {"not_a_tensor_method": lf.add2},
                                 {nn.Linear: 3.0}, {operator.add: nn.Linear}])
def test_bad_layer_map_is_a_clear_error(bad):
    with pytest.raises(TypeError, match="lxt"):
        Composite(bad)


def test_rule_that_does_not_fit_leaves_model_untouched():
    model = tiny_llama("sdpa", D)
    snap = snapshot(model)
    comp = Composite({nn.Linear: rules.EpsilonRule, LlamaRMSNorm: rules.GammaRule})
    with pytest.raises(TypeError, match=r"model\.layers\.0\.input_layernorm.*GammaRule applies"):
        comp.register(model)
    assert_restored(model, snap)


def test_trace_once_for_new_lengths_and_batch_sizes():
    model = tiny_llama("sdpa", torch.float32)
    comp = composites.attnlrp(model)
    with comp.context(model):
        counts = []
        for batch, seq in [(2, 5), (2, 7), (3, 9), (4, 12), (2, 6)]:
            emb = torch.randn(batch, seq, 32, requires_grad=True)
            mask = torch.ones(batch, seq, dtype=torch.long)
            run_text(model, emb, mask)[:, -1, 0].sum().backward()
            counts.append(len(comp._capture.graphs))
    assert counts == [1] * 5, counts


def test_two_composites_in_turn_equal_each_alone():
    base = tiny_llama("sdpa", D)
    ids, mask = text_batch()

    def explain(model, comp):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        with comp.context(model):
            run_text(model, emb, mask)[1, -1, 7].backward()
        return emb.grad

    alone_attn = explain(copy.deepcopy(base), composites.attnlrp(base))
    alone_cp = explain(copy.deepcopy(base), composites.cp_lrp(base))
    model = copy.deepcopy(base)
    turn = [explain(model, composites.attnlrp(model)), explain(model, composites.cp_lrp(model)),
            explain(model, composites.attnlrp(model))]
    torch.testing.assert_close(turn[0], alone_attn, rtol=0, atol=0)
    torch.testing.assert_close(turn[1], alone_cp, rtol=0, atol=0)
    torch.testing.assert_close(turn[2], alone_attn, rtol=0, atol=0)
    assert not torch.allclose(alone_attn, alone_cp)


def test_register_twice_never_nests_and_other_composite_is_refused():
    model = tiny_llama("sdpa", D)
    snap = snapshot(model)
    comp = composites.attnlrp(model)
    comp.register(model)
    comp.register(model)  # re-registers cleanly
    wrappers = [m for m in model.modules() if isinstance(m, RuleModule)]
    assert all(not isinstance(w.module, RuleModule) for w in wrappers)
    with pytest.raises(RuntimeError, match="already registered"):
        composites.cp_lrp(model).register(model)
    comp.remove()
    assert_restored(model, snap)


def test_nothing_of_lxt_survives_remove():
    model = tiny_llama("sdpa", torch.float32)
    comp = composites.attnlrp(model)
    with comp.context(model):
        wrapper = weakref.ref(model.model.layers[0].mlp.up_proj)
        emb = torch.randn(2, 5, 32, requires_grad=True)
        model(inputs_embeds=emb).logits.sum().backward()
    gc.collect()
    assert wrapper() is None, "a rule module outlived remove()"
    assert len(lxt.core.opaque._MODULES) == 0 or all(
        not any(m is v for m in model.modules()) for v in lxt.core.opaque._MODULES.values())


def test_plain_user_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(8, 8, bias=False) for _ in range(3))
            self.out = nn.Linear(8, 3, bias=False)

        def forward(self, x):
            a = F.scaled_dot_product_attention(self.q(x)[:, None], self.k(x)[:, None], self.v(x)[:, None])[:, 0]
            h = x + a
            return self.out(torch.tanh(h) * h)

    model = Block().to(D).eval()
    x = torch.randn(2, 5, 8, dtype=D)
    ref = model(x)
    snap = snapshot(model)
    comp = Composite({nn.Linear: rules.EpsilonRule(epsilon=1e-12), operator.add: lf.add2,
                      operator.mul: lf.mul2, torch.tanh: lf.tanh,
                      F.scaled_dot_product_attention: lf.scaled_dot_product_attention_cp})
    with comp.context(model):
        xx = x.clone().requires_grad_()
        y = model(xx)
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
        y.backward(y)
        text = str(comp.summary())
    # CP rules, no biases: conservation through the plain module
    assert math.isclose(xx.grad.sum().item(), y.sum().item(), rel_tol=1e-5)  # default eps 1e-6 in add2, sdpa
    assert "add2" in text and "mul2" in text and "tanh" in text
    assert_restored(model, snap)


def test_summary_lists_plain_gradient_ops():
    model = tiny_llama("sdpa", torch.float32)
    comp = Composite({nn.Linear: rules.EpsilonRule})  # incomplete on purpose
    with comp.context(model):
        emb = torch.randn(1, 4, 32, requires_grad=True)
        model(inputs_embeds=emb).logits.sum().backward()
        s = comp.summary()
    unsafe = {r.op for r in s.unsafe}
    assert {"add", "mul", "scaled_dot_product_attention"} <= unsafe
    assert "not LRP-safe" in str(s)


def test_model_that_cannot_be_captured_keeps_module_rules(monkeypatch):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.lin(x) + x

    model = Odd().to(D)
    comp = Composite({nn.Linear: rules.EpsilonRule, operator.add: lf.add2})
    import lxt.core.tracing as tracing

    def broken(self, *a, **k):
        raise torch._dynamo.exc.Unsupported("simulated capture failure")

    monkeypatch.setattr(tracing.PatchedForward, "_compiled_call", broken, raising=False)
    with comp.context(model):
        comp._forward.compiled = lambda *a, **k: broken(None)
        x = torch.randn(2, 4, dtype=D, requires_grad=True)
        with pytest.warns(UserWarning, match="could not capture"):
            y = model(x)
        y.sum().backward()
        s = comp.summary()
    assert "capture FAILED" in str(s)
    assert isinstance(x.grad, torch.Tensor)
