"""Agreement of the two engines on real weights: SmolLM2-135M float32, the faithfulness
benchmark's prompts, the top next token of each.  Per prompt, the per-token Pearson correlation
between the gradient engine (default) and the explicit engine near its epsilon -> 0 limit
(epsilon 1e-9), and how far their relevance sums differ, relative to the logit.

    lxt bench engines [--prompts 60] [--json out.json]

``tests/test_engines.py`` runs the same comparison on the first few prompts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def pearson(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def relevances(model, tok, prompts, method: str, engine: str) -> list:
    """``(per-token relevance, logit)`` of the top next token of each prompt."""
    import lxt.composites as composites

    kwargs = {"engine": "explicit", "epsilon": 1e-9} if engine == "explicit" else {}
    out = []
    with getattr(composites, method)(model, **kwargs).context(model):
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            x = model.get_input_embeddings()(ids).detach().requires_grad_()
            logits = model(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[0, -1]
            logit = logits[logits.argmax()]
            logit.backward(logit.detach())
            out.append((x.grad[0].sum(-1), logit.item()))
    return out


def compare(model, tok, prompts, method: str) -> dict:
    """Worst per-token Pearson and worst |sum difference| / |logit| over ``prompts``."""
    runs = {e: relevances(model, tok, prompts, method, e) for e in ("gradient", "explicit")}
    worst_r, worst_sum = 1.0, 0.0
    for (g, logit), (e, _) in zip(runs["gradient"], runs["explicit"]):
        worst_r = min(worst_r, pearson(g, e))
        worst_sum = max(worst_sum, abs(g.sum().item() - e.sum().item()) / abs(logit))
    return {"method": method, "prompts": len(prompts), "worst_pearson": worst_r,
            "worst_sum_difference": worst_sum}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lxt bench engines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=60, help="the first N benchmark prompts (default 60)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    from lxt_bench.faithfulness import load_prompts
    from lxt_data import load_smollm2

    model, tok = load_smollm2(dtype=torch.float32)
    prompts = load_prompts()[: args.prompts]
    rows = []
    for method in ("attnlrp", "cp_lrp"):
        t = time.perf_counter()
        row = compare(model, tok, prompts, method)
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        print(f"{method:8s} {row['prompts']} prompts: worst Pearson {row['worst_pearson']:.7f}, worst "
              f"|sum difference| / |logit| {row['worst_sum_difference']:.1e} ({row['seconds']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": "SmolLM2-135M-Instruct float32", "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
