"""Rewrite a registered model's torch calls while it runs.

A registered model's forward runs under a :class:`torch.overrides.TorchFunctionMode` that sees
every torch call (``a + b``, ``x.softmax(-1)``, ``F.scaled_dot_product_attention``, ...) and
calls the rule the layer map names for it instead; forward hooks on the model's modules say
which module each call belongs to.  Nothing is captured or compiled, so registering costs
the same for 2 or 80 layers, new shapes and batch sizes cost nothing, and code that a graph
capture cannot follow (data-dependent branches, accelerate's offloading hooks, quantised
layers) runs exactly as it does without lxt.

After a forward, the autograd graph it built is walked once from its outputs: operations
whose output reaches them are *on the relevance path*, and any part of the graph that lxt did
not see being built (a custom ``torch.autograd.Function``, a ``torch.compile``'d region) is
found there too.  The walk runs while a registration is still learning the model's
operations (the first forwards), not on every call.
"""
from __future__ import annotations

import operator
import re
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..rules.base import gradient_to_relevance, relevance_to_gradient
from .engine import ENGINE

#: ops whose plain gradient already is the LRP relevance (pure data movement or
#: relevance-neutral for the rules used here)
COMPATIBLE = {
    "view", "reshape", "permute", "transpose", "contiguous", "expand", "expand_as", "unsqueeze",
    "squeeze", "flatten", "unflatten", "getitem", "cat", "stack", "split", "chunk", "to", "float",
    "double", "bfloat16", "half", "type_as", "clone", "detach", "dropout", "embedding", "repeat",
    "repeat_interleave", "narrow", "select", "index_select", "gather", "masked_fill", "movedim",
    "t", "T", "flip", "roll", "pad", "unbind", "view_as", "reshape_as", "identity", "where",
    "interpolate", "type", "split_with_sizes", "unsafe_split", "tensor_split", "hsplit", "vsplit",
    "mT", "mH", "H", "swapaxes", "swapdims", "diagonal", "alias", "new_empty", "new_zeros",
    "new_ones", "new_full", "empty_like", "zeros_like", "ones_like", "full_like",
    # top-k values are a selection of the input (MoE routers)
    "topk",
    # writes of one tensor into another (image features into the text stream): each output
    # element is one element of one input, so the gradient routes relevance unchanged
    "masked_scatter", "setitem", "copy", "index_copy", "masked_select",
}
#: ops whose plain gradient is not relevance (LRP needs a rule there)
NOT_LRP_SAFE = {
    "add", "iadd", "sub", "isub", "rsub", "mul", "imul", "truediv", "div", "rdiv", "neg", "matmul",
    "bmm", "mm", "linear", "conv1d", "conv2d", "conv3d", "softmax", "log_softmax", "layer_norm",
    "rms_norm", "group_norm", "batch_norm", "mean", "sum", "pow", "rsqrt", "sqrt", "exp", "log",
    "tanh", "sigmoid", "silu", "gelu", "relu", "scaled_dot_product_attention", "einsum",
    "baddbmm", "addmm", "normalize", "cos", "sin", "abs", "max", "min", "amax", "logsumexp",
    "erf", "index_add", "var", "std", "norm", "clamp",
    "square", "reciprocal", "softplus", "prod", "cumsum",
}

#: status of a call the layer map maps to ``None`` (plain gradient by the user's choice)
CHOSEN_PLAIN = "None in the layer map"
#: statuses of calls left with plain gradients that are not unsafe
PLAIN_OK = ("compatible", CHOSEN_PLAIN)
#: status of a custom ``torch.autograd.Function`` on the relevance path
OWN_BACKWARD = "own backward (custom autograd.Function)"

# Python operators as the op names of the Tensor methods they call
_OPERATORS = {
    operator.add: "add", operator.iadd: "add_", operator.sub: "sub", operator.isub: "sub_",
    operator.mul: "mul", operator.imul: "mul_", operator.truediv: "div", operator.itruediv: "div_",
    operator.neg: "neg", operator.matmul: "matmul", operator.imatmul: "matmul_",
    operator.getitem: "getitem", operator.setitem: "setitem", operator.pow: "pow",
    operator.ipow: "pow_", operator.floordiv: "floor_divide", operator.pos: "positive",
}
# namespaces whose functions are torch ops (their name is the op's name)
_TORCH_NAMESPACES = ("torch", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions",
                     "torch.functional", "torch._C._special", "torch.special", "torch._tensor",
                     "torch._C._linalg", "torch.linalg")
