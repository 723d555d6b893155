"""The first-token sink: how much relevance the first token (a BOS, or the first word) takes.

For every explained prediction the shares of the total absolute relevance are recorded:

* ``first``: ``R_0 / sum_i |R_i|`` (signed: a negative first token counts against);
* ``first_abs``: ``|R_0| / sum_i |R_i|`` (what ``Explanation.first_token_share`` gives and
  ``to_html(sink="separate")`` writes beside the first token);
* ``max_other``: ``max_{i > 0} |R_i| / sum_i |R_i|``, the largest non-first token, for
  comparison (a sink is a first token far above it).

and the table gives, per model, BOS variant and method, their median and interquartile range
(IQR, 25th to 75th percentile) over prompts.  Methods: ``attnlrp``, ``cp-lrp``,
``input_x_gradient`` (``lxt.explain``).

With positional relevance (``lxt.explain(..., positional=True)``, where this lxt has it: the
rotary / learned position encodings become relevance sources, ``Explanation.position_relevance``)
each method is run a second time, and the rows get ``position0_abs``: ``|P_0| / sum_i |P_i|``,
the first position's share of the positional relevance, and ``positional_mass``:
``sum |P| / (sum |R| + sum |P|)``, how much of all relevance the positions hold (the token
shares are then of what remains on the tokens, ``Explanation.relevance``; token-type relevance,
BERT's, is in neither).  Where ``lxt.explain`` has no ``positional`` argument, those rows are
skipped (and the JSON says so).

Models:

* **SmolLM2-135M-Instruct** (real weights, ``lxt_data.load_smollm2``, float32, sdpa) on the
  prompts of ``lxt_bench/prompts.txt``, each as it is (SmolLM2's tokenizer adds no BOS: the first
  token is the first word) and with ``<|endoftext|>`` prepended (SmolLM2's document separator,
  as the faithfulness benchmark does); next-token prediction of the model, explained.
* **The tiny families** of ``tests/models.py`` (``FAMILY_CONFIGS``, plus ``tiny_llama`` and a
  masked-LM ``tiny_bert``; seed 0, float32, ``initializer_range=0.2`` as in the family tests):
  RANDOM weights, so their figures only show the mechanism (how relevance reaches position 0 in
  each architecture), never what a trained model of that family does.  Inputs: seeded random
  token ids (6 to 12 tokens), as they are and with the config's BOS id prepended (its EOS id
  where the BOS id is outside the tiny vocabulary, as GPT-2 uses ``<|endoftext|>`` for both);
  masked LMs get a mask token last and explain it.  Image families (DeiT) have no first token
  and are left out.

    .venv/bin/python benchmarks/sink.py [--models smollm2 tiny] [--prompts N]
        [--families qwen3 gpt2 ...] [--tiny-prompts N] [--json benchmarks/results/sink.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

import lxt

METHODS = ("attnlrp", "cp-lrp", "input_x_gradient")
SMOLLM2_BOS = "<|endoftext|>"
MODELS = ("smollm2", "tiny")
#: the tiny text families: model_type -> (transformers class, kind); "llama" and "bert" are
#: tests/models.py's tiny_llama and tiny_bert (as a masked LM)
TINY_FAMILIES = {
    "llama": ("LlamaForCausalLM", "causal"),
    "qwen3": ("Qwen3ForCausalLM", "causal"),
    "smollm3": ("SmolLM3ForCausalLM", "causal"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "causal"),
    "mixtral": ("MixtralForCausalLM", "causal"),
    "phi3": ("Phi3ForCausalLM", "causal"),
    "gemma": ("GemmaForCausalLM", "causal"),
    "gemma2": ("Gemma2ForCausalLM", "causal"),
    "gemma3_text": ("Gemma3ForCausalLM", "causal"),
    "gpt2": ("GPT2LMHeadModel", "causal"),
    "bert": ("BertForMaskedLM", "masked"),
    "roberta": ("RobertaForMaskedLM", "masked"),
    "distilbert": ("DistilBertForMaskedLM", "masked"),
}
#: attention implementation per family (transformers has no sdpa Gemma 2)
_ATTN = {"gemma2": "eager"}
SHARES = ("first", "first_abs", "max_other")


# ---------------------------------------------------------------------------- shares
def shares(relevance: torch.Tensor) -> dict:
    """``first`` (``R_0 / sum |R|``), ``first_abs`` (``|R_0| / sum |R|``) and ``max_other``
    (``max_{i>0} |R_i| / sum |R|``) of a per-token relevance ``(T,)`` (all 0 when the total
    is 0)."""
    r = relevance.detach().double().reshape(-1)
    total = float(r.abs().sum())
    if total == 0:
        return {"first": 0.0, "first_abs": 0.0, "max_other": 0.0}
    rest = float(r[1:].abs().max()) if len(r) > 1 else 0.0
    return {"first": float(r[0]) / total, "first_abs": abs(float(r[0])) / total, "max_other": rest / total}


def position_shares(position_relevance: torch.Tensor) -> dict:
    """``position0`` (``P_0 / sum |P|``) and ``position0_abs`` (``|P_0| / sum |P|``) of a
    per-position relevance (summed over any trailing dimensions)."""
    p = position_relevance.detach().double()
    p = p.reshape(p.shape[0], -1).sum(-1) if p.dim() > 1 else p
    total = float(p.abs().sum())
    if total == 0:
        return {"position0": 0.0, "position0_abs": 0.0}
    return {"position0": float(p[0]) / total, "position0_abs": abs(float(p[0])) / total}


def has_positional() -> bool:
    """Whether this lxt's ``explain`` takes ``positional=``."""
    return "positional" in inspect.signature(lxt.explain).parameters


