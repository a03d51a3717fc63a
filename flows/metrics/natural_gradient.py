"""The damped Gauss–Newton / Fisher metric ("natural gradient"), solved in sample space (MATH.md §2.1).

    G(θ) = μ I + Jᵀ M_o J = μ I + KᵀK,          K = L_o J   (d × N, d = B·C)
    G⁻¹ v = (1/μ) [ v − Kᵀ (μ I_d + K Kᵀ)⁻¹ K v ]          (Woodbury identity)

The inner d × d matrix is factored by Cholesky; no N × N matrix is formed on the solve path.
Cost per solve O(N d² + d³) time, O(N d) memory, plus d vector–Jacobian products to build K.
"""

from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from flows.linalg import spd_solve
from flows.metrics._base import Metric, _check_length, _positive_float, batched
from flows.metrics.output import check_separable, output_rows, resolve_output


def select_metric_batch(metric_batch, batch_size: int, seed: int, device) -> torch.Tensor | None:
    """Indices of the fixed metric subsample: None (all samples), a count m (a fixed random subset drawn
    with ``seed``) or explicit indices."""
    if metric_batch is None:
        return None
    if isinstance(metric_batch, int):
        if not 1 <= metric_batch <= batch_size:
            raise ValueError(f"metric_batch must be between 1 and the batch size {batch_size}, got {metric_batch}")
        gen = torch.Generator().manual_seed(seed)
        return torch.randperm(batch_size, generator=gen)[:metric_batch].sort().values.to(device)
    idx = torch.as_tensor(metric_batch, dtype=torch.long)
    if idx.ndim != 1 or idx.numel() == 0 or idx.min() < 0 or idx.max() >= batch_size:
        raise ValueError(f"metric_batch indices must be a non-empty vector in [0, {batch_size}), got {idx.tolist()}")
    return idx.to(device)


class NaturalGradient(Metric):
    """G = μI + JᵀM_oJ on the problem's data (or a fixed subsample), solved with Woodbury + Cholesky.

    Args:
        problem: the :class:`flows.Problem` whose outputs define J.
        mu: damping μ > 0 (the "mass"); μ → ∞ recovers plain gradient flow with time scaled by 1/μ.
        output: ``"auto"`` (identity for mse, fisher for cross-entropy, ggn otherwise), ``"identity"``,
            ``"fisher"`` or ``"ggn"`` — see :mod:`flows.metrics.output`.
        metric_batch: None (all B samples), a count m, or indices: the metric uses only those samples, so
            d = m·C stays small while the field stays a deterministic function of θ. The output metric is
            normalised by the subsample size (the subsample's own loss).
        seed: seed of the random subsample when ``metric_batch`` is a count.
    """

    def __init__(self, problem, mu: float = 1.0, output: str = "auto", metric_batch=None, seed: int = 0,
                 probes: int = 1):
        self.problem = problem
        self.mu = _positive_float(mu, "mu")
        self.output = resolve_output(output, problem.loss_name)
        self.probes, self.seed = int(probes), seed
        self.indices = select_metric_batch(metric_batch, problem.batch_size, seed, problem.device)
        if self.indices is None:
            self.inputs, self.targets = problem.inputs, problem.targets
        else:
            self.inputs, self.targets = problem.inputs[self.indices], problem.targets[self.indices]
        if self.output == "ggn":
            check_separable(problem._outputs(problem.theta0, self.inputs), self.targets, problem.loss_fn)

    def rows(self, outputs: torch.Tensor) -> torch.Tensor:
        """Output-metric factor rows (B, R, C) at the network outputs (see :mod:`flows.metrics.output`)."""
        return output_rows(self.output, outputs, self.targets, self.problem.loss_fn, probes=self.probes,
                           seed=self.seed)

    def _sample_output(self, theta, x):
        y = self.problem._outputs(theta, x[None])[0]
        return y, y

    def jacobian(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample output Jacobians J (B, C, N) and outputs y (B, C) at one θ.

        Each sample's C rows are back-propagated through that sample alone (vmap over samples of jacrev), so
        the cost is B·C single-sample vector–Jacobian products rather than B·C full-batch ones. This assumes
        the model treats samples independently (true of MLPs; not of batch normalisation in training mode).
        """
        jac, y = vmap(jacrev(self._sample_output, has_aux=True), in_dims=(None, 0))(theta, self.inputs)
        b = y.shape[0]
        return jac.reshape(b, -1, theta.shape[-1]), y.reshape(b, -1)

    def factor(self, theta: torch.Tensor) -> torch.Tensor:
        """K = L_o J (d × N) at one θ. Cost: d single-sample vector–Jacobian products."""
        jac, y = self.jacobian(theta)
        outputs = y if self.output != "ggn" else self.problem._outputs(theta, self.inputs)  # the loss's own shape
        return torch.einsum("brc,bcn->brn", self.rows(outputs), jac).reshape(-1, theta.shape[-1])

    def _solve_one(self, theta, v):
        k = self.factor(theta)
        inner = k @ k.T + self.mu * torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
        u = spd_solve(inner, k @ v)
        return (v - k.T @ u) / self.mu

    def solve(self, theta, v):
        _check_length(v, self.problem.num_params, "v")
        return batched(self._solve_one, theta, v)

    def apply(self, theta, v):
        def one(th, vv):
            k = self.factor(th)
            return self.mu * vv + k.T @ (k @ vv)

        return batched(one, theta, v)

    def matrix(self, theta):
        k = self.factor(theta)
        g = k.T @ k
        g.diagonal().add_(self.mu)
        return g

    def describe(self):
        return {"name": "NaturalGradient", "mu": self.mu, "output": self.output,
                "metric_batch": None if self.indices is None else int(self.indices.numel())}