_QUALNAME_PREFIXES = ("TensorBase.", "Tensor.", "_VariableFunctionsClass.", "_TensorBase.")

#: Tensor queries that never carry relevance (no tensor out, or metadata only)
_IGNORED = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset", "data_ptr",
    "is_contiguous", "is_floating_point", "is_complex", "is_signed", "element_size", "get_device",
    "__len__", "__bool__", "__index__", "__int__", "__float__", "__complex__", "item", "tolist",
    "__format__", "__repr__", "__str__", "__hash__", "__contains__", "untyped_storage",
    "_is_view", "is_set_to", "__reduce_ex__", "__array__", "numpy", "__deepcopy__", "_version",
    "has_names", "is_pinned", "is_shared", "is_inference", "requires_grad_", "retain_grad",
    "register_hook", "backward", "__dlpack__", "__dlpack_device__", "__get__", "__set__",
    "_has_compatible_shallow_copy_type", "_make_subclass",
})


def op_name(target) -> object:
    """The canonical key of an op: ``operator.add``, ``torch.add``, ``Tensor.add`` and
    ``"add"`` are all ``"add"``; in-place forms end with ``_`` (``operator.iadd`` ->
    ``"add_"``).  A callable that is not a torch op is its own key."""
    if isinstance(target, str):
        return _plain_name(target)
    try:
        known = _OPERATORS.get(target)
    except TypeError:  # unhashable
        return target
    if known is not None:
        return known
    name = getattr(target, "__name__", None)
    if not isinstance(name, str):
        return target
    qual = getattr(target, "__qualname__", "") or ""
    module = getattr(target, "__module__", None)
    if qual.startswith(_QUALNAME_PREFIXES) or module in _TORCH_NAMESPACES or module is None and (
            getattr(torch, name, None) is target or getattr(F, name, None) is target):
        return _plain_name(name)
    return target


def _plain_name(name: str) -> str:
    """``__getitem__`` -> ``getitem`` (a dunder method is the op it implements)."""
    return name[2:-2] if len(name) > 4 and name.startswith("__") and name.endswith("__") else name


def target_name(target) -> str:
    """Short name of an op (``operator.add`` -> ``add``)."""
    key = op_name(target)
    if isinstance(key, str):
        return key
    return getattr(target, "__name__", None) or repr(target)


def classify(target) -> str:
    """``compatible`` (the plain gradient is the relevance), ``not LRP-safe`` or ``unknown``."""
    from .opaque import tap

    if target is tap:  # lxt's own identity (latent relevance)
        return "compatible"
    name = target_name(target).strip("_")
    if name in COMPATIBLE:
        return "compatible"
    if name in NOT_LRP_SAFE:
        return "not LRP-safe"
    return "unknown"


def is_inplace_name(name: str) -> bool:
    """Whether an op of that name mutates its first argument (``add_``, ``mul_``)."""
    return name.endswith("_") and not name.startswith("_") and not name.endswith("__")


@dataclass
class OpRecord:
    """One operation seen in the forward: where it is, what it is, what it got."""

    module: str
    op: str
    status: str  # the rule / functional it got, or compatible / not LRP-safe / unknown
    rewritten: bool
    on_path: bool = False  # its output reaches the forward's outputs in the autograd graph


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


# ---------------------------------------------------------------------- per-call state
class _Action:
    """What a call of one op inside one module gets (resolved once per op and module)."""

    __slots__ = ("replacement", "status", "rewritten", "op", "inplace", "inplace_arg", "fast")

    def __init__(self, replacement, status, rewritten, op, inplace, inplace_arg):
        self.replacement, self.status, self.rewritten = replacement, status, rewritten
        self.op, self.inplace, self.inplace_arg = op, inplace, inplace_arg
        # run as it is, or as its replacement (no in-place semantics to keep)
        self.fast = replacement is None or not (inplace or inplace_arg is not None)

    def in_place(self, args, kwargs) -> bool:
        """Whether this call changes its first argument (``add_``, ``F.relu(h, inplace=True)``)."""
        return self.inplace or (self.inplace_arg is not None and _inplace_flag(args, kwargs, self.inplace_arg))


