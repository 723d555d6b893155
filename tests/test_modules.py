"""Drop-in modules: same forward, shared weights, relevance equal to the functionals."""
import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import lxt.functional as lf
import lxt.modules as lm

D = torch.float64


def grad_of(fn, x, R):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(R)
    return y, x.grad


def test_linear_epsilon_module_shares_weights():
    lin = nn.Linear(6, 4).to(D)
    new = lm.LinearEpsilon.from_module(lin, epsilon=1e-3)
    assert new.weight is lin.weight and new.bias is lin.bias
    x, R = torch.randn(3, 6, dtype=D), torch.randn(3, 4, dtype=D)
    y, r = grad_of(new, x, R)
    torch.testing.assert_close(y, lin(x), rtol=0, atol=0)
    _, r2 = grad_of(lambda t: lf.linear_epsilon(t, lin.weight, lin.bias, 1e-3), x, R)
    torch.testing.assert_close(r, r2, rtol=0, atol=0)
    nb = lm.LinearEpsilon.from_module(nn.Linear(6, 4, bias=False))
    assert nb.bias is None
    fresh = lm.LinearEpsilon(3, 2)
    assert fresh(torch.randn(1, 3)).shape == (1, 2)


def test_softmax_dt_module():
    sm = nn.Softmax(dim=1)
    new = lm.SoftmaxDT.from_module(sm)
    x, R = torch.randn(2, 5, dtype=D), torch.randn(2, 5, dtype=D)
    y, r = grad_of(new, x, R)
    torch.testing.assert_close(y, sm(x), rtol=0, atol=0)
    torch.testing.assert_close(r, grad_of(lambda t: lf.softmax(t, 1), x, R)[1], rtol=0, atol=0)


def test_rms_norm_identity_from_hf_and_torch_modules():
    hf = LlamaRMSNorm(8, eps=1e-5)
    with torch.no_grad():
        hf.weight.normal_()
    new = lm.RMSNormIdentity.from_module(hf)
    assert new.weight is hf.weight and new.variance_epsilon == 1e-5
    x, R = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    y, r = grad_of(new, x, R)
    torch.testing.assert_close(y, hf(x), rtol=0, atol=0)
    torch.testing.assert_close(r, R, rtol=0, atol=0)
    tn = nn.RMSNorm(8, eps=1e-4)
    assert lm.RMSNormIdentity.from_module(tn).variance_epsilon == 1e-4


def test_layer_norm_epsilon_module():
    ln = nn.LayerNorm(6).to(D)
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
    new = lm.LayerNormEpsilon.from_module(ln)
    assert new.weight is ln.weight and new.bias is ln.bias
    x, R = torch.randn(2, 6, dtype=D), torch.randn(2, 6, dtype=D)
    y, r = grad_of(new, x, R)
    torch.testing.assert_close(y, ln(x), rtol=1e-12, atol=1e-12)
    _, r2 = grad_of(lambda t: lf.layer_norm(t, (6,), ln.weight, ln.bias, ln.eps), x, R)
    torch.testing.assert_close(r, r2, rtol=0, atol=0)


@pytest.mark.parametrize("cls,orig", [(lm.SiLUIdentity, nn.SiLU()), (lm.GELUIdentity, nn.GELU("tanh")),
                                      (lm.TanhIdentity, nn.Tanh()), (lm.ReLUIdentity, nn.ReLU())])
def test_activation_identity_modules(cls, orig):
    new = cls.from_module(orig)
    x, R = torch.randn(7, dtype=D), torch.randn(7, dtype=D)
    y, r = grad_of(new, x, R)
    torch.testing.assert_close(y, orig(x), rtol=0, atol=0)
    torch.testing.assert_close(r, R, rtol=0, atol=0)


def test_from_module_wrong_type_is_clear():
    with pytest.raises(TypeError, match="needs a Linear"):
        lm.LinearEpsilon.from_module(nn.Tanh())
