"""Tiny random configurations of stock transformers model classes (fast unit tests)."""
import torch
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig,
                          LlamaForCausalLM, ViTConfig, ViTForImageClassification)


def tiny_llama(attn="sdpa", dtype=torch.float32, layers=2, kv_heads=2, cls=LlamaForCausalLM, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=101, max_position_embeddings=64,
                      attn_implementation=attn, **kw)
    return cls(cfg).to(dtype).eval()


def tiny_bert(attn="sdpa", dtype=torch.float32, cls=BertForSequenceClassification, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=101, max_position_embeddings=64, num_labels=3, attn_implementation=attn)
    return cls(cfg).to(dtype).eval()


def tiny_vit(attn="sdpa", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_labels=3, attn_implementation=attn)
    return ViTForImageClassification(cfg).to(dtype).eval()


def text_batch(batch=2, seq=6, vocab=101, pad_first=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and pad_first:
        mask[1, :pad_first] = 0  # left padding
        ids[1, :pad_first] = 0
    return ids, mask


def zero_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    return model


WORDS = ("the capital of france germany italy is paris berlin rome a cat sat on mat and dog ran "
         "in park big small red blue green city country river mountain").split()


def tiny_tokenizer(vocab_size=101, words=WORDS, lowercase=False):
    """A word-level tokenizer built offline (no hub), ids < vocab_size; ``[MASK]`` is the last
    id (for masked LMs).  ``lowercase`` folds case (so ``" Paris"`` is the token ``paris``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), vocab_size - 1):
        vocab[f"w{i}"] = i
    vocab["[MASK]"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]", mask_token="[MASK]")


#: tiny configurations per model_type (AutoConfig.for_model keyword arguments)
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, head_dim=8,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILY_CONFIGS = {
    "qwen3": dict(_DECODER),
    "smollm3": dict(_DECODER, no_rope_layer_interval=2),
    "qwen3_moe": dict(_DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      norm_topk_prob=True),
    "mixtral": dict(_DECODER, num_local_experts=4, num_experts_per_tok=2),
    "phi3": {k: v for k, v in _DECODER.items() if k != "head_dim"},
    "gemma": dict(_DECODER),
    "gemma2": dict(_DECODER, sliding_window=4, query_pre_attn_scalar=8),
    "gemma3_text": dict(_DECODER, sliding_window=4, query_pre_attn_scalar=8),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64),
    "roberta": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    vocab_size=101, max_position_embeddings=70, pad_token_id=1),
    "distilbert": dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=101,
                       max_position_embeddings=64),
    "deit": dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_labels=3),
}


def tiny_family(model_type, cls, attn="sdpa", dtype=torch.float32, seed=0, **kw):
    """A stock ``cls`` (e.g. ``transformers.Qwen3ForCausalLM``) with the tiny configuration of
    ``model_type`` (MoE experts run transformers' eager loop, so float64 works)."""
    from transformers import AutoConfig

    torch.manual_seed(seed)
    options = dict(FAMILY_CONFIGS[model_type])
    options.update(kw)
    cfg = AutoConfig.for_model(model_type, **options)
    cfg._attn_implementation = attn
    if hasattr(cfg, "_experts_implementation"):
        cfg._experts_implementation = "eager"
    return cls(cfg).to(dtype).eval()


def zero_position_embeddings(model):
    """Learned position / token-type embeddings set to 0 (constants that absorb relevance like
    biases; conservation tests remove them with the biases)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Embedding) and any(
                    k in name for k in ("position", "token_type", "wpe")):
                module.weight.zero_()
    return model
