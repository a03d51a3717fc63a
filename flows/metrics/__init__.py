"""Metrics G(θ): one interface, ``solve(θ, v) = G(θ)⁻¹v`` and ``matrix(θ)`` (dense, small N)."""

from flows.metrics._base import Constant, Diagonal, Euclidean, Metric
from flows.metrics.block_diagonal import BlockDiagonal
from flows.metrics.kfac import KFAC
from flows.metrics.layerwise import Layerwise
from flows.metrics.natural_gradient import NaturalGradient

__all__ = ["Metric", "Euclidean", "Diagonal", "Constant", "NaturalGradient", "Layerwise", "KFAC", "BlockDiagonal",
           "NAMES", "by_name"]

#: the metrics a command line or a sweep file names
NAMES = ("euclidean", "natural", "layerwise", "kfac")


def by_name(name: str, problem, *, mu: float, metric_batch: int | None, seed: int = 0) -> Metric:
    """The metric called ``name`` (one of ``NAMES``) for ``problem``; μ is the damping of the curvature metrics."""
    if name == "euclidean":
        return Euclidean()
    if name == "natural":
        return NaturalGradient(problem, mu=mu, metric_batch=metric_batch, seed=seed)
    if name == "layerwise":
        return Layerwise(problem, mu=mu, metric_batch=metric_batch, seed=seed)
    if name == "kfac":
        return KFAC(problem, damping=mu, metric_batch=metric_batch, seed=seed)
    raise ValueError(f"unknown metric {name!r}; choose one of {list(NAMES)}")
