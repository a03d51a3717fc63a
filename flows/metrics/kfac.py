"""K-FAC (Martens & Grosse 2015) as a metric: the peer baseline for the layerwise metric.

For a Linear block with augmented inputs x̄_b = (x_b, 1) and backward factor rows l_{b,r} (the same rows the
layerwise sweep carries), the exact block is Σ_b (Σ_r l lᵀ) ⊗ x̄_b x̄_bᵀ; K-FAC replaces it by

    G_a ≈ (S + γ_S I) ⊗ (Ā + γ_A I),    S = Σ_{b,r} l_{b,r} l_{b,r}ᵀ,    Ā = (1/B) Σ_b x̄_b x̄_bᵀ,
    γ_A = π √γ,  γ_S = √γ / π,  π = √((tr Ā / dim Ā) / (tr S / dim S))          (factored Tikhonov damping)

inverted through the two small factors: G_a⁻¹ vec(V) = vec((S + γ_S I)⁻¹ V (Ā + γ_A I)⁻¹), cost
O(out³ + in³ + out·in·(out + in)). Blocks of other modules get γ I.
"""

from __future__ import annotations

import torch

from flows.metrics._base import Metric, _check_length, _positive_float, batched, block_diagonal_matrix
from flows.metrics.layerwise import Layerwise
from flows.modules import LinearOps


class KFAC(Metric):
    """Kronecker-factored blocks for Linear modules, γI for the others."""

    def __init__(self, problem, damping: float = 1e-3, output: str = "auto", metric_batch=None, *, seed: int = 0):
        self.problem = problem
        self.damping = _positive_float(damping, "damping")
        self._sweep = Layerwise(problem, mu=1.0, output=output, metric_batch=metric_batch, seed=seed)
        self.blocks = [(name, sl) for name, sl, _ in self._sweep.blocks]

    def factors(self, theta):
        """Per block: (S + γ_S I, Ā + γ_A I, leaf) for Linear blocks, None for the others."""
        found = {}

        def visit(name, sl, leaf, x, p, rows, lam):
            if not isinstance(leaf, LinearOps):
                found[name] = None
                return
            xa = torch.cat([x, torch.ones_like(x[:, :1])], dim=1) if leaf.has_bias else x
            a = xa.T @ xa / x.shape[0]
            flat = rows.reshape(-1, rows.shape[-1])
            s = flat.T @ flat
            pi = torch.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(s) / s.shape[0]).clamp_min(1e-300))
            root = self.damping ** 0.5
            eye = torch.eye
            found[name] = (s + (root / pi) * eye(s.shape[0], dtype=s.dtype, device=s.device),
                           a + (root * pi) * eye(a.shape[0], dtype=a.dtype, device=a.device), leaf)

        self._sweep.sweep(theta, visit)
        return found

    @staticmethod
    def _as_matrix(leaf, g):
        g_w, g_b = leaf._split(g)
        return torch.cat([g_w, g_b[:, None]], dim=1) if leaf.has_bias else g_w

    @staticmethod
    def _from_matrix(leaf, m):
        return leaf._join(m[:, :-1], m[:, -1]) if leaf.has_bias else m.reshape(-1)

    def _solve_one(self, theta, v):
        factors = self.factors(theta)
        out = []
        for name, sl in self.blocks:
            f = factors[name]
            if f is None:
                out.append(v[sl] / self.damping)
                continue
            s, a, leaf = f
            m = torch.cholesky_solve(self._as_matrix(leaf, v[sl]), torch.linalg.cholesky(s))
            m = torch.cholesky_solve(m.T, torch.linalg.cholesky(a)).T
            out.append(self._from_matrix(leaf, m))
        return torch.cat(out)

    def solve(self, theta, v):
        _check_length(v, self.problem.num_params, "v")
        return batched(self._solve_one, theta, v)

    def matrix(self, theta):
        factors = self.factors(theta)
        blocks = []
        for name, sl in self.blocks:
            f = factors[name]
            size = sl.stop - sl.start
            if f is None:
                blocks.append((sl, self.damping * torch.eye(size, dtype=theta.dtype, device=theta.device)))
                continue
            s, a, leaf = f
            # kron acts on the row-major [W | b] matrix; map its entries to θ's layout (W row-major, then b)
            order = self._from_matrix(leaf, torch.arange(size, device=theta.device).reshape(s.shape[0], -1))
            blocks.append((sl, torch.kron(s, a)[order][:, order]))
        return block_diagonal_matrix(self.problem.num_params, blocks, theta)

    def describe(self):
        return {"name": "KFAC", "damping": self.damping}
