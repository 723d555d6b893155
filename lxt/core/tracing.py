"""Capture a model's forward with TorchDynamo and rewrite its functional calls.

The model's ``forward`` is replaced (instance attribute) by a trampoline with a code object of
its own, compiled with a backend that rewrites each captured ``torch.fx`` graph and runs it
eagerly.  Dynamo's cache lives on that code object only, so a registration never shares
compiled code with another model, another composite or the user's own ``torch.compile``, and
removing it drops the cache with it.
"""
from __future__ import annotations

import itertools
import operator
import re
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import fx

from ..rules.base import gradient_to_relevance, relevance_to_gradient
from .opaque import opaque_module_call, tap

_TRAMPOLINES = itertools.count(1)

#: ops whose plain gradient already is the LRP relevance (pure data movement or
#: relevance-neutral for the rules used here)
COMPATIBLE = {
    "view", "reshape", "permute", "transpose", "contiguous", "expand", "expand_as", "unsqueeze",
    "squeeze", "flatten", "unflatten", "getitem", "cat", "stack", "split", "chunk", "to", "float",
    "double", "bfloat16", "half", "type_as", "clone", "detach", "dropout", "embedding", "repeat",
    "repeat_interleave", "narrow", "select", "index_select", "gather", "masked_fill", "movedim",
    "t", "T", "flip", "roll", "pad", "unbind", "view_as", "reshape_as", "identity", "where",
    "_set_grad_enabled", "_log_api_usage_once", "interpolate", "type",
    # top-k values are a selection of the input (MoE routers)
    "topk",
}
#: ops whose plain gradient is not relevance (LRP needs a rule there)
NOT_LRP_SAFE = {
    "add", "iadd", "sub", "isub", "mul", "imul", "truediv", "div", "neg", "matmul", "bmm", "mm",
    "linear", "conv1d", "conv2d", "conv3d", "softmax", "log_softmax", "layer_norm", "rms_norm",
    "group_norm", "batch_norm", "mean", "sum", "pow", "rsqrt", "sqrt", "exp", "log", "tanh",
    "sigmoid", "silu", "gelu", "relu", "scaled_dot_product_attention", "einsum", "baddbmm",
    "addmm", "normalize", "cos", "sin", "abs", "max", "min", "amax", "logsumexp", "erf",
}


#: status of a call the layer map maps to ``None`` (plain gradient by the user's choice)
CHOSEN_PLAIN = "None in the layer map"
#: statuses of calls left with plain gradients that are not unsafe
PLAIN_OK = ("compatible", CHOSEN_PLAIN)


def target_name(target) -> str:
    """Short name of a graph node's target (``operator.add`` -> ``add``)."""
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", None) or repr(target)


def classify(target) -> str:
    if target is tap:  # lxt's own identity (latent relevance)
        return "compatible"
    name = target_name(target).strip("_")
    if name in COMPATIBLE:
        return "compatible"
    if name in NOT_LRP_SAFE:
        return "not LRP-safe"
    return "unknown"


@dataclass
class OpRecord:
    """One captured operation: where it is, what it is, what it got."""

    module: str
    op: str
    status: str  # the rule / functional it got, or compatible / not LRP-safe / unknown
    rewritten: bool
    graph: int
    on_path: bool = True  # its output required grad when captured (relevance flows through it)


@dataclass
class Capture:
    """What the backend saw: one entry per captured graph."""

    graphs: list = field(default_factory=list)  # list[list[OpRecord]]
    failure: Optional[str] = None
    graph_breaks: int = 0
    warned: set = field(default_factory=set)  # (op, module) pairs already warned about


def _floating_tensor_meta(arg) -> bool:
    if isinstance(arg, fx.Node):
        v = arg.meta.get("example_value")
        return isinstance(v, torch.Tensor) and v.is_floating_point()
    return False


def _any_floating(node: fx.Node) -> bool:
    return any(_floating_tensor_meta(a) for a in itertools.chain(node.args, node.kwargs.values()))


def is_inplace(target) -> bool:
    """Whether a graph call mutates its first argument (``operator.iadd``, ``"add_"``, ...)."""
    name = target_name(target)
    if target in _INPLACE_OPERATORS:
        return True
    return name.endswith("_") and not name.startswith("_")


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul}


