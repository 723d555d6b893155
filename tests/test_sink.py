"""The first-token sink: ``Explanation.first_token_share`` against an independent float64
computation, the view that draws the first token apart (``sink="separate"``: HTML, PNG,
terminal, ``lxt explain --sink separate``), the default view unchanged byte for byte, and
``lxt bench sink`` on tiny configurations (a complete JSON)."""
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

import lxt
from lxt import viz
from lxt.cli import main
from lxt.explain import Explanation
from models import tiny_llama, tiny_tokenizer

TOKENS = ["<s>", "the", "cat", "sat"]
RELEVANCE = [2.0, 0.25, -0.5, 0.125]


def example(relevance=RELEVANCE, tokens=TOKENS):
    return Explanation(tokens=list(tokens), relevance=torch.tensor(relevance), target=" on", target_id=5,
                       logit=1.875, method="attnlrp")


def reference_shares(relevance):
    """Independent float64 formulas: R_0 / sum|R|, |R_0| / sum|R|, max_{i>0} |R_i| / sum|R|."""
    r = [float(v) for v in relevance]
    total = sum(abs(v) for v in r)
    return r[0] / total, abs(r[0]) / total, max(abs(v) for v in r[1:]) / total


# ------------------------------------------------------------------ the share
@pytest.fixture(scope="module")
def explained():
    """Real explanations of a tiny Llama (three prompts, both LRP methods)."""
    model, tok = tiny_llama(), tiny_tokenizer()
    prompts = ["the capital of france is", "a cat sat on the mat and", "the dog ran in park"]
    return [e for m in ("attnlrp", "cp-lrp") for e in lxt.explain(model, tok, prompts, method=m)]


def test_first_token_share_equals_the_formula_on_explanations(explained):
    from lxt_bench.sink import shares

    for e in explained:
        signed, absolute, other = reference_shares(e.relevance.tolist())
        assert e.first_token_share == pytest.approx(absolute, rel=1e-12, abs=1e-15)
        got = shares(e.relevance)
        assert got["first"] == pytest.approx(signed, rel=1e-12, abs=1e-15)
        assert got["first_abs"] == pytest.approx(absolute, rel=1e-12, abs=1e-15)
        assert got["max_other"] == pytest.approx(other, rel=1e-12, abs=1e-15)


def test_first_token_share_edges():
    assert example([-3.0, 1.0]).first_token_share == pytest.approx(0.75, rel=1e-12)
    assert example([0.0, 0.0], ["a", "b"]).first_token_share == 0.0
    img = Explanation(tokens=None, relevance=torch.ones(2, 2), target=0, target_id=0, logit=1.0,
                      method="attnlrp", image=torch.rand(3, 2, 2))
    with pytest.raises(ValueError, match="text explanations"):
        img.first_token_share
    with pytest.raises(ValueError, match="first token"):
        img.to_png("unused.png", sink="separate")


# ------------------------------------------------------------------ the default view, unchanged
#: the views of ``example()`` as lxt drew them before ``sink=`` existed (commit e4fe43b)
HTML_BEFORE = (
    '<div class="lxt-explanation" data-method="attnlrp"><div class="head">attnlrp — target &#x27; on&#x27; '
    '(value +1.875)</div><div class="tokens"><span class="tok" data-relevance="2" title="+2.0000" '
    'style="background-color: rgb(255, 0, 0)">&lt;s&gt;</span><span class="tok" data-relevance="0.25" '
    'title="+0.2500" style="background-color: rgb(255, 223, 223)">the</span><span class="tok" '
    'data-relevance="-0.5" title="-0.5000" style="background-color: rgb(191, 191, 255)">cat</span><span '
    'class="tok" data-relevance="0.125" title="+0.1250" style="background-color: rgb(255, 239, 239)">sat'
    '</span></div></div>')
TERMINAL_BEFORE = (
    "attnlrp: explaining ' on' (value +1.875)\n\x1b[48;2;255;0;0m\x1b[38;2;0;0;0m<s>\x1b[0m\x1b[48;2;255;223;"
    "223m\x1b[38;2;0;0;0mthe\x1b[0m\x1b[48;2;191;191;255m\x1b[38;2;0;0;0mcat\x1b[0m\x1b[48;2;255;239;239m\x1b"
    "[38;2;0;0;0msat\x1b[0m\nmost relevant: '<s>' +2.000, 'the' +0.250, 'sat' +0.125")


def test_default_view_is_byte_identical_to_before():
    """The explanation's HTML and terminal views as before; the page around them is the same
    whether ``sink`` is given as the default or left out."""
    e = example()
    assert viz.html_fragment(e) == HTML_BEFORE == viz.html_fragment(e, "inline")
    assert e.to_html() == e.to_html(sink="inline") == viz.html_page([e])
    assert HTML_BEFORE in e.to_html()
    assert viz.terminal(e) == TERMINAL_BEFORE == viz.terminal(e, "inline")


