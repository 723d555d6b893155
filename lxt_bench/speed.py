"""Cost of AttnLRP explanations relative to plain input x gradient, same model, same inputs,
same process: paired runs (each round calls the baseline and every method once), medians of
N rounds after a warm-up round.  Five views of the cost:

* **per call** (``--lengths``): one explanation of an n-token input, on a registered model;
  time, and memory two ways: the bytes of all tensors kept for backward (saved tensors, model
  weights excluded; deterministic), and the peak RSS increase over the call (sampled; glibc's
  mmap threshold is fixed so that freed tensors go back to the OS and RSS follows live memory);
* **notebook** (``--notebook-runs``): the seven ``lxt.explain`` calls of :data:`NOTEBOOK`
  (the README's, plus two other lengths), each call registering and restoring the model as a
  user's notebook does, against the same calls with ``method="input_x_gradient"``;
* **first call** (``--first-call-runs``): a fresh process loads SmolLM2 and makes one
  ``lxt.explain`` call; AttnLRP's first call against input x gradient's, in processes of
  their own (torch's one-time warm-up is in both);
* **depth** (``--depths``): the first explanation (register included) of a tiny random Llama
  with 2, 8, 30 layers, against its plain first gradient;
* **image-text** (``--image-text-runs``): a tiny random stock ``LlavaForConditionalGeneration``
  (:func:`tiny_llava`, built offline with its processor) explaining the next token of a prompt
  about a bundled photo, relevance of text tokens and pixels: AttnLRP and CP-LRP against input
  x gradient, registered once (as the per-call rows: each method on its own registered copy,
  the processed inputs reused) and through the one-call API (``lxt.explain(vlm, processor,
  prompt, image=...)``, each call registering and restoring, as the notebook row; and the same
  call given a composite registered once).

    lxt bench speed [--lengths 128 512 1024 4096] [--runs 5] [--explicit-up-to 1024]
                    [--notebook-runs 5] [--first-call-runs 3] [--depths 2 8 30]
                    [--image-text-runs 5] [--json out.json]
    .venv/bin/python benchmarks/speed.py ...   (the same)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import statistics
import threading
import time

import psutil
import torch

# The measuring functions (PeakRSS, one_call, saved_bytes, measure) import nothing of lxt, so
# benchmarks/published_lxt.py can load this file by path and measure the published package
# with the very same harness in its own process.


class PeakRSS:
    """Peak resident memory above the starting point while the block runs (sampled)."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._stop = False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.delta = self.peak - self.start


