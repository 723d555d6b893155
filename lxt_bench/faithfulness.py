"""Faithfulness of attributions by input perturbation (AttnLRP paper protocol, made robust).

For every input (a prompt, or an image) the model's top prediction is explained by each method.
The input units (tokens, or pixels) are ranked by relevance and replaced one at a time by a fill
value, most relevant first (MoRF) and least relevant first (LeRF); after each step the
log-probability of the explained output is recorded.  A curve has ``K + 1`` points (0..K units
replaced), so step 0 is the unperturbed input for both orderings and step K (everything
replaced) is the same input for both.  The score of one input is the mean over the ``K + 1``
steps of ``LeRF - MoRF`` (log-prob units, higher is better); the table gives the mean and the
standard error over inputs.  A random ordering (one seeded permutation per input) is the
floor every method must beat.

Language model (SmolLM2-135M-Instruct, prompts from ``lxt_bench/prompts.txt``): a BOS token
(``<|endoftext|>``, SmolLM2's document separator; its tokenizer adds none) is prepended; the
first (BOS) and the last (query) position are never ranked or replaced; the fill is the zero
vector, a neutral token's input embedding (:func:`neutral_token`: a single space, ``Ġ``, id
216: a real token that carries no content and, unlike ``<|endoftext|>``, does not start a new
document nor duplicate the BOS that we prepend), or the mean of the input-embedding matrix
(over the vocabulary).  All perturbed variants of one prompt go through the model in one batch
(no grad, logits only at the last position, duplicates across methods computed once).

Sentence encoder (all-MiniLM-L6-v2, a ``BertModel`` without a head; ``--model bert``, the same
prompts file): the explained value is the cosine similarity of the sentence embedding (mean
pooling, L2-normalised, as sentence-transformers pools this model) to the unperturbed
sentence's embedding, explained with the pooling's LRP rules (:func:`evaluate_encoder`); the
curves hold that similarity.  ``[CLS]`` and ``[SEP]`` are never ranked nor replaced; the
neutral fill is ``[MASK]``'s word embedding.

LRP variants (issue 23): ``attnlrp``, ``cp-lrp``, the per-layer mixes ``attnlrp+cp-late``
(CP-LRP, value-only attention and gated MLPs' gate detached, in the last third of the layers:
SmolLM2 10 of 30, MiniLM 2 of 6) and ``attnlrp+cp-half`` (the last half: 15, 3), made with the
composites' per-layer ``overrides`` (:func:`mixed_composite`), and the positional variants
``attnlrp-pos`` / ``cp-lrp-pos`` (``lxt.explain(..., positional=True)``, tokens ranked by what
remains on them; skipped with a note where lxt does not offer it).  Each is compared with
AttnLRP per input: the paired difference ΔA of the normalised areas, signed so that positive
means more faithful (MoRF: ``A(attnlrp) - A(variant)``; LeRF and LeRF - MoRF:
``variant - attnlrp``), its mean over prompts and a 95 % percentile bootstrap interval (2000
resamples over prompts, seeded); a variant beats AttnLRP where the interval's low end is > 0.
The prompts are split by line number: odd lines tune (choose the candidate), even lines are
held out (decide).  ``--report`` reads the result files of both models and gives the README
tables and the verdict (:func:`verdict`): the candidate chosen on the tuning half becomes the
default only if it beats AttnLRP on the held-out half of both models under both occlusions.

Image model (the ViT trained on scikit-learn digits): every pixel is ranked (relevance summed
over channels; ``gradient`` is the L2 norm over channels, as in ``lxt.explain``) and replaced
with 0, or with the mean pixel value of the evaluated images (per channel).

Methods: ``attnlrp``, ``cp-lrp``, ``input_x_gradient``, ``gradient`` (L2 norm per unit),
``integrated_gradients`` (50 midpoint steps, zero baseline) -- the formulas of ``lxt.explain``
(text: ``lxt.explain`` itself, batched over prompts, except integrated gradients, batched over
its steps here; images: batched here, each LRP composite registered once) -- plus ``attention_rollout`` (Abnar & Zuidema 2020: heads averaged, 0.5 A +
0.5 I, rows renormalised, product over layers; row of the query / CLS token) and ``random``.
Ties in a ranking are broken by a seeded random permutation, never by position.

    .venv/bin/python benchmarks/faithfulness.py [--model llm|bert|vit|all] [--prompts N]
        [--images N] [--json out.json] [--methods ...] [--fills zero neutral mean] [--steps 50]
        [--reference attnlrp] [--resamples 2000]
    .venv/bin/python benchmarks/faithfulness.py --report llm.json bert.json [--markdown t.md]

Sharded and resumable (language model): ``--jsonl per_prompt.jsonl`` writes one record per
prompt as it is finished (``lxt.corpus``: a rerun skips the prompts already there), and runs
data-parallel under ``torchrun --nproc-per-node N -m lxt.cli bench faithfulness --model llm
--jsonl ...``; the table is then computed from the merged records.  Each prompt's random
orderings are drawn from a generator seeded with (seed, its line number), so the result does
not depend on the number of processes or on where a run was resumed (one generator for the
whole run, as without --jsonl, would).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

import lxt

HERE = Path(__file__).resolve().parent
PROMPTS_FILE = HERE / "prompts.txt"
RESULTS_DIR = Path("benchmarks") / "results"

#: methods computed by lxt.explain (same names)
LXT_METHODS = ("attnlrp", "cp-lrp", "input_x_gradient", "gradient", "integrated_gradients")
#: per-layer mixes: CP-LRP (value-only attention, gate detached) in the last fraction of the
#: layers, AttnLRP in the others (:func:`mixed_composite`)
MIXES = {"attnlrp+cp-late": 1 / 3, "attnlrp+cp-half": 1 / 2}
#: positional relevance (``lxt.explain(..., positional=True)``) on top of a method; tokens are
#: ranked by what remains on them (``Explanation.relevance``)
POSITIONAL = {"attnlrp-pos": "attnlrp", "cp-lrp-pos": "cp-lrp"}
#: the LRP variants compared with AttnLRP (issue 23)
VARIANTS = ("attnlrp", "cp-lrp") + tuple(MIXES) + tuple(POSITIONAL)
#: the default methods (the baseline comparison)
METHODS = LXT_METHODS + ("attention_rollout", "random")
ALL_METHODS = LXT_METHODS + tuple(MIXES) + tuple(POSITIONAL) + ("attention_rollout", "random")
#: text fills: the zero vector, a neutral token's embedding, the mean embedding
FILLS = ("zero", "neutral", "mean")
IMAGE_FILLS = ("zero", "mean")
#: orderings of the paired comparison: MoRF area, LeRF area, LeRF - MoRF
ORDERINGS = ("morf", "lerf", "score")
SMOLLM2_BOS = "<|endoftext|>"
#: the neutral token of a tokenizer without a mask token: a single space (SmolLM2: ``Ġ``)
NEUTRAL_TEXT = " "


# ---------------------------------------------------------------------------- core machinery
def rank(relevance: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``candidates`` (unit indices) sorted by ``relevance``, most relevant first; ties are
    broken by a random permutation (from ``generator``), not by position."""
    candidates = torch.as_tensor(candidates, dtype=torch.long)
    perm = candidates[torch.randperm(len(candidates), generator=generator)]
    order = torch.argsort(relevance.detach().float()[perm], descending=True, stable=True)
    return perm[order]


