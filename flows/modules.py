"""Riemannian modules and the backward sweep of costates and metric factors (MATH.md §2.2–2.3).

A network is a chain of modules x_a = f_a(x_{a−1}, w_a). Each module offers its forward map and matrix-free
products with its input Jacobian A_a = ∂f_a/∂x_{a−1} and parameter Jacobian B_a = ∂f_a/∂w_a:

    A v   (jvp_input)      rows A   (vjp_input)      B dw   (jvp_param)      Σ_b B_bᵀ λ_b   (vjp_param)

Backprop is the stationarity of the Lagrangian of  min ℓ(x_m)  s.t.  x_a = f_a(x_{a−1}, w_a):

    λ_m = ∇ℓ(x_m),    λ_{a−1} = A_aᵀ λ_a,    ∇_{w_a} L = B_aᵀ λ_a

and the layerwise metric factor is swept backward the same way: L_m = L_o, L_{a−1} = L_a A_a, K_a = L_a B_a.
The message contract: a module receives (λ_a, L_a) from downstream, emits (A_aᵀλ_a, L_aA_a) upstream, and
updates itself from (λ_a, L_a), its own Jacobians and its mass only.

Factor rows are stored per sample: ``rows`` of shape (B, R, width), row (b, r) touching only sample b
(the Jacobians of a module that maps each sample independently are block-diagonal over samples).

Modules are ``torch.nn.Module`` objects, so a chain of them is a model for :class:`flows.Problem`. An
``nn.Sequential`` of ``nn.Linear`` and activation layers is read as a chain directly; any other module in a
chain is served by the generic path (per-sample vector–Jacobian products with torch.func).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "tanh": (torch.tanh, lambda x: 1 - torch.tanh(x) ** 2),
    "sigmoid": (torch.sigmoid, lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x))),
    "softplus": (F.softplus, torch.sigmoid),
    "relu": (torch.relu, lambda x: (x > 0).to(x.dtype)),
}
_TORCH_ACTIVATIONS = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Softplus: "softplus", nn.ReLU: "relu"}


class Linear(nn.Linear):
    """y = W x + b (bias optional), parameters (W row-major, then b). Float64 by default."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=torch.float64,
                 device=None):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, device=device)


class Activation(nn.Module):
    """An elementwise activation σ; its input Jacobian is diag σ'(x). One of ``ACTIVATIONS``."""

    def __init__(self, name: str):
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
        self.name = name

    def forward(self, x):
        return ACTIVATIONS[self.name][0](x)

    def derivative(self, x):
        return ACTIVATIONS[self.name][1](x)

    def extra_repr(self):
        return self.name


def Tanh() -> Activation:  # noqa: N802 - reads like the layer it makes
    return Activation("tanh")


def Sigmoid() -> Activation:  # noqa: N802
    return Activation("sigmoid")


def Softplus() -> Activation:  # noqa: N802
    return Activation("softplus")


def ReLU() -> Activation:  # noqa: N802
    return Activation("relu")


class Chain(nn.Sequential):
    """Series composition f_m ∘ … ∘ f_1; itself a module (its A is the product of the A's)."""


class Parallel(nn.Module):
    """Direct sum: the input is split into consecutive slices of sizes ``split``, branch i maps slice i, and
    the outputs are concatenated. Its metric is block-diagonal over the branches."""

    def __init__(self, *branches: nn.Module, split: list[int]):
        super().__init__()
        if len(branches) != len(split):
            raise ValueError(f"Parallel needs one input size per branch: {len(branches)} branches, "
                             f"{len(split)} sizes")
        self.branches = nn.ModuleList(branches)
        self.split = [int(s) for s in split]

    def forward(self, x):
        if x.shape[-1] != sum(self.split):
            raise ValueError(f"Parallel expects inputs of width {sum(self.split)}, got {x.shape[-1]}")
        parts = torch.split(x, self.split, dim=-1)
        return torch.cat([branch(part) for branch, part in zip(self.branches, parts)], dim=-1)


