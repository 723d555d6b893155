"""Reliability: nothing lost, nothing leaked — under faults, odd models and bad input.

Every test injects one fault (or one odd model / bad input) and then checks the exact restore:
the same module objects, the same state_dict, bit-identical outputs, the same requires_grad
flags and hooks, and nothing of lxt left on the model or in global registries.

Bugs found while writing this suite were fixed; their tests stay here as regressions.
"""
import copy
import gc
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lxt
import lxt.composites as composites
import lxt.core.opaque as opaque
import lxt.functional as lf
from lxt import Composite, rules
from models import text_batch, tiny_llama, tiny_tokenizer, tiny_vit
from helpers import assert_restored, snapshot

D = torch.float64
TARGET = 7  # explained vocabulary entry, row 1 (the left-padded sequence), last position


# ---------------------------------------------------------------------------------- helpers
def global_state():
    """Process-wide state a registration could touch."""
    import torch._dynamo.config as dynamo_config
    from transformers import LlamaForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    from transformers.models.llama import modeling_llama

    return {
        "attention_global": dict(AttentionInterface._global_mapping),
        "attention_all_global": dict(ALL_ATTENTION_FUNCTIONS._global_mapping),
        "attention_all_local": dict(ALL_ATTENTION_FUNCTIONS._local_mapping),
        "llama_module": dict(vars(modeling_llama)),
        "llama_class": dict(vars(LlamaForCausalLM)),
        "llama_classes": {n: dict(vars(c)) for n, c in vars(modeling_llama).items()
                          if isinstance(c, type) and issubclass(c, nn.Module)},
        "F": dict(vars(F)),
        "torch": {n: getattr(torch, n) for n in ("matmul", "add", "mul", "tanh", "softmax", "bmm")},
        "tensor_methods": {n: getattr(torch.Tensor, n) for n in dir(torch.Tensor)},
        "operator": {n: getattr(operator, n) for n in ("add", "mul", "truediv", "neg", "matmul")},
        "module_call": nn.Module.__call__,
        "grad": torch.is_grad_enabled(),
        "inference": torch.is_inference_mode_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "dynamo_config": dynamo_config.get_config_copy(),
        "global_forward_hooks": dict(nn.modules.module._global_forward_hooks),
        "global_forward_pre_hooks": dict(nn.modules.module._global_forward_pre_hooks),
        "global_backward_hooks": dict(nn.modules.module._global_backward_hooks),
    }


def assert_globals_unchanged(before):
    after = global_state()
    assert after.keys() == before.keys()
    for key in before:
        if key == "llama_classes":
            assert after[key].keys() == before[key].keys()
            for cls in before[key]:
                assert after[key][cls] == before[key][cls], f"class {cls} was changed"
        else:
            assert after[key] == before[key], f"global state {key!r} was changed"


def assert_nothing_of_lxt(model):
    """No lxt object left on the model; no tap left in lxt's tables."""
    gc.collect()
    for name, m in model.named_modules():
        assert not isinstance(m, lxt.rules.base.LxtModule), name
        assert "lxt_composite" not in vars(getattr(m, "forward", None) or (lambda: None)), name
        assert not any("lxt" in k for k in vars(m)), name
    ours = {id(m) for m in model.modules()}
    for key, lxt_module in list(opaque._MODULES.items()):
        inner = getattr(lxt_module, "module", None)
        assert id(inner) not in ours, f"an lxt wrapper of one of our modules survives (key {key})"
    assert not opaque._TAPS, "a tap callback was left registered"


def check_exact_restore(model, snap, run_plain, ref_out):
    assert_restored(model, snap)
    assert_nothing_of_lxt(model)
    out = run_plain()
    assert torch.equal(out, ref_out), "output after remove is not bit-identical"


def plain_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def lrp(model, comp, ids, mask, row=1, target=TARGET, register=True):
    """Relevance of inputs_embeds for logits[row, -1, target] (R starts at the logit)."""
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    ctx = comp.context(model) if register else _nullctx()
    with ctx:
        logits = model(inputs_embeds=emb, attention_mask=mask, use_cache=False).logits
        logit = logits[row, -1, target]
        logit.backward(logit)
    return emb.grad.detach().clone(), logits.detach()


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _raiser(exc_type, msg="injected fault"):
    def hook(*args, **kwargs):
        raise exc_type(msg) if exc_type is not KeyboardInterrupt else KeyboardInterrupt()
    return hook


