"""What capturing a HuggingFace forward needs beyond TorchDynamo.

transformers builds no causal mask for sdpa attention when the prompt has no padding: it
passes ``is_causal=True`` and lets grouped-query attention run on the un-repeated keys and
values (``enable_gqa``).  While TorchDynamo traces (torch < 2.14 folds
``torch.compiler.is_exporting()`` to True there) it builds the full ``n x n`` mask instead, and
then repeats keys and values to every query head.  A captured forward would keep both for
backward: about a tenth more memory than the model's own forward on Llama-family models.

For the duration of a registration, a model using ``"sdpa"`` is switched to ``"lxt_sdpa"``:
transformers' own sdpa attention function, with a mask function that skips the causal mask in
exactly the case transformers skips it outside tracing (no padding mask, plain causal mask,
no offset, query length = key length) and defers to transformers' ``sdpa_mask`` otherwise.
The forward computes the same values; ``remove()`` switches the model back.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

#: the attention implementation a registered sdpa model runs under
LXT_SDPA = "lxt_sdpa"
_REGISTERED = False


def _causal_mask_or_none(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                         mask_function=None, attention_mask=None, local_size=None,
                         allow_is_causal_skip=True, **kwargs):
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    if (allow_is_causal_skip and attention_mask is None and local_size is None
            and mask_function is causal_mask_function and isinstance(q_offset, int)
            and q_offset == 0 and q_length == kv_length):
        return None  # sdpa runs with is_causal=True
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def _register() -> bool:
    """Add ``"lxt_sdpa"`` to transformers' attention and mask registries (once; additive: no
    existing entry changes)."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover - transformers without the mask registry
        return False
    AttentionInterface.register(LXT_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(LXT_SDPA, _causal_mask_or_none)
    _REGISTERED = True
    return True


def use_causal_skip(model: nn.Module) -> Optional[Callable[[], None]]:
    """Switch an sdpa HuggingFace model to ``"lxt_sdpa"``; returns the undo, or ``None`` when
    the model is not such a model (nothing changed)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not _register():
        return None
    config._attn_implementation = LXT_SDPA

    def undo(config=config):
        config._attn_implementation = "sdpa"

    return undo
