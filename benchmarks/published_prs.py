"""Per-patch and per-pixel relevance of this repository's composites against the published lxt's
open pull requests that cover an image encoder, on identical random weights (issue 21).

    .venv/bin/python benchmarks/published_prs.py [--seeds N] [--json benchmarks/results/published_prs.json]

The pull requests (github.com/rachtibat/LRP-eXplains-Transformers, refs/pull/N/head; each adds
one file, ``lxt/efficient/models/<family>.py``, with an ``attnLRP`` and a ``cp_LRP`` patch map,
and registers neither in ``DEFAULT_MAP``, so the map is passed to ``monkey_patch`` by hand):

* #44 "Add DINOv2 efficient LRP support", head fe0336b: LayerNorm, Dropout and the attention
  functions of ``modeling_dinov2``;
* #45 "Add SigLIP2 efficient LRP support", head 66cdb5a: the same for ``modeling_siglip2``, plus
  ``Siglip2MLP`` (identity rule on the activation) and ``Siglip2MultiheadAttentionPoolingHead``.

How it works
------------
* Each PR's ``lxt`` package is extracted (``git archive``) from a local mirror of the upstream
  repository (``--mirror``, default ``$LXT_PUBLISHED_MIRROR`` or
  ``/work/.mirror/rachtibat+LRP-eXplains-Transformers/repo``; the ``fetch`` of that
  repository keeps ``refs/pull/*``) into a side folder outside this repository
  (``--side``, default ``$TMPDIR/published_prs/pr<N>/``).  It is also called ``lxt``, so it runs
  in a child process whose ``sys.path`` puts that folder first, exactly as
  ``benchmarks/published_lxt.py`` runs the released 2.1: the same shims (placeholder modules
  for ``models/bert.py`` and ``models/vit_torch.py``, an ``AttentionInterface`` in place of the
  plain dict ``patch_attention`` leaves), the same :class:`PublishedPatch` switch (its
  ``import_published`` pointed at the PR's side folder), the same bit-for-bit check that
  switching the patch out restores plain gradients.
* Models (stock transformers classes, float32, sdpa, random weights; per seed ``s``: weights
  drawn with ``torch.manual_seed(s)``, every bias and LayerNorm affine perturbed by N(0, 0.1),
  then ``save_pretrained`` to a temporary folder that both processes load):

  - ``dinov2_cls``: ``Dinov2ForImageClassification`` (hidden 64, 3 layers, 4 heads, 32x32
    image, 4x4 patches: 64 patches + CLS, 5 labels), explained: its argmax logit;
  - ``dinov2``: ``Dinov2Model`` on the same config, explained: ``pooler_output . w``, a fixed
    random readout ``w`` (the pooler is a LayerNorm output, whose plain sum is degenerate);
  - ``siglip2_vision``: ``Siglip2VisionModel`` (NaFlex; hidden 64, 3 layers, 4 heads, 4x4
    patches on an 8x8 grid, attention-pooling head), explained: ``pooler_output . w``;
  - ``siglip2``: ``Siglip2Model`` (that tower and a 3-layer text tower, 16 random token ids),
    explained: ``logits_per_image[0, 0]``; the pixels' relevance is compared.

  Inputs: ``random`` (N(0, 1) pixels, seed s + 1000) and ``photo`` (``lxt_data.load_image
  ("astronaut", size=32)``, scikit-image's bundled photo, normalised as the model family's
  processor does: ImageNet mean / std for DINOv2, mean 0.5 / std 0.5 and patchified,
  channel-last inside a patch, for SigLIP2).
* Ours (this process): ``lxt.composites.attnlrp`` / ``cp_lrp`` registered,
  ``out.backward(R)`` with R the explained value (R = logit at the logit, R = pooler * w at the
  pooler: the epsilon rule of the readout), relevance ``pixel_values.grad``.  For
  ``dinov2_cls`` also ``lxt.explain(model, None, pixel_values, target=t, method=...)``.
* Theirs (the child): the PR's map patched in, ``value.backward()``, relevance
  ``pixel_values * pixel_values.grad`` (the published README's input x gradient).
* Reported per PR x model x input x method, median over seeds: Pearson r of the per-patch and
  of the per-pixel relevance (channels summed), and the ratio of totals
  ``sum(theirs) / sum(ours)``; with each explained difference replayed on our side
  (``like_theirs``: our composite with a layer-override dict that makes that one choice as
  the PR does), which should give r = 1.000; as a yardstick of how much the rules matter on
  these models, r of ours with plain input x gradient.

The differences, read from the PRs' files
-----------------------------------------
* #44 ``lxt/efficient/models/dinov2.py``: the maps hold ``LayerNorm``, ``Dropout`` and the
  module's attention functions, but no entry for ``Dinov2MLP``: its activation (``GELUActivation``,
  ``F.gelu``) keeps its plain gradient instead of the identity rule (AttnLRP Eq. 9).  A
  ``dino_mlp_forward`` with ``identity_rule_implicit`` is in the file, commented out.  Replayed on
  our side with ``overrides={"*": {F.gelu: None}}`` (plain gradient at GELU).
* #45 ``lxt/efficient/models/siglip2.py``: ``siglip2_multihead_attention_pooling_head_forward``
  calls ``self.attention(stop_gradient(probe), stop_gradient(hidden_state), hidden_state)``
  and then ``divide_gradient(hidden_state, 2)``, in both maps: the pooling attention is CP-LRP
  (queries and keys constants) even in the AttnLRP map, and the relevance of everything below
  the head is halved (the uniform rule of a product applied where the product's other factor,
  the attention weights, was made a constant: the ratio of totals is 0.5 for both methods).
  Replayed on our side (AttnLRP) with ``overrides={"*head": {nn.MultiheadAttention:
  multihead_attention(cp=True)}}``; the factor 0.5 is reported as the ratio.
* #45 has no entry for ``Siglip2Model.forward`` itself (the maps patch classes and functions
  of ``modeling_siglip2``, not that method): ``e / e.norm(dim=-1)`` keeps the gradient through
  the norm (ours: the divisor a constant, identity on ``e``; with the norm's gradient, the
  relevance at the image embedding, input x gradient of a function of ``e / |e|``, sums to
  zero, so their pixel totals on ``siglip2`` are only what the biases below leave) and ``text_embeds @ image_embeds.T`` keeps its plain gradient (ours: the uniform
  rule, half to each tower).  Replayed with the table entries
  ``{(Siglip2Model, torch.div): None, (Siglip2Model, torch.matmul): None}`` put before ours
  (calls of the model's own forward have no qualified name an override pattern could match).

What does not run on transformers 5 (the child records the exact errors)
------------------------------------------------------------------------
* ``import lxt.efficient`` itself: ``models/__init__.py`` imports ``models/bert.py``, which
  imports ``transformers.pytorch_utils.find_pruneable_heads_and_indices`` (removed in
  transformers 5), and ``models/vit_torch.py`` (torchvision); shim 1 of ``published_lxt.py``.
* ``patch_attention`` (the AttnLRP maps) replaces ``ALL_ATTENTION_FUNCTIONS`` with a plain dict;
  ``Dinov2Attention`` / ``Siglip2Attention`` then fail with "'dict' object has no attribute
  'get_interface'"; shim 2 of ``published_lxt.py``.
* The PR files themselves import and run (``siglip2.py`` falls back to
  ``transformers.modeling_attn_mask_utils._prepare_4d_attention_mask``, deprecated, with a
  FutureWarning).

The transformers 4.x they were written for: ``--child-path`` puts extra folders on the child's
``sys.path`` only, e.g. a ``pip install --no-deps --target DIR transformers==4.57.6
"huggingface_hub<1.0" "tokenizers>=0.22,<0.23"`` (this interpreter's torch is reused; ours stays
on transformers 5).  There only the torchvision import fails (shim 1's vit_torch placeholder)
and ``patch_attention`` runs as written.  ``Siglip2VisionModel`` holds a ``vision_model`` in 4.x
and not in 5.x, so :func:`load` matches the saved tensors by key suffix; the child checks that
its unpatched value equals ours, so both sides are known to run the same weights.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "published_prs.json"
UPSTREAM = "github.com/rachtibat/LRP-eXplains-Transformers"
DEFAULT_MIRROR = "/work/.mirror/rachtibat+LRP-eXplains-Transformers/repo"

#: PR number -> what it adds and what we compare with it
PRS = {
    44: {"title": "Add DINOv2 efficient LRP support", "commit": "fe0336bc56e3de9a212cd2183f1bcafe3e60e120",
         "file": "lxt/efficient/models/dinov2.py", "modeling": "transformers.models.dinov2.modeling_dinov2",
         "models": ["dinov2_cls", "dinov2"]},
    45: {"title": "Add SigLIP2 efficient LRP support", "commit": "66cdb5acc7d7f47dba49d94c507dc3433dd27311",
         "file": "lxt/efficient/models/siglip2.py", "modeling": "transformers.models.siglip2.modeling_siglip2",
         "models": ["siglip2_vision", "siglip2"]},
}
METHODS = ("attnlrp", "cp_lrp")
INPUTS = ("random", "photo")
IMAGE, PATCH, GRID = 32, 4, 8  # 32x32 pixels, 4x4 patches, an 8x8 grid of 64 patches
TEXT_LEN, VOCAB = 16, 101
HIDDEN = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="random weight draws per model (median reported)")
    p.add_argument("--prs", type=int, nargs="+", default=list(PRS), choices=list(PRS))
    p.add_argument("--mirror", default=os.environ.get("LXT_PUBLISHED_MIRROR", DEFAULT_MIRROR),
                   help="git directory of a mirror of the upstream repository (with refs/pull/*)")
    p.add_argument("--side", default=str(Path(tempfile.gettempdir()) / "published_prs"),
                   help="folder for the PRs' extracted lxt packages (outside this repository)")
    p.add_argument("--python", default=sys.executable, help="interpreter of the published child process")
    p.add_argument("--child-path", default="",
                   help="folders put on the published child's sys.path after the PR's (e.g. a --target "
                        "install of transformers 4.x); ours keeps this interpreter's")
    p.add_argument("--json", default=str(RESULTS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- both processes

def quiet():
    """No progress bars or config notices from transformers, no notice that zennit is absent."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", "'zennit' library is not available")
    warnings.filterwarnings("ignore", "The attention mask API under", FutureWarning)