def test_default_png_is_byte_identical_to_the_view_before_sink(tmp_path):
    """The PNG of the default view, byte for byte against the committed ``lxt/viz.py`` of
    before ``sink=`` (read with ``git show``; skipped outside a git checkout)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    try:
        old = subprocess.run(["git", "show", "e4fe43b:lxt/viz.py"], cwd=root, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout with commit e4fe43b")
    (tmp_path / "viz_before.py").write_text(old)
    spec = importlib.util.spec_from_file_location("viz_before", tmp_path / "viz_before.py")
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    e = example()
    before.png(e, str(tmp_path / "before.png"))
    e.to_png(str(tmp_path / "now.png"))
    assert (tmp_path / "now.png").read_bytes() == (tmp_path / "before.png").read_bytes()


def test_bad_sink_is_refused():
    with pytest.raises(ValueError, match="sink must be one of 'inline', 'separate'"):
        example().to_html(sink="hide")


# ------------------------------------------------------------------ the separated view
SPAN = re.compile(r'<span class="tok" data-relevance="([^"]+)" title="[^"]+" '
                  r'style="background-color: rgb\((\d+), (\d+), (\d+)\)">([^<]*)</span>')


def test_html_separate_draws_the_first_token_apart_and_scales_the_rest_by_themselves():
    e = example()
    page = e.to_html(sink="separate")
    share = abs(RELEVANCE[0]) / sum(map(abs, RELEVANCE))  # 70%
    # the first token inside the box, its share beside it
    box = re.search(r'<span class="sink"[^>]*>(.*?)<span class="sink-share">([^<]*)</span></span>', page)
    assert box and "&lt;s&gt;" in box.group(1)
    assert box.group(2) == f"first token {share:.0%} of |R|" == "first token 70% of |R|"
    assert viz.SINK_NOTE.split(";")[0] in page and "attention sink" in page and "sum still includes" in page
    spans = SPAN.findall(page)
    assert [s[4] for s in spans] == ["&lt;s&gt;", "the", "cat", "sat"]
    colours = {s[4]: (int(s[1]), int(s[2]), int(s[3])) for s in spans}
    # the rest's largest |R| ("cat", -0.5) gets the full colour; the others in proportion to it
    assert colours["cat"] == (0, 0, 255)
    assert colours["the"] == viz.colour(0.25, 0.5) == (255, 128, 128)
    assert colours["sat"] == viz.colour(0.125, 0.5)
    # inline, the same token was faint: the first token set the scale
    inline = {s[4]: (int(s[1]), int(s[2]), int(s[3])) for s in SPAN.findall(e.to_html())}
    assert inline["cat"] == viz.colour(-0.5, 2.0) != colours["cat"]
    # nothing hidden: every value is still written
    assert [float(s[0]) for s in spans] == RELEVANCE


def test_terminal_and_png_separate(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    e = example()
    text = viz.terminal(e, "separate")
    assert "(first token 70% of |R|)" in text and viz.SINK_NOTE in text
    assert f"\x1b[48;2;{0};{0};{255}m" in text  # "cat": full blue on the rest's scale
    seen = []
    real = Figure.savefig

    def recording(fig, *a, **kw):
        out = real(fig, *a, **kw)
        for ax in fig.axes:
            for t in ax.texts:
                box = t.get_bbox_patch()
                seen.append((t.get_text(), None if box is None else box.get_linewidth(),
                             None if box is None else tuple(box.get_facecolor()[:3])))
        return out

    monkeypatch.setattr(Figure, "savefig", recording)
    e.to_png(str(tmp_path / "s.png"), sink="separate")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_text = {t: (w, rgb) for t, w, rgb in seen}
    assert by_text["<s>"][0] == 2.5 and by_text["the"][0] != 2.5  # the first token boxed
    assert "first token 70% of |R|" in by_text
    assert any("attention sink" in t for t in by_text)
    assert by_text["cat"][1] == pytest.approx((0, 0, 1))  # the rest's scale


def test_separate_view_beside_positional_rows():
    """With ``positional=True`` rows (where Explanation has them) the separated view still
    draws the first token apart and keeps the positions' row."""
    import dataclasses

    if "position_relevance" not in {f.name for f in dataclasses.fields(Explanation)}:
        pytest.skip("this Explanation has no position_relevance")
    e = example()
    e.position_relevance = torch.tensor([-4.0, 0.1, 0.2, 0.05])
    page = e.to_html(sink="separate")
    assert 'class="sink"' in page and "first token 70% of |R|" in page and "positions" in page
    # position 0 (-4, larger than every token) does not set the rest's scale either: "cat" keeps
    # the full colour, as without the positional row
    colours = {s[4]: (int(s[1]), int(s[2]), int(s[3])) for s in SPAN.findall(page)}
    assert colours["cat"] == (0, 0, 255)


