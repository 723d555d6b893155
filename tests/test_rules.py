"""Rules wrapping modules and callables, against independent float64 formulas."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lxt
import lxt.functional as lf
from lxt import rules
from conftest import stab

D = torch.float64
EPS = 1e-6


def linear(i=6, o=4, bias=True):
    return nn.Linear(i, o, bias=bias).to(D)


def rel(module_or_fn, x, R):
    x = x.detach().clone().requires_grad_()
    y = module_or_fn(x)
    y.backward(R)
    return y, x.grad


def test_epsilon_rule_on_linear_equals_functional():
    lin = linear()
    x = torch.randn(3, 6, dtype=D)
    R = torch.randn(3, 4, dtype=D)
    y1, r1 = rel(rules.EpsilonRule(epsilon=1e-3)(lin), x, R)
    y2, r2 = rel(lambda t: lf.linear_epsilon(t, lin.weight, lin.bias, epsilon=1e-3), x, R)
    torch.testing.assert_close(y1, lin(x), rtol=0, atol=0)
    torch.testing.assert_close(r1, r2, rtol=0, atol=0)
    z = lin(x).detach()
    torch.testing.assert_close(r1, x * ((R / stab(z, 1e-3)) @ lin.weight.detach()), rtol=1e-12, atol=1e-12)


def test_epsilon_rule_on_conv_formula():
    conv = nn.Conv2d(2, 3, 3, padding=1).to(D)
    x = torch.randn(1, 2, 5, 5, dtype=D)
    R = torch.randn(1, 3, 5, 5, dtype=D)
    _, r = rel(rules.EpsilonRule(epsilon=EPS)(conv), x, R)
    z = conv(x).detach()
    grad = torch.nn.grad.conv2d_input(x.shape, conv.weight.detach(), R / stab(z, EPS), padding=1)
    torch.testing.assert_close(r, x * grad, rtol=1e-12, atol=1e-12)


def test_epsilon_rule_template_wraps_a_module():
    lin = linear()
    wrapped = rules.EpsilonRule(epsilon=1e-2)(lin)  # module first: lxt.explicit.rules
    assert isinstance(wrapped, rules.RuleModule) and wrapped.module is lin
    assert wrapped.rule == rules.EpsilonRule(epsilon=1e-2)
    assert wrapped.weight is lin.weight  # attribute reads reach the wrapped module
    assert repr(rules.GammaRule(gamma=0.5)) == "GammaRule(gamma=0.5, epsilon=1e-06)"


def test_uniform_epsilon_rule_on_matmul_formula():
    """AttnLRP Prop. 3.3, written out: ``R_A = A * ((R / stab(2 A@B)) B^T)``,
    ``R_B = B * (A^T (R / stab(2 A@B)))``."""
    a = torch.randn(2, 3, 4, dtype=D, requires_grad=True)
    b = torch.randn(2, 4, 5, dtype=D, requires_grad=True)
    y = rules.UniformEpsilonRule(epsilon=EPS)(torch.matmul)(a, b)
    R = torch.randn_like(y)
    ra, rb = torch.autograd.grad(y, (a, b), R)
    A, B = a.detach(), b.detach()
    g = R / stab(2 * (A @ B), EPS)
    torch.testing.assert_close(ra, A * (g @ B.transpose(-1, -2)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rb, B * (A.transpose(-1, -2) @ g), rtol=1e-12, atol=1e-12)


def test_stabilize_moves_zero_up_and_keeps_signs():
    """``z + eps * sign(z)`` with ``sign(0) = +1`` (also for -0.0)."""
    z = torch.tensor([0.0, -0.0, 2.0, -2.0, 1e-9, -1e-9], dtype=D)
    out = rules.stabilize(z, 0.5)
    assert out.tolist() == [0.5, 0.5, 2.5, -2.5, 0.5 + 1e-9, -0.5 - 1e-9]
    torch.testing.assert_close(out, stab(z, 0.5), rtol=0, atol=0)
    # at a zero output the epsilon rule divides by +eps: the relevance keeps R's sign
    lin = linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0]]))
    x = torch.tensor([[1.0, -1.0]], dtype=D)  # z = 0 exactly
    R = torch.tensor([[3.0]], dtype=D)
    _, r = rel(rules.EpsilonRule(epsilon=1e-3)(lin), x, R)
    torch.testing.assert_close(r, x * R / 1e-3, rtol=1e-12, atol=0)


def test_uniform_rule_three_inputs():
    a, b, c = (torch.randn(3, 4, dtype=D, requires_grad=True) for _ in range(3))
    y = rules.UniformRule()(lambda p, q, s: p * q * s)(a, b, c)
    R = torch.randn_like(y)
    for g in torch.autograd.grad(y, (a, b, c), R):
        torch.testing.assert_close(g, R / 3, rtol=1e-15, atol=0)


def test_identity_rule_module_and_error_on_two_inputs():
    act = nn.GELU()
    x = torch.randn(5, dtype=D)
    R = torch.randn(5, dtype=D)
    y, r = rel(rules.IdentityRule()(act), x, R)
    torch.testing.assert_close(y, F.gelu(x), rtol=0, atol=0)
    torch.testing.assert_close(r, R, rtol=0, atol=0)
    a = torch.randn(3, dtype=D, requires_grad=True)
    b = torch.randn(3, dtype=D, requires_grad=True)
    y = rules.IdentityRule()(torch.mul)(a, b)
    with pytest.raises(ValueError, match="UniformRule"):
        y.sum().backward()


def test_stop_relevance_rule():
    lin = linear()
    x = torch.randn(2, 6, dtype=D)
    y, r = rel(rules.StopRelevanceRule()(lin), x, torch.randn(2, 4, dtype=D))
    torch.testing.assert_close(y, lin(x), rtol=0, atol=0)
    assert (r == 0).all()


# ---------------------------------------------------------------- gamma
def reference_gamma_linear(x, W, b, R, gamma, eps):
    """Per output unit j: favour the contributions that share z_j's sign by gamma."""
    z = x @ W.T + b
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(W.shape[0]):
            contrib = W[j] * x[n]  # contributions of each input to z_j
            if z[n, j] >= 0:
                mod = contrib + gamma * contrib.clamp(min=0)
                bj = b[j] + gamma * b[j].clamp(min=0)
            else:
                mod = contrib + gamma * contrib.clamp(max=0)
                bj = b[j] + gamma * b[j].clamp(max=0)
            out[n] += mod * R[n, j] / stab(mod.sum() + bj, eps)
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("signed", [False, True])
def test_gamma_rule_linear_formula(gamma, signed):
    lin = linear(5, 3)
    x = torch.randn(4, 5, dtype=D)
    if not signed:
        x = x.abs()
    R = torch.randn(4, 3, dtype=D)
    y, r = rel(rules.GammaRule(gamma=gamma, epsilon=EPS)(lin), x, R)
    torch.testing.assert_close(y, lin(x), rtol=0, atol=0)
    expected = reference_gamma_linear(x, lin.weight.detach(), lin.bias.detach(), R, gamma, EPS)
    torch.testing.assert_close(r, expected, rtol=1e-10, atol=1e-10)
    # the functional form is the same rule
    _, r2 = rel(lambda t: lf.linear_gamma(t, lin.weight, lin.bias, gamma=gamma, epsilon=EPS), x, R)
    torch.testing.assert_close(r, r2, rtol=0, atol=0)