def model_class(kind):
    import transformers

    return {"dinov2_cls": transformers.Dinov2ForImageClassification, "dinov2": transformers.Dinov2Model,
            "siglip2_vision": transformers.Siglip2VisionModel, "siglip2": transformers.Siglip2Model}[kind]


def load(kind, folder):
    """The saved model, float32, sdpa, frozen.  Where the installed transformers lays the class
    out differently (``Siglip2VisionModel`` holds a ``vision_model`` in 4.x, not in 5.x) the
    saved tensors are matched to its keys by their common suffix, all of them or an error."""
    import torch
    from safetensors.torch import load_file

    model, info = model_class(kind).from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa",
                                                    local_files_only=True, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        saved = load_file(str(Path(folder) / "model.safetensors"))
        state = {}
        for key in model.state_dict():
            match = [k for k in saved if key.endswith("." + k) or k.endswith("." + key) or k == key]
            if len(match) != 1:
                raise RuntimeError(f"{folder}: no unique saved tensor for {key} ({match})")
            state[key] = saved[match[0]]
        model.load_state_dict(state, strict=True)
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


def tensors(job):
    """The job's inputs as tensors (``pixel_values`` a fresh leaf that requires grad)."""
    import torch

    out = {k: torch.tensor(v) for k, v in job["inputs"].items()}
    out["pixel_values"] = out["pixel_values"].float().requires_grad_()
    return out


