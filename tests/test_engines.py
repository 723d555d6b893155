"""The gradient form of every rule against its explicit form, and both engines of every table.

The gradient form carries ``g = R / activation`` in backward; converted at the borders
(``gradient_to_relevance`` on inputs, ``relevance_to_gradient`` on outputs) it must give the
explicit rule's relevance, to round-off as epsilon -> 0 (float64, epsilon = 1e-14 on both
sides).  The explicit rules themselves are checked against float64 formulas in
test_functional.py / test_rules.py; here each gradient form is checked against them.
"""
import functools
import math
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import lxt
import lxt.composites as composites
import lxt.functional as lf
from lxt import Composite, rules
from lxt.rules.base import ENGINE, bind_engine, gradient_to_relevance, relevance_to_gradient
from models import text_batch, tiny_bert, tiny_llama, tiny_tokenizer, tiny_vit

D = torch.float64
EPS = 1e-14


def _leaves(specs):
    return [x.clone().requires_grad_(v) for x, v in specs]


def explicit_relevance(call, specs, weights):
    """``x.grad`` after ``y.backward(y * weights)`` with the explicit rules."""
    xs = _leaves(specs)
    y = call(*xs)
    y.backward(y.detach() * weights)
    return [x.grad for x in xs]


def gradient_relevance(call, specs, weights, eps=EPS):
    """The same through the gradient form, converted at the call's inputs and output."""
    xs = _leaves(specs)

    def inner(*args):
        return call(*[gradient_to_relevance(a) if a.requires_grad else a for a in args])

    y = relevance_to_gradient(bind_engine(inner, True, eps)(*xs), eps)
    y.backward(y.detach() * weights)
    return [x.grad for x in xs]


def _r(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D)


def _masked_scores():
    x = _r(2, 3, 5)
    x[0, 1, 2:] = -math.inf  # masked entries count as 0 in the softmax rule
    return x


W, B = _r(4, 6, seed=1), _r(4, seed=2)
LN_W, LN_B = _r(6, seed=3).abs() + 0.5, _r(6, seed=4)
Q, K, V = _r(2, 4, 5, 8, seed=5), _r(2, 4, 5, 8, seed=6), _r(2, 4, 5, 8, seed=7)
KV2 = _r(2, 2, 5, 8, seed=8), _r(2, 2, 5, 8, seed=9)
BOOL_MASK = torch.rand(5, 5, generator=torch.Generator().manual_seed(3)) > 0.3
BOOL_MASK.fill_diagonal_(True)


def _taylor(x, w):
    return rules.TaylorDecompositionRule(reference=0.0, bias=True, epsilon=EPS)(
        lambda a: torch.tanh(F.linear(a, w)))(x)


