"""The faithfulness benchmark's machinery on tiny random models (fast; the real run is
``lxt bench faithfulness``)."""
import json

import pytest
import torch

import lxt
from lxt_bench import faithfulness as fb
from models import tiny_llama, tiny_tokenizer, tiny_vit
from reference import assert_relevance_close, reference_model, reference_relevance


def test_step_masks_grow_one_unit_at_a_time():
    order = torch.tensor([3, 0, 2])
    morf, lerf = fb.step_masks(order, 5)
    assert morf.shape == lerf.shape == (4, 5)
    assert not morf[0].any() and not lerf[0].any()
    assert torch.equal(morf[-1], lerf[-1]) and int(morf[-1].sum()) == 3 and not morf[-1, [1, 4]].any()
    assert morf[1].nonzero().flatten().tolist() == [3]
    assert lerf[1].nonzero().flatten().tolist() == [2]
    assert (morf.sum(1) == torch.arange(4)).all()


def test_rank_breaks_ties_randomly_not_by_position():
    g = torch.Generator().manual_seed(0)
    firsts = {int(fb.rank(torch.zeros(6), torch.arange(1, 5), g)[0]) for _ in range(40)}
    assert firsts == {1, 2, 3, 4}
    r = torch.tensor([0.0, 5.0, -1.0, 2.0, 9.0])
    assert fb.rank(r, torch.arange(1, 4), g).tolist() == [1, 3, 2]


