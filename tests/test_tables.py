"""The shipped tables, pinned: ``comp.summary()`` of every family, both methods, both engines,
both attention implementations and a non-default epsilon, equal to the text recorded in
``tests/golden/summaries.json`` (what each module and each operation of the forward gets).

A change of a table shows here as a diff of the summary; when it is meant, record the new
summaries with ``python tests/test_tables.py --write`` (main environment, and the
torchvision case in the vision environment) and say why in the commit.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tr

import lxt.composites
from models import FAMILY_CONFIGS, _DECODER, text_batch, tiny_family

GOLDEN = Path(__file__).parent / "golden" / "summaries.json"

#: model_type -> (stock class, input kind, attention implementations)
MODELS = {
    "llama": (tr.LlamaForCausalLM, "text", ("sdpa", "eager")),
    "mistral": (tr.MistralForCausalLM, "text", ("sdpa",)),
    "qwen2": (tr.Qwen2ForCausalLM, "text", ("sdpa",)),
    "qwen3": (tr.Qwen3ForCausalLM, "text", ("sdpa", "eager")),
    "smollm3": (tr.SmolLM3ForCausalLM, "text", ("sdpa",)),
    "qwen3_moe": (tr.Qwen3MoeForCausalLM, "text", ("sdpa",)),
    "mixtral": (tr.MixtralForCausalLM, "text", ("sdpa",)),
    "phi3": (tr.Phi3ForCausalLM, "text", ("sdpa",)),
    "gemma": (tr.GemmaForCausalLM, "text", ("sdpa",)),
    "gemma2": (tr.Gemma2ForCausalLM, "text", ("eager",)),
    "gemma3_text": (tr.Gemma3ForCausalLM, "text", ("sdpa", "eager")),
    "gemma3": (tr.Gemma3ForConditionalGeneration, "text", ("sdpa",)),
    "gpt2": (tr.GPT2LMHeadModel, "text", ("sdpa", "eager")),
    "bert": (tr.BertForSequenceClassification, "text", ("sdpa", "eager")),
    "roberta": (tr.RobertaForMaskedLM, "text", ("sdpa",)),
    "distilbert": (tr.DistilBertForMaskedLM, "text", ("sdpa",)),
    "vit": (tr.ViTForImageClassification, "image", ("sdpa", "eager")),
    "deit": (tr.DeiTForImageClassification, "image", ("sdpa",)),
    # no table names these: the structural table
    "olmo2": (tr.Olmo2ForCausalLM, "text", ("sdpa",)),
    "granite": (tr.GraniteForCausalLM, "text", ("sdpa",)),
    "starcoder2": (tr.Starcoder2ForCausalLM, "text", ("sdpa",)),
    "torchvision-vit": (None, "image32", ("native",)),
}
_EXTRA = {
    "llama": dict(_DECODER), "mistral": dict(_DECODER), "qwen2": dict(_DECODER),
    "bert": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=101, max_position_embeddings=64, num_labels=3),
    "vit": dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_labels=3),
    **{mt: dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
       for mt in ("olmo2", "granite", "starcoder2")},
}
#: (method, engine, epsilon) per attention implementation: every combination on the first
#: implementation; AttnLRP and CP-LRP in the gradient engine on the others
SETTINGS = [(m, e, eps) for m in ("attnlrp", "cp_lrp") for e in ("gradient", "explicit") for eps in (None, 1e-3)]
OTHER_ATTN = [(m, "gradient", None) for m in ("attnlrp", "cp_lrp")]


def cases():
    for model_type, (_, _, attns) in MODELS.items():
        for i, attn in enumerate(attns):
            for method, engine, eps in (SETTINGS if i == 0 else OTHER_ATTN):
                yield f"{model_type}/{attn}/{method}/{engine}/eps={eps}", model_type, attn, method, engine, eps


def build(model_type, attn):
    cls, kind, _ = MODELS[model_type]
    if model_type == "torchvision-vit":
        from torchvision.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                  mlp_dim=64, num_classes=10).eval()
    elif model_type == "gemma3":
        torch.manual_seed(0)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=16, patch_size=4)
        cfg = tr.Gemma3Config(text_config=dict(FAMILY_CONFIGS["gemma3_text"]), vision_config=vision,
                              mm_tokens_per_image=4, image_token_index=100, boi_token_index=98,
                              eoi_token_index=99)
        cfg._attn_implementation = attn
        model = cls(cfg).eval()
    elif model_type in FAMILY_CONFIGS:
        model = tiny_family(model_type, cls, attn=attn)
    else:
        torch.manual_seed(0)
        cfg = tr.AutoConfig.for_model(model_type, **_EXTRA[model_type])
        cfg._attn_implementation = attn
        model = cls(cfg).eval()
    g = torch.Generator().manual_seed(1)
    if kind == "image":
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    elif kind == "image32":
        inputs = {"x": torch.randn(2, 3, 32, 32, generator=g)}
    else:
        ids, mask = text_batch(pad_first=2 if attn == "sdpa" else 0)
        inputs = {"input_ids": ids, "attention_mask": mask}
    return model, inputs


def summary_text(model, inputs, method, engine, eps) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the structural table's notice
        comp = getattr(lxt.composites, method)(model, epsilon=eps, engine=engine)
    with comp.context(model):
        model(**inputs)
        return str(comp.summary())


_built: dict = {}


def _model(model_type, attn):
    if (model_type, attn) not in _built:
        _built.clear()  # one model at a time (cases come grouped by model)
        _built[(model_type, attn)] = build(model_type, attn)
    return _built[(model_type, attn)]


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case,model_type,attn,method,engine,eps", list(cases()), ids=lambda v: None)
def test_summary_is_the_recorded_one(golden, case, model_type, attn, method, engine, eps):
    if model_type == "torchvision-vit":
        pytest.importorskip("torchvision")
    model, inputs = _model(model_type, attn)
    assert summary_text(model, inputs, method, engine, eps) == golden[case]


def test_every_case_is_recorded(golden):
    assert sorted(golden) == sorted(c[0] for c in cases())


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    out = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    for case, model_type, attn, method, engine, eps in cases():
        if model_type == "torchvision-vit":
            try:
                import torchvision  # noqa: F401
            except ImportError:
                continue
        model, inputs = _model(model_type, attn)
        out[case] = summary_text(model, inputs, method, engine, eps)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{len(out)} summaries -> {GOLDEN}")