@pytest.fixture(scope="module")
def llama64():
    """A float64 tiny Llama, its reference AttnLRP relevance and plain logits (built once)."""
    model = tiny_llama("sdpa", D)
    ids, mask = text_batch()
    ref_rel, _ = lrp(model, composites.attnlrp(model), ids, mask)
    ref_out = plain_logits(model, ids, mask)
    return model, ids, mask, ref_rel, ref_out


# ----------------------------------------------------------------------------- isolation
def test_registering_one_model_changes_no_other_model_class_or_global_state():
    """Two models of one class: one registered, one not; no global registry or torch state
    changes (attention registry, functions, Tensor methods, grad mode, dtype, dynamo config)."""
    a, b = tiny_llama("sdpa", D), tiny_llama("sdpa", D)
    ids, mask = text_batch()
    plain_b_rel = None
    emb = b.get_input_embeddings()(ids).detach().requires_grad_()
    b(inputs_embeds=emb, attention_mask=mask).logits[1, -1, TARGET].backward()
    plain_b_rel = emb.grad.clone()
    out_b = plain_logits(b, ids, mask)
    snap_b = snapshot(b)
    before = global_state()

    comp = composites.attnlrp(a)
    with comp.context(a):
        lrp_a, _ = lrp(a, comp, ids, mask, register=False)
        # the twin is untouched, outputs and (plain) gradients included, while `a` is patched
        assert_restored(b, snap_b)
        assert torch.equal(plain_logits(b, ids, mask), out_b)
        emb = b.get_input_embeddings()(ids).detach().requires_grad_()
        b(inputs_embeds=emb, attention_mask=mask).logits[1, -1, TARGET].backward()
        assert torch.equal(emb.grad, plain_b_rel), "the unregistered twin got LRP relevance"
        assert all(p.requires_grad for p in b.parameters())
        # nothing global changes while registered either (besides lxt's own key tables)
        assert_globals_unchanged(before)
    assert_globals_unchanged(before)
    assert not torch.allclose(lrp_a, plain_b_rel)  # the registered one really got LRP


def test_user_torch_compile_of_the_twin_is_not_affected():
    """Dynamo's cache of a registration is not shared with the user's own torch.compile."""
    a, b = tiny_llama("sdpa", D), tiny_llama("sdpa", D)
    ids, mask = text_batch()
    emb = b.get_input_embeddings()(ids).detach().requires_grad_()
    b(inputs_embeds=emb, attention_mask=mask).logits[1, -1, TARGET].backward()
    eager = emb.grad.clone()
    compiled_b = torch.compile(b, backend="eager")
    with composites.attnlrp(a).context(a):
        lrp(a, None, ids, mask, register=False)
        emb = b.get_input_embeddings()(ids).detach().requires_grad_()
        compiled_b(inputs_embeds=emb, attention_mask=mask).logits[1, -1, TARGET].backward()
    torch.testing.assert_close(emb.grad, eager, rtol=1e-12, atol=1e-12)
    del compiled_b
    torch._dynamo.reset()


def test_attnlrp_and_cp_lrp_on_two_models_at_once_equal_each_alone():
    base = tiny_llama("sdpa", D)
    ids, mask = text_batch()
    alone_attn, _ = lrp(copy.deepcopy(base), composites.attnlrp(base), ids, mask)
    alone_cp, _ = lrp(copy.deepcopy(base), composites.cp_lrp(base), ids, mask)
    assert not torch.allclose(alone_attn, alone_cp)

    a, c = copy.deepcopy(base), copy.deepcopy(base)
    snap_a, snap_c = snapshot(a), snapshot(c)
    comp_a, comp_c = composites.attnlrp(a), composites.cp_lrp(c)
    with comp_a.context(a), comp_c.context(c):
        emb_a = a.get_input_embeddings()(ids).detach().requires_grad_()
        emb_c = c.get_input_embeddings()(ids).detach().requires_grad_()
        # interleaved: both forwards, then the backwards in the other order
        la = a(inputs_embeds=emb_a, attention_mask=mask).logits[1, -1, TARGET]
        lc = c(inputs_embeds=emb_c, attention_mask=mask).logits[1, -1, TARGET]
        lc.backward(lc)
        la.backward(la)
    torch.testing.assert_close(emb_a.grad, alone_attn, rtol=0, atol=0)
    torch.testing.assert_close(emb_c.grad, alone_cp, rtol=0, atol=0)
    assert_restored(a, snap_a)
    assert_restored(c, snap_c)


