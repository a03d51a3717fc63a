"""Numerical kernels shared by the problem, the modules and the metrics: Gram matrices from their lower panels and
the context in which attention and normalisation are differentiable to any order."""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

GRAM_PANELS = 4
GRAM_MIN_ROWS = 128
GRAM_MIN_COLUMNS = 256
SOFTMAX_MIN_ROWS = 1024
SOFTMAX_MAX_CLASSES = 32


def softmax(z: torch.Tensor) -> torch.Tensor:
    """softmax along the last dimension, p = exp(z − max z) / Σ exp(z − max z).

    For many short rows (at least ``SOFTMAX_MIN_ROWS`` rows of at most ``SOFTMAX_MAX_CLASSES`` entries) in this
    composite form: there torch's CPU kernel takes ≈ 7.5 ns per entry whatever the number of rows, 2.7× slower
    than the four composite passes at 16 × 1 797 rows of 10 classes (2.16 ms against 0.81 ms; 2.3 against 0.90 ms
    vmapped over the 16; 2 threads, float64). ``torch.softmax`` everywhere else, where it is faster (5 against 15 µs
    at 32 × 10).
    The shift max z is detached: softmax(z − c) = softmax(z) for every constant c, so the function of z, and with it
    every derivative of any order and under any torch.func transform, is the same whatever the shift does.
    Under ``vmap`` the rows counted are one example's. Cost O(numel).
    """
    classes = z.shape[-1] if z.ndim else 1
    if classes > SOFTMAX_MAX_CLASSES or z.numel() < SOFTMAX_MIN_ROWS * classes:
        return torch.softmax(z, dim=-1)
    e = (z - z.amax(-1, keepdim=True).detach()).exp()
    return e / e.sum(-1, keepdim=True)


def spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """matrix⁻¹ rhs for a symmetric positive definite ``matrix`` (n, n) and ``rhs`` (n,) or (n, k), by Cholesky:
    the upper factor U (matrix = UᵀU), then Uᵀy = rhs and Ux = y by two triangular solves. Cost n³/3 + 2n²k flops.

    The same mathematics as ``torch.cholesky_solve(rhs, torch.linalg.cholesky(matrix))`` and 16–19 % faster on this
    library's d × d inner matrices (302 against 372 µs at n = 288, 104 against 126 µs at n = 160, min of 201 calls;
    2 threads, float64). A matrix that is not positive definite raises ``torch.linalg.LinAlgError`` as
    ``torch.linalg.cholesky`` does.
    """
    upper = torch.linalg.cholesky(matrix, upper=True)
    columns = rhs[:, None] if rhs.ndim == 1 else rhs
    x = torch.linalg.solve_triangular(upper, torch.linalg.solve_triangular(upper.mT, columns, upper=False),
                                      upper=True)
    return x[:, 0] if rhs.ndim == 1 else x


def gram(k: torch.Tensor) -> torch.Tensor:
    """K Kᵀ for K of shape (..., d, n), computing only the lower triangle of panels.

    The rows are cut into ``GRAM_PANELS`` panels; panel a is multiplied against the rows up to and including its
    own (one matmul each), and the upper triangle is the transpose of the lower. That is (m + 1)/(2m) of the
    flops of ``k @ k.mT`` (62.5 % for m = 4; BLAS's syrk does the same, but torch does not expose it) and ≈ 0.71×
    its time at d = 288, n = 2304 on the benchmark machine. Plain ``k @ k.mT`` below ``GRAM_MIN_ROWS`` rows or
    ``GRAM_MIN_COLUMNS`` columns, where the panels' extra calls cost more than the flops saved (2.8× slower at
    d = 288, n = 10; even at n = 128).
    Built with ``torch.cat`` (no in-place writes), so it batches under ``torch.func.vmap``.
    """
    d = k.shape[-2]
    if d < GRAM_MIN_ROWS or k.shape[-1] < GRAM_MIN_COLUMNS:
        return k @ k.mT
    m = GRAM_PANELS
    edges = [round(d * j / m) for j in range(m + 1)]
    lower = [k[..., edges[a]:edges[a + 1], :] @ k[..., :edges[a + 1], :].mT for a in range(m)]
    rows = []
    for a in range(m):
        above = [lower[c][..., :, edges[a]:edges[a + 1]].mT for c in range(a + 1, m)]
        rows.append(torch.cat([lower[a], *above], dim=-1))
    return torch.cat(rows, dim=-2)


