"""Tiny random configurations of stock transformers model classes (fast unit tests)."""
import torch
from transformers import (BertConfig, BertForSequenceClassification, BertModel, LlamaConfig,
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
