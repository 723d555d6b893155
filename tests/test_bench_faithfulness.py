"""The faithfulness benchmark's machinery on tiny random models (fast; the real run is
``lxt bench faithfulness``)."""
import json

import pytest
import torch

import lxt
from lxt_bench import faithfulness as fb
from models import tiny_bert, tiny_llama, tiny_tokenizer, tiny_vit
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
    assert res["neutral"] == {"token": "[MASK]", "id": tok.mask_token_id}  # the tiny tokenizer has one
    fills = {"zero": torch.zeros(emb.weight.shape[1]), "mean": emb.weight.mean(0),
             "neutral": emb.weight[tok.mask_token_id]}
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
    assert [(r["method"], r["fill"]) for r in res["rows"]] == [(m, f) for m in methods for f in fb.IMAGE_FILLS]
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


# ---------------------------------------------------------------------------- issue 23: variants, ΔA
def test_bootstrap_interval_against_independent_formulas():
    # constant differences: the interval is the point
    assert fb.bootstrap_interval([0.25] * 7) == pytest.approx((0.25, 0.25, 0.25))
    # two values 0 and 2: resample means are 0, 1, 2 with probabilities 1/4, 1/2, 1/4, so with
    # 2000 resamples the 2.5 % and 97.5 % quantiles are 0 and 2 (hand computed)
    assert fb.bootstrap_interval([0.0, 2.0], resamples=2000, seed=0) == pytest.approx((1.0, 0.0, 2.0))
    # the documented procedure, re-implemented with numpy in float64 (loop over resamples)
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(3)
    v = torch.randn(11, generator=g, dtype=torch.float64)
    idx = torch.randint(11, (500, 11), generator=torch.Generator().manual_seed(5)).numpy()
    means = np.array([v.numpy()[row].mean() for row in idx])
    lo, hi = np.percentile(means, [2.5, 97.5])  # numpy's default is linear interpolation too
    mean, a, b = fb.bootstrap_interval(v, resamples=500, seed=5)
    assert mean == pytest.approx(float(v.mean()), abs=1e-15)
    assert (a, b) == pytest.approx((lo, hi), abs=1e-12)
    # many values: close to the normal interval mean +- 1.96 sd / sqrt(n)
    v = torch.randn(400, generator=g, dtype=torch.float64)
    mean, a, b = fb.bootstrap_interval(v, resamples=4000, seed=1)
    half = 1.96 * float(v.std()) / 20
    assert a == pytest.approx(mean - half, abs=0.15 * half) and b == pytest.approx(mean + half, abs=0.15 * half)
    # the seed decides the interval
    assert fb.bootstrap_interval(v, seed=1) == fb.bootstrap_interval(v, seed=1) != fb.bootstrap_interval(v, seed=2)


def test_split_is_disjoint_covers_every_prompt_by_line_parity():
    lines = [i for i, _ in fb.numbered_prompts()]
    assert len(lines) == 60
    split = fb.split_prompts(lines)
    tune, held = set(split["tuning"]), set(split["held_out"])
    assert not tune & held and tune | held == set(lines)
    assert all(i % 2 == 1 for i in tune) and all(i % 2 == 0 for i in held) and len(tune) == len(held) == 30
    assert fb.split_prompts([4, 7, 10]) == {"tuning": [7], "held_out": [4, 10]}


def test_paired_deltas_are_signed_so_that_positive_is_better():
    rec = {"index": 1, "curves": {"zero": {"attnlrp": {"morf": [0.0, -2.0, -3.0], "lerf": [0.0, -1.0, -3.0]},
                                           "v": {"morf": [0.0, -3.0, -3.0], "lerf": [0.0, 0.0, -3.0]}}}}
    d = fb.paired_deltas([rec], "v", "zero")
    # MoRF areas: -5/3 (ref), -2 (v): v drops faster, +1/3; LeRF: -4/3 vs -1: +1/3; score +2/3
    assert d["morf"].tolist() == pytest.approx([1 / 3]) and d["lerf"].tolist() == pytest.approx([1 / 3])
    assert d["score"].tolist() == pytest.approx([2 / 3])