def test_gamma_zero_is_epsilon_on_conv():
    conv = nn.Conv2d(2, 3, 3).to(D)
    x = torch.randn(2, 2, 6, 6, dtype=D)
    R = torch.randn(2, 3, 4, 4, dtype=D)
    _, r1 = rel(rules.GammaRule(gamma=0.0)(conv), x, R)
    _, r2 = rel(rules.EpsilonRule()(conv), x, R)
    torch.testing.assert_close(r1, r2, rtol=1e-10, atol=1e-12)


def test_gamma_positive_input_design_formula_without_bias():
    """DESIGN.md: R_x = x * ((W + g W+)^T (R / stab((W + g W+) x))) for x >= 0, z >= 0."""
    lin = linear(5, 3, bias=False)
    with torch.no_grad():
        lin.weight.abs_()
    x = torch.rand(4, 5, dtype=D)
    R = torch.randn(4, 3, dtype=D)
    _, r = rel(rules.GammaRule(gamma=0.5, epsilon=EPS)(lin), x, R)
    W = lin.weight.detach()
    Wg = W + 0.5 * W.clamp(min=0)
    torch.testing.assert_close(r, x * ((R / stab(x @ Wg.T, EPS)) @ Wg), rtol=1e-12, atol=1e-12)


def test_gamma_rule_rejects_other_modules_and_bad_gamma():
    with pytest.raises(TypeError, match="GammaRule applies"):
        rules.GammaRule()(nn.GELU())
    with pytest.raises(ValueError, match="gamma >= 0"):
        rules.GammaRule(gamma=-1)


