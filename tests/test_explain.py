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
from helpers import assert_restored, forward_refused, snapshot

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


def test_registered_composite_is_reused_as_it_is(llm):
    model, tok = llm
    comp = lxt.composites.attnlrp(model)
    with comp.context(model):
        a = lxt.explain(model, tok, PROMPTS[0], composite=comp)
        ops = len(comp.captured_ops)
        b = lxt.explain(model, tok, PROMPTS[1], composite=comp)
        assert comp.model is model  # still registered after the calls
        assert comp.summary().calls == 2 and len(comp.captured_ops) == ops  # nothing new to learn
        assert not comp._dispatcher.learning
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
    # one record per line, a blank line too (an error record): records line up with lines
    recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["index"] for r in recs] == [1, 2, 3, 4] and [r["prompt"] for r in recs] == PROMPTS + [""]
    assert [r["error"] for r in recs] == [None, None, None, "empty prompt"]


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


# ------------------------------------------------------------------ no silent wrong answers
BASELINES = ["gradient", "input_x_gradient", "integrated_gradients"]


@pytest.mark.parametrize("engine", ["gradient", "explicit"])
def test_baselines_inside_a_registration_are_computed_on_the_plain_model(llm, engine):
    model, tok = llm
    plain = {m: lxt.explain(model, tok, PROMPTS[0], method=m, steps=2).relevance for m in BASELINES}
    comp = lxt.Composite(lxt.composites.layer_map("llama"), engine=engine, method="attnlrp")
    snap = snapshot(model)
    with comp.context(model):
        lrp = lxt.explain(model, tok, PROMPTS[0]).relevance  # uses the registration
        calls = comp.summary().calls
        for m in BASELINES:
            exp = lxt.explain(model, tok, PROMPTS[0], method=m, steps=2)
            assert exp.method == m
            torch.testing.assert_close(exp.relevance, plain[m], rtol=0, atol=0)
        assert comp.model is model and comp.summary().calls == calls  # not run through it
        torch.testing.assert_close(lxt.explain(model, tok, PROMPTS[0]).relevance, lrp, rtol=0, atol=0)
        assert comp.summary().calls == calls + 1
    assert_restored(model, snap)
    assert not torch.allclose(lrp, plain["input_x_gradient"])


def test_composite_of_another_method_is_refused(llm):
    model, tok = llm
    att = lxt.composites.attnlrp(model)
    assert (att.method, lxt.composites.cp_lrp(model).method) == ("attnlrp", "cp-lrp")
    with pytest.raises(ValueError, match="method='cp-lrp', but the composite AttnLRP.* implements 'attnlrp'"):
        lxt.explain(model, tok, PROMPTS[0], method="cp-lrp", composite=att)
    with att.context(model):
        with pytest.raises(ValueError, match="implements 'attnlrp'"):
            lxt.explain(model, tok, PROMPTS[0], method="cp-lrp")
        with pytest.raises(ValueError, match="baseline.*Drop composite="):
            lxt.explain(model, tok, PROMPTS[0], method="gradient", composite=att)
        assert att.model is model


def test_composite_registered_on_another_model_is_refused(llm):
    model, tok = llm
    other = tiny_llama("sdpa", torch.float32, seed=1)
    comp = lxt.composites.attnlrp(other)
    snap = snapshot(model)
    with comp.context(other):
        with pytest.raises(ValueError, match="registered on another model.*one model at a time"):
            lxt.explain(model, tok, PROMPTS[0], composite=comp)
        assert comp.model is other and "forward" in other.__dict__  # other stays registered
    assert_restored(model, snap)


def test_masked_lm_explains_the_mask_position():
    from transformers import BertForMaskedLM

    model = tiny_bert("sdpa", torch.float64, cls=BertForMaskedLM)
    tok = tiny_tokenizer()
    prompt = "the capital of [MASK] is"
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt")).logits[0]
    exp = lxt.explain(model, tok, prompt)
    assert exp.tokens[3] == "[MASK]" and exp.position == 3
    assert exp.target_id == int(logits[3].argmax()) and exp.target == tok.decode([exp.target_id])
    assert math.isclose(exp.logit, float(logits[3].max()), rel_tol=1e-12)
    torch.testing.assert_close(lxt.explain(model, tok, prompt, position=3).relevance, exp.relevance)
    last = lxt.explain(model, tok, prompt, position=-1)
    assert last.position == 4 and math.isclose(last.logit, float(logits[4].max()), rel_tol=1e-12)
    for bad, match in (("the capital of france is", "no \\[MASK\\] token"), ("[MASK] of [MASK]", "2 \\[MASK\\] tokens")):
        with pytest.raises(ValueError, match=match + ".*position="):
            lxt.explain(model, tok, bad)


