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
vector, or the mean of the input-embedding matrix (over the vocabulary).  All perturbed
variants of one prompt go through the model in one batch (no grad, logits only at the last
position, duplicates across methods computed once).

Image model (the ViT trained on scikit-learn digits): every pixel is ranked (relevance summed
over channels; ``gradient`` is the L2 norm over channels, as in ``lxt.explain``) and replaced
with 0, or with the mean pixel value of the evaluated images (per channel).

Methods: ``attnlrp``, ``cp-lrp``, ``input_x_gradient``, ``gradient`` (L2 norm per unit),
``integrated_gradients`` (50 midpoint steps, zero baseline) -- the formulas of ``lxt.explain``
(text: ``lxt.explain`` itself, batched over prompts, except integrated gradients, batched over
its steps here; images: batched here, each LRP composite registered once) -- plus ``attention_rollout`` (Abnar & Zuidema 2020: heads averaged, 0.5 A +
0.5 I, rows renormalised, product over layers; row of the query / CLS token) and ``random``.
Ties in a ranking are broken by a seeded random permutation, never by position.

    .venv/bin/python benchmarks/faithfulness.py [--model llm|vit|all] [--prompts N]
        [--images N] [--json out.json] [--methods ...] [--steps 50]

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
METHODS = LXT_METHODS + ("attention_rollout", "random")
FILLS = ("zero", "mean")
SMOLLM2_BOS = "<|endoftext|>"


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


def format_table(rows: list, title: str = "") -> str:
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
    lines.append(f"(n = {rows[0]['n']}; score = mean over steps of LeRF - MoRF target log-prob, higher is better; "
                 "+- standard error over inputs)")
    return "\n".join(lines)


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
        elif method in LXT_METHODS:
            exps = lxt.explain(model, tokenizer, list(prompts), target=list(targets), method=method,
                               steps=steps, batch_size=batch_size, progress=progress)
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
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        seconds[method] = time.perf_counter() - t0
    return rel, seconds


def evaluate_text(model, tokenizer, prompts: Sequence[str], methods: Sequence[str] = METHODS,
                  fills: Sequence[str] = FILLS, steps: int = 50, batch_size: int = 8,
                  variant_batch: int = 256, seed: int = 0, progress: bool = True,
                  seeds: Optional[Sequence[int]] = None) -> dict:
    """The perturbation benchmark of a causal LM on ``prompts`` (BOS already in the text if
    the model needs one).  Returns ``{"rows": table rows, "per_input": [...], "seconds": {...}}``.
    The random orderings come from one generator seeded with ``seed``, or, with ``seeds``
    (one per prompt), from one generator per prompt (independent of the other prompts).

    Position 0 (BOS) and the last (query) position are never ranked nor replaced; prompts
    must be at least 3 tokens long."""
    model.eval()
    prompts = list(prompts)
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
    with torch.no_grad():
        table = emb_layer.weight.detach()
        fill_vec = {"zero": torch.zeros(table.shape[1], dtype=table.dtype),
                    "mean": table.float().mean(0).to(table.dtype)}
    fill_vec = {f: fill_vec[f] for f in fills}
    gen = torch.Generator().manual_seed(seed)
    per_input = []
    t0 = time.perf_counter()
    for i in _progress(range(len(prompts)), len(prompts), "faithfulness llm (prompts)", progress):
        ids, tid = ids_list[i], targets[i]
        if seeds is not None:
            gen = torch.Generator().manual_seed(int(seeds[i]))
        n = len(ids)
        candidates = torch.arange(1, n - 1)
        orders = {}
        for m in methods:
            r = torch.rand(n, generator=gen) if m == "random" else rel[m][i]
            if len(r) != n:
                raise RuntimeError(f"{m}: {len(r)} relevances for {n} tokens of prompt {prompts[i]!r}")
            orders[m] = rank(r, candidates, gen)
        with torch.no_grad():
            units = emb_layer(ids[None])[0]

        def logprob(x, tid=tid):
            return _logits_last(model, x).float().log_softmax(-1)[:, tid]

        curves = perturbation_curves(logprob, units, orders, fill_vec, variant_batch)
        per_input.append({
            "prompt": prompts[i], "tokens": [tokenizer.decode([int(t)]) for t in ids],
            "target": tokenizer.decode([tid]), "target_id": tid, "logprob": base_lp[i],
            "relevance": {m: rel[m][i].tolist() for m in methods if m in rel},
            "order": {m: o.tolist() for m, o in orders.items()}, "curves": curves})
    seconds["perturbation"] = time.perf_counter() - t0
    return {"rows": summarize(per_input, methods, fills), "per_input": per_input, "seconds": seconds}


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
                    methods: Sequence[str] = METHODS, fills: Sequence[str] = FILLS, steps: int = 50,
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


