"""Explain a small ViT trained on scikit-learn's 8x8 digits with AttnLRP and CP-LRP.

train_digits_vit() trains a 2-layer ViT (2x2 patches + CLS) once (~10 s) and caches it.
lxt.explain(model, None, pixel_values) explains the predicted class logit; the relevance of
a pixel is pixel_values.grad summed over channels.  The default AttnLRP ViT table uses the
gamma rule on the patch convolution and the MLP linears (less noisy maps), epsilon elsewhere.

Run:  .venv/bin/python examples/vit_digits.py
Writes out/examples/vit_digits.png: input | AttnLRP | CP-LRP for a few test digits
(red = evidence for the predicted class, blue = against, symmetric scale per map; the black
line outlines the digit).
"""
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import lxt  # noqa: E402
import lxt.composites  # noqa: E402
from lxt_data import train_digits_vit  # noqa: E402

OUT = os.path.join("out", "examples")
os.makedirs(OUT, exist_ok=True)

t0 = time.perf_counter()
model, data = train_digits_vit()
x, y = data.test_pixel_values, data.test_labels
print(f"digits ViT: test accuracy {data.test_accuracy:.3f} on {len(y)} images "
      f"({time.perf_counter() - t0:.1f}s to train or load)")

# one example of each of a few classes
picks = [int((y == c).nonzero()[0]) for c in (0, 1, 3, 4, 7, 9)]
with torch.no_grad():
    pred = model(pixel_values=x[picks]).logits.argmax(-1)

methods = ("attnlrp", "cp-lrp")
rows = []
for method in methods:
    t = time.perf_counter()
    # patch once and explain all images; lxt.explain(model, None, pixels, method=...) does
    # the same for one image (and patches the model for that call only)
    comp = lxt.composites.attnlrp(model) if method == "attnlrp" else lxt.composites.cp_lrp(model)
    exps = [lxt.explain(model, None, x[i], method=method, composite=comp) for i in picks]
    rows.append(exps)
    print(f"{method}: {time.perf_counter() - t:.1f}s")
    for i, e in zip(picks, exps):
        print(f"  test #{i:3d} label {int(y[i])} predicted {e.target}  logit {e.logit:+6.2f}  "
              f"sum(R) {float(e.relevance.sum()):+6.2f}  positive share "
              f"{float(e.relevance.clamp(min=0).sum() / e.relevance.abs().sum()):.2f}")

fig, axes = plt.subplots(1 + len(methods), len(picks), figsize=(1.7 * len(picks), 5.6), dpi=120)
for col, i in enumerate(picks):
    ax = axes[0, col]
    ax.imshow(x[i, 0].numpy(), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(f"label {int(y[i])}, pred {int(pred[col])}", fontsize=9)
    for row, exps in enumerate(rows, start=1):
        r = exps[col].relevance.numpy()
        s = abs(r).max() or 1.0
        ax = axes[row, col]
        ax.imshow(r, cmap="bwr", vmin=-s, vmax=s)                          # white = 0
        ax.contour(x[i, 0].numpy(), levels=[0.5], colors="k", linewidths=0.8)  # digit outline
        ax.set_title(f"sum {r.sum():+.1f}", fontsize=8)
for row, name in enumerate(("input",) + methods):
    axes[row, 0].set_ylabel(name, fontsize=10)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("digits ViT: relevance for the predicted class (red +, blue -; outline = digit)", fontsize=10)
fig.tight_layout()
path = os.path.join(OUT, "vit_digits.png")
fig.savefig(path)
print(f"wrote {path}\ntotal {time.perf_counter() - t0:.1f}s")