# ------------------------------------------------------------------ command line
def test_cli_sink_separate(model_dir, tmp_path, capsys):
    out, plain = tmp_path / "s.html", tmp_path / "p.html"
    args = ["explain", "the capital of france is", "--model", str(model_dir), "--method", "input_x_gradient"]
    assert main([*args, "--html", str(out), "--sink", "separate"]) == 0
    printed = capsys.readouterr().out
    assert "first token" in printed and "attention sink" in printed  # the terminal view too
    page = out.read_text()
    assert 'class="sink"' in page and "of |R|" in page and 'class="sink-note"' in page
    assert main([*args, "--html", str(plain), "--quiet"]) == 0
    assert 'class="sink' not in plain.read_text()
    capsys.readouterr()
    assert main([*args, "--sink", "hide"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lxt: error:") and len(err.strip().splitlines()) == 1 and "--sink" in err


# ------------------------------------------------------------------ the benchmark
def test_bench_sink_on_tiny_configs_writes_a_complete_json(tmp_path, capsys):
    from lxt_bench import sink

    path = tmp_path / "sink.json"
    families = ["llama", "gpt2", "bert"]
    assert main(["bench", "sink", "--models", "tiny", "--families", *families, "--tiny-prompts", "2",
                 "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| model |" in printed and "tiny gpt2" in printed
    res = json.loads(path.read_text())
    positional = sink.has_positional()
    assert res["benchmark"] == "sink" and res["methods"] == list(sink.METHODS)
    assert res["positional"].startswith("measured" if positional else "skipped")
    assert "random" in res["settings"]["tiny"]["weights"]
    runs = [(m, False) for m in sink.METHODS] + ([(m, True) for m in sink.METHODS] if positional else [])
    done = {(r["method"], r["positional"]) for r in res["rows"]}
    failed = {(e["method"], e["positional"]) for e in res["errors"]}
    assert set(runs) == done | failed and not ({(m, False) for m in sink.METHODS} & failed)
    keys = {(r["model"], r["bos"], r["method"], r["positional"]) for r in res["rows"]}
    for f in families:
        for bos in (False, True):
            for m, pos in done:
                assert (f"tiny {f}", bos, m, pos) in keys
    for row in res["rows"]:
        assert row["n"] == 2 and row["weights"] == "random"
        names = sink.SHARES + (("position0", "position0_abs", "positional_mass") if row["positional"] else ())
        for name in names:
            q = row[name]
            assert q["q1"] <= q["median"] <= q["q3"]
            assert -1 <= q["median"] <= 1 and (name in ("first", "position0") or q["median"] >= 0)
    # each record's shares are those of its relevance (the first token's share as Explanation has it)
    assert len(res["per_input"]) == len(families) * 2 * 2 * len(done)
    pairs = {}
    for rec in res["per_input"]:  # each prompt as it is and with a BOS first
        pairs.setdefault((rec["model"], rec["method"], rec["positional"], rec["prompt"]), []).append(rec)
    assert all(sorted(r["bos"] for r in rs) == [False, True] for rs in pairs.values())
    assert all(rs[0]["tokens"] + 1 == rs[1]["tokens"] for rs in (sorted(v, key=lambda r: r["bos"])
                                                              for v in pairs.values()))
    for rec in res["per_input"]:
        assert 0 <= rec["first_abs"] <= 1 and rec["first_abs"] == pytest.approx(abs(rec["first"]))
        assert rec["max_other"] + rec["first_abs"] <= 1 + 1e-12


def test_bench_sink_without_positional_says_the_columns_are_skipped(tmp_path, capsys, monkeypatch):
    from lxt_bench import sink

    monkeypatch.setattr(sink, "has_positional", lambda: False)
    path = tmp_path / "sink.json"
    assert sink.main(["--models", "tiny", "--families", "qwen3", "--tiny-prompts", "1",
                      "--methods", "input_x_gradient", "--json", str(path)]) == 0
    assert "positional relevance are skipped" in capsys.readouterr().out
    res = json.loads(path.read_text())
    assert res["positional"].startswith("skipped") and not any(r["positional"] for r in res["rows"])
    assert [(r["bos"], r["method"]) for r in res["rows"]] == [(False, "input_x_gradient"), (True, "input_x_gradient")]
