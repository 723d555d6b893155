"""Explain SmolLM2's next-token predictions with AttnLRP and CP-LRP, side by side.

For each factual prompt, lxt.explain runs one forward and one backward pass and returns the
relevance of every prompt token for the target token's logit.  LRP relevance is conserved
layer by layer, so the token relevances sum to the explained logit -- up to what bias-like
terms absorb on the way (in AttnLRP mostly the softmax's bias term; CP-LRP treats the
attention weights as constants and conserves exactly).

A contrast example explains logit(" Berlin") - logit(" Paris"): which tokens make the model
pick Berlin *rather than* Paris.

Run:  .venv/bin/python examples/llm_next_token.py
Writes out/examples/llm_next_token.html (all explanations) and two PNGs.
"""
import os
import time

import torch

import lxt
import lxt.viz
from lxt_data import load_smollm2

OUT = os.path.join("out", "examples")
os.makedirs(OUT, exist_ok=True)

PROMPTS = [
    ("The capital of Germany is", " Berlin"),
    ("The capital of France is", " Paris"),
    ("The Eiffel Tower is located in the city of", " Paris"),
    ("Water freezes at a temperature of zero degrees", " Celsius"),
]
CONTRAST = ("The capital of Germany is", " Berlin", " Paris")

t0 = time.perf_counter()
model, tok = load_smollm2()
print(f"loaded SmolLM2-135M in {time.perf_counter() - t0:.1f}s")

# What does the model predict?  (a plain forward, no lxt involved)
with torch.no_grad():
    for prompt, target in PROMPTS:
        logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]
        top = [tok.decode([i]) for i in logits.topk(3).indices]
        print(f"  {prompt!r:50} -> top-3 {top}")


def fmt_top(exp, k=4):
    return ", ".join(f"{t!r} {v:+.2f}" for t, v in exp.top(k))


results = {}
if True:
    prompts = [p for p, _ in PROMPTS]
    targets = [t for _, t in PROMPTS]
    for method in ("attnlrp", "cp-lrp"):
        t = time.perf_counter()
        # One batched call per method (each call patches the model and captures it with
        # TorchDynamo once, ~15 s on 2 CPU cores; the passes themselves take ~1 s), plus the
        # contrast: logit(" Berlin") - logit(" Paris"), whose relevance sums to the difference.
        exps = lxt.explain(model, tok, prompts, target=targets, method=method, progress=False)
        exps.append(lxt.explain(model, tok, CONTRAST[0], target=CONTRAST[1], contrast=CONTRAST[2],
                                method=method))
        results[method] = exps
        print(f"\n{method}  ({time.perf_counter() - t:.1f}s)")
        for exp in exps:
            what = f"{exp.target!r}" + (f" - {exp.contrast!r}" if exp.contrast else "")
            print(f"  {exp.prompt!r:50} {what:20} value {exp.logit:+6.2f}  "
                  f"sum(R) {float(exp.relevance.sum()):+6.2f}\n      top: {fmt_top(exp)}")

# AttnLRP and CP-LRP of the same prompt next to each other in the page.
ordered = [e for pair in zip(results["attnlrp"], results["cp-lrp"]) for e in pair]
html_path = os.path.join(OUT, "llm_next_token.html")
with open(html_path, "w", encoding="utf-8") as f:
    f.write(lxt.viz.html_page(ordered))
print(f"\nwrote {html_path}")
print("wrote", results["attnlrp"][0].to_png(os.path.join(OUT, "llm_next_token.png")))
print("wrote", results["attnlrp"][-1].to_png(os.path.join(OUT, "llm_next_token_contrast.png")))
print(f"total {time.perf_counter() - t0:.1f}s")
