"""Explain the cosine similarity of two sentence embeddings (all-MiniLM-L6-v2) with AttnLRP.

The explained value is the similarity itself,

    sim = < normalize(mean_t h1[t]), normalize(mean_t h2[t]) >,

the sentence-transformers recipe of this model (mean pooling over the real tokens, [CLS] and
[SEP] included, then L2 normalisation).  Relevance is defined by LRP, backwards from R = sim:

* the dot product sum_i n1[i] * n2[i] is written as mul2 (uniform rule: each factor of a
  product gets half its relevance) followed by an epsilon-rule sum (a linear map with a
  weight of ones), so each embedding dimension i carries n1[i] * n2[i] and each sentence
  receives half of it;
* normalize gets the identity rule, the mean over tokens the epsilon rule;
* the encoder is patched with lxt's BERT AttnLRP table; the relevance of a token is the
  sum over its input-embedding vector of inputs_embeds.grad.

So the relevances of all tokens of *both* sentences add up to sim (up to what biases,
position embeddings and LayerNorm centring absorb), and a token with a large positive
relevance is one whose representation makes the two sentences point the same way.

Run:  .venv/bin/python examples/bert_sentence_similarity.py
Writes out/examples/bert_sentence_similarity.html.
"""
import os
import time

import torch

import lxt
import lxt.functional as lf
import lxt.viz
from lxt_data import load_minilm

OUT = os.path.join("out", "examples")
os.makedirs(OUT, exist_ok=True)

PAIRS = [
    ("A man is playing a guitar.", "Someone plays an acoustic guitar on stage."),
    ("The cat sleeps on the warm sofa.", "A kitten is napping on the couch."),
    ("The stock market fell sharply today.", "A kitten is napping on the couch."),
]

t0 = time.perf_counter()
model, tok = load_minilm()
emb_layer = model.get_input_embeddings()


def explain_pair(comp, s1, s2, method):
    """Relevance of every token of s1 and s2 for their cosine similarity."""
    batch = tok([s1, s2], padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    x = emb_layer(batch["input_ids"]).detach().requires_grad_()
    h = model(inputs_embeds=x, attention_mask=mask).last_hidden_state       # (2, T, 384)
    # mean over the real tokens of each sentence (indexing routes relevance exactly)
    pooled = [lf.mean(h[b, mask[b].bool()], dim=0) for b in range(2)]
    n1, n2 = (lf.normalize(p, dim=0) for p in pooled)
    prod = lf.mul2(n1, n2)                                                  # uniform rule
    sim = lf.linear_epsilon(prod, torch.ones(1, prod.shape[0]))[0]         # epsilon-rule sum
    sim.backward(sim)                                                       # R = sim
    rel = x.grad.sum(-1)                                                    # (2, T)
    out = []
    for b, s in enumerate((s1, s2)):
        keep = mask[b].bool()
        toks = tok.convert_ids_to_tokens(batch["input_ids"][b][keep].tolist())
        out.append(lxt.Explanation(tokens=[t + " " for t in toks], relevance=rel[b][keep].detach(),
                                   target="similarity", target_id=0, logit=float(sim.detach()),
                                   method=method, prompt=s))
    return float(sim.detach()), out


html_parts = []
for method, make in (("attnlrp", lxt.composites.attnlrp), ("cp-lrp", lxt.composites.cp_lrp)):
    t = time.perf_counter()
    comp = make(model)
    with comp.context(model):   # patch once, explain every pair
        results = [explain_pair(comp, s1, s2, method) for s1, s2 in PAIRS]
    print(f"\n=== {method} ({time.perf_counter() - t:.1f}s)")
    for sim, (e1, e2) in results:
        total = float(e1.relevance.sum() + e2.relevance.sum())
        print(f"sim {sim:+.3f}  sum of relevance over both sentences {total:+.3f} "
              f"(sentence 1 {float(e1.relevance.sum()):+.3f}, sentence 2 {float(e2.relevance.sum()):+.3f})")
        for e in (e1, e2):
            print("   " + "  ".join(f"{t.strip()}:{r:+.3f}" for t, r in zip(e.tokens, e.relevance.tolist())))
        html_parts += [e1, e2]

# a plain (unpatched) check that the patched forward computed the same similarity
with torch.no_grad():
    for (s1, s2), (sim, _) in zip(PAIRS, results):
        b = tok([s1, s2], padding=True, return_tensors="pt")
        h = model(**b).last_hidden_state
        m = b["attention_mask"][..., None].float()
        e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        assert abs(float(e[0] @ e[1]) - sim) < 1e-4, (float(e[0] @ e[1]), sim)
print("\nsimilarities match the unpatched model (sentence-transformers pooling)")

path = os.path.join(OUT, "bert_sentence_similarity.html")
with open(path, "w", encoding="utf-8") as f:
    f.write(lxt.viz.html_page(html_parts))
print(f"wrote {path}\ntotal {time.perf_counter() - t0:.1f}s")
