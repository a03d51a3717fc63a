"""Parameter manifolds of modules, named by their retractions (MATH.md §2.3)."""

from __future__ import annotations

from collections.abc import Callable

import torch


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
    offsets = {}
    for block in problem.blocks:
        start = block.start
        for name, shape in zip(block.param_names, block.shapes):
            offsets[name] = (start, start + shape.numel())
            start += shape.numel()
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
