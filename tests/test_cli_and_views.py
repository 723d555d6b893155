"""User-facing edges of the views (PNG text drawn literally), of the published names that are
gone (one line naming the replacement), and of the command line's outputs (what --jsonl may
replace, a torn or hand-edited corpus output, a prompt given with --file)."""
import importlib
import json
from pathlib import Path

import pytest
import torch

import lxt.cli
from lxt import corpus
from lxt.cli import main
from lxt.explain import Explanation

#: cheap for the corpus tests (no composite trace); the resume logic does not depend on it
METHOD = "input_x_gradient"
DOLLARS = ["the", "$$", "cat", "$", "x", "$x$", "\\frac{a}{b}"]


def one_line_error(capsys, rc):
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lxt: error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------ PNG: text drawn literally
def drawn_texts(monkeypatch):
    """Every matplotlib Text of the figures saved from now on, as (text, parse_math, usetex)."""
    from matplotlib.figure import Figure

    seen = []
    real = Figure.savefig

    def recording(fig, *a, **kw):
        out = real(fig, *a, **kw)  # drawn first: a mathtext or LaTeX failure raises here
        seen.extend((t.get_text(), t.get_parse_math(), t.get_usetex())
                    for ax in fig.axes for t in [*ax.texts, ax.title])
        return out

    monkeypatch.setattr(Figure, "savefig", recording)
    return seen


