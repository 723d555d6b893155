"""Every drop-in functional against an independent float64 formula (DESIGN.md rule table)."""
import math

import pytest
import torch
import torch.nn.functional as F

import lxt.functional as lf
from conftest import stab

D = torch.float64
EPS = 1e-6


def leaf(*shape, dtype=D, positive=False):
    t = torch.randn(*shape, dtype=dtype)
    if positive:
        t = t.abs() + 0.1
    return t.requires_grad_()


def relevance_of(out, R, *inputs):
    grads = torch.autograd.grad(out, inputs, R, allow_unused=True)
    return grads


# ---------------------------------------------------------------- linear (Eq. 8)
@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6), (6,)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_epsilon_formula(shape, with_bias):
    x = leaf(*shape)
    W = torch.randn(5, 6, dtype=D)
    b = torch.randn(5, dtype=D) if with_bias else None
    y = lf.linear_epsilon(x, W, b, epsilon=EPS)
    torch.testing.assert_close(y, F.linear(x, W, b), rtol=0, atol=0)
    R = torch.randn_like(y)
    (rx,) = relevance_of(y, R, x)
    z = x.detach() @ W.T + (b if b is not None else 0)
    expected = x.detach() * ((R / stab(z, EPS)) @ W)
    torch.testing.assert_close(rx, expected, rtol=1e-12, atol=1e-12)


def test_linear_epsilon_conserves_without_bias():
    x = leaf(3, 8)
    W = torch.randn(4, 8, dtype=D)
    y = lf.linear_epsilon(x, W, None, epsilon=1e-12)
    y.backward(y)
    assert math.isclose(x.grad.sum().item(), y.sum().item(), rel_tol=1e-6)


def test_linear_epsilon_shape_error():
    with pytest.raises(ValueError, match="features"):
        lf.linear_epsilon(leaf(2, 3), torch.randn(4, 5, dtype=D))


# ---------------------------------------------------------------- add2 (Eq. 8)
@pytest.mark.parametrize("sa,sb", [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((3, 1), (1, 4))])
def test_add2_formula_broadcast(sa, sb):
    a, b = leaf(*sa), leaf(*sb)
    y = lf.add2(a, b, epsilon=EPS)
    torch.testing.assert_close(y, a + b, rtol=0, atol=0)
    R = torch.randn_like(y)
    ra, rb = relevance_of(y, R, a, b)
    z = (a + b).detach()
    torch.testing.assert_close(ra, (a.detach() * R / stab(z, EPS)).sum_to_size(sa), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rb, (b.detach() * R / stab(z, EPS)).sum_to_size(sb), rtol=1e-12, atol=1e-12)


def test_add2_conserves():
    a, b = leaf(5, 7), leaf(5, 7)
    y = lf.add2(a, b, epsilon=1e-14)
    y.backward(y)
    total = a.grad.sum() + b.grad.sum()
    assert math.isclose(total.item(), y.sum().item(), rel_tol=1e-6)


