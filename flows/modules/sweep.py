"""The backward sweep over a module graph: costates and metric factor rows (MATH.md §2.2–2.4).

In reverse topological order, each node receives the sum of its consumers' messages and sends its own upstream:

    λ_y = ∇ℓ(y),     λ_u = Σ_{v : u ∈ p(v)} (∂f_v/∂x_u)ᵀ λ_v,     ∇_{w_v} L = B_vᵀ λ_v
    L_y = L_o,       L_u = Σ_{v : u ∈ p(v)} L_v (∂f_v/∂x_u),       K_v = L_v B_v

Rows are stored per sample, shape (B, R, *x_v,b.shape): row (b, r) touches only sample b. The costate is one row
per sample (R = 1) and can ride along with the factor rows as an extra row (the fused sweep). A node whose value is
a tuple (``nn.MultiheadAttention`` returns one) keeps one row block per element. Nothing is swept to nodes with no
parameter upstream (the first module's input rows are never formed).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from flows.modules.graph import ModuleGraph, Node, Trace
from flows.problem import output_gradient


def _add(old, new):
    if old is None:
        return new
    if isinstance(old, list):
        return [a if b is None else (b if a is None else a + b) for a, b in zip(old, new)]
    return old + new


def _zeros_like_rows(value, b: int, r: int, batched: bool, like: torch.Tensor):
    shape = value.shape[1:] if batched else value.shape
    return like.new_zeros(b, r, *shape)


def backward(graph: ModuleGraph, trace: Trace, rows: torch.Tensor, visit, *, keep=None) -> dict:
    """Sweep ``rows`` (B, R, *y_b.shape) from the output to every node that needs them.

    ``visit(node, ins, p, rows, k)`` is called at every node that owns parameters, with its tensor inputs ``ins``,
    its local parameters ``p``, the rows at its output and ``k``: K_v = rows · B_v (B, R, n_v) when the generic
    path formed it anyway, else None (structured operators give K products without it). ``keep`` (a set of node
    names, or "all") says whose rows to return; by default none are kept. Cost: one vjp-product per node.
    """
    b, r = rows.shape[:2]
    pending: dict = {graph.output.name: rows}
    kept: dict = {}
    for node in reversed(graph.nodes):
        at = pending.pop(node.name, None)
        if at is None or node.kind == "input":
            continue
        if keep == "all" or (keep and node.name in keep):
            kept[node.name] = at
        if node.kind == "output":
            pending[node.inputs[0]] = _add(pending.get(node.inputs[0]), at)
            continue
        if node.kind == "parameter":
            visit(node, [], None, at, at.reshape(b, r, -1))
            continue
        ins = trace.inputs_of(node)
        want = [graph.by_name[i].needs_rows for i in node.inputs]
        if node.fx_node.op == "call_function" and node.fx_node.target is operator.getitem and \
                isinstance(trace.values[node.inputs[0]], tuple | list):
            # one element of a tuple-valued node: its rows go to that element only
            source, index = node.inputs[0], node.fx_node.args[1]
            value = trace.values[source]
            block = [None] * len(value)
            block[index] = at
            pending[source] = _add(pending.get(source, [None] * len(value)), block)
            continue
        if isinstance(at, list):
            value = trace.values[node.name]
            at = tuple(a if a is not None else _zeros_like_rows(v, b, r, node.batched, rows)
                       for a, v in zip(at, value) if isinstance(v, torch.Tensor))
        p = node.local(trace.params)
        if not any(want) and not node.owns_params:
            continue
        want = want if any(want) else [False] * len(ins)
        if getattr(node.ops, "uses_output", False):
            pulled, k = node.ops.pull(p, ins, at, want, output=trace.values[node.name])
        else:
            pulled, k = node.ops.pull(p, ins, at, want)
        if node.owns_params:
            visit(node, ins, p, at, k)
        for name, w, g in zip(node.inputs, want, pulled):
            if w and g is not None:
                pending[name] = _add(pending.get(name), g)
    return kept


@dataclass
class Costate:
    """The costate λ_v at the output of one node, and for nodes that own parameters the block gradient B_vᵀλ_v.

    ``name`` is the module path for module nodes (the block name), the parameter name for parameter nodes, and
    the torch.fx node name for glue."""

    name: str
    node: str
    costate: torch.Tensor
    grad: torch.Tensor | None


def node_gradient(node: Node, ins, p, lam, k) -> torch.Tensor:
    """B_vᵀ λ_v summed over samples, as one flat vector in the node's parameter order."""
    if k is not None:
        return k[:, 0].sum(0) if k.ndim == 3 else k.sum(0)
    return node.ops.vjp_param(p, ins, lam[:, 0])


def costates(problem, theta: torch.Tensor, *, graph: ModuleGraph | None = None) -> list[Costate]:
    """The costates λ_v = ∂L/∂x_v of backprop-as-constrained-optimisation for every node of the problem's module
    graph that has a parameter upstream (MATH.md §2.4), in graph order, and ``grad`` = ∇_{w_v}L at nodes that own
    parameters (None elsewhere). Over the module nodes, the grads are the blocks of ∇L(θ) (summed over the calls of
    a module used more than once). Cost: one forward and one backward sweep."""
    params = problem.unflatten(theta)
    if graph is None:
        graph = ModuleGraph(problem.model)
        graph.check_per_sample(params, problem.inputs)
    trace = graph.forward(params, problem.inputs)
    y = trace.output
    lam = output_gradient(problem.loss_fn, y, problem.targets)
    grads = {}

    def visit(node, ins, p, rows, k):
        grads[node.name] = node_gradient(node, ins, p, rows, k)

    kept = backward(graph, trace, lam[:, None], visit, keep="all")
    found = []
    for node in graph.nodes:
        if node.name not in kept or node.kind == "output":
            continue
        value = kept[node.name]
        lam_v = [None if v is None else v[:, 0] for v in value] if isinstance(value, list | tuple) else value[:, 0]
        name = node.module or (node.param_names[0] if node.kind == "parameter" else node.name)
        found.append(Costate(name, node.name, lam_v, grads.get(node.name)))
    return found