class ModuleInfo:
    """A module of the registered model as the dispatcher sees it."""

    __slots__ = ("name", "type", "names", "covered", "actions")

    def __init__(self, name: str, module: nn.Module, covered: bool):
        self.name, self.type, self.covered = name, type(module), covered
        parts = name.split(".") if name else []
        self.names = [".".join(parts[: i + 1]) for i in range(len(parts))]  # ancestors, outermost first
        self.actions: dict = {}


class _Frame:
    __slots__ = ("info", "counts")

    def __init__(self, info: ModuleInfo):
        self.info, self.counts = info, {}


class _Trace:
    """What a learning forward saw of the autograd graph (see :meth:`Dispatcher._after`)."""

    def __init__(self):
        self.marks: dict = {}  # output node of a call without an LRP rule -> its records
        self.covered: set = set()  # output nodes of modules running their own rule
        self.seen: set = set()  # custom-Function nodes already reported
        self.foreign: dict = {}  # (kind, name) -> module names
        self.grad = False  # the forward built an autograd graph

    def mark(self, out, record) -> None:
        for o in _tensors_of(out):
            if o.grad_fn is not None:
                self.marks.setdefault(o.grad_fn, []).append(record)

    def check(self, tensors, owner: str) -> None:
        """Report custom autograd Functions among the ``tensors``' producers (outside modules
        that run their own rule, whose inside is their rule's)."""
        for t in tensors:
            node = t.grad_fn
            if (not isinstance(node, _CUSTOM_NODE) or node in self.seen or node in self.covered):
                continue  # torch's own nodes are what lxt saw being made
            self.seen.add(node)
            kind = _foreign(node)
            if kind is not None:
                self.foreign.setdefault(kind, set()).add(owner)


def _tensors_of(out) -> list:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, Tensor)]
    if isinstance(out, dict):
        return [o for o in out.values() if isinstance(o, Tensor)]
    return []


def _float_tensors(args, kwargs) -> list:
    found = []
    for a in args:
        if isinstance(a, Tensor):
            if a.is_floating_point():
                found.append(a)
        elif type(a) in (list, tuple):
            found.extend(b for b in a if isinstance(b, Tensor) and b.is_floating_point())
    if kwargs:
        for a in kwargs.values():
            if isinstance(a, Tensor):
                if a.is_floating_point():
                    found.append(a)
            elif type(a) in (list, tuple):
                found.extend(b for b in a if isinstance(b, Tensor) and b.is_floating_point())
    return found


_IGNORE, _OP = 0, 1


def _kind_of(func) -> int:
    name = getattr(func, "__name__", None)
    if name in _IGNORED or type(func).__name__ == "method-wrapper":
        return _IGNORE
    return _OP


def _inplace_arg(func) -> Optional[int]:
    """Position of an ``inplace`` parameter (``F.relu(x, inplace=True)``), or ``None``."""
    try:
        return _INPLACE_ARGS[func]
    except (KeyError, TypeError):
        pass
    import inspect

    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        params = []
    found = params.index("inplace") if "inplace" in params else None
    try:
        _INPLACE_ARGS[func] = found
    except TypeError:
        pass
    return found


#: func -> position of its ``inplace`` parameter (a property of torch's functions)
_INPLACE_ARGS: dict = {}


class _State(threading.local):
    def __init__(self):
        self.stack: list = []  # frames, innermost last
        self.skip = 0  # inside modules that run their own rule
        self.depth = 0  # nested entries into the mode
        self.entries: list = []  # per hooked module call: what its pre-hook did
        self.mode: Optional[TorchFunctionMode] = None
        self.stance = None  # torch.compiler.set_stance("force_eager") while inside
        self.trace: Optional[_Trace] = None  # set while a learning forward runs
        self.inputs: set = set()  # ids of the forward's input tensors
        self.engine = None  # (gradient, epsilon) before entering


