"""Composition of modules: series (Chain), direct sum (Parallel), and any per-sample map as a module (Function)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


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
        # the width check reads a concrete shape, so it is skipped while torch.fx traces the model
        if not isinstance(x, torch.fx.Proxy) and x.shape[-1] != sum(self.split):
            raise ValueError(f"Parallel expects inputs of width {sum(self.split)}, got {x.shape[-1]}")
        starts = [sum(self.split[:i]) for i in range(len(self.split))]
        return torch.cat([branch(x.narrow(-1, start, size))
                          for branch, start, size in zip(self.branches, starts, self.split)], dim=-1)


class Function(nn.Module):
    """Any differentiable per-sample map y = fn(x, w) with parameter vector w (initially ``w0``).

    ``fn`` receives a batch x of shape (B, in) and w of shape (n,) and must treat samples independently.
    Stages of a physical or biological cascade, not only network layers, are modules this way.
    ``retract(w, dw)`` names the parameter manifold by its retraction (default: Euclidean, w + dw); it is
    used by discrete-time updates through :func:`flows.modules.retraction`.
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