def run(kind, model, job, lrp: bool):
    """Forward, then backward from the explained value; returns (pixel_values leaf, value).
    ``lrp``: our composites (``out.backward(R)``, R = the value at its own output);
    otherwise ``value.backward()`` (the published recipe)."""
    import torch

    inputs = tensors(job)
    out = model(**inputs)
    if kind == "dinov2_cls":
        y = out.logits[0, job["target"]]
        (y.backward(y.detach()) if lrp else y.backward())
    elif kind == "siglip2":
        y = out.logits_per_image[0, 0]
        (y.backward(y.detach()) if lrp else y.backward())
    else:
        w = torch.tensor(job["readout"])
        pooled = out.pooler_output[0]
        y = (pooled * w).sum()
        (pooled.backward((pooled * w).detach()) if lrp else y.backward())
    return inputs["pixel_values"], y.item()


def per_pixel(kind, rel):
    """(patch, pixel) relevance lists from a pixel_values-shaped relevance, channels summed."""
    if kind.startswith("dinov2"):  # (1, 3, H, W)
        pix = rel[0].sum(0)  # (H, W)
        patch = pix.reshape(GRID, PATCH, GRID, PATCH).sum((1, 3))
    else:  # (1, patches, PATCH * PATCH * 3), channel-last inside a patch
        cells = rel[0].reshape(GRID, GRID, PATCH, PATCH, 3).sum(-1)
        patch = cells.sum((2, 3))
        pix = cells.permute(0, 2, 1, 3).reshape(IMAGE, IMAGE)
    return patch.flatten().tolist(), pix.flatten().tolist()


