"""The independent formulation the Composite is checked against (tests/test_reference_formulation.py,
test_families.py, test_bench_faithfulness.py, ...).

AttnLRP and CP-LRP (with epsilon -> 0) can be written as *gradient modifications*: with the
modified gradient ``g``, the relevance of a tensor ``x`` is ``x * g``.  The reference below is
written without lxt, on a ``copy.deepcopy`` of the stock HuggingFace model:

- identity rule on an elementwise activation ``y = f(x)``: gradient ``f(x) / x``;
- uniform rule on a product of two variables ``a * b``: both factors' gradients halved;
- attention (AttnLRP): q and k gradients divided by 4, v by 2, softmax unchanged (two
  matmuls, each uniform + epsilon, and the DTD softmax rule, which *is* the gradient);
  CP-LRP: q and k detached, v unscaled;
- RMSNorm / LayerNorm: the standard deviation detached (identity on ``1/std``);
- CP-LRP gated MLP: the gate branch detached;
- ``nn.MultiheadAttention`` (SigLIP's attention-pooling head) written out with the attention's
  scalings, a factor without gradient (the probe's query) a constant of its product;
- a dual encoder's similarity head (CLIP, SigLIP, SigLIP2): the norms of ``t / |t|`` and
  ``i / |i|`` detached, both factors of ``t @ i.T`` halved, ``exp(logit_scale)`` and
  ``logit_bias`` constants;
- everything else (linear layers and biases, residual adds, rotary embedding, embedding sums,
  reshapes) keeps its plain gradient: the epsilon rule with epsilon -> 0 is input * gradient.

The Composite's relevance (``inputs_embeds.grad`` / ``pixel_values.grad``, explicit LRP,
started with R = the explained logit) must match ``inputs * reference_grad`` (started with
gradient 1) per token / pixel: tiny float64 configs (Llama with GQA, padding, sdpa and eager;
BERT; ViT) to 1e-6 relative with epsilon = 1e-12, and on the real SmolLM2-135M weights
(float32, slow) with a Pearson correlation >= 0.99 per prompt; bfloat16 SmolLM2 correlates
>= 0.95 with float32.

The reference registers attention functions named ``lxt_ref_*`` in transformers' global
AttentionInterface / AttentionMaskInterface while the fixture ``reference_attention``
(conftest.py) is active.
"""
from __future__ import annotations

import contextlib
import copy
import importlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers import activations as _hf_activations
from transformers.activations import GELUActivation, SiLUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

EPS = 1e-12  # lxt stabiliser: epsilon -> 0 (float64 tests)
RTOL = 1e-6

# ----------------------------------------------------------------------------------------
# The reference formulation: gradient modifications, written without lxt
# ----------------------------------------------------------------------------------------


def scale_grad(t, s):
    """Value ``t`` (exactly), gradient scaled by ``s``."""
    d = t.detach()
    return d + (t - d) * s


def identity_grad(f, x):
    """Value ``f(x)`` (exactly), gradient ``f(x) / x`` (identity rule: ``x * grad = f(x) * g``).

    At ``x == 0`` the ratio is set to 0: a zero input gets (and passes on) no relevance, as
    the explicit rule does there (``R = f(0) * g = 0`` for the activations used here)."""
    y = f(x)
    safe = torch.where(x == 0, torch.ones_like(x), x)
    ratio = torch.where(x == 0, torch.zeros_like(y), y / safe).detach()
    return y.detach() + (x - x.detach()) * ratio


def _rms_norm_std_detached(norm):
    """``x * rsqrt(mean(x^2) + eps).detach() * w`` (Gemma: ``* (1 + w)``).  HF computes the
    statistics in float32; so does this for float32 / bfloat16 inputs.  A float64 input stays
    in float64 (HF would round it to float32 and back; the forward check below bounds the
    difference)."""
    gemma = type(norm).__name__.startswith("Gemma")
    eps = norm.eps if gemma else norm.variance_epsilon

    def forward(x):
        dtype = x.dtype
        h = x if dtype == torch.float64 else x.to(torch.float32)
        inv_std = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps).detach()
        if gemma:
            return (h * inv_std * (1.0 + norm.weight.to(h.dtype))).to(dtype)
        return norm.weight * (h * inv_std).to(dtype)

    return forward


def _layer_norm_std_detached(norm):
    """``(x - mean) / std.detach() * w + b`` (biased variance, as nn.LayerNorm)."""

    def forward(x):
        centred = x - x.mean(-1, keepdim=True)
        std = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
        out = centred / std.detach()
        if norm.weight is not None:
            out = out * norm.weight
        if norm.bias is not None:
            out = out + norm.bias
        return out.contiguous()  # nn.LayerNorm's output is contiguous (Idefics3 views it)

    return forward