def test_explain_restores_each_modules_training_flag(llm):
    model, tok = llm
    model = tiny_llama("sdpa", torch.float32)
    model.train()
    model.model.layers[0].eval()
    before = {n: m.training for n, m in model.named_modules()}
    exp = lxt.explain(model, tok, PROMPTS[0], method="gradient")
    assert {n: m.training for n, m in model.named_modules()} == before
    torch.testing.assert_close(exp.relevance, lxt.explain(model.eval(), tok, PROMPTS[0], method="gradient").relevance)


def test_layers_as_one_pattern_string(llm):
    model, tok = llm
    exp = lxt.explain(model, tok, PROMPTS[0], layers="model.layers.*.mlp")
    assert sorted(exp.latent) == ["model.layers.0.mlp", "model.layers.1.mlp"]


@pytest.fixture
def model_never_runs(llm):
    """The tiny LLM with a hook that fails if the model computes anything."""
    model, tok = llm
    with forward_refused(model):
        yield model, tok


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(method="integrated_gradients", steps=0), ValueError, "steps must be an integer >= 1, got 0"),
    (dict(method="integrated_gradients", steps=2.5), TypeError, "steps must be an integer"),
    (dict(generate=-2), ValueError, "generate must be an integer >= 0"),
    (dict(inputs=PROMPTS, batch_size=-1), ValueError, "batch_size must be an integer >= 1"),
    (dict(inputs=PROMPTS, batch_size=0), ValueError, "batch_size must be an integer >= 1"),
    (dict(inputs=PROMPTS, batch_size="2"), TypeError, "batch_size must be an integer"),
    (dict(inputs={"the cat": 1}), TypeError, "inputs must be a prompt"),
    (dict(inputs=123), TypeError, "inputs must be a prompt"),
    (dict(inputs=torch.ones(1, 2, 3, dtype=torch.long)), TypeError, "torch.int64 tensor of shape"),  # 2-D ids are a batch
    (dict(inputs=torch.randn(3, 16, 16)), TypeError, "takes no pixel_values"),
    (dict(method=None), TypeError, "method must be a string"),
    (dict(tokenizer="tok"), TypeError, "tokenizer must be the model's tokenizer"),
    (dict(composite="attnlrp"), TypeError, "composite must be an lxt.Composite.*method="),
    (dict(inputs=PROMPTS, generate=2), ValueError, "generate= continues one prompt; got a list of 3"),
    (dict(generate=2, target=" paris"), ValueError, "takes no target="),
    (dict(generate=2, contrast=" paris"), ValueError, "takes no target=, contrast="),
    (dict(inputs="the dog " * 30, generate=10), ValueError, "needs 69, more than the model's context of 64.*generate=5"),
    (dict(inputs=["the cat", "the dog " * 40]), ValueError, "prompt 2 'the dog the dog .*' is 80 tokens, longer"),
    (dict(position="3"), TypeError, "position must be a token index"),
    (dict(position=9), ValueError, "position=9 is outside the prompt"),
    (dict(target=" zebra"), ValueError, "not in the tokenizer's vocabulary"),
])
def test_bad_arguments_are_refused_before_the_model_runs(model_never_runs, kwargs, error, match):
    model, tok = model_never_runs
    kwargs = {"tokenizer": tok, "inputs": PROMPTS[0], **kwargs}
    with pytest.raises(error, match=match) as info:
        lxt.explain(model, **kwargs)
    assert str(info.value).startswith("lxt: ") and "\n" not in str(info.value)


def test_image_batch_is_refused():
    vit = tiny_vit("sdpa", torch.float32)
    with pytest.raises(ValueError, match="one image"):
        lxt.explain(vit, None, torch.randn(2, 3, 16, 16))


def test_explain_through_a_torch_compile_wrapper_made_before_register(llm):
    model, tok = llm
    compiled = torch.compile(model)  # made before register
    comp = lxt.composites.attnlrp(model)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    emb = model.get_input_embeddings()(ids).detach()
    rels = []
    with comp.context(model):
        for call in (model, compiled):
            x = emb.clone().requires_grad_()
            logit = call(inputs_embeds=x).logits[0, -1].max()
            logit.backward(logit)
            rels.append(x.grad.sum(-1))
        assert comp.summary().calls == 2 and comp.summary().unsafe == []
    torch.testing.assert_close(rels[1], rels[0], rtol=1e-6, atol=1e-8)