class _Mode(TorchFunctionMode):
    def __init__(self, dispatcher: "Dispatcher"):
        super().__init__()
        self.dispatcher = dispatcher

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # the hot path: an op the current module has run before, outside a learning forward
        d = self.dispatcher
        if kwargs is None:
            kwargs = {}
        kind = d.kinds.get(func)
        if kind is None:
            kind = d.kinds[func] = _kind_of(func)
        st = d.state
        if kind == _IGNORE or st.skip or not st.stack or d.dead or d.suspended:
            return func(*args, **kwargs)
        frame = st.stack[-1]
        act = frame.info.actions.get(func)
        if act is not None and st.trace is None and (act.fast or not act.in_place(args, kwargs)):
            return func(*args, **kwargs) if act.replacement is None else act.replacement(*args, **kwargs)
        return d.call(func, args, kwargs, frame, act)


# ---------------------------------------------------------------------- the dispatcher
class Dispatcher:
    """Runs the calls of one registered model under the composite's rules.

    Parameters
    ----------
    resolve : callable
        ``resolve(target, info) -> (replacement or None, label or None)`` (the composite's
        layer-map lookup for a call of ``target`` in the module ``info``).
    gradient, epsilon
        The engine the rules run in inside the forward.
    """

    def __init__(self, resolve: Callable, gradient: bool, epsilon: float, trace: bool = True):
        self.resolve_call = resolve
        self.gradient, self.epsilon = gradient, epsilon
        self.trace = trace
        self.state = _State()
        self.infos: dict = {}  # id(module) -> ModuleInfo
        self.kinds: dict = {}
        self.records: dict = {}  # (id(info), op, n) -> OpRecord, in order of first sight
        self.learning = True  # walk the autograd graph after the next forward
        self.calls = 0  # forwards seen (with grad)
        self.walks = 0  # forwards after which the autograd graph was walked
        self.suspended = False
        self.dead = False
        self.warned: set = set()
        self.handles: list = []
        self._hooks = None
        self.failure: Optional[str] = None
        self.buffers: Optional[set] = None
        self.model: Optional[nn.Module] = None
        self.new_records: list = []  # records first seen in the last forward

    # ------------------------------------------------------------------ install
    def install(self, model: nn.Module, covered: set) -> ModuleInfo:
        """Hooks on the modules of ``model`` below it, outside the modules in ``covered`` (ids
        of modules that run their own rule: lxt modules, and layers whose rule is their plain
        gradient in the gradient engine); those get a hook that stops rewriting inside.
        Returns the model's own entry (its forward enters through :meth:`run`)."""
        self.model = model

        def visit(module: nn.Module, name: str):
            is_covered = id(module) in covered
            info = ModuleInfo(name, module, is_covered)
            self.infos[id(module)] = info
            if module is not model:
                self._hook(module, info)
            if not is_covered:
                for child_name, child in module._modules.items():
                    if child is not None and id(child) not in self.infos:
                        visit(child, f"{name}.{child_name}" if name else child_name)
            return info

        root = visit(model, "")
        visit = None  # noqa: F841 - the recursive closure refers to itself: free it now, not by gc
        return root

    def _hook(self, module: nn.Module, info: ModuleInfo) -> None:
        if self._hooks is None:  # one pair for all modules
            infos, is_compiling = self.infos, torch.compiler.is_compiling

            def pre(m, args, kwargs):
                # (a region TorchDynamo compiles outside the registered forward runs without
                # lxt: nothing to follow there; inside the forward compiled code runs eagerly)
                if not is_compiling():
                    self._enter_module(infos[id(m)])

            def post(m, args, kwargs, out):
                if not is_compiling():
                    self._leave_module(infos[id(m)], args, kwargs, out)

            self._hooks = (pre, post)
        pre, post = self._hooks
        self.handles.append(module.register_forward_pre_hook(pre, prepend=True, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.dead = True
        self.model = None
        # no reference cycles left (the hooks' closures, the composite's lookup): a finished
        # registration is freed at once, not by a later garbage collection
        self._hooks = None
        self.resolve_call = None
        st = self.state
        while st.depth > 0:  # left over by an interrupt (KeyboardInterrupt skips post-hooks)
            self._exit()
        st.stack.clear()
        st.entries.clear()
        st.skip = 0

    # ------------------------------------------------------------------ entering and leaving
    def _enter(self) -> None:
        st = self.state
        if st.depth == 0:
            st.engine = ENGINE.set(self.gradient, self.epsilon)
            if self.trace:
                # torch.compile'd code inside the model runs its Python eagerly, under the rules
                st.stance = torch.compiler.set_stance("force_eager")
                st.mode = _Mode(self)
                st.mode.__enter__()
        st.depth += 1

    def _exit(self) -> None:
        st = self.state
        st.depth -= 1
        if st.depth == 0:
            if st.mode is not None:
                mode, st.mode = st.mode, None
                mode.__exit__(None, None, None)
            if st.stance is not None:
                stance, st.stance = st.stance, None
                stance.__exit__(None, None, None)
            ENGINE.restore(st.engine)

    def _enter_module(self, info: ModuleInfo) -> None:
        st = self.state
        if self.suspended or self.dead:
            st.entries.append(0)
            return
        if info.covered:
            st.skip += 1
            st.entries.append(1)
            return
        entered = st.depth == 0  # a module called on its own (or recomputed by checkpointing)
        if entered:
            if not torch.is_grad_enabled():
                st.entries.append(0)
                return
            self._enter()
        st.stack.append(_Frame(info))
        st.entries.append(3 if entered else 2)

    def _leave_module(self, info, args, kwargs, out) -> None:
        st = self.state
        if not st.entries:
            return
        what = st.entries.pop()
        trace = st.trace
        if what == 1:
            st.skip -= 1
            if trace is not None and st.skip == 0:
                # a module running its own rule: what it does inside is its rule's
                trace.covered.update(o.grad_fn for o in _tensors_of(out) if o.grad_fn is not None)
        elif what >= 2:
            if st.stack:
                st.stack.pop()
            if trace is not None:  # a custom Function's output is named by the module returning it
                trace.check(_tensors_of(out), info.name)
            if what == 3:
                self._exit()

    # ------------------------------------------------------------------ one forward
    def run(self, forward: Callable, info: ModuleInfo, args, kwargs):
        """``forward(*args, **kwargs)`` under the rules, as the model's outermost call;
        afterwards, while learning, the walk (see module docstring)."""
        st = self.state
        self.new_records = []
        grad = torch.is_grad_enabled()
        if self.suspended or self.dead or not grad or st.depth > 0:
            # no autograd graph, nothing to rewrite (generate); or called from inside
            return forward(*args, **kwargs)
        saved = (len(st.stack), st.skip, len(st.entries))
        seen = len(self.records)
        st.inputs = {id(t) for t in _outputs((args, kwargs))}
        trace = st.trace = _Trace() if (self.learning and self.trace) else None
        self.learning = False  # set again by a call that meets a new code path
        self._enter()
        st.stack.append(_Frame(info))
        try:
            out = forward(*args, **kwargs)
        finally:
            st.trace = None
            st.inputs = set()
            while st.depth > 0:  # also after an interrupt that skipped the modules' post-hooks
                self._exit()
            del st.stack[saved[0]:]
            del st.entries[saved[2]:]
            st.skip = saved[1]
        self.calls += 1
        if trace is not None:
            self._after(out, trace)
            if not trace.grad:
                self.learning = True  # nothing learned about the relevance path yet
        self.new_records = list(self.records.values())[seen:]
        return out

    # ------------------------------------------------------------------ one call
    def call(self, func, args, kwargs, frame=None, act=None):
        """A call made inside the registered forward (the mode's slow path: in a learning
        forward, an op a module runs for the first time, or an in-place call)."""
        st = self.state
        if frame is None:
            if st.skip or not st.stack or self.dead or self.suspended:
                return func(*args, **kwargs)
            frame = st.stack[-1]
        info = frame.info
        if act is None:
            act = info.actions.get(func)
            if act is None:
                act = info.actions[func] = self._action(func, info)
        inputs = _float_tensors(args, kwargs)
        if not inputs:
            return func(*args, **kwargs)
        n = frame.counts.get(func, 0)
        frame.counts[func] = n + 1
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        key = (id(info), act.op, n)
        record = self.records.get(key)
        trace = st.trace
        if record is None:
            record = self.records[key] = OpRecord(info.name, act.op, act.status, act.rewritten)
            if trace is None:
                self.learning = True  # a new code path: the next forward learns it
        if grad and trace is not None:
            trace.check(inputs, info.name)
        if not grad or act.replacement is None:
            out = func(*args, **kwargs)
        elif act.fast or not act.in_place(args, kwargs):
            out = act.replacement(*args, **kwargs)
        else:
            out = self._in_place(act, args, kwargs, info)
        if grad:
            if not record.on_path and any(isinstance(o, Tensor) and o.requires_grad for o in _tensors_of(out)):
                record.on_path = True  # judged by its output; the walk refines unsafe ones
            if trace is not None:
                trace.grad = True
                if not act.rewritten and act.status not in PLAIN_OK:
                    trace.mark(out, record)
        return out

    def _action(self, func, info: ModuleInfo) -> _Action:
        op = target_name(func)
        replacement, label = self.resolve_call(func, info)
        inplace = isinstance(op, str) and is_inplace_name(op)
        arg = _inplace_arg(func) if replacement is not None and not inplace and callable(func) else None
        if replacement is not None:
            status = f"{label} (in place)" if inplace else label
            return _Action(replacement, status, True, op, inplace, arg)
        status = label if label == CHOSEN_PLAIN else classify(func)
        return _Action(None, status, False, op, False, None)

    def _in_place(self, act: _Action, args, kwargs, info: ModuleInfo):
        """An in-place call under its rule: the rule runs on a copy of the mutated tensor and
        its result is written back, so every view of that tensor reads the new values and
        backward goes through the rule."""
        target = args[0] if args else None
        where = info.name or "the top-level forward"
        hint = (f"Write it out of place (h = h + x instead of h.add_(x) / h += x), or map "
                f"{act.op!r} to None in the composite's layer map to leave it with plain gradients.")
        if not isinstance(target, Tensor):
            raise ValueError(f"lxt: cannot rewrite the in-place call {act.op!r} in {where}: its "
                             f"first argument is not a tensor. {hint}")
        if self._preexisting(target):
            raise ValueError(
                f"lxt: {act.op!r} in {where} changes a tensor in place that the forward did not "
                "create (a model input, parameter or buffer, or a view of one); a rule cannot "
                f"keep that in-place semantics. {hint}")
        args = (target.clone(),) + tuple(args[1:])
        if act.inplace_arg is not None:
            kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
            if len(args) > act.inplace_arg:
                args = args[: act.inplace_arg] + (False,) + args[act.inplace_arg + 1:]
        result = act.replacement(*args, **kwargs)
        target.copy_(result)
        return target

    def _preexisting(self, t: Tensor) -> bool:
        root = t if t._base is None else t._base
        if isinstance(root, nn.Parameter) or id(root) in self.state.inputs or id(t) in self.state.inputs:
            return True
        if self.model is not None:
            return any(root is b for b in self.model.buffers())
        return False

    # ------------------------------------------------------------------ after a forward
    def _after(self, out, trace: _Trace) -> None:
        """After a learning forward: report custom autograd Functions met on the way (and in
        the outputs), and, where calls without an LRP rule ran, walk the autograd graph from
        the outputs once to keep only those on the relevance path (a divisor that its rule
        detaches is not)."""
        outputs = [t for t in _outputs(out) if t.requires_grad and t.grad_fn is not None]
        trace.check(outputs, "")
        if trace.marks:
            self.walks += 1
            reached = _reachable([t.grad_fn for t in outputs], trace.marks)
            for node, records in trace.marks.items():
                for record in records:
                    record.on_path = node in reached
        for (what, name), owners in trace.foreign.items():
            for owner in sorted(owners):
                key = ("foreign", name, owner)
                if key in self.records:
                    continue
                if what == "compiled":
                    self.failure = (f"a torch.compile'd region ({name}) in {owner or '(top level)'} "
                                    "runs without lxt's rules")
                self.records[key] = OpRecord(owner, f"autograd.Function {name}",
                                             "compiled region" if what == "compiled" else OWN_BACKWARD,
                                             False, on_path=True)


def _reachable(roots, wanted) -> set:
    """The nodes of ``wanted`` that backward from ``roots`` reaches."""
    found, seen, stack = set(), set(), list(roots)
    while stack and len(found) < len(wanted):
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in wanted:
            found.add(node)
        stack.extend(f for f, _ in node.next_functions if f is not None)
    return found


def _inplace_flag(args, kwargs, position: int) -> bool:
    if "inplace" in kwargs:
        return bool(kwargs["inplace"])
    return len(args) > position and args[position] is True


def _outputs(out, depth: int = 0) -> list:
    """Every tensor of a forward's output (tuples, lists, dicts, ModelOutputs)."""
    if isinstance(out, Tensor):
        return [out]
    if depth > 4:
        return []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o, depth + 1)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _outputs(o, depth + 1)]
    return []