def _sdpa_rules(comp) -> dict:
    return {r.module.split(".self_attn")[0]: r.status for r in comp.summary().ops
            if r.op == "scaled_dot_product_attention"}


def test_mixed_composite_endpoints_are_attnlrp_and_cp_lrp_bit_for_bit():
    model, tok = tiny_llama(layers=3), tiny_tokenizer()
    assert fb.decoder_layers(model) == ("model.layers", 3)
    assert fb.cp_layer_count(model, fb.MIXES["attnlrp+cp-late"]) == 1
    assert fb.cp_layer_count(model, fb.MIXES["attnlrp+cp-half"]) == 2  # round(1.5)
    rel = {}
    for method in ("attnlrp", "cp-lrp"):
        rel[method] = lxt.explain(model, tok, PROMPTS, method=method)
    for n_cp, same in ((0, "attnlrp"), (3, "cp-lrp")):
        mix = lxt.explain(model, tok, PROMPTS, method="attnlrp", composite=fb.mixed_composite(model, n_cp))
        for a, b in zip(mix, rel[same]):
            assert torch.equal(a.relevance, b.relevance), (n_cp, same)
    comp = fb.mixed_composite(model, 1)
    mix = lxt.explain(model, tok, PROMPTS, method="attnlrp", composite=comp)
    # the first two layers keep AttnLRP's attention rule, the last gets CP-LRP's
    assert _sdpa_rules(comp) == {"model.layers.0": "scaled_dot_product_attention",
                                 "model.layers.1": "scaled_dot_product_attention",
                                 "model.layers.2": "scaled_dot_product_attention_cp"}
    gates = {r.module for r in comp.summary().ops if r.status.startswith("gate_detached")}
    assert gates == {"model.layers.2.mlp"}
    for a, b, c in zip(mix, rel["attnlrp"], rel["cp-lrp"]):
        assert not torch.allclose(a.relevance, b.relevance) and not torch.allclose(a.relevance, c.relevance)
    with pytest.raises(ValueError, match="n_cp must be in 0..3"):
        fb.mixed_composite(model, 4)


def test_positional_variants_run_only_where_lxt_offers_them(capsys):
    import inspect

    has = "positional" in inspect.signature(lxt.explain).parameters
    assert fb.positional_supported() == has
    notes = []
    kept = fb.runnable(["attnlrp", "attnlrp-pos", "cp-lrp-pos"], log=notes.append)
    assert kept == (["attnlrp", "attnlrp-pos", "cp-lrp-pos"] if has else ["attnlrp"])
    assert bool(notes) == (not has) and all("positional" in n for n in notes)
    model, tok = tiny_llama(), tiny_tokenizer()
    res = fb.evaluate_text(model, tok, PROMPTS[:2], ["attnlrp", "attnlrp-pos", "random"], ["zero"],
                           progress=False)
    assert res["skipped"] == ([] if has else ["attnlrp-pos"])
    if not has:
        assert "skipping attnlrp-pos" in capsys.readouterr().err
    else:  # ranked by what remains on the tokens
        exp = lxt.explain(model, tok, PROMPTS[0], target=res["per_input"][0]["target_id"], positional=True)
        assert torch.allclose(torch.tensor(res["per_input"][0]["relevance"]["attnlrp-pos"]), exp.relevance,
                              rtol=1e-5, atol=1e-7)  # batched there, alone here


def test_neutral_token_is_the_mask_token_or_a_space():
    tok = tiny_tokenizer()
    assert fb.neutral_token(tok) == ("[MASK]", tok.mask_token_id)
    table = torch.randn(101, 4)
    fills = fb.fill_vectors(table, fb.FILLS, neutral_id=7)
    assert torch.equal(fills["neutral"], table[7]) and torch.equal(fills["zero"], torch.zeros(4))
    assert torch.allclose(fills["mean"], table.mean(0))
    tok.mask_token = None  # no mask token: a single space, which this word-level tokenizer drops
    with pytest.raises(ValueError, match="neutral token ' ' is 0 tokens"):
        fb.neutral_token(tok)


