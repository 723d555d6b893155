"""lxt's AttnLRP and CP-LRP as methods of the real inseq (0.7.1): registered after ``import
lxt``, per step equal to ``lxt.explain(..., generate=N)``, the model plain again after each
``attribute``, non-logit targets refused, contrastive targets as explain's ``contrast=``."""
import subprocess
import sys

import pytest
import torch

import lxt
from lxt.explain import registered_composite
from models import tiny_llama, tiny_tokenizer
from helpers import assert_restored, snapshot

inseq = pytest.importorskip("inseq")

PROMPT = "the capital of france is"
GEN = {"max_new_tokens": 3, "do_sample": False}


def steps_of(out):
    """Per step, the relevance of the prefix (tokens before the step's target)."""
    seq = out.sequence_attributions[0]
    attr = seq.target_attributions  # (prefix + generated, steps), NaN where not attributed
    start = len(seq.target) - attr.shape[1]
    return [attr[:start + i, i] for i in range(attr.shape[1])], [t.token for t in seq.target[start:]]


@pytest.mark.parametrize("name, method", [("attnlrp", "attnlrp"), ("cp_lrp", "cp-lrp")])
def test_each_step_equals_explain_with_generate(name, method):
    model, tok = tiny_llama(), tiny_tokenizer()
    expected = lxt.explain(model, tok, PROMPT, generate=3, method=method)
    im = inseq.load_model(model, name, tokenizer=tok)
    out = im.attribute(PROMPT, generation_args=GEN, show_progress=False)
    steps, targets = steps_of(out)
    assert targets == [e.target for e in expected]
    for got, exp in zip(steps, expected):
        torch.testing.assert_close(got.float(), exp.relevance, rtol=1e-5, atol=1e-7)