# ---------------------------------------------------------------- Taylor
def test_taylor_linear_with_bias_is_epsilon_and_without_is_conservative():
    lin = linear()
    x = torch.randn(3, 6, dtype=D)
    R = torch.randn(3, 4, dtype=D)
    _, r_taylor = rel(rules.TaylorDecompositionRule(reference=0.0, bias=True, epsilon=EPS)(lin), x, R)
    _, r_eps = rel(rules.EpsilonRule(epsilon=EPS)(lin), x, R)
    torch.testing.assert_close(r_taylor, r_eps, rtol=1e-10, atol=1e-12)
    _, r_nobias = rel(rules.TaylorDecompositionRule(bias=False, epsilon=EPS)(lin), x, R)
    W = lin.weight.detach()
    torch.testing.assert_close(r_nobias, x * ((R / stab(x @ W.T, EPS)) @ W), rtol=1e-10, atol=1e-12)
    _, r = rel(rules.TaylorDecompositionRule(bias=False, epsilon=1e-14)(lin), x, R)
    assert math.isclose(r.sum().item(), R.sum().item(), rel_tol=1e-6)


def test_taylor_nonlinear_reference_point():
    W = torch.randn(4, 6, dtype=D)
    f = lambda t: torch.tanh(t @ W.T)  # noqa: E731
    x = torch.randn(3, 6, dtype=D)
    x0 = torch.randn(6, dtype=D) * 0.1
    R = torch.randn(3, 4, dtype=D)
    for use_bias in (True, False):
        _, r = rel(rules.TaylorDecompositionRule(reference=x0, bias=use_bias, epsilon=EPS)(f), x, R)
        J = (1 - torch.tanh(x0 @ W.T) ** 2)[:, None] * W  # Jacobian at x0: (4, 6)
        d = x - x0
        denom = d @ J.T + (torch.tanh(x0 @ W.T) if use_bias else 0)
        expected = d * ((R / stab(denom, EPS)) @ J)
        torch.testing.assert_close(r, expected, rtol=1e-10, atol=1e-12)
    # a callable reference point
    _, r1 = rel(rules.TaylorDecompositionRule(reference=lambda t: t * 0.5)(f), x, R)
    assert torch.isfinite(r1).all()


# ---------------------------------------------------------------- conservation report
def test_conservation_report_names_the_leaks():
    lin1, lin2 = linear(6, 5), linear(5, 3, bias=False)
    x = torch.randn(2, 6, dtype=D, requires_grad=True)
    with lxt.conservation() as report:
        h = lf.linear_epsilon(x, lin1.weight, lin1.bias, epsilon=1e-12)
        y = lf.linear_epsilon(lf.silu(h), lin2.weight, None, epsilon=1e-12)
        y.backward(y)
    assert len(report) == 3
    rules_seen = [c.rule for c in report.calls]
    assert rules_seen == ["EpsilonRule", "IdentityRule", "EpsilonRule"]
    first = report.calls[0]
    assert math.isclose(first.relevance_out, y.sum().item(), rel_tol=1e-12)
    assert math.isclose(first.relevance_in, first.relevance_out, rel_tol=1e-6)
    leaks = report.leaks(rtol=1e-6)
    assert len(leaks) == 1 and leaks[0] is report.calls[2]  # the biased layer absorbs relevance
    assert "EpsilonRule" in report.table()
    # outside the context nothing is recorded
    y2 = lf.silu(x)
    y2.sum().backward()
    assert len(report) == 3