def test_sentence_encoder_benchmark(reference_attention):
    """Tiny BertModel: step 0 is the similarity 1, the last step of the neutral fill is the
    sentence with [MASK] in every replaced position (ids, computed independently); the
    AttnLRP / CP-LRP relevance of the similarity matches the gradient-modification reference."""
    from transformers import BertModel

    model, tok = tiny_bert(cls=BertModel), tiny_tokenizer()
    methods = ["attnlrp", "cp-lrp", "attnlrp+cp-half", "input_x_gradient", "random"]
    methods += [m for m in ("attnlrp-pos",) if fb.positional_supported(encoder=True)]
    res = fb.evaluate_encoder(model, tok, PROMPTS, methods, ["zero", "neutral"], progress=False,
                              indices=[1, 2, 3, 4])
    assert [(r["method"], r["fill"]) for r in res["rows"]] == [(m, f) for m in methods for f in ("zero", "neutral")]
    for prompt, item in zip(PROMPTS, res["per_input"]):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref_emb = torch.nn.functional.normalize(model(input_ids=ids).last_hidden_state.mean(1), dim=-1)[0]
            masked = ids.clone()
            masked[0, 1:-1] = tok.mask_token_id
            e = torch.nn.functional.normalize(model(input_ids=masked).last_hidden_state.mean(1), dim=-1)[0]
        for m in methods:
            c = item["curves"]["neutral"][m]
            assert c["morf"][0] == c["lerf"][0] == pytest.approx(1.0, abs=1e-5)
            assert c["morf"][-1] == pytest.approx(float(e @ ref_emb), abs=1e-5)
        for method, cp in (("attnlrp", False), ("cp-lrp", True)):
            ref = reference_model(model, cp=cp)
            x = model.get_input_embeddings()(ids).detach().requires_grad_()
            h = ref(inputs_embeds=x).last_hidden_state.mean(1)
            f = (h / h.norm(dim=-1, keepdim=True).detach()) @ ref_emb  # identity on the normalisation
            f.sum().backward()
            expected = (x * x.grad).sum(-1)[0]
            assert_relevance_close(torch.tensor(item["relevance"][method]), expected, rtol=1e-2, atol_frac=1e-2)
    rows = fb.delta_rows(res["per_input"], methods, ["zero", "neutral"], resamples=100)
    assert {(r["method"], r["subset"]) for r in rows} == {(m, s) for m in methods[1:]
                                                         for s in ("all", "tuning", "held_out")}


def _tiny_loaders(monkeypatch):
    import lxt_data
    from transformers import BertModel

    monkeypatch.setattr(lxt_data, "load_smollm2", lambda: (tiny_llama(layers=3), tiny_tokenizer()))
    monkeypatch.setattr(lxt_data, "load_minilm", lambda: (tiny_bert(cls=BertModel), tiny_tokenizer()))


