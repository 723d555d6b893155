"""lxt.explain, the heatmaps and the command line."""
import html.parser
import json
import math

import pytest
import torch

import lxt
from lxt import viz
from lxt.cli import main
from models import tiny_bert, tiny_llama, tiny_tokenizer, tiny_vit
from test_composite import assert_restored, snapshot

PROMPTS = ["the capital of france is", "a cat sat on the mat and", "the dog ran"]


@pytest.fixture(scope="module")
def llm():
    return tiny_llama("sdpa", torch.float32), tiny_tokenizer()


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp", "input_x_gradient", "gradient"])
def test_each_method_returns_an_explanation_and_leaves_the_model(llm, method):
    model, tok = llm
    snap = snapshot(model)
    exp = lxt.explain(model, tok, PROMPTS[0], method=method)
    assert exp.tokens == ["the", "capital", "of", "france", "is"]
    assert exp.relevance.shape == (5,) and torch.isfinite(exp.relevance).all()
    logits = model(**tok(PROMPTS[0], return_tensors="pt")).logits[0, -1]
    assert exp.target_id == int(logits.argmax())
    assert math.isclose(exp.logit, float(logits.max()), rel_tol=1e-5)
    assert exp.method == method
    if method == "gradient":
        assert (exp.relevance >= 0).all()
    assert_restored(model, snap)


def test_target_and_contrast(llm):
    model, tok = llm
    exp = lxt.explain(model, tok, PROMPTS[0], target=" paris", contrast=" berlin")
    logits = model(**tok(PROMPTS[0], return_tensors="pt")).logits[0, -1]
    pid, bid = tok.convert_tokens_to_ids(["paris", "berlin"])
    assert exp.target_id == pid
    assert math.isclose(exp.logit, float(logits[pid] - logits[bid]), rel_tol=1e-5)


def test_contrast_relevance_sums_to_the_difference():
    """CP-LRP conserves: relevance of a logit difference sums to the difference (not to 0)."""
    model = tiny_llama("sdpa", torch.float64)
    tok = tiny_tokenizer()
    exp = lxt.explain(model, tok, PROMPTS[0], target=" paris", contrast=" berlin", method="cp-lrp")
    assert abs(exp.logit) > 1e-3
    assert math.isclose(float(exp.relevance.sum()), exp.logit, rel_tol=1e-3)


def test_cp_lrp_relevance_sums_to_explained_value():
    model = tiny_llama("sdpa", torch.float64)
    tok = tiny_tokenizer()
    exp = lxt.explain(model, tok, PROMPTS[1], method="cp-lrp")
    # CP-LRP on a bias-free Llama conserves up to the epsilon stabilisers
    assert math.isclose(float(exp.relevance.sum()), exp.logit, rel_tol=1e-3)


@pytest.mark.parametrize("method", ["attnlrp", "input_x_gradient"])
def test_batch_equals_single(llm, method):
    model, tok = llm
    batch = lxt.explain(model, tok, PROMPTS, method=method, batch_size=2)
    assert len(batch) == 3
    for prompt, b in zip(PROMPTS, batch):
        single = lxt.explain(model, tok, prompt, method=method)
        assert b.tokens == single.tokens and b.target_id == single.target_id
        torch.testing.assert_close(b.relevance, single.relevance, rtol=1e-4, atol=1e-5)


def test_registered_composite_is_reused_without_retrace(llm):
    model, tok = llm
    comp = lxt.composites.attnlrp(model)
    with comp.context(model):
        a = lxt.explain(model, tok, PROMPTS[0], composite=comp)
        b = lxt.explain(model, tok, PROMPTS[1], composite=comp)
        graphs = len(comp._capture.graphs)
        assert comp.model is model  # still registered after the calls
    assert graphs == 1
    torch.testing.assert_close(a.relevance, lxt.explain(model, tok, PROMPTS[0]).relevance, rtol=1e-5, atol=1e-6)
    assert b.tokens[1] == "cat"


def test_integrated_gradients_formula(llm):
    """Midpoint rule from a zero baseline: with 2 steps, x * mean(grad(x/4), grad(3x/4))."""
    model, tok = llm
    exp = lxt.explain(model, tok, PROMPTS[2], method="integrated_gradients", steps=2)
    ids = tok(PROMPTS[2], return_tensors="pt").input_ids
    emb = model.get_input_embeddings()(ids).detach()
    grads = []
    for a in (0.25, 0.75):
        x = (emb * a).requires_grad_()
        model(inputs_embeds=x).logits[0, -1, exp.target_id].backward()
        grads.append(x.grad)
    expected = (emb * (grads[0] + grads[1]) / 2).sum(-1)[0]
    torch.testing.assert_close(exp.relevance, expected, rtol=1e-4, atol=1e-6)


def test_latent_relevance(llm):
    model, tok = llm
    exp = lxt.explain(model, tok, PROMPTS[0], layers=["model.layers.*.mlp"])
    assert sorted(exp.latent) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert exp.latent["model.layers.0.mlp"].shape == (5, 32)
    with pytest.raises(ValueError, match="matches no module"):
        lxt.explain(model, tok, PROMPTS[0], layers=["model.nothing.*"])


