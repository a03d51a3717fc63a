"""Reading any ``nn.Module`` as a directed acyclic graph of nodes (MATH.md §2.4).

The model is traced with torch.fx. Every call of a module that owns parameters (and every leaf module torch.fx
keeps whole, such as ``nn.MultiheadAttention``) becomes one *module node* with its own Jacobian products; a
parameter read directly in a ``forward`` becomes a *parameter node* (x_v = w_v, so B_v = I); everything in
between — functional ops, additions, concatenations, reshapes, activations — is parameter-free *glue* whose
input-Jacobian products come from its own operator (activations, Linear) or from per-sample vjps of the glue
node (:mod:`flows.modules.generic`). Nodes are kept in torch.fx's order, which is topological.

Refused, with the module named (never silently a different metric): BatchNorm in training mode (couples samples),
models torch.fx cannot trace (data-dependent control flow), in-place operations, non-tensor model outputs, and
nodes whose per-sample evaluation differs from the batched one (ops that mix samples).
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from flows.linalg import COMPOSITES, composed_norms
from flows.modules.activations import TORCH_FUNCTIONS, ActivationOps, activation_name
from flows.modules.conv import ConvOps
from flows.modules.conv import supports as conv_supports
from flows.modules.embedding import EmbeddingOps
from flows.modules.embedding import supports as embedding_supports
from flows.modules.generic import GenericOps
from flows.modules.linear import LinearOps
from flows.modules.normalisation import NormOps
from flows.modules.normalisation import supports as norm_supports
from flows.modules.shape import ShapeOps
from flows.modules.shape import supports as shape_supports


@dataclass
class Node:
    """One node of the module graph.

    ``kind`` is "input", "parameter", "module", "glue", "constant" (a ``forward`` argument fixed at its default)
    or "output"; ``module`` the module path of a module node
    (its block name); ``inputs`` the names of the tensor-valued nodes it reads; ``param_names`` the full names of
    the parameters it owns (θ order); ``batched`` whether its value carries the batch dimension;
    ``needs_rows`` whether a parameter lies upstream (only then are costates and factor rows swept to it).
    """

    name: str
    kind: str
    module: str | None
    inputs: list[str]
    param_names: tuple[str, ...] = ()
    batched: bool = False
    needs_rows: bool = False
    ops: object = field(default=None, repr=False)
    fx_node: fx.Node = field(default=None, repr=False)

    @property
    def owns_params(self) -> bool:
        return bool(self.param_names)

    def local(self, params: dict) -> dict:
        """This node's parameters by their names inside its module."""
        return {local: params[full] for local, full in zip(self.ops.local_names, self.param_names)} \
            if self.kind == "module" else {}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# leaf modules whose fused kernels have a wrong derivative in one torch.func composition (flows.linalg.layer_norm)
