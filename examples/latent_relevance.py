"""Which MLP neurons of SmolLM2 matter for a prediction?  Latent relevance with AttnLRP.

lxt.explain(..., layers=["model.layers.*.mlp"]) also returns, for every module matching the
glob, the relevance of that module's output: exp.latent[name] has shape (tokens, hidden) --
the share of the explained logit that passes through each dimension of the MLP's output (the
residual-stream write of the block) at each position.  Summing it gives the relevance that
flows through that layer's MLP branch (the rest goes through the residual and attention).

Note: the output of LlamaMLP is down_proj's output, so its "neurons" are the 576 dimensions
of the residual stream the block writes to (a few dimensions, e.g. #507, #247, #17, #199,
recur in every layer: residual "massive activation" channels).  For the 1536 intermediate
neurons, request a module whose output is them, e.g. "model.layers.*.mlp.up_proj".

Run:  .venv/bin/python examples/latent_relevance.py
Writes out/examples/latent_relevance.png (relevance through each layer's MLP).
"""
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import lxt  # noqa: E402
from lxt_data import load_smollm2  # noqa: E402

OUT = os.path.join("out", "examples")
os.makedirs(OUT, exist_ok=True)

PROMPT, TARGET = "The capital of Germany is", " Berlin"

t0 = time.perf_counter()
model, tok = load_smollm2()
exp = lxt.explain(model, tok, PROMPT, target=TARGET, layers=["model.layers.*.mlp"])
print(f"explained {exp.target!r} after {PROMPT!r}: logit {exp.logit:+.2f}, "
      f"sum of token relevance {float(exp.relevance.sum()):+.2f}  ({time.perf_counter() - t0:.1f}s)")
print("top tokens:", ", ".join(f"{t!r} {v:+.2f}" for t, v in exp.top(4)))

names = sorted(exp.latent, key=lambda n: int(n.split(".")[2]))   # model.layers.<i>.mlp
print(f"\n{len(names)} MLP outputs, each {tuple(exp.latent[names[0]].shape)} (tokens, hidden)")
print("layer  total R   at last token   top output dims (summed over positions)")
totals, last = [], []
for name in names:
    R = exp.latent[name]                       # (tokens, hidden)
    per_neuron = R.sum(0)
    top = per_neuron.abs().topk(3).indices
    totals.append(float(R.sum()))
    last.append(float(R[-1].sum()))
    desc = ", ".join(f"#{int(i)} {float(per_neuron[i]):+.2f}" for i in top)
    print(f"{int(name.split('.')[2]):5d}  {totals[-1]:+7.2f}   {last[-1]:+7.2f}         {desc}")

# the single most relevant (position, neuron) of the whole network
best = max(names, key=lambda n: float(exp.latent[n].abs().max()))
R = exp.latent[best]
pos, neuron = divmod(int(R.abs().argmax()), R.shape[1])
print(f"\nmost relevant unit: {best} neuron #{neuron} at token {exp.tokens[pos]!r} "
      f"(R = {float(R[pos, neuron]):+.2f})")

layers = [int(n.split(".")[2]) for n in names]
fig, ax = plt.subplots(figsize=(7, 3), dpi=120)
ax.bar(layers, totals, color=["tab:red" if v >= 0 else "tab:blue" for v in totals], label="all positions")
ax.plot(layers, last, "k.-", lw=1, label="last position only")
ax.axhline(0, color="#888", lw=0.6)
ax.set_xlabel("layer")
ax.set_ylabel("relevance through the MLP")
ax.set_title(f"AttnLRP: {TARGET!r} after {PROMPT!r} (logit {exp.logit:.1f})", fontsize=9)
ax.legend(fontsize=8)
fig.tight_layout()
path = os.path.join(OUT, "latent_relevance.png")
fig.savefig(path)
print(f"wrote {path}\ntotal {time.perf_counter() - t0:.1f}s")
