"""Cost of the *published* lxt (PyPI ``lxt==2.1``, its "efficient" AttnLRP mode) relative to
plain input x gradient on SmolLM2-135M-Instruct float32, measured with the very harness of our
own speed benchmark (``lxt_bench/speed.py``), so that its figures sit beside ours in one table.

    .venv/bin/python benchmarks/published_lxt.py --lengths 128 512 1024 4096 --runs 5 \\
        --json benchmarks/results/speed_published.json

How it works
------------
* The published package is also called ``lxt``, so it lives in a side folder,
  ``.venv-published/``, installed on first use with ``pip install --no-deps --target`` from
  the pinned source distribution after its sha256 is checked (2.1 ships no wheel).  The
  measurement runs in a child process whose ``sys.path`` puts that folder first; the child
  refuses to run if ``import lxt`` resolves to anything else (e.g. our editable install).
* ``speed.py``'s measuring functions (``one_call``, ``saved_bytes``, ``paired``, ``PeakRSS``)
  import nothing of lxt; the child loads that file by path as ``lxt_speed_harness``.
* As in ``speed.py: benchmark()``, each length's input is built the same way and the baseline
  (the unpatched model) and the patched model are timed in paired rounds (``paired``) in the
  same process, on the same model object, so that both see the same machine load.  The published
  patch is process-wide and has no undo, so it is applied once and then switched in and out:
  :class:`PublishedPatch` records which class and module attributes ``monkey_patch`` changed
  and swaps the two sets.  The child checks that switching it out restores plain gradients
  bit for bit.  Row fields mean what they mean in ``speed.py`` rows, with ``published`` in
  place of ``attnlrp``.
* The published relevance of the smallest length's input is stored with the results, computed
  as the published README documents it: ``logit.backward()`` (gradient 1, hence in logit
  units), relevance = ``(x * x.grad).sum(-1)``.  (The timed call, ``speed.py: one_call``,
  seeds the backward with the logit instead; that changes only the scale.)

Shims (lxt 2.1 was written for transformers 4.x; its files are not touched)
----------------------------------------------------------------------------
1. ``lxt.efficient`` imports every model family it supports.  Two of those imports fail here
   and are irrelevant to Llama: ``models/bert.py`` imports
   ``transformers.pytorch_utils.find_pruneable_heads_and_indices`` (removed in transformers
   5) and ``models/vit_torch.py`` imports torchvision (not installed).  Placeholder modules are
   put in ``sys.modules`` for those two, each with the one attribute ``models/__init__.py``
   reads from it and empty patch maps.
2. ``patch_attention`` replaces ``modeling_llama.ALL_ATTENTION_FUNCTIONS`` (an
   ``AttentionInterface`` in transformers 5) with a plain dict of its wrapped functions, and
   ``LlamaAttention.forward`` then fails with "'dict' object has no attribute
   'get_interface'".  The wrapped functions are put into a fresh ``AttentionInterface`` (as
   local overrides of that instance only), which is what the upstream repository's later
   transformers-5 fix amounts to.  (The CP-LRP ``patch_cp_attention`` instead writes into the
   module's interface in place, and that instance is transformers' one shared registry; the
   module is therefore given a fresh ``AttentionInterface`` of its own before patching, so that
   the change stays in that module and can be switched out.)

``PublishedPatch`` takes any modeling module of the published default map (and optionally
another patch map, e.g. the published ``cp_LRP`` maps); ``benchmarks/published_families.py``
uses it for the other families.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "lxt_bench" / "speed.py"
SIDE = REPO / ".venv-published"

VERSION = "2.1"
SDIST = f"lxt-{VERSION}.tar.gz"
SDIST_SHA256 = "b1a62da2195d3de54ae03b3458e1135a9b1f7a84bab8416ecd727bb5e66894b4"

SHIMS = [
    "placeholder modules for lxt.efficient.models.bert (imports find_pruneable_heads_and_indices, "
    "removed in transformers 5) and lxt.efficient.models.vit_torch (needs torchvision)",
    "modeling_llama.ALL_ATTENTION_FUNCTIONS: the plain dict left by patch_attention is put back "
    "into an AttentionInterface (transformers 5 calls .get_interface on it)",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="*", default=[128, 512, 1024, 4096])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa, as our "
                   "load_smollm2; the published patch wraps every registered attention function)")
    p.add_argument("--notebook-runs", type=int, default=0,
                   help="paired rounds of speed.py's notebook, written with the published recipe (0: skip)")
    p.add_argument("--first-call-runs", type=int, default=0,
                   help="fresh processes per side for the first-call row (0: skip)")
    p.add_argument("--json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--first-call-child", choices=["published", "plain"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- parent process

def ensure_installed() -> None:
    """Install the pinned, hash-checked published lxt into ``SIDE`` unless it is there."""
    if SIDE.exists():
        if not (SIDE / f"lxt-{VERSION}.dist-info").is_dir():
            sys.exit(f"{SIDE} holds no lxt {VERSION}; delete the folder and run again")
        return
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(pip + ["download", "--no-deps", "--no-build-isolation", "--no-binary", "lxt",
                              f"lxt=={VERSION}", "-d", tmp], check=True)
        sdist = Path(tmp) / SDIST
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest() if sdist.exists() else "missing"
        if digest != SDIST_SHA256:
            sys.exit(f"{SDIST}: sha256 {digest}, expected {SDIST_SHA256}; not installing")
        staging = Path(tempfile.mkdtemp(prefix=".venv-published.", dir=REPO))
        try:
            subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", "--target",
                                  str(staging), str(sdist)], check=True)
            staging.rename(SIDE)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def run_child(argv, script=__file__) -> int:
    """Re-run ``script`` (default: this one) as the measuring child: published lxt first on
    sys.path, no script folder or cwd on it (-P), and speed.py's fixed mmap threshold (RSS
    follows live memory)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(SIDE), os.environ.get("PYTHONPATH")])))
    args = argv if argv is not None else sys.argv[1:]
    return subprocess.run([sys.executable, "-P", str(Path(script).resolve()), "--child", *args],
                          env=env).returncode