# --------------------------------------------------------------------------------- faults
FORWARD_FAULTS = [
    pytest.param(RuntimeError, id="exception"),
    pytest.param(KeyboardInterrupt, id="keyboard-interrupt"),
]


@pytest.mark.parametrize("exc", FORWARD_FAULTS)
def test_fault_in_forward_leaves_model_exactly_restored(llama64, exc):
    model, ids, mask, _, ref_out = llama64
    snap = snapshot(model)
    comp = composites.attnlrp(model)
    with pytest.raises(exc):
        with comp.context(model):
            handle = model.model.layers[1].mlp.register_forward_pre_hook(_raiser(exc))
            try:
                emb = model.get_input_embeddings()(ids).detach().requires_grad_()
                model(inputs_embeds=emb, attention_mask=mask)
            finally:
                handle.remove()
    check_exact_restore(model, snap, lambda: plain_logits(model, ids, mask), ref_out)


@pytest.mark.parametrize("exc", FORWARD_FAULTS)
def test_fault_in_backward_leaves_model_exactly_restored(llama64, exc):
    model, ids, mask, ref_rel, ref_out = llama64
    snap = snapshot(model)
    comp = composites.attnlrp(model)
    with pytest.raises(exc):
        with comp.context(model):
            emb = model.get_input_embeddings()(ids).detach().requires_grad_()
            # a hook on an intermediate tensor: raises in the middle of the backward pass
            hidden = model.model.layers[0].register_forward_hook(
                lambda mod, args, out: out.register_hook(_raiser(exc)) and None)
            try:
                logits = model(inputs_embeds=emb, attention_mask=mask).logits
            finally:
                hidden.remove()
            logit = logits[1, -1, TARGET]
            logit.backward(logit)
    check_exact_restore(model, snap, lambda: plain_logits(model, ids, mask), ref_out)
    # the registration after the fault is as good as ever
    rel, _ = lrp(model, composites.attnlrp(model), ids, mask)
    torch.testing.assert_close(rel, ref_rel, rtol=0, atol=0)


@pytest.mark.parametrize("exc", FORWARD_FAULTS)
def test_fault_in_user_code_inside_context(llama64, exc):
    model, ids, mask, _, ref_out = llama64
    snap = snapshot(model)
    comp = composites.attnlrp(model)
    with pytest.raises(exc):
        with comp.context(model):
            emb = model.get_input_embeddings()(ids).detach().requires_grad_()
            model(inputs_embeds=emb, attention_mask=mask)  # the forward runs registered
            _raiser(exc)()
    check_exact_restore(model, snap, lambda: plain_logits(model, ids, mask), ref_out)
    assert comp.model is None and comp._installed is None


def test_keyboard_interrupt_during_register_rolls_back(llama64, monkeypatch):
    """A KeyboardInterrupt after the modules were swapped and parameters frozen."""
    import lxt.core.composite as core

    model, ids, mask, _, ref_out = llama64
    snap = snapshot(model)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt()

    monkeypatch.setattr(core, "PatchedForward", interrupted)
    comp = composites.attnlrp(model)
    with pytest.raises(KeyboardInterrupt):
        comp.register(model)
    check_exact_restore(model, snap, lambda: plain_logits(model, ids, mask), ref_out)