@pytest.fixture(scope="module")
def classifier_dirs(tmp_path_factory):
    from transformers import BertForMaskedLM

    out = {}
    for name, model in (("cls", tiny_bert("sdpa", torch.float32)),
                        ("mlm", tiny_bert("sdpa", torch.float32, cls=BertForMaskedLM))):
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
        out[name] = (d, model)
    return out


def test_cli_loads_the_architecture_the_folder_names(classifier_dirs, tmp_path):
    tok = tiny_tokenizer()
    d, model = classifier_dirs["cls"]  # a sequence classifier, not a language model
    assert main(["explain", PROMPTS[0], "--model", str(d), "--jsonl", str(tmp_path / "c.jsonl"), "--quiet"]) == 0
    rec = json.loads((tmp_path / "c.jsonl").read_text())
    with torch.no_grad():
        logits = model(**tok(PROMPTS[0], return_tensors="pt")).logits[0]
    assert rec["target"] == int(logits.argmax()) and math.isclose(rec["logit"], float(logits.max()), rel_tol=1e-5)
    assert main(["explain", PROMPTS[0], "--model", str(d), "--target", "1", "--jsonl", str(tmp_path / "c.jsonl"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "c.jsonl").read_text())["target"] == 1
    d, model = classifier_dirs["mlm"]
    prompt = "the capital of [MASK] is"
    assert main(["explain", prompt, "--model", str(d), "--jsonl", str(tmp_path / "m.jsonl"), "--quiet"]) == 0
    rec = json.loads((tmp_path / "m.jsonl").read_text())
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt")).logits[0, 3]
    assert rec["position"] == 3 and rec["target_id"] == int(logits.argmax())


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lxt: error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv,msg", [
    (["explain", "x", "--steps", "-3"], "--steps must be >= 1"),
    (["explain", "x", "--steps", "2.5"], "invalid int value: '2.5'"),
    (["explain", "x", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["explain", "x", "--generate", "-2"], "--generate must be >= 0"),
    (["explain", "x", "--generate", "2", "--target", " paris"], "takes no --target"),
    (["explain", "x", "--generate", "2", "--contrast", " paris"], "takes no --target, --contrast"),
    (["explain", "the cat \udcff"], "not valid UTF-8"),
    (["explain", "x", "--html", "{tmp}"], "is a directory"),
    (["explain", "x", "--png", "{tmp}/afile/o.png"], "afile is a file, not a folder"),
    (["explain", "x", "--jsonl", "/proc/lxt-no-such/o.jsonl"], "cannot write there"),
    (["explain", "--file", "{tmp}/latin1.txt"], "is not UTF-8 text (byte 0xe9"),
    (["explain", "--file", "{tmp}/two.txt", "--generate", "2"], "--generate explains one prompt at a time"),
    (["explain", "x", "--model", "{tmp}/empty"], "holds no config.json"),
])
def test_cli_bad_input_is_one_line_before_the_model_loads(argv, msg, tmp_path, capsys, monkeypatch):
    import lxt.cli

    (tmp_path / "afile").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "two.txt").write_text("the cat\nthe dog\n")
    (tmp_path / "empty").mkdir()
    if "--model" not in argv:
        monkeypatch.setattr(lxt.cli, "_load", lambda *a: pytest.fail("the model was loaded"))
    rc = main([a.format(tmp=tmp_path) for a in argv])
    assert msg in _one_line_error(capsys, rc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "empty", "latin1.txt", "two.txt"]


def test_cli_file_overlong_line_is_an_error_record_and_bom_is_not_a_token(model_dir, tmp_path, capsys):
    """In a file, a bad line is a record with an error (named on stderr), not the end of the
    job: the other lines are explained."""
    f = tmp_path / "p.txt"
    f.write_text("the cat\n\n" + "the dog " * 40 + "\n", encoding="utf-8")
    rc = main(["explain", "--file", str(f), "--model", str(model_dir), "--jsonl", str(tmp_path / "e.jsonl")])
    assert rc == 0
    err = capsys.readouterr().err
    assert f"{f} line 3: 80 tokens, longer than the model's context of 64" in err
    assert f"{f} line 2: empty prompt" in err and "Traceback" not in err
    recs = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["error"] for r in recs] == [None, "empty prompt",
                                         "80 tokens, longer than the model's context of 64"]
    assert recs[0]["tokens"] == ["the", "cat"]
    f.write_bytes(b"\xef\xbb\xbfthe capital of france is\n")  # UTF-8 with a byte-order mark
    assert main(["explain", "--file", str(f), "--model", str(model_dir), "--jsonl", str(tmp_path / "o.jsonl"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "o.jsonl").read_text())["tokens"][0] == "the"