#: name -> (call, [(tensor, receives relevance)], output shape for the start weights)
CASES = {
    "linear_epsilon": (lambda x: lf.linear_epsilon(x, W, B, epsilon=EPS), [(_r(3, 6), True)]),
    "add2": (lambda a, b: lf.add2(a, b, epsilon=EPS), [(_r(3, 6), True), (_r(3, 6, seed=1), True)]),
    "add2 broadcast": (lambda a, b: lf.add2(a, b, epsilon=EPS), [(_r(3, 6), True), (_r(6, seed=1), True)]),
    "add2 constant": (lambda a, b: lf.add2(a, b, epsilon=EPS), [(_r(3, 6), True), (_r(3, 6, seed=1), False)]),
    "mul2": (lf.mul2, [(_r(3, 6), True), (_r(3, 6, seed=1), True)]),
    "mul2 constant": (lf.mul2, [(_r(3, 6), True), (_r(3, 6, seed=1), False)]),
    "div_const": (lambda a, c: lf.div_const(a, c), [(_r(3, 6), True), (_r(3, 6, seed=1).abs() + 1, False)]),
    "matmul": (lambda a, b: lf.matmul(a, b, epsilon=EPS), [(_r(2, 3, 4), True), (_r(2, 4, 5, seed=1), True)]),
    "matmul constant": (lambda a, b: lf.matmul(a, b, epsilon=EPS), [(_r(2, 3, 4), True), (_r(2, 4, 5, seed=1), False)]),
    "softmax": (lambda x: lf.softmax(x, dim=-1), [(_r(2, 3, 5), True)]),
    "softmax masked": (lambda x: lf.softmax(x, dim=-1), [(_masked_scores(), True)]),
    "rms_norm_identity": (lambda x: lf.rms_norm_identity(x, LN_W, 1e-6), [(_r(3, 6), True)]),
    "rms_norm": (lambda x: lf.rms_norm(x, (6,), LN_W, 1e-6), [(_r(3, 6), True)]),
    "layer_norm": (lambda x: lf.layer_norm(x, (6,), LN_W, LN_B, epsilon=EPS), [(_r(3, 6), True)]),
    "mean": (lambda x: lf.mean(x, dim=-1, keepdim=True, epsilon=EPS), [(_r(3, 6), True)]),
    "normalize": (lambda x: lf.normalize(x, dim=-1), [(_r(3, 6), True)]),
    "silu": (lf.silu, [(_r(3, 6), True)]),
    "gelu": (lf.gelu, [(_r(3, 6), True)]),
    "tanh": (lf.tanh, [(_r(3, 6), True)]),
    "sigmoid": (lf.sigmoid, [(_r(3, 6), True)]),
    "relu": (lf.relu, [(_r(3, 6), True)]),
    "neg (identity)": (rules.IdentityRule()(operator.neg), [(_r(3, 6), True)]),
    "sdpa": (lambda q, k, v: lf.sdpa(q, k, v, epsilon=EPS), [(Q, True), (K, True), (V, True)]),
    "sdpa causal, scale": (lambda q, k, v: lf.sdpa(q, k, v, is_causal=True, scale=0.3, epsilon=EPS),
                           [(Q, True), (K, True), (V, True)]),
    "sdpa bool mask": (lambda q, k, v: lf.sdpa(q, k, v, attn_mask=BOOL_MASK, epsilon=EPS),
                       [(Q, True), (K, True), (V, True)]),
    "sdpa gqa": (lambda q, k, v: lf.sdpa(q, k, v, enable_gqa=True, epsilon=EPS),
                 [(Q, True), (KV2[0], True), (KV2[1], True)]),
    "sdpa constant q, k": (lambda q, k, v: lf.sdpa(q, k, v, epsilon=EPS), [(Q, False), (K, False), (V, True)]),
    "sdpa constant v": (lambda q, k, v: lf.sdpa(q, k, v, epsilon=EPS), [(Q, True), (K, True), (V, False)]),
    "sdpa_cp": (lambda q, k, v: lf.sdpa_cp(q, k, v, epsilon=EPS), [(Q, True), (K, True), (V, True)]),
    # rules without a gradient form run explicitly through the adapter
    "linear_gamma (adapter)": (lambda x: lf.linear_gamma(x, W, B, gamma=0.25, epsilon=EPS), [(_r(3, 6), True)]),
    "taylor (adapter)": (lambda x: _taylor(x, W), [(_r(3, 6), True)]),
    "epsilon 0.1 (adapter)": (lambda x: rules.EpsilonRule(epsilon=0.1)(F.linear)(x, W, B), [(_r(3, 6), True)]),
    "uniform on a sum (adapter)": (rules.UniformRule()(torch.add), [(_r(3, 6), True), (_r(3, 6, seed=1), True)]),
    "stop (adapter)": (rules.StopRelevanceRule()(torch.tanh), [(_r(3, 6), True)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_form_equals_explicit_rule(name):
    call, specs = CASES[name]
    with torch.no_grad():
        y = call(*[x for x, _ in specs])
    weights = _r(*y.shape, seed=11)  # R = y * weights: relevance proportional to the output
    expected = explicit_relevance(call, specs, weights)
    actual = gradient_relevance(call, specs, weights)
    assert ENGINE.gradient is False  # the engine is bound to the call, never left switched on
    for (x, need), a, e in zip(specs, actual, expected):
        if not need or e is None:  # constants, and q / k of CP-LRP, get none in either form
            assert a is None and e is None
            continue
        assert torch.isfinite(a).all()
        # Llama's RMSNorm normalises in float32 even for float64 input (as HF does): there the
        # two forms agree to float32 round-off only
        rtol = 1e-6 if name == "rms_norm_identity" else 1e-8
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * 1e-2 * max(e.abs().max().item(), 1.0))
        assert e.abs().max() > 0 or name.startswith("stop")


def test_gradient_forms_keep_nothing_for_epsilon_rules():
    """Epsilon on a linear layer and on a sum is the plain gradient in the gradient form: no
    lxt node in the graph, the very autograd nodes torch builds."""
    x = _r(3, 6).requires_grad_()
    y = bind_engine(lambda t: lf.linear_epsilon(t, W.clone(), B), True)(x)
    assert type(y.grad_fn).__name__ in ("AddmmBackward0", "ViewBackward0", "LinearBackward0")
    z = bind_engine(lambda a, b: lf.add2(a, b), True)(x, x * 2)
    assert type(z.grad_fn).__name__ == "AddBackward0"


def test_explicit_outside_a_composite_even_after_errors():
    def boom(t):
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        bind_engine(boom, True)(torch.ones(1))
    assert ENGINE.gradient is False
    x = _r(3, 6).requires_grad_()
    y = lf.mul2(x, x.detach())
    assert type(y.grad_fn).__name__ == "_RuleFunctionBackward"  # a drop-in stays explicit


def test_causal_boolean_mask_runs_as_is_causal():
    """A boolean mask that is exactly causal (what transformers builds under TorchDynamo) runs
    through torch's fused causal kernel: the same values and relevance, no n x n mask kept."""
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    for fn in (lf.sdpa, lf.sdpa_cp):
        results = []
        for kw in ({"attn_mask": causal}, {"is_causal": True}):
            q, k, v = (t.clone().requires_grad_() for t in (Q, K, V))
            shapes = []

            def pack(t, shapes=shapes):
                shapes.append(tuple(t.shape))
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = fn(q, k, v, epsilon=EPS, **kw)
            y.backward(y.detach())
            results.append((y, v.grad))
            assert not [s for s in shapes if s[-2:] == (5, 5)], shapes
        torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    padded = causal.clone()
    padded[1, :, 3, 1] = False  # not causal any more: used as given
    y = lf.sdpa(Q, K, V, attn_mask=padded)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(Q, K, V, attn_mask=padded))
    assert not torch.allclose(y, F.scaled_dot_product_attention(Q, K, V, is_causal=True))


# ---------------------------------------------------------------------- tables, both engines
def pearson(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def _causal(cls, cfg_cls, attn, dtype):
    torch.manual_seed(0)
    cfg = cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
                  attn_implementation=attn, initializer_range=0.2)
    return cls(cfg).to(dtype).eval()


MODELS = {
    # random weights at a realistic scale (logits ~1): at the default init of 0.02 a tiny model's
    # activations are ~1e-3 and epsilon = 1e-6 is no longer "small" for the explicit engine
    "llama": lambda attn, dtype: tiny_llama(attn, dtype, initializer_range=0.2),
    "mistral": lambda attn, dtype: _causal(MistralForCausalLM, MistralConfig, attn, dtype),
    "qwen2": lambda attn, dtype: _causal(Qwen2ForCausalLM, Qwen2Config, attn, dtype),
    "bert": lambda attn, dtype: tiny_bert(attn, dtype),
    "vit": lambda attn, dtype: tiny_vit(attn, dtype),  # default gammas: the adapter path
}


def _inputs(name, model, dtype):
    if name == "vit":
        g = torch.Generator().manual_seed(2)
        return "pixel_values", {"pixel_values": torch.randn(2, 3, 16, 16, generator=g).to(dtype)}
    # a padded batch; not for HF's eager causal attention in float64, which turns fully masked
    # padding rows into NaN without lxt (see test_reference_formulation.py)
    eager64 = dtype == D and model.config._attn_implementation == "eager" and name != "bert"
    ids, mask = text_batch(pad_first=0 if eager64 else 2)
    kw = {"inputs_embeds": model.get_input_embeddings()(ids).detach(), "attention_mask": mask}
    if name != "bert":
        kw["use_cache"] = False
    return "inputs_embeds", kw


def relevance(model, comp, name, dtype):
    key, kw = _inputs(name, model, dtype)
    with comp.context(model):
        x = kw[key].clone().requires_grad_()
        logits = model(**{**kw, key: x}).logits
        y = logits[:, -1, 5] if logits.dim() == 3 else logits[:, 1]
        y.backward(y.detach())
    return (x.grad.sum(-1) if key == "inputs_embeds" else x.grad.sum(1)).detach(), y.detach()


# the decoder table is one code path for every family (tests/test_families.py checks each
# against the reference): Llama in both attentions, Qwen2 (biases on q / k / v) in sdpa
TABLE_CASES = [(name, attn) for name in sorted(MODELS) for attn in ("sdpa", "eager")
               if name != "mistral" and (attn == "sdpa" or name != "qwen2")]


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
@pytest.mark.parametrize("name,attn", TABLE_CASES)
def test_engines_agree_on_every_table(name, attn, method):
    """Default epsilon, float32: per-token Pearson >= 0.9999 and equal sums (1e-3); float64
    with epsilon 1e-12 in both: equal to 1e-6 of the largest relevance."""
    factory = getattr(composites, method)
    model = MODELS[name](attn, torch.float32)
    grad, y = relevance(model, factory(model), name, torch.float32)
    expl, _ = relevance(model, factory(model, engine="explicit"), name, torch.float32)
    assert torch.isfinite(grad).all()
    assert pearson(grad, expl) >= 0.9999
    sums_g, sums_e = grad.flatten(1).sum(1), expl.flatten(1).sum(1)
    torch.testing.assert_close(sums_g, sums_e, rtol=1e-3, atol=1e-3 * y.abs().max().item())

    model = MODELS[name](attn, D)
    grad, _ = relevance(model, factory(model, epsilon=1e-12), name, D)
    expl, _ = relevance(model, factory(model, epsilon=1e-12, engine="explicit"), name, D)
    torch.testing.assert_close(grad, expl, rtol=1e-6, atol=1e-6 * expl.abs().max().item())


@pytest.mark.parametrize("name", ["llama", "bert", "vit"])
def test_gradient_engine_bfloat16_agrees_with_float32(name):
    model = MODELS[name]("sdpa", torch.float32)
    r32, _ = relevance(model, composites.attnlrp(model), name, torch.float32)
    model = model.to(torch.bfloat16)
    r16, _ = relevance(model, composites.attnlrp(model), name, torch.bfloat16)
    assert r16.dtype == torch.bfloat16 and torch.isfinite(r16.float()).all()
    assert pearson(r32, r16.float()) >= 0.99


def test_gradient_engine_saves_no_more_than_plain_gradient():
    """Bytes kept for backward (deterministic): the gradient engine keeps at most what plain
    input x gradient keeps, the explicit engine more (it keeps every linear layer's input)."""
    from lxt_bench.speed import saved_bytes

    model = tiny_llama("sdpa", torch.float32, initializer_range=0.2)
    for p in model.parameters():
        p.requires_grad_(False)
    emb = torch.randn(1, 24, 32)
    plain = saved_bytes(model, emb, 3)
    with composites.attnlrp(model).context(model):
        gradient = saved_bytes(model, emb, 3)
    with composites.attnlrp(model, engine="explicit").context(model):
        explicit = saved_bytes(model, emb, 3)
    assert gradient <= plain < explicit, (gradient, plain, explicit)


# ---------------------------------------------------------------------- the user's contract
@pytest.fixture(scope="module")
def llm():
    return tiny_llama("sdpa", torch.float32, initializer_range=0.2), tiny_tokenizer()


def _close(a, b):
    assert pearson(a, b) >= 0.9999, (a, b)
    assert math.isclose(float(a.sum()), float(b.sum()), rel_tol=1e-3, abs_tol=1e-4)


@pytest.mark.parametrize("kwargs", [
    dict(inputs="the capital of france is"),
    dict(inputs="the capital of france is", target="paris", contrast="berlin"),
    dict(inputs=["the cat sat", "a dog ran in the park"], batch_size=2),
    dict(inputs="the cat sat on", generate=2),
    dict(inputs="the capital of france is", layers=["model.layers.*.mlp"]),
], ids=["next-token", "contrast", "batch", "generate", "latent"])
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_explain_gives_the_same_numbers_in_both_engines(llm, kwargs, method):
    model, tok = llm
    factory = composites.attnlrp if method == "attnlrp" else composites.cp_lrp
    grad = lxt.explain(model, tok, method=method, progress=False, **kwargs)
    expl = lxt.explain(model, tok, method=method, composite=factory(model, engine="explicit"),
                       progress=False, **kwargs)
    grad, expl = (x if isinstance(x, list) else [x] for x in (grad, expl))
    for g, e in zip(grad, expl):
        assert g.tokens == e.tokens and g.target == e.target
        _close(g.relevance, e.relevance)
        assert sorted(g.latent) == sorted(e.latent)
        for k in g.latent:
            _close(g.latent[k], e.latent[k])
            assert g.latent[k].shape[-1] == 32  # per position and neuron


class _Residual(nn.Module):
    """A linear layer and a residual sum that TorchDynamo is not allowed to capture."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    @torch.compiler.disable
    def forward(self, x):
        return self.out(x + self.lin(x))


def test_forward_dynamo_cannot_capture_gets_the_full_rules_in_both_engines():
    """Nothing is captured: a forward that TorchDynamo may not trace (``torch.compiler.disable``)
    runs its calls under the rules like any other, in both engines."""
    torch.manual_seed(0)
    model = _Residual().to(D).eval()
    x = _r(3, 6)
    table = {nn.Linear: rules.EpsilonRule(epsilon=1e-12), operator.add: functools.partial(lf.add2, epsilon=1e-12)}

    def rel(engine):
        xx = x.clone().requires_grad_()
        comp = Composite(table, engine=engine, epsilon=1e-12, strict=True)
        with warnings.catch_warnings(record=True) as seen, comp.context(model):
            warnings.simplefilter("always")
            y = model(xx)[:, 0]
            y.backward(y.detach())
        assert not [str(w.message) for w in seen if str(w.message).startswith("lxt")]
        return xx.grad

    # the full rules, written out: epsilon through out, the sum (h = x + lin(x)) and lin
    with torch.no_grad():
        lin, out = model.lin, model.out
        h = x + lin(x)
        y = out(h)[:, 0]
        r_h = h * (out.weight[0] * (y / y)[:, None])           # epsilon rule, R = y
        s = r_h / h                                             # the sum: R / (x + lin x)
        r_x = x * s + x * (s @ lin.weight)                      # both summands, lin by epsilon
    for engine in ("gradient", "explicit"):
        torch.testing.assert_close(rel(engine), r_x, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------------- real weights
@pytest.mark.slow
@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_smollm2_engines_agree_on_the_benchmark_prompts(method):
    """SmolLM2-135M float32, the first 6 of the faithfulness benchmark's prompts (all 60:
    ``lxt bench engines``), the top next token: per-token Pearson >= 0.9999 between the
    gradient engine (default) and the explicit engine near its epsilon -> 0 limit (epsilon
    1e-9), and relevance sums within 1e-4 of the logit (worst of 60, `lxt bench engines`,
    2026-12-01: 1.0e-6 for AttnLRP, 8.7e-7 for CP-LRP; before the calls were rewritten while
    the model runs, AttnLRP's worst was 1.9e-4)."""
    from lxt_bench.engines import compare
    from lxt_bench.faithfulness import load_prompts
    from lxt_data import load_smollm2

    model, tok = load_smollm2(dtype=torch.float32)
    row = compare(model, tok, load_prompts()[:6], method)
    worst_r, worst_sum = row["worst_pearson"], row["worst_sum_difference"]
    assert worst_r >= 0.9999 and worst_sum <= 1e-4, (worst_r, worst_sum)
