"""Per-token relevance of this repository's composites against the *published* lxt 2.1
efficient mode, family by family, on identical tiny random models.

    .venv/bin/python benchmarks/published_families.py [--families llama qwen2 ...] \\
        [--json benchmarks/results/published_families.json]

For each family a tiny random model (seed 0, float32, 2 layers, hidden 64, 4 heads with 2
key/value heads where the family has grouped-query attention, ``initializer_range=0.2`` so
that activations are not tiny next to the stabiliser; MoE: 4 experts, top-2) is built and saved
with ``save_pretrained`` to a temporary folder (norm weights and biases, which initialise to
constants, perturbed by N(0, 0.2) so that they are not trivially 1 or 0); the input is 16 fixed random token ids (seed
1) and the target the argmax logit at the last position.

* Ours (this process, our ``lxt``): ``lxt.composites.attnlrp(model)`` (and ``cp_lrp``) registered,
  ``logit.backward(logit)`` on ``inputs_embeds`` (as ``lxt.explain`` starts LRP: R = logit),
  per-token relevance ``inputs_embeds.grad.sum(-1)`` (our contract: ``.grad`` is relevance).
  Both engines (``gradient``, the default, and ``explicit``) unless ``--engines`` says otherwise.
* Published (a child process whose ``lxt`` is the pinned lxt 2.1 in ``.venv-published/``,
  installed, shimmed and switched exactly as in ``benchmarks/published_lxt.py``, whose
  ``ensure_installed``, ``run_child``, ``import_published`` and ``PublishedPatch`` are used here):
  the same folder loaded after ``monkey_patch`` of the family's modeling module with its
  published AttnLRP map (its default map) and CP-LRP map (``cp_LRP``, where it has one),
  ``logit.backward()``, relevance ``(inputs_embeds * inputs_embeds.grad).sum(-1)`` (its
  README's input x gradient; in logit units like ours).  The child checks that switching the patch in
  changes the gradient and switching it out restores it bit for bit.

Reported per family and method: Pearson r of the per-token relevance, sum of relevance / target
logit on both sides, max |ours - published| / max |R|, and, as a yardstick for how much the rules
matter on that model, r of each side with plain input x gradient.

Families the published 2.1 does not have (``qwen3_moe``) are reported as such.  The unreleased
upstream file ``lxt/efficient/models/qwen3_moe.py`` (github.com/rachtibat/LRP-eXplains-
Transformers, commit 2ab094b; sha256 pinned below) can be given with ``--upstream-qwen3-moe
FILE``: it is then loaded in the child as ``lxt.efficient.models.qwen3_moe`` on top of 2.1 (it
imports only 2.1's ``patches`` and ``rules``) and compared like the others; the rows say so.
A family whose table does not exist here yet is reported as "our table missing" and the script
goes on (or, where lxt falls back to its structural table, compared and labelled so).
``qwen3_moe_no_topk_norm`` is ``qwen3_moe`` without the renormalisation of the top-k routing
weights (``norm_topk_prob=False``): it isolates the rule of that division.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "published_families.json"
TOKENS, VOCAB = 16, 256

UPSTREAM_QWEN3_MOE = {"commit": "2ab094b450eae1f4140134a9367d0b05e3bfd08b",
                      "path": "lxt/efficient/models/qwen3_moe.py",
                      "sha256": "e5cf4b8cab829b6888cc5363cd97a0dd0e48982e8db71ae93914f1a6afbdcecc"}

COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
              initializer_range=0.2, tie_word_embeddings=False)

# sliding window 4 on layer 0 (of 16 tokens), full attention on layer 1
GEMMA3_TEXT = dict(COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention"])

#: family -> (config class, config kwargs, modeling module, published model map name or None)
FAMILIES = {
    "llama": ("LlamaConfig", COMMON, "transformers.models.llama.modeling_llama", "llama"),
    "qwen2": ("Qwen2Config", COMMON, "transformers.models.qwen2.modeling_qwen2", "qwen2"),
    "qwen3": ("Qwen3Config", dict(COMMON, head_dim=16),
              "transformers.models.qwen3.modeling_qwen3", "qwen3"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, norm_topk_prob=True,
                                         decoder_sparse_step=1, mlp_only_layers=[]),
                  "transformers.models.qwen3_moe.modeling_qwen3_moe", None),
    # the same without the renormalisation of the top-k routing weights (isolates its rule)
    "qwen3_moe_no_topk_norm": ("Qwen3MoeConfig", dict(COMMON, head_dim=16, num_experts=4,
                                                      num_experts_per_tok=2, moe_intermediate_size=32,
                                                      norm_topk_prob=False, decoder_sparse_step=1,
                                                      mlp_only_layers=[]),
                               "transformers.models.qwen3_moe.modeling_qwen3_moe", None),
    "gemma3_text": ("Gemma3TextConfig", GEMMA3_TEXT, "transformers.models.gemma3.modeling_gemma3", "gemma3"),
    # the multimodal class (Gemma3ForConditionalGeneration; gemma-3-4b and larger), text input
    # only; a one-layer SigLIP tower that the text path does not use
    "gemma3": ("Gemma3Config", dict(text_config=GEMMA3_TEXT, initializer_range=0.2,
                                    vision_config=dict(hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=64,
                                                       image_size=28, patch_size=14),
                                    mm_tokens_per_image=4, image_token_id=5, boi_token_index=6,
                                    eoi_token_index=7),
               "transformers.models.gemma3.modeling_gemma3", "gemma3"),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                activation_function="gelu_new", initializer_range=0.2,
                                bos_token_id=1, eos_token_id=2),
             "transformers.models.gpt2.modeling_gpt2", "gpt2"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--engines", nargs="+", default=["gradient", "explicit"], choices=["gradient", "explicit"])
    p.add_argument("--attn", default="sdpa", help="attn_implementation on both sides (default sdpa)")
    p.add_argument("--upstream-qwen3-moe", metavar="FILE",
                   help="the unreleased upstream qwen3_moe.py (sha256-checked), to compare qwen3_moe")
    p.add_argument("--json", default=str(RESULTS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def published_lxt():
    """``benchmarks/published_lxt.py`` loaded by path (the child has no script folder on sys.path)."""
    spec = importlib.util.spec_from_file_location("published_lxt", REPO / "benchmarks" / "published_lxt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- both processes

def load(folder, attn):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn, local_files_only=True).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


def backward_from_logit(model, ids, target=None, lrp=False):
    """``inputs_embeds`` (a leaf, its ``.grad`` filled), target id and logit, after a backward
    from the logit at the last position: ``logit.backward(logit)`` for our composites (their
    ``.grad`` is relevance, R starts as the logit, as in ``lxt.explain``), ``logit.backward()``
    otherwise (the published README: input x gradient then sums to the logit)."""
    import torch

    x = model.get_input_embeddings()(torch.tensor([ids])).detach().clone().requires_grad_()
    logits = model(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[0, -1]
    target = int(logits.argmax()) if target is None else target
    logit = logits[target]
    logit.backward(logit.detach() if lrp else None)
    return x, target, logit.item()


# --------------------------------------------------------------------------- child process

def child(args) -> int:
    import torch

    pub = published_lxt()
    spec = json.loads(Path(args.spec).read_text())
    monkey_patch, get_default_map = pub.import_published()
    import lxt
    import lxt.efficient.models as published_models

    out = {"module": lxt.__file__, "families": {}}
    for family, job in spec["families"].items():
        modeling = importlib.import_module(job["modeling"])
        maps, source = {}, f"lxt {pub.VERSION}"
        if job["published"] is not None:
            model_file = getattr(published_models, job["published"])
            maps["attnlrp"] = get_default_map(modeling)
            if hasattr(model_file, "cp_LRP"):
                maps["cp-lrp"] = model_file.cp_LRP
        elif family.startswith("qwen3_moe") and spec.get("upstream_qwen3_moe"):
            name = "lxt.efficient.models.qwen3_moe"
            loader = importlib.util.spec_from_file_location(name, spec["upstream_qwen3_moe"])
            upstream = importlib.util.module_from_spec(loader)
            sys.modules[name] = upstream
            loader.loader.exec_module(upstream)
            maps["attnlrp"] = upstream.attnLRP
            source = f"upstream {UPSTREAM_QWEN3_MOE['commit'][:7]} qwen3_moe.py on lxt {pub.VERSION}"
        else:
            try:
                get_default_map(modeling)
                reason = "?"
            except ValueError as err:
                reason = str(err).split(". ")[0]
            out["families"][family] = {"unsupported": f"published lxt {pub.VERSION}: {reason}"}
            continue
        rows = {}
        for method, patch_map in maps.items():
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    patch = pub.PublishedPatch(modeling, patch_map)
                with patch.active():  # the published contract: patch first, then load
                    model = load(job["folder"], spec["attn"])
                plain = backward_from_logit(model, job["ids"], job["target"])[0].grad
                with patch.active():
                    x, target, logit = backward_from_logit(model, job["ids"], job["target"])
                again = backward_from_logit(model, job["ids"], job["target"])[0].grad
                if torch.equal(x.grad, plain) or not torch.equal(again, plain):
                    raise RuntimeError("switching the published patch in and out does not work")
                rows[method] = {"source": source, "target": target, "logit": logit,
                                "patched": patch.describe(),
                                "patch_warnings": sorted({str(w.message) for w in caught}),
                                "relevance": (x * x.grad).sum(-1)[0].tolist()}
            except Exception as err:  # report exactly why and go on with the next
                rows[method] = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:500]}
        out["families"][family] = rows
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


# --------------------------------------------------------------------------- parent process

def build(family, folder):
    """Tiny random model of ``family`` saved to ``folder``; its input ids."""
    import torch
    import transformers

    cls, kwargs, _, _ = FAMILIES[family]
    config = getattr(transformers, cls)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norm weights / biases are initialised to constants: perturb them
        for module in model.modules():
            if "Norm" in type(module).__name__:
                for prm in module.parameters(recurse=False):
                    prm.add_(0.2 * torch.randn_like(prm))
    model.save_pretrained(folder)
    gen = torch.Generator().manual_seed(1)
    return torch.randint(10, VOCAB, (TOKENS,), generator=gen).tolist()


def ours(family, folder, ids, attn, engines) -> dict:
    """Our relevance per method / engine (``{"missing": ...}`` where no table exists) and plain
    input x gradient."""
    import lxt.composites

    model = load(folder, attn)
    x, target, logit = backward_from_logit(model, ids)
    rows = {"input_x_grad": {"target": target, "logit": logit, "relevance": (x * x.grad).sum(-1)[0].tolist()}}
    # a model_type without a table: older lxt raises, newer lxt falls back to its structural
    # table (with a warning); that one is compared too, and labelled
    table = model.config.model_type if model.config.model_type in lxt.composites.FAMILIES else "structural"
    for method, factory in (("attnlrp", lxt.composites.attnlrp), ("cp-lrp", lxt.composites.cp_lrp)):
        for engine in engines:
            key = method if engine == "gradient" else f"{method}/{engine}"
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "lxt: no table for", UserWarning)
                    comp = factory(model, engine=engine)
            except ValueError as err:
                if "no composite for model_type" not in str(err):
                    raise
                rows[key] = {"missing": f"our table missing ({str(err).split('. ')[0]})"}
                continue
            comp.register(model)
            try:
                x, t, logit = backward_from_logit(model, ids, target, lrp=True)
            finally:
                comp.remove()
            rows[key] = {"table": table, "target": t, "logit": logit, "relevance": x.grad.sum(-1)[0].tolist()}
    return rows


def pearson(a, b) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def compare(mine: dict, theirs: dict, plain: dict) -> dict:
    a, b, g = mine["relevance"], theirs["relevance"], plain["relevance"]
    scale = max(max(map(abs, a)), max(map(abs, b)))
    return {"r": pearson(a, b), "ours_sum_over_logit": sum(a) / mine["logit"],
            "published_sum_over_logit": sum(b) / theirs["logit"],
            "max_abs_diff_rel": max(abs(x - y) for x, y in zip(a, b)) / scale,
            "r_ours_vs_input_x_grad": pearson(a, g), "r_published_vs_input_x_grad": pearson(b, g),
            "logit": mine["logit"], "same_target": mine["target"] == theirs["target"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    pub = published_lxt()
    pub.ensure_installed()
    if args.upstream_qwen3_moe:
        digest = hashlib.sha256(Path(args.upstream_qwen3_moe).read_bytes()).hexdigest()
        if digest != UPSTREAM_QWEN3_MOE["sha256"]:
            sys.exit(f"{args.upstream_qwen3_moe}: sha256 {digest}, expected {UPSTREAM_QWEN3_MOE['sha256']}")
    import torch
    import transformers

    results = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "transformers": transformers.__version__, "threads": torch.get_num_threads(),
               "attn_implementation": args.attn, "tokens": TOKENS,
               "published": {"version": pub.VERSION, "sha256": pub.SDIST_SHA256, "shims": pub.SHIMS},
               "upstream_qwen3_moe": UPSTREAM_QWEN3_MOE if args.upstream_qwen3_moe else None,
               "families": {}}
    with tempfile.TemporaryDirectory(prefix="lxt-families-") as tmp:
        spec = {"attn": args.attn, "out": str(Path(tmp) / "published.json"), "families": {},
                "upstream_qwen3_moe": args.upstream_qwen3_moe and str(Path(args.upstream_qwen3_moe).resolve())}
        mine = {}
        for family in args.families:
            folder = Path(tmp) / family
            ids = build(family, folder)
            mine[family] = ours(family, folder, ids, args.attn, args.engines)
            spec["families"][family] = {"folder": str(folder), "ids": ids,
                                        "target": mine[family]["input_x_grad"]["target"],
                                        "modeling": FAMILIES[family][2], "published": FAMILIES[family][3]}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        if pub.run_child(["--spec", str(Path(tmp) / "spec.json")], script=__file__) != 0:
            sys.exit("the published child process failed")
        theirs = json.loads(Path(spec["out"]).read_text())
    print(f"ours vs published lxt {pub.VERSION} efficient mode; tiny random float32 models, "
          f"{TOKENS} tokens, attn={args.attn}; r = per-token Pearson")
    print(f"{'family':22s} {'method':20s} {'r':>10s} {'ours sum/logit':>15s} {'publ sum/logit':>15s} "
          f"{'max|d|/max|R|':>14s} {'r(x*grad)':>10s}")
    for family in args.families:
        fam = {"ids": spec["families"][family]["ids"], "ours": mine[family],
               "published": theirs["families"][family], "comparison": {}}
        results["families"][family] = fam
        if "unsupported" in fam["published"]:
            print(f"{family:22s} {'-':20s} {fam['published']['unsupported']}")
            continue
        for key, row in mine[family].items():
            if key == "input_x_grad":
                continue
            method = key.split("/")[0]
            if "missing" in row:
                other = fam["published"].get(method, {})
                if "relevance" in other and "/" not in key:
                    plain = mine[family]["input_x_grad"]["relevance"]
                    print(f"{family:22s} {key:20s} {row['missing']}; published sum/logit "
                          f"{sum(other['relevance']) / other['logit']:.4f}, r(published, x*grad) "
                          f"{pearson(other['relevance'], plain):.4f}")
                continue
            other = fam["published"].get(method)
            if other is None:
                print(f"{family:22s} {key:20s} published has no {method} map for this family")
                continue
            if "error" in other:
                print(f"{family:22s} {key:20s} published failed: {other['error']}")
                continue
            c = compare(row, other, mine[family]["input_x_grad"])
            c["published_source"] = other["source"]
            c["our_table"] = row["table"]
            fam["comparison"][key] = c
            print(f"{family:22s} {key:20s} {c['r']:10.6f} {c['ours_sum_over_logit']:15.4f} "
                  f"{c['published_sum_over_logit']:15.4f} {c['max_abs_diff_rel']:14.2e} "
                  f"{c['r_ours_vs_input_x_grad']:10.4f}" + ("" if c["same_target"] else "  TARGETS DIFFER")
                  + ("  (our structural table)" if row["table"] == "structural" else "")
                  + ("" if other["source"].startswith("lxt") else f"  (published: {other['source']})"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