def step_masks(order: torch.Tensor, n_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks ``(K + 1, n_units)`` of the units replaced after 0..K steps, for MoRF
    (``order`` as given) and LeRF (``order`` reversed)."""
    k = len(order)
    out = []
    for o in (order, order.flip(0)):
        m = torch.zeros(k + 1, n_units, dtype=torch.bool)
        for s in range(1, k + 1):
            m[s] = m[s - 1]
            m[s, o[s - 1]] = True
        out.append(m)
    return out[0], out[1]


@torch.no_grad()
def perturbation_curves(logprob_fn: Callable[[torch.Tensor], torch.Tensor], units: torch.Tensor,
                        orders: dict, fills: dict, batch_size: int = 256) -> dict:
    """MoRF / LeRF curves of one input.

    Parameters
    ----------
    logprob_fn : callable
        ``(B, N, F)`` batch of perturbed inputs -> ``(B,)`` log-probabilities of the target.
    units : Tensor ``(N, F)``
        The input as ``N`` units (tokens, pixels) of ``F`` features (hidden size, channels).
    orders : dict of str to LongTensor
        Per method, the unit indices to replace, most relevant first.
    fills : dict of str to Tensor ``(F,)``
        Per fill name, the replacement value.

    Returns
    -------
    dict: fill -> method -> {"morf": list, "lerf": list, "score": float}; every variant that
    occurs for several methods / orderings (step 0, step K, equal prefixes) is evaluated once.
    """
    n = units.shape[0]
    out = {}
    for fill_name, fill in fills.items():
        masks, index = [], {}
        for method, order in orders.items():
            morf, lerf = step_masks(order, n)
            index[method] = (len(masks), len(order) + 1)
            masks += [morf, lerf]
        allm = torch.cat(masks)  # (sum over methods of 2 (K + 1), N)
        uniq, inverse = torch.unique(allm, dim=0, return_inverse=True)
        values = []
        for start in range(0, len(uniq), batch_size):
            m = uniq[start:start + batch_size, :, None]
            x = torch.where(m, fill.to(units.dtype).expand_as(units), units)
            values.append(logprob_fn(x).float().cpu())
        values = torch.cat(values)[inverse]
        res = {}
        offset = 0
        for method, order in orders.items():
            k1 = len(order) + 1
            morf = values[offset:offset + k1]
            lerf = values[offset + k1:offset + 2 * k1]
            offset += 2 * k1
            res[method] = {"morf": morf.tolist(), "lerf": lerf.tolist(),
                           "score": float((lerf - morf).mean())}
        out[fill_name] = res
    return out


def summarize(per_input: list, methods: Sequence[str], fills: Sequence[str]) -> list:
    """Table rows: per method and fill, the mean score and its standard error over inputs,
    and the mean MoRF / LeRF log-prob (mean over steps, then over inputs)."""
    rows = []
    for method in methods:
        for fill in fills:
            s = torch.tensor([r["curves"][fill][method]["score"] for r in per_input], dtype=torch.float64)
            morf = torch.tensor([sum(c) / len(c) for c in (r["curves"][fill][method]["morf"] for r in per_input)])
            lerf = torch.tensor([sum(c) / len(c) for c in (r["curves"][fill][method]["lerf"] for r in per_input)])
            n = len(s)
            sem = float(s.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
            rows.append({"method": method, "fill": fill, "score_mean": float(s.mean()), "score_sem": sem,
                         "morf_mean": float(morf.mean()), "lerf_mean": float(lerf.mean()), "n": n})
    return rows


def format_table(rows: list, title: str = "", value: str = "target log-prob") -> str:
    """method x fill: score mean +- standard error (and the mean MoRF / LeRF log-probs)."""
    fills = list(dict.fromkeys(r["fill"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["fill"]): r for r in rows}
    w = max(len(m) for m in methods + ["method"]) + 2
    head = f"{'method':<{w}}" + "".join(f"{'fill=' + f + ': LeRF-MoRF':>26}{'MoRF':>9}{'LeRF':>9}" for f in fills)
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for m in methods:
        line = f"{m:<{w}}"
        for f in fills:
            r = cell[(m, f)]
            line += f"{r['score_mean']:>17.3f} +- {r['score_sem']:<5.3f}{r['morf_mean']:>9.3f}{r['lerf_mean']:>9.3f}"
        lines.append(line)
    lines.append(f"(n = {rows[0]['n']}; score = mean over steps of LeRF - MoRF {value}, higher is better; "
                 "+- standard error over inputs)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- paired comparison
def bootstrap_interval(values, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple:
    """``(mean, low, high)``: the mean of ``values`` (one per input) and its percentile
    bootstrap interval.  ``resamples`` means of ``n`` values drawn with replacement (indices
    ``torch.randint(n, (resamples, n))`` from a generator seeded with ``seed``); the interval
    is their ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (``torch.quantile``, linear
    interpolation)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    idx = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    means = v[idx].mean(1)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return float(v.mean()), lo, hi


def split_prompts(indices: Sequence[int]) -> dict:
    """The deterministic split by line number: odd lines tune, even lines are held out."""
    indices = [int(i) for i in indices]
    return {"tuning": [i for i in indices if i % 2 == 1], "held_out": [i for i in indices if i % 2 == 0]}


def areas(curves: dict) -> dict:
    """Normalised areas of one input's curves for one method: ``morf`` and ``lerf`` (mean
    over the ``K + 1`` steps) and ``score`` (LeRF - MoRF)."""
    morf = sum(curves["morf"]) / len(curves["morf"])
    lerf = sum(curves["lerf"]) / len(curves["lerf"])
    return {"morf": morf, "lerf": lerf, "score": lerf - morf}


def paired_deltas(per_input: list, method: str, fill: str, reference: str = "attnlrp") -> dict:
    """Per ordering, ``(n,)`` paired differences ``method`` vs ``reference``, signed so that
    positive means ``method`` is more faithful: MoRF ``A(ref) - A(method)`` (a faster drop is
    better), LeRF ``A(method) - A(ref)``, score ``S(method) - S(ref)``."""
    out = {o: [] for o in ORDERINGS}
    for r in per_input:
        a, b = areas(r["curves"][fill][method]), areas(r["curves"][fill][reference])
        out["morf"].append(b["morf"] - a["morf"])
        out["lerf"].append(a["lerf"] - b["lerf"])
        out["score"].append(a["score"] - b["score"])
    return {o: torch.tensor(v, dtype=torch.float64) for o, v in out.items()}


def delta_rows(per_input: list, methods: Sequence[str], fills: Sequence[str], reference: str = "attnlrp",
               resamples: int = 2000, seed: int = 0, level: float = 0.95) -> list:
    """Per method (other than ``reference``), fill, subset (``all``, ``tuning``, ``held_out``
    of :func:`split_prompts`, by each record's ``index``) and ordering: the mean paired
    difference ΔA to ``reference``, its bootstrap interval, and ``beats`` (low > 0)."""
    split = split_prompts([r["index"] for r in per_input])
    subsets = {"all": per_input,
               **{k: [r for r in per_input if r["index"] in set(v)] for k, v in split.items()}}
    rows = []
    for method in methods:
        if method == reference:
            continue
        for fill in fills:
            for subset, recs in subsets.items():
                d = paired_deltas(recs, method, fill, reference)
                for o in ORDERINGS:
                    mean, lo, hi = bootstrap_interval(d[o], resamples, seed, level)
                    rows.append({"method": method, "reference": reference, "fill": fill, "subset": subset,
                                 "ordering": o, "n": len(recs), "delta": mean, "low": lo, "high": hi,
                                 "beats": bool(lo > 0), "loses": bool(hi < 0)})
    return rows


def _cells(rows: list, subset: str, ordering: str = "score") -> dict:
    return {(r["method"], r["fill"]): r for r in rows if r["subset"] == subset and r["ordering"] == ordering}


def verdict(results: dict, fills: Sequence[str] = ("zero", "neutral"), reference: str = "attnlrp",
            candidates: Sequence[str] = None) -> dict:
    """The decision of issue 23 from ``{model name: delta rows}``.

    The candidate is chosen on the tuning prompts only: among ``candidates`` (default: the
    LRP variants other than ``reference`` that every model has), the one whose smallest
    standardised tuning ΔA (LeRF - MoRF; ΔA divided by its interval's width, so the two
    models' units do not mix) over models and ``fills`` is largest, provided it is positive
    (above ``reference`` in every tuning cell; else there is no candidate).  It replaces the default
    only if it beats ``reference`` on the held-out prompts of every model under every fill
    (interval's low end > 0); otherwise ``reference`` stays."""
    models = list(results)
    have = [set(r["method"] for r in rows) for rows in results.values()]
    if candidates is None:
        candidates = [m for m in VARIANTS if m != reference and all(m in h for h in have)]
    tuning = {name: _cells(rows, "tuning") for name, rows in results.items()}
    held = {name: _cells(rows, "held_out") for name, rows in results.items()}

    def strength(m):
        zs = []
        for name in models:
            for f in fills:
                c = tuning[name][(m, f)]
                zs.append(c["delta"] / max(c["high"] - c["low"], 1e-12))
        return min(zs)

    ranked = sorted(candidates, key=strength, reverse=True)
    wins = {m: all(held[name][(m, f)]["beats"] for name in models for f in fills) for m in candidates}
    chosen = ranked[0] if ranked and strength(ranked[0]) > 0 else None  # better on every tuning cell
    default = chosen if chosen is not None and wins[chosen] else reference
    return {"reference": reference, "fills": list(fills), "models": models, "metric": "score (LeRF - MoRF)",
            "candidate": chosen, "tuning_strength": {m: strength(m) for m in candidates},
            "held_out_wins_everywhere": wins, "default": default,
            "rule": "candidate = best on the tuning prompts (odd lines); it becomes the default only if "
                    "its held-out (even lines) ΔA interval is above 0 on every model and fill"}


def _ci(r: dict, digits: int = 4) -> str:
    mark = " **>**" if r["beats"] else (" <" if r["loses"] else "")
    return f"{r['delta']:+.{digits}f} [{r['low']:+.{digits}f}, {r['high']:+.{digits}f}]{mark}"


def ranking_by_fill(score_rows: list, fills: Sequence[str]) -> dict:
    """Per fill, the methods by mean score (LeRF - MoRF), best first."""
    return {f: [r["method"] for r in sorted((r for r in score_rows if r["fill"] == f),
                                           key=lambda r: -r["score_mean"])] for f in fills}


def ranking_flips(orders: dict) -> list:
    """Pairs of methods ranked in one order under one fill and in the other under another."""
    fills = list(orders)
    pos = {f: {m: i for i, m in enumerate(o)} for f, o in orders.items()}
    methods = orders[fills[0]]
    out = []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            signs = {pos[f][a] < pos[f][b] for f in fills if a in pos[f] and b in pos[f]}
            if len(signs) > 1:
                out.append((a, b))
    return out


def format_summary(results: dict, fills: Sequence[str] = ("zero", "neutral"), ordering: str = "score") -> str:
    """The README table: one row per variant and model, ΔA (``ordering``, default LeRF - MoRF)
    with its interval per fill and subset (tuning, held-out)."""
    short = {"SmolLM2-135M-Instruct": "SmolLM2", "all-MiniLM-L6-v2": "MiniLM"}
    cells = {name: {(r["method"], r["fill"], r["subset"]): r for r in rows if r["ordering"] == ordering}
             for name, rows in results.items()}
    methods = list(dict.fromkeys(r["method"] for rows in results.values() for r in rows))
    cols = [(f, sub) for f in fills for sub in ("tuning", "held_out")]
    out = ["| variant | model | " + " | ".join(f"{f}: {sub.replace('_', '-')}" for f, sub in cols) + " |",
           "|" + "---|" * (2 + len(cols))]
    for m in methods:
        for name in results:
            if all((m, f, sub) in cells[name] for f, sub in cols):
                out.append(f"| {m} | {short.get(name, name)} | "
                           + " | ".join(_ci(cells[name][(m, f, sub)]) for f, sub in cols) + " |")
    return "\n".join(out)


def format_markdown(results: dict, scores: dict, decision: dict, fills: Sequence[str] = ("zero", "neutral"),
                    units: Optional[dict] = None) -> str:
    """README tables: the summary (:func:`format_summary`); per model, every variant's ΔA
    (with its interval) on the tuning and the held-out prompts, per fill and ordering; the
    mean scores; the verdict.  ``units``: per model, what its curves hold."""
    units = units or {}
    out = ["**ΔA (LeRF - MoRF) vs " + decision["reference"] + ", 95% bootstrap interval over prompts** "
           "(tuning: odd lines, held-out: even lines of the prompts file; "
           + "; ".join(f"{name}: {units[name]}" for name in results if name in units) + ")\n",
           format_summary(results, fills)]
    for name, rows in results.items():
        methods = list(dict.fromkeys(r["method"] for r in rows))
        ref = rows[0]["reference"]
        n_t = next(r["n"] for r in rows if r["subset"] == "tuning")
        n_h = next(r["n"] for r in rows if r["subset"] == "held_out")
        for ordering, label in (("score", "LeRF - MoRF"), ("morf", "MoRF (area below the reference's)"),
                                ("lerf", "LeRF (area above the reference's)")):
            out.append(f"\n**{name}: ΔA {label} vs {ref}** (tuning: odd lines, n = {n_t}; "
                       f"held-out: even lines, n = {n_h}; 95% bootstrap interval)\n")
            head = "| variant | " + " | ".join(f"{f}: tuning | {f}: held-out" for f in fills) + " |"
            out += [head, "|" + "---|" * (1 + 2 * len(fills))]
            for m in methods:
                cell = {(r["fill"], r["subset"]): r for r in rows if r["method"] == m and r["ordering"] == ordering}
                out.append(f"| {m} | " + " | ".join(f"{_ci(cell[(f, 'tuning')])} | {_ci(cell[(f, 'held_out')])}"
                                                   for f in fills) + " |")
        srows = scores[name]
        orders = ranking_by_fill(srows, fills)
        flips = [f"{a} / {b}" for a, b in ranking_flips(orders)]
        out.append(f"\n**{name}: ranking by mean score** " + "; ".join(
            f"{f}: {' > '.join(o)}" for f, o in orders.items())
            + f"; pairs whose order flips with the occlusion: {', '.join(flips) or 'none'}")
        out.append(f"\n**{name}: mean score (LeRF - MoRF, all prompts, ± standard error)**\n")
        out += ["| method | " + " | ".join(fills) + " |", "|" + "---|" * (1 + len(fills))]
        cell = {(r["method"], r["fill"]): r for r in srows}
        for m in dict.fromkeys(r["method"] for r in srows):
            out.append(f"| {m} | " + " | ".join(f"{cell[(m, f)]['score_mean']:.4f} ± {cell[(m, f)]['score_sem']:.4f}"
                                               for f in fills if (m, f) in cell) + " |")
    d = decision
    wins = ", ".join(m for m, w in d["held_out_wins_everywhere"].items() if w) or "none"
    cand = f"`{d['candidate']}`" if d["candidate"] else f"none (no variant above {d['reference']} in every tuning cell)"
    out.append(f"\n**Verdict** ({d['rule']}): candidate from the tuning half: {cand}; "
               f"variants above {d['reference']} on held-out prompts of every model and fill: {wins}; "
               f"default: **`{d['default']}`**.")
    out.append("\n(**>**: interval above 0, the variant beats the reference; <: below 0, it loses.)")
    return "\n".join(out)


def _progress(iterable, total, desc, enabled=True):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


@contextlib.contextmanager
def _eager_attention(model):
    """The model with eager attention (attention weights available) inside the block."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "eager" or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(impl)


def rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout ``(B, T, T)`` from per-layer attentions ``(B, heads, T, T)``."""
    out = None
    for a in attentions:
        a = a.float().mean(1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)
        out = a if out is None else a @ out
    return out


def _frozen(model):
    """Parameters frozen inside the block (gradients only for the input)."""
    from lxt.explain import frozen_parameters

    return frozen_parameters(model)


# ---------------------------------------------------------------------------- LRP variants
def decoder_layers(model) -> tuple[str, int]:
    """``(qualified name, length)`` of the model's stack of transformer layers: the
    ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks (``model.layers`` of a Llama,
    ``encoder.layer`` of a BERT)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, n
    raise ValueError(f"{type(model).__name__}: no ModuleList of config.num_hidden_layers ({n}) layers")


def cp_layer_count(model, fraction: float) -> int:
    """How many of the last layers a mix with ``fraction`` (of :data:`MIXES`) gives CP-LRP."""
    return int(round(decoder_layers(model)[1] * fraction))


def mixed_composite(model, n_cp: int):
    """AttnLRP with CP-LRP (value-only attention, gated MLPs' gate detached) in the last
    ``n_cp`` layers: the model's AttnLRP table, with its CP-LRP table as the override of each of
    those layers (:class:`lxt.Composite` ``overrides``; both tables as shipped).  ``n_cp = 0``
    is AttnLRP, ``n_cp`` = all layers is CP-LRP inside the layers (outside them the two tables
    are the same)."""
    prefix, n_layers = decoder_layers(model)
    if not 0 <= n_cp <= n_layers:
        raise ValueError(f"n_cp must be in 0..{n_layers}, got {n_cp}")
    family = lxt.composites.family_of(model)[0]
    cp = lxt.composites.layer_map(family, "cp_lrp", model=model)
    overrides = {f"{prefix}.{i}": cp for i in range(n_layers - n_cp, n_layers)}
    return lxt.composites.attnlrp(model, overrides=overrides or None)


def positional_supported(encoder: bool = False) -> bool:
    """Whether the positional variants can run: ``lxt.explain`` takes ``positional=``
    (language models), or, for a sentence encoder (explained here with the composite and
    the positional sources directly), ``lxt.positional.PositionalSources`` exists."""
    import importlib
    import inspect

    if encoder:
        try:
            return hasattr(importlib.import_module("lxt.positional"), "PositionalSources")
        except ImportError:
            return False
    return "positional" in inspect.signature(lxt.explain).parameters


def runnable(methods: Sequence[str], encoder: bool = False, log=print) -> list:
    """``methods`` without the positional variants where lxt does not offer them yet (a note
    says so)."""
    methods = list(methods)
    missing = [m for m in methods if m in POSITIONAL]
    if missing and not positional_supported(encoder):
        what = "has no lxt.positional.PositionalSources" if encoder else "lxt.explain takes no positional="
        log(f"note: this lxt {what}; skipping {', '.join(missing)}")
        methods = [m for m in methods if m not in POSITIONAL]
    return methods


def neutral_token(tokenizer) -> tuple[str, int]:
    """``(token, id)`` of the neutral fill: the tokenizer's mask token where it has one (BERT:
    ``[MASK]``), else a single space (:data:`NEUTRAL_TEXT`; SmolLM2: ``Ġ``, id 216)."""
    mask = getattr(tokenizer, "mask_token", None)
    text = mask if mask else NEUTRAL_TEXT
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the neutral token {text!r} is {len(ids)} tokens; pass neutral= (one token)")
    return text, int(ids[0])


def _fills(tokenizer, emb_layer, fills, neutral=None):
    """``(neutral token, its id, fill vectors)``: the neutral token given, or the tokenizer's
    (:func:`neutral_token`) when the ``neutral`` fill is asked for."""
    if neutral is None:
        neutral, neutral_id = neutral_token(tokenizer) if "neutral" in fills else (None, None)
    else:
        neutral_id = tokenizer.convert_tokens_to_ids(neutral)
    return neutral, neutral_id, fill_vectors(emb_layer.weight, fills, neutral_id)


def fill_vectors(table: torch.Tensor, fills: Sequence[str], neutral_id: Optional[int] = None) -> dict:
    """Per fill, the replacement of a token's input embedding: ``zero``, ``neutral`` (row
    ``neutral_id`` of the embedding matrix ``table``), ``mean`` (its mean over the vocabulary)."""
    table = table.detach()
    out = {}
    for f in fills:
        if f == "zero":
            out[f] = torch.zeros(table.shape[1], dtype=table.dtype)
        elif f == "neutral":
            if neutral_id is None:
                raise ValueError("the neutral fill needs a token id")
            out[f] = table[neutral_id].clone()
        elif f == "mean":
            out[f] = table.float().mean(0).to(table.dtype)
        else:
            raise ValueError(f"unknown fill {f!r}; choose from {', '.join(FILLS)}")
    return out


# ---------------------------------------------------------------------------- text
def _logits_last(model, emb, mask=None):
    kwargs = {"inputs_embeds": emb}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if getattr(model.config, "use_cache", None) is not None:
        kwargs["use_cache"] = False
    try:
        return model(**kwargs, logits_to_keep=1).logits[:, -1]
    except TypeError:  # a model without logits_to_keep
        return model(**kwargs).logits[:, -1]


def _text_ig(model, tokenizer, prompt: str, target: int, steps: int, chunk: int = 25) -> torch.Tensor:
    """Integrated gradients of the ``target`` logit at the last position, per token:
    ``sum_d x * mean_k grad(x * (k + 0.5) / steps)`` (as ``lxt.explain``), steps batched."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model.get_input_embeddings()(ids)
    grads = torch.zeros_like(base[0], dtype=torch.float32)
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    with _frozen(model):
        for a in alphas.split(chunk):
            x = (base * a[:, None, None].to(base.dtype)).detach().requires_grad_()
            _logits_last(model, x)[:, target].sum().backward()
            grads += x.grad.float().sum(0)
    return (base[0].float() * grads / steps).sum(-1)