def test_curves_are_exact_for_an_additive_model():
    """log p = sum_i w_i x_i: relevance w * x is exact, so MoRF with the true ranking removes
    the largest contributions first and the curves are partial sums."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(7, generator=g), torch.randn(7, 1, generator=g)
    contrib = w * x[:, 0]

    def logprob(batch):
        return (batch[..., 0] * w).sum(-1)

    true = fb.rank(contrib, torch.arange(7), g)
    orders = {"true": true, "reversed": true.flip(0)}
    curves = fb.perturbation_curves(logprob, x, orders, {"zero": torch.zeros(1)})["zero"]
    sorted_c = contrib[true]
    expect_morf = contrib.sum() - torch.cat([torch.zeros(1), sorted_c.cumsum(0)])
    expect_lerf = contrib.sum() - torch.cat([torch.zeros(1), sorted_c.flip(0).cumsum(0)])
    assert torch.allclose(torch.tensor(curves["true"]["morf"]), expect_morf, atol=1e-5)
    assert torch.allclose(torch.tensor(curves["true"]["lerf"]), expect_lerf, atol=1e-5)
    assert curves["true"]["score"] > 0
    assert curves["reversed"]["score"] == pytest.approx(-curves["true"]["score"], abs=1e-5)
    # the true ranking is the best any ordering can do
    for _ in range(5):
        other = fb.perturbation_curves(logprob, x, {"r": torch.randperm(7, generator=g)},
                                       {"zero": torch.zeros(1)})["zero"]["r"]
        assert other["score"] <= curves["true"]["score"] + 1e-5


PROMPTS = ["the capital of france is", "a cat sat on the mat and", "the big dog ran in park",
           "paris berlin rome city"]


@pytest.fixture(scope="module")
def text_result():
    model, tok = tiny_llama(), tiny_tokenizer()
    res = fb.evaluate_text(model, tok, PROMPTS, steps=3, progress=False)
    return model, tok, res


def test_text_benchmark_structure_and_endpoints(text_result):
    model, tok, res = text_result
    assert [(r["method"], r["fill"]) for r in res["rows"]] == [(m, f) for m in fb.METHODS for f in fb.FILLS]
    for r in res["rows"]:
        assert r["n"] == len(PROMPTS) and r["score_sem"] >= 0
    emb = model.get_input_embeddings()
    fills = {"zero": torch.zeros(emb.weight.shape[1]), "mean": emb.weight.mean(0)}
    for prompt, item in zip(PROMPTS, res["per_input"]):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        assert len(item["tokens"]) == n
        with torch.no_grad():
            lp = model(input_ids=ids).logits[0, -1].log_softmax(-1)
        assert item["target_id"] == int(lp.argmax())
        for m in fb.LXT_METHODS + ("attention_rollout",):
            assert len(item["relevance"][m]) == n
        for m, order in item["order"].items():
            assert sorted(order) == list(range(1, n - 1)), m  # never BOS nor the query
        for fill, vec in fills.items():
            # every token but the first and the last replaced, computed independently
            x = emb(ids).detach().clone()
            x[0, 1:-1] = vec
            with torch.no_grad():
                lp_all = model(inputs_embeds=x).logits[0, -1].log_softmax(-1)[item["target_id"]]
            for m in fb.METHODS:
                c = item["curves"][fill][m]
                assert len(c["morf"]) == len(c["lerf"]) == n - 1  # n - 2 steps + the start
                assert c["morf"][0] == c["lerf"][0] == pytest.approx(float(lp.max()), abs=1e-4)
                assert c["morf"][-1] == c["lerf"][-1] == pytest.approx(float(lp_all), abs=1e-4)
                diff = torch.tensor(c["lerf"]) - torch.tensor(c["morf"])
                assert c["score"] == pytest.approx(float(diff.mean()), abs=1e-6)
    table = fb.format_table(res["rows"], "tiny")
    assert all(m in table for m in fb.METHODS)
    json.dumps(res)  # JSON-ready


def test_text_relevance_matches_the_reference_formulation(text_result, reference_attention):
    """The benchmark's AttnLRP and CP-LRP relevance against the independent gradient-modification
    formulation of tests/test_reference_formulation.py (not against lxt itself)."""
    model, tok, res = text_result
    for method, cp in (("attnlrp", False), ("cp-lrp", True)):
        ref = reference_model(model, cp=cp)
        for prompt, item in zip(PROMPTS, res["per_input"]):
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            emb = model.get_input_embeddings()(ids).detach()
            expected, _ = reference_relevance(ref, torch.tensor([item["target_id"]]), inputs_embeds=emb)
            # float32 and lxt's default epsilon (1e-6, the reference has none): a pre-activation
            # of ~1e-4 in these random weights moves one token by ~0.8 % of the largest
            assert_relevance_close(torch.tensor(item["relevance"][method]), expected[0], rtol=1e-2,
                                   atol_frac=1e-2)


def test_text_integrated_gradients_is_what_lxt_explain_gives(text_result):
    model, tok, res = text_result
    item = res["per_input"][0]
    # integrated gradients is batched over its steps by the benchmark: same numbers
    exp = lxt.explain(model, tok, PROMPTS[0], target=item["target_id"], method="integrated_gradients", steps=3)
    assert torch.allclose(exp.relevance, torch.tensor(item["relevance"]["integrated_gradients"]),
                          rtol=1e-3, atol=1e-5)


def test_image_benchmark_on_tiny_vit():
    model = tiny_vit()
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 16, 16, generator=g)
    methods = ["attnlrp", "gradient", "integrated_gradients", "attention_rollout", "random"]
    res = fb.evaluate_images(model, images, torch.tensor([0, 1]), methods, steps=3, progress=False)
    assert [(r["method"], r["fill"]) for r in res["rows"]] == [(m, f) for m in methods for f in fb.FILLS]
    with torch.no_grad():
        lp = model(pixel_values=images).logits.log_softmax(-1)
        mean = images.mean((0, 2, 3))
        lp_mean = model(pixel_values=mean[None, :, None, None].expand(2, 3, 16, 16)).logits.log_softmax(-1)
    for i, item in enumerate(res["per_input"]):
        t = item["target"]
        for m in methods:
            c = item["curves"]["mean"][m]
            assert len(c["morf"]) == len(c["lerf"]) == 16 * 16 + 1
            assert c["morf"][0] == c["lerf"][0] == pytest.approx(float(lp[i, t]), abs=1e-4)
            assert c["morf"][-1] == c["lerf"][-1] == pytest.approx(float(lp_mean[i, t]), abs=1e-4)
    assert len(res["mean_curves"]["zero"]["attnlrp"]["morf"]) == 257
    # the batched relevance is lxt.explain's, image by image
    rel, _ = fb.image_relevance(model, images, lp.argmax(-1), ["attnlrp", "gradient"])
    for m in ("attnlrp", "gradient"):
        exp = lxt.explain(model, None, images[1:2], target=int(lp[1].argmax()), method=m)
        assert torch.allclose(rel[m][1], exp.relevance, rtol=1e-3, atol=1e-6), m
    json.dumps(res)


def test_text_benchmark_as_a_resumable_corpus_job(tmp_path, monkeypatch):
    """--jsonl: one record per prompt (a too-short prompt is an error record), each equal to
    evaluate_text on that prompt with its own seed; a rerun computes nothing and keeps them."""
    model, tok = tiny_llama(), tiny_tokenizer()
    methods = ["input_x_gradient", "random"]
    items = [(2, PROMPTS[0]), (3, "the cat"), (5, PROMPTS[1]), (9, PROMPTS[2])]
    out = tmp_path / "f.jsonl"
    options = {"model": "tiny", "methods": methods}
    recs = list(fb.text_corpus(model, tok, items, str(out), options, methods, steps=3, chunk=2,
                               seed=4, progress=False))
    assert [r["index"] for r in recs] == [2, 3, 5, 9]
    assert recs[1]["error"] == "2 tokens; need >= 3 (BOS, one token, query)"
    ok = [it for it in items if it[0] != 3]
    ref = fb.evaluate_text(model, tok, [p for _, p in ok], methods, steps=3, progress=False,
                           seeds=[4 * 1000003 + i for i, _ in ok])["per_input"]
    for rec, expected in zip([r for r in recs if not r["error"]], ref):
        assert rec["order"] == expected["order"] and rec["target_id"] == expected["target_id"]
        for fill in fb.FILLS:
            for m in methods:
                assert torch.allclose(torch.tensor(rec["curves"][fill][m]["morf"]),
                                      torch.tensor(expected["curves"][fill][m]["morf"]), atol=1e-5)
    assert [json.loads(x) for x in out.read_text().splitlines()] == recs
    monkeypatch.setattr(fb, "evaluate_text", lambda *a, **k: pytest.fail("recomputed"))
    again = fb.text_corpus(model, tok, items, str(out), options, methods, steps=3, progress=False)
    assert list(again) == recs