def test_backward_twice_with_retain_graph_gives_the_same_relevance(llama64):
    model, ids, mask, ref_rel, _ = llama64
    with composites.attnlrp(model).context(model):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        logit = model(inputs_embeds=emb, attention_mask=mask).logits[1, -1, TARGET]
        logit.backward(logit, retain_graph=True)
        first = emb.grad.clone()
        emb.grad = None
        logit.backward(logit)
    torch.testing.assert_close(emb.grad, first, rtol=0, atol=0)
    torch.testing.assert_close(first, ref_rel, rtol=0, atol=0)


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_same_registration_explains_correctly_after_a_transient_forward_fault(llama64, exc):
    model, ids, mask, ref_rel, _ = llama64
    comp = composites.attnlrp(model)
    with comp.context(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = model.model.layers[1].mlp.register_forward_pre_hook(_raiser(exc))
        try:
            with pytest.raises(exc):
                emb = model.get_input_embeddings()(ids).detach().requires_grad_()
                model(inputs_embeds=emb, attention_mask=mask)
        finally:
            handle.remove()
        rel, _ = lrp(model, comp, ids, mask, register=False)
    torch.testing.assert_close(rel, ref_rel, rtol=1e-10, atol=1e-12)


def test_failing_forward_runs_user_hooks_once(llama64):
    model, ids, mask, _, _ = llama64
    calls = []

    def hook(mod, args):
        calls.append(1)
        raise ValueError("injected fault")

    with composites.attnlrp(model).context(model):
        handle = model.model.layers[1].mlp.register_forward_pre_hook(hook)
        try:
            with pytest.raises(ValueError, match="injected fault"):
                model(input_ids=ids, attention_mask=mask)
        finally:
            handle.remove()
    assert len(calls) == 1, f"the forward ran {len(calls)} times"


def test_hook_added_after_first_forward_still_runs(llama64):
    model, ids, mask, _, _ = llama64
    seen = []
    with composites.attnlrp(model).context(model):
        model(input_ids=ids, attention_mask=mask)
        handle = model.model.layers[0].register_forward_hook(lambda *args: seen.append(1))
        try:
            model(input_ids=ids, attention_mask=mask)
        finally:
            handle.remove()
    assert seen == [1]


# ----------------------------------------------------------------------------- odd models
def _offload_map():
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture
def offloaded(tmp_path):
    from accelerate import dispatch_model

    base = tiny_llama("sdpa", torch.float32)
    ids, mask = text_batch()
    ref_out = plain_logits(base, ids, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dispatch_model(copy.deepcopy(base), device_map=_offload_map(),
                               offload_dir=str(tmp_path / "offload"))
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # really on disk
    return base, model, ids, mask, ref_out


def test_accelerate_offload_hooks_survive_register_and_remove(offloaded):
    base, model, ids, mask, ref_out = offloaded
    torch.testing.assert_close(plain_logits(model, ids, mask), ref_out)
    accel_forward = model.__dict__["forward"]
    hooks = {n: m._hf_hook for n, m in model.named_modules() if hasattr(m, "_hf_hook")}
    old_forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    assert hooks
    comp = composites.attnlrp(model)
    with comp.context(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rel, out = lrp(model, comp, ids, mask, register=False)
    torch.testing.assert_close(out, ref_out)  # forward unchanged while registered
    assert not [str(w.message) for w in caught if str(w.message).startswith("lxt")]
    # accelerate's hooks and forwards are back, the same objects
    assert model.__dict__["forward"] is accel_forward
    assert {n: m._hf_hook for n, m in model.named_modules() if hasattr(m, "_hf_hook")} == hooks
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == old_forwards
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    assert_nothing_of_lxt(model)
    torch.testing.assert_close(plain_logits(model, ids, mask), ref_out, rtol=0, atol=0)


def test_accelerate_offload_requires_grad_restored(offloaded):
    _, model, ids, mask, _ = offloaded
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    modules = list(model.modules())
    comp = composites.attnlrp(model, trace=False)
    with comp.context(model):
        lrp(model, comp, ids, mask, register=False)
    # accelerate swaps the offloaded Parameter objects on every forward: flags come back by name
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert all(a is b for a, b in zip(model.modules(), modules))


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_accelerate_disk_offload_is_explained_with_the_full_rules(offloaded, method):
    """A layer on disk (accelerate loads its weights around each forward): the full rules
    apply and the relevance is the in-memory model's."""
    base, model, ids, mask, _ = offloaded
    comp = getattr(composites, method)(model)
    with comp.context(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rel, _ = lrp(model, comp, ids, mask, register=False)
        summary = comp.summary()
    assert summary.failure is None and summary.unsafe == []
    assert not [str(w.message) for w in caught if str(w.message).startswith("lxt")]
    ref_rel, _ = lrp(base, getattr(composites, method)(base), ids, mask)
    torch.testing.assert_close(rel, ref_rel, rtol=0, atol=0)


def test_gradient_checkpointing_in_eval_mode_gives_the_same_relevance(llama64):
    model, ids, mask, ref_rel, ref_out = llama64
    gc_model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gc_model.gradient_checkpointing_enable()
    snap = snapshot(gc_model)
    rel, _ = lrp(gc_model, composites.attnlrp(gc_model), ids, mask)
    torch.testing.assert_close(rel, ref_rel, rtol=0, atol=0)
    check_exact_restore(gc_model, snap, lambda: plain_logits(gc_model, ids, mask), ref_out)


def test_gradient_checkpointing_in_train_mode_gives_the_same_relevance(llama64):
    model, ids, mask, ref_rel, _ = llama64  # attention_dropout = 0: train mode is deterministic
    gc_model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc_model.gradient_checkpointing_enable()
        gc_model.train()
        rel, _ = lrp(gc_model, composites.attnlrp(gc_model), ids, mask)
    torch.testing.assert_close(rel, ref_rel, rtol=1e-6, atol=1e-9)


def test_generate_while_registered_and_after_remove():
    model = tiny_llama("sdpa", torch.float32)
    ids, mask = text_batch()
    gen = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
    ref = model.generate(ids, **gen)
    snap = snapshot(model)
    comp = composites.attnlrp(model)
    with comp.context(model):
        with torch.no_grad():
            assert torch.equal(model.generate(ids, **gen), ref)
        assert torch.equal(model.generate(ids, **gen), ref)  # grad mode on: traced again
    assert_restored(model, snap)
    assert_nothing_of_lxt(model)
    assert torch.equal(model.generate(ids, **gen), ref)


def test_bfloat16_relevance_is_finite_and_matches_float32():
    base = tiny_llama("sdpa", torch.float32)
    ids, mask = text_batch()
    r32, _ = lrp(base, composites.attnlrp(base), ids, mask)
    bf = copy.deepcopy(base).to(torch.bfloat16)
    snap = snapshot(bf)
    r16, _ = lrp(bf, composites.attnlrp(bf), ids, mask)
    assert r16.dtype == torch.bfloat16 and torch.isfinite(r16).all()
    a, b = r16.float()[1].sum(-1), r32[1].sum(-1)
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99
    assert torch.corrcoef(torch.stack([r16.float().flatten(), r32.flatten()]))[0, 1] > 0.98
    assert_restored(bf, snap)


def _float16_error():
    model = tiny_llama("sdpa", torch.float16)
    ids, mask = text_batch()
    snap = snapshot(model)
    with pytest.raises(Exception) as info:
        lrp(model, composites.attnlrp(model), ids, mask)
    assert_restored(model, snap)
    return info


def test_float16_is_refused_naming_bfloat16_and_model_restored():
    info = _float16_error()
    assert "bfloat16" in str(info.value)


def test_float16_error_is_lxts_own_clear_type_error():
    info = _float16_error()
    assert type(info.value) is TypeError
    assert str(info.value).startswith("lxt:")


class _Breaks(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        h = self.lin(x) * x
        torch._dynamo.graph_break()
        return h + x


class _Disabled(_Breaks):
    @torch.compiler.disable
    def forward(self, x):
        return self.lin(x) * x + x


SMALL_MAP = {nn.Linear: rules.EpsilonRule, operator.add: lf.add2, operator.mul: lf.mul2}


def _run_small(cls):
    torch.manual_seed(0)
    model = cls().to(D).eval()
    x = torch.randn(2, 4, dtype=D)
    ref = model(x)
    snap = snapshot(model)
    comp = Composite(SMALL_MAP)
    with comp.context(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xx = x.clone().requires_grad_()
        y = model(xx)
        y.sum().backward()
        summary = comp.summary()
    assert torch.equal(y.detach(), ref.detach())
    assert_restored(model, snap)
    return xx.grad, summary, [str(w.message) for w in caught]


@pytest.mark.parametrize("cls", [_Breaks, _Disabled])
def test_graph_breaks_and_forwards_dynamo_skips_get_the_full_rules(cls):
    """Nothing is captured, so a graph break or a forward TorchDynamo may not trace changes
    nothing: every call is rewritten."""
    grad, summary, messages = _run_small(cls)
    assert not [m for m in messages if m.startswith("lxt")]
    assert {r.op for r in summary.ops if r.rewritten} == {"add", "mul"} and summary.unsafe == []
    torch.manual_seed(0)
    w = cls().to(D).lin.weight.detach()  # the weights _run_small used
    x = torch.randn(2, 4, dtype=D)
    z = x @ w.T
    h = z * x
    r_h = h / (h + x)  # epsilon rule on h + x, R = 1 at every output
    r_x = x / (h + x) + r_h / 2 + x * ((r_h / 2 / z) @ w)  # uniform rule on z * x, epsilon on lin
    torch.testing.assert_close(grad, r_x, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [
    {(nn.Linear, nn.LayerNorm, nn.GELU): rules.EpsilonRule},   # 3-tuple
    {nn.Linear: "epsilon"},                                    # name instead of rule
    {operator.add: "add2"},
    {"model.layers.*": rules.EpsilonRule},                      # pattern in the layer map
    {(nn.Linear, (operator.add,)): lf.add2},
    [nn.Linear, rules.EpsilonRule],                            # not pairs
])
def test_wrong_types_in_layer_map_are_clear_errors(bad):
    with pytest.raises(TypeError, match="lxt"):
        Composite(bad)


@pytest.mark.parametrize("bad", [
    {"model.layers.0.*": rules.EpsilonRule},
    {3: {nn.Linear: rules.EpsilonRule}},
    {"model.layers.0.*": {nn.Linear: 3}},
])
def test_wrong_types_in_overrides_are_clear_errors(bad):
    with pytest.raises(TypeError, match="lxt"):
        Composite({nn.Linear: rules.EpsilonRule}, overrides=bad)


def test_module_instance_as_layer_map_key_is_an_error():
    with pytest.raises(TypeError, match="lxt"):
        Composite({nn.Linear(2, 2): rules.EpsilonRule})


@pytest.mark.parametrize("make", [
    lambda: rules.EpsilonRule(epsilon=float("nan")),
    lambda: rules.EpsilonRule(epsilon=float("inf")),
    lambda: rules.GammaRule(gamma=float("nan")),
], ids=["eps-nan", "eps-inf", "gamma-nan"])
def test_non_finite_rule_parameters_are_refused(make):
    with pytest.raises(ValueError, match="lxt"):
        make()


def test_rule_that_does_not_fit_is_refused_before_anything_changes(llama64):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model, ids, mask, _, ref_out = llama64
    snap = snapshot(model)
    for bad in ({LlamaRMSNorm: rules.GammaRule}, {nn.Embedding: rules.GammaRule(gamma=0.1),
                                                 nn.Linear: lambda m: "not a module"}):
        with pytest.raises(TypeError, match="lxt: cannot build"):
            Composite(bad).register(model)
        check_exact_restore(model, snap, lambda: plain_logits(model, ids, mask), ref_out)


class _KeywordCall(nn.Module):
    def __init__(self, keyword):
        super().__init__()
        self.lin = nn.Linear(3, 3, bias=False)
        self.keyword = keyword

    def forward(self, x):
        return self.lin(input=x) if self.keyword else self.lin(x)


def test_rule_applies_to_modules_called_with_keyword_tensors():
    def rel(keyword):
        torch.manual_seed(0)
        model = _KeywordCall(keyword).to(D).eval()
        x = torch.randn(2, 3, dtype=D, requires_grad=True)
        with Composite({nn.Linear: rules.EpsilonRule(epsilon=10.0)}, trace=False).context(model):
            y = model(x)
            y.backward(y)
        return x.grad

    torch.testing.assert_close(rel(True), rel(False))


@pytest.fixture(scope="module")
def llm():
    return tiny_llama("sdpa", torch.float32), tiny_tokenizer()


@pytest.mark.parametrize("kwargs,match", [
    (dict(inputs=""), "empty prompt"),
    (dict(inputs=["the cat", " "]), "empty prompt"),
    (dict(inputs=[]), "no prompt"),
    (dict(inputs="the cat " * 40), "longer than the model's context"),
    (dict(inputs="the cat", target=101), "outside the output"),
    (dict(inputs="the cat", target=-1), "outside the output"),
    (dict(inputs="the cat", target=" paris berlin"), "2 tokens"),
    (dict(inputs="the cat", generate=2, target=None, method="nope"), "unknown method"),
])
def test_bad_explain_input_is_a_clear_error_and_model_restored(llm, kwargs, match):
    model, tok = llm
    ids = torch.tensor([[5, 6, 7]])
    ref_out = plain_logits(model, ids, None)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lxt.explain(model, tok, **kwargs)
    check_exact_restore(model, snap, lambda: plain_logits(model, ids, None), ref_out)


def test_target_outside_vocabulary_is_refused(llm):
    model, tok = llm
    with pytest.raises(ValueError, match="lxt"):
        lxt.explain(model, tok, "the cat sat", target=" zebra")


@pytest.mark.parametrize("contrast", [1000, -1])
def test_contrast_outside_the_output_is_a_clear_error(llm, contrast):
    model, tok = llm
    with pytest.raises(ValueError, match="lxt"):
        lxt.explain(model, tok, "the cat sat", target=" paris", contrast=contrast)


def test_input_without_requires_grad_is_an_error_and_model_restored(llama64):
    model, ids, mask, _, ref_out = llama64
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="does not require grad"):
        with composites.attnlrp(model).context(model):
            emb = model.get_input_embeddings()(ids).detach()  # forgot requires_grad_()
            logit = model(inputs_embeds=emb, attention_mask=mask).logits[1, -1, TARGET]
            logit.backward(logit)
    check_exact_restore(model, snap, lambda: plain_logits(model, ids, mask), ref_out)


def test_nan_in_one_sequence_stays_in_that_sequence(llama64):
    """NaN input is never hidden (its row's relevance is NaN) and never leaks into another
    sequence of the batch (whose relevance equals the clean run's)."""
    model, ids, mask, ref_rel, _ = llama64
    emb = model.get_input_embeddings()(ids).detach()
    emb[0, 2, 0] = float("nan")
    emb.requires_grad_()
    with composites.attnlrp(model).context(model):
        logits = model(inputs_embeds=emb, attention_mask=mask).logits
        logit = logits[1, -1, TARGET]
        logit.backward(logit)
    assert torch.isnan(logits[0, -1]).all()
    assert torch.isfinite(logits[1]).all()
    torch.testing.assert_close(emb.grad[1], ref_rel[1], rtol=1e-10, atol=1e-12)
    # the NaN row is not explained, but NaN may still reach it (0 * NaN), never a finite value
    row0 = emb.grad[0]
    assert (row0 == 0).all() or torch.isnan(row0).any()


def test_nan_image_is_refused_and_model_restored():
    vit = tiny_vit("sdpa", torch.float32)
    img = torch.randn(3, 16, 16)
    img[1, 2, 3] = float("inf")
    snap = snapshot(vit)
    with pytest.raises(ValueError, match="NaN or inf"):
        lxt.explain(vit, None, img)
    assert_restored(vit, snap)
    assert_nothing_of_lxt(vit)


def test_non_finite_text_embedding_is_an_error_or_warning(llm):
    model, tok = llm
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.embed_tokens.weight[tok.convert_tokens_to_ids("cat")] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            exp = lxt.explain(model, tok, "the cat sat")
        except ValueError as err:
            assert "nan" in str(err).lower() or "inf" in str(err).lower()
            return
    assert torch.isfinite(exp.relevance).all() or any(
        "nan" in str(w.message).lower() or "inf" in str(w.message).lower() for w in caught)


def test_gradient_checkpointing_keeps_less_for_backward_with_equal_relevance():
    """Checkpointing (train mode) keeps far fewer tensors for backward; the relevance is equal."""
    model = tiny_llama("sdpa", torch.float64, layers=4)
    gc_model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc_model.gradient_checkpointing_enable()
    gc_model.train()
    emb = torch.randn(1, 64, 32, dtype=torch.float64)
    results = []
    for m in (model, gc_model):
        weights = {p.untyped_storage().data_ptr() for p in m.parameters()}
        seen = {}

        def pack(t, seen=seen, weights=weights):
            st = t.untyped_storage()
            if st.data_ptr() not in weights:
                seen[st.data_ptr()] = st.nbytes()
            return t

        x = emb.clone().requires_grad_()
        with composites.attnlrp(m).context(m), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logit = m(inputs_embeds=x, use_cache=False).logits[0, -1, 3]
            logit.backward(logit)
        results.append((sum(seen.values()), x.grad))
    (plain_bytes, plain_rel), (gc_bytes, gc_rel) = results
    torch.testing.assert_close(gc_rel, plain_rel, rtol=1e-10, atol=1e-12)
    assert gc_bytes < plain_bytes / 4, (gc_bytes, plain_bytes)