# --------------------------------------------------------------------------- child process

def load_harness():
    """speed.py's measuring functions, loaded by path so that ``lxt`` stays the published one."""
    spec = importlib.util.spec_from_file_location("lxt_speed_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_published():
    """The published ``monkey_patch`` and ``get_default_map`` (with shim 1), after checking
    that ``lxt`` is the published package."""
    spec = importlib.util.find_spec("lxt")
    if spec is None or not Path(spec.origin).resolve().is_relative_to(SIDE):
        sys.exit(f"import lxt resolves to {spec and spec.origin}, not the published package in {SIDE}")
    for family, attribute in (("bert", "modeling_bert"), ("vit_torch", "vision_transformer")):
        placeholder = types.ModuleType(f"lxt.efficient.models.{family}")
        setattr(placeholder, attribute, types.ModuleType(f"{family} (not loaded, see published_lxt.py)"))
        placeholder.attnLRP = placeholder.cp_LRP = {}
        sys.modules[placeholder.__name__] = placeholder
    from lxt.efficient import monkey_patch
    from lxt.efficient.models import get_default_map

    return monkey_patch, get_default_map


class PublishedPatch:
    """A published efficient patch of one modeling module (plus shim 2) as a switch.

    ``modeling`` defaults to ``modeling_llama``, ``patch_map`` to the published default map of
    that module (its AttnLRP map).  ``monkey_patch`` is applied once; every attribute it changed
    on the classes and modules of its patch map is recorded with its value before and after, and
    :meth:`active` swaps the patched values in for the duration of a block.  Outside such a
    block the originals are set.
    """

    _ABSENT = object()

    def __init__(self, modeling=None, patch_map=None):
        from transformers.modeling_utils import AttentionInterface

        if modeling is None:
            from transformers.models.llama import modeling_llama as modeling
        monkey_patch, get_default_map = import_published()
        patch_map = get_default_map(modeling) if patch_map is None else patch_map
        targets = list(patch_map)
        before = [dict(vars(t)) for t in targets]
        if modeling in patch_map:  # shim 2: in-place writes go to an interface of its own
            modeling.ALL_ATTENTION_FUNCTIONS = AttentionInterface()
        monkey_patch(modeling, patch_map=patch_map, verbose=False)
        wrapped = modeling.ALL_ATTENTION_FUNCTIONS
        if not isinstance(wrapped, AttentionInterface):
            interface = AttentionInterface()
            for name, fn in wrapped.items():
                interface[name] = fn
            modeling.ALL_ATTENTION_FUNCTIONS = interface
        self.changes = []  # (owner, name, original, patched)
        for owner, old in zip(targets, before):
            new = dict(vars(owner))
            for name in old.keys() | new.keys():
                orig, patched = old.get(name, self._ABSENT), new.get(name, self._ABSENT)
                if orig is not patched:
                    self.changes.append((owner, name, orig, patched))
        self._set(patched=False)

    def _set(self, patched: bool):
        for owner, name, orig, new in self.changes:
            value = new if patched else orig
            if value is self._ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, value)

    def describe(self) -> list[str]:
        return sorted(f"{getattr(o, '__qualname__', o.__name__)}.{n}" for o, n, _, _ in self.changes)

    @contextlib.contextmanager
    def active(self):
        self._set(patched=True)
        try:
            yield
        finally:
            self._set(patched=False)


