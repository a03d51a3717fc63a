"""Metrics G(θ): one interface, ``solve(θ, v) = G(θ)⁻¹v`` and ``matrix(θ)`` (dense, small N)."""

from flows.metrics._base import Constant, Diagonal, Euclidean, Metric
from flows.metrics.block_diagonal import BlockDiagonal
from flows.metrics.kfac import KFAC
from flows.metrics.layerwise import Layerwise
from flows.metrics.natural_gradient import NaturalGradient

__all__ = ["Metric", "Euclidean", "Diagonal", "Constant", "NaturalGradient", "Layerwise", "KFAC", "BlockDiagonal"]
