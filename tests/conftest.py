import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tanh_mlp(sizes, seed=0):
    """A random tanh MLP in float64 with non-trivial weights (std 1/√fan_in, biases included)."""
    from flows.data import mlp

    return mlp(sizes, seed=seed)


def dense_gauss_newton(problem, theta, mu, loss_fn, idx=None):
    """μI + Jᵀ (∇²_y L) J from autograd's dense Jacobian and Hessian — no factor formulas involved."""
    from torch.autograd.functional import hessian, jacobian

    x = problem.inputs if idx is None else problem.inputs[idx]
    t = problem.targets if idx is None else problem.targets[idx]
    y0 = problem.outputs(theta, x)
    jac = jacobian(lambda th: problem.outputs(th, x).reshape(-1), theta)
    m_out = hessian(lambda y: loss_fn(y.reshape(y0.shape), t), y0.reshape(-1))
    return mu * torch.eye(theta.numel(), dtype=theta.dtype) + jac.T @ m_out @ jac


def block_diagonal_part(matrix, slices):
    """The dense matrix restricted to its diagonal blocks."""
    out = torch.zeros_like(matrix)
    for sl in slices:
        out[sl, sl] = matrix[sl, sl]
    return out


def mse_loss(y, t):
    return 0.5 * ((y - t) ** 2).sum() / y.shape[0]


def ce_loss(y, t):
    return torch.nn.functional.cross_entropy(y, t)


def squared_diagonal_metric():
    """G(θ) = diag(1 + θ²): a cheap, smooth metric that moves with θ."""
    from flows.metrics import Metric

    class SquaredDiagonal(Metric):
        def solve(self, theta, v):
            return v / (1 + theta**2)

        def apply(self, theta, v):
            return v * (1 + theta**2)

        def matrix(self, theta):
            return torch.diag(1 + theta**2)

    return SquaredDiagonal()