class Function(nn.Module):
    """Any differentiable per-sample map y = fn(x, w) with parameter vector w (initially ``w0``).

    ``fn`` receives a batch x of shape (B, in) and w of shape (n,) and must treat samples independently.
    Stages of a physical or biological cascade, not only network layers, are modules this way.
    ``retract(w, dw)`` names the parameter manifold by its retraction (default: Euclidean, w + dw); it is
    used by discrete-time updates through :func:`retraction`.
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], w0, name: str | None = None,
                 retract: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.fn = fn
        self.w = nn.Parameter(torch.as_tensor(w0, dtype=torch.float64).reshape(-1).clone())
        self.name = name or getattr(fn, "__name__", "function")
        if retract is not None:
            self.retract = retract

    def forward(self, x):
        return self.fn(x, self.w)

    def extra_repr(self):
        return f"{self.name}, n={self.w.numel()}"


def retract(w: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """The Euclidean retraction w + dw: the parameter manifold of a module that names no other."""
    return w + dw


def sphere_retract(w: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """Retraction onto the sphere of radius ‖w‖: (w + dw) rescaled to ‖w‖ (for unit-norm parameters)."""
    step = w + dw
    return step * (torch.linalg.vector_norm(w) / torch.linalg.vector_norm(step))


def retraction(problem) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """θ, Δθ ↦ θ' applying every module's own ``retract`` to its slice of θ (Euclidean where a module has none).

    For discrete-time updates on parameter manifolds; continuous-time flows stay in the ambient space.
    """
    offsets, start = {}, 0
    for name, numel in zip(problem._names, problem._numels):
        offsets[name] = (start, start + numel)
        start += numel
    pieces = []
    for prefix, module in problem.model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own and hasattr(module, "retract"):
            names = [f"{prefix}.{n}" if prefix else n for n in own]
            pieces.append((slice(offsets[names[0]][0], offsets[names[-1]][1]), module.retract))

    def apply(theta: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        out = theta + step
        for sl, fn in pieces:
            out[..., sl] = fn(theta[..., sl], step[..., sl])
        return out

    return apply


# --------------------------------------------------------------------------------------------------------
# Leaf operations: the matrix-free Jacobian products of one module
# --------------------------------------------------------------------------------------------------------


class LeafOps:
    """Generic Jacobian products of one module through torch.func (per-sample vjp/jvp).

    ``p`` is the module's own parameter dict (local names). Costs: ``vjp_input`` and ``k_rows`` take
    B·R single-sample vector–Jacobian products; ``vjp_param`` one batched backward pass.
    """

    structured = False

    def __init__(self, module: nn.Module, prefix: str):
        self.module = module
        self.prefix = prefix
        self.local_names = [n for n, _ in module.named_parameters()]
        self.names = [f"{prefix}.{n}" if prefix else n for n in self.local_names]
        self.num_params = sum(p.numel() for p in module.parameters())

    @property
    def has_params(self) -> bool:
        return self.num_params > 0

    def params(self, all_params: dict) -> dict:
        return {local: all_params[full] for local, full in zip(self.local_names, self.names)}

    def forward(self, x, p):
        return functional_call(self.module, p, (x,))

    def _sample(self, p, x_b):
        return functional_call(self.module, p, (x_b[None],))[0]

    def jvp_input(self, x, p, v):
        """A v, per sample: (B, in) → (B, out)."""
        return jvp(lambda xx: self.forward(xx, p), (x,), (v,))[1]

    def jvp_param(self, x, p, dw: dict):
        """B dw: (B, out)."""
        return jvp(lambda pp: self.forward(x, pp), (p,), (dw,))[1]

    def vjp_input(self, x, p, rows):
        """rows A: (B, R, out) → (B, R, in)."""
        def one(x_b, rows_b):
            _, pull = vjp(lambda xx: self._sample(p, xx), x_b)
            return vmap(pull)(rows_b)[0]

        return vmap(one)(x, rows)

    def vjp_param(self, x, p, lam):
        """Σ_b B_bᵀ λ_b as one flat vector (n,): the block gradient when λ is the costate."""
        _, pull = vjp(lambda pp: self.forward(x, pp), p)
        grads = pull(lam)[0]
        return torch.cat([grads[n].reshape(-1) for n in self.local_names])

    def k_rows(self, x, p, rows):
        """K = L B materialised: (B, R, n). Memory O(B·R·n)."""
        def one(x_b, rows_b):
            _, pull = vjp(lambda pp: self._sample(pp, x_b), p)
            grads = vmap(pull)(rows_b)[0]
            return torch.cat([grads[n].reshape(rows_b.shape[0], -1) for n in self.local_names], dim=1)

        return vmap(one)(x, rows)

    def unflat(self, p, flat):
        out, offset = {}, 0
        for n in self.local_names:
            size = p[n].numel()
            out[n] = flat[offset:offset + size].reshape(p[n].shape)
            offset += size
        return out


class LinearOps(LeafOps):
    """Structured products of y = Wx + b (MATH.md §2.2), never materialising K:

        (K Kᵀ)_{(b,r),(b',r')} = (l_{b,r}·l_{b',r'}) (x_b·x_{b'} + 1)          cost O(d²·out + B²·in)
        Kᵀu:  ∂W = Σ u_{br} l_{br} x_bᵀ,  ∂b = Σ u_{br} l_{br}                    cost O(d·out + B·in·out)
        K g:  (K g)_{br} = l_{br} · (G_W x_b + g_b)                               cost O(B·in·out + d·out)
    """

    structured = True

    def __init__(self, module: nn.Linear, prefix: str):
        super().__init__(module, prefix)
        self.has_bias = module.bias is not None
        self.out_features, self.in_features = module.weight.shape

    def _wb(self, p):
        return p["weight"], p.get("bias")

    def forward(self, x, p):
        w, b = self._wb(p)
        return F.linear(x, w, b)

    def vjp_input(self, x, p, rows):
        return rows @ p["weight"]

    def jvp_input(self, x, p, v):
        return v @ p["weight"].T

    def jvp_param(self, x, p, dw):
        out = x @ dw["weight"].T
        return out + dw["bias"] if self.has_bias else out

    def _split(self, flat):
        n_w = self.out_features * self.in_features
        g_w = flat[:n_w].reshape(self.out_features, self.in_features)
        return g_w, (flat[n_w:] if self.has_bias else None)

    def _join(self, g_w, g_b):
        return torch.cat([g_w.reshape(-1), g_b]) if self.has_bias else g_w.reshape(-1)

    def vjp_param(self, x, p, lam):
        return self._join(lam.T @ x, lam.sum(0) if self.has_bias else None)

    def gram(self, x, rows):
        b, r, _ = rows.shape
        flat = rows.reshape(b * r, -1)
        inputs = x @ x.T
        if self.has_bias:
            inputs = inputs + 1
        return ((flat @ flat.T).reshape(b, r, b, r) * inputs[:, None, :, None]).reshape(b * r, b * r)

    def k_mv(self, x, rows, g):
        g_w, g_b = self._split(g)
        z = x @ g_w.T
        if self.has_bias:
            z = z + g_b
        return torch.einsum("bro,bo->br", rows, z).reshape(-1)

    def k_t(self, x, rows, u):
        lu = torch.einsum("br,bro->bo", u.reshape(rows.shape[:2]), rows)
        return self._join(lu.T @ x, lu.sum(0) if self.has_bias else None)

    def k_rows(self, x, p, rows):
        b, r, out = rows.shape
        k_w = torch.einsum("bro,bi->broi", rows, x).reshape(b, r, -1)
        return torch.cat([k_w, rows], dim=2) if self.has_bias else k_w


class ActivationOps(LeafOps):
    """An elementwise activation: A = diag σ'(x), no parameters."""

    structured = True

    def __init__(self, module: nn.Module, prefix: str, name: str):
        super().__init__(module, prefix)
        self.fn, self.derivative = ACTIVATIONS[name]

    def forward(self, x, p):
        return self.fn(x)

    def vjp_input(self, x, p, rows):
        return rows * self.derivative(x)[:, None, :]

    def jvp_input(self, x, p, v):
        return v * self.derivative(x)


# --------------------------------------------------------------------------------------------------------
# Structure: a chain (with parallel branches) of leaves
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Seq:
    children: list


@dataclass
class _Par:
    children: list
    split: list[int]


def _join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def structure(module: nn.Module, prefix: str = "", *, structured: bool = True):
    """Read ``module`` as a tree of sequences, parallel branches and leaves with their Jacobian products."""
    if isinstance(module, nn.Sequential):
        return _Seq([structure(m, _join_name(prefix, n), structured=structured) for n, m in module.named_children()])
    if isinstance(module, Parallel):
        return _Par([structure(m, _join_name(_join_name(prefix, "branches"), str(i)), structured=structured)
                     for i, m in enumerate(module.branches)], module.split)
    if structured and isinstance(module, nn.Linear):
        return LinearOps(module, prefix)
    if isinstance(module, Activation):
        return ActivationOps(module, prefix, module.name)
    if type(module) in _TORCH_ACTIVATIONS and (type(module) is not nn.Softplus or
                                               (module.beta == 1 and module.threshold >= 20)):
        return ActivationOps(module, prefix, _TORCH_ACTIVATIONS[type(module)])
    return LeafOps(module, prefix)


def leaves(tree) -> list[LeafOps]:
    if isinstance(tree, _Seq | _Par):
        return [leaf for child in tree.children for leaf in leaves(child)]
    return [tree]


def _forward(tree, x, params, trace: dict):
    """Forward pass recording each leaf's input in ``trace`` (keyed by id of the leaf)."""
    if isinstance(tree, _Seq):
        for child in tree.children:
            x = _forward(child, x, params, trace)
        return x
    if isinstance(tree, _Par):
        parts = torch.split(x, tree.split, dim=-1)
        outs = [_forward(child, part, params, trace) for child, part in zip(tree.children, parts)]
        trace[id(tree)] = [o.shape[-1] for o in outs]
        return torch.cat(outs, dim=-1)
    trace[id(tree)] = x
    return tree.forward(x, tree.params(params))


def _backward(tree, rows, params, trace, visit, need_input: bool = True):
    """Sweep rows (B, R, width) from the output of ``tree`` to its input, calling ``visit(leaf, x, p, rows)``
    at every leaf (x its input, rows at its output). Returns the rows at the input (None when not needed:
    the first module's input rows are never used, which saves its A-product)."""
    if isinstance(tree, _Seq):
        for i in range(len(tree.children) - 1, -1, -1):
            rows = _backward(tree.children[i], rows, params, trace, visit, need_input or i > 0)
        return rows
    if isinstance(tree, _Par):
        parts = torch.split(rows, trace[id(tree)], dim=-1)
        ins = [_backward(child, part, params, trace, visit, need_input) for child, part in zip(tree.children, parts)]
        return torch.cat(ins, dim=-1) if need_input else None
    x, p = trace[id(tree)], tree.params(params)
    visit(tree, x, p, rows)
    return tree.vjp_input(x, p, rows) if need_input else None


@dataclass
class Costate:
    """What the backward sweep knows at one module: λ_a at its output and the block gradient B_aᵀλ_a."""

    name: str
    costate: torch.Tensor
    grad: torch.Tensor | None


def costates(problem, theta: torch.Tensor) -> list[Costate]:
    """The costates λ_a of backprop-as-constrained-optimisation for every module of the problem's chain.

    λ_m = ∂L/∂y (per sample), λ_{a−1} = A_aᵀλ_a; ``grad`` is B_aᵀλ_a = ∇_{w_a}L (None for modules without
    parameters). Concatenated over modules, the grads equal ∇L(θ).
    """
    tree = structure(problem.model)
    params = problem.unflatten(theta)
    trace: dict = {}
    y = _forward(tree, problem.inputs, params, trace)
    lam = torch.func.grad(lambda out: problem.loss_fn(out, problem.targets))(y)
    found: list[Costate] = []

    def visit(leaf, x, p, rows):
        lam_a = rows[:, 0]
        found.append(Costate(leaf.prefix, lam_a, leaf.vjp_param(x, p, lam_a) if leaf.has_params else None))

    _backward(tree, lam.reshape(lam.shape[0], 1, -1), params, trace, visit, need_input=False)
    return found[::-1]