def test_index_add_epsilon_formula():
    """Rows of ``source`` added into ``input`` (several into one row): each summand gets
    ``x * R / stab(row sum)``."""
    base, src = leaf(4, 3), leaf(6, 3)
    index = torch.tensor([0, 2, 0, 3, 2, 0])
    y = lf.index_add(base, 0, index, src, epsilon=EPS)
    torch.testing.assert_close(y, torch.index_add(base, 0, index, src))
    R = torch.randn_like(y)
    y.backward(R)
    share = R / stab(y.detach(), EPS)
    torch.testing.assert_close(base.grad, base.detach() * share, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(src.grad, src.detach() * share[index], rtol=1e-12, atol=1e-12)


def test_add2_constant_operand_absorbs_share():
    x = leaf(4, 3)
    c = torch.randn(4, 3, dtype=D)  # no requires_grad: a constant, like a bias
    for other in (c, 2.5):
        x.grad = None
        y = lf.add2(x, other, epsilon=EPS)
        R = torch.randn_like(y)
        y.backward(R)
        expected = x.detach() * R / stab(x.detach() + other, EPS)
        torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- mul2 (Prop. 3.2)
@pytest.mark.parametrize("sa,sb", [((3, 4), (3, 4)), ((2, 3, 4), (1, 4))])
def test_mul2_uniform(sa, sb):
    a, b = leaf(*sa), leaf(*sb)
    y = lf.mul2(a, b)
    torch.testing.assert_close(y, a * b, rtol=0, atol=0)
    R = torch.randn_like(y)
    ra, rb = relevance_of(y, R, a, b)
    torch.testing.assert_close(ra, (R / 2).sum_to_size(sa), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rb, (R / 2).sum_to_size(sb), rtol=1e-14, atol=1e-14)
    assert math.isclose((ra.sum() + rb.sum()).item(), R.sum().item(), rel_tol=1e-12)


def test_mul2_constant_is_identity():
    x = leaf(3, 4)
    for other in (torch.randn(3, 4, dtype=D), 0.125):
        x.grad = None
        y = lf.mul2(x, other)
        R = torch.randn_like(y)
        y.backward(R)
        torch.testing.assert_close(x.grad, R, rtol=0, atol=0)


def test_div_identity_on_numerator_divisor_constant():
    """``a / b`` with ``b`` requiring grad: ``R_a = R``, the divisor gets none (before, the
    epsilon rule gave ``+R`` to the numerator and ``-R`` to the divisor: a sum of zero)."""
    a = leaf(3, 4)
    b = leaf(3, 1, positive=True)
    y = lf.div_const(a, b)  # the published name; the table maps a / b to lf.div
    torch.testing.assert_close(y, a / b, rtol=0, atol=0)
    R = torch.randn_like(y)
    ra, rb = relevance_of(y, R, a, b)
    torch.testing.assert_close(ra, R, rtol=0, atol=0)
    assert rb is None
    assert lf.div is lf.div_const


# ---------------------------------------------------------------- matmul (Prop. 3.3)
@pytest.mark.parametrize("sa,sb", [((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 3, 4), (4, 5)),
                                   ((2, 1, 3, 4), (5, 4, 2))])
def test_matmul_formula(sa, sb):
    a, b = leaf(*sa), leaf(*sb)
    y = lf.matmul(a, b, epsilon=EPS)
    torch.testing.assert_close(y, a @ b, rtol=0, atol=0)
    R = torch.randn_like(y)
    ra, rb = relevance_of(y, R, a, b)
    A, B = a.detach(), b.detach()
    g = R / stab(2 * (A @ B), EPS)
    torch.testing.assert_close(ra, (A * (g @ B.transpose(-1, -2)).sum_to_size(sa)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rb, (B * (A.transpose(-1, -2) @ g).sum_to_size(sb)), rtol=1e-10, atol=1e-10)


def test_matmul_conserves_and_one_constant_factor_is_epsilon():
    a, b = leaf(2, 3, 4), leaf(2, 4, 5)
    y = lf.matmul(a, b, epsilon=1e-14)
    y.backward(y)
    assert math.isclose((a.grad.sum() + b.grad.sum()).item(), y.sum().item(), rel_tol=1e-6)
    # B constant: plain epsilon rule, all relevance to A
    a.grad = None
    B = b.detach()
    y = lf.matmul(a, B, epsilon=EPS)
    R = torch.randn_like(y)
    y.backward(R)
    torch.testing.assert_close(a.grad, a.detach() * ((R / stab(a.detach() @ B, EPS)) @ B.transpose(-1, -2)),
                               rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- softmax (Prop. 3.1)
@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_softmax_formula(dim):
    x = leaf(3, 5, 4)
    y = lf.softmax(x, dim)
    torch.testing.assert_close(y, F.softmax(x, dim), rtol=0, atol=0)
    R = torch.randn_like(y)
    (rx,) = relevance_of(y, R, x)
    s = F.softmax(x.detach(), dim)
    torch.testing.assert_close(rx, x.detach() * (R - s * R.sum(dim, keepdim=True)), rtol=1e-12, atol=1e-12)


def test_softmax_masked_inputs_count_as_zero():
    x = torch.randn(2, 6, dtype=D)
    x[0, 4:] = float("-inf")
    x[1, 0] = float("-inf")
    x.requires_grad_()
    y = lf.softmax(x, -1)
    R = torch.randn_like(y)
    (rx,) = relevance_of(y, R, x)
    assert torch.isfinite(rx).all()
    xm = torch.where(torch.isinf(x.detach()), 0.0, x.detach())
    expected = xm * (R - y.detach() * R.sum(-1, keepdim=True))
    torch.testing.assert_close(rx, expected, rtol=1e-12, atol=1e-12)
    assert (rx[0, 4:] == 0).all() and rx[1, 0] == 0


def test_softmax_dtype_argument():
    x = leaf(2, 5, dtype=torch.bfloat16)
    y = lf.softmax(x, -1, dtype=torch.float32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.softmax(x, -1, dtype=torch.float32), rtol=0, atol=0)
    y.backward(y)
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- norms (Prop. 3.4)
def test_rms_norm_identity():
    x = leaf(2, 3, 8)
    w = torch.randn(8, dtype=D)
    y = lf.rms_norm_identity(x, w, 1e-6)
    xd = x.detach()
    # Llama normalises in float32 (and so does the drop-in), hence float32 round-off
    torch.testing.assert_close(y, w * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6), rtol=1e-6, atol=1e-6)
    R = torch.randn_like(y)
    (rx,) = relevance_of(y, R, x)
    torch.testing.assert_close(rx, R, rtol=0, atol=0)


def test_rms_norm_torch_signature():
    x = leaf(2, 8)
    w = torch.randn(8, dtype=D)
    y = lf.rms_norm(x, (8,), w, 1e-5)
    torch.testing.assert_close(y, F.rms_norm(x, (8,), w, 1e-5), rtol=0, atol=0)
    R = torch.randn_like(y)
    torch.testing.assert_close(relevance_of(y, R, x)[0], R, rtol=0, atol=0)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_formula(affine):
    x = leaf(2, 3, 6)
    w = torch.randn(6, dtype=D) if affine else None
    b = torch.randn(6, dtype=D) if affine else None
    y = lf.layer_norm(x, (6,), w, b, 1e-5, epsilon=EPS)
    torch.testing.assert_close(y, F.layer_norm(x, (6,), w, b, 1e-5), rtol=1e-12, atol=1e-12)
    R = torch.randn_like(y)
    (rx,) = relevance_of(y, R, x)
    xd = x.detach()
    std = torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
    g = R / stab(y.detach(), EPS)
    h = g * (w if affine else 1.0) / std
    # J^T g for (x - mean) / std * w with std a constant: h - mean(h)
    expected = xd * (h - h.mean(-1, keepdim=True))
    torch.testing.assert_close(rx, expected, rtol=1e-10, atol=1e-10)


def test_layer_norm_conserves_without_bias():
    x = leaf(3, 10)
    w = torch.randn(10, dtype=D)
    y = lf.layer_norm(x, (10,), w, None, 1e-5, epsilon=1e-14)
    y.backward(y)
    assert math.isclose(x.grad.sum().item(), y.sum().item(), rel_tol=1e-6)


def test_mean_formula_and_conservation():
    x = leaf(3, 7, 4, positive=True)
    y = lf.mean(x, dim=1, epsilon=EPS)
    torch.testing.assert_close(y, x.mean(1), rtol=0, atol=0)
    R = torch.randn_like(y)
    (rx,) = relevance_of(y, R, x)
    expected = x.detach() * (R / stab(x.detach().mean(1), EPS) / 7).unsqueeze(1)
    torch.testing.assert_close(rx, expected, rtol=1e-12, atol=1e-12)
    y = lf.mean(x, dim=1, epsilon=1e-14)
    (rx,) = relevance_of(y, y, x)
    assert math.isclose(rx.sum().item(), y.sum().item(), rel_tol=1e-6)


def test_normalize_identity():
    x = leaf(4, 5)
    y = lf.normalize(x, dim=-1)
    torch.testing.assert_close(y, F.normalize(x, dim=-1), rtol=0, atol=0)
    R = torch.randn_like(y)
    torch.testing.assert_close(relevance_of(y, R, x)[0], R, rtol=0, atol=0)


@pytest.mark.parametrize("name,ref", [("silu", F.silu), ("gelu", F.gelu), ("tanh", torch.tanh),
                                      ("relu", F.relu), ("sigmoid", torch.sigmoid)])
def test_activations_identity(name, ref):
    x = leaf(3, 5)
    y = getattr(lf, name)(x)
    torch.testing.assert_close(y, ref(x), rtol=0, atol=0)
    R = torch.randn_like(y)
    torch.testing.assert_close(relevance_of(y, R, x)[0], R, rtol=0, atol=0)


def test_gelu_tanh_approximation_forward():
    x = leaf(8)
    torch.testing.assert_close(lf.gelu(x, approximate="tanh"), F.gelu(x, approximate="tanh"), rtol=0, atol=0)


# ---------------------------------------------------------------- attention
def reference_attnlrp(q, k, v, R, mask=None, causal=False, scale=None, eps=EPS, cp=False):
    """AttnLRP / CP-LRP on the materialised attention matrix, float64, by the formulas."""
    hq, hk = q.shape[-3], k.shape[-3]
    rep = hq // hk
    K = k.repeat_interleave(rep, dim=-3)
    V = v.repeat_interleave(rep, dim=-3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    S = q @ K.transpose(-1, -2) * scale
    L, M = q.shape[-2], k.shape[-2]
    if causal:
        S = S.masked_fill(~torch.ones(L, M, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        S = S.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else S + mask
    P = torch.softmax(S, -1)
    O = P @ V
    if cp:
        g = R / stab(O, eps)
        RV = V * (P.transpose(-1, -2) @ g)
        return None, None, _group_sum(RV, rep)
    g = R / stab(2 * O, eps)
    RV = V * (P.transpose(-1, -2) @ g)
    dP = g @ V.transpose(-1, -2)
    dS = P * (dP - (P * dP).sum(-1, keepdim=True))  # = R_P - P sum R_P, divided by S below
    RQ = q * (dS @ K) * scale / 2
    RK = K * (dS.transpose(-1, -2) @ q) * scale / 2
    return RQ, _group_sum(RK, rep), _group_sum(RV, rep)


def _group_sum(t, rep):
    if rep == 1:
        return t
    shape = t.shape
    return t.reshape(*shape[:-3], shape[-3] // rep, rep, *shape[-2:]).sum(-3)


def qkv(b=2, hq=4, hk=4, L=5, M=5, d=8, dtype=D):
    return leaf(b, hq, L, d, dtype=dtype), leaf(b, hk, M, d, dtype=dtype), leaf(b, hk, M, d, dtype=dtype)


def padding_mask(b, L, M):
    m = torch.ones(b, 1, L, M, dtype=torch.bool)
    m[1, ..., : M // 2] = False  # left padding in the second sequence
    m[1, ..., : M // 2, : M // 2] = True
    return m


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "scale", "gqa", "cross"])
@pytest.mark.parametrize("cp", [False, True])
def test_sdpa_formula(case, cp):
    kw = {}
    b, hq, hk, L, M = 2, 4, 4, 5, 5
    mask = None
    if case == "gqa":
        hk = 2
        kw["enable_gqa"] = True
    if case == "cross":
        M = 7
    q, k, v = qkv(b, hq, hk, L, M)
    if case == "causal":
        kw["is_causal"] = True
    if case == "bool_mask":
        mask = padding_mask(b, L, M)
    if case == "float_mask":
        mask = torch.randn(b, 1, L, M, dtype=D)
    if case == "scale":
        kw["scale"] = 0.3
    fn = lf.scaled_dot_product_attention_cp if cp else lf.scaled_dot_product_attention
    y = fn(q, k, v, attn_mask=mask, epsilon=EPS, **kw)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw), rtol=0, atol=0)
    R = torch.randn_like(y)
    rq, rk, rv = relevance_of(y, R, q, k, v)
    eq, ek, ev = reference_attnlrp(q.detach(), k.detach(), v.detach(), R, mask, kw.get("is_causal", False),
                                   kw.get("scale"), cp=cp)
    torch.testing.assert_close(rv, ev, rtol=1e-9, atol=1e-9)
    if cp:
        assert rq is None and rk is None
    else:
        torch.testing.assert_close(rq, eq, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(rk, ek, rtol=1e-9, atol=1e-9)


def reference_attnlrp_constants(q, k, v, needs, R, eps=EPS):
    """AttnLRP on the materialised attention matrix (float64, by the formulas) when some of
    q, k, v are constants: the matmul ``P @ v`` shares ``R`` among its ``m`` variable factors
    (the weights count when q or k is variable), ``q @ k^T`` among its ``n`` variable ones."""
    need_q, need_k, need_v = needs
    n = int(need_q) + int(need_k)
    m = int(n > 0) + int(need_v)
    scale = 1 / math.sqrt(q.shape[-1])
    S = q @ k.transpose(-1, -2) * scale
    P = torch.softmax(S, -1)
    O = P @ v
    g = R / stab(m * O, eps)
    RV = v * (P.transpose(-1, -2) @ g) if need_v else None
    dP = g @ v.transpose(-1, -2)
    dS = P * (dP - (P * dP).sum(-1, keepdim=True))  # softmax: DT with bias is the gradient
    RQ = q * (dS @ k) * scale / n if need_q else None
    RK = k * (dS.transpose(-1, -2) @ q) * scale / n if need_k else None
    return RQ, RK, RV


def _gradient_form(fn, eps):
    """``fn`` in the gradient engine (its divisions stabilised with ``eps``), with the boundary
    conversions a composite makes at its forward's inputs and outputs (so ``.grad`` is
    relevance again)."""
    from lxt.rules.base import bind_engine, gradient_to_relevance, relevance_to_gradient

    def run(*inputs):
        inputs = [gradient_to_relevance(t) if t.requires_grad else t for t in inputs]
        return relevance_to_gradient(bind_engine(fn, True, eps)(*inputs), eps)

    return run


@pytest.mark.parametrize("needs", [(False, False, True), (True, True, False), (True, False, True),
                                   (False, True, True), (True, False, False)],
                         ids=lambda n: "".join(c if x else "-" for c, x in zip("qkv", n)))
@pytest.mark.parametrize("engine", ["explicit", "gradient"])
def test_sdpa_with_constant_operands(needs, engine):
    eps = 1e-12  # the formula's eps -> 0 step (q @ k^T) is then exact for both forms
    q, k, v = (t.detach().requires_grad_(need) for t, need in zip(qkv(), needs))
    fn = lambda q, k, v: lf.scaled_dot_product_attention(q, k, v, epsilon=eps)  # noqa: E731
    y = (fn if engine == "explicit" else _gradient_form(fn, eps))(q, k, v)
    R = torch.randn_like(y)
    got = torch.autograd.grad(y, [t for t in (q, k, v) if t.requires_grad], R)
    expected = [e for e in reference_attnlrp_constants(q.detach(), k.detach(), v.detach(), needs, R, eps)
                if e is not None]
    assert len(got) == len(expected)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mask_kind", [None, "bool", "causal"])
def test_sdpa_equals_composed_functionals(mask_kind):
    """The fused AttnLRP rule equals matmul -> softmax -> matmul composed from the functionals."""
    q, k, v = qkv(2, 3, 3, 6, 6)
    mask = padding_mask(2, 6, 6) if mask_kind == "bool" else None
    eps = 1e-12
    y = lf.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask_kind == "causal", epsilon=eps)
    R = torch.randn_like(y)
    fused = relevance_of(y, R, q, k, v)

    scale = 1 / math.sqrt(q.shape[-1])
    S = lf.matmul(lf.mul2(q, scale), k.transpose(-1, -2), epsilon=eps)
    if mask_kind == "bool":
        S = lf.add2(S, torch.zeros(mask.shape, dtype=D).masked_fill(~mask, float("-inf")), epsilon=eps)
    if mask_kind == "causal":
        S = lf.add2(S, torch.zeros(6, 6, dtype=D).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf")), epsilon=eps)
    P = lf.softmax(S, -1)
    O = lf.matmul(P, v, epsilon=eps)
    torch.testing.assert_close(O, y, rtol=1e-12, atol=1e-12)
    composed = relevance_of(O, R, q, k, v)
    for a, b in zip(fused, composed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_sdpa_gqa_equals_composed_with_repeat():
    q, k, v = qkv(1, 4, 2, 5, 5)
    y = lf.scaled_dot_product_attention(q, k, v, enable_gqa=True, epsilon=1e-12)
    R = torch.randn_like(y)
    fused = relevance_of(y, R, q, k, v)
    K, V = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    P = lf.softmax(lf.mul2(lf.matmul(q, K.transpose(-1, -2), epsilon=1e-12), 1 / math.sqrt(8)), -1)
    O = lf.matmul(P, V, epsilon=1e-12)
    composed = relevance_of(O, R, q, k, v)
    for a, b in zip(fused, composed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_sdpa_shape_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="incompatible"):
        lf.scaled_dot_product_attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="dimensions"):
        lf.scaled_dot_product_attention(q, k[0], v)
    with pytest.raises(TypeError, match="tensor"):
        lf.scaled_dot_product_attention(q, None, v)


# ---------------------------------------------------------------- cross-cutting contracts
ALL = {
    "linear_epsilon": lambda x: lf.linear_epsilon(x, torch.randn(3, x.shape[-1]).to(x.dtype), None),
    "add2": lambda x: lf.add2(x, x.detach().flip(-1) * 0.5),
    "mul2": lambda x: lf.mul2(x, x.detach() + 1),
    "matmul": lambda x: lf.matmul(x, x.detach().transpose(-1, -2)),
    "softmax": lambda x: lf.softmax(x, -1),
    "rms_norm_identity": lambda x: lf.rms_norm_identity(x, torch.ones(x.shape[-1], dtype=x.dtype), 1e-6),
    "layer_norm": lambda x: lf.layer_norm(x, x.shape[-1:]),
    "mean": lambda x: lf.mean(x, -1),
    "normalize": lambda x: lf.normalize(x, dim=-1),
    "silu": lf.silu,
    "sdpa": lambda x: lf.scaled_dot_product_attention(x, x * 0.5, x * 2),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_retain_graph_second_backward_identical(name):
    x = leaf(2, 3, 4, 6)
    y = ALL[name](x)
    R = torch.randn_like(y)
    y.backward(R, retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    y.backward(R)
    torch.testing.assert_close(x.grad, first, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(ALL))
def test_bfloat16_close_to_float32(name):
    x32 = torch.randn(2, 3, 4, 6)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        x = x32.detach().to(dtype).requires_grad_()
        torch.manual_seed(1)
        y = ALL[name](x)
        assert y.dtype == dtype
        torch.manual_seed(2)
        R = torch.randn(y.shape).to(dtype)
        y.backward(R)
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
        results.append(x.grad.float().flatten())
    corr = torch.corrcoef(torch.stack(results))[0, 1]
    assert corr > 0.97, corr


@pytest.mark.parametrize("engine", ["explicit", "gradient"])
@pytest.mark.parametrize("name", sorted(ALL))
def test_bfloat16_rules_compute_in_float32(name, engine, monkeypatch):
    """Rules compute in at least float32: every denominator a rule (or a boundary of the
    gradient form) stabilises is float32 for bfloat16 inputs, and the relevance is stored
    back in bfloat16."""
    import lxt.rules.base as base
    import lxt.rules.rules as rules_module

    seen = []
    stabilize = base.stabilize

    def spy(z, epsilon=base.EPSILON):
        seen.append(z.dtype)
        return stabilize(z, epsilon)

    monkeypatch.setattr(base, "stabilize", spy)
    monkeypatch.setattr(rules_module, "stabilize", spy)
    x = torch.randn(2, 3, 4, 6).to(torch.bfloat16).requires_grad_()
    fn = ALL[name] if engine == "explicit" else _gradient_form(ALL[name], base.EPSILON)
    y = fn(x)
    assert y.dtype == torch.bfloat16
    y.backward(torch.randn(y.shape).to(torch.bfloat16))
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    assert all(d == torch.float32 for d in seen), seen
    if engine == "gradient" or name in ("linear_epsilon", "add2", "matmul", "layer_norm", "mean", "sdpa"):
        assert seen, "no stabilised division seen"


@pytest.mark.parametrize("name", sorted(ALL))
def test_float16_is_refused_with_bf16_hint(name):
    x = leaf(2, 3, 4, 6, dtype=torch.float16)
    with pytest.raises(TypeError, match="bfloat16"):
        ALL[name](x)


@pytest.mark.parametrize("name", sorted(ALL))
def test_no_grad_inputs_get_no_relevance_and_plain_forward(name):
    x = torch.randn(2, 3, 4, 6, dtype=D)
    y = ALL[name](x)
    assert y.grad_fn is None
    with torch.no_grad():
        y = ALL[name](x.requires_grad_())
    assert y.grad_fn is None


def test_only_variable_inputs_receive_relevance():
    a = leaf(3, 4)
    b = torch.randn(3, 4, dtype=D)
    y = lf.mul2(a, b)
    y.sum().backward()
    assert b.grad is None and a.grad is not None


def test_inner_graph_is_freed_after_backward():
    import gc
    import weakref

    x = leaf(64, 64)
    W = torch.randn(64, 64, dtype=D)
    y = lf.linear_epsilon(x, W, None)
    node = y.grad_fn
    saved = node.saved_tensors  # the kept sub-graph's output
    ref = weakref.ref(saved[0])
    del saved
    y.backward(y)
    gc.collect()
    assert ref() is None, "the rule's sub-graph outlived backward"