_LXT_FUNCTIONS = ("lxt.", "torch.utils.checkpoint")
_CUSTOM_NODE = torch.autograd.function.BackwardCFunction


def _foreign(node) -> Optional[tuple]:
    """``("function", name)`` for a custom autograd Function that is not lxt's, ``("compiled",
    name)`` for a torch.compile'd region, ``None`` for everything else."""
    if not isinstance(node, _CUSTOM_NODE):
        return None
    cls = getattr(node, "_forward_cls", None)
    module = getattr(cls, "__module__", "") or ""
    name = getattr(cls, "__name__", type(node).__name__)
    if module == "lxt" or module.startswith(_LXT_FUNCTIONS):
        return None
    if module.startswith("torch._functorch") or name == "CompiledFunction":
        return ("compiled", name)
    return ("function", f"{module}.{name}" if module and not module.startswith("__") else name)


# ---------------------------------------------------------------------- the forward
def _input_boundary(t: Tensor) -> Tensor:
    if t.requires_grad and t.is_floating_point():
        # g from the graph leaves as R = x * g; a copy, not a view, so that a forward that
        # changes its input in place meets a plain tensor (and lxt's own check)
        return gradient_to_relevance(t).clone()
    return t


def _output_boundary(t: Tensor, epsilon: float) -> Tensor:
    if t.requires_grad and t.is_floating_point():
        return relevance_to_gradient(t, epsilon)  # R from the caller enters as g = R / stab(y)
    return t


