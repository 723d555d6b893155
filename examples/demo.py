"""A small end-to-end demo of the LRP core: a two-layer attention block written with the
drop-in functionals, explained with one forward and one backward pass."""
import math

import torch

import lxt
import lxt.functional as lf

torch.manual_seed(0)
T, d = 6, 16
tokens = ["<s>", "The", "cat", "sat", "on", "the"]
x = torch.randn(T, d, requires_grad=True)
Wq, Wk, Wv, Wo = (torch.randn(d, d) / math.sqrt(d) for _ in range(4))
W1, W2 = torch.randn(4 * d, d) / math.sqrt(d), torch.randn(d, 4 * d) / math.sqrt(4 * d)
readout = torch.randn(d)

with lxt.conservation() as report:
    q, k, v = (lf.linear_epsilon(x, W) for W in (Wq, Wk, Wv))
    a = lf.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    h = lf.add2(x, lf.linear_epsilon(a, Wo))
    h = lf.add2(h, lf.linear_epsilon(lf.gelu(lf.linear_epsilon(h, W1)), W2))
    logit = lf.linear_epsilon(h[-1], readout[None])[0]
    logit.backward(logit)  # start with R = the logit itself

relevance = x.grad.sum(-1)
print(f"explained logit: {logit.item():+.4f}   sum of token relevance: {relevance.sum().item():+.4f}")
for tok, r in zip(tokens, relevance.tolist()):
    bar = "#" * int(round(20 * abs(r) / relevance.abs().max().item()))
    print(f"{tok:>6} {r:+.4f} {'+' if r > 0 else '-'}{bar}")
print("\nrelevance in/out per rule call (first rows):")
print(report.table(max_rows=8))