def text_relevance(model, tokenizer, prompts: Sequence[str], targets: Sequence[int],
                   methods: Sequence[str], steps: int = 50, batch_size: int = 8,
                   progress: bool = True) -> tuple[dict, dict]:
    """Per method, the per-token relevance (list of ``(T_i,)`` tensors, one per prompt) of
    ``targets``; and the seconds each method took.  ``random`` gets no relevance here."""
    rel, seconds = {}, {}
    for method in methods:
        t0 = time.perf_counter()
        if method == "integrated_gradients":
            # lxt.explain's formula (midpoint rule, zero baseline), but with all steps of one
            # prompt in one batch and logits only at the last position: ~3x faster here
            rel[method] = [_text_ig(model, tokenizer, p, t, steps)
                           for p, t in _progress(zip(prompts, targets), len(prompts), "integrated gradients", progress)]
        elif method in LXT_METHODS or method in MIXES or method in POSITIONAL:
            kwargs = {"method": method}
            if method in MIXES:
                kwargs = {"method": "attnlrp", "composite": mixed_composite(model, cp_layer_count(model, MIXES[method]))}
            elif method in POSITIONAL:
                kwargs = {"method": POSITIONAL[method], "positional": True}
            exps = lxt.explain(model, tokenizer, list(prompts), target=list(targets), steps=steps,
                               batch_size=batch_size, progress=progress, **kwargs)
            rel[method] = [e.relevance.float() for e in exps]
        elif method == "attention_rollout":
            rel[method] = []
            emb_layer = model.get_input_embeddings()
            with torch.no_grad(), _eager_attention(model):
                for p in prompts:
                    ids = tokenizer(p, return_tensors="pt")["input_ids"]
                    kwargs = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
                    out = model(inputs_embeds=emb_layer(ids), output_attentions=True, **kwargs)
                    rel[method].append(rollout(out.attentions)[0, -1])
        elif method != "random":
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
        seconds[method] = time.perf_counter() - t0
    return rel, seconds