class KernelProbe(torch.overrides.TorchFunctionMode):
    """Records whether the code run inside it calls a kernel that needs :func:`differentiable_kernels`: attention
    (scaled-dot-product attention, or the fused multi-head path ``nn.MultiheadAttention`` takes without gradients),
    layer norm or instance norm. A model that calls none never needs the context, and its evaluations skip it
    (≈ 11 µs per call, more per operation for the norms)."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if "attention" in name or "layer_norm" in name or "instance_norm" in name:
            self.seen = True
        return func(*args, **(kwargs or {}))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """``F.layer_norm`` in composite operations: (x − mean)/√(var + ε) ⊙ weight + bias over the last
    ``len(normalized_shape)`` dims (biased variance, as torch). The fused kernel's derivatives are wrong in one
    composition of torch.func transforms in PyTorch 2.13: forward mode over a vmapped reverse-mode pass
    (``jacfwd(jacrev(f))``, i.e. ``torch.func.hessian``, or a JVP of a batched vjp) gets the cross term between
    input and weight wrong (relative error 0.19 on a 3 × 4 example); the composite is right in all of them
    (tests/test_linalg.py). Cost: a few elementwise passes (≈ 0.2 ms per LayerNorm in a transformer gradient)."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5):
    """``F.instance_norm`` in composite operations when it normalises by the input's own statistics (each sample and
    channel over its spatial dims), for the same reason as :func:`layer_norm`; with running statistics it is an
    affine map and ``F.instance_norm`` itself is used."""
    if not use_input_stats:
        return _FUSED["instance_norm"](x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    var, mean = torch.var_mean(x, tuple(range(2, x.ndim)), correction=0, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if weight is not None:
        out = out * weight.reshape(shape)
    return out if bias is None else out + bias.reshape(shape)


#: fused functions and their composite forms (same values, every derivative right)
COMPOSITES = {F.layer_norm: layer_norm, F.instance_norm: instance_norm}


_FUSED = {"layer_norm": F.layer_norm, "instance_norm": F.instance_norm}
_swap_lock = threading.Lock()
_swap_depth = 0


@contextlib.contextmanager
def composed_norms():
    """A context in which ``torch.nn.functional.layer_norm`` and ``instance_norm`` — what ``nn.LayerNorm`` and
    ``nn.InstanceNorm*d`` call — are :func:`layer_norm` and :func:`instance_norm`.

    The two attributes of ``torch.nn.functional`` are swapped for the duration (reference-counted under a lock, so
    nested and concurrent uses restore them once, on the last exit): two attribute writes per evaluation, where a
    ``TorchFunctionMode`` intercepting every operation cost ≈ 0.8 ms per gradient of the benchmark transformer. Code
    that bound ``layer_norm`` to its own name before the swap keeps the fused kernel."""
    global _swap_depth
    with _swap_lock:
        if _swap_depth == 0:
            for name, composite in (("layer_norm", layer_norm), ("instance_norm", instance_norm)):
                setattr(F, name, composite)
        _swap_depth += 1
    try:
        yield
    finally:
        with _swap_lock:
            _swap_depth -= 1
            if _swap_depth == 0:
                for name, fused in _FUSED.items():
                    setattr(F, name, fused)


@contextlib.contextmanager
def differentiable_kernels():
    """A context in which attention, layer norm and instance norm are differentiable to any order, in any
    composition of torch.func transforms.

    PyTorch's fused CPU attention kernels have no forward-mode derivative and no double backward, so a
    Jacobian–vector product or a second derivative through ``nn.MultiheadAttention`` fails inside them; the context
    selects the composite ("math") attention kernel, the same function written in differentiable operations. The
    fused layer-norm and instance-norm kernels have every derivative but one composition silently wrong (see
    :func:`layer_norm`); the context computes them in composite operations too. Every evaluation of a model in flows
    (``Problem`` when its trial evaluation saw one of these kernels, the module graph's nodes) runs inside it, so
    contraction rates, Ġ, Lyapunov tangents and Hessians are right on transformers like on any other model."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), composed_norms():
        yield
