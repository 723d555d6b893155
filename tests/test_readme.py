"""Every ```python block of README.md runs as written, in order, in one namespace (tiny
stand-ins replace the real models), and every command-line example parses."""
import shlex
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import lxt_data
from lxt.cli import _parser
from models import WORDS, tiny_llama, tiny_tokenizer, tiny_vit

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language):
    """The fenced blocks of README.md whose info string is ``language`` ("" for none)."""
    found, current, lang = [], None, None
    for line in README.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if lang == language:
                    found.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return found


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    """``load_smollm2`` -> a tiny Llama with a lower-casing word tokenizer; ``train_digits_vit``
    -> a tiny ViT and a few random images; files are written in a temporary folder."""
    # case kept (inseq checks that a generation starts with the prompt as written)
    tok = tiny_tokenizer(words=[*WORDS, "london", "italy", "The", "France", "Italy", "Paris", "London"])
    monkeypatch.setattr(lxt_data, "load_smollm2", lambda *a, **k: (tiny_llama(), tok))
    digits = types.SimpleNamespace(test_pixel_values=torch.rand(4, 3, 16, 16),
                                   test_labels=torch.zeros(4, dtype=torch.long))
    monkeypatch.setattr(lxt_data, "train_digits_vit", lambda *a, **k: (tiny_vit(), digits))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_python_blocks_run(stand_ins, capsys):
    code = blocks("python")
    assert len(code) == 9, "README.md python blocks changed: update this test"
    sys.path.insert(0, str(Path(__file__).parent / "vlm_builders"))
    import clip_siglip_dinov2
    from test_vlm import tiny_llava, tiny_llava_processor

    # the image-text block's vlm and processor: a tiny LLaVA (no VLM ships offline), its CLIP a tiny
    # CLIPModel with its processor
    namespace = {"__name__": "readme", "vlm": tiny_llava(), "processor": tiny_llava_processor(),
                 "clip": clip_siglip_dinov2.tiny_clip(), "clip_processor": clip_siglip_dinov2.tiny_clip_processor()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, block in enumerate(code):
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
            if i == 1:  # inseq: one column per generated token
                assert namespace["out"].sequence_attributions[0].target_attributions.shape[1] == 3
            if i == 2:  # captum: the convergence delta is what biases absorbed
                assert namespace["delta"].shape == (1,)
            if i == 3:  # a VLM: the image tokens as one entry, relevance per pixel
                assert namespace["exp"].tokens[0] == "<image>"
                assert namespace["exp"].image_relevance.shape == (16, 16)
                assert len(namespace["answer"]) == 3 and namespace["pair"].contrast == "a photo of a dog"
            if i == 4:  # the composite example: per-token relevance of "The capital of France is"
                assert namespace["relevance"].shape == (1, 5)
            if i == 6:  # nn.MultiheadAttention in a hand-written model
                assert namespace["token_relevance"].shape == (1, 8)
                assert "forward" not in namespace["encoder"].__dict__
    lxt_warnings = [str(w.message) for w in caught if str(w.message).startswith("lxt:")]
    assert not lxt_warnings, lxt_warnings  # e.g. no operation left without a rule
    out = capsys.readouterr().out
    assert "(no model)" not in out and "on LlamaForCausalLM" in out  # summaries printed while registered
    assert (stand_ins / "out.html").is_file() and (stand_ins / "out.png").is_file()
    assert namespace["comp"].model is None  # the README removes what it registers
    assert namespace["report"].calls  # the conservation report saw the rule call


def test_readme_command_lines_parse():
    lines = [ln.strip() for block in blocks("") for ln in block.splitlines() if ln.strip().startswith("lxt ")]
    assert len(lines) >= 4
    parser = _parser()
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])
        assert args.command == "explain", line