def _gated_mlp(mlp, cp):
    """Llama MLP ``down(act(gate(x)) * up(x))``: uniform rule on the product (AttnLRP: both
    factors' gradients halved) or the gate branch detached (CP-LRP)."""

    def forward(x):
        gate = mlp.act_fn(mlp.gate_proj(x))
        up = mlp.up_proj(x)
        if cp:
            return mlp.down_proj(gate.detach() * up)
        return mlp.down_proj(scale_grad(gate, 0.5) * scale_grad(up, 0.5))

    return forward


def _fused_gated_mlp(mlp, cp):
    """Phi-3 MLP ``down(up * act(gate))`` with one fused ``gate_up_proj``."""

    def forward(x):
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        gate = mlp.activation_fn(gate)
        if cp:
            return mlp.down_proj(up * gate.detach())
        return mlp.down_proj(scale_grad(up, 0.5) * scale_grad(gate, 0.5))

    return forward


def _experts(experts, cp):
    """transformers 5 MoE experts, the loop of its eager implementation written out: uniform
    rule on ``act(gate) * up`` and on ``routing weight * expert output`` (AttnLRP), or the
    gate branch and the routing weights detached (CP-LRP); the sum over experts keeps its
    plain gradient (epsilon -> 0)."""

    def forward(hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e in range(experts.gate_up_proj.shape[0]):
            token, pos = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            gate, up = F.linear(hidden[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
            gate = experts.act_fn(gate)
            w = top_k_weights[token, pos, None]
            if cp:
                y = F.linear(gate.detach() * up, experts.down_proj[e]) * w.detach()
            else:
                h = scale_grad(gate, 0.5) * scale_grad(up, 0.5)
                y = scale_grad(F.linear(h, experts.down_proj[e]), 0.5) * scale_grad(w, 0.5)
            out = out.index_add(0, token, y)
        return out

    return forward


def _router(router):
    """A top-k router: linear, softmax (its plain gradient is the DTD rule), top-k, and the
    renormalisation ``w / sum(w)`` with the sum detached (lxt's division rule)."""

    def forward(hidden):
        hidden = hidden.reshape(-1, router.hidden_dim)
        logits = F.linear(hidden, router.weight)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        top, index = torch.topk(probs, router.top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):
            top = top / top.sum(dim=-1, keepdim=True).detach()
        return logits, top.to(logits.dtype), index

    return forward


def _roberta_lm_head(head):
    """``decoder(layer_norm(gelu(dense(x))))`` with the identity rule on the GELU."""

    def forward(features, **kwargs):
        x = identity_grad(F.gelu, head.dense(features))
        return head.decoder(head.layer_norm(x))

    return forward


def _roberta_classification_head(head):
    """``out_proj(tanh(dense(x[:, 0])))`` with the identity rule on the tanh."""

    def forward(features, **kwargs):
        return head.out_proj(identity_grad(torch.tanh, head.dense(features[:, 0, :])))

    return forward


def _multihead_attention(mha, cp):
    """``nn.MultiheadAttention`` (batch first, packed projection; SigLIP's attention-pooling
    head: a constant probe attends to the patch tokens) written out with the same gradient
    scalings as the reference attention.  A factor without gradient (the probe's query) is a
    constant of its product: the other factor keeps the whole share (epsilon rule), so with
    ``n_qk`` variable factors of ``q k^T`` and ``m`` of ``A v``, q and k get ``1 / (m n_qk)``,
    v ``1 / m``; CP-LRP detaches q and k."""
    assert mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, **kwargs):
        assert key_padding_mask is None and not kwargs.get("is_causal", False)
        e, h = mha.embed_dim, mha.num_heads
        w, b = mha.in_proj_weight, mha.in_proj_bias
        q, k, v = (F.linear(x, w[i * e:(i + 1) * e], None if b is None else b[i * e:(i + 1) * e])
                   for i, x in enumerate((query, key, value)))
        n = q.shape[0]
        q, k, v = (t.reshape(n, t.shape[1], h, e // h).transpose(1, 2) for t in (q, k, v))
        if cp:
            q, k = q.detach(), k.detach()
        else:
            n_qk = max(int(q.requires_grad) + int(k.requires_grad), 1)  # (1: no gradient at all)
            m = max(int(q.requires_grad or k.requires_grad) + int(v.requires_grad), 1)
            q, k, v = (scale_grad(q, 1 / (m * n_qk)), scale_grad(k, 1 / (m * n_qk)), scale_grad(v, 1 / m))
        mask = None if attn_mask is None else attn_mask.reshape(n, h, *attn_mask.shape[-2:])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return mha.out_proj(o.transpose(1, 2).reshape(n, -1, e)), None

    return forward


def _similarity_head(model):
    """A dual encoder's (CLIP, SigLIP, SigLIP2) forward with its similarity head written out:
    ``t / ||t||`` and ``i / ||i||`` with the norms detached (identity on the numerator, the
    divisor a constant), ``t @ i.T`` with both factors' gradients halved (uniform rule), the
    scale ``exp(logit_scale)`` a constant, ``+ logit_bias`` (SigLIP) a constant summand
    (plain gradient: it absorbs its share).  The towers (and CLIP's projections) run as the
    stock ``get_text_features`` / ``get_image_features`` do."""
    from types import SimpleNamespace

    def forward(input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, **vision):
        text = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids).pooler_output
        image = model.get_image_features(pixel_values=pixel_values, **vision).pooler_output
        text = text / text.norm(p=2, dim=-1, keepdim=True).detach()
        image = image / image.norm(p=2, dim=-1, keepdim=True).detach()
        logits = torch.matmul(scale_grad(text, 0.5), scale_grad(image, 0.5).t()) * model.logit_scale.exp().detach()
        if getattr(model, "logit_bias", None) is not None:
            logits = logits + model.logit_bias.detach()
        return SimpleNamespace(logits_per_text=logits, logits_per_image=logits.t(), text_embeds=text,
                               image_embeds=image)

    return forward


def _reference_attention(cp, kernel):
    """An attention function for transformers' AttentionInterface: the stock kernel (sdpa, or
    the model's own eager function) with AttnLRP / CP-LRP gradient scalings on q, k, v."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        if cp:
            query, key = query.detach(), key.detach()
        else:
            query, key, value = scale_grad(query, 0.25), scale_grad(key, 0.25), scale_grad(value, 0.5)
        if kernel == "sdpa":
            fn = sdpa_attention_forward
        else:
            fn = importlib.import_module(type(module).__module__).eager_attention_forward
        return fn(module, query, key, value, attention_mask, **kwargs)

    return attention


def _attention_name(cp, kernel):
    return f"lxt_ref_{'cplrp' if cp else 'attnlrp'}_{kernel}"


@contextlib.contextmanager
def reference_attention_registered():
    """The reference attention functions (and their masks) registered in transformers' global
    interfaces inside the block, taken out again afterwards (the fixture
    ``reference_attention`` of conftest.py)."""
    names = []
    for cp in (False, True):
        for kernel in ("sdpa", "eager"):
            name = _attention_name(cp, kernel)
            AttentionInterface.register(name, _reference_attention(cp, kernel))
            AttentionMaskInterface.register(name, sdpa_mask if kernel == "sdpa" else eager_mask)
            names.append(name)
    try:
        yield
    finally:
        for name in names:
            AttentionInterface._global_mapping.pop(name, None)
            AttentionMaskInterface._global_mapping.pop(name, None)


_ACTIVATIONS = (nn.SiLU, nn.GELU, nn.Tanh, nn.ReLU, SiLUActivation, GELUActivation) + tuple(
    getattr(_hf_activations, n) for n in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "QuickGELUActivation")
    if hasattr(_hf_activations, n))


def reference_model(model, cp=False, cp_mlp=None):
    """A patched deep copy of ``model`` whose gradient, times the input, is the relevance
    (``cp_mlp=False``: CP-LRP attention with the uniform rule on gated MLPs)."""
    cp_mlp = cp if cp_mlp is None else cp_mlp
    ref = copy.deepcopy(model)
    kernel = ref.config._attn_implementation
    assert kernel in ("sdpa", "eager"), kernel
    ref.set_attn_implementation(_attention_name(cp, kernel))
    assert ref.config._attn_implementation == _attention_name(cp, kernel)
    for name in ("text_config", "vision_config"):  # a VLM's sub-models: the reference attention too
        sub = getattr(ref.config, name, None)
        assert sub is None or sub._attn_implementation == _attention_name(cp, kernel), (name, sub._attn_implementation)
    counts = {"act": 0, "norm": 0}
    for module in ref.modules():
        if isinstance(module, _ACTIVATIONS):
            module.forward = (lambda f: (lambda x: identity_grad(f, x)))(module.forward)
            counts["act"] += 1
        elif isinstance(module, nn.LayerNorm):
            module.forward = _layer_norm_std_detached(module)
            counts["norm"] += 1
        elif type(module).__name__.endswith("RMSNorm"):
            module.forward = _rms_norm_std_detached(module)
            counts["norm"] += 1
        elif hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
            module.forward = _gated_mlp(module, cp_mlp)
        elif hasattr(module, "gate_up_proj") and isinstance(module.gate_up_proj, nn.Linear):
            module.forward = _fused_gated_mlp(module, cp_mlp)
        elif isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
            module.forward = _experts(module, cp)
        elif type(module).__name__.endswith("TopKRouter"):
            module.forward = _router(module)
        elif type(module).__name__ == "RobertaLMHead":  # gelu is a function there
            module.forward = _roberta_lm_head(module)
        elif type(module).__name__ == "RobertaClassificationHead":  # and tanh here
            module.forward = _roberta_classification_head(module)
        elif isinstance(module, nn.MultiheadAttention):  # SigLIP's attention-pooling head
            module.forward = _multihead_attention(module, cp)
    assert counts["act"] and counts["norm"], counts
    if all(hasattr(ref, n) for n in ("logit_scale", "get_text_features", "get_image_features")):
        ref.forward = _similarity_head(ref)  # a dual encoder's similarity logits
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


# ----------------------------------------------------------------------------------------
# Running both
# ----------------------------------------------------------------------------------------


def _select(out, targets):
    """The explained logits: ``targets[b]`` indexes ``out[b]`` (at the last position for
    causal LMs).  Samples of a batch are independent, so one backward explains each."""
    if out.dim() == 3:
        out = out[:, -1]
    return out[torch.arange(out.shape[0]), targets]


def lxt_relevance(comp, model, targets, **inputs):
    """Per-token (per-pixel) relevance from the registered composite ``comp``."""
    name, x = _leaf_input(inputs)
    out = model(**inputs).logits
    logit = _select(out, targets)
    logit.backward(logit.detach())  # explicit LRP starts with R = the logit's value
    return _per_position(name, x.grad), out.detach()


def reference_relevance(ref, targets, **inputs):
    name, x = _leaf_input(inputs)
    out = ref(**inputs).logits
    _select(out, targets).sum().backward()  # gradient 1: relevance logit * 1 at the top
    return _per_position(name, x * x.grad), out.detach()


def _leaf_input(inputs):
    name = "pixel_values" if "pixel_values" in inputs else "inputs_embeds"
    x = inputs[name].detach().clone().requires_grad_(True)
    inputs[name] = x
    return name, x


def _per_position(name, rel):
    return rel.detach().sum(1 if name == "pixel_values" else -1)


def assert_relevance_close(actual, expected, rtol=RTOL, atol_frac=1e-9):
    """Per token ``|a - e| <= rtol * |e| + atol_frac * max|e|``.  Returns the error relative to
    the largest reference relevance, ``max|a - e| / max|e|``."""
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    scale = expected.abs().max()
    assert scale > 0
    err = (actual - expected).abs()
    bound = rtol * expected.abs() + atol_frac * scale
    assert (err <= bound).all(), (
        f"relevance differs from the reference: max |error| / max |R| = {(err.max() / scale).item():.3g}, "
        f"worst token {(err / bound).argmax().item()} (flat index)\nlxt:\n{actual}\nreference:\n{expected}")
    return (err.max() / scale).item()


def pearson(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def check_against_reference(model, factory, inputs, target_sets, cp, rtol, atol_frac, fwd_rtol=1e-6,
                            epsilon=EPS):
    """Register ``factory(model, epsilon=epsilon)`` once, explain every target set with it, and
    compare each with the reference on a deep copy.  Returns the worst ``max|error| / max|R|`` seen."""
    ref = reference_model(model, cp=cp)
    with torch.no_grad():
        stock = model(**inputs).logits
        ref_out = ref(**inputs).logits
    # the reference changes gradients only (HF's float32 RMSNorm rounding aside)
    torch.testing.assert_close(ref_out, stock, rtol=fwd_rtol, atol=fwd_rtol * stock.abs().max().item())
    comp = factory(model, epsilon=epsilon)
    results = []
    with comp.context(model):
        for targets in target_sets:
            results.append(lxt_relevance(comp, model, targets, **dict(inputs)))
    worst = 0.0
    for targets, (rel, out) in zip(target_sets, results):
        torch.testing.assert_close(out, stock, rtol=1e-12 if stock.dtype == torch.float64 else 1e-5,
                                   atol=1e-12 if stock.dtype == torch.float64 else 1e-6)
        expected, _ = reference_relevance(ref, targets, **dict(inputs))
        worst = max(worst, assert_relevance_close(rel, expected, rtol=rtol, atol_frac=atol_frac))
    return worst


def _targets(logits, n_other=1, seed=0):
    """The predicted class (next token) of every sample, and ``n_other`` random classes."""
    last = logits[:, -1] if logits.dim() == 3 else logits
    g = torch.Generator().manual_seed(seed)
    others = [torch.randint(0, last.shape[-1], (last.shape[0],), generator=g) for _ in range(n_other)]
    return [last.argmax(-1)] + others


# ----------------------------------------------------------------------------------------
# Positional relevance (PA-LRP, Bakish et al. 2025): positional encodings as variables
# ----------------------------------------------------------------------------------------
#
# With ``positional=True`` the positional encodings are variables instead of constants:
# - rotary ``q * cos + rotate_half(q) * sin`` (and the same for k): the uniform rule on each
#   product of two variables halves both factors' gradients.  q (and k) enter only those two
#   products, so halving the gradient of ``q_proj`` / ``k_proj``'s output halves q's share in
#   both (the RMSNorm on q of Qwen3 is linear in the reference), and the leaves' gradient is
#   halved at the rotary module's output; the sum of the two products keeps its plain gradient;
# - learned position / token-type embeddings summed into the token embeddings: the epsilon rule
#   on the sum (epsilon -> 0) is the plain gradient, so the summand's relevance is ``p * grad``.
# Full rotary only (every dimension of q and k rotated: Llama, Qwen, Mistral).

_REF_POSITION_NAMES = ("wpe", "position_embeddings")


@contextlib.contextmanager
def positional_leaves(ref, batch_size):
    """On the reference copy ``ref`` (from :func:`reference_model`), inside the block: every
    positional input a fresh leaf (batch-shared encodings expanded to ``batch_size``), with
    the gradient modifications above.  Yields ``kind -> list of leaves`` (``rotary``,
    ``position``, ``token_type``), filled by the forward."""
    leaves = {"rotary": [], "position": [], "token_type": []}
    handles, params = [], []

    def leaf(kind, t):
        t = t.detach()
        if t.dim() >= 2 and t.shape[0] == 1 and batch_size > 1:
            t = t.expand(batch_size, *t.shape[1:])
        t = t.clone().requires_grad_(True)
        leaves[kind].append(t)
        return t

    named = list(ref.named_modules())
    rotary = [m for _, m in named if type(m).__name__.endswith("RotaryEmbedding")]
    for name, m in named:
        last = name.rsplit(".", 1)[-1]
        if m in rotary:
            handles.append(m.register_forward_hook(
                lambda mod, args, out: tuple(scale_grad(leaf("rotary", t), 0.5) for t in out)))
        elif rotary and last in ("q_proj", "k_proj"):
            handles.append(m.register_forward_hook(lambda mod, args, out: scale_grad(out, 0.5)))
        elif isinstance(m, nn.Embedding) and last in _REF_POSITION_NAMES:
            handles.append(m.register_forward_hook(lambda mod, args, out: leaf("position", out)))
        elif isinstance(m, nn.Embedding) and last == "token_type_embeddings":
            handles.append(m.register_forward_hook(lambda mod, args, out: leaf("token_type", out)))
        elif isinstance(m._parameters.get("position_embeddings"), nn.Parameter):  # ViT, DeiT
            p = m._parameters["position_embeddings"]  # the copy's own parameter: a leaf already
            p.grad = None
            p.requires_grad_(True)
            params.append(p)
            leaves["position"].append(p)
    try:
        yield leaves
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(False)


def _summed_per_position(tensors):
    """``sum over leaves of (leaf * grad)`` per sequence and position: ``(batch, T)``."""
    total = None
    for t in tensors:
        g = torch.zeros_like(t) if t.grad is None else t.grad  # CP-LRP: no gradient to rotary
        r = (t.detach() * g).reshape(t.shape[0], t.shape[1], -1).sum(-1)
        total = r if total is None else total + r
    return total


def reference_positional_relevance(ref, targets, **inputs):
    """``(per-token relevance, {kind: per-position relevance (batch, T)})`` of the reference
    with its positional inputs as leaves (gradient 1 at the explained logits)."""
    name, x = _leaf_input(inputs)
    with positional_leaves(ref, x.shape[0]) as leaves:
        out = ref(**inputs).logits
        _select(out, targets).sum().backward()
    per_kind = {k: _summed_per_position(ts) for k, ts in leaves.items() if ts}
    return _per_position(name, x * x.grad), per_kind
