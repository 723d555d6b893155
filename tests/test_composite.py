"""The Composite on stock transformers models: round trip, relevance through every layer,
overrides, errors, nothing relearned for new shapes."""
import copy
import functools
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
from helpers import assert_restored, snapshot
from models import text_batch, tiny_bert, tiny_llama, tiny_vit, zero_biases

D = torch.float64


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
    assert any(isinstance(m, lxt.rules.base.LxtModule) for m in model.modules())
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
        assert comp.summary().unsafe == []  # the taps do not get in the rules' way
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
    comp = composites.attnlrp(family="llama", overrides={
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
    comp = composites.attnlrp(family="llama", overrides={"model.layers.9.*": {nn.Linear: rules.GammaRule}})
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


def test_new_lengths_batch_sizes_and_padding_reuse_what_was_learned():
    """Nothing is captured: a registration learns the model's operations in its first
    forwards (one walk of the autograd graph each) and then only runs them."""
    model = tiny_llama("sdpa", torch.float32)
    comp = composites.attnlrp(model)
    with comp.context(model):
        counts, learning = [], []
        for batch, seq, pad in [(2, 5, 0), (2, 7, 0), (3, 9, 0), (4, 12, 0), (2, 6, 0), (2, 6, 2),
                                (3, 8, 3), (1, 4, 0)]:
            emb = torch.randn(batch, seq, 32, requires_grad=True)
            mask = torch.ones(batch, seq, dtype=torch.long)
            mask[-1, :pad] = 0  # left padding in the last row
            run_text(model, emb, mask)[:, -1, 0].sum().backward()
            counts.append(len(comp.captured_ops))
            learning.append(comp._dispatcher.learning)
    # the first padded batch runs the mask's operations (not on the relevance path): noticed,
    # and learned in full by the next forward
    assert counts[:5] == [counts[0]] * 5 and counts[0] < counts[5] <= counts[6] == counts[7]
    assert learning == [False] * 5 + [True, False, False]


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
        wrapper = weakref.ref(model.model.layers[0].input_layernorm)  # an lxt module while registered
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


class _Compiled(nn.Module):
    """A model whose forward calls a torch.compile'd function (compiled before register)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, bias=False)
        self.gate = torch.compile(lambda a, b: a * torch.sigmoid(b) + a, backend="aot_eager")

    def forward(self, x):
        return self.gate(self.lin(x), x)


GATE_MAP = {nn.Linear: rules.EpsilonRule, operator.add: lf.add2, operator.mul: lf.mul2,
            torch.sigmoid: lf.sigmoid}


@pytest.mark.parametrize("engine", ["gradient", "explicit"])
def test_compiled_code_inside_the_model_runs_under_the_rules(engine):
    model = _Compiled().to(D).eval()
    plain = copy.deepcopy(model)
    plain.gate = lambda a, b: a * torch.sigmoid(b) + a  # the same forward, not compiled
    x = torch.randn(3, 4, dtype=D)
    model(x.clone().requires_grad_()).sum().backward()  # compiled outside the registration
    grads = []
    for m in (model, plain):
        comp = Composite(GATE_MAP, engine=engine, strict=True)
        with comp.context(m):
            xx = x.clone().requires_grad_()
            y = m(xx)
            y.backward(y)
            assert {r.op for r in comp.summary().ops if r.rewritten} == {"add", "mul", "sigmoid"}
        grads.append(xx.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


# ------------------------------------------------------------------ no silent wrong answers
ENGINES = ["gradient", "explicit"]


class _InPlace(nn.Module):
    """In-place arithmetic whose result later code reads through the mutated tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)

    def forward(self, x):
        h = self.a(x)
        h.add_(self.b(x))
        h += x
        h.mul_(2)
        return h * 3


IN_PLACE_MAP = {nn.Linear: rules.EpsilonRule, operator.iadd: lf.add2, "add_": lf.add2,
                "mul_": lf.mul2, operator.mul: lf.mul2}


@pytest.mark.parametrize("engine", ENGINES)
def test_in_place_calls_keep_the_forward(engine):
    model = _InPlace().to(D).eval()
    x = torch.randn(3, 4, dtype=D)
    ref = model(x)
    with Composite(IN_PLACE_MAP, engine=engine).context(model):
        xx = x.clone().requires_grad_()
        y = model(xx)
        torch.testing.assert_close(y, ref, rtol=1e-15, atol=0)  # the in-place results are used
        y.backward(y)
    # products by constants pass R on (identity); the epsilon rule on h = a(x) + b(x) + x
    # gives each summand its share, the linear layers pass theirs to x (no biases)
    wa, wb = model.a.weight.detach(), model.b.weight.detach()
    share = y.detach() / (x @ wa.T + x @ wb.T + x)
    expected = x * (share @ wa) + x * (share @ wb) + x * share
    # stabilisers (1e-6) aside, where a sum is near zero
    torch.testing.assert_close(xx.grad, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert math.isclose(xx.grad.sum().item(), y.sum().item(), rel_tol=1e-6)


class _InPlaceOnView(_InPlace):
    def forward(self, x):
        h = self.a(x)
        first = h[0]
        h.add_(x)
        return h + first  # reads the mutated storage through another view


class _InPlaceOnInput(_InPlace):
    def forward(self, x):
        x.mul_(2)  # changes the caller's tensor
        return self.a(x)


@pytest.mark.parametrize("engine", ENGINES)
def test_in_place_call_that_cannot_be_kept_is_refused(engine):
    model = _InPlaceOnInput().to(D).eval()
    snap = snapshot(model)
    comp = Composite(IN_PLACE_MAP, engine=engine)
    with comp.context(model):
        with pytest.raises(ValueError, match="lxt: .* in place .*did not create.*Write it out of place"):
            model(torch.randn(3, 4, dtype=D, requires_grad=True) * 1)
    assert_restored(model, snap)


@pytest.mark.parametrize("engine", ENGINES)
def test_in_place_call_read_through_another_view_keeps_forward_and_relevance(engine):
    """``h.add_(x)`` while a view of ``h`` is read later: the view sees the new values, and
    the relevance is that of the out-of-place program ``h2 = a(x) + x; h2 + h2[0]``."""
    model = _InPlaceOnView().to(D).eval()
    x = torch.randn(3, 4, dtype=D)
    ref = model(x)
    add = functools.partial(lf.add2, epsilon=1e-12)
    table = {nn.Linear: rules.EpsilonRule(epsilon=1e-12), "add_": add, operator.add: add}
    with Composite(table, engine=engine, epsilon=1e-12, strict=True).context(model):
        xx = x.clone().requires_grad_()
        y = model(xx)
        torch.testing.assert_close(y, ref, rtol=1e-15, atol=0)
        y.backward(y)
    wa = model.a.weight.detach()
    h2 = x @ wa.T + x
    first = h2[0]
    out = h2 + first
    share = y.detach() / out  # epsilon rule on h2 + first (y = out)
    r_h2 = h2 * share
    r_h2[0] += (first * share).sum(0)  # the broadcast view's relevance lands on row 0
    g = r_h2 / h2  # epsilon rule on a(x) + x
    expected = x * (g @ wa) + x * g
    torch.testing.assert_close(xx.grad, expected, rtol=1e-7, atol=1e-9 * expected.abs().max().item())


class _Normalised(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        e = self.lin(x)
        return e / e.sum(-1, keepdim=True) + e.div(e.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("engine", ENGINES)
def test_variable_divisor_is_a_constant_and_relevance_is_conserved(engine):
    """``e / e.sum()``: identity on the numerator, the divisor a constant, so the relevance
    of the output reaches the input (before: numerator +R, divisor -R, sum ~ 0)."""
    model = _Normalised().to(D).eval()
    with torch.no_grad():
        model.lin.weight.abs_().add_(0.1)  # outputs away from 0: the stabilisers do not matter
    x = torch.rand(3, 4, dtype=D) + 0.1
    comp = Composite(composites.layer_map("llama"), engine=engine)  # the shipped entries
    with comp.context(model):
        xx = x.clone().requires_grad_()
        y = model(xx)
        y.backward(y)
        unsafe = comp.summary().unsafe
    e = x @ model.lin.weight.detach().T
    s, n = e.sum(-1, keepdim=True), e.norm(dim=-1, keepdim=True)
    r_e = e / s + e / n  # R_e = R_y: identity on both numerators
    expected = x * ((r_e / e) @ model.lin.weight.detach())
    torch.testing.assert_close(xx.grad, expected, rtol=1e-5, atol=0)
    assert math.isclose(xx.grad.sum().item(), y.sum().item(), rel_tol=1e-5)
    assert not unsafe  # the sum and the norm only feed divisors: no relevance through them


@pytest.mark.parametrize("strict", [False, True])
def test_unsafe_operations_on_the_relevance_path_warn_or_raise(strict):
    model = tiny_llama("sdpa", D)
    comp = Composite({nn.Linear: rules.EpsilonRule}, strict=strict)  # incomplete on purpose
    emb = torch.randn(1, 4, 32, dtype=D, requires_grad=True)
    with comp.context(model):
        if strict:
            with pytest.raises(ValueError, match=r"lxt: strict .* no LRP rule: .*mul in .*model\.layers\.\*\.mlp"):
                model(inputs_embeds=emb)
            return
        with pytest.warns(UserWarning, match=r"no LRP rule.*mul in .*model\.layers\.\*\.mlp \(2 modules\)") as rec:
            model(inputs_embeds=emb).logits.sum().backward()
        text = " ".join(str(w.message) for w in rec)
        for op, where in [("neg", "self_attn"), ("scaled_dot_product_attention", "self_attn"), ("silu", "mlp.act_fn")]:
            assert f"{op} in model.layers.*.{where}" in text
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            model(inputs_embeds=emb).logits.sum().backward()
        assert not [w for w in again if "no LRP rule" in str(w.message)]  # once per registration


def test_llama_table_on_gpt2_warns_naming_what_it_misses():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2LMHeadModel(cfg).to(D).eval()
    with composites.attnlrp(family="llama").context(model):
        emb = torch.randn(1, 4, 32, dtype=D, requires_grad=True)
        # the base map covers GPT-2's LayerNorm and Conv1D; its gelu_new (a Python formula) is
        # mapped by the GPT-2 row only
        with pytest.warns(UserWarning, match=r"no LRP rule.*pow in transformer\.h\.\*\.mlp\.act \(2 modules\)"):
            model(inputs_embeds=emb).logits.sum().backward()


def test_calls_mapped_to_none_are_not_unsafe():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh()).to(D)
    comp = Composite({nn.Linear: rules.EpsilonRule, torch.tanh: None}, strict=True)
    with comp.context(model):
        model(torch.randn(2, 4, dtype=D, requires_grad=True)).sum().backward()
        assert comp.summary().unsafe == [] and "None in the layer map" in str(comp.summary())


def test_a_composite_serves_one_model_at_a_time():
    a, b = tiny_llama("sdpa", D), tiny_llama("sdpa", D, seed=1)
    snap_b = snapshot(b)
    comp = composites.attnlrp(a)
    with comp.context(a):
        with pytest.raises(RuntimeError, match="one model at a time"):
            comp.register(b)
        assert comp.model is a and "forward" in a.__dict__  # a stays registered
        assert_restored(b, snap_b)


@pytest.mark.parametrize("switch", ["eval", "train"])
def test_remove_restores_each_modules_training_flag(switch):
    model = tiny_llama("sdpa", D)
    model.train()
    model.model.layers[0].eval()
    before = {n: m.training for n, m in model.named_modules()}
    with pytest.warns(UserWarning, match="training mode"):
        comp = composites.attnlrp(model)
        comp.register(model)
    getattr(model, switch)()  # the user switches modes while registered
    comp.remove()
    assert {n: m.training for n, m in model.named_modules()} == before
