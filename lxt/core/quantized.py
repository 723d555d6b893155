"""Quantised layers (bitsandbytes) as lxt meets them.

A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` is an ``nn.Linear`` subclass whose forward
de-quantises (4-bit) or quantises the activations too (8-bit, in eval mode) and runs its own
autograd Function; under the epsilon rule that is its plain gradient, so a composite leaves it
as it is.  One state has no backward at all: on CPUs with AVX512-BF16, bitsandbytes repacks a
4-bit layer's weights for its inference kernel at the first forward whose input needs no
gradient (``generate``, a ``torch.no_grad()`` forward), and the repacked layer's matmul passes
no gradient (every token's relevance but what flows around the layers would be lost).
"""
from __future__ import annotations

import contextlib
from typing import Callable

from torch import nn


def _is_bnb_4bit(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and hasattr(module, "support_avx512bf16_for_cpu")


def _repacked(module: nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_cpu_layout(model) -> Callable[[], None]:
    """Refuse a model whose 4-bit layers bitsandbytes already repacked (one line naming the
    layer and the fix), and keep it from repacking them while lxt holds the model; returns the
    undo (the layers' own setting back).  ``model``: the model, or its ``named_modules()``."""
    named = model.named_modules() if isinstance(model, nn.Module) else model
    layers = [(name, m) for name, m in named if _is_bnb_4bit(m)]
    packed = [name for name, m in layers if _repacked(m)]
    if packed:
        more = f" (and {len(packed) - 1} more)" if len(packed) > 1 else ""
        raise RuntimeError(
            f"lxt: the 4-bit layer '{packed[0]}'{more} was repacked by bitsandbytes for its CPU "
            "inference kernel (at a forward without gradients, e.g. generate), whose matmul has "
            "no backward: relevance would be lost. Reload the model and explain it before such "
            "a forward (lxt.explain(..., generate=N) generates without repacking), or set "
            "support_avx512bf16_for_cpu = False on its Linear4bit layers right after loading.")
    key = "support_avx512bf16_for_cpu"
    flags = [(m, key in m.__dict__, m.__dict__.get(key)) for _, m in layers]
    for m, _, _ in flags:
        m.__dict__[key] = False

    def undo(flags=flags):
        for m, had, flag in flags:
            if had:
                m.__dict__[key] = flag
            else:
                m.__dict__.pop(key, None)

    return undo


@contextlib.contextmanager
def cpu_layout_kept(model: nn.Module):
    """:func:`keep_cpu_layout` for the duration of a block."""
    undo = keep_cpu_layout(model)
    try:
        yield
    finally:
        undo()