# --------------------------------------------------------------------------- child process

@functools.lru_cache(maxsize=None)
def sibling(name):
    """``benchmarks/<name>.py`` loaded by path (the child has no script folder on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unshimmed_errors(env, python) -> dict:
    """What fails without the shims: ``import lxt.efficient`` in a clean interpreter, and the
    forward after the raw ``patch_attention`` (recorded by :func:`child`)."""
    res = subprocess.run([python, "-P", "-c", "import lxt.efficient"], env=env, capture_output=True, text=True)
    last = res.stderr.strip().splitlines()[-1] if res.returncode else "ok"
    return {"import lxt.efficient": last}


def child(args) -> int:
    import importlib

    import torch
    import transformers

    torch.set_num_threads(1)
    quiet()
    spec = json.loads(Path(args.spec).read_text())
    pub = sibling("published_lxt")
    pub.SIDE = Path(spec["side"]).resolve()  # import_published checks lxt against this folder
    pub.import_published()
    import lxt

    pr = PRS[spec["pr"]]
    modeling = importlib.import_module(pr["modeling"])
    name = "lxt.efficient.models." + Path(pr["file"]).stem
    prmod = importlib.import_module(name)
    out = {"module": lxt.__file__, "transformers": transformers.__version__, "torch": torch.__version__,
           "rows": {}, "unshimmed": {}}

    # the raw patch_attention (no shim 2) on this transformers: run one forward, record the error
    saved = {k: getattr(modeling, k) for k in ("ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")}
    try:
        from lxt.efficient.patches import patch_attention

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patch_attention(modeling)
        job = spec["jobs"][0]
        run(job["kind"], load(job["kind"], job["folder"]), job, lrp=False)
        out["unshimmed"]["patch_attention"] = "ok"
    except Exception as err:
        out["unshimmed"]["patch_attention"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    finally:
        for k, v in saved.items():
            setattr(modeling, k, v)

    patches = {}
    for method, attr in (("attnlrp", "attnLRP"), ("cp_lrp", "cp_LRP")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            patches[method] = pub.PublishedPatch(modeling, getattr(prmod, attr))
        out.setdefault("patched", {})[method] = patches[method].describe()
        out.setdefault("patch_warnings", {})[method] = sorted({str(w.message) for w in caught})
    for job in spec["jobs"]:
        kind = job["kind"]
        model = load(kind, job["folder"])
        x, value = run(kind, model, job, lrp=False)
        plain = x.grad
        if abs(value - job["value"]) > 1e-4 * max(1.0, abs(job["value"])):
            raise RuntimeError(f"{job['id']}: the unpatched model gives {value}, ours {job['value']}: "
                               "the weights are not the same in both processes")
        rows = {}
        for method, patch in patches.items():
            try:
                with patch.active():
                    x, value = run(kind, model, job, lrp=False)
                again = run(kind, model, job, lrp=False)[0].grad
                if torch.equal(x.grad, plain) or not torch.equal(again, plain):
                    raise RuntimeError("switching the published patch in and out does not work")
                rows[method] = {"value": value, "relevance": (x * x.grad).detach().flatten().tolist()}
            except Exception as err:  # report exactly why and go on
                rows[method] = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300],
                                "where": traceback.format_exc().strip().splitlines()[-3][:300]}
        out["rows"][job["id"]] = rows
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


# --------------------------------------------------------------------------- parent process

def extract(mirror: Path, side: Path, number: int) -> dict:
    """``git archive`` the PR head's ``lxt`` package into ``side/pr<N>``; its provenance."""
    pr = PRS[number]
    git = ["git", f"--git-dir={mirror}"]
    ref = subprocess.run(git + ["rev-parse", f"refs/pull/{number}/head"], capture_output=True, text=True)
    head = ref.stdout.strip() if ref.returncode == 0 else None
    if subprocess.run(git + ["cat-file", "-e", pr["commit"] + "^{commit}"], capture_output=True).returncode:
        raise FileNotFoundError(f"commit {pr['commit']} (PR #{number}) is not in {mirror}")
    folder = side / f"pr{number}"
    if not (folder / pr["file"]).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(git + ["archive", pr["commit"], "lxt"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    blob = subprocess.run(git + ["show", f"{pr['commit']}:{pr['file']}"], capture_output=True, check=True).stdout
    if (folder / pr["file"]).read_bytes() != blob:
        raise RuntimeError(f"{folder / pr['file']} differs from {pr['commit'][:7]}:{pr['file']}; delete {folder}")
    return {"number": number, "title": pr["title"], "commit": pr["commit"], "ref_head_now": head,
            "file": pr["file"], "file_sha256": hashlib.sha256(blob).hexdigest(), "side": str(folder),
            "url": f"https://{UPSTREAM}/pull/{number}"}


def configs(kind):
    import transformers

    dino = transformers.Dinov2Config(**HIDDEN, mlp_ratio=2, image_size=IMAGE, patch_size=PATCH, num_channels=3,
                                     initializer_range=0.1, layerscale_value=0.5, num_labels=5)
    vision = dict(**HIDDEN, intermediate_size=128, patch_size=PATCH, num_patches=GRID * GRID, num_channels=3,
                  vision_use_head=True)
    if kind.startswith("dinov2"):
        return dino
    if kind == "siglip2_vision":
        return transformers.Siglip2VisionConfig(**vision)
    text = dict(**HIDDEN, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=TEXT_LEN,
                projection_size=64, pad_token_id=0, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)
    return transformers.Siglip2Config(text_config=text, vision_config=vision)


def build(kind, seed, folder):
    """Random weights (seed), biases and LayerNorm affines perturbed, saved to ``folder``."""
    import torch

    torch.manual_seed(seed)
    model = model_class(kind)(configs(kind)).eval()
    gen = torch.Generator().manual_seed(seed + 500)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=gen))
            for pname in ("bias", "in_proj_bias"):
                b = getattr(m, pname, None)
                if isinstance(b, torch.nn.Parameter):
                    b.copy_(0.1 * torch.randn(b.shape, generator=gen))
        if hasattr(model, "logit_scale"):  # initialised to 0: a real-looking temperature and bias
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-2.0)
    model.save_pretrained(folder)


