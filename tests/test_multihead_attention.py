"""Torch-native attention outside HuggingFace: ``nn.MultiheadAttention`` as
:class:`lxt.modules.MultiheadAttention`, and a hand-written model calling
``F.scaled_dot_product_attention``.

- forward: the lxt module returns what ``nn.MultiheadAttention`` returns (outputs and averaged
  weights) across its options, to float64 round-off;
- relevance: equal to an independent float64 gradient formulation of the same rules written
  here without lxt (``x * grad`` of a forward with detach tricks: AttnLRP scales the q and k
  gradients by 1/4 and v by 1/2, CP-LRP detaches q and k; LayerNorm with its std detached,
  GELU with gradient ``gelu(x) / x``; linears and sums keep their plain gradient, the epsilon
  rule as epsilon -> 0), for the module alone and for models through a ``Composite`` in both
  engines;
- conservation (CP-LRP, zero biases), exact restore.

No torchvision needed (tests/test_torchvision.py covers its ViT).
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lxt

import lxt.modules as lm
from lxt.composites import layer_map
from helpers import assert_restored, snapshot
from reference import identity_grad, scale_grad

D = torch.float64
EPS = 1e-12
ENGINES = ["gradient", "explicit"]


# ----------------------------------------------------------------------------------------
# the reference formulation (no lxt)
# ----------------------------------------------------------------------------------------


def ref_layer_norm(x, weight, bias, eps):
    """``(x - mean) / std.detach() * w + b``."""
    centred = x - x.mean(-1, keepdim=True)
    std = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    out = centred / std.detach()
    out = out * weight if weight is not None else out
    return out + bias if bias is not None else out


def ref_attention(q, k, v, mask, cp):
    """softmax(q k^T / sqrt(d) + mask) v written out, with the AttnLRP / CP-LRP scalings."""
    if cp:
        q, k = q.detach(), k.detach()
    else:
        q, k, v = scale_grad(q, 0.25), scale_grad(k, 0.25), scale_grad(v, 0.5)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1) @ v


def ref_mha(mha, query, key, value, cp, key_padding_mask=None, attn_mask=None):
    """``nn.MultiheadAttention`` (batched inputs) written from its documented formula."""
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight[:e], mha.in_proj_weight[e:2 * e], mha.in_proj_weight[2 * e:]
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b = mha.in_proj_bias
    bq, bk, bv = (None,) * 3 if b is None else (b[:e], b[e:2 * e], b[2 * e:])
    q, k, v = query @ wq.T, key @ wk.T, value @ wv.T
    if b is not None:
        q, k, v = q + bq, k + bk, v + bv
    n, s = q.shape[0], k.shape[1]
    mask = torch.zeros(n, 1, q.shape[1], s, dtype=q.dtype)
    if attn_mask is not None:
        mask = mask + (attn_mask.float().masked_fill(attn_mask, -math.inf).to(q.dtype)
                       if attn_mask.dtype == torch.bool else attn_mask)
    if key_padding_mask is not None:
        mask = mask.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.detach().expand(n, 1, e)], 1)
        v = torch.cat([v, mha.bias_v.detach().expand(n, 1, e)], 1)
        mask = torch.cat([mask, torch.zeros_like(mask[..., :1])], -1)

    def heads(t):
        return t.reshape(n, t.shape[1], h, e // h).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    if mha.add_zero_attn:
        k = torch.cat([k, torch.zeros_like(k[:, :, :1])], 2)
        v = torch.cat([v, torch.zeros_like(v[:, :, :1])], 2)
        mask = torch.cat([mask, torch.zeros_like(mask[..., :1])], -1)
    o = ref_attention(q, k, v, mask, cp).transpose(1, 2).reshape(n, -1, e)
    o = o @ mha.out_proj.weight.T
    if mha.out_proj.bias is not None:
        o = o + mha.out_proj.bias
    return o if mha.batch_first else o.transpose(0, 1)


def assert_relevance_close(actual, expected, rtol=1e-7):
    """``max|a - e| <= rtol * max|e|``; returns ``max|a - e| / max|e|``."""
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    scale = expected.abs().max()
    assert scale > 0
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, (err, actual, expected)
    return err


# ----------------------------------------------------------------------------------------
# the module: forward
# ----------------------------------------------------------------------------------------


def _mha(**kw):
    mha = nn.MultiheadAttention(8, 2, **kw).to(D).eval()
    with torch.no_grad():
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    return mha


def _inputs(mha, n=2, tgt=4, src=3, batched=True, g=None):
    def make(length, dim):
        shape = (length, dim) if not batched else ((n, length, dim) if mha.batch_first else (length, n, dim))
        return torch.randn(*shape, dtype=D, generator=g)

    return make(tgt, mha.embed_dim), make(src, mha.kdim), make(src, mha.vdim)


def test_forward_matches_torch_across_options():
    """Outputs and averaged / per-head weights equal nn.MultiheadAttention's (float64 round-off)
    for batch_first both ways, packed and separate (kdim / vdim) projections, with and without
    biases, add_bias_kv, add_zero_attn, self- and cross-attention, key_padding_mask and
    attn_mask (bool and float), need_weights, is_causal, unbatched inputs."""
    g = torch.Generator().manual_seed(0)
    worst, cases = 0.0, 0
    extras = [(True, False, False), (False, False, False), (True, True, False), (False, True, True)]
    options = itertools.product([True, False], [False, True], extras)
    for c, (batch_first, separate, (bias, bias_kv, zero_attn)) in enumerate(options):
        kw = dict(kdim=5, vdim=7) if separate else {}
        mha = _mha(batch_first=batch_first, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn, **kw)
        new = lm.MultiheadAttention.from_module(mha)
        q, k, v = _inputs(mha, g=g)
        self_attn = not separate
        tgt, src = 4, (4 if self_attn else 3)
        pad = torch.zeros(2, src, dtype=torch.bool)
        pad[1, 0] = True
        allowed = torch.randn(tgt, src, generator=g) > 0.3
        allowed[:, -1] = False  # never a fully masked row (torch's two paths differ there: NaN / 0)
        masks = [{}, {"key_padding_mask": pad}, {"attn_mask": torch.randn(tgt, src, dtype=D, generator=g)},
                 {"attn_mask": allowed}, {"attn_mask": allowed, "key_padding_mask": pad},
                 {"attn_mask": torch.randn(2 * 2, tgt, src, dtype=D, generator=g)}]
        for i, mask in enumerate(masks):
            need, average = (i + c) % 2 == 0, (i + c) % 3 != 0  # each mask with and without
            args = (q, q, q) if self_attn else (q, k, v)
            o1, w1 = mha(*args, need_weights=need, average_attn_weights=average, **mask)
            o2, w2 = new(*args, need_weights=need, average_attn_weights=average, **mask)
            worst = max(worst, (o1 - o2).abs().max().item())
            if need:
                torch.testing.assert_close(w2, w1, rtol=0, atol=1e-13)
                assert not w2.requires_grad
            else:
                assert w1 is None and w2 is None
            cases += 1
    assert worst < 1e-13, worst
    # unbatched inputs, a causal mask with the is_causal hint
    mha = _mha(batch_first=True)
    new = lm.MultiheadAttention.from_module(mha)
    q, _, _ = _inputs(mha, batched=False, tgt=5, g=g)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for kw in ({}, {"attn_mask": causal, "is_causal": True}, {"attn_mask": causal, "need_weights": False,
                                                              "is_causal": True}):
        o1, w1 = mha(q, q, q, **kw)
        o2, w2 = new(q, q, q, **kw)
        torch.testing.assert_close(o2, o1, rtol=0, atol=1e-13)
        assert (w1 is None) == (w2 is None)
    print(f"nn.MultiheadAttention forward: {cases} option sets, max |diff| {worst:.1e}")


def test_float32_forward_and_fast_path_input():
    """float32, batch_first self-attention (the case torch would run on its fused fast path
    under no_grad): same output to float32 round-off."""
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    new = lm.MultiheadAttention.from_module(mha)
    x = torch.randn(3, 6, 16)
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False)[0]
        out = new(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_from_module_shares_parameters_and_out_proj():
    for kw in ({}, {"kdim": 5, "vdim": 7, "add_bias_kv": True}):
        mha = _mha(**kw)
        new = lm.MultiheadAttention.from_module(mha, cp=True, epsilon=1e-3)
        assert isinstance(new, nn.MultiheadAttention) and new.cp and new.epsilon == 1e-3
        assert new.out_proj is mha.out_proj
        mine, theirs = dict(new.named_parameters()), dict(mha.named_parameters())
        assert mine.keys() == theirs.keys()
        assert all(mine[n] is theirs[n] for n in theirs)
        assert new.state_dict().keys() == mha.state_dict().keys()


def test_unsupported_use_is_refused_clearly():
    with pytest.raises(TypeError, match="needs a MultiheadAttention"):
        lm.MultiheadAttention.from_module(nn.Linear(2, 2))
    mha = nn.MultiheadAttention(8, 2, dropout=0.1)  # training mode
    x = torch.randn(3, 1, 8)
    with pytest.raises(RuntimeError, match="dropout=0.1 in training mode.*model.eval"):
        lm.MultiheadAttention.from_module(mha)(x, x, x)
    new = lm.MultiheadAttention.from_module(mha.eval())
    assert new(x, x, x)[0].shape == x.shape
    with pytest.raises(RuntimeError, match="is_causal=True.*attn_mask"):
        new(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="2-D attn_mask is"):
        new(x, x, x, attn_mask=torch.zeros(2, 2))


# ----------------------------------------------------------------------------------------
# the module alone: relevance (explicit form outside a composite)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cp", [False, True], ids=["attnlrp", "cplrp"])
@pytest.mark.parametrize("kind", ["self", "cross-separate", "bias-kv-zero-attn-seq-first"])
def test_module_relevance_matches_reference(kind, cp):
    """``out.backward(R)``: the inputs' ``.grad`` equals ``x * grad`` of the reference started
    with ``R / out`` (every input receiving relevance: query, key and value)."""
    kw = {"self": dict(batch_first=True), "cross-separate": dict(batch_first=True, kdim=5, vdim=7),
          "bias-kv-zero-attn-seq-first": dict(add_bias_kv=True, add_zero_attn=True)}[kind]
    mha = _mha(**kw)
    for p in mha.parameters():
        p.requires_grad_(False)
    new = lm.MultiheadAttention.from_module(mha, cp=cp, epsilon=EPS)
    g = torch.Generator().manual_seed(1)
    q, k, v = _inputs(mha, g=g)
    pad = torch.zeros(2, 3 if kind != "self" else 4, dtype=torch.bool)
    pad[1, 0] = True
    if kind == "self":
        k = v = q
    R = torch.randn(*q.shape[:-1], 8, dtype=D, generator=g)
    leaves = [t.clone().requires_grad_() for t in ((q,) if kind == "self" else (q, k, v))]
    args = leaves * 3 if kind == "self" else leaves
    out, _ = new(*args, key_padding_mask=pad)
    out.backward(R)
    rel = [t.grad for t in leaves]
    ref_leaves = [t.clone().requires_grad_() for t in ((q,) if kind == "self" else (q, k, v))]
    ref_args = ref_leaves * 3 if kind == "self" else ref_leaves
    ref = ref_mha(mha, *ref_args, cp=cp, key_padding_mask=pad)
    torch.testing.assert_close(ref, out.detach(), rtol=1e-12, atol=1e-12)
    ref.backward(R / ref.detach())
    for name, r, t in zip("qkv", rel, ref_leaves):
        if cp and kind != "self" and name in "qk":
            assert r is None  # CP-LRP: no relevance to the queries and keys
            continue
        err = assert_relevance_close(r, t.detach() * t.grad)
        print(f"mha {kind} {'cp' if cp else 'attnlrp'} {name}: max|err|/max|R| {err:.1e}")


# ----------------------------------------------------------------------------------------
# models through a Composite (both engines)
# ----------------------------------------------------------------------------------------


class MHAEncoder(nn.Module):
    """A hand-written pre-norm encoder block on nn.MultiheadAttention (called as most code
    calls it: need_weights left at its default, True) and a classifier on the first token."""

    def __init__(self, d=16, heads=2, classes=3, batch_first=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x, key_padding_mask=None):
        h = self.norm1(x)
        a, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask)
        x = x + a
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return self.head(x[:, 0] if self.attn.batch_first else x[0])


def ref_mha_encoder(m, x, cp, key_padding_mask=None):
    h = ref_layer_norm(x, m.norm1.weight, m.norm1.bias, m.norm1.eps)
    x = x + ref_mha(m.attn, h, h, h, cp, key_padding_mask=key_padding_mask)
    h = ref_layer_norm(x, m.norm2.weight, m.norm2.bias, m.norm2.eps)
    x = x + F.linear(identity_grad(F.gelu, F.linear(h, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)
    return F.linear(x[:, 0] if m.attn.batch_first else x[0], m.head.weight, m.head.bias)


class SdpaEncoder(nn.Module):
    """A hand-written block calling F.scaled_dot_product_attention, F.layer_norm, nn.Linear
    and F.gelu (the style of timm / OpenCLIP / nanoGPT code)."""

    def __init__(self, d=16, heads=2, classes=3):
        super().__init__()
        self.heads = heads
        self.ln1_w, self.ln1_b = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))
        self.ln2_w, self.ln2_b = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def _split(self, t):
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, attention=F.scaled_dot_product_attention, layer_norm=F.layer_norm, gelu=F.gelu):
        b, n, d = x.shape
        h = layer_norm(x, (d,), self.ln1_w, self.ln1_b)
        q, k, v = (self._split(t) for t in self.qkv(h).chunk(3, dim=-1))
        o = attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(o)
        x = x + self.fc2(gelu(self.fc1(layer_norm(x, (d,), self.ln2_w, self.ln2_b))))
        return self.head(x[:, 0])


def ref_sdpa_encoder(m, x, cp):
    return m.forward(x, attention=lambda q, k, v: ref_attention(q, k, v, None, cp),
                     layer_norm=lambda t, shape, w, b: ref_layer_norm(t, w, b, 1e-5),
                     gelu=lambda t: identity_grad(F.gelu, t))


def table(cp, epsilon=None):
    """The BERT table (its base map holds the nn.MultiheadAttention entry)."""
    return layer_map("bert", "cp_lrp" if cp else "attnlrp", epsilon)


def composite(cp, engine, epsilon=EPS):
    return lxt.Composite(table(cp, epsilon), engine=engine, epsilon=epsilon, strict=True,
                         method="cp-lrp" if cp else "attnlrp")


def _model(cls, seed=0, **kw):
    torch.manual_seed(seed)
    m = cls(**kw).to(D).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or name.endswith("_b"):
                p.normal_(0, 0.5)
    return m


# snapshot / assert_restored: tests/test_composite.py


def explain_both(model, ref_fn, x, cp, engine, **kw):
    """lxt relevance (started with R = logit) and the reference's ``x * grad`` (started with
    gradient 1) of each sample's predicted logit, and the logits with lxt and without."""
    with torch.no_grad():
        stock = model(x, **kw)
    target = stock.argmax(-1)
    snap = snapshot(model)
    with composite(cp, engine).context(model):
        xl = x.clone().requires_grad_()
        out = model(xl, **kw)
        logit = out[torch.arange(len(target)), target]
        logit.backward(logit.detach())
    assert_restored(model, snap)
    with torch.no_grad():  # (as stock was: torch's MHA takes its fused path under no_grad)
        torch.testing.assert_close(model(x, **kw), stock, rtol=0, atol=0)  # bit-identical after remove
    xr = x.clone().requires_grad_()
    ref_out = ref_fn(model, xr, cp, **kw)
    ref_out[torch.arange(len(target)), target].sum().backward()
    return xl.grad, (xr * xr.grad).detach(), out.detach(), stock, ref_out.detach()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cp", [False, True], ids=["attnlrp", "cplrp"])