def run_llm(args) -> Optional[dict]:
    from lxt_data import load_smollm2

    model, tokenizer = load_smollm2()
    numbered = numbered_prompts(args.prompts_file, args.prompts)
    prompts = [p for _, p in numbered]
    bos = "" if args.no_bos else SMOLLM2_BOS
    if args.jsonl:
        options = {"model": "SmolLM2-135M-Instruct", "methods": list(args.methods),
                   "fills": list(FILLS), "steps": args.steps, "seed": args.seed}
        records = text_corpus(model, tokenizer, [(i, bos + p) for i, p in numbered], args.jsonl,
                              options, args.methods, FILLS, args.steps, args.batch_size,
                              args.chunk, args.seed, progress=not args.quiet)
        if records is None:  # not rank 0
            return None
        per_input = [r for r in records if not r.get("error")]
        res = {"rows": summarize(per_input, args.methods, FILLS), "per_input": per_input,
               "seconds": {}, "errors": [r for r in records if r.get("error")]}
    else:
        res = evaluate_text(model, tokenizer, [bos + p for p in prompts], args.methods, FILLS, args.steps,
                            batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    lengths = [len(r["tokens"]) for r in res["per_input"]]
    res["settings"] = {"model": "SmolLM2-135M-Instruct (lxt_data.load_smollm2, float32, sdpa)",
                       "prompts_file": str(args.prompts_file), "n_prompts": len(res["per_input"]), "bos": bos,
                       "tokens_min": min(lengths), "tokens_max": max(lengths),
                       "tokens_mean": sum(lengths) / len(lengths), "methods": list(args.methods),
                       "fills": {"zero": "zero vector", "mean": "mean of the input-embedding matrix"},
                       "ig_steps": args.steps, "seed": args.seed, "explain_batch_size": args.batch_size,
                       "random_orderings": ("one generator per prompt, seeded with seed * 1000003 + line"
                                            if args.jsonl else "one generator for the run"),
                       "excluded_positions": "first (BOS) and last (query)"}
    return res


def run_vit(args) -> dict:
    from lxt_data import train_digits_vit

    model, data = train_digits_vit()
    pv, labels = data.test_pixel_values, data.test_labels
    if args.images:
        pv, labels = pv[:args.images], labels[:args.images]
    res = evaluate_images(model, pv, labels, args.methods, FILLS, args.steps, seed=args.seed,
                          progress=not args.quiet)
    res["settings"] = {"model": "ViT on scikit-learn digits (lxt_data.train_digits_vit(), defaults)",
                       "images": f"first {len(pv)} of the test split", "n_images": len(pv),
                       "test_accuracy_full_split": data.test_accuracy, "methods": list(args.methods),
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


def _parser():
    p = argparse.ArgumentParser(prog="lxt bench faithfulness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["llm", "vit", "all"], default="all")
    p.add_argument("--prompts", type=int, default=None, help="first N prompts (default: all)")
    p.add_argument("--prompts-file", default=str(PROMPTS_FILE))
    p.add_argument("--images", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=50, help="integrated-gradients steps")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per lxt.explain batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bos", action="store_true", help="do not prepend <|endoftext|> to the prompts")
    p.add_argument("--json", help="write the results here (with --model all: one file per model, "
                   "suffixed _llm / _vit)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--jsonl", help="language model: one record per prompt, written as it is "
                   "finished; a rerun resumes; runs sharded under torchrun (see lxt.corpus)")
    p.add_argument("--chunk", type=int, default=16, help="with --jsonl: prompts per write "
                   "(default 16)")
    return p


def main(argv=None) -> int:
    from lxt import corpus

    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    refused = None
    if args.jsonl and args.model != "llm":
        refused = "--jsonl shards the language-model benchmark; give --model llm"
    elif corpus.launched_world_size() > 1 and not args.jsonl:
        refused = "several processes share the prompts through --jsonl; give --model llm --jsonl FILE"
    elif args.chunk < 1:
        refused = f"--chunk must be >= 1, got {args.chunk}"
    if refused:
        print(f"lxt bench faithfulness: error: {refused}", file=sys.stderr)
        return 2
    env = _environment()
    which = ["llm", "vit"] if args.model == "all" else [args.model]
    with corpus.process_group() as (rank, world):
        env["processes"] = world
        for name in which:
            t0 = time.perf_counter()
            try:
                res = run_llm(args) if name == "llm" else run_vit(args)
            except corpus.JobMismatch as err:
                print(f"lxt bench faithfulness: error: {str(err).removeprefix('lxt: ')}", file=sys.stderr)
                return 2
            if res is None:  # not rank 0: its records are in the merged file
                continue
            total = time.perf_counter() - t0
            res["seconds"]["total"] = total
            title = ("SmolLM2-135M, %d prompts" % res["settings"]["n_prompts"] if name == "llm"
                     else "digits ViT, %d images (accuracy %.3f)" % (res["settings"]["n_images"], res["accuracy"]))
            print(format_table(res["rows"], f"\nFaithfulness: {title}  ({total:.0f} s)"), flush=True)
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
