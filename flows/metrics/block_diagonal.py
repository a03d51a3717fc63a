"""The exact diagonal blocks of the Gauss–Newton metric, dense: the reference for :class:`Layerwise`.

    G_a = μI + K_aᵀK_a,   K_a = the columns of K = L_o J belonging to block a        (MATH.md §2.2)

Forms every n_a × n_a block and solves it by Cholesky: cost O(d·N) for K, O(Σ n_a² d + n_a³) per solve.
"""

from __future__ import annotations

import torch

from flows.linalg import spd_solve
from flows.metrics._base import Metric, _check_length, _positive_float, batched, block_diagonal_matrix
from flows.metrics.natural_gradient import NaturalGradient


class BlockDiagonal(Metric):
    """blockdiag_a(μI + JᵀM_oJ)_{aa} over ``blocks`` (default: the problem's module blocks), dense."""

    def __init__(self, problem, mu: float = 1.0, output: str = "auto", metric_batch=None, *, seed: int = 0,
                 blocks=None):
        self.problem = problem
        self.mu = _positive_float(mu, "mu")
        self.blocks = [(b.name, b.slice) for b in problem.blocks] if blocks is None else list(blocks)
        self._full = NaturalGradient(problem, mu, output, metric_batch, seed=seed)

    def _blocks_dense(self, theta):
        k = self._full.factor(theta)
        eye = torch.eye
        return [(sl, k[:, sl].T @ k[:, sl] + self.mu * eye(sl.stop - sl.start, dtype=k.dtype, device=k.device))
                for _, sl in self.blocks]

    def _solve_one(self, theta, v):
        out = torch.zeros_like(v)
        for sl, g in self._blocks_dense(theta):
            out[sl] = spd_solve(g, v[sl])
        return out

    def solve(self, theta, v):
        _check_length(v, self.problem.num_params, "v")
        return batched(self._solve_one, theta, v)

    def matrix(self, theta):
        return block_diagonal_matrix(self.problem.num_params, self._blocks_dense(theta), theta)

    def describe(self):
        return {"name": "BlockDiagonal", "mu": self.mu, "blocks": [name for name, _ in self.blocks]}