def _aliases_value(node: fx.Node, root) -> bool:
    v = node.meta.get("example_value")
    return isinstance(v, torch.Tensor) and (v is root or v._base is root)


def rewrite_inplace(graph: fx.Graph, node: fx.Node, replacement: Callable, where: str) -> None:
    """Rewrite an in-place call (``h.add_(x)``, ``h += x``) to the out-of-place ``replacement``
    and keep its semantics: every later use of the mutated tensor reads the new node.

    Refused (``ValueError``) where that cannot be done inside the graph: the mutated tensor is
    a graph input (a model input, parameter or buffer, changed for the caller too) or another
    view of its storage is read after the call.
    """
    mutated = node.args[0] if node.args else None
    value = mutated.meta.get("example_value") if isinstance(mutated, fx.Node) else None
    op = target_name(node.target)
    hint = (f"Write it out of place (h = h + x instead of h.add_(x) / h += x), or map {op!r} "
            "to None in the composite's layer map to leave it with plain gradients.")
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"lxt: cannot rewrite the in-place call {op!r} in {where}: its first "
                         f"argument is not a tensor of the graph. {hint}")
    root = value if value._base is None else value._base
    order = {n: i for i, n in enumerate(graph.nodes)}
    here = order[node]
    for other in graph.nodes:
        if order[other] >= here or not _aliases_value(other, root):
            continue
        if other.op in ("placeholder", "get_attr"):
            raise ValueError(
                f"lxt: {op!r} in {where} changes a tensor in place that the graph did not create "
                "(a model input, parameter or buffer, or a view of one); a rule cannot keep that "
                f"in-place semantics. {hint}")
        same = other.meta.get("example_value") is value
        if not same and any(order[u] > here for u in other.users):
            raise ValueError(
                f"lxt: {op!r} in {where} changes a tensor in place that is read later through "
                f"another view of it ({other.name}); a rule cannot keep that in-place semantics. "
                f"{hint}")
    node.op = "call_function"
    node.target = replacement
    # the mutated tensor (and every earlier node that is the same tensor) now reads the result
    for other in list(graph.nodes):
        if order.get(other, here) >= here or other.meta.get("example_value") is not value:
            continue
        for user in list(other.users):
            if order.get(user, -1) > here:
                user.replace_input_with(other, node)


def module_stack(node: fx.Node, names: dict) -> list:
    """``[(qualified_name, module_type), ...]`` outermost -> innermost for a node."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, (path, typ) in stack.items():
        name = names.get(str(key))
        if name is None:
            name = str(path).replace("L['self']", "", 1).lstrip(".")
        out.append((name, typ))
    return out


_SDPA = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def _repeated(node) -> Optional[tuple]:
    """``(kv, n_rep)`` when ``node`` is ``kv[:, :, None].expand(b, h, n_rep, s, d).reshape(b,
    h * n_rep, s, d)`` (transformers' ``repeat_kv``), else ``None``."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "reshape"):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand"
            and len(expand.args) == 6 and len(expand.users) == 1):
        return None
    index = expand.args[0]
    if not (isinstance(index, fx.Node) and index.op == "call_function" and index.target is operator.getitem
            and len(index.users) == 1):
        return None
    kv, key = index.args
    full = slice(None)
    if key != (full, full, None, full, full):
        return None
    n_rep = expand.args[3]
    return (kv, n_rep) if isinstance(n_rep, int) and n_rep > 1 else None