@pytest.mark.parametrize("usetex", [False, True])
def test_png_draws_dollar_signs_in_tokens_and_title_as_they_are(tmp_path, monkeypatch, usetex):
    """`$$` made mathtext raise and `$x$` was drawn as math (tokens and the title's target);
    a matplotlibrc with text.usetex would hand them to LaTeX.  Now every text is literal."""
    import matplotlib

    seen = drawn_texts(monkeypatch)
    exp = Explanation(tokens=DOLLARS, relevance=torch.linspace(-1, 1, len(DOLLARS)), target="$$",
                      target_id=3, logit=1.5, method="attnlrp", contrast="$y$")
    img = Explanation(tokens=None, relevance=torch.randn(4, 4), target="$x$", target_id=0, logit=0.5,
                      method="attnlrp", image=torch.rand(3, 4, 4))
    with matplotlib.rc_context({"text.usetex": usetex}):
        for e, name in ((exp, "t.png"), (img, "i.png")):
            assert open(e.to_png(str(tmp_path / name)), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    texts = [t for t, _, _ in seen]
    assert all(tok in texts for tok in DOLLARS)
    assert any("'$$' vs '$y$'" in t for t in texts) and "attnlrp: class $x$" in texts
    assert all(not parse_math and not tex for t, parse_math, tex in seen if t), seen


def test_terminal_and_html_show_control_characters_as_escapes():
    """A token holding a terminal escape or a carriage return is shown, not acted on."""
    from lxt import viz

    exp = Explanation(tokens=["the", "\x1b[2J", "a\rb", "\x85"], relevance=torch.tensor([1.0, -1, 0.5, 0]),
                      target="x", target_id=3, logit=1.0, method="attnlrp")
    text = viz.terminal(exp)
    assert "\x1b[2J" not in text and "\r" not in text and "\x85" not in text
    assert "\\x1b[2J" in text and "a\\rb" in text and "\\x85" in text
    assert "\\x1b[2J" in viz.html_fragment(exp)


@pytest.fixture(scope="module")
def dollar_model_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer has `$$` and `$` as tokens."""
    from models import WORDS, tiny_llama, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny-dollar")
    tiny_llama("sdpa", torch.float32).save_pretrained(d)
    tiny_tokenizer(words=[*WORDS, "$$", "$"]).save_pretrained(d)
    return d


def test_cli_png_of_a_prompt_with_dollar_tokens(dollar_model_dir, tmp_path, capsys, monkeypatch):
    seen = drawn_texts(monkeypatch)
    png = tmp_path / "o.png"
    rc = main(["explain", "the $$ cat $x$", "--model", str(dollar_model_dir), "--target", "$$",
               "--method", METHOD, "--png", str(png), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert png.read_bytes()[:4] == b"\x89PNG"
    texts = [t for t, _, _ in seen]
    assert texts.count("$$") == 1 and texts.count("$") == 2 and any("'$$'" in t for t in texts)
    assert all(not parse_math and not tex for t, parse_math, tex in seen if t)


# ------------------------------------------------------------------ published names that are gone
@pytest.mark.parametrize("statement,names", [
    ("from lxt.explicit.models.llama import LlamaForCausalLM, attnlrp",
     ["lxt.explicit.models", "lxt.composites.attnlrp(model)", "transformers.LlamaForCausalLM"]),
    ("import lxt.explicit.models.bert", ["lxt.composites.attnlrp(model)"]),
    ("import lxt.explicit.models", ["lxt.composites.attnlrp(model)", "cp_lrp"]),
    ("from lxt.utils import pdf_heatmap, clean_tokens",
     ["clean_tokens", "pdf_heatmap", ".tokens", ".to_png(path)", ".to_html(path)"]),
    ("import lxt.utils", ["Explanation"]),
])
def test_published_explicit_models_and_utils_say_what_replaces_them(statement, names):
    with pytest.raises(ImportError) as info:
        exec(statement, {})
    message = str(info.value)
    assert message.startswith("lxt: ") and "\n" not in message and "docs/migration.md" in message
    for name in names:
        assert name in message


def test_migration_page_lists_explicit_models_and_utils():
    page = (Path(__file__).resolve().parents[1] / "docs" / "migration.md").read_text(encoding="utf-8")
    rows = [ln for ln in page.splitlines() if ln.startswith("| `lxt.")]
    assert any("lxt.explicit.models" in r and "lxt.composites.attnlrp(model)" in r for r in rows)
    assert any("lxt.utils.clean_tokens" in r and "Explanation.to_png" in r for r in rows)


# ------------------------------------------------------------------ command line outputs
def write_prompts(path, n=6):
    words = "the capital of france is paris a cat sat on mat and dog ran in park".split()
    lines = [" ".join(words[(3 * i + j) % len(words)] for j in range(3 + i % 4)) for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def run_file(model_dir, file, out, *extra):
    return main(["explain", "--file", str(file), "--model", str(model_dir), "--jsonl", str(out),
                 "--quiet", "--method", METHOD, *extra])


def test_prompt_together_with_file_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    file = tmp_path / "p.txt"
    file.write_text("the cat\n")
    monkeypatch.setattr(lxt.cli, "_load", lambda *a: pytest.fail("the model was loaded"))
    rc = main(["explain", "the dog", "--file", str(file), "--jsonl", str(tmp_path / "o.jsonl")])
    err = one_line_error(capsys, rc)
    assert "give a prompt or --file, not both" in err and "'the dog'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


def test_single_prompt_jsonl_never_replaces_a_file_job_output(model_dir, tmp_path, capsys, monkeypatch):
    """A single prompt's --jsonl replaces an earlier single-prompt output, nothing else: not a
    --file job's output, not its unfinished parts, not a file that is not lxt's; refused in
    one line before the model loads, with nothing written (--html neither)."""
    file, out = tmp_path / "p.txt", tmp_path / "o.jsonl"
    write_prompts(file)
    assert run_file(model_dir, file, out) == 0
    job = out.read_bytes()
    single = tmp_path / "s.jsonl"
    assert main(["explain", "the cat", "--model", str(model_dir), "--method", METHOD, "--quiet",
                 "--jsonl", str(single)]) == 0
    capsys.readouterr()
    load = lxt.cli._load
    monkeypatch.setattr(lxt.cli, "_load", lambda *a: pytest.fail("the model was loaded"))
    html = tmp_path / "o.html"

    def refused(target):
        rc = main(["explain", "the dog", "--model", str(model_dir), "--method", METHOD, "--quiet",
                   "--jsonl", str(target), "--html", str(html)])
        err = one_line_error(capsys, rc)
        assert f"--jsonl {target}" in err and "give another" in err
        assert not html.exists()
        return err

    assert "is the output of a --file job" in refused(out)
    assert out.read_bytes() == job
    parted = tmp_path / "u.jsonl"
    corpus.parts_dir(parted).mkdir()
    (corpus.parts_dir(parted) / "rank0.jsonl").write_bytes(job[: len(job) // 2])
    assert "unfinished --file job" in refused(parted)
    assert not parted.exists()
    assert "is not the output of an earlier single-prompt" in refused(file)
    assert file.read_text().startswith("the capital")

    monkeypatch.setattr(lxt.cli, "_load", load)  # an earlier single-prompt output: replaced
    assert main(["explain", "the dog", "--model", str(model_dir), "--method", METHOD, "--quiet",
                 "--jsonl", str(single)]) == 0
    (rec,) = [json.loads(x) for x in single.read_text().splitlines()]
    assert rec["prompt"] == "the dog"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left


def test_torn_last_line_of_the_output_is_dropped_and_the_job_resumed(model_dir, tmp_path, capsys,
                                                                      monkeypatch):
    """The final file cut mid-line (a kill, a full disk): its complete records are kept, the
    torn line dropped (said on stderr) and only its prompt explained again."""
    explain_module = importlib.import_module("lxt.explain")
    file, out = tmp_path / "p.txt", tmp_path / "o.jsonl"
    lines = write_prompts(file)
    assert run_file(model_dir, file, out) == 0
    full = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(full[:5]) + full[5][:37], encoding="utf-8")
    capsys.readouterr()
    explained = []
    real = explain_module.explain

    def counting(model, tok, prompts, **kw):
        explained.extend(prompts)
        return real(model, tok, prompts, **kw)

    monkeypatch.setattr(explain_module, "explain", counting)
    assert run_file(model_dir, file, out) == 0
    err = capsys.readouterr().err
    assert f"{out} line 6 is incomplete" in err and "dropped its 37 bytes" in err, err
    assert f"resuming {out}: 5 of 6 done" in err
    assert explained == [lines[5]]
    got = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["key"] for r in got] == [json.loads(x)["key"] for x in full]
    assert out.read_text(encoding="utf-8").splitlines(keepends=True)[:5] == full[:5]  # kept as they were


@pytest.mark.parametrize("where", ["output", "part"])
@pytest.mark.parametrize("field", ["prompt", "options"])
def test_hand_edited_record_is_refused_naming_its_line(model_dir, tmp_path, capsys, where, field):
    """A record whose prompt (or options) was edited keeps its key: it must not count as done."""
    file, out = tmp_path / "p.txt", tmp_path / "o.jsonl"
    write_prompts(file)
    assert run_file(model_dir, file, out) == 0
    recs = out.read_text(encoding="utf-8").splitlines(keepends=True)
    rec = json.loads(recs[1])
    if field == "prompt":
        rec["prompt"] = "the big red dog"
    else:
        rec["options"] = {**rec["options"], "method": "gradient"}
    recs[1] = json.dumps(rec) + "\n"
    if where == "output":
        target, line = out, 2
        out.write_text("".join(recs), encoding="utf-8")
    else:  # an unfinished job: records 1-2 in rank 0's part file, no final file yet
        target, line = corpus.parts_dir(out) / "rank0.jsonl", 2
        target.parent.mkdir()
        target.write_text("".join(recs[:2]), encoding="utf-8")
        out.unlink()
    before = target.read_bytes()
    capsys.readouterr()
    err = one_line_error(capsys, run_file(model_dir, file, out))
    assert f"{target} line {line} does not match its own key" in err
    assert "not the output of this job" in err and "delete that line" in err
    assert target.read_bytes() == before
    assert where == "output" or not out.exists()
