"""The published lxt 2.1 API (``lxt.explicit``) against the torch-form implementation.

Each adapter must give exactly (atol=0) what the torch-signature functional, rule or module
of lxt gives on the same inputs: the adapters only re-order arguments and pick the
published defaults.  The rules themselves are checked against independent formulas in
test_functional.py / test_rules.py.
"""
import inspect
import operator
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lxt
import lxt.explicit.functional as ef
import lxt.explicit.modules as em
import lxt.explicit.rules as er
import lxt.explicit.special as es
import lxt.functional as lf
from lxt import rules as lr
from lxt.explicit.core import Composite as PublishedComposite

D = torch.float64


def rel(fn, *inputs, R=None, seed=1):
    """Output and relevance of every input of ``fn(*inputs)`` started at ``R`` (default
    a seeded random tensor)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    if R is None:
        R = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(y, leaves, R, allow_unused=True)
    return y.detach(), grads


def same(a, b):
    ya, ra = a
    yb, rb = b
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    for u, v in zip(ra, rb, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def t(*shape):
    return torch.randn(*shape, dtype=D)


# ------------------------------------------------------------------ functional
def test_functional_is_its_own_module_with_published_signatures():
    assert ef is not lf and ef.add2 is not lf.add2
    published = {
        "add2": ["input_a", "input_b", "inplace", "epsilon"],
        "softmax": ["input", "dim", "dtype", "temperature", "inplace"],
        "linear_epsilon": ["input", "weight", "bias", "epsilon"],
        "matmul": ["input_a", "input_b", "inplace", "epsilon"],
        "rms_norm_identity": ["hidden_states", "weight", "variance_epsilon"],
        "mul2": ["input_a", "input_b", "inplace"],
        "mean": ["x", "dim", "keep_dim", "epsilon"],
        "layer_norm": ["hidden_states", "weight", "bias", "variance_epsilon"],
        "normalize": ["input", "p", "dim", "eps", "out"],
    }
    for name, params in published.items():
        assert list(inspect.signature(getattr(ef, name)).parameters) == params, name
    defaults = {"add2": 1e-8, "matmul": 1e-8, "linear_epsilon": 1e-6, "mean": 1e-6}
    for name, eps in defaults.items():
        assert inspect.signature(getattr(ef, name)).parameters["epsilon"].default == eps


def test_torch_form_keeps_torch_signatures():
    # the graph rewrite swaps a call's target and keeps its arguments
    x = t(2, 5)
    torch.testing.assert_close(lf.softmax(x, 1, 3, torch.float64), F.softmax(x, 1, 3, torch.float64))
    assert "alpha" in inspect.signature(lf.add2).parameters
    assert list(inspect.signature(lf.layer_norm).parameters)[:5] == list(
        inspect.signature(F.layer_norm).parameters)[:5]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((2, 3, 4), (4,))])
def test_add2(inplace, shapes):
    a, b = t(*shapes[0]), t(*shapes[1])
    same(rel(lambda a, b: ef.add2(a, b, inplace, 1e-3), a, b),
         rel(lambda a, b: lf.add2(a, b, epsilon=1e-3), a, b))
    same(rel(lambda a, b: ef.add2(a, b), a, b), rel(lambda a, b: lf.add2(a, b, epsilon=1e-8), a, b))


@pytest.mark.parametrize("inplace", [False, True])
def test_matmul(inplace):
    a, b = t(2, 3, 4), t(2, 4, 5)
    same(rel(lambda a, b: ef.matmul(a, b, inplace, 1e-3), a, b),
         rel(lambda a, b: lf.matmul(a, b, epsilon=1e-3), a, b))
    same(rel(ef.matmul, a, b), rel(lambda a, b: lf.matmul(a, b, epsilon=1e-8), a, b))


def test_mul2_and_constant_factor():
    a, b = t(3, 4), t(3, 4)
    same(rel(lambda a, b: ef.mul2(a, b, True), a, b), rel(lf.mul2, a, b))
    same(rel(lambda a: ef.mul2(a, 2.5), a), rel(lambda a: lf.mul2(a, 2.5), a))


@pytest.mark.parametrize("inplace_as_number", [1e-6, 0, None])
def test_number_in_inplace_position_is_refused(inplace_as_number):
    a, b = t(2, 2), t(2, 2)
    for fn in (ef.add2, ef.matmul, ef.mul2):
        with pytest.raises(TypeError, match="lxt: .*inplace.*epsilon= by keyword"):
            fn(a, b, inplace_as_number)


def test_linear_epsilon():
    x, W, b = t(3, 6), t(4, 6), t(4)
    same(rel(lambda x: ef.linear_epsilon(x, W, b, 1e-3), x),
         rel(lambda x: lf.linear_epsilon(x, W, b, epsilon=1e-3), x))


@pytest.mark.parametrize("dim,keep_dim,n", [(-1, True, 4), (-1, False, 4), (1, False, 3),
                                            ((0, 2), True, 8)])
def test_mean(dim, keep_dim, n):
    """The published epsilon stabilises the sum, lxt.functional's the mean: epsilon / N."""
    x = t(2, 3, 4)
    same(rel(lambda x: ef.mean(x, dim, keep_dim, 1e-3), x),
         rel(lambda x: lf.mean(x, dim, keep_dim, epsilon=1e-3 / n), x))
    # R_x = x * R / stab(sum(x), epsilon), against the formula
    y, (r,) = rel(lambda x: ef.mean(x, dim, True, 1e-3), x, R=torch.ones(x.mean(dim, True).shape, dtype=D))
    torch.testing.assert_close(r, x / lr.stabilize(x.sum(dim, keepdim=True), 1e-3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(affine):
    x = t(2, 3, 8)
    w, b = (t(8), t(8)) if affine else (None, None)
    same(rel(lambda x: ef.layer_norm(x, w, b, 1e-5), x),
         rel(lambda x: lf.layer_norm(x, (8,), w, b, 1e-5), x))
    torch.testing.assert_close(ef.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (8,), w, b, 1e-5))


def test_layer_norm_slower_composition_agrees():
    x, w, b = t(2, 3, 8), t(8), t(8)
    y_fast, (r_fast,) = rel(lambda x: ef.layer_norm(x, w, b, 1e-5), x)
    y_slow, (r_slow,) = rel(lambda x: ef._layer_norm_slower(x, w, b, 1e-5), x)
    torch.testing.assert_close(y_slow, y_fast, rtol=1e-12, atol=1e-12)
    cos = F.cosine_similarity(r_fast.flatten(), r_slow.flatten(), dim=0)
    assert cos > 0.99


def test_rms_norm_identity_and_normalize():
    x, w = t(2, 3, 8), t(8)
    same(rel(lambda x: ef.rms_norm_identity(x, w, 1e-6), x),
         rel(lambda x: lf.rms_norm_identity(x, w, 1e-6), x))
    same(rel(lambda x: ef.normalize(x, 2.0, -1), x), rel(lambda x: lf.normalize(x, 2.0, -1), x))


@pytest.mark.parametrize("dim", [-1, 1])
def test_softmax(dim):
    x = t(2, 5, 3)
    same(rel(lambda x: ef.softmax(x, dim), x), rel(lambda x: lf.softmax(x, dim), x))
    x32 = x.float()
    same(rel(lambda x: ef.softmax(x, dim, torch.float64), x32),
         rel(lambda x: lf.softmax(x, dim, dtype=torch.float64), x32))


def test_softmax_temperature_is_identity_then_softmax():
    x = t(2, 5)
    same(rel(lambda x: ef.softmax(x, -1, None, 2.5), x),
         rel(lambda x: lf.softmax(lf.div_const(x, 2.5), -1), x))
    # and the published formula: R_x = (x / T) * (R - s * sum(R))
    y, (r,) = rel(lambda x: ef.softmax(x, -1, None, 2.5), x, R=torch.ones(2, 5, dtype=D) * 0.3)
    s = F.softmax(x / 2.5, -1)
    R = torch.full_like(x, 0.3)
    torch.testing.assert_close(r, (x / 2.5) * (R - s * R.sum(-1, keepdim=True)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("flag", [False, True])
def test_softmax_bool_temperature_is_the_inplace_flag(flag):
    """The published tests call softmax(x, -1, torch.float32, False): a bool where
    temperature is.  The published package divides by False (NaN); lxt reads it as the
    inplace flag (no effect), keeps temperature 1.0 and warns."""
    x = t(3, 4)
    with pytest.warns(UserWarning, match="inplace flag"):
        got = rel(lambda x: ef.softmax(x, -1, torch.float64, flag), x)
    same(got, rel(lambda x: lf.softmax(x, -1), x))


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan")])
def test_softmax_bad_temperature(bad):
    with pytest.raises(ValueError, match="lxt: softmax temperature"):
        ef.softmax(t(2, 3), -1, None, bad)


# ------------------------------------------------------------------ rules
def test_rules_published_construction_returns_the_wrapped_module():
    lin = nn.Linear(6, 4).to(D)
    wrapped = er.EpsilonRule(lin)
    assert isinstance(wrapped, er.WrapModule) and wrapped.module is lin
    assert wrapped.rule == er.EpsilonRule(epsilon=1e-8)  # published default
    assert er.EpsilonRule(lin, 1e-3).rule.epsilon == 1e-3
    assert er.UniformEpsilonRule().epsilon == 1e-6
    x = t(3, 6)
    same(rel(wrapped, x), rel(lambda x: lf.linear_epsilon(x, lin.weight, lin.bias, 1e-8), x))
    # a template, as a layer map uses it
    assert isinstance(er.EpsilonRule(), lr.EpsilonRule)


def test_epsilon_rule_on_a_partial_function():
    W, b = t(5, 5), t(5)
    layer = er.EpsilonRule(partial(F.linear, weight=W, bias=b))
    x = t(1, 5)
    same(rel(layer, x), rel(lambda x: lf.linear_epsilon(x, W, b, 1e-8), x))


def test_rule_functions_and_function_stand_ins():
    W = t(4, 6)
    x = t(3, 6)
    expected = rel(lambda x: lr.EpsilonRule(1e-3).apply(F.linear, x, W), x)
    same(rel(lambda x: er.epsilon_lrp(F.linear, 1e-3, x, W), x), expected)
    same(rel(lambda x: er.epsilon_lrp_fn.apply(F.linear, 1e-3, x, W), x), expected)
    same(rel(lambda x: er.identity(torch.tanh, x), x), rel(lf.tanh, x))
    same(rel(lambda x: er.identity_fn.apply(torch.tanh, x), x), rel(lf.tanh, x))
    a, b = t(2, 3, 4), t(2, 4, 5)
    same(rel(lambda a, b: er.uniform_epsilon_lrp_fn.apply(torch.matmul, 1e-6, a, b), a, b),
         rel(lambda a, b: lf.matmul(a, b, epsilon=1e-6), a, b))
    c, d = t(3, 4), t(3, 4)
    same(rel(lambda c, d: er.uniform_rule_fn.apply(operator.mul, c, d), c, d), rel(lf.mul2, c, d))
    _, (r,) = rel(lambda x: er.stop_relevance_fn.apply(torch.tanh, x), x)
    assert torch.count_nonzero(r) == 0


def test_identity_stop_uniform_rules_on_modules():
    x = t(3, 4)
    same(rel(er.IdentityRule(nn.SiLU()), x), rel(lf.silu, x))
    _, (r,) = rel(er.StopRelevanceRule(nn.Tanh()), x)
    assert torch.count_nonzero(r) == 0

    class Mul(nn.Module):
        def forward(self, a, b):
            return a * b

    a, b = t(3, 4), t(3, 4)
    same(rel(er.UniformRule(Mul()), a, b), rel(lf.mul2, a, b))
    same(rel(er.UniformEpsilonRule(torch.matmul), a, b.T.contiguous()),
         rel(lambda a, b: lf.matmul(a, b, epsilon=1e-6), a, b.T.contiguous()))


def test_taylor_decomposition_rule():
    lin = nn.Linear(6, 4).to(D)
    x = t(3, 6)
    ref = t(3, 6) * 0.1
    same(rel(er.TaylorDecompositionRule(lin), x),
         rel(lr.TaylorDecompositionRule(reference=0, bias=False)(lin), x))
    same(rel(er.TaylorDecompositionRule(lin, (ref,)), x),
         rel(lr.TaylorDecompositionRule(reference=ref, bias=False)(lin), x))
    with pytest.raises(NotImplementedError, match="lxt: .*distribute_bias"):
        er.TaylorDecompositionRule(lin, 0, True, lambda inputs, rels: rels)
    with pytest.raises(ValueError, match="lxt: .*one reference point"):
        er.TaylorDecompositionRule(lin, (ref, ref))


def test_torch_form_rules_take_the_rule_parameters_first():
    # one way per API: module-first construction belongs to lxt.explicit.rules
    with pytest.raises(ValueError, match="lxt: epsilon"):
        lr.EpsilonRule(nn.Linear(2, 2))


# ------------------------------------------------------------------ modules
def test_modules_built_from_the_module_they_replace():
    lin, ln, sm = nn.Linear(6, 4).to(D), nn.LayerNorm(6).to(D), nn.Softmax(dim=-1)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rms = LlamaRMSNorm(6, eps=1e-5).to(D)
    x = t(3, 6)
    for cls, original, expected in [
        (em.LinearEpsilon, lin, lambda x: lf.linear_epsilon(x, lin.weight, lin.bias)),
        (em.LayerNormEpsilon, ln, lambda x: lf.layer_norm(x, (6,), ln.weight, ln.bias, ln.eps)),
        (em.SoftmaxDT, sm, lambda x: lf.softmax(x, -1)),
        (em.RMSNormIdentity, rms, lambda x: lf.rms_norm_identity(x, rms.weight, 1e-5)),
    ]:
        new = em.INIT_MODULE_MAPPING[cls](original, cls)
        assert isinstance(new, cls)
        for name, p in original.named_parameters():
            assert getattr(new, name) is p  # shared, not copied
        torch.testing.assert_close(new(x), original(x), rtol=1e-12, atol=1e-12)  # round-off
        same(rel(new, x), rel(expected, x))


def test_softmax_dt_published_constructor():
    x = t(2, 5)
    m = em.SoftmaxDT(-1, None, 2.0, True)
    same(rel(m, x), rel(lambda x: ef.softmax(x, -1, None, 2.0), x))
    assert em.LinearEpsilon is lxt.modules.LinearEpsilon


def _mha_reference(mha, x, mask):
    """CP-LRP attention composed of torch-form functionals (no explicit code)."""
    e, h = mha.embed_dim, mha.num_heads
    W, B = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    b, n, _ = x.shape
    with torch.no_grad():
        q = F.linear(x, W[:e], B[:e]).view(b, n, h, e // h).transpose(1, 2)
        k = F.linear(x, W[e:2 * e], B[e:2 * e]).view(b, n, h, e // h).transpose(1, 2)
    v = lf.linear_epsilon(x, W[2 * e:], B[2 * e:], 1e-8).view(b, n, h, e // h).transpose(1, 2)
    o = lf.scaled_dot_product_attention_cp(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, e)
    return lf.linear_epsilon(o, mha.out_proj.weight.detach(), mha.out_proj.bias.detach(), 1e-8)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_cp(batch_first):
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).to(D).eval()
    cp = em.INIT_MODULE_MAPPING[em.MultiheadAttention_CP](mha, em.MultiheadAttention_CP)
    x = t(2, 5, 16)
    xin = x if batch_first else x.transpose(0, 1)
    attn_mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 0] = True
    for kw in ({}, {"attn_mask": attn_mask}, {"attn_mask": t(5, 5)}, {"key_padding_mask": pad}):
        y_ref, w_ref = mha(xin, xin, xin, **kw)
        y, w = cp(xin, xin, xin, **kw)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-10)
    mask = es._prepare_attn_mask(attn_mask, t(2, 4, 5, 4))
    assert mask.dtype == D and torch.isinf(mask).sum() == 10

    comp = PublishedComposite({em.LinearInProjection: er.EpsilonRule, em.LinearOutProjection: er.EpsilonRule})
    with comp.context(cp):
        def run(x):
            xin = x if batch_first else x.transpose(0, 1)
            y = cp(xin, xin, xin, attn_mask=attn_mask, need_weights=False)[0]
            return y if batch_first else y.transpose(0, 1)

        got = rel(run, x)
    same(got, rel(lambda x: _mha_reference(mha, x, es._prepare_attn_mask(attn_mask, t(2, 4, 5, 4))), x))
    with pytest.raises(ValueError, match="lxt: .*is_causal"):
        cp(xin, xin, xin, is_causal=True)


# ------------------------------------------------------------------ core.Composite
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.norm(self.lin(x)))


def test_composite_module_map_and_exact_restore():
    model = nn.Sequential(Block(), Block()).to(D).eval()
    originals = {n: m for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = t(3, 6)
    y0 = model(x)
    comp = PublishedComposite({nn.Linear: er.EpsilonRule, nn.LayerNorm: em.LayerNormEpsilon,
                               nn.SiLU: er.IdentityRule})
    assert comp.register(model) is model
    assert isinstance(model[0].lin, er.WrapModule) and isinstance(model[0].norm, em.LayerNormEpsilon)
    assert not any(p.requires_grad for p in model.parameters())
    got = rel(model, x)

    def expected(x):
        for blk in model:
            x = lf.linear_epsilon(x, blk.lin.weight, blk.lin.bias, 1e-8)
            x = lf.layer_norm(x, (6,), blk.norm.weight, blk.norm.bias, blk.norm.eps)
            x = lf.silu(x)
        return x

    same(got, rel(expected, x))
    comp.remove()
    assert {n: m for n, m in model.named_modules()} == originals
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)

    with pytest.raises(RuntimeError, match="boom"):
        with comp.context(model):
            raise RuntimeError("boom")
    assert {n: m for n, m in model.named_modules()} == originals


@pytest.mark.parametrize("layer_map,match", [
    ({operator.add: ef.add2}, "transformers.utils.fx.*lxt.composites.attnlrp"),
    ({F.softmax: ef.softmax}, "lxt.Composite"),
    ({"lin": er.EpsilonRule}, "name keys"),
])
def test_composite_what_cannot_be_honoured_says_what_to_use(layer_map, match):
    with pytest.raises((NotImplementedError, TypeError), match="lxt: .*" + match):
        PublishedComposite(layer_map)


def test_composite_register_with_tracing_arguments_raises():
    comp = PublishedComposite({nn.Linear: er.EpsilonRule})
    model = Block()
    with pytest.raises(NotImplementedError, match="lxt: .*transformers 5.*lxt.composites"):
        comp.register(model, {"input_ids": torch.zeros(1, 2, dtype=torch.long)})
    assert isinstance(model.lin, nn.Linear)
    with pytest.raises(NotImplementedError, match="canonizers"):
        PublishedComposite({nn.Linear: er.EpsilonRule}, canonizers=[object()])


@pytest.mark.parametrize("module,match", [("lxt.efficient", "lxt.composites.attnlrp"),
                                          ("lxt.explicit.check", "lxt.conservation")])
def test_removed_published_modules_say_what_to_use(module, match):
    import importlib

    with pytest.raises(ImportError, match="lxt: .*" + match):
        importlib.import_module(module)


def test_adapters_are_explicit_outside_a_composite():
    # x.grad is relevance (explicit form), also when a gradient-engine composite exists
    x = t(3, 4)
    _ = lxt.composites  # the composites module is loaded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, (r,) = rel(lambda x: ef.add2(x, x.detach() * 0 + 1.0), x, R=torch.ones(3, 4, dtype=D))
    torch.testing.assert_close(r, x / lr.stabilize(x + 1.0, 1e-8), rtol=1e-12, atol=1e-12)
