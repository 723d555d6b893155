"""Keep lxt's rule modules opaque to TorchDynamo.

A rule runs an autograd Function whose forward keeps a sub-graph and whose backward calls
``torch.autograd.grad``: Dynamo must not trace into it.  When a model holding lxt modules is
captured, each lxt module call becomes one graph node calling :func:`opaque_module_call` with the
module's integer key; at run time the node calls the module's rule, and during Dynamo's
fake-tensor shape propagation it runs the module on fake copies of its parameters.
"""
from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor, nn


_LAZY_CLONE = getattr(torch, "_lazy_clone", None)


def snapshot(t: Tensor) -> Tensor:
    """``t`` as a copy-on-write clone: no copy is made unless one of the two is written to
    (torch's lazy clone; where a torch build lacks it, ``t`` itself).  A tensor whose storage
    the lazy clone cannot share (weights memory-mapped from a safetensors file by
    ``from_pretrained``: "Expected storage != nullptr") is copied."""
    if _LAZY_CLONE is None:
        return t
    try:
        return _LAZY_CLONE(t)
    except RuntimeError:
        return t.clone()

#: key -> lxt module (:class:`lxt.rules.base.LxtModule` registers itself here)
_MODULES: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _fake_mode(args, kwargs):
    for a in itertools.chain(args, kwargs.values()):
        if _is_fake(a):
            return a.fake_mode
    return None


@torch._dynamo.allow_in_graph
def opaque_module_call(key: int, *args, **kwargs):
    """Call the lxt module registered under ``key`` (see module docstring)."""
    module = _MODULES[key]
    mode = _fake_mode(args, kwargs)
    if mode is None:
        return module._lrp_call(*args, **kwargs)
    # shape propagation at capture time: same computation on fake parameters (a module whose
    # forward depends on data, e.g. MoE routing, gives its output's shape by ``fake_forward``)
    fake = getattr(module, "fake_forward", None)
    if fake is not None:
        return fake(*args, **kwargs)
    state = {n: mode.from_tensor(t, static_shapes=True) for n, t in
             itertools.chain(module.named_parameters(), module.named_buffers())}
    return torch.func.functional_call(_Plain(module), _prefixed(state), args, kwargs)


def _prefixed(state):
    return {"m." + k: v for k, v in state.items()}


class _Plain(nn.Module):
    """Runs ``m.lrp_forward`` (not the opaque dispatch) under ``functional_call``."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *args, **kwargs):
        return self.m.lrp_forward(*args, **kwargs)


# ---------------------------------------------------------------------- taps
_TAPS: dict = {}


class _Tap(torch.autograd.Function):
    """Identity whose backward hands the incoming gradient (and the tapped value) to a
    callback."""

    @staticmethod
    def forward(ctx, key, t):
        ctx.key = key
        ctx.save_for_backward(t)
        return snapshot(t.detach())  # not a view: later code may change it in place

    @staticmethod
    def backward(ctx, grad):
        callback = _TAPS.get(ctx.key)
        if callback is not None:
            (t,) = ctx.saved_tensors
            callback(grad, t)
        return None, grad


@torch._dynamo.allow_in_graph
def tap(key: int, t):
    """``t`` unchanged; in backward, ``callback(gradient, t)`` for the callback registered
    under ``key`` with :func:`add_tap` (the gradient is the relevance of ``t`` in the explicit
    engine, ``R / t`` in the gradient engine).  One opaque node under TorchDynamo (no graph
    break)."""
    if _is_fake(t) or not t.requires_grad:
        return t.view_as(t)
    return _Tap.apply(key, t)


def add_tap(callback) -> int:
    key = next(_KEYS)
    _TAPS[key] = callback
    return key


def remove_tap(key: int) -> None:
    _TAPS.pop(key, None)