def test_methods_are_listed_after_import_lxt_and_import_lxt_imports_no_inseq():
    code = ("import sys, lxt; assert 'inseq' not in sys.modules and 'captum' not in sys.modules;"
            " import inseq; m = inseq.list_feature_attribution_methods();"
            " assert 'attnlrp' in m and 'cp_lrp' in m, m; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_the_model_is_plain_again_after_attribute_and_after_an_error():
    model, tok = tiny_llama(), tiny_tokenizer()
    im = inseq.load_model(model, "attnlrp", tokenizer=tok)
    snap = snapshot(model)
    im.attribute(PROMPT, generation_args=GEN, show_progress=False)
    assert registered_composite(model) is None
    assert_restored(model, snap)
    with pytest.raises(ValueError, match="attributed_fn"):
        im.attribute(PROMPT, generation_args=GEN, show_progress=False, attributed_fn="probability")
    assert_restored(model, snap)
    with pytest.raises(Exception):
        im.attribute(PROMPT, generation_args=GEN, show_progress=False, attributed_fn="no such function")
    assert_restored(model, snap)


@pytest.mark.parametrize("fn", ["probability", "entropy", "perplexity"])
def test_functions_of_the_whole_distribution_are_refused_in_one_line(fn):
    im = inseq.load_model(tiny_llama(), "attnlrp", tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError) as e:
        im.attribute(PROMPT, generation_args=GEN, show_progress=False, attributed_fn=fn)
    assert "\n" not in str(e.value) and "'logit'" in str(e.value) and repr(fn) in str(e.value)


def test_logit_is_the_default_while_loaded_and_the_models_own_default_comes_back():
    im = inseq.load_model(tiny_llama(), "input_x_gradient", tokenizer=tiny_tokenizer())
    own = im.default_attributed_fn_id
    im.attribute(PROMPT, method="attnlrp", override_default_attribution=True, generation_args=GEN,
                 show_progress=False)
    assert im.default_attributed_fn_id == "logit"
    im.attribute(PROMPT, method="input_x_gradient", override_default_attribution=True, generation_args=GEN,
                 show_progress=False)
    assert im.default_attributed_fn_id == own


def test_a_contrastive_target_is_explained_as_explains_contrast():
    model, tok = tiny_llama(), tiny_tokenizer()
    im = inseq.load_model(model, "attnlrp", tokenizer=tok)
    first = lxt.explain(model, tok, PROMPT)
    rival = "paris" if first.target != "paris" else "rome"
    expected = lxt.explain(model, tok, PROMPT, target=first.target, contrast=rival)
    out = im.attribute(PROMPT, PROMPT + " " + first.target, attributed_fn="contrast_logits_diff",
                       contrast_targets=PROMPT + " " + rival, show_progress=False,
                       step_scores=["contrast_logits_diff"])
    seq = out.sequence_attributions[0]
    got = seq.target_attributions[:len(expected.tokens), 0]
    torch.testing.assert_close(got.float(), expected.relevance, rtol=1e-5, atol=1e-7)
    assert float(got.sum()) == pytest.approx(expected.relevance.sum().item(), abs=1e-6)
    assert float(seq.step_scores["contrast_logits_diff"][0]) == pytest.approx(expected.logit, abs=1e-5)


def test_convergence_delta_is_the_value_minus_the_relevance():
    model, tok = tiny_llama(), tiny_tokenizer()
    expected = lxt.explain(model, tok, PROMPT, generate=2)
    im = inseq.load_model(model, "attnlrp", tokenizer=tok)
    out = im.attribute(PROMPT, generation_args={"max_new_tokens": 2, "do_sample": False}, show_progress=False,
                       return_convergence_delta=True, step_scores=["logit"])
    seq = out.sequence_attributions[0]
    for i, e in enumerate(expected):
        assert float(seq.step_scores["logit"][i]) == pytest.approx(e.logit, abs=1e-5)
        assert float(seq.step_scores["deltas"][i]) == pytest.approx(e.logit - float(e.relevance.sum()), abs=1e-5)


def test_a_users_own_context_is_used_as_it_is_and_kept():
    model, tok = tiny_llama(), tiny_tokenizer()
    comp = lxt.composites.attnlrp(model)
    expected = lxt.explain(model, tok, PROMPT, generate=2)
    with comp.context(model):
        im = inseq.load_model(model, "attnlrp", tokenizer=tok)
        out = im.attribute(PROMPT, generation_args={"max_new_tokens": 2, "do_sample": False}, show_progress=False)
        assert registered_composite(model) is comp
    steps, _ = steps_of(out)
    for got, exp in zip(steps, expected):
        torch.testing.assert_close(got.float(), exp.relevance, rtol=1e-5, atol=1e-7)
    with comp.context(model), pytest.raises(ValueError, match="cp-lrp|attnlrp"):
        inseq.load_model(model, "cp_lrp", tokenizer=tok)


def test_inseqs_own_rendering_shows_the_relevance(capsys):
    im = inseq.load_model(tiny_llama(), "attnlrp", tokenizer=tiny_tokenizer())
    out = im.attribute(PROMPT, generation_args=GEN, show_progress=False)
    html = out.show(display=False, return_html=True)
    assert "capital" in html and "france" in html
    out.show(display=True)
    assert "capital" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name, method", [("attnlrp", "attnlrp"), ("cp_lrp", "cp-lrp")])
def test_smollm2_steps_equal_explain_with_generate(name, method):
    from lxt_data import load_smollm2

    model, tok = load_smollm2(dtype=torch.float32)
    prompt = "The capital of France is"
    expected = lxt.explain(model, tok, prompt, generate=3, method=method)
    im = inseq.load_model(model, name, tokenizer=tok)
    out = im.attribute(prompt, generation_args=GEN, show_progress=False)
    steps, targets = steps_of(out)
    assert [tok.convert_tokens_to_string([t]) for t in targets] == [e.target for e in expected]
    for got, exp in zip(steps, expected):
        assert len(got) == len(exp.tokens)
        torch.testing.assert_close(got.float(), exp.relevance, rtol=1e-4, atol=1e-4 * float(exp.relevance.abs().max()))


@pytest.mark.parametrize("engine", ["gradient", "explicit"])
def test_inseqs_gradient_methods_inside_a_context_are_what_the_readme_says(engine):
    """README: inside a context the input gradient is the relevance, so inseq's saliency is
    R / logit (summed over the embedding) and its input_x_gradient is x * R / logit, not R."""
    model, tok = tiny_llama(), tiny_tokenizer()
    comp = lxt.composites.attnlrp(model, engine=engine)
    exp = lxt.explain(model, tok, PROMPT, composite=comp)
    n = len(exp.tokens)
    with comp.context(model):
        got = {}
        for name, kw in [("saliency", {"abs": False}), ("input_x_gradient", {})]:
            im = inseq.load_model(model, name, tokenizer=tok)
            out = im.attribute(PROMPT, PROMPT + " " + exp.target, attributed_fn="logit", show_progress=False, **kw)
            got[name] = out.sequence_attributions[0].target_attributions[:n, 0].float().sum(-1)
    torch.testing.assert_close(got["saliency"] * exp.logit, exp.relevance, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got["input_x_gradient"] * exp.logit, exp.relevance, rtol=0.1)