def make_inputs(kind, source, seed) -> dict:
    import numpy as np
    import torch

    if source == "random":
        gen = torch.Generator().manual_seed(seed + 1000)
        pix = torch.randn(IMAGE, IMAGE, 3, generator=gen)
    else:
        from lxt_data import load_image

        img = np.asarray(load_image("astronaut", size=IMAGE), dtype=np.float32) / 255.0  # (H, W, 3)
        if kind.startswith("dinov2"):
            mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        else:
            mean, std = np.full(3, 0.5), np.full(3, 0.5)
        pix = torch.tensor((img - mean) / std, dtype=torch.float32)
    if kind.startswith("dinov2"):
        return {"pixel_values": pix.permute(2, 0, 1)[None].tolist()}
    patches = pix.reshape(GRID, PATCH, GRID, PATCH, 3).permute(0, 2, 1, 3, 4).reshape(1, GRID * GRID, -1)
    out = {"pixel_values": patches.tolist(), "pixel_attention_mask": [[1] * GRID * GRID],
           "spatial_shapes": [[GRID, GRID]]}
    if kind == "siglip2":
        gen = torch.Generator().manual_seed(seed + 2000)
        out["input_ids"] = torch.randint(2, VOCAB - 2, (1, TEXT_LEN), generator=gen).tolist()
    return out


