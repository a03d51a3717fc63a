"""Learning rules as vector fields f(t, θ) → dθ/dt, ready for :func:`flows.simulate`.

Any callable ``f(t, θ)`` returning a tensor shaped like θ is a valid field; the classes here also carry the
``problem`` they act on, so that simulate can record the loss along the way.
"""

from __future__ import annotations

import torch

from flows.metrics import Euclidean, Metric
from flows.problem import Problem


class GradientFlow:
    """The Riemannian gradient flow θ̇ = −G(θ)⁻¹ ∇L(θ) (MATH.md §1).

    Along it dL/dt = −‖∇L‖²_{G⁻¹} ≤ 0. With G = I it is the continuous limit of gradient descent.
    Cost per evaluation: one gradient (forward + backward pass) plus one ``metric.solve``.
    θ may be a batch (E, N): every member moves under its own metric.
    """

    def __init__(self, problem: Problem, metric: Metric | None = None):
        if not isinstance(problem, Problem):
            raise TypeError(f"problem must be a flows.Problem, got {type(problem).__name__}")
        self.problem = problem
        self.metric = Euclidean() if metric is None else metric

        # a metric that can produce G⁻¹∇L in one pass (the layerwise fused sweep) is asked for it directly
        self._fused = getattr(self.metric, "natural_direction", None)

    def __call__(self, t: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            return -self._fused(theta)
        return -self.metric.solve(theta, self.problem.grad(theta))

    def describe(self) -> dict:
        return {"name": "GradientFlow", "metric": self.metric.describe()}

    def __repr__(self) -> str:
        return f"GradientFlow({self.problem!r}, {self.metric!r})"
