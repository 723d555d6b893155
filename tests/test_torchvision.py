"""torchvision's ``VisionTransformer`` (built from its class, random weights) with the
AttnLRP and CP-LRP tables of :mod:`lxt.composites` (row ``torchvision-vit``), both engines.

- forward unchanged while registered, exact restore after leaving the context;
- relevance equal to an independent float64 gradient formulation written here without lxt
  (the ViT forward by hand from the model's parameters: LayerNorm with its std detached,
  GELU with gradient ``gelu(x) / x``, attention with the q and k gradients scaled by 1/4 and
  v by 1/2 (AttnLRP) or q and k detached (CP-LRP), linears, convolution and sums with their
  plain gradient; the gamma rule as zennit formulates it, ``z_mod * (z / z_mod).detach()``);
- CP-LRP conserves with the biases, the position embedding and the class token zeroed;
- ``strict=True``: every operation on the relevance path has a rule;
- ``lxt.explain`` on the plain torchvision module; ``vit_b_16`` at full size, once.

Needs torchvision (``make test-vision``); skipped in the main environment.
"""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

torchvision = pytest.importorskip("torchvision")
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402

import lxt  # noqa: E402

import lxt.composites as tables  # noqa: E402
from helpers import assert_restored, snapshot
from reference import identity_grad, scale_grad  # noqa: E402

D = torch.float64
EPS = 1e-12
ENGINES = ["gradient", "explicit"]
TV = "torchvision-vit"
TABLES = {"attnlrp": (functools.partial(tables.attnlrp, family=TV), False),
          "cplrp": (functools.partial(tables.cp_lrp, family=TV), True)}


def tiny_vit(dtype=D, seed=0):
    """A small VisionTransformer with every parameter random (torchvision zero-initialises
    the head, the class token and the biases)."""
    torch.manual_seed(seed)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                          mlp_dim=64, num_classes=10)
    with torch.no_grad():
        m.heads.head.weight.normal_(0, 0.3)
        m.class_token.normal_()
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    return m.to(dtype).eval()


# ----------------------------------------------------------------------------------------
# the reference formulation (no lxt)
# ----------------------------------------------------------------------------------------


def gamma_grad(call, x, weight, bias, gamma):
    """``call(x, W, b)`` with the gradient of the gamma rule (zennit's formulation)."""
    z = call(x, weight, bias)
    if gamma == 0:
        return z

    def mod(t, sign):
        return None if t is None else t + gamma * (t.clamp(min=0) if sign > 0 else t.clamp(max=0))

    xp, xn = x.clamp(min=0), x.clamp(max=0)
    z_pos = call(xp, mod(weight, 1), mod(bias, 1)) + call(xn, mod(weight, -1), None)
    z_neg = call(xp, mod(weight, -1), mod(bias, -1)) + call(xn, mod(weight, 1), None)
    z_mod = torch.where(z >= 0, z_pos, z_neg)
    scaled = z_mod * (z / z_mod).detach()
    return z.detach() + scaled - scaled.detach()


def layer_norm(x, ln):
    centred = x - x.mean(-1, keepdim=True)
    std = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + ln.eps)
    return centred / std.detach() * ln.weight + ln.bias