def _token_curves(ids, rel_i: dict, methods, gen, units, logprob, fill_vec, variant_batch) -> tuple:
    """Orders (first and last position never ranked nor replaced) and curves of one text."""
    n = len(ids)
    candidates = torch.arange(1, n - 1)
    orders = {}
    for m in methods:
        r = torch.rand(n, generator=gen) if m == "random" else rel_i[m]
        if len(r) != n:
            raise RuntimeError(f"{m}: {len(r)} relevances for {n} tokens")
        orders[m] = rank(r, candidates, gen)
    return orders, perturbation_curves(logprob, units, orders, fill_vec, variant_batch)


def evaluate_text(model, tokenizer, prompts: Sequence[str], methods: Sequence[str] = METHODS,
                  fills: Sequence[str] = FILLS, steps: int = 50, batch_size: int = 8,
                  variant_batch: int = 256, seed: int = 0, progress: bool = True,
                  seeds: Optional[Sequence[int]] = None, neutral: Optional[str] = None,
                  indices: Optional[Sequence[int]] = None) -> dict:
    """The perturbation benchmark of a causal LM on ``prompts`` (BOS already in the text if
    the model needs one).  Returns ``{"rows": table rows, "per_input": [...], "seconds": {...},
    "skipped": [...], "neutral": token}``.
    The random orderings come from one generator seeded with ``seed``, or, with ``seeds``
    (one per prompt), from one generator per prompt (independent of the other prompts).
    ``neutral``: the token of the neutral fill (default :func:`neutral_token`); ``indices``
    (e.g. line numbers) are stored as each record's ``index`` (the held-out split reads them).
    Positional variants that lxt does not offer are skipped (``skipped``, with a note).

    Position 0 (BOS) and the last (query) position are never ranked nor replaced; prompts
    must be at least 3 tokens long."""
    model.eval()
    prompts = list(prompts)
    asked = list(methods)
    methods = runnable(asked, log=lambda m: print(m, file=sys.stderr))
    emb_layer = model.get_input_embeddings()
    t0 = time.perf_counter()
    ids_list, targets, base_lp = [], [], []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 3:
                raise ValueError(f"prompt {p!r} is {ids.shape[1]} tokens; need >= 3 (BOS, one token, query)")
            lp = _logits_last(model, emb_layer(ids)).float().log_softmax(-1)[0]
            ids_list.append(ids[0])
            targets.append(int(lp.argmax()))
            base_lp.append(float(lp.max()))
    seconds = {"predict": time.perf_counter() - t0}
    rel, rel_s = text_relevance(model, tokenizer, prompts, targets, methods, steps, batch_size, progress)
    seconds.update({f"relevance_{k}": v for k, v in rel_s.items()})
    neutral, neutral_id, fill_vec = _fills(tokenizer, emb_layer, fills, neutral)
    gen = torch.Generator().manual_seed(seed)
    per_input = []
    t0 = time.perf_counter()
    for i in _progress(range(len(prompts)), len(prompts), "faithfulness llm (prompts)", progress):
        ids, tid = ids_list[i], targets[i]
        if seeds is not None:
            gen = torch.Generator().manual_seed(int(seeds[i]))
        with torch.no_grad():
            units = emb_layer(ids[None])[0]

        def logprob(x, tid=tid):
            return _logits_last(model, x).float().log_softmax(-1)[:, tid]

        orders, curves = _token_curves(ids, {m: r[i] for m, r in rel.items()}, methods, gen, units,
                                       logprob, fill_vec, variant_batch)
        per_input.append({
            **({} if indices is None else {"index": int(indices[i])}),
            "prompt": prompts[i], "tokens": [tokenizer.decode([int(t)]) for t in ids],
            "target": tokenizer.decode([tid]), "target_id": tid, "logprob": base_lp[i],
            "relevance": {m: rel[m][i].tolist() for m in methods if m in rel},
            "order": {m: o.tolist() for m, o in orders.items()}, "curves": curves})
    seconds["perturbation"] = time.perf_counter() - t0
    return {"rows": summarize(per_input, methods, fills), "per_input": per_input, "seconds": seconds,
            "skipped": [m for m in asked if m not in methods],
            "neutral": None if neutral_id is None else {"token": neutral, "id": int(neutral_id)}}