def test_cli_json_is_complete_and_the_report_decides(tmp_path, monkeypatch, capsys):
    """`lxt bench faithfulness --model llm / bert` on tiny stand-ins: every variant, fill,
    subset and ordering in the JSON; `--report` reads both and writes the tables and verdict."""
    _tiny_loaders(monkeypatch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS + ["the dog sat on the big mat", "a cat ran in the city"]) + "\n")
    methods = ["attnlrp", "cp-lrp", "attnlrp+cp-late", "attnlrp+cp-half", "random"]
    paths = {}
    for kind in ("llm", "bert"):
        paths[kind] = tmp_path / f"faithfulness_{kind}.json"
        assert fb.main(["--model", kind, "--prompts-file", str(prompts), "--methods", *methods,
                        "--fills", "zero", "neutral", "--resamples", "50", "--quiet", "--no-bos",
                        "--json", str(paths[kind])]) == 0
        data = json.loads(paths[kind].read_text())
        assert data["settings"]["methods"] == methods and data["split"]["tuning"] == [1, 3, 5]
        assert data["split"]["held_out"] == [2, 4, 6]
        assert set(data["settings"]["fills"]) == {"zero", "neutral"} and "[MASK]" in data["settings"]["fills"]["neutral"]
        assert data["settings"]["mixes"]["attnlrp+cp-late"] == (
            "CP-LRP in the last 1 of 3 layers" if kind == "llm" else "CP-LRP in the last 1 of 2 layers")
        cells = {(r["method"], r["fill"], r["subset"], r["ordering"]) for r in data["delta"]}
        assert cells == {(m, f, s, o) for m in methods[1:] for f in ("zero", "neutral")
                         for s in ("all", "tuning", "held_out") for o in fb.ORDERINGS}
        for r in data["delta"]:
            assert r["low"] <= r["delta"] <= r["high"] and r["beats"] == (r["low"] > 0)
            assert r["n"] == {"all": 6, "tuning": 3, "held_out": 3}[r["subset"]]
        assert [r["index"] for r in data["per_input"]] == [1, 2, 3, 4, 5, 6]
    md, vj = tmp_path / "table.md", tmp_path / "verdict.json"
    assert fb.main(["--report", str(paths["llm"]), str(paths["bert"]), "--markdown", str(md),
                    "--json", str(vj)]) == 0
    text = md.read_text()
    for m in methods[1:]:
        assert f"| {m} |" in text
    assert "SmolLM2-135M-Instruct" in text and "all-MiniLM-L6-v2" in text and "**Verdict**" in text
    verdict = json.loads(vj.read_text())["verdict"]
    assert verdict["candidate"] in methods[1:] + [None] and verdict["models"] == ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"]
    wins = verdict["held_out_wins_everywhere"]
    assert verdict["default"] == (verdict["candidate"] if wins.get(verdict["candidate"]) else "attnlrp")


def test_verdict_needs_a_held_out_win_on_every_model_and_fill():
    def rows(model_deltas):
        out = []
        for (m, f, subset), (d, lo, hi) in model_deltas.items():
            out.append({"method": m, "reference": "attnlrp", "fill": f, "subset": subset, "ordering": "score",
                        "n": 30, "delta": d, "low": lo, "high": hi, "beats": lo > 0, "loses": hi < 0})
        return out

    good = {(m, f, s): v for m, v in (("cp-lrp", (0.5, 0.1, 0.9)), ("attnlrp+cp-late", (0.2, 0.1, 0.3)))
            for f in ("zero", "neutral") for s in ("tuning", "held_out")}
    # attnlrp+cp-late is stronger on tuning (0.2 / 0.2 > 0.5 / 0.8), so it is the candidate
    d = fb.verdict({"a": rows(good), "b": rows(good)}, candidates=["cp-lrp", "attnlrp+cp-late"])
    assert d["candidate"] == "attnlrp+cp-late" and d["default"] == "attnlrp+cp-late"
    # it loses its held-out interval on one model under one fill: AttnLRP stays
    bad = dict(good)
    bad[("attnlrp+cp-late", "neutral", "held_out")] = (0.1, -0.05, 0.25)
    d = fb.verdict({"a": rows(good), "b": rows(bad)}, candidates=["cp-lrp", "attnlrp+cp-late"])
    assert d["candidate"] == "attnlrp+cp-late" and d["default"] == "attnlrp"
    assert d["held_out_wins_everywhere"] == {"cp-lrp": True, "attnlrp+cp-late": False}
    # no variant above the reference in every tuning cell: no candidate, AttnLRP stays
    tie = {k: ((0.0, 0.0, 0.0) if k[2] == "tuning" else v) for k, v in good.items()}
    d = fb.verdict({"a": rows(tie), "b": rows(good)}, candidates=["cp-lrp", "attnlrp+cp-late"])
    assert d["candidate"] is None and d["default"] == "attnlrp"


def test_ranking_flips_with_the_occlusion():
    rows = [{"method": m, "fill": f, "score_mean": v} for m, f, v in
            (("a", "zero", 3), ("b", "zero", 2), ("c", "zero", 1), ("a", "neutral", 3), ("b", "neutral", 1),
             ("c", "neutral", 2))]
    orders = fb.ranking_by_fill(rows, ["zero", "neutral"])
    assert orders == {"zero": ["a", "b", "c"], "neutral": ["a", "c", "b"]}
    assert fb.ranking_flips(orders) == [("b", "c")]
