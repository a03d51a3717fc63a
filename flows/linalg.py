"""Numerical kernels shared by the problem, the modules and the metrics: Gram matrices from their lower panels and
the context in which attention is differentiable to any order."""

from __future__ import annotations

import torch

GRAM_PANELS = 4
GRAM_MIN_ROWS = 128
GRAM_MIN_COLUMNS = 256


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



class AttentionProbe(torch.overrides.TorchFunctionMode):
    """Records whether the code run inside it calls an attention kernel (scaled-dot-product attention, or the fused
    multi-head path ``nn.MultiheadAttention`` takes without gradients): a model that does not never needs
    :func:`differentiable_attention`, and its evaluations skip the context (≈ 11 µs per call)."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if "attention" in getattr(func, "__name__", ""):
            self.seen = True
        return func(*args, **(kwargs or {}))


def differentiable_attention():
    """A context in which scaled-dot-product attention runs its composite ("math") kernel.

    PyTorch's fused CPU attention kernels have no forward-mode derivative and no double backward, so a
    Jacobian–vector product or a second derivative through ``nn.MultiheadAttention`` fails inside them; the math
    kernel is the same function written in differentiable operations. Every evaluation of a model in flows
    (``Problem``, the module graph and its generic leaves) runs inside this context, so contraction rates, Ġ,
    Lyapunov tangents and Hessian–vector products work on attention models like on any other."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