def test_mha_model_matches_reference(cp, engine):
    """nn.MultiheadAttention inside a hand-written model, with a key padding mask (float64)."""
    model = _model(MHAEncoder)
    x = torch.randn(2, 5, 16, dtype=D)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, -2:] = True
    rel, expected, out, stock, ref_out = explain_both(model, ref_mha_encoder, x, cp, engine, key_padding_mask=pad)
    torch.testing.assert_close(out, stock, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ref_out, stock, rtol=1e-12, atol=1e-12)
    err = assert_relevance_close(rel, expected, rtol=1e-6)
    # the classifier reads token 0, which cannot attend to the padded keys: they get none
    assert (rel[1, -2:] == 0).all() and (rel[1, :-2] != 0).any()
    print(f"MHA encoder {'cp' if cp else 'attnlrp'} {engine}: max|err|/max|R| {err:.1e}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cp", [False, True], ids=["attnlrp", "cplrp"])
def test_sdpa_model_matches_reference(cp, engine):
    """F.scaled_dot_product_attention in a hand-written model (no HuggingFace), through a
    Composite with the BERT table: every op on the relevance path has a rule (strict)."""
    model = _model(SdpaEncoder)
    x = torch.randn(2, 5, 16, dtype=D)
    rel, expected, out, stock, ref_out = explain_both(model, ref_sdpa_encoder, x, cp, engine)
    torch.testing.assert_close(out, stock, rtol=1e-13, atol=1e-13)
    err = assert_relevance_close(rel, expected, rtol=1e-6)
    print(f"sdpa encoder {'cp' if cp else 'attnlrp'} {engine}: max|err|/max|R| {err:.1e}")


@pytest.mark.parametrize("engine", ENGINES)
def test_cp_lrp_conserves_without_biases(engine):
    """CP-LRP with every bias zeroed (sequence-first MHA): the input relevance sums to the
    explained logit."""
    model = _model(MHAEncoder, batch_first=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.zero_()
    x = torch.randn(5, 2, 16, dtype=D).requires_grad_()
    with composite(True, engine).context(model):
        out = model(x)
        logit = out[1, out[1].argmax()]
        logit.backward(logit.detach())
    assert x.grad[:, 0].abs().sum() == 0  # the other sample gets none
    assert math.isclose(x.grad.sum().item(), logit.item(), rel_tol=1e-9), (x.grad.sum().item(), logit.item())
