"""Structured sweeps of a chain of Linear layers and elementwise activations with a built-in loss: explicit tensor
operations in place of autograd, where a chain's regular shapes let a whole batch of directions or parameter vectors
share every matrix product.

The model y = f_L(…f_1(x)) is an ``nn.Sequential`` (nested ones allowed) of ``nn.Linear`` layers,
z_l = h_{l−1}W_lᵀ + b_l, and activations h = σ(z) from ``ACTIVATIONS``; the loss is the built-in ``mse`` or
``cross_entropy`` (integer class targets, outputs (B, C)), L = (1/B) Σ_i ℓ_i. Two sweeps:

1. Hessian–vector products, k vectors at once (:meth:`LinearChain.hessian_products`), by Pearlmutter's R-operator
(Pearlmutter 1994, "Fast exact multiplication by the Hessian", Neural Computation 6(1)). For a direction (V_l, v_l)
of (W_l, b_l), R{·} is the derivative along it (Rh_0 = 0 at the inputs):

    forward    Rz_l = h_{l−1}V_lᵀ + Rh_{l−1}W_lᵀ + v_l,          Rh = σ'(z)∘Rz
    output     δ_y = ∇_y L,  Rδ_y = ∇²_y L·Ry:  cross-entropy  δ_y = (p − onehot t)/B,  Rδ_y = (p∘Ry − p(pᵀRy))/B
                                                  mse            δ_y = (y − t)/B,          Rδ_y = Ry/B
    backward   δ_{h_{l−1}} = δ_{z_l}W_l,     Rδ_{h_{l−1}} = Rδ_{z_l}W_l + δ_{z_l}V_l
               δ_z = σ'(z)∘δ_h,              Rδ_z = σ''(z)∘Rz∘δ_h + σ'(z)∘Rδ_h
    results    ∇_{W_l}L = δ_{z_l}ᵀh_{l−1},   ∇_{b_l}L = Σ_b δ_{z_l}
               (∇²L·V)_{W_l} = Rδ_{z_l}ᵀh_{l−1} + δ_{z_l}ᵀRh_{l−1},   (∇²L·V)_{b_l} = Σ_b Rδ_{z_l}

The k directions are a leading batch dimension of every R-quantity, so each line above is one or two batched
tensor operations whatever k is (no per-vector operation, no autograd graph). Cost: the gradient's forward and
backward pass plus about 2k times its matrix products, O(k·B·Σ in_l·out_l) flops, in a number of operations fixed
per layer (≈ 50 for a two-layer MLP): for the digits MLP 64-32-10 on 256 samples at k = 5, 1.2 ms against 0.66 ms
for ``Problem.grad`` and 2.1 ms for the batched double-backward pass (one thread).

2. Weighted sums of per-sample gradients for an ensemble of P parameter vectors θ_p
(:meth:`LinearChain.weighted_gradients`), the minibatch-noise and Euler–Maruyama products of :mod:`flows.sde`:

    g_p = Σ_i w_{p,i} ∇_θ ℓ_i(θ_p) = J_y(θ_p)ᵀ [w_{p,i} ∂ℓ_i/∂y_i]_i,   ∂ℓ_i/∂y_i = p_i − onehot t_i  or  y_i − t_i

by one forward and one backward pass in which the P paths share the operations: the first layer reads the shared
inputs, so its P weight matrices are one (P·out) × in matrix and z_1 = x W_1ᵀ one matrix product for all paths (its
weight gradients likewise, xᵀδ); deeper layers are batched products over the paths. Cost: P gradients' flops,
O(P·B·Σ in_l·out_l), in a number of operations fixed per layer; on the digits MLP 64-32-10 with P = 16 paths over
all 1 797 samples one Euler–Maruyama step takes 12.2 ms against 13.8 ms for the same product vmapped over the paths
through autograd, and inside the solve the SDE's cost per path fell from 2.22× to 1.48× SGD's
(benchmarks/stochastic.py, 2 threads).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flows.linalg import softmax
from flows.modules.activations import ACTIVATIONS, activation_name
from flows.problem import cross_entropy, mse


def _tanh(z, h):
    d1 = 1 - h * h
    return d1, -2 * h * d1


def _sigmoid(z, h):
    d1 = h * (1 - h)
    return d1, d1 * (1 - 2 * h)


def _softplus(z, h):
    # the smooth derivatives, as ACTIVATIONS has them; torch's softplus is exactly linear above z = 20, where they
    # differ from its autograd derivatives by e^−20 ≈ 2e-9
    s = torch.sigmoid(z)
    return s, s * (1 - s)


def _relu(z, h):
    return (z > 0).to(z.dtype), None  # σ'' = 0 (almost everywhere)


# (σ'(z), σ''(z)) from the input z and the output h = σ(z); None for σ'' ≡ 0
DERIVATIVES = {"tanh": _tanh, "sigmoid": _sigmoid, "softplus": _softplus, "relu": _relu}

# δ ∘ σ'(z) from the costate δ, the input z and the output h: torch's own backward kernels for tanh and sigmoid
# (one pass, the formulas autograd uses, δ(1 − h²) and δ h(1 − h)), so a gradient agrees with autograd's to rounding
BACKWARD = {
    "tanh": lambda delta, z, h: torch.ops.aten.tanh_backward(delta, h),
    "sigmoid": lambda delta, z, h: torch.ops.aten.sigmoid_backward(delta, h),
    "softplus": lambda delta, z, h: delta * torch.sigmoid(z),
    "relu": lambda delta, z, h: delta * (z > 0),
}


@dataclass(frozen=True)
class _Layer:
    kind: str  # "linear" or an ACTIVATIONS name
    weight: str | None = None  # full parameter names of a Linear layer
    bias: str | None = None


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """Every call of a plain (nested) Sequential in order, a module used twice as often as it is called (not
    ``named_children``, which lists it once)."""
    if type(module) is nn.Sequential:
        for name, child in module._modules.items():
            yield from _walk(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix, module


class LinearChain:
    """A problem read as a chain of Linear layers and activations (see the module docstring); build it with
    :func:`linear_chain`. :meth:`hessian_products` gives (∇L(θ), ∇²L(θ)·V) by the R-operator sweep,
    :meth:`weighted_gradients` the weighted sums of per-sample gradients of an ensemble."""

    def __init__(self, problem, layers: list[_Layer], width: int):
        self.problem = problem
        self.layers = layers
        self.cross_entropy = problem.loss_fn is cross_entropy
        self.inv_batch = 1.0 / problem.batch_size
        if self.cross_entropy:
            self.onehot = F.one_hot(problem.targets, width).to(problem.dtype)

    def hessian_products(self, theta: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(∇L(θ) of shape (N,), ∇²L(θ)·vⱼ as rows of shape (k, N)) for one θ (N,) and k vectors as rows (k, N).

        Every R-quantity is held as (B, k, width), so that each product with a weight, a direction or an input is
        one plain matrix product with k folded into its rows or columns (no batched products)."""
        p = self.problem
        k = rows.shape[0]
        with torch.no_grad():
            params, dirs = p.unflatten(theta.detach()), p.unflatten(rows)
            # forward: every Linear layer's input h and R{h}; every activation's σ', σ'' and input R{z}
            h, rh = p.inputs, None  # rh: R{h} of shape (B, k, width); None while it is zero
            saved = []
            for layer in self.layers:
                if layer.kind == "linear":
                    w, v = params[layer.weight], dirs[layer.weight]  # v: (k, out, in)
                    out = F.linear(h, w, params[layer.bias] if layer.bias else None)
                    r_out = (h @ v.reshape(-1, w.shape[1]).T).view(-1, k, w.shape[0])  # h Vⱼᵀ for all j at once
                    if layer.bias:
                        r_out = r_out + dirs[layer.bias]
                    if rh is not None:
                        r_out = r_out + (rh.reshape(-1, w.shape[1]) @ w.T).view_as(r_out)  # R{h} Wᵀ
                    saved.append((h, rh))
                else:
                    out = ACTIVATIONS[layer.kind][0](h)
                    d1, d2 = DERIVATIVES[layer.kind](h, out)
                    d1, d2 = d1[:, None], None if d2 is None else d2[:, None]
                    r_out = None if rh is None else d1 * rh
                    saved.append((d1, d2, rh))
                h, rh = out, r_out
            y, ry = h, rh
            if ry is None:  # a chain without any Linear layer has no parameters: Problem refuses it
                raise ValueError("a linear chain needs at least one Linear layer")
            # output costate δ_y = ∇_y L and its directional derivative Rδ_y = ∇²_y L · Ry
            if self.cross_entropy:
                prob = softmax(y)
                delta = (prob - self.onehot) * self.inv_batch
                r_delta = (ry - (prob[:, None] * ry).sum(-1, keepdim=True)) * (prob[:, None] * self.inv_batch)
            else:
                delta = (y - p.targets) * self.inv_batch
                r_delta = ry * self.inv_batch
            # backward: δ of shape (B, width), Rδ of shape (B, k, width)
            grads: dict[str, torch.Tensor] = {}
            prods: dict[str, torch.Tensor] = {}
            for i in range(len(self.layers) - 1, -1, -1):
                layer = self.layers[i]
                if layer.kind == "linear":
                    x, rx = saved[i]
                    w, v = params[layer.weight], dirs[layer.weight]
                    n_out, n_in = w.shape
                    grads[layer.weight] = delta.T @ x
                    hv = (r_delta.reshape(x.shape[0], -1).T @ x).view(k, n_out, n_in)  # Rδᵀ h
                    if rx is not None:  # + δᵀ R{h}
                        hv = hv + (delta.T @ rx.reshape(x.shape[0], -1)).view(n_out, k, n_in).transpose(0, 1)
                    prods[layer.weight] = hv
                    if layer.bias:
                        grads[layer.bias] = delta.sum(0)
                        prods[layer.bias] = r_delta.sum(0)
                    if i > 0:  # Rδ_in = Rδ W + δ V
                        r_in = (r_delta.reshape(-1, n_out) @ w).view(-1, k, n_in)
                        r_delta = r_in + (delta @ v.transpose(0, 1).reshape(n_out, -1)).view_as(r_in)
                        delta = delta @ w
                else:
                    d1, d2, rz = saved[i]
                    new_r = d1 * r_delta
                    if d2 is not None and rz is not None:
                        new_r = new_r + (d2 * delta[:, None]) * rz
                    delta, r_delta = d1[:, 0] * delta, new_r
            names = list(params)
            g = torch.cat([grads[n].reshape(-1) for n in names])
            products = torch.cat([prods[n].reshape(k, -1) for n in names], dim=1)
        return g, products

    def weighted_gradients(self, thetas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_i w_{p,j,i} ∇_θ ℓ_i(θ_p) of shape (P, k, N), for an ensemble θ of shape (P, N) and k weightings of the
        training samples per path, weights of shape (P, k, B) (sweep 2 of the module docstring).

        One forward pass for all paths, then one backward pass per weighting. Detached (not differentiable
        further). Softplus uses its smooth derivative σ(z), which differs from torch's (exactly 1 above z = 20) by
        at most e^−20."""
        p = self.problem
        paths = thetas.shape[0]
        with torch.no_grad():
            params = p.unflatten(thetas.detach())
            h, shared = p.inputs, True  # h: (B, width) while it is the shared input, then (P, B, width)
            saved = []
            for layer in self.layers:
                if layer.kind == "linear":
                    w = params[layer.weight]  # (P, out, in)
                    b = params[layer.bias] if layer.bias else None
                    n_out, n_in = w.shape[1:]
                    if shared:  # all paths' weights as one (P·out) × in matrix: z = x Wᵀ + b in one product
                        flat = w.reshape(paths * n_out, n_in).T
                        z = h @ flat if b is None else torch.addmm(b.reshape(-1), h, flat)
                        out = z.view(-1, paths, n_out).transpose(0, 1)
                    else:
                        out = torch.bmm(h, w.mT) if b is None else torch.baddbmm(b[:, None], h, w.mT)
                    saved.append((h, shared))
                    shared = False
                else:
                    out = ACTIVATIONS[layer.kind][0](h)
                    saved.append((h, out))
                h = out
            if shared:  # a chain without any Linear layer has no parameters: Problem refuses it
                raise ValueError("a linear chain needs at least one Linear layer")
            per_sample = (softmax(h) - self.onehot) if self.cross_entropy else (h - p.targets)  # ∂ℓ_i/∂y_i
            names = list(params)
            results = []
            for j in range(weights.shape[1]):
                delta = per_sample * weights[:, j, :, None]  # (P, B, C)
                grads: dict[str, torch.Tensor] = {}
                for i in range(len(self.layers) - 1, -1, -1):
                    layer = self.layers[i]
                    if layer.kind == "linear":
                        x, x_shared = saved[i]
                        grads[layer.weight] = torch.bmm(delta.mT, x.expand(paths, -1, -1) if x_shared else x)
                        if layer.bias:
                            grads[layer.bias] = delta.sum(1)
                        if x_shared:  # below the first Linear layer there are no parameters
                            break
                        delta = torch.bmm(delta, params[layer.weight])
                    else:
                        z, out = saved[i]
                        delta = BACKWARD[layer.kind](delta, z, out)
                results.append(torch.cat([grads[n].reshape(paths, -1) for n in names], dim=1))
        return torch.stack(results, dim=1)


def linear_chain(problem) -> LinearChain | None:
    """``problem`` read as a chain of Linear layers and activations, or None when it is not one.

    It is one when the model is an ``nn.Sequential`` (plain, possibly nested) of ``nn.Linear`` layers (their own
    ``forward``), activation modules that are exactly one of ``ACTIVATIONS`` and ``nn.Identity``, with every
    parameter in one Linear layer (none shared) and θ ordered layer by layer, weight before bias; the inputs are
    (B, in) floating tensors; and the loss is the built-in ``mse`` (targets shaped like the outputs) or
    ``cross_entropy`` (1-D integer targets). Anything else — convolutions, attention, custom modules or losses —
    gives None, so a caller keeps its general route. Cost: a walk over the modules.
    """
    model = problem.model
    if type(model) is not nn.Sequential or problem.loss_fn not in (mse, cross_entropy):
        return None
    if problem.inputs.ndim != 2 or not problem.inputs.is_floating_point():
        return None
    layers, names = [], []
    for prefix, module in _walk(model, ""):
        if type(module) is nn.Identity:
            continue
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
            has_bias = module.bias is not None
            weight, bias = f"{prefix}.weight", f"{prefix}.bias" if has_bias else None
            layers.append(_Layer("linear", weight, bias))
            names += [weight, bias] if has_bias else [weight]
            continue
        name = activation_name(module)
        if name is None or name not in DERIVATIVES or any(True for _ in module.parameters()):
            return None
        layers.append(_Layer(name))
    if not names or names != list(problem.unflatten(problem.theta0)):
        return None  # parameters outside the Linear layers, shared ones, or another order of θ
    width = [m for _, m in _walk(model, "") if isinstance(m, nn.Linear)][-1].out_features
    if problem.loss_fn is mse:
        if not problem.targets.is_floating_point() or tuple(problem.targets.shape) != (problem.batch_size, width):
            return None
    elif problem.targets.is_floating_point() or problem.targets.ndim != 1:
        return None
    return LinearChain(problem, layers, width)


def chain_hessian_products(problem, theta: torch.Tensor, vectors: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(∇L(θ), ∇²L(θ)V) for one θ (N,) and vectors V (N, k) (or one vector (N,), giving one product (N,)) by the
    R-operator sweep of the module docstring, or None when ``problem`` is not a chain of Linear layers and
    activations with a built-in loss (:func:`linear_chain`). :meth:`flows.Problem.hessian_products` takes this
    route by itself whenever it applies."""
    if linear_chain(problem) is None:
        return None
    return problem.hessian_products(theta, vectors)  # checks the shapes and takes this sweep (its chain is cached)