def load_model(attn: str):
    """SmolLM2-135M-Instruct float32 from our cache folder (found by the parent process with
    ``lxt_data.models.smollm2_folder`` and passed in ``$LXT_SMOLLM2_DIR``), parameters frozen as
    in ``speed.py: benchmark()``."""
    import torch
    import transformers

    folder = Path(os.environ["LXT_SMOLLM2_DIR"])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn, local_files_only=True).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


def bench_input(model, n: int):
    """Embeddings and target id for length n, built exactly as in ``speed.py: benchmark()``."""
    import torch

    vocab = model.config.vocab_size
    torch.manual_seed(0)
    ids = torch.randint(min(10, vocab - 1), vocab, (1, n))
    emb = model.get_input_embeddings()(ids).detach()
    target = int(torch.randint(vocab, (1,)))
    return emb, target


def published_relevance(model, emb, target) -> dict:
    """Per-token relevance as the published README documents it (call with the patch active)."""
    x = emb.clone().requires_grad_()
    logit = model(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[0, -1, target]
    logit.backward()
    return {"tokens": emb.shape[1], "target": target, "logit": logit.item(),
            "relevance": (x * x.grad).sum(-1)[0].tolist()}


def check_switch(harness, patch, model, emb, target) -> None:
    """Fail unless the patch changes the gradient and switching it out restores it bit for bit."""
    import torch

    plain = harness.one_call(model, emb, target)
    with patch.active():
        patched = harness.one_call(model, emb, target)
    if torch.equal(patched, plain) or not torch.equal(harness.one_call(model, emb, target), plain):
        sys.exit("switching the published patch in and out does not work")


def load_tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(os.environ["LXT_SMOLLM2_DIR"], local_files_only=True)


def published_explain(model, tok, inputs, target=None, contrast=None, generate=0, layers=None,
                      batch_size=8) -> list:
    """The work of one ``lxt.explain`` call (speed.py's NOTEBOOK entries), written with the
    recipe the published README documents: tokenise (left padding), embed, forward on
    ``inputs_embeds``, ``backward()`` from the explained logit (minus the contrast's), relevance
    ``(x * x.grad).sum(-1)`` per token; ``generate``: greedy steps, each explained; ``layers``:
    the gradient times the output of the matching modules.  The same function runs the plain
    model (patch off) for the baseline."""
    import fnmatch

    import torch

    def one(ids, mask, tid=None):
        x = model.get_input_embeddings()(ids).detach().requires_grad_()
        kept, hooks = [], []
        for name, module in model.named_modules():
            if layers and any(fnmatch.fnmatchcase(name, p) for p in layers):
                def keep(mod, a, out, kept=kept):
                    t = out[0] if isinstance(out, tuple) else out
                    t.retain_grad()
                    kept.append(t)
                hooks.append(module.register_forward_hook(keep))
        try:
            logits = model(inputs_embeds=x, attention_mask=mask, use_cache=False, logits_to_keep=1).logits[:, -1]
        finally:
            for h in hooks:
                h.remove()
        ids_t = logits.argmax(-1) if tid is None else torch.full((logits.shape[0],), tid)
        value = logits[torch.arange(logits.shape[0]), ids_t]
        if contrast is not None:
            value = value - logits[:, tok.encode(contrast, add_special_tokens=False)[0]]
        value.sum().backward()
        latent = [(t * t.grad).detach() for t in kept]
        return (x * x.grad).sum(-1).detach(), ids_t, latent

    prompts = [inputs] if isinstance(inputs, str) else list(inputs)
    tid = tok.encode(target, add_special_tokens=False)[0] if target is not None else None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = []
    if generate:
        enc = tok(prompts[0], return_tensors="pt")
        ids, mask = enc.input_ids, enc.attention_mask
        for _ in range(generate):
            with torch.no_grad():
                nxt = int(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0, -1].argmax())
            out.append(one(ids, mask, nxt))
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
        return out
    for start in range(0, len(prompts), batch_size):
        enc = tok(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        out.append(one(enc.input_ids, enc.attention_mask, tid))
    return out


def first_call_child(args) -> int:
    """In a fresh process: (patch,) load, then time the first and second explanation."""
    harness = load_harness()
    patch = PublishedPatch() if args.first_call_child == "published" else None
    t = time.perf_counter()
    with (patch.active() if patch else contextlib.nullcontext()):
        model = load_model(args.attn)
        tok = load_tokenizer()
        load_s = time.perf_counter() - t
        times = []
        for _ in range(2):
            t = time.perf_counter()
            published_explain(model, tok, "The capital of France is")
            times.append(time.perf_counter() - t)
    del harness
    print(json.dumps({"side": args.first_call_child, "load_s": load_s, "first_s": times[0], "second_s": times[1]}))
    return 0


def first_calls(args) -> dict:
    import statistics

    results = {"plain": [], "published": []}
    for _ in range(args.first_call_runs):
        for side in results:
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", HF_HUB_OFFLINE="1")
            out = subprocess.run([sys.executable, "-P", str(Path(__file__).resolve()), "--child",
                                  "--first-call-child", side, "--attn", args.attn], env=env,
                                 check=True, capture_output=True, text=True).stdout
            results[side].append(json.loads(out.strip().splitlines()[-1]))
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("load_s", "first_s", "second_s")}
           for s, rs in results.items()}
    row = {"runs": args.first_call_runs, "grad_first_s": med["plain"]["first_s"],
           "published_first_s": med["published"]["first_s"], "grad_second_s": med["plain"]["second_s"],
           "published_second_s": med["published"]["second_s"]}
    row["published_first_extra_s"] = row["published_first_s"] - row["grad_first_s"]
    print(f"first call of a process | x*grad {row['grad_first_s']:.2f} s | published lxt "
          f"{row['published_first_s']:.2f} s (+{row['published_first_extra_s']:.2f} s)", flush=True)
    return row