def map_tensors(obj, fn, depth: int = 0):
    """``fn`` applied to every tensor in nested tuples / lists / dicts / ModelOutputs."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if depth > 4:
        return obj
    if isinstance(obj, tuple):
        items = [map_tensors(o, fn, depth + 1) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [map_tensors(o, fn, depth + 1) for o in obj]
    if isinstance(obj, dict):
        if type(obj) is dict:
            return {k: map_tensors(v, fn, depth + 1) for k, v in obj.items()}
        for k, v in list(obj.items()):  # ModelOutput and other dict subclasses: in place
            new = map_tensors(v, fn, depth + 1)
            if new is not v:
                obj[k] = new
        return obj
    return obj


class PatchedForward:
    """The forward installed on a registered model (an instance attribute): the original
    forward under the dispatcher; in the gradient engine, relevance is converted at its inputs
    and outputs.  ``inspect.signature`` sees the original's signature."""

    def __init__(self, original: Callable, dispatcher: Dispatcher, info: ModuleInfo,
                 check: Optional[Callable] = None, gradient: bool = False, epsilon: float = 1e-6,
                 composite=None):
        import inspect

        self.original, self.dispatcher, self.info = original, dispatcher, info
        self.check = check
        self.gradient, self.epsilon = gradient, epsilon
        self.lxt_composite = composite
        self.__wrapped__ = original
        self.__signature__ = inspect.signature(original)
        self.__name__ = "forward"
        self.__doc__ = getattr(original, "__doc__", None)

    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        # never traced by an outer torch.compile (a wrapper of the model made before or after
        # register): it runs here, eagerly
        d = self.dispatcher
        boundary = self.gradient and torch.is_grad_enabled() and not d.suspended
        if boundary:  # gradient engine: relevance in, relevance out (see lxt.rules.base)
            args, kwargs = map_tensors((args, kwargs), _input_boundary)
        out = d.run(self.original, self.info, args, kwargs)
        if d.new_records and self.check is not None:
            self.check(d.new_records)
        if boundary:
            out = map_tensors(out, lambda t: _output_boundary(t, self.epsilon))
        return out

    def _refuse_copy(self):
        raise RuntimeError(
            "lxt: this model is registered with a composite: a copy would share its patched "
            "forward and hooks. Copy (or pickle) the model before registering it or after "
            "remove() / leaving the context.")

    def __deepcopy__(self, memo):
        self._refuse_copy()

    def __reduce_ex__(self, protocol):
        self._refuse_copy()