def like_theirs(kind, method):
    """``(entries, overrides)`` that replay the PR's differing choices on our side: table entries
    put before our table, and a layer-override dict (None: nothing to replay)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    if kind.startswith("dinov2"):
        return {}, {"*": {F.gelu: None}}  # #44: Dinov2MLP's GELU unpatched (plain gradient)
    entries, overrides = {}, {}
    if method == "attnlrp":  # #45: the pooling head's attention is CP-LRP in both maps
        from lxt.composites.table import multihead_attention

        overrides = {"*head": {nn.MultiheadAttention: multihead_attention(cp=True)}}
    if kind == "siglip2":  # #45 has no entry for Siglip2Model.forward: plain gradient through
        from transformers import Siglip2Model  # e / e.norm() and the image-text matmul

        entries = {(Siglip2Model, torch.div): None, (Siglip2Model, torch.matmul): None}
    return (entries, overrides) if entries or overrides else None


def composite(model, method, replay=None):
    """Our shipped composite; with ``replay`` (from :func:`like_theirs`) its entries before the
    model's table and its overrides."""
    import lxt
    import lxt.composites

    if replay is None:
        return getattr(lxt.composites, method)(model)
    entries, overrides = replay
    if not entries:
        return getattr(lxt.composites, method)(model, overrides=overrides)
    family = lxt.composites.family_of(model)[0]
    table = {**entries, **lxt.composites.layer_map(family, method, model=model)}
    return lxt.Composite(table, overrides, method=method.replace("_", "-"), name=f"{method}[{family}]+replay",
                         strict=lxt.composites.FAMILIES[family].strict)