def attention(mha, x, cp):
    n, s, e = x.shape
    h = mha.num_heads
    q, k, v = (x @ w.T + b for w, b in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)))
    q, k, v = (t.reshape(n, s, h, e // h).transpose(1, 2) for t in (q, k, v))
    if cp:
        q, k = q.detach(), k.detach()
    else:
        q, k, v = scale_grad(q, 0.25), scale_grad(k, 0.25), scale_grad(v, 0.5)
    a = (q @ k.transpose(-2, -1) / math.sqrt(e // h)).softmax(-1)
    o = (a @ v).transpose(1, 2).reshape(n, s, e)
    return o @ mha.out_proj.weight.T + mha.out_proj.bias


def reference_forward(m, x, cp, conv_gamma=0.0, mlp_gamma=0.0):
    """torchvision's VisionTransformer.forward, written out from its parameters."""
    conv = m.conv_proj
    x = gamma_grad(conv._conv_forward, x, conv.weight, conv.bias, conv_gamma)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], 1) + m.encoder.pos_embedding
    for block in m.encoder.layers:
        x = x + attention(block.self_attention, layer_norm(x, block.ln_1), cp)
        fc1, fc2 = block.mlp[0], block.mlp[3]
        y = gamma_grad(F.linear, layer_norm(x, block.ln_2), fc1.weight, fc1.bias, mlp_gamma)
        y = gamma_grad(F.linear, identity_grad(F.gelu, y), fc2.weight, fc2.bias, mlp_gamma)
        x = x + y
    x = layer_norm(x, m.encoder.ln)[:, 0]
    return x @ m.heads.head.weight.T + m.heads.head.bias


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


# snapshot / assert_restored: tests/test_composite.py


def lxt_relevance(model, comp, x, targets):
    """Per-pixel relevance (summed over channels) of each sample's target logit, and the
    logits, with ``comp`` registered; the model is checked restored afterwards."""
    snap = snapshot(model)
    with comp.context(model):
        xl = x.clone().requires_grad_()
        out = model(xl)
        logit = out[torch.arange(len(targets)), targets]
        logit.backward(logit.detach())  # explicit LRP: start with R = the logit
        assert isinstance(model.encoder.layers[0].self_attention, lxt.modules.MultiheadAttention)
    assert_restored(model, snap)
    return xl.grad.sum(1), out.detach()


def reference_relevance(model, x, targets, cp, **gammas):
    xr = x.clone().requires_grad_()
    out = reference_forward(model, xr, cp, **gammas)
    out[torch.arange(len(targets)), targets].sum().backward()
    return (xr * xr.grad).detach().sum(1), out.detach()


def assert_relevance_close(actual, expected, rtol):
    assert torch.isfinite(actual).all()
    scale = expected.abs().max()
    err = ((actual - expected).abs().max() / scale).item()
    assert scale > 0 and err <= rtol, (err, actual, expected)
    return err


# ----------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", sorted(TABLES))
def test_tiny_vit_matches_reference_and_restores(name, engine):
    """gamma = 0 (the epsilon rule): forward unchanged, relevance = the reference, every op
    covered (strict), the model restored exactly and its forward bit-identical after."""
    factory, cp = TABLES[name]
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = model(x)
    targets = stock.argmax(-1)
    comp = factory(epsilon=EPS, engine=engine, conv_gamma=0.0, mlp_gamma=0.0, strict=True)
    rel, out = lxt_relevance(model, comp, x, targets)
    torch.testing.assert_close(out, stock, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock, rtol=0, atol=0)
    assert not comp.summary().unsafe
    expected, ref_out = reference_relevance(model, x, targets, cp)
    torch.testing.assert_close(ref_out, stock, rtol=1e-12, atol=1e-12)
    err = assert_relevance_close(rel, expected, rtol=1e-7)
    print(f"torchvision vit {name} {engine}: max|err|/max|R| {err:.1e}, max|fwd diff| "
          f"{(out - stock).abs().max().item():.1e}")


@pytest.mark.parametrize("engine", ENGINES)
def test_default_gammas_match_the_gamma_reference(engine):
    """The default table: gamma 0.25 on conv_proj and 0.05 on the MLP linears (as lxt's HF
    ViT table), against the gamma formulation with those values."""
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        targets = model(x).argmax(-1)
    comp = tables.attnlrp(family=TV, engine=engine, epsilon=EPS if engine == "explicit" else None)
    rel, _ = lxt_relevance(model, comp, x, targets)
    expected, _ = reference_relevance(model, x, targets, False, conv_gamma=tables.CONV_GAMMA, mlp_gamma=tables.MLP_GAMMA)
    plain, _ = reference_relevance(model, x, targets, False)
    tol = 1e-7 if engine == "explicit" else 1e-4  # gradient engine: default epsilon 1e-6
    err = assert_relevance_close(rel, expected, rtol=tol)
    gap = ((plain - expected).abs().max() / expected.abs().max()).item()
    assert gap > 100 * tol, gap
    print(f"torchvision vit default gammas {engine}: max|err|/max|R| {err:.1e}, gamma = 0 differs by {gap:.1e}")


@pytest.mark.parametrize("engine", ENGINES)
def test_cp_lrp_conserves_without_biases(engine):
    """CP-LRP, default gammas, zero biases, position embedding and class token (constants that
    absorb relevance): the pixel relevance sums to the explained logit."""
    model = tiny_vit()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name in ("class_token", "encoder.pos_embedding"):
                p.zero_()
    x = torch.randn(2, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        targets = model(x).argmax(-1)
    rel, out = lxt_relevance(model, tables.cp_lrp(family=TV, epsilon=EPS, engine=engine), x, targets)
    logits = out[torch.arange(2), targets]
    for i in range(2):
        assert math.isclose(rel[i].sum().item(), logits[i].item(), rel_tol=1e-9), (rel[i].sum(), logits[i])


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_explain_on_the_torchvision_module(method):
    """lxt.explain takes the plain module (model(image) -> logits) with the table's composite."""
    model = tiny_vit(torch.float32)
    image = torch.randn(3, 32, 32)
    comp = tables.attnlrp(family=TV) if method == "attnlrp" else tables.cp_lrp(family=TV)
    exp = lxt.explain(model, inputs=image, method=method, composite=comp)
    with torch.no_grad():
        logits = model(image[None])
    assert exp.relevance.shape == (32, 32) and torch.isfinite(exp.relevance).all()
    assert exp.target == int(logits.argmax()) and math.isclose(exp.logit, logits.max().item(), rel_tol=1e-5)
    assert "forward" not in model.__dict__ and comp.model is None
    base = lxt.explain(model, inputs=image, method="input_x_gradient", target=3)
    assert base.target == 3
    # without composite=: lxt.composites picks the torchvision table (no config.model_type)
    picked = getattr(lxt.composites, method.replace("-", "_"))(model)
    assert picked.name == comp.name
    again = lxt.explain(model, inputs=image, method=method)
    torch.testing.assert_close(again.relevance, exp.relevance)


def test_vit_b_16_full_size():
    """torchvision.models.vit_b_16 (random weights, 86M parameters), one 224 x 224 image:
    forward unchanged (float32) and finite, non-zero relevance with the AttnLRP table."""
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.02)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        stock = model(x)
    target = stock.argmax(-1)
    rel, out = lxt_relevance(model, tables.attnlrp(family=TV, strict=True), x, target)
    torch.testing.assert_close(out, stock, rtol=1e-4, atol=1e-4)
    assert rel.shape == (1, 224, 224) and torch.isfinite(rel).all() and rel.abs().sum() > 0
    print(f"vit_b_16: max|fwd diff| {(out - stock).abs().max().item():.1e}, "
          f"sum R {rel.sum().item():.3g} for logit {out[0, target].item():.3g}")