_FUSED_NORMS = (nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


class _Tracer(fx.Tracer):
    """Keeps modules that own parameters (and torch's own leaf modules) whole; remembers the module being traced
    so that a failure can name it."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if any(True for _ in m.parameters(recurse=False)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m) or type(m).__name__)
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


def _is_inplace(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.kwargs.get("inplace", False) is True or (name.endswith("_") and not name.endswith("__")) \
            or node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem)
    if node.op == "call_module":
        return getattr(model.get_submodule(node.target), "inplace", False) is True
    return False


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    return f"operation {node.name!r} ({node.op} {getattr(node.target, '__name__', node.target)})"


class ModuleGraph:
    """A model read as a DAG of nodes. ``nodes`` in topological order; ``by_name``; ``output`` the output node;
    ``module_nodes`` the nodes that own parameters, in graph order (one per call)."""

    def __init__(self, model: nn.Module, *, structured: bool = True):
        self.model = model
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                raise ValueError(f"module {name or type(m).__name__!r} ({type(m).__name__}) is in training mode: "
                                 "batch norm then normalises with batch statistics, which couples the samples, so "
                                 "the per-sample factor rows of the layerwise metric do not exist; call "
                                 "model.eval() to use its running statistics")
        tracer = _Tracer()
        try:
            graph = tracer.trace(model, concrete_args=_defaults(model))
        except Exception as error:  # torch.fx raises TraceError, TypeError, RuntimeError… at data-dependent code
            where = tracer.stack[-1] if tracer.stack else type(model).__name__
            raise ValueError(f"cannot read the model as a module graph: torch.fx failed to trace module {where!r} "
                             f"({type(error).__name__}: {error}). Data-dependent control flow cannot be traced; "
                             "rewrite it without Python branches on tensor values") from error
        self.nodes: list[Node] = []
        self.by_name: dict[str, Node] = {}
        params = dict(model.named_parameters())
        self._canonical = {id(q): n for n, q in params.items()}
        self.output = None
        for fx_node in graph.nodes:
            if _is_inplace(fx_node, model):
                raise ValueError(f"cannot read the model as a module graph: {_describe(fx_node)} works in place; "
                                 "the layerwise sweep needs every node's input kept (use the out-of-place form)")
            node = self._make_node(fx_node, model, params, structured)
            self.nodes.append(node)
            self.by_name[node.name] = node
        self.module_nodes = [n for n in self.nodes if n.owns_params]

    # -- construction -----------------------------------------------------------------------------------
    def _tensor_inputs(self, fx_node: fx.Node) -> list[str]:
        found: list[str] = []
        fx.node.map_arg((fx_node.args, fx_node.kwargs), lambda n: found.append(n.name) if n.name not in found else None)
        return found

    def _make_node(self, fx_node, model, params, structured) -> Node:
        inputs = self._tensor_inputs(fx_node)
        upstream = [self.by_name[i] for i in inputs]
        batched = any(u.batched for u in upstream)
        needs_rows = any(u.needs_rows for u in upstream)
        if fx_node.op == "placeholder":
            if self.nodes and fx_node.args:  # an argument fixed at its default (torch.fx keeps it as args[0])
                return Node(fx_node.name, "constant", None, [], fx_node=fx_node)
            if self.nodes:
                raise ValueError(f"the model's forward takes more than one input ({fx_node.name!r}); the module "
                                 "graph reads models of one input tensor")
            return Node(fx_node.name, "input", None, [], batched=True, fx_node=fx_node)
        if fx_node.op == "get_attr":
            attr = _attr(model, fx_node.target)
            is_param = isinstance(attr, nn.Parameter) and id(attr) in self._canonical
            return Node(fx_node.name, "parameter" if is_param else "glue", None, [],
                        (self._canonical[id(attr)],) if is_param else (), batched=False, needs_rows=is_param,
                        fx_node=fx_node)
        if fx_node.op == "output":
            if len(inputs) != 1 or not isinstance(fx_node.args[0], fx.Node):
                raise ValueError("the model must return one tensor; its output is "
                                 f"{fx_node.args[0]!r}")
            self.output = Node(fx_node.name, "output", None, inputs, batched=batched, needs_rows=needs_rows,
                               fx_node=fx_node)
            return self.output
        fn = self._callable(fx_node, model, inputs)
        if fx_node.op == "call_module":
            module = model.get_submodule(fx_node.target)
            owned = list(module.named_parameters())
            local = tuple(n for n, _ in owned)
            if local:
                # a parameter shared with another module is known to θ by its first name
                names = tuple(self._canonical.get(id(q), _join(fx_node.target, n)) for n, q in owned)
                simple = len(inputs) == 1 and len(fx_node.args) == 1 and not fx_node.kwargs
                kind = next((ops for cls, (ops, ok) in STRUCTURED.items() if isinstance(module, cls) and ok(module)),
                            None)
                if structured and simple and kind is not None:
                    ops = kind(module)
                else:
                    ops = GenericOps(fn, [u.batched for u in upstream], batched, local)
                return Node(fx_node.name, "module", fx_node.target, inputs, names, batched, True, ops, fx_node)
            act = activation_name(module)
            if act is not None and len(inputs) == 1 and len(fx_node.args) == 1:
                return Node(fx_node.name, "glue", fx_node.target, inputs, (), batched, needs_rows,
                            ActivationOps(act), fx_node)
        if fx_node.op == "call_function" and fx_node.target in TORCH_FUNCTIONS and len(fx_node.args) == 1 \
                and not fx_node.kwargs and len(inputs) == 1:
            return Node(fx_node.name, "glue", None, inputs, (), batched, needs_rows,
                        ActivationOps(TORCH_FUNCTIONS[fx_node.target]), fx_node)
        module = fx_node.target if fx_node.op == "call_module" else None
        generic = GenericOps(fn, [u.batched for u in upstream], batched)
        if structured and len(inputs) == 1 and batched and upstream[0].batched and shape_supports(fx_node, model):
            return Node(fx_node.name, "glue", module, inputs, (), batched, needs_rows, ShapeOps(fn, generic), fx_node)
        return Node(fx_node.name, "glue", module, inputs, (), batched, needs_rows, generic, fx_node)

    @staticmethod
    def _callable(fx_node, model, inputs):
        """fn(p, ins) evaluating the node with its parameters p (local names) and tensor inputs ins."""
        position = {name: i for i, name in enumerate(inputs)}

        def bind(ins):
            return fx.node.map_arg((fx_node.args, fx_node.kwargs), lambda n: ins[position[n.name]])

        if fx_node.op == "call_module":
            module = model.get_submodule(fx_node.target)
            composed = any(isinstance(m, _FUSED_NORMS) for m in module.modules())

            def fn(p, ins):
                args, kwargs = bind(ins)
                if isinstance(module, nn.MultiheadAttention):
                    return _attention(module, p, args, kwargs)
                with composed_norms() if composed else contextlib.nullcontext():
                    return functional_call(module, p, args, kwargs) if p else module(*args, **kwargs)
        elif fx_node.op == "call_method":
            def fn(p, ins):
                args, kwargs = bind(ins)
                return getattr(args[0], fx_node.target)(*args[1:], **kwargs)
        else:
            target = COMPOSITES.get(fx_node.target, fx_node.target)  # F.layer_norm → its composite form

            def fn(p, ins):
                args, kwargs = bind(ins)
                return target(*args, **kwargs)
        return fn

    # -- reading ----------------------------------------------------------------------------------------
    def forward(self, params: dict, inputs: torch.Tensor) -> Trace:
        """Evaluate the graph at ``params`` (full names → tensors) on a batch; every node's value is kept."""
        values: dict = {}
        for node in self.nodes:
            if node.kind == "input":
                values[node.name] = inputs
            elif node.kind == "parameter":
                values[node.name] = params[node.param_names[0]]
            elif node.kind == "constant":
                values[node.name] = node.fx_node.args[0]
            elif node.kind == "output":
                values[node.name] = values[node.inputs[0]]
            elif node.fx_node.op == "get_attr":
                values[node.name] = _attr(self.model, node.fx_node.target)
            else:
                values[node.name] = node.ops.forward(node.local(params), [values[i] for i in node.inputs])
        return Trace(self, params, values)

    def check_per_sample(self, params: dict, inputs: torch.Tensor, trace: Trace | None = None) -> None:
        """Every node evaluated on one sample at a time (torch.func.vmap) must give the batched value; a node that
        mixes samples (or that torch.func cannot evaluate per sample) is named in a ValueError."""
        trace = trace or self.forward(params, inputs)
        for node in self.nodes:
            if node.kind not in ("module", "glue") or not node.batched or node.fx_node.op == "get_attr":
                continue
            ins = [trace.values[i] for i in node.inputs]
            if not all(isinstance(x, torch.Tensor) for x in ins):  # an element of a tuple: checked at its source
                continue
            flags = [self.by_name[i].batched for i in node.inputs]
            p = node.local(params)

            def one(*xs, node=node, flags=flags, p=p):
                out = node.ops.forward(p, [x[None] if f else x for x, f in zip(xs, flags)])
                return [t[0] for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]

            try:
                per_sample = torch.func.vmap(one, in_dims=tuple(0 if f else None for f in flags))(*ins)
            except Exception as error:
                raise ValueError(f"{_describe(node.fx_node)} cannot be evaluated one sample at a time by "
                                 f"torch.func ({type(error).__name__}: {error}); no layerwise path supports it"
                                 ) from error
            got = torch.utils._pytree.tree_leaves(per_sample)
            want = [t for t in torch.utils._pytree.tree_leaves(trace.values[node.name]) if isinstance(t, torch.Tensor)]
            if len(got) != len(want) or any(g.shape != w.shape or not torch.allclose(g, w, rtol=1e-6, atol=1e-8)
                                            for g, w in zip(got, want)):
                raise ValueError(f"{_describe(node.fx_node)} mixes samples: evaluated one sample at a time it "
                                 "differs from the batched evaluation, so per-sample factor rows do not exist")


def _defaults(model: nn.Module) -> dict | None:
    """Arguments of ``forward`` after the input that have defaults: fixed at them (the model is called with one
    tensor), so torch.fx does not make them graph inputs."""
    import inspect

    params = list(inspect.signature(model.forward).parameters.values())[1:]
    fixed = {q.name: q.default for q in params if q.default is not inspect.Parameter.empty}
    return fixed or None


def _attention(module, p, args, kwargs):
    """nn.MultiheadAttention without its inference fast path: the fused kernel has no torch.func batching rule
    (vmap would fall back to a slow per-sample loop); the composite path computes the same function."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no batching rule either
            return functional_call(module, p, args, kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _attr(model, target):
    out = model
    for part in target.split("."):
        out = getattr(out, part)
    return out


@dataclass
class Trace:
    """A forward pass through a :class:`ModuleGraph`: ``values`` of every node by name, ``output`` the model's."""

    graph: ModuleGraph
    params: dict
    values: dict

    @property
    def output(self) -> torch.Tensor:
        return self.values[self.graph.output.name]

    def inputs_of(self, node: Node) -> list[torch.Tensor]:
        """The tensor inputs of ``node`` in this pass (in ``node.inputs`` order)."""
        return [self.values[i] for i in node.inputs]


# module type → (structured operator, whether it covers this instance); every other module takes the generic path
STRUCTURED: dict[type, tuple] = {
    nn.Linear: (LinearOps, lambda m: True),
    nn.Conv1d: (ConvOps, conv_supports),
    nn.Conv2d: (ConvOps, conv_supports),
    nn.LayerNorm: (NormOps, norm_supports),
    nn.GroupNorm: (NormOps, norm_supports),
    nn.Embedding: (EmbeddingOps, embedding_supports),
}


def read(model: nn.Module, *, structured: bool = True) -> ModuleGraph:
    """The module graph of ``model`` (see :class:`ModuleGraph`); ``structured=False`` uses the generic per-sample
    path for every module node."""
    return ModuleGraph(model, structured=structured)