def test_generate_explains_each_token(llm):
    model, tok = llm
    exps = lxt.explain(model, tok, PROMPTS[2], generate=2)
    assert len(exps) == 2
    assert len(exps[1].tokens) == len(exps[0].tokens) + 1


def test_classifier_and_image():
    bert = tiny_bert("sdpa", torch.float32)
    exp = lxt.explain(bert, tiny_tokenizer(), PROMPTS[0], target=2)
    assert exp.target == 2 and exp.relevance.shape == (5,)
    vit = tiny_vit("sdpa", torch.float32)
    img = torch.randn(3, 16, 16)
    exp = lxt.explain(vit, None, img)
    assert exp.tokens is None and exp.relevance.shape == (16, 16)
    assert exp.target_id == int(vit(pixel_values=img[None]).logits.argmax())


@pytest.mark.parametrize("kwargs,match", [
    (dict(inputs="   "), "empty prompt"),
    (dict(inputs="the dog", target=" paris berlin"), "2 tokens"),
    (dict(inputs="the dog", method="shap"), "unknown method"),
    (dict(inputs="the dog " * 40), "longer than the model's context"),
])
def test_bad_input_is_a_clear_error(llm, kwargs, match):
    model, tok = llm
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lxt.explain(model, tok, **kwargs)
    assert_restored(model, snap)


class _Spans(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.spans, self._open = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "span":
            self._open = dict(attrs)

    def handle_data(self, data):
        if self._open is not None:
            self.spans.append((data, self._open))

    def handle_endtag(self, tag):
        if tag == "span":
            self._open = None


def test_html_tokens_and_colours_match_relevance(llm, tmp_path):
    model, tok = llm
    exp = lxt.explain(model, tok, PROMPTS[1])
    page = exp.to_html(str(tmp_path / "e.html"))
    assert page.startswith("<!DOCTYPE html>") and (tmp_path / "e.html").read_text() == page
    p = _Spans()
    p.feed(page)
    assert [t for t, _ in p.spans] == exp.tokens
    scale = float(exp.relevance.abs().max())
    for (t, attrs), r in zip(p.spans, exp.relevance.tolist()):
        assert math.isclose(float(attrs["data-relevance"]), r, rel_tol=1e-5, abs_tol=1e-9)
        rgb = tuple(int(v) for v in attrs["style"].split("rgb(")[1].rstrip(")").split(","))
        assert rgb == viz.colour(r, scale)
        if r > 0:
            assert rgb[0] == 255 and rgb[2] <= 255
        if r < 0:
            assert rgb[2] == 255
    biggest = int(exp.relevance.abs().argmax())
    assert p.spans[biggest][1]["style"].endswith(("rgb(255, 0, 0)", "rgb(0, 0, 255)"))


def test_png_and_terminal(llm, tmp_path):
    model, tok = llm
    exp = lxt.explain(model, tok, PROMPTS[0])
    path = exp.to_png(str(tmp_path / "e.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = viz.terminal(exp)
    assert "\x1b[48;2;" in text and "capital" in text
    img = lxt.explain(tiny_vit(), None, torch.randn(3, 16, 16))
    assert open(img.to_png(str(tmp_path / "i.png")), "rb").read(4) == b"\x89PNG"


# ------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llm")
    tiny_llama("sdpa", torch.float32).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_cli_explain_writes_files(model_dir, tmp_path, capsys):
    rc = main(["explain", "the capital of france is", "--model", str(model_dir), "--target", " paris",
               "--html", str(tmp_path / "o.html"), "--png", str(tmp_path / "o.png"),
               "--jsonl", str(tmp_path / "o.jsonl")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "heatmap (HTML)" in out and "paris" in out
    rec = json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])
    assert rec["tokens"] == ["the", "capital", "of", "france", "is"] and rec["target"] == "paris"


def test_cli_file_of_prompts(model_dir, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(PROMPTS) + "\n\n")
    rc = main(["explain", "--file", str(f), "--model", str(model_dir), "--method", "cp-lrp",
               "--jsonl", str(tmp_path / "o.jsonl"), "--quiet"])
    assert rc == 0
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("argv,msg", [
    (["explain"], "give a prompt"),
    (["explain", ""], "empty prompt"),
    (["explain", "x", "--method", "shap"], "unknown method"),
    (["explain", "x", "--model", "/no/such/model"], "model not found"),
    (["explain", "--file", "/no/such/file.txt"], "cannot read"),
])
def test_cli_errors_are_one_line(argv, msg, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("lxt: error:") and msg in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_cli_target_not_single_token(model_dir, capsys):
    rc = main(["explain", "the dog", "--model", str(model_dir), "--target", " paris berlin"])
    err = capsys.readouterr().err
    assert rc == 2 and "not one" in err and len(err.strip().splitlines()) == 1


def test_cli_help_documents_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["explain", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--target", "--model", "--method", "--generate", "--file", "--jsonl", "--html", "--png"):
        assert flag in out


@pytest.mark.slow
def test_demo_model_end_to_end(tmp_path, capsys):
    """make demo's job: SmolLM2, 'The capital of France is' -> ' Paris', France relevant."""
    rc = main(["explain", "The capital of France is", "--html", str(tmp_path / "d.html")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "' Paris'" in out and "France" in out