def one_call(model, emb, target):
    x = emb.clone().requires_grad_()
    # as lxt.explain calls it: only the explained position goes through the LM head
    logit = model(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[0, -1, target]
    logit.backward(logit)
    return x.grad


def ig_call(model, emb, target, steps=50):
    """Integrated gradients, ``steps`` midpoint steps from a zero baseline."""
    total = torch.zeros_like(emb)
    for a in (torch.arange(steps, dtype=torch.float32) + 0.5) / steps:
        x = (emb * a).requires_grad_()
        model(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[0, -1, target].backward()
        total += x.grad
    return emb * total / steps


def _storage_address(t) -> int:
    # the address of t's storage, read without writing access: a copy-on-write tensor (lxt's
    # explicit rules keep those) stays shared, as it is in a run without this hook
    return t.const_data_ptr() - t.storage_offset() * t.element_size()


def saved_bytes(model, emb, target) -> int:
    """Bytes of the distinct storages kept for backward by one forward (weights excluded)."""
    x = emb.clone().requires_grad_()
    return _saved_by(model, lambda: model(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[0, -1, target])


def _saved_by(model, forward) -> int:
    """Bytes of the distinct storages that ``forward()`` keeps for backward (weights excluded)."""
    weights = {_storage_address(p) for p in model.parameters()}
    seen = {}

    def pack(t):
        address = _storage_address(t)
        if address not in weights:
            seen[address] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def measure(fn, runs):
    """Median time and median peak-RSS increase of ``fn()`` over ``runs`` runs after a warm-up."""
    times, mems = [], []
    fn()  # warm-up (and capture, for a composite)
    for _ in range(runs):
        with PeakRSS() as mem:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        mems.append(mem.delta)
    return statistics.median(times), statistics.median(mems)


def paired(fns: dict, runs: int) -> dict:
    """Paired runs: one warm-up round, then ``runs`` rounds each calling every function once
    (the order rotating between rounds), so load that drifts over the run hits all alike.

    Returns, per name: median time, median peak-RSS increase (MB), and the median over rounds
    of the time ratio against the first function of the same round.
    """
    names = list(fns)
    for fn in fns.values():
        fn()
    times = {n: [] for n in names}
    peaks = {n: [] for n in names}
    for r in range(runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            with PeakRSS() as mem:
                t = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t)
            peaks[name].append(mem.delta)
    base = names[0]
    return {n: {"s": statistics.median(times[n]), "peak_mb": statistics.median(peaks[n]) / 2**20,
                "time_ratio": statistics.median(a / b for a, b in zip(times[n], times[base]))}
            for n in names}


def benchmark(model, lengths, runs=5, ig_steps=50, ig_runs=1, vocab=None, log=print,
              explicit_up_to: int = 0) -> dict:
    """Time and memory of AttnLRP, CP-LRP (gradient engine; the explicit engine's AttnLRP too
    up to ``explicit_up_to`` tokens) and integrated gradients relative to input x gradient, same
    inputs, this process, paired runs.  Each method runs on its own copy of the model,
    registered once, so its calls alternate with the baseline's without re-tracing.  Returns a
    JSON-ready dict."""
    import copy

    import lxt.composites

    for prm in model.parameters():
        prm.requires_grad_(False)
    vocab = vocab or model.config.vocab_size
    factories = {"attnlrp": lxt.composites.attnlrp, "cp-lrp": lxt.composites.cp_lrp}
    if explicit_up_to:
        factories["attnlrp-explicit"] = lambda m: lxt.composites.attnlrp(m, engine="explicit")
    copies, comps = {}, {}
    register_s = None
    try:
        for name, factory in factories.items():
            copies[name] = copy.deepcopy(model)
            comps[name] = factory(copies[name])
            t = time.perf_counter()
            comps[name].register(copies[name])
            register_s = register_s or time.perf_counter() - t
        rows = []
        for n in lengths:
            torch.manual_seed(0)
            ids = torch.randint(min(10, vocab - 1), vocab, (1, n))
            emb = model.get_input_embeddings()(ids).detach()
            target = int(torch.randint(vocab, (1,)))
            row = {"tokens": n}
            names = [k for k in comps if not (k.endswith("-explicit") and n > explicit_up_to)]
            for name in names:
                if not rows:  # the first call traces the model
                    t0 = time.perf_counter()
                    one_call(copies[name], emb, target)
                    row[f"{name}_first_call_s"] = time.perf_counter() - t0
            fns = {"grad": lambda: one_call(model, emb, target)}
            fns.update({k: (lambda m=copies[k]: one_call(m, emb, target)) for k in names})
            res = paired(fns, runs)
            row["grad_s"], row["grad_peak_mb"] = res["grad"]["s"], res["grad"]["peak_mb"]
            row["grad_saved_mb"] = saved_bytes(model, emb, target) / 2**20
            for name in names:
                row[f"{name}_s"], row[f"{name}_peak_mb"] = res[name]["s"], res[name]["peak_mb"]
                row[f"{name}_saved_mb"] = saved_bytes(copies[name], emb, target) / 2**20
                row[f"{name}_walks"] = comps[name]._dispatcher.walks
                row[f"{name}_time_ratio"] = res[name]["time_ratio"]
                row[f"{name}_peak_ratio"] = row[f"{name}_peak_mb"] / max(row["grad_peak_mb"], 1e-9)
                row[f"{name}_saved_ratio"] = row[f"{name}_saved_mb"] / max(row["grad_saved_mb"], 1e-9)
            if ig_steps:
                sec, _ = measure(lambda: ig_call(model, emb, target, ig_steps), ig_runs)
                row["ig_s"], row["ig_time_ratio"] = sec, sec / row["grad_s"]
            rows.append(row)
            log(f"{n:5d} tokens | x*grad {row['grad_s']*1e3:7.0f} ms | "
                + " | ".join(f"{k} {row[f'{k}_time_ratio']:.2f}x time, {row[f'{k}_peak_ratio']:.2f}x peak, "
                             f"{row[f'{k}_saved_ratio']:.2f}x saved" for k in names)
                + (f" | IG-{ig_steps} {row['ig_time_ratio']:.1f}x" if ig_steps else ""))
    finally:
        for comp in comps.values():
            comp.remove()
    return {"machine": platform.machine(), "cpus": psutil.cpu_count(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "register_s": register_s, "runs": runs,
            "pairing": "paired rounds, ratio = median over rounds of method / baseline time", "rows": rows}


#: a user's notebook: the README's calls on SmolLM2, then two other lengths (3 to 17 words,
#: two batches of two)
NOTEBOOK = (
    {"inputs": "The capital of France is"},
    {"inputs": "The capital of France is", "target": " Paris", "contrast": " London"},
    {"inputs": ["The capital of France is", "The capital of Italy is"], "batch_size": 8},
    {"inputs": "The capital of France is", "generate": 8},
    {"inputs": "The capital of France is", "layers": ["model.layers.*.mlp"]},
    {"inputs": "Water boils at"},
    {"inputs": ["The quick brown fox jumps over the lazy dog while the old farmer watches it from "
                "his barn", "The largest planet of the solar system is"], "batch_size": 8},
)


def notebook_calls(model, tok, method: str) -> None:
    """The :data:`NOTEBOOK` calls, each a plain ``lxt.explain`` call (no context)."""
    import lxt

    for call in NOTEBOOK:
        lxt.explain(model, tok, method=method, progress=False, **call)


def notebook(model, tok, runs: int, log=print) -> dict:
    """Paired rounds of the whole notebook: input x gradient, AttnLRP, CP-LRP."""
    fns = {"grad": lambda: notebook_calls(model, tok, "input_x_gradient"),
           "attnlrp": lambda: notebook_calls(model, tok, "attnlrp"),
           "cp-lrp": lambda: notebook_calls(model, tok, "cp-lrp")}
    res = paired(fns, runs)
    out = {"calls": len(NOTEBOOK), "runs": runs, "grad_s": res["grad"]["s"]}
    for name in ("attnlrp", "cp-lrp"):
        out[f"{name}_s"], out[f"{name}_time_ratio"] = res[name]["s"], res[name]["time_ratio"]
    log(f"notebook ({len(NOTEBOOK)} explain calls) | x*grad {out['grad_s']:.2f} s | attnlrp "
        f"{out['attnlrp_s']:.2f} s, {out['attnlrp_time_ratio']:.2f}x | cp-lrp {out['cp-lrp_s']:.2f} s, "
        f"{out['cp-lrp_time_ratio']:.2f}x")
    return out


def _first_call_child(method: str) -> int:
    """In a fresh process: load SmolLM2, time the first and the second explain call (JSON)."""
    import lxt
    from lxt_data import load_smollm2

    t = time.perf_counter()
    model, tok = load_smollm2()
    load_s = time.perf_counter() - t
    times = []
    for _ in range(2):
        t = time.perf_counter()
        lxt.explain(model, tok, "The capital of France is", method=method, progress=False)
        times.append(time.perf_counter() - t)
    print(json.dumps({"method": method, "load_s": load_s, "first_s": times[0], "second_s": times[1]}))
    return 0


def first_calls(runs: int, log=print) -> dict:
    """Medians over ``runs`` fresh processes per method (alternating) of the first explain call."""
    import subprocess

    results = {"input_x_gradient": [], "attnlrp": []}
    for _ in range(runs):
        for method in results:
            out = subprocess.run([sys.executable, "-m", "lxt_bench.speed", "--first-call-child", method],
                                 check=True, capture_output=True, text=True).stdout
            results[method].append(json.loads(out.strip().splitlines()[-1]))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("load_s", "first_s", "second_s")}
           for m, rs in results.items()}
    out = {"runs": runs, "grad_first_s": med["input_x_gradient"]["first_s"],
           "attnlrp_first_s": med["attnlrp"]["first_s"], "grad_second_s": med["input_x_gradient"]["second_s"],
           "attnlrp_second_s": med["attnlrp"]["second_s"], "load_s": med["attnlrp"]["load_s"]}
    out["attnlrp_first_extra_s"] = out["attnlrp_first_s"] - out["grad_first_s"]
    log(f"first call of a process | x*grad {out['grad_first_s']:.2f} s | attnlrp "
        f"{out['attnlrp_first_s']:.2f} s (+{out['attnlrp_first_extra_s']:.2f} s) | second call "
        f"{out['grad_second_s']:.2f} s / {out['attnlrp_second_s']:.2f} s | load {out['load_s']:.1f} s")
    return out


def depth_rows(depths, tokens: int = 16, runs: int = 3, log=print) -> list:
    """First explanation (register + first call) of fresh tiny Llamas of each depth, against
    the plain first gradient of another fresh copy; medians of ``runs`` fresh models."""
    import lxt.composites
    from transformers import LlamaConfig, LlamaForCausalLM

    def fresh(layers):
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                          max_position_embeddings=256, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg).eval()
        for prm in model.parameters():
            prm.requires_grad_(False)
        return model

    def lrp_first(model, emb):
        t = time.perf_counter()
        with lxt.composites.attnlrp(model).context(model):
            one_call(model, emb, 3)
        return time.perf_counter() - t

    def grad_first(model, emb):
        t = time.perf_counter()
        x = emb.clone().requires_grad_()
        model(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[0, -1, 3].backward()
        return time.perf_counter() - t

    emb = torch.randn(1, tokens, 64)
    lrp_first(fresh(2), emb), grad_first(fresh(2), emb)  # torch's one-time warm-up
    rows = []
    for layers in depths:
        lrp = statistics.median(lrp_first(fresh(layers), emb) for _ in range(runs))
        grad = statistics.median(grad_first(fresh(layers), emb) for _ in range(runs))
        rows.append({"layers": layers, "attnlrp_first_s": lrp, "grad_first_s": grad, "extra_s": lrp - grad})
        log(f"tiny Llama, {layers:2d} layers | first call: x*grad {grad*1e3:6.1f} ms | attnlrp "
            f"(register + call) {lrp*1e3:6.1f} ms (+{(lrp - grad)*1e3:5.1f} ms)")
    return rows


#: the tiny LLaVA's image token id (the last id of its vocabulary) and prompt
LLAVA_IMAGE_TOKEN, LLAVA_PROMPT = 100, "the cat sat on the"


def tiny_llava(seed: int = 0):
    """A tiny random stock ``LlavaForConditionalGeneration`` (Llama text model: hidden 32, 2
    layers, 4 heads, 2 key/value heads, vocabulary 101; CLIP vision tower: hidden 16, 2 layers,
    16 x 16 pixels in 4 x 4 patches) and its stock ``LlavaProcessor``, built offline (a
    word-level tokenizer with ``<image>`` at the image token id, the CLIP image processor at
    16 x 16), float32, sdpa, eval mode, parameters frozen."""
    import transformers as tr
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=LLAVA_IMAGE_TOKEN + 1,
                max_position_embeddings=128, initializer_range=0.2)
    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, image_size=16, patch_size=4, projection_dim=16, initializer_factor=2.0)
    cfg = tr.LlavaConfig(text_config=text, vision_config=vision, image_token_id=LLAVA_IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "sdpa"
    model = tr.LlavaForConditionalGeneration(cfg).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for w in "the a cat dog sat on mat in photo of is".split():
        vocab.setdefault(w, len(vocab))
    vocab.update({f"w{i}": i for i in range(len(vocab), LLAVA_IMAGE_TOKEN)})
    vocab["<image>"] = LLAVA_IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tr.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                           eos_token="[EOS]", additional_special_tokens=["<image>"])
    image_cls = getattr(tr, "CLIPImageProcessorPil", None) or tr.CLIPImageProcessor  # no torchvision needed
    image_processor = image_cls(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = tr.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=4,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def vlm_call(model, batch, target, lrp: bool = True):
    """One image-text explanation as ``explain(vlm, processor, prompt, image=)`` makes it, on
    processed inputs: the text embeddings made a leaf by a forward hook (a VLM is called with
    ``input_ids``), ``pixel_values`` a leaf, backward from the logit at the last position
    (``lrp``: seeded with the logit, text relevance ``grad * embedding`` as explain takes it from
    the gradient engine; otherwise input x gradient of text and pixels)."""
    leaves = []

    def leaf(module, args, out):
        leaves.append(out.detach().requires_grad_())
        return leaves[-1]

    handle = model.get_input_embeddings().register_forward_hook(leaf)
    try:
        px = batch["pixel_values"].clone().requires_grad_()
        logit = model(**{**batch, "pixel_values": px}, use_cache=False, logits_to_keep=1).logits[0, -1, target]
    finally:
        handle.remove()
    logit.backward(logit.detach() if lrp else None)
    emb = leaves[0]
    return emb.grad * emb.detach(), px.grad if lrp else px.grad * px.detach()


def vlm_saved_bytes(model, batch, target) -> int:
    """:func:`saved_bytes` of :func:`vlm_call`'s forward."""
    px = batch["pixel_values"].clone().requires_grad_()
    return _saved_by(model, lambda: model(**{**batch, "pixel_values": px}, use_cache=False,
                                          logits_to_keep=1).logits[0, -1, target])


def image_text_row(runs: int = 5, log=print, image=None) -> dict:
    """Paired rounds on :func:`tiny_llava`: AttnLRP and CP-LRP against input x gradient,
    ``registered`` (raw calls on copies registered once), ``explain`` (the one-call API, each
    call registering and restoring) and ``explain_registered`` (the same call on the copies
    registered once, given their ``composite=``, which explain then uses as it is).  ``image``: a PIL image (default: the
    bundled photo ``chelsea``)."""
    import copy

    import lxt
    import lxt.composites

    model, processor = tiny_llava()
    if image is None:
        from lxt_data import load_image

        image = load_image("chelsea", size=48)
    prompt = f"<image>{LLAVA_PROMPT}"
    batch = dict(processor(text=[prompt], images=[image], return_tensors="pt"))
    with torch.no_grad():  # the first call marks the vision tower (transformers' output capturing)
        target = int(model(**batch, use_cache=False).logits[0, -1].argmax())
    out = {"model": "tiny LlavaForConditionalGeneration (Llama 2 x 32, CLIP 2 x 16)", "image_px": [16, 16],
           "tokens": int(batch["input_ids"].shape[1]), "runs": runs}
    factories = {"attnlrp": lxt.composites.attnlrp, "cp-lrp": lxt.composites.cp_lrp}

    def explain(m, method, composite=None):
        return lambda: lxt.explain(m, processor, LLAVA_PROMPT, image=image, method=method, composite=composite)

    def ratios(res) -> dict:
        row = {"grad_s": res["grad"]["s"], "grad_peak_mb": res["grad"]["peak_mb"]}
        for name in factories:
            row[f"{name}_s"], row[f"{name}_time_ratio"] = res[name]["s"], res[name]["time_ratio"]
            row[f"{name}_peak_mb"] = res[name]["peak_mb"]
        return row

    copies = {k: copy.deepcopy(model) for k in factories}
    comps = {k: f(copies[k]) for k, f in factories.items()}
    try:
        for name, comp in comps.items():
            comp.register(copies[name])
        fns = {"grad": lambda: vlm_call(model, batch, target, lrp=False)}
        fns.update({k: (lambda m=copies[k]: vlm_call(m, batch, target)) for k in comps})
        out["registered"] = row = ratios(paired(fns, runs))
        row["grad_saved_mb"] = vlm_saved_bytes(model, batch, target) / 2**20
        for name in comps:
            row[f"{name}_saved_mb"] = vlm_saved_bytes(copies[name], batch, target) / 2**20
            row[f"{name}_saved_ratio"] = row[f"{name}_saved_mb"] / max(row["grad_saved_mb"], 1e-9)
        # the one-call API given a composite registered once (explain uses it as it is)
        fns = {"grad": explain(model, "input_x_gradient")}
        fns.update({k: explain(copies[k], k, comps[k]) for k in comps})
        out["explain_registered"] = ratios(paired(fns, runs))
    finally:
        for comp in comps.values():
            comp.remove()
    # the one-call API as a user calls it: each call registers and restores the model
    fns = {"grad": explain(model, "input_x_gradient"), **{k: explain(model, k) for k in factories}}
    out["explain"] = ratios(paired(fns, runs))
    for view, label in (("registered", "registered once"), ("explain_registered", "explain(composite=registered)"),
                        ("explain", "explain()")):
        r = out[view]
        log(f"image-text, tiny LLaVA ({out['tokens']} tokens, 16x16 px), {label:29s} | x*grad {r['grad_s']*1e3:6.1f} ms | "
            + " | ".join(f"{k} {r[f'{k}_s']*1e3:6.1f} ms, {r[f'{k}_time_ratio']:.2f}x" for k in factories)
            + (" | " + ", ".join(f"{k} {r[f'{k}_saved_ratio']:.2f}x saved" for k in factories)
               if view == "registered" else ""))
    return out


def main(argv=None, reexec: bool = False):
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and (argv is None or reexec):
        # fixed mmap threshold: large tensors are returned to the OS when freed (RSS = live)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    p = argparse.ArgumentParser(prog="lxt bench speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="*", default=[128, 512, 1024, 4096],
                   help="per-call rows (none: skip)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ig-steps", type=int, default=50, help="0 to skip integrated gradients")
    p.add_argument("--explicit-up-to", type=int, default=1024,
                   help="also time the explicit engine's AttnLRP up to this many tokens (0: never)")
    p.add_argument("--notebook-runs", type=int, default=5, help="paired rounds of the notebook (0: skip)")
    p.add_argument("--first-call-runs", type=int, default=3,
                   help="fresh processes per method for the first-call row (0: skip)")
    p.add_argument("--depths", type=int, nargs="*", default=[2, 8, 30], help="tiny Llama depths (none: skip)")
    p.add_argument("--image-text-runs", type=int, default=5,
                   help="paired rounds of the image-text row, a tiny LLaVA (0: skip)")
    p.add_argument("--first-call-child", help=argparse.SUPPRESS)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.first_call_child:
        return _first_call_child(args.first_call_child)
    model = tok = None
    if args.lengths or args.notebook_runs:  # the rows on SmolLM2
        from lxt_data import load_smollm2

        model, tok = load_smollm2()
    print(f"{'SmolLM2-135M float32, ' if model is not None else ''}{torch.get_num_threads()} threads; medians of "
          f"{args.runs} runs{f' ({args.image_text_runs} for the image-text row)' if args.image_text_runs else ''}; "
          "ratios against input x gradient in this run")
    info = {"machine": platform.machine(), "cpus": psutil.cpu_count(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "runs": args.runs, "rows": []}
    if args.lengths:
        info.update(benchmark(model, args.lengths, args.runs, args.ig_steps, explicit_up_to=args.explicit_up_to))
        print(f"register(): {info['register_s']*1e3:.0f} ms")
    if args.notebook_runs:
        for prm in model.parameters():  # as in benchmark(): frozen (explain freezes them too)
            prm.requires_grad_(False)
        info["notebook"] = notebook(model, tok, args.notebook_runs)
    if args.first_call_runs:
        info["first_call"] = first_calls(args.first_call_runs)
    if args.depths:
        info["depth"] = depth_rows(args.depths)
    if args.image_text_runs:
        info["image_text"] = image_text_row(args.image_text_runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
