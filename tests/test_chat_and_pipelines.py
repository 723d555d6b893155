"""Where users' inputs come from: transformers pipelines, chat messages, token ids.

Each input form is checked against what the library that made it does on its own: the ids of
a pipeline's preprocessing and its prediction, the ids of ``apply_chat_template``, and the
explanation of the text that gives the same ids."""
import json

import pytest
import torch
from transformers import BertForMaskedLM, pipeline

import lxt
from lxt.cli import main
from helpers import forward_refused
from models import WORDS, tiny_bert, tiny_llama, tiny_tokenizer

PROMPT = "the capital of france is"
CHAT_WORDS = [*WORDS, "<s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "be", "brief"]
#: ChatML that writes the BOS itself (as Llama 3's and many others do)
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(template=TEMPLATE):
    """A word-level tokenizer that puts a BOS ``<s>`` before every text (as Llama's does), with
    a chat template; its special tokens are words of the 101-id vocabulary."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_tokenizer(words=CHAT_WORDS).get_vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True)
                            for t in ("<s>", "<|im_start|>", "<|im_end|>", "[PAD]", "[UNK]", "[MASK]")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="<|im_end|>", mask_token="[MASK]")
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def llm():
    return tiny_llama(), chat_tokenizer()


def same(a, b):
    """Two explanations of the same ids: the same tokens, target and (bit for bit) relevance."""
    assert a.tokens == b.tokens and a.target_id == b.target_id and a.position == b.position
    assert torch.equal(a.relevance, b.relevance) and a.logit == b.logit


def chat(turns):
    """Messages from ``(role, content)`` pairs."""
    return [{"role": r, "content": c} for r, c in turns]


# ---------------------------------------------------------------------- pipelines
def test_text_generation_pipeline_explains_its_own_ids_and_its_own_prediction(llm):
    model, tok = llm
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    exp = lxt.explain(pipe, PROMPT)
    ids = pipe.preprocess(PROMPT)["input_ids"][0]  # the pipeline's preprocessing: BOS once
    assert ids[0] == tok.bos_token_id and ids.tolist().count(tok.bos_token_id) == 1
    same(exp, lxt.explain(model, tok, ids))
    same(exp, lxt.explain(pipe.model, pipe.tokenizer, PROMPT))
    same(exp, lxt.explain(pipe, tokenizer=None, inputs=PROMPT))
    out = pipe(PROMPT, max_new_tokens=1, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert out[:-1] == ids.tolist() and out[-1] == exp.target_id


def test_text_classification_pipeline_explains_its_label():
    bert, tok = tiny_bert(), tiny_tokenizer()
    pipe = pipeline("text-classification", model=bert, tokenizer=tok)
    exp = lxt.explain(pipe, PROMPT)
    same(exp, lxt.explain(bert, tok, pipe.preprocess(PROMPT)["input_ids"])[0])
    label = pipe(PROMPT)[0]["label"]
    assert exp.target == bert.config.label2id[label]


def test_fill_mask_pipeline_explains_the_mask_position_and_its_top_token():
    bert, tok = tiny_bert(cls=BertForMaskedLM), tiny_tokenizer()
    pipe = pipeline("fill-mask", model=bert, tokenizer=tok)
    text = "the capital of [MASK] is paris"
    exp = lxt.explain(pipe, text)
    same(exp, lxt.explain(bert, tok, pipe.preprocess(text)["input_ids"][0]))
    assert exp.tokens[exp.position] == "[MASK]" and exp.target_id == pipe(text, top_k=1)[0]["token"]


def test_text_generation_pipeline_with_chat_messages_gives_its_ids_and_prediction(llm):
    model, tok = llm
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    messages = chat([("user", PROMPT)])
    exp = lxt.explain(pipe, messages)
    out = pipe(messages, max_new_tokens=1, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    same(exp, lxt.explain(model, tok, out[:-1]))
    assert out[-1] == exp.target_id


# ---------------------------------------------------------------------- chat messages
def test_chat_ids_are_the_templates_own_with_the_bos_once(llm):
    model, tok = llm
    messages = chat([("system", "be brief"), ("user", PROMPT)])
    exp = lxt.explain(model, tok, messages)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    same(exp, lxt.explain(model, tok, ids))
    assert exp.tokens.count("<s>") == 1 and exp.tokens[0] == "<s>" and exp.tokens[-1] == "assistant"
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert exp.prompt == rendered and tok(rendered)["input_ids"][:2] == [tok.bos_token_id] * 2  # the bug avoided


@pytest.mark.parametrize("turns,marked", [
    ([("user", PROMPT)], PROMPT),
    ([("system", "the capital"), ("user", "the capital")], "the capital"),  # the same text twice
    ([("user", "a cat"), ("assistant", "a dog"), ("user", "the mat")], "a cat the mat"),
    ([("user", "the city"), ("assistant", "paris is")], "the city"),  # continues the answer
])
def test_the_marked_tokens_are_the_users_messages(llm, turns, marked):
    model, tok = llm
    exp = lxt.explain(model, tok, chat(turns))
    assert len(exp.in_user_message) == len(exp.tokens)
    assert " ".join(t for t, u in zip(exp.tokens, exp.in_user_message) if u) == marked
    assert exp.to_dict()["in_user_message"] == exp.in_user_message
    if turns[-1][0] == "assistant":  # prefilled answer: the next token after it, no new header
        assert exp.tokens[-2:] == ["paris", "is"]
    assert lxt.explain(model, tok, PROMPT).in_user_message is None


def test_a_batch_of_conversations_is_each_alone(llm):
    model, tok = llm
    chats = [chat([("user", PROMPT)]), chat([("system", "be brief"), ("user", "a cat sat on the mat")])]
    for exp, one in zip(lxt.explain(model, tok, chats, batch_size=2), chats):
        alone = lxt.explain(model, tok, one)
        assert exp.tokens == alone.tokens and exp.in_user_message == alone.in_user_message
        torch.testing.assert_close(exp.relevance, alone.relevance, rtol=1e-5, atol=1e-6)


def test_generate_continues_the_rendered_conversation(llm):
    model, tok = llm
    messages = chat([("user", PROMPT)])
    exps = lxt.explain(model, tok, messages, generate=3)
    first = lxt.explain(model, tok, messages)
    same(exps[0], first)
    for k, e in enumerate(exps):
        n = len(first.tokens) + k
        assert len(e.tokens) == n and e.in_user_message == first.in_user_message + [False] * k
        if k:
            assert e.tokens[-1] == exps[k - 1].target


def test_heatmaps_mark_the_users_message(llm, tmp_path, monkeypatch):
    from lxt import viz

    model, tok = llm
    exp = lxt.explain(model, tok, chat([("user", PROMPT)]))
    n = sum(exp.in_user_message)
    page = exp.to_html()
    assert page.count('class="tok user"') == n and page.count('class="tok"') == len(exp.tokens) - n
    assert viz.terminal(exp).count("\x1b[4m") == n and "underlined" in viz.terminal(exp)
    import matplotlib.axes

    boxes, text = [], matplotlib.axes.Axes.text

    def spy(self, x, y, s, *args, **kwargs):
        if "bbox" in kwargs:
            boxes.append((s, kwargs["bbox"]["edgecolor"] != "none"))
        return text(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", spy)
    assert exp.to_png(str(tmp_path / "o.png")) and (tmp_path / "o.png").read_bytes()[:4] == b"\x89PNG"
    assert [b for _, b in boxes] == exp.in_user_message
    plain = lxt.explain(model, tok, PROMPT)
    assert "tok user" not in plain.to_html() and "\x1b[4m" not in viz.terminal(plain)


# ---------------------------------------------------------------------- token ids
def test_token_ids_give_the_explanation_of_their_text(llm):
    model, tok = llm
    texts = [PROMPT, "a cat sat on the mat"]
    ids = [tok(t)["input_ids"] for t in texts]
    one = lxt.explain(model, tok, texts[0])
    same(lxt.explain(model, tok, ids[0]), one)
    same(lxt.explain(model, tok, torch.tensor(ids[0])), one)
    same(lxt.explain(model, tok, torch.tensor(ids[0], dtype=torch.int32)[None])[0], one)
    for a, b in zip(lxt.explain(model, tok, ids), lxt.explain(model, tok, texts)):  # two lengths
        same(a, b)
    assert lxt.explain(model, tok, ids[0]).prompt == tok.decode(ids[0])


# ---------------------------------------------------------------------- refusals
@pytest.fixture
def never_runs(llm):
    model, tok = llm
    with forward_refused(model):
        yield model, tok


RAISES = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
SAME = lambda m, t: (m, t)  # noqa: E731 - the fixture's model and chat tokenizer


@pytest.mark.parametrize("make,inputs,kwargs,error,match", [
    (lambda m, t: (m, tiny_tokenizer()), chat([("user", "the cat")]), {}, ValueError, "has no chat template"),
    (SAME, [{"role": "user"}], {}, TypeError, "message 1 of the conversation must be a dict with 'role' and 'content'"),
    (SAME, [{"role": "user", "content": "a"}, "the cat"], {}, TypeError, "message 2 .* got 'the cat'"),
    (SAME, [{"role": "user", "content": 3}], {}, TypeError, "'content' strings"),
    (SAME, [chat([("user", "a")]), []], {}, ValueError, "conversation 2 has no messages"),
    (lambda m, t: (m, chat_tokenizer(RAISES)), chat([("user", "a")]), {}, ValueError,
     "chat template cannot render the conversation: Conversation roles must alternate"),
    (SAME, [chat([("user", "a")])] * 2, {"generate": 2}, ValueError, "generate= continues one prompt"),
    (SAME, [3, 4, 500], {}, ValueError, "token id 500, outside the model's vocabulary of 101"),
    (SAME, [3, -4], {}, ValueError, "token ids must be >= 0"),
    (SAME, [], {}, ValueError, "no prompt given"),
    (SAME, [[3, 4], []], {}, ValueError, "empty prompt: input 2 has no token ids"),
    (SAME, [3, "the"], {}, TypeError, "token ids must be ints"),
    (SAME, torch.ones(2, 3, dtype=torch.bool), {}, TypeError, "torch.bool tensor.*1-D or 2-D integer"),
    (SAME, torch.ones(1, 2, 3, dtype=torch.long), {}, TypeError, "torch.int64 tensor of shape"),
    (lambda m, t: (pipeline("feature-extraction", model=tiny_bert(), tokenizer=tiny_tokenizer()), None),
     "the cat", {}, TypeError, "not 'feature-extraction'; pass its model: lxt.explain\\(pipe.model"),
    (lambda m, t: (pipeline("text-generation", model=m, tokenizer=t), tiny_tokenizer()), "the cat", {},
     TypeError, "a pipeline brings its own tokenizer"),
])
def test_bad_inputs_are_one_line_errors_before_the_model_runs(never_runs, make, inputs, kwargs, error, match):
    model, tok = make(*never_runs)
    with pytest.raises(error, match=match) as info:
        lxt.explain(model, tok, inputs, **kwargs)
    assert str(info.value).startswith("lxt: ") and "\n" not in str(info.value)


# ---------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, llm):
    d = tmp_path_factory.mktemp("tiny-chat")
    model, tok = llm
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_chat_explains_the_rendered_message(chat_model_dir, llm, tmp_path, capsys):
    model, tok = llm
    out = tmp_path / "o.jsonl"
    assert main(["explain", "--chat", PROMPT, "--system", "be brief", "--model", str(chat_model_dir),
                 "--jsonl", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "underlined" in shown and "\x1b[4m" in shown
    (rec,) = _records(out)
    ref = lxt.explain(model, tok, chat([("system", "be brief"), ("user", PROMPT)]))
    assert rec["tokens"] == ref.tokens and rec["in_user_message"] == ref.in_user_message
    assert rec["target_id"] == ref.target_id and rec["prompt"] == ref.prompt
    torch.testing.assert_close(torch.tensor(rec["relevance"]), ref.relevance, rtol=1e-5, atol=1e-6)


def test_cli_chat_with_a_file_is_one_user_message_per_line(chat_model_dir, llm, tmp_path):
    model, tok = llm
    lines = [PROMPT, "a cat sat on the mat"]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["explain", "--chat", "--file", str(tmp_path / "p.txt"), "--model", str(chat_model_dir),
                 "--jsonl", str(out), "--quiet"]) == 0
    for rec, line in zip(_records(out), lines):
        ref = lxt.explain(model, tok, chat([("user", line)]))
        assert rec["prompt"] == line and rec["options"]["chat"] is True
        assert rec["tokens"] == ref.tokens and rec["in_user_message"] == ref.in_user_message


@pytest.mark.parametrize("argv,match", [
    (["explain", "the cat", "--system", "be brief", "--model", "nowhere"], "--system is for --chat"),
    (["explain", "--chat", "the cat", "--system", " ", "--model", "nowhere"], "empty --system"),
    (["explain", "--chat", " ", "--model", "nowhere"], "empty prompt"),
    (["explain", "--chat", "the cat", "--model", "PLAIN"], "--chat needs a chat template"),
])
def test_cli_chat_refusals_are_one_line(argv, match, model_dir, capsys):
    argv = [str(model_dir) if a == "PLAIN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lxt: error: ") and match in err and err.count("\n") == 1