def ours(kind, folder, job) -> dict:
    """Our relevance per method (and per method with the PR's choice replayed), plain input x
    gradient, and ``lxt.explain`` for the classifier."""
    import lxt
    import lxt.composites

    model = load(kind, folder)
    x, value = run(kind, model, job, lrp=False)
    rows = {"input_x_grad": {"value": value, "relevance": (x * x.grad).flatten().tolist()}}
    for method in METHODS:
        variants = {method: None}
        if like_theirs(kind, method) is not None:
            variants[f"{method}/like_theirs"] = like_theirs(kind, method)
        for key, replay in variants.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                comp = composite(model, method, replay)
                with comp.context(model):
                    x, value = run(kind, model, job, lrp=True)
            rows[key] = {"value": value, "relevance": x.grad.flatten().tolist(), "composite": comp.name,
                         "warnings": sorted({str(w.message).splitlines()[0][:200] for w in caught})}
        if kind == "dinov2_cls":
            exp = lxt.explain(model, None, tensors(job)["pixel_values"].detach(), target=job["target"],
                              method=method.replace("_", "-"))
            rows[f"{method}/explain"] = {"value": rows[method]["value"], "pixel": exp.relevance.flatten().tolist()}
    return rows


def pearson(a, b) -> float:
    """Per-element Pearson r (``benchmarks/published_families.py``'s, one formula for both)."""
    return sibling("published_families").pearson(a, b)


def shaped(kind, flat):
    import torch

    shape = (1, 3, IMAGE, IMAGE) if kind.startswith("dinov2") else (1, GRID * GRID, PATCH * PATCH * 3)
    return torch.tensor(flat, dtype=torch.float64).reshape(shape)