# ---------------------------------------------------------------------------- sentence encoder
def _embedding_similarity(model, x: torch.Tensor, reference: torch.Tensor, lrp: bool = False) -> torch.Tensor:
    """``(B,)`` cosine similarity of the sentence embeddings of the inputs ``x`` ``(B, T, F)``
    (mean of ``last_hidden_state`` over tokens, L2-normalised: the sentence-transformers
    pooling of all-MiniLM-L6-v2) to ``reference`` ``(H,)``, a unit vector.  ``lrp``: the
    pooling and the dot product with their LRP rules (epsilon on the mean and on the dot
    product with the constant ``reference``, identity on the normalisation)."""
    from lxt import functional as lf

    h = model(inputs_embeds=x).last_hidden_state
    if not lrp:
        return torch.nn.functional.normalize(h.float().mean(1), dim=-1) @ reference.float()
    e = lf.normalize(lf.mean(h, dim=1), dim=-1)
    return lf.linear_epsilon(e, reference[None].to(e.dtype))[:, 0]


@contextlib.contextmanager
def _encoder_patched(model, method: str):
    """The sentence encoder registered with ``method``'s composite (a positional variant: its
    base method's, with the positional encodings as relevance sources, as ``lxt.explain``
    does); ``input_x_gradient``: parameters frozen."""
    if method == "input_x_gradient":
        with _frozen(model):
            yield
        return
    if method in MIXES:
        comp = mixed_composite(model, cp_layer_count(model, MIXES[method]))
    else:
        base = POSITIONAL.get(method, method)
        comp = lxt.composites.attnlrp(model) if base == "attnlrp" else lxt.composites.cp_lrp(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(comp.context(model))
        if method in POSITIONAL:
            from lxt.positional import PositionalSources

            stack.enter_context(PositionalSources(model).attached(batch_size=1, method=POSITIONAL[method]))
        yield


def encoder_relevance(model, tokenizer, sentences: Sequence[str], references: Sequence[torch.Tensor],
                      methods: Sequence[str], progress: bool = True) -> tuple[dict, dict]:
    """Per method, the per-token relevance of each sentence's embedding similarity to its
    ``reference`` (:func:`_embedding_similarity`; the LRP variants with their composite,
    ``backward(f)`` so the relevance sums to the similarity up to the biases' share;
    ``input_x_gradient`` on the unpatched model), and the seconds each method took."""
    emb_layer = model.get_input_embeddings()
    rel, seconds = {}, {}
    for method in methods:
        if method == "random":
            continue
        t0 = time.perf_counter()
        if method not in VARIANTS and method != "input_x_gradient":
            raise ValueError(f"sentence encoder: unknown method {method!r}; choose from "
                             f"{', '.join(VARIANTS + ('input_x_gradient', 'random'))}")
        lrp = method != "input_x_gradient"
        out = []
        with _encoder_patched(model, method):
            for s, ref in _progress(zip(sentences, references), len(sentences), method, progress):
                ids = tokenizer(s, return_tensors="pt")["input_ids"]
                x0 = emb_layer(ids).detach()
                x = x0.clone().requires_grad_()
                f = _embedding_similarity(model, x, ref, lrp=lrp)
                if lrp:
                    f.backward(f.detach())
                    out.append(x.grad[0].float().sum(-1))
                else:
                    f.sum().backward()
                    out.append((x.grad[0].float() * x0[0].float()).sum(-1))
        rel[method] = out
        seconds[method] = time.perf_counter() - t0
    return rel, seconds


def evaluate_encoder(model, tokenizer, sentences: Sequence[str], methods: Sequence[str] = VARIANTS + ("random",),
                     fills: Sequence[str] = FILLS, variant_batch: int = 256, seed: int = 0,
                     progress: bool = True, neutral: Optional[str] = None,
                     indices: Optional[Sequence[int]] = None) -> dict:
    """The perturbation benchmark of a sentence encoder (a ``BertModel``, no head).

    The explained value of a sentence is the cosine similarity of its embedding to the
    embedding of the unperturbed sentence (1 at step 0; :func:`_embedding_similarity`): how
    much of "what this sentence means to the encoder" survives the occlusion.  The curves
    hold that similarity (not a log-probability).  The first and the last token (``[CLS]``,
    ``[SEP]``) are never ranked nor replaced; the neutral fill is ``[MASK]``'s word embedding
    (position and token-type embeddings are added by the model, as for every fill).  Returns
    what :func:`evaluate_text` returns (``target`` is ``"similarity"``)."""
    model.eval()
    sentences = list(sentences)
    asked = list(methods)
    methods = runnable(asked, encoder=True, log=lambda m: print(m, file=sys.stderr))
    emb_layer = model.get_input_embeddings()
    t0 = time.perf_counter()
    ids_list, refs = [], []
    with torch.no_grad():
        for s in sentences:
            ids = tokenizer(s, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 3:
                raise ValueError(f"sentence {s!r} is {ids.shape[1]} tokens; need >= 3")
            h = model(inputs_embeds=emb_layer(ids)).last_hidden_state
            ids_list.append(ids[0])
            refs.append(torch.nn.functional.normalize(h.mean(1), dim=-1)[0])
    seconds = {"embed": time.perf_counter() - t0}
    rel, rel_s = encoder_relevance(model, tokenizer, sentences, refs, methods, progress)
    seconds.update({f"relevance_{k}": v for k, v in rel_s.items()})
    neutral, neutral_id, fill_vec = _fills(tokenizer, emb_layer, fills, neutral)
    gen = torch.Generator().manual_seed(seed)
    per_input = []
    t0 = time.perf_counter()
    for i in _progress(range(len(sentences)), len(sentences), "faithfulness encoder (sentences)", progress):
        ids, ref = ids_list[i], refs[i]
        with torch.no_grad():
            units = emb_layer(ids[None])[0]

        def similarity(x, ref=ref):
            return _embedding_similarity(model, x, ref)

        orders, curves = _token_curves(ids, {m: r[i] for m, r in rel.items()}, methods, gen, units,
                                       similarity, fill_vec, variant_batch)
        per_input.append({
            **({} if indices is None else {"index": int(indices[i])}),
            "prompt": sentences[i], "tokens": tokenizer.convert_ids_to_tokens(ids.tolist()),
            "target": "similarity", "similarity": float(curves[fills[0]][methods[0]]["morf"][0]),
            "relevance": {m: rel[m][i].tolist() for m in methods if m in rel},
            "order": {m: o.tolist() for m, o in orders.items()}, "curves": curves})
    seconds["perturbation"] = time.perf_counter() - t0
    return {"rows": summarize(per_input, methods, fills), "per_input": per_input, "seconds": seconds,
            "skipped": [m for m in asked if m not in methods],
            "neutral": None if neutral_id is None else {"token": neutral, "id": int(neutral_id)}}


# ---------------------------------------------------------------------------- images
def image_relevance(model, pixel_values: torch.Tensor, targets: torch.Tensor, methods: Sequence[str],
                    steps: int = 50, batch_size: int = 512) -> tuple[dict, dict]:
    """Per method, the per-pixel relevance ``(N, H, W)`` of ``targets`` for the images
    ``pixel_values`` ``(N, C, H, W)``, batched (each LRP composite registered once); the same
    formulas as ``lxt.explain`` for one image.  ``random`` gets no relevance here."""
    rel, seconds = {}, {}
    n = len(pixel_values)
    for method in methods:
        t0 = time.perf_counter()
        chunks = []
        if method in ("attnlrp", "cp-lrp"):
            comp = (lxt.composites.attnlrp(model) if method == "attnlrp" else lxt.composites.cp_lrp(model))
            ctx = comp.context(model)
        elif method == "attention_rollout":
            ctx = _eager_attention(model)
        else:
            ctx = _frozen(model)
        with ctx:
            for s in range(0, n, batch_size):
                x0, t = pixel_values[s:s + batch_size], targets[s:s + batch_size]
                if method in ("attnlrp", "cp-lrp"):
                    x = x0.clone().requires_grad_()
                    v = model(pixel_values=x).logits.gather(1, t[:, None])[:, 0]
                    v.backward(v.detach())
                    chunks.append(x.grad.float().sum(1))
                elif method in ("input_x_gradient", "gradient"):
                    x = x0.clone().requires_grad_()
                    model(pixel_values=x).logits.gather(1, t[:, None]).sum().backward()
                    g = x.grad.float()
                    chunks.append(g.norm(dim=1) if method == "gradient" else (g * x0.float()).sum(1))
                elif method == "integrated_gradients":
                    grads = torch.zeros_like(x0, dtype=torch.float32)
                    for a in (torch.arange(steps, dtype=torch.float32) + 0.5) / steps:
                        x = (x0 * a).detach().requires_grad_()
                        model(pixel_values=x).logits.gather(1, t[:, None]).sum().backward()
                        grads += x.grad.float()
                    chunks.append((x0.float() * grads / steps).sum(1))
                elif method == "attention_rollout":
                    with torch.no_grad():
                        out = model(pixel_values=x0, output_attentions=True)
                    r = rollout(out.attentions)[:, 0, 1:]  # CLS row, patch columns
                    side = int(round(math.sqrt(r.shape[1])))
                    up = x0.shape[-1] // side
                    chunks.append(r.reshape(-1, side, side).repeat_interleave(up, 1).repeat_interleave(up, 2))
                elif method != "random":
                    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if chunks:
            rel[method] = torch.cat(chunks).detach()
        seconds[method] = time.perf_counter() - t0
    return rel, seconds


def evaluate_images(model, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
                    methods: Sequence[str] = METHODS, fills: Sequence[str] = IMAGE_FILLS, steps: int = 50,
                    variant_batch: int = 2048, seed: int = 0, progress: bool = True) -> dict:
    """Pixel flipping of an image classifier on ``pixel_values`` ``(N, C, H, W)``; the target
    is the predicted class (``labels``, if given, only give the accuracy).  Returns
    ``{"rows", "per_input", "mean_curves", "seconds", "accuracy"}``."""
    model.eval()
    pixel_values = pixel_values.float()
    N, C, H, W = pixel_values.shape
    t0 = time.perf_counter()
    with torch.no_grad():
        lp = model(pixel_values=pixel_values).logits.float().log_softmax(-1)
    targets = lp.argmax(-1)
    seconds = {"predict": time.perf_counter() - t0}
    rel, rel_s = image_relevance(model, pixel_values, targets, methods, steps)
    seconds.update({f"relevance_{k}": v for k, v in rel_s.items()})
    fill_vec = {"zero": torch.zeros(C), "mean": pixel_values.mean((0, 2, 3))}
    fill_vec = {f: fill_vec[f] for f in fills}
    gen = torch.Generator().manual_seed(seed)
    per_input = []
    t0 = time.perf_counter()
    for i in _progress(range(N), N, "faithfulness vit (images)", progress):
        tid = int(targets[i])
        candidates = torch.arange(H * W)
        orders = {m: rank(torch.rand(H * W, generator=gen) if m == "random" else rel[m][i].reshape(-1),
                          candidates, gen) for m in methods}
        units = pixel_values[i].permute(1, 2, 0).reshape(H * W, C)

        def logprob(x, tid=tid):
            img = x.reshape(-1, H, W, C).permute(0, 3, 1, 2)
            return model(pixel_values=img).logits.float().log_softmax(-1)[:, tid]

        curves = perturbation_curves(logprob, units, orders, fill_vec, variant_batch)
        per_input.append({"index": i, "target": tid, "logprob": float(lp[i, tid]),
                          "label": None if labels is None else int(labels[i]), "curves": curves})
    seconds["perturbation"] = time.perf_counter() - t0
    mean_curves = {f: {m: {o: torch.tensor([r["curves"][f][m][o] for r in per_input]).mean(0).tolist()
                           for o in ("morf", "lerf")} for m in methods} for f in fills}
    acc = None if labels is None else float((targets == labels).float().mean())
    return {"rows": summarize(per_input, methods, fills), "per_input": per_input,
            "mean_curves": mean_curves, "seconds": seconds, "accuracy": acc}


# ---------------------------------------------------------------------------- CLI
def _environment() -> dict:
    import transformers

    try:
        import psutil

        cpus = psutil.cpu_count()
    except ImportError:  # pragma: no cover
        cpus = os.cpu_count()
    return {"machine": platform.machine(), "processor": platform.processor(), "platform": platform.platform(),
            "python": platform.python_version(), "cpus": cpus, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "lxt": getattr(lxt, "__version__", None),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def numbered_prompts(path=PROMPTS_FILE, n: Optional[int] = None) -> list:
    """``(line number, prompt)`` of the first ``n`` prompts of a file (blank lines and
    ``#`` comments are not prompts)."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    prompts = [(i, ln.strip()) for i, ln in enumerate(lines, 1)]
    prompts = [(i, p) for i, p in prompts if p and not p.startswith("#")]
    return prompts[:n] if n else prompts


def load_prompts(path=PROMPTS_FILE, n: Optional[int] = None) -> list:
    return [p for _, p in numbered_prompts(path, n)]


def text_corpus(model, tokenizer, items: Sequence[tuple], path: Optional[str], options: dict,
                methods: Sequence[str] = METHODS, fills: Sequence[str] = FILLS, steps: int = 50,
                batch_size: int = 8, chunk: int = 16, seed: int = 0,
                progress: bool = True) -> Optional[list]:
    """The text benchmark as a corpus job (:func:`lxt.corpus.run`): one record per
    ``(index, prompt)`` item (the ``per_input`` entry of :func:`evaluate_text`, or an
    ``error`` for a prompt under 3 tokens), ``chunk`` prompts per write, sharded over the
    ranks and resumable from ``path``.  Prompt ``index`` draws its random orderings from a
    generator seeded with ``seed * 1000003 + index``.  Returns the records
    (:class:`lxt.corpus.Records`) on rank 0, ``None`` on the other ranks."""
    from lxt import corpus

    def compute(batch):
        out = [None] * len(batch)
        for j, (_, p) in enumerate(batch):
            n = len(tokenizer(p)["input_ids"])
            if n < 3:
                out[j] = {"prompt": p, "error": f"{n} tokens; need >= 3 (BOS, one token, query)"}
        ok = [j for j, r in enumerate(out) if r is None]
        if ok:
            res = evaluate_text(model, tokenizer, [batch[j][1] for j in ok], methods, fills, steps,
                                batch_size=batch_size, progress=False,
                                seeds=[seed * 1000003 + batch[j][0] for j in ok])
            for j, rec in zip(ok, res["per_input"]):
                out[j] = rec
        return out

    return corpus.run(items, compute, path, options, batch_size=chunk, progress=progress,
                      desc="faithfulness llm", log=lambda m: print(m, file=sys.stderr))


def _fill_settings(fills, neutral) -> dict:
    text = {"zero": "zero vector", "mean": "mean of the input-embedding matrix",
            "neutral": None if neutral is None else f"input embedding of the token {neutral['token']!r} (id {neutral['id']})"}
    return {f: text[f] for f in fills}


def _comparison(res: dict, args) -> None:
    """Add the paired ΔA rows (vs ``args.reference``) and the split to a text result."""
    methods = [m for m in res["settings"]["methods"] if m in res["per_input"][0]["curves"][args.fills[0]]]
    if args.reference not in methods:
        return
    res["delta"] = delta_rows(res["per_input"], methods, args.fills, args.reference, args.resamples, args.seed)
    res["split"] = {**split_prompts([r["index"] for r in res["per_input"]]),
                    "rule": "line numbers of the prompts file: odd lines tune, even lines are held out"}


def run_llm(args) -> Optional[dict]:
    from lxt_data import load_smollm2

    model, tokenizer = load_smollm2()
    numbered = numbered_prompts(args.prompts_file, args.prompts)
    prompts = [p for _, p in numbered]
    bos = "" if args.no_bos else SMOLLM2_BOS
    methods = runnable(args.methods, log=lambda m: print(m, file=sys.stderr))
    if args.jsonl:
        options = {"model": "SmolLM2-135M-Instruct", "methods": methods,
                   "fills": list(args.fills), "steps": args.steps, "seed": args.seed}
        records = text_corpus(model, tokenizer, [(i, bos + p) for i, p in numbered], args.jsonl,
                              options, methods, args.fills, args.steps, args.batch_size,
                              args.chunk, args.seed, progress=not args.quiet)
        if records is None:  # not rank 0
            return None
        per_input = [r for r in records if not r.get("error")]
        res = {"rows": summarize(per_input, methods, args.fills), "per_input": per_input,
               "seconds": {}, "errors": [r for r in records if r.get("error")],
               "neutral": dict(zip(("token", "id"), neutral_token(tokenizer))) if "neutral" in args.fills else None}
    else:
        res = evaluate_text(model, tokenizer, [bos + p for p in prompts], methods, args.fills, args.steps,
                            batch_size=args.batch_size, seed=args.seed, progress=not args.quiet,
                            indices=[i for i, _ in numbered])
    res["skipped"] = [m for m in args.methods if m not in methods]
    lengths = [len(r["tokens"]) for r in res["per_input"]]
    res["settings"] = {"model": "SmolLM2-135M-Instruct (lxt_data.load_smollm2, float32, sdpa)",
                       "prompts_file": str(args.prompts_file), "n_prompts": len(res["per_input"]), "bos": bos,
                       "tokens_min": min(lengths), "tokens_max": max(lengths),
                       "tokens_mean": sum(lengths) / len(lengths), "methods": methods,
                       "fills": _fill_settings(args.fills, res.get("neutral")),
                       "mixes": {m: f"CP-LRP in the last {cp_layer_count(model, f)} of "
                                    f"{decoder_layers(model)[1]} layers" for m, f in MIXES.items() if m in methods},
                       "ig_steps": args.steps, "seed": args.seed, "explain_batch_size": args.batch_size,
                       "random_orderings": ("one generator per prompt, seeded with seed * 1000003 + line"
                                            if args.jsonl else "one generator for the run"),
                       "excluded_positions": "first (BOS) and last (query)",
                       "explained": "log-probability of the model's top next token"}
    _comparison(res, args)
    return res


def run_bert(args) -> dict:
    from lxt_data import load_minilm

    model, tokenizer = load_minilm()
    numbered = numbered_prompts(args.prompts_file, args.prompts)
    methods = runnable(args.methods, encoder=True, log=lambda m: print(m, file=sys.stderr))
    unsupported = [m for m in methods if m not in VARIANTS + ("input_x_gradient", "random")]
    if unsupported:
        print(f"note: the sentence encoder runs the LRP variants, input_x_gradient and random; "
              f"skipping {', '.join(unsupported)}", file=sys.stderr)
        methods = [m for m in methods if m not in unsupported]
    res = evaluate_encoder(model, tokenizer, [p for _, p in numbered], methods, args.fills, seed=args.seed,
                           progress=not args.quiet, indices=[i for i, _ in numbered])
    res["skipped"] = [m for m in args.methods if m not in methods]
    lengths = [len(r["tokens"]) for r in res["per_input"]]
    res["settings"] = {"model": "all-MiniLM-L6-v2 (lxt_data.load_minilm, BertModel, float32, sdpa)",
                       "prompts_file": str(args.prompts_file), "n_prompts": len(res["per_input"]),
                       "tokens_min": min(lengths), "tokens_max": max(lengths),
                       "tokens_mean": sum(lengths) / len(lengths), "methods": methods,
                       "fills": _fill_settings(args.fills, res.get("neutral")),
                       "mixes": {m: f"CP-LRP in the last {cp_layer_count(model, f)} of "
                                    f"{decoder_layers(model)[1]} layers" for m, f in MIXES.items() if m in methods},
                       "seed": args.seed, "excluded_positions": "first ([CLS]) and last ([SEP])",
                       "explained": "cosine similarity of the sentence embedding (mean pooling, L2-normalised) "
                                    "to the unperturbed sentence's embedding"}
    _comparison(res, args)
    return res


def run_vit(args) -> dict:
    from lxt_data import train_digits_vit

    model, data = train_digits_vit()
    pv, labels = data.test_pixel_values, data.test_labels
    if args.images:
        pv, labels = pv[:args.images], labels[:args.images]
    res = evaluate_images(model, pv, labels, [m for m in args.methods if m in METHODS], IMAGE_FILLS,
                          args.steps, seed=args.seed,
                          progress=not args.quiet)
    res["settings"] = {"model": "ViT on scikit-learn digits (lxt_data.train_digits_vit(), defaults)",
                       "images": f"first {len(pv)} of the test split", "n_images": len(pv),
                       "test_accuracy_full_split": data.test_accuracy,
                       "methods": [m for m in args.methods if m in METHODS],
                       "fills": {"zero": "0", "mean": "mean pixel value of the evaluated images"},
                       "ig_steps": args.steps, "seed": args.seed}
    return res


def compact(per_input: list) -> list:
    """Per-input curves reduced to their score and mean MoRF / LeRF (the image JSON keeps the
    mean curves over images instead; 360 images x 7 methods x 4 curves x 65 steps is 19 MB)."""
    return [{**{k: v for k, v in r.items() if k != "curves"},
             "curves": {f: {m: {"score": c["score"], "morf_mean": sum(c["morf"]) / len(c["morf"]),
                                "lerf_mean": sum(c["lerf"]) / len(c["lerf"])} for m, c in fc.items()}
                        for f, fc in r["curves"].items()}} for r in per_input]


MODEL_NAMES = {"llm": "SmolLM2-135M-Instruct", "bert": "all-MiniLM-L6-v2", "vit": "digits ViT"}


def _parser():
    p = argparse.ArgumentParser(prog="lxt bench faithfulness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["llm", "bert", "vit", "all"], default="all",
                   help="llm: SmolLM2; bert: the MiniLM sentence encoder; vit: the digits ViT; all: the three")
    p.add_argument("--prompts", type=int, default=None, help="first N prompts (default: all)")
    p.add_argument("--prompts-file", default=str(PROMPTS_FILE))
    p.add_argument("--images", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(ALL_METHODS), metavar="METHOD",
                   help="methods and LRP variants (%s; default: %s)" % (", ".join(ALL_METHODS), " ".join(METHODS)))
    p.add_argument("--fills", nargs="+", default=list(FILLS), choices=list(FILLS),
                   help="text occlusions (the ViT uses zero and mean)")
    p.add_argument("--reference", default="attnlrp", help="the method every other is compared with (ΔA)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples over prompts")
    p.add_argument("--steps", type=int, default=50, help="integrated-gradients steps")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per lxt.explain batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bos", action="store_true", help="do not prepend <|endoftext|> to the prompts")
    p.add_argument("--json", help="write the results here (with --model all: one file per model, "
                   "suffixed _llm / _bert / _vit; with --report: the verdict)")
    p.add_argument("--report", nargs="+", metavar="JSON", help="no run: the ΔA tables and the verdict "
                   "(issue 23) from result files of --model llm / bert")
    p.add_argument("--markdown", help="with --report: write the README tables here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--jsonl", help="language model: one record per prompt, written as it is "
                   "finished; a rerun resumes; runs sharded under torchrun (see lxt.corpus)")
    p.add_argument("--chunk", type=int, default=16, help="with --jsonl: prompts per write "
                   "(default 16)")
    return p


def report(paths: Sequence[str], fills: Sequence[str] = ("zero", "neutral"), markdown: Optional[str] = None,
           json_out: Optional[str] = None) -> dict:
    """The verdict and the README tables from result files (each with ``delta`` rows)."""
    results, scores, units = {}, {}, {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "delta" not in data:
            raise ValueError(f"{path}: no ΔA rows (run with the reference among --methods)")
        name = MODEL_NAMES.get(data.get("model_kind"), data.get("model_kind", path))
        results[name], scores[name] = data["delta"], data["rows"]
        units[name] = ("cosine similarity to the unperturbed embedding" if data.get("model_kind") == "bert"
                       else "log-probability of the top token")
    decision = verdict(results, fills)
    text = format_markdown(results, scores, decision, fills, units)
    print(text)
    if markdown:
        Path(markdown).write_text(text + "\n")
        print(f"wrote {markdown}")
    if json_out:
        Path(json_out).write_text(json.dumps({"verdict": decision, "inputs": list(paths)}, indent=1))
        print(f"wrote {json_out}")
    return decision


def main(argv=None) -> int:
    from lxt import corpus

    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.report:
        try:
            report(args.report, [f for f in args.fills if f != "mean"] or args.fills, args.markdown, args.json)
        except (OSError, ValueError, KeyError) as err:
            print(f"lxt bench faithfulness: error: {err}", file=sys.stderr)
            return 2
        return 0
    refused = None
    if args.jsonl and args.model != "llm":
        refused = "--jsonl shards the language-model benchmark; give --model llm"
    elif corpus.launched_world_size() > 1 and not args.jsonl:
        refused = "several processes share the prompts through --jsonl; give --model llm --jsonl FILE"
    elif args.chunk < 1:
        refused = f"--chunk must be >= 1, got {args.chunk}"
    elif args.resamples < 1:
        refused = f"--resamples must be >= 1, got {args.resamples}"
    if refused:
        print(f"lxt bench faithfulness: error: {refused}", file=sys.stderr)
        return 2
    env = _environment()
    which = ["llm", "bert", "vit"] if args.model == "all" else [args.model]
    runs = {"llm": run_llm, "bert": run_bert, "vit": run_vit}
    with corpus.process_group() as (rank, world):
        env["processes"] = world
        for name in which:
            t0 = time.perf_counter()
            try:
                res = runs[name](args)
            except corpus.JobMismatch as err:
                print(f"lxt bench faithfulness: error: {str(err).removeprefix('lxt: ')}", file=sys.stderr)
                return 2
            if res is None:  # not rank 0: its records are in the merged file
                continue
            total = time.perf_counter() - t0
            res["seconds"]["total"] = total
            title = ("digits ViT, %d images (accuracy %.3f)" % (res["settings"]["n_images"], res["accuracy"])
                     if name == "vit" else "%s, %d prompts" % (MODEL_NAMES[name], res["settings"]["n_prompts"]))
            value = "similarity to the unperturbed embedding" if name == "bert" else "target log-prob"
            print(format_table(res["rows"], f"\nFaithfulness: {title}  ({total:.0f} s)", value), flush=True)
            if res.get("delta"):
                fills = [f for f in args.fills if f != "mean"] or args.fills
                print(format_markdown({MODEL_NAMES[name]: res["delta"]}, {MODEL_NAMES[name]: res["rows"]},
                                      verdict({MODEL_NAMES[name]: res["delta"]}, fills, args.reference), fills))
            if args.json:
                path = Path(args.json)
                if len(which) > 1:
                    path = path.with_name(f"{path.stem}_{name}{path.suffix or '.json'}")
                path.parent.mkdir(parents=True, exist_ok=True)
                if name == "vit":
                    res["per_input"] = compact(res["per_input"])
                out = {"benchmark": "faithfulness", "model_kind": name, "environment": env,
                       "settings": res.pop("settings"), "protocol": __doc__.split("\n\n    .venv")[0],
                       **res}
                path.write_text(json.dumps(out, indent=1))
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