def notebook(harness, patch, model, args) -> dict:
    tok = load_tokenizer()

    def run():
        for call in harness.NOTEBOOK:
            call = dict(call)
            published_explain(model, tok, call.pop("inputs"), **call)

    def published():
        with patch.active():
            run()

    res = harness.paired({"grad": run, "published": published}, args.notebook_runs)
    row = {"calls": len(harness.NOTEBOOK), "runs": args.notebook_runs, "grad_s": res["grad"]["s"],
           "published_s": res["published"]["s"], "published_time_ratio": res["published"]["time_ratio"]}
    print(f"notebook ({row['calls']} calls) | x*grad {row['grad_s']:.2f} s | published lxt "
          f"{row['published_s']:.2f} s, {row['published_time_ratio']:.2f}x", flush=True)
    return row


def child(args) -> int:
    import torch
    import transformers

    if args.first_call_child:
        return first_call_child(args)
    harness = load_harness()
    patch = PublishedPatch()
    with patch.active():  # the published contract: patch first, then load
        model = load_model(args.attn)
    print(f"published lxt {VERSION} (efficient AttnLRP, sdist sha256 {SDIST_SHA256[:12]}...) vs "
          f"input x gradient, SmolLM2-135M float32, attn={args.attn}, {torch.get_num_threads()} "
          f"threads; paired runs, medians of {args.runs} rounds; ratios against input x gradient in this run")
    check_switch(harness, patch, model, *bench_input(model, min(args.lengths or [8])))
    rows, relevance = [], None
    for n in args.lengths:
        emb, target = bench_input(model, n)
        row = {"tokens": n}

        def published():
            with patch.active():
                return harness.one_call(model, emb, target)

        res = harness.paired({"grad": lambda: harness.one_call(model, emb, target), "published": published},
                             args.runs)
        row["grad_s"], row["grad_peak_mb"] = res["grad"]["s"], res["grad"]["peak_mb"]
        row["published_s"], row["published_peak_mb"] = res["published"]["s"], res["published"]["peak_mb"]
        row["grad_saved_mb"] = harness.saved_bytes(model, emb, target) / 2**20
        with patch.active():
            row["published_saved_mb"] = harness.saved_bytes(model, emb, target) / 2**20
            if n == min(args.lengths):
                relevance = published_relevance(model, emb, target)
        row["published_time_ratio"] = res["published"]["time_ratio"]
        row["published_peak_ratio"] = row["published_peak_mb"] / max(row["grad_peak_mb"], 1e-9)
        row["published_saved_ratio"] = row["published_saved_mb"] / max(row["grad_saved_mb"], 1e-9)
        rows.append(row)
        print(f"{n:5d} tokens | x*grad {row['grad_s']*1e3:7.0f} ms | published lxt "
              f"{row['published_s']*1e3:7.0f} ms | {row['published_time_ratio']:.2f}x time, "
              f"{row['published_peak_ratio']:.2f}x peak, {row['published_saved_ratio']:.2f}x saved",
              flush=True)
    import lxt

    info = {"machine": platform.machine(), "cpus": harness.psutil.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "runs": args.runs, "attn_implementation": args.attn,
            "published": {"package": "lxt", "version": VERSION, "sdist": SDIST, "sha256": SDIST_SHA256,
                          "module": lxt.__file__, "api": "lxt.efficient.monkey_patch(modeling_llama)",
                          "patched": patch.describe(), "shims": SHIMS},
            "relevance": relevance, "rows": rows}
    if args.notebook_runs:
        info["notebook"] = notebook(harness, patch, model, args)
    if args.first_call_runs:
        info["first_call"] = first_calls(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    ensure_installed()
    from lxt_data.models import smollm2_folder

    os.environ["LXT_SMOLLM2_DIR"] = str(smollm2_folder())  # the same weights as ours
    return run_child(argv)


if __name__ == "__main__":
    sys.exit(main())