def quantiles(values: Sequence[float]) -> dict:
    """``median``, ``q1``, ``q3`` (linear interpolation, as ``torch.quantile``)."""
    v = torch.tensor(list(values), dtype=torch.float64)
    q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"median": float(q[1]), "q1": float(q[0]), "q3": float(q[2])}


# ---------------------------------------------------------------------------- measuring
def measure(model, tokenizer, prompts: Sequence, labels: Sequence[dict], methods: Sequence[str] = METHODS,
            positional: Optional[bool] = None, batch_size: int = 8, progress: bool = False) -> dict:
    """Per-prompt shares of each method (and, with ``positional``, of each method with
    positional relevance) for ``prompts`` (anything ``lxt.explain`` takes: texts or token-id
    lists), one record per prompt and run, ``labels[i]`` (e.g. ``{"model": ..., "bos": ...}``)
    copied into the records of prompt ``i``.

    Returns ``{"records": [...], "errors": [...]}``; a run ``lxt.explain`` refuses (a method
    without positional relevance) is an error entry, not a failure of the benchmark."""
    positional = has_positional() if positional is None else positional
    records, errors = [], []
    runs = [(m, False) for m in methods] + ([(m, True) for m in methods] if positional else [])
    for method, pos in runs:
        kw = {"positional": True} if pos else {}
        try:
            exps = lxt.explain(model, tokenizer, list(prompts), method=method, batch_size=batch_size,
                               progress=progress, **kw)
        except (ValueError, TypeError, NotImplementedError) as err:
            errors.append({**labels[0], "method": method, "positional": pos, "error": str(err)})
            continue
        for label, e in zip(labels, exps):
            rec = {**label, "method": method, "positional": pos,
                   "tokens": len(e.tokens), "first_token": e.tokens[0], "target": e.target,
                   **shares(e.relevance)}
            if pos:
                p = getattr(e, "position_relevance", None)
                if p is None:
                    rec["position0"] = rec["position0_abs"] = rec["positional_mass"] = None
                else:
                    rec.update(position_shares(p))
                    mass = float(p.double().abs().sum())
                    total = mass + float(e.relevance.double().abs().sum())
                    rec["positional_mass"] = mass / total if total > 0 else 0.0
            records.append(rec)
    return {"records": records, "errors": errors}


def summarize(records: Sequence[dict]) -> list:
    """Table rows: per (model, bos, method, positional), the median and IQR of each share."""
    groups = {}
    for r in records:
        groups.setdefault((r["model"], r["bos"], r["method"], r["positional"]), []).append(r)
    rows = []
    for (model, bos, method, pos), rs in groups.items():
        row = {"model": model, "bos": bos, "method": method, "positional": pos, "n": len(rs),
               "weights": rs[0].get("weights")}
        names = SHARES + (("position0", "position0_abs", "positional_mass") if pos else ())
        for name in names:
            vals = [r[name] for r in rs if r.get(name) is not None]
            row[name] = quantiles(vals) if vals else None
        rows.append(row)
    return rows


