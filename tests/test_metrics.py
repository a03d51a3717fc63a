"""Metrics: every solve against a dense reference built independently (MATH.md §2.1)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flows
from flows.metrics import Constant, Diagonal, Euclidean, NaturalGradient
from tests.conftest import ce_loss, dense_gauss_newton, mse_loss, tanh_mlp


def _problem(sizes, b, loss, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, sizes[0], generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, sizes[-1], (b,), generator=g)
    else:
        y = torch.randn(b, sizes[-1], generator=g, dtype=torch.float64)
    model = tanh_mlp(sizes, seed)
    # Larger weights than the default init, so the network is far from linear and J is not tiny.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    return flows.Problem(model, loss, (x, y))


_mse, _ce = mse_loss, ce_loss


@pytest.mark.parametrize("loss,output,loss_fn", [("mse", "identity", _mse), ("cross_entropy", "fisher", _ce),
                                                 ("cross_entropy", "ggn", _ce), ("mse", "ggn", _mse)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_natural_gradient_solve_equals_dense_solve(loss, output, loss_fn, seed):
    problem = _problem([5, 7, 6, 4], b=3, loss=loss, seed=seed)  # 3 layers, d = 12 < N = 118
    theta = problem.theta0
    mu = 0.1
    metric = NaturalGradient(problem, mu=mu, output=output)
    dense = dense_gauss_newton(problem, theta, mu, loss_fn)
    v = torch.randn(problem.num_params, dtype=torch.float64)
    expected = torch.linalg.solve(dense, v)
    got = metric.solve(theta, v)
    assert torch.linalg.vector_norm(got - expected) <= 1e-10 * torch.linalg.vector_norm(expected)
    assert torch.allclose(metric.matrix(theta), dense, rtol=1e-12, atol=1e-13)
    assert torch.allclose(metric.apply(theta, got), v, rtol=1e-10, atol=1e-12)


@given(width=st.integers(1, 6), b=st.integers(1, 6), mu=st.floats(1e-3, 10.0), seed=st.integers(0, 1000))
def test_natural_gradient_woodbury_matches_dense_on_random_mlps(width, b, mu, seed):
    problem = _problem([3, width, width, 3], b=b, loss="cross_entropy", seed=seed)
    metric = NaturalGradient(problem, mu=mu)
    v = torch.randn(problem.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    dense = dense_gauss_newton(problem, problem.theta0, mu, _ce)
    expected = torch.linalg.solve(dense, v)
    assert torch.linalg.vector_norm(metric.solve(problem.theta0, v) - expected) <= (
        1e-9 * torch.linalg.vector_norm(expected))
    assert torch.linalg.eigvalsh(metric.matrix(problem.theta0))[0] >= mu * (1 - 1e-9)  # SPD, λ ≥ μ


def test_metric_batch_uses_the_fixed_subsample():
    problem = _problem([4, 5, 3], b=10, loss="mse")
    metric = NaturalGradient(problem, mu=0.5, metric_batch=4, seed=3)
    idx = metric.indices
    assert idx.numel() == 4 and len(set(idx.tolist())) == 4
    dense = dense_gauss_newton(problem, problem.theta0, 0.5, _mse, idx)
    v = torch.randn(problem.num_params, dtype=torch.float64)
    assert torch.allclose(metric.solve(problem.theta0, v), torch.linalg.solve(dense, v), rtol=1e-10, atol=1e-12)
    again = NaturalGradient(problem, mu=0.5, metric_batch=4, seed=3)
    assert torch.equal(again.indices, idx)
    with pytest.raises(ValueError, match="between 1 and the batch size 10, got 11"):
        NaturalGradient(problem, mu=0.5, metric_batch=11)


def test_natural_gradient_large_mu_is_scaled_gradient_and_batches():
    problem = _problem([3, 4, 2], b=5, loss="mse")
    v = torch.randn(problem.num_params, dtype=torch.float64)
    mu = 1e8
    metric = NaturalGradient(problem, mu=mu)
    assert torch.allclose(metric.solve(problem.theta0, v), v / mu, rtol=1e-6)
    thetas = problem.theta0 + torch.randn(3, problem.num_params, dtype=torch.float64)
    vs = torch.randn(3, problem.num_params, dtype=torch.float64)
    metric = NaturalGradient(problem, mu=0.2)
    batched = metric.solve(thetas, vs)
    for i in range(3):
        assert torch.allclose(batched[i], metric.solve(thetas[i], vs[i]), rtol=1e-12, atol=1e-14)


def test_constant_metrics_against_dense_solve():
    g = torch.Generator().manual_seed(0)
    n = 6
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    spd = a @ a.T + 0.1 * torch.eye(n, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    theta = torch.zeros(n, dtype=torch.float64)
    v = torch.randn(2, n, generator=g, dtype=torch.float64)
    for metric, dense in [(Euclidean(2.5), 2.5 * torch.eye(n, dtype=torch.float64)), (Diagonal(w), torch.diag(w)),
                          (Constant(spd), spd)]:
        assert torch.allclose(metric.matrix(theta), dense)
        assert torch.allclose(metric.solve(theta, v), torch.linalg.solve(dense, v.T).T, rtol=1e-12)
        assert torch.allclose(metric.apply(theta, v), (dense @ v.T).T, rtol=1e-12)


def test_constant_rejects_non_spd_and_diagonal_rejects_non_positive():
    with pytest.raises(ValueError, match="symmetric"):
        Constant([[1.0, 2.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="positive definite; its smallest eigenvalue is -1"):
        Constant([[1.0, 0.0], [0.0, -1.0]])
    with pytest.raises(ValueError, match=r"weights\[1\] = 0"):
        Diagonal([1.0, 0.0])
    with pytest.raises(ValueError, match="mu must be a positive finite number, got -1"):
        NaturalGradient(_problem([2, 2], 2, "mse"), mu=-1)
    with pytest.raises(ValueError, match="unknown output metric 'kl'"):
        NaturalGradient(_problem([2, 2], 2, "mse"), output="kl")