def compare(kind, mine, theirs) -> dict:
    a_patch, a_pix = per_pixel(kind, shaped(kind, mine["relevance"]))
    b_patch, b_pix = per_pixel(kind, shaped(kind, theirs["relevance"]))
    return {"r_patch": pearson(a_patch, b_patch), "r_pixel": pearson(a_pix, b_pix),
            "sum_ratio": sum(b_pix) / sum(a_pix), "ours_sum_over_value": sum(a_pix) / mine["value"],
            "theirs_sum_over_value": sum(b_pix) / theirs["value"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    import torch
    import transformers

    torch.set_num_threads(1)
    quiet()
    mirror, side = Path(args.mirror), Path(args.side).resolve()
    if not mirror.is_dir():
        sys.exit(f"no mirror of {UPSTREAM} at {mirror} (fetch it; give --mirror)")
    if side.is_relative_to(REPO):
        sys.exit(f"--side {side} is inside this repository; use a folder outside it")
    extra = [str(Path(f).resolve()) for f in args.child_path.split(os.pathsep) if f]

    def child_env(side_folder):
        return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
            filter(None, [side_folder, *extra, os.environ.get("PYTHONPATH")])))

    child_python = subprocess.run([args.python, "-P", "-c", "import torch, transformers; print(transformers.__version__, "
                                   "torch.__version__)"], env=child_env(None), capture_output=True, text=True,
                                  check=True).stdout.split()
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "python": platform.python_version(),
               "torch": torch.__version__, "transformers": transformers.__version__, "threads": 1,
               "child": {"python": args.python, "path": extra, "transformers": child_python[0], "torch": child_python[1]},
               "attn_implementation": "sdpa", "seeds": list(range(args.seeds)), "upstream": UPSTREAM,
               "models": {"image": IMAGE, "patch": PATCH, "patches": GRID * GRID, **HIDDEN},
               "prs": {}, "summary": {}}
    table = []
    for number in args.prs:
        info = extract(mirror, side, number)
        info["unshimmed"] = unshimmed_errors(child_env(info["side"]), args.python)
        with tempfile.TemporaryDirectory(prefix=f"lxt-pr{number}-") as tmp:
            jobs, mine = [], {}
            for kind in PRS[number]["models"]:
                for seed in range(args.seeds):
                    folder = Path(tmp) / f"{kind}-{seed}"
                    build(kind, seed, folder)
                    for source in INPUTS:
                        job = {"id": f"{kind}/{source}/{seed}", "kind": kind, "folder": str(folder),
                               "inputs": make_inputs(kind, source, seed)}
                        if kind == "dinov2_cls":
                            with torch.no_grad():
                                logits = load(kind, folder)(**tensors(job)).logits
                            job["target"] = int(logits.argmax())
                        if kind in ("dinov2", "siglip2_vision"):
                            gen = torch.Generator().manual_seed(123 + seed)
                            job["readout"] = torch.randn(64, generator=gen).tolist()
                        mine[job["id"]] = ours(kind, folder, job)
                        job["value"] = mine[job["id"]]["input_x_grad"]["value"]  # checked by the child
                        jobs.append(job)
            spec = {"pr": number, "side": info["side"], "jobs": jobs, "out": str(Path(tmp) / "published.json")}
            (Path(tmp) / "spec.json").write_text(json.dumps(spec))
            if subprocess.run([args.python, "-P", str(Path(__file__).resolve()), "--child", "--spec",
                               str(Path(tmp) / "spec.json")], env=child_env(info["side"])).returncode != 0:
                sys.exit(f"the published child process (PR #{number}) failed")
            theirs = json.loads(Path(spec["out"]).read_text())
        info.update({k: theirs[k] for k in ("module", "patched", "patch_warnings")})
        info["unshimmed"].update(theirs["unshimmed"])
        info["runs"] = {}
        for job in jobs:
            kind, source, seed = job["id"].split("/")
            for key, row in mine[job["id"]].items():
                method = key.split("/")[0]
                if key == "input_x_grad" or key.endswith("/explain"):
                    continue
                other = theirs["rows"][job["id"]][method]
                cell = info["runs"].setdefault(f"{kind}/{source}/{key}", [])
                if "error" in other:
                    cell.append({"seed": int(seed), "error": other["error"]})
                    continue
                c = compare(kind, row, other)
                c["seed"] = int(seed)
                c["ours_composite"] = row["composite"]
                if row["warnings"]:
                    c["ours_warnings"] = row["warnings"]
                c["r_pixel_ours_vs_input_x_grad"] = compare(kind, row, mine[job["id"]]["input_x_grad"])["r_pixel"]
                if key == method and f"{method}/explain" in mine[job["id"]]:
                    ex = mine[job["id"]][f"{method}/explain"]["pixel"]
                    c["r_pixel_explain_vs_composite"] = pearson(ex, per_pixel(kind, shaped(kind, row["relevance"]))[1])
                cell.append(c)
        for name, cells in info["runs"].items():
            ok = [c for c in cells if "error" not in c]
            med = {k: statistics.median(c[k] for c in ok)
                   for k in ("r_patch", "r_pixel", "sum_ratio", "r_pixel_ours_vs_input_x_grad")} if ok else {}
            if ok and "r_pixel_explain_vs_composite" in ok[0]:
                med["r_pixel_explain_vs_composite"] = min(c["r_pixel_explain_vs_composite"] for c in ok)
            med.update({"seeds": len(ok), "errors": sorted({c["error"] for c in cells if "error" in c})})
            results["summary"][f"#{number} {name}"] = med
            table.append((f"#{number}", *name.split("/", 2), med))
        results["prs"][str(number)] = info
    print(f"ours vs the published lxt's open PRs ({UPSTREAM}); tiny random float32 encoders, sdpa, "
          f"median of {args.seeds} seeds; r = Pearson of per-patch / per-pixel relevance; "
          f"ratio = sum(theirs) / sum(ours)")
    print(f"{'PR':4s} {'model':15s} {'input':7s} {'method':22s} {'r patch':>9s} {'r pixel':>9s} {'ratio':>8s} "
          f"{'r(ours, x*grad)':>16s}")
    for pr, kind, source, method, med in table:
        if med.get("errors"):
            print(f"{pr:4s} {kind:15s} {source:7s} {method:22s} published failed: {med['errors'][0]}")
            continue
        print(f"{pr:4s} {kind:15s} {source:7s} {method:22s} {med['r_patch']:9.5f} {med['r_pixel']:9.5f} "
              f"{med['sum_ratio']:8.4f} {med['r_pixel_ours_vs_input_x_grad']:16.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