def _cell(q, signed=False) -> str:
    if q is None:
        return "–"
    f = "+.2f" if signed else ".2f"
    return f"{q['median']:{'+.3f' if signed else '.3f'}} [{q['q1']:{f}}, {q['q3']:{f}}]"


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table: medians with [q1, q3]."""
    pos = any(r["positional"] for r in rows)
    head = ["model", "weights", "BOS", "method"] + (["positional"] if pos else []) + \
        ["n", "R_0 / Σ|R|", "|R_0| / Σ|R|", "max_{i>0} |R_i| / Σ|R|"] + \
        (["|P_0| / Σ|P|", "Σ|P| / (Σ|R| + Σ|P|)"] if pos else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["model"], r.get("weights") or "", "yes" if r["bos"] else "no", r["method"]]
        if pos:
            cells.append("yes" if r["positional"] else "no")
        cells += [str(r["n"]), _cell(r["first"], True), _cell(r["first_abs"]), _cell(r["max_other"])]
        if pos:
            cells += [_cell(r.get("position0_abs")), _cell(r.get("positional_mass"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("(median [25th, 75th percentile] over prompts; Σ over the prompt's tokens; R: token "
                 "relevance, P: positional relevance)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- models
def tests_models():
    """``tests/models.py`` of this checkout (the tiny configurations), as a module."""
    path = Path(__file__).resolve().parents[1] / "tests" / "models.py"
    if not path.is_file():
        raise FileNotFoundError(f"lxt bench sink: the tiny families come from {path}, which this "
                                "installation lacks; run from a checkout of lxt, or give --models smollm2")
    spec = importlib.util.spec_from_file_location("lxt_bench_tiny_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(model_type: str, tm=None):
    """The tiny random model of ``model_type`` (see :data:`TINY_FAMILIES`) and its tokenizer."""
    import transformers

    tm = tm or tests_models()
    cls_name, _ = TINY_FAMILIES[model_type]
    cls = getattr(transformers, cls_name)
    attn = _ATTN.get(model_type, "sdpa")
    if model_type == "llama":
        model = tm.tiny_llama(attn=attn, initializer_range=0.2)
    elif model_type == "bert":
        cfg = tm.tiny_bert(attn=attn, cls=cls).config
        cfg.initializer_range = 0.2
        torch.manual_seed(0)
        model = cls(cfg).eval()
    else:
        model = tm.tiny_family(model_type, cls, attn=attn, initializer_range=0.2)
    return model, tm.tiny_tokenizer(model.config.vocab_size)


def tiny_prompts(model, tokenizer, kind: str, n: int, seed: int = 0) -> tuple[list, list, int]:
    """``n`` seeded random id sequences (6 to 12 tokens; ids from 3, past the special tokens),
    each as it is and with a BOS id first; masked LMs end with the mask token.  Returns
    ``(prompts, their sequence numbers, bos flags, BOS id)``."""
    vocab = model.config.vocab_size
    bos = getattr(model.config, "bos_token_id", None)
    if not isinstance(bos, int) or not 0 <= bos < vocab:
        bos = tokenizer.eos_token_id
    top = tokenizer.mask_token_id if kind == "masked" else vocab
    g = torch.Generator().manual_seed(seed)
    prompts, numbers, flags = [], [], []
    for k in range(n):
        length = int(torch.randint(6, 13, (1,), generator=g))
        ids = torch.randint(3, top, (length,), generator=g).tolist()
        if kind == "masked":
            ids[-1] = tokenizer.mask_token_id
        for with_bos in (False, True):
            prompts.append([bos] + ids if with_bos else ids)
            numbers.append(k)
            flags.append(with_bos)
    return prompts, numbers, flags, bos


def run_smollm2(methods, n_prompts=None, batch_size=8, progress=False, positional=None) -> dict:
    from lxt_data import load_smollm2

    from .faithfulness import numbered_prompts

    model, tokenizer = load_smollm2()
    numbered = numbered_prompts(n=n_prompts)
    plain = [p for _, p in numbered]
    prompts = plain + [SMOLLM2_BOS + p for p in plain]
    labels = [{"model": "SmolLM2-135M-Instruct", "weights": "real", "bos": b, "prompt": line}
              for b in (False, True) for line, _ in numbered]
    res = measure(model, tokenizer, prompts, labels, methods, positional, batch_size, progress)
    res["settings"] = {"model": "SmolLM2-135M-Instruct (lxt_data.load_smollm2, float32, sdpa)",
                       "prompts": f"lxt_bench/prompts.txt, first {len(plain)} (record 'prompt': its line)",
                       "bos": SMOLLM2_BOS,
                       "target": "the model's next-token prediction"}
    return res


def run_tiny(methods, families=None, n_prompts=16, batch_size=8, positional=None, log=print) -> dict:
    tm = tests_models()
    records, errors, settings = [], [], {}
    for model_type in families or TINY_FAMILIES:
        t0 = time.perf_counter()
        model, tok = tiny_model(model_type, tm)
        kind = TINY_FAMILIES[model_type][1]
        prompts, numbers, flags, bos = tiny_prompts(model, tok, kind, n_prompts)
        labels = [{"model": f"tiny {model_type}", "weights": "random", "bos": b, "prompt": k}
                  for k, b in zip(numbers, flags)]
        res = measure(model, tok, prompts, labels, methods, positional, batch_size)
        records += res["records"]
        errors += res["errors"]
        settings[model_type] = {"class": TINY_FAMILIES[model_type][0], "kind": kind, "bos_id": bos,
                                "attention": _ATTN.get(model_type, "sdpa")}
        log(f"  tiny {model_type}: {time.perf_counter() - t0:.1f} s")
    return {"records": records, "errors": errors, "settings": {
        "families": settings, "weights": "random (seed 0, initializer_range 0.2): the mechanism only",
        "prompts": (f"{n_prompts} seeded random id sequences of 6-12 tokens (record 'prompt': its number), "
                    "each without and with the BOS id"),
        "left_out": {"deit": "an image model: no first token"}}}


# ---------------------------------------------------------------------------- CLI
def _parser():
    p = argparse.ArgumentParser(prog="lxt bench sink", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--prompts", type=int, default=None, help="SmolLM2: the first N prompts (default: all)")
    p.add_argument("--families", nargs="+", choices=list(TINY_FAMILIES), default=None,
                   help="tiny families (default: all)")
    p.add_argument("--tiny-prompts", type=int, default=16, help="random prompts per tiny family (default 16)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per lxt.explain batch")
    p.add_argument("--json", help="write the results here (e.g. benchmarks/results/sink.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    import json

    from .faithfulness import _environment

    args = _parser().parse_args(argv)
    if args.tiny_prompts < 1 or (args.prompts is not None and args.prompts < 1):
        print("lxt bench sink: error: --prompts and --tiny-prompts must be >= 1", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    positional = has_positional()
    env = _environment()
    if not positional:
        print("lxt bench sink: this lxt.explain has no positional= argument: the columns with "
              "positional relevance are skipped", flush=True)
    t0 = time.perf_counter()
    records, errors, settings = [], [], {}
    if "smollm2" in args.models:
        res = run_smollm2(args.methods, args.prompts, args.batch_size, not args.quiet, positional)
        records += res["records"]
        errors += res["errors"]
        settings["smollm2"] = res["settings"]
        print(f"  SmolLM2: {time.perf_counter() - t0:.1f} s", flush=True)
    if "tiny" in args.models:
        res = run_tiny(args.methods, args.families, args.tiny_prompts, args.batch_size, positional,
                       log=lambda m: print(m, flush=True))
        records += res["records"]
        errors += res["errors"]
        settings["tiny"] = res["settings"]
    rows = summarize(records)
    print("\nFirst-token share of the relevance (tiny families: random weights, the mechanism only)\n")
    print(format_table(rows), flush=True)
    for e in errors:
        print(f"  {e['model']} {e['method']} positional={e['positional']}: {e['error']}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = {"benchmark": "sink", "environment": env, "seconds": time.perf_counter() - t0,
               "positional": ("measured" if positional else
                              "skipped: lxt.explain has no positional= argument"),
               "methods": list(args.methods), "settings": settings,
               "protocol": __doc__.split("\n\n    .venv")[0], "rows": rows, "errors": errors}
        # one line per record (3,000 records of a full run)
        lines = ",\n".join("  " + json.dumps({k: round(v, 7) if isinstance(v, float) else v for k, v in r.items()},
                                              allow_nan=False) for r in records)
        text = json.dumps(out, indent=1, allow_nan=False)
        path.write_text(f'{text[:-2]},\n "per_input": [\n{lines}\n ]\n}}\n')
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