def ungroup_repeated_kv(graph: fx.Graph) -> int:
    """Grouped-query attention as one fused call: an sdpa call on keys and values repeated to
    every query head (``repeat_kv``, which transformers uses whenever it builds a mask, as it
    does under TorchDynamo) runs on the un-repeated ones with ``enable_gqa=True`` instead.
    Same values; the repeated copies are neither made nor kept for backward."""
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA or node.kwargs.get("enable_gqa"):
            continue
        if len(node.args) < 3:
            continue
        k, v = _repeated(node.args[1]), _repeated(node.args[2])
        if k is None or v is None or k[1] != v[1] or len(node.args[1].users) != 1 or len(node.args[2].users) != 1:
            continue
        old = node.args[1:3]
        node.args = (node.args[0], k[0], v[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        for reshaped in old:  # reshape -> expand -> getitem, now unused
            expand = reshaped.args[0]
            index = expand.args[0]
            graph.erase_node(reshaped)
            graph.erase_node(expand)
            graph.erase_node(index)
        done += 1
    return done


def _constant_args(target) -> tuple:
    """Arguments (positions, keyword names) of a replacement that receive no relevance."""
    while target is not None:
        consts = getattr(target, "lxt_constant_args", None)
        if consts is not None:
            return consts
        target = getattr(target, "__wrapped__", None)
    return ()


def _passes_relevance(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` passes relevance to its argument ``node``."""
    consts = _constant_args(user.target) if user.op == "call_function" else ()
    uses = [i for i, a in enumerate(user.args)
            if a is node or (isinstance(a, (list, tuple)) and node in a)]
    uses += [k for k, a in user.kwargs.items()
             if a is node or (isinstance(a, (list, tuple)) and node in a)]
    return any(u not in consts for u in uses)


def _carries_relevance(graph: fx.Graph) -> set:
    """The nodes whose value relevance reaches in backward: used by the graph's output, or by
    a node that carries relevance and passes it to them (a divisor detached by its rule does
    not).  An in-place call left as it is carries relevance when the tensor it changes does."""
    carries: set = set()
    while True:
        before = len(carries)
        for node in reversed(graph.nodes):
            if node in carries:
                continue
            if (node.op in ("call_function", "call_method") and is_inplace(node.target)
                    and node.args and node.args[0] in carries):
                carries.add(node)
                continue
            for user in node.users:
                if user.op == "output" or (user in carries and _passes_relevance(user, node)):
                    carries.add(node)
                    break
        if len(carries) == before:
            return carries


def unsafe_ops(records) -> list:
    """The operations of ``records`` on the relevance path that kept a plain gradient but need
    an LRP rule."""
    return [r for r in records if r.on_path and not r.rewritten and r.status not in PLAIN_OK]


def describe_ops(records) -> str:
    """``mul in model.layers.*.mlp (30 modules), lm_head; neg in (top level)``: each op with
    the modules it sits in (numbered layers as one pattern)."""
    by_op: dict = {}
    for r in records:
        owners = by_op.setdefault(r.op, {})
        name = r.module or "(top level)"
        owners.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name), set()).add(name)
    return "; ".join(
        f"{op} in " + ", ".join(p if len(n) == 1 else f"{p} ({len(n)} modules)" for p, n in owners.items())
        for op, owners in by_op.items())


def make_backend(resolve: Callable, names: dict, capture: Capture,
                 check: Optional[Callable] = None) -> Callable:
    """A Dynamo backend that rewrites ``call_function`` / ``call_method`` nodes.

    ``resolve(target, stack)`` returns ``(replacement, label)`` or ``(None, None)``;
    ``check(records)``, if given, sees the records of each rewritten graph before it runs
    (and may refuse it by raising).
    """

    def rewrite(graph_module: fx.GraphModule, index: int, records: list) -> None:
        ungroup_repeated_kv(graph_module.graph)
        nodes = {}
        for node in graph_module.graph.nodes:
            if node.op not in ("call_function", "call_method"):
                continue
            if not _any_floating(node):
                continue
            stack = module_stack(node, names)
            owner = stack[-1][0] if stack else ""
            value = node.meta.get("example_value")
            on_path = isinstance(value, torch.Tensor) and value.requires_grad
            if node.target is opaque_module_call:
                records.append(OpRecord(owner, "module", "module rule", True, index, on_path))
                nodes[node] = records[-1]
                continue
            replacement, label = resolve(node.target, stack)
            if replacement is not None and is_inplace(node.target):
                op = target_name(node.target)
                if not on_path:  # no relevance through it: keep the in-place call as it is
                    records.append(OpRecord(owner, op, "compatible", False, index, on_path))
                    nodes[node] = records[-1]
                    continue
                rewrite_inplace(graph_module.graph, node, replacement, owner or "the top-level forward")
                records.append(OpRecord(owner, op, f"{label} (in place)", True, index, on_path))
            elif replacement is not None:
                records.append(OpRecord(owner, target_name(node.target), label, True, index, on_path))
                node.op = "call_function"
                node.target = replacement
            else:
                status = label if label == CHOSEN_PLAIN else classify(node.target)
                records.append(OpRecord(owner, target_name(node.target), status, False, index, on_path))
            nodes[node] = records[-1]
        carries = _carries_relevance(graph_module.graph)
        for node, record in nodes.items():
            record.on_path = record.on_path and node in carries
        graph_module.graph.lint()
        graph_module.recompile()

    def backend(gm: fx.GraphModule, example_inputs):
        index = len(capture.graphs)
        records = []
        # nested graphs too: higher-order ops (activation checkpointing, ...) keep their
        # bodies as sub-GraphModules
        for _, sub in gm.named_modules():
            if isinstance(sub, fx.GraphModule):
                rewrite(sub, index, records)
        if check is not None:
            check(records)
        capture.graphs.append(records)
        return gm.forward

    return backend


def _input_boundary(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad and t.is_floating_point():
        # g from the graph leaves as R = x * g; a copy, not a view, so that a forward that
        # changes its input in place meets a plain tensor (and lxt's own check)
        return gradient_to_relevance(t).clone()
    return t


def _output_boundary(t: torch.Tensor, epsilon: float) -> torch.Tensor:
    if t.requires_grad and t.is_floating_point():
        return relevance_to_gradient(t, epsilon)  # R from the caller enters as g = R / stab(y)
    return t


def _map_tensors(obj, fn, depth: int = 0):
    """``fn`` applied to every tensor in nested tuples / lists / dicts / ModelOutputs."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if depth > 4:
        return obj
    if isinstance(obj, tuple):
        items = [_map_tensors(o, fn, depth + 1) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [_map_tensors(o, fn, depth + 1) for o in obj]
    if isinstance(obj, dict):
        if type(obj) is dict:
            return {k: _map_tensors(v, fn, depth + 1) for k, v in obj.items()}
        for k, v in list(obj.items()):  # ModelOutput and other dict subclasses: in place
            new = _map_tensors(v, fn, depth + 1)
            if new is not v:
                obj[k] = new
        return obj
    return obj


def _template(*args, **kwargs):
    return __lxt_forward__(*args, **kwargs)  # noqa: F821 - bound in the trampoline's globals


def trampoline(forward: Callable) -> types.FunctionType:
    """A function calling ``forward`` whose code object is new (Dynamo caches per code object)."""
    code = _template.__code__.replace(co_name=f"lxt_forward_{next(_TRAMPOLINES)}")
    glob = {"__lxt_forward__": forward, "__builtins__": __builtins__}
    return types.FunctionType(code, glob, code.co_name)


def _mark_dynamic(values) -> None:
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            for d in range(v.dim()):
                torch._dynamo.maybe_mark_dynamic(v, d)


def _dynamo_error(err: BaseException) -> bool:
    return isinstance(err, torch._dynamo.exc.TorchDynamoException)


def _lxt_cause(err: BaseException):
    """An lxt error (bad input, e.g. float16) wrapped by Dynamo's fake-tensor propagation."""
    seen = set()
    e = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if str(e).startswith("lxt:") and not _dynamo_error(e):
            return e
        e = e.__cause__ or e.__context__
    return None


def _hook_state(model) -> tuple:
    """Identity of every module hook: Dynamo does not guard on hooks added later."""
    state = []
    for m in model.modules():
        for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                  getattr(m, "_backward_pre_hooks", {})):
            if d:
                state.extend(id(h) for h in d.values())
    return tuple(state)


class PatchedForward:
    """The forward installed on a registered model.

    Runs the captured, rewritten graph.  If TorchDynamo cannot capture the model it warns
    once, says which part failed, and runs the original forward (module rules still apply).
    An error of the model itself (or of the user's hooks) is raised unchanged, once.
    """

    def __init__(self, original: Callable, backend: Callable, capture: Capture, trace: bool,
                 model=None, recompile_limit: int = 64, gradient: bool = False,
                 epsilon: float = 1e-6):
        self.gradient, self.epsilon = gradient, epsilon
        self.original = original
        self.capture = capture
        self.trace = trace
        self.backend = backend
        self.model = model
        self.recompile_limit = recompile_limit
        self.entry = None
        self.compiled = None
        self.hooks = None
        self.calls = 0
        if trace:
            self._build()

    def _build(self) -> None:
        self.entry = trampoline(self.original)
        self.compiled = torch.compile(self.entry, backend=self.backend, dynamic=None,
                                      recompile_limit=self.recompile_limit)
        self.hooks = _hook_state(self.model) if self.model is not None else None

    def _rebuild(self) -> None:
        """Drop the compiled code and start afresh (the next call traces again)."""
        self.release()
        self._build()

    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        # never traced by an outer torch.compile (a wrapper of the model made before or after
        # register): it runs here, eagerly, around lxt's own capture
        if not (self.gradient and torch.is_grad_enabled()):
            return self._call(*args, **kwargs)
        # gradient engine: relevance in, relevance out (see lxt.rules.base)
        args, kwargs = _map_tensors((args, kwargs), _input_boundary)
        out = self._call(*args, **kwargs)
        return _map_tensors(out, lambda t: _output_boundary(t, self.epsilon))

    def _call(self, *args, **kwargs):
        if self.compiled is None:
            return self.original(*args, **kwargs)
        if self.model is not None and _hook_state(self.model) != self.hooks:
            self._rebuild()  # hooks added or removed since the capture
        _mark_dynamic(itertools.chain(args, kwargs.values()))
        before = len(self.capture.graphs)
        try:
            out = self.compiled(*args, **kwargs)
        except BaseException as err:
            if isinstance(err, Exception) and _dynamo_error(err):
                cause = _lxt_cause(err)
                if cause is not None:
                    self._rebuild()
                    raise cause from None
                self._give_up(err)
                return self.original(*args, **kwargs)
            # the model's own error (or an interrupt): a capture cut short is not reused
            self._rebuild()
            raise
        self.calls += 1
        new = len(self.capture.graphs) - before
        if new > 1:
            self.capture.graph_breaks += new - 1
            warnings.warn(
                f"lxt: the forward was captured as {new} graphs (graph breaks); code between "
                "them runs with plain gradients. Composite.summary() lists what was rewritten.",
                stacklevel=4,
            )
        if new > 0:
            self._warn_unsafe(self.capture.graphs[before:])
        if self.calls == 1 and not self.capture.graphs:
            self.capture.failure = "TorchDynamo captured no graph (is the forward disabled for compilation?)"
            warnings.warn(
                f"lxt: {self.capture.failure}. Module rules still apply; functional calls carry "
                "plain gradients. Composite.summary() shows what is covered.", stacklevel=4)
        return out

    def _warn_unsafe(self, graphs) -> None:
        """Warn once per operation and module about unsafe operations left on the relevance
        path (the relevance computed through them is not LRP)."""
        fresh = [r for g in graphs for r in unsafe_ops(g)
                 if (r.op, r.module) not in self.capture.warned]
        if not fresh:
            return
        self.capture.warned.update((r.op, r.module) for r in fresh)
        warnings.warn(
            f"lxt: operations on the relevance path have no LRP rule and pass plain gradients, "
            f"so the relevance is not LRP there: {describe_ops(fresh)}. Map them in the "
            "composite's layer map (e.g. operator.mul: lxt.functional.mul2), or pass "
            "strict=True to the Composite to make this an error. Composite.summary() lists "
            "every operation.", UserWarning, stacklevel=5)

    def _give_up(self, err: Exception) -> None:
        msg = str(err).strip().splitlines()
        where = msg[0][:300] if msg else type(err).__name__
        self.capture.failure = f"{type(err).__name__}: {where}"
        warnings.warn(
            f"lxt: TorchDynamo could not capture this model's forward ({self.capture.failure}). "
            "Module rules still apply; functional calls (additions, products, attention, ...) "
            "outside replaced modules run with plain gradients. Composite.summary() shows what "
            "is covered.",
            stacklevel=5,
        )
        self.release()

    def release(self) -> None:
        """Drop the compiled code (Dynamo's cache on the trampoline's code object)."""
        if self.compiled is not None:
            try:
                torch._dynamo.reset_code(self.entry.__code__)
            except Exception:  # noqa: BLE001 - best effort; the code object dies with us anyway
                pass
        self.compiled = None
