"""Assertions the tests share: what registering a model may touch, and that it all came back."""
import contextlib

import torch


def snapshot(model):
    """Everything register may touch."""
    return {
        "modules": [(n, m) for n, m in model.named_modules()],
        "forward_in_dict": "forward" in model.__dict__,
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "dicts": {n: sorted(m.__dict__) for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_restored(model, snap):
    now = snapshot(model)
    assert [n for n, _ in now["modules"]] == [n for n, _ in snap["modules"]]
    for (n, a), (_, b) in zip(now["modules"], snap["modules"]):
        assert a is b, f"module {n} is not the original object"
    assert now["forward_in_dict"] == snap["forward_in_dict"]
    assert now["requires_grad"] == snap["requires_grad"]
    assert now["state"].keys() == snap["state"].keys()
    for k in snap["state"]:
        assert torch.equal(now["state"][k], snap["state"][k]), k
    assert now["dicts"] == snap["dicts"], "an attribute was left on a module"
    assert now["hooks"] == snap["hooks"]
    assert now["training"] == snap["training"], "a module's training flag changed"
    for m in model.modules():
        assert not type(m).__module__.startswith("lxt"), f"lxt module left: {type(m)}"


@contextlib.contextmanager
def forward_refused(model):
    """Inside the block any forward of ``model`` fails the test: arguments must be checked
    before the model runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran before the arguments were checked")

    handle = model.register_forward_pre_hook(refuse)
    try:
        yield
    finally:
        handle.remove()


def vlm_relevance(model, batch, target, lrp: bool, gradient_engine: bool = False):
    """A vision-language model's relevance (``lrp``: the composite's, started with the explained
    logit; else input x gradient) per text token and per element of ``pixel_values``: the input
    embeddings' output made a leaf by a forward hook (the model is called with input_ids, as a
    VLM must be), pixel_values a leaf.  Returns (text, pixels, logits, explained value)."""
    leaves = []

    def hook(module, args, out):
        leaves.append(out.detach().requires_grad_())
        return leaves[-1]

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        px = batch["pixel_values"].detach().clone().requires_grad_()
        out = model(**{**batch, "pixel_values": px}, use_cache=False).logits
        value = out[0, -1, target]
        value.backward(value.detach() if lrp else torch.ones_like(value))
    finally:
        handle.remove()
    emb = leaves[0]
    if lrp:
        text = emb.grad * emb.detach() if gradient_engine else emb.grad
        pixels = px.grad
    else:
        text, pixels = emb.grad * emb.detach(), px.grad * px.detach()
    return text.detach().sum(-1)[0], pixels.detach(), out.detach(), float(value.detach())
