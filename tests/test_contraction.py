"""Contraction analysis (MATH.md §5): log-norm test vectors, the minimiser identity, Lanczos against dense,
the divergence bound and the composition bound."""

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

import flows
from flows.contraction import JacobianOperator, analyze, compose, divergence, jacobian, lognorm, rate
from flows.metrics import Constant, Euclidean, NaturalGradient
from flows.rules import GradientFlow


def test_lognorm_test_vectors():
    a = torch.tensor([[1.0, 2.0], [3.0, -4.0]], dtype=torch.float64)
    assert lognorm(a, "1") == 4.0 and lognorm(a, "inf") == 3.0
    assert lognorm(a, "2") == pytest.approx(float(np.linalg.eigvalsh([[1.0, 2.5], [2.5, -4.0]])[-1]), abs=1e-14)
    b = torch.tensor([[0.0, 1.0], [-1.0, -2.0]], dtype=torch.float64)
    assert lognorm(b, "1") == 1.0 and lognorm(b, "inf") == 1.0 and lognorm(b, "2") == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="Frobenius norm is not induced"):
        lognorm(a, "fro")


def test_metric_lognorm_is_the_generalised_eigenvalue():
    g = torch.Generator().manual_seed(1)
    j = torch.randn(5, 5, generator=g, dtype=torch.float64)
    r = torch.randn(5, 5, generator=g, dtype=torch.float64)
    m = r @ r.T + 0.5 * torch.eye(5, dtype=torch.float64)
    mj = m @ j
    expected = scipy.linalg.eigh(0.5 * (mj + mj.T).numpy(), m.numpy(), eigvals_only=True)[-1]
    assert lognorm(j, "2", m) == pytest.approx(float(expected), rel=1e-12)


def _logcosh_problem(n=6, seed=0):
    """L(θ) = Σ_i log cosh(a_i·(θ − θ*)) + ½‖θ − θ*‖²: minimiser θ*, Hessian there H = AᵀA + I."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n + 2, n, generator=g, dtype=torch.float64)
    star = torch.randn(n, generator=g, dtype=torch.float64)

    def loss(theta):
        z = (theta - star) @ a.T
        return torch.log(torch.cosh(z)).sum() + 0.5 * ((theta - star) ** 2).sum()

    return flows.data.function_problem(loss, star), a.T @ a + torch.eye(n, dtype=torch.float64), star


def test_rate_at_a_minimiser_is_minus_the_smallest_generalised_eigenvalue():
    problem, hessian, star = _logcosh_problem()
    g = torch.Generator().manual_seed(2)
    r = torch.randn(6, 6, generator=g, dtype=torch.float64)
    m = r @ r.T + torch.eye(6, dtype=torch.float64)
    for metric in (Constant(m), Euclidean(3.0)):
        dense_m = metric.matrix(star)
        expected = -scipy.linalg.eigh(hessian.numpy(), dense_m.numpy(), eigvals_only=True)[0]
        got = rate(GradientFlow(problem, metric), star, metric, method="dense")
        assert got.mu == pytest.approx(expected, abs=1e-8)
        assert got.max_real_eig == pytest.approx(expected, abs=1e-8)  # J = −G⁻¹H is G-self-adjoint here
        lanczos = rate(GradientFlow(problem, metric), star, metric, method="lanczos")
        assert lanczos.mu == pytest.approx(expected, abs=1e-8)


def test_rate_at_the_minimiser_of_a_network_under_its_natural_metric():
    """A state-dependent metric: at a minimiser the dG terms vanish and J = −G⁻¹H still."""
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None]
    model = flows.data.mlp([1, 3, 1], seed=1)
    teacher = flows.Problem(model, "mse", (x, torch.zeros(5, 1, dtype=torch.float64)))
    targets = teacher.outputs(teacher.theta0)  # the network fits these exactly at θ₀: a minimiser
    problem = flows.Problem(model, "mse", (x, targets))
    star = problem.theta0
    metric = NaturalGradient(problem, mu=0.3)
    hessian = torch.autograd.functional.hessian(problem.loss, star)
    expected = -scipy.linalg.eigh(hessian.numpy(), metric.matrix(star).numpy(), eigvals_only=True)[0]
    assert rate(GradientFlow(problem, metric), star, metric, method="dense").mu == pytest.approx(expected, abs=1e-8)


def test_jacobian_operator_matches_dense():
    problem, _, star = _logcosh_problem()
    field = GradientFlow(problem, Constant(torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))))
    theta = star + 0.3
    dense = jacobian(field, theta)
    op = jacobian(field, theta, dense=False)
    assert isinstance(op, JacobianOperator)
    v = torch.randn(6, dtype=torch.float64)
    assert torch.allclose(op.mv(v), dense @ v, rtol=1e-12, atol=1e-14)
    assert torch.allclose(op.rmv(v), dense.T @ v, rtol=1e-12, atol=1e-14)
    assert torch.allclose(op.dense(), dense, rtol=1e-12, atol=1e-14)


def test_lanczos_agrees_with_dense_at_n_2000():
    x, y = flows.data.digits(120)
    problem = flows.Problem(flows.data.mlp([64, 27, 10]), "cross_entropy", (x, y))
    assert 1900 <= problem.num_params <= 2100
    field = GradientFlow(problem)
    theta = problem.theta0
    dense = rate(field, theta, method="dense", eigenvalues=False)
    lanczos = rate(field, theta, method="lanczos", eigenvalues=False)
    assert lanczos.mu == pytest.approx(dense.mu, rel=1e-6)


def test_divergence_never_exceeds_the_certified_bound():
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    m = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    problem = flows.data.quadratic(a, [1.0, -1.0])
    metric = Constant(m)
    field = GradientFlow(problem, metric)
    t = torch.linspace(0, 3, 31, dtype=torch.float64)
    ref = flows.simulate(field, problem.theta0, t, rtol=1e-10, atol=1e-12, progress=False)
    report = analyze(field, ref, metric)
    expected_mu = -scipy.linalg.eigh(a.numpy(), m.numpy(), eigvals_only=True)[0]
    assert torch.allclose(report.mu, torch.full_like(report.mu, expected_mu), atol=1e-10)
    assert report.certified and report.contracting == [(0.0, 3.0, pytest.approx(expected_mu, abs=1e-10))]
    deltas = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    div = divergence(field, problem.theta0, deltas, t, metric, rtol=1e-10, atol=1e-12)
    start = div.distance[0]
    assert torch.allclose(start, torch.sqrt(torch.einsum("ki,ij,kj->k", deltas, m, deltas)))
    assert bool((div.distance <= report.bound[:, None] * start * (1 + 1e-7) + 1e-10).all())
    # the slowest direction saturates the bound: the generalised eigenvector of (A, M) for λ_min
    w, v = scipy.linalg.eigh(a.numpy(), m.numpy())
    slow = divergence(field, problem.theta0, torch.as_tensor(v[:, 0] * 1e-3), t, metric, rtol=1e-10, atol=1e-12)
    assert torch.allclose(slow.distance[:, 0], report.bound * slow.distance[0, 0], rtol=1e-6)


def test_divergence_on_a_nonlinear_contracting_flow():
    problem, _, star = _logcosh_problem(n=4, seed=3)
    field = GradientFlow(problem)
    t = torch.linspace(0, 2, 21, dtype=torch.float64)
    theta0 = star + 1.0
    ref = flows.simulate(field, theta0, t, rtol=1e-10, atol=1e-12, progress=False)
    report = analyze(field, ref)
    assert report.certified  # logcosh + ½‖·‖²: H ⪰ I everywhere, so μ ≤ −1
    assert float(report.mu.max()) <= -1 + 1e-9
    tiny = 1e-6 * torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    div = divergence(field, theta0, tiny, t, rtol=1e-12, atol=1e-16)
    # global bound: μ ≤ −1 everywhere, so ‖δ(t)‖ ≤ e^{−t}‖δ₀‖ for any pair of trajectories
    assert bool((div.distance <= torch.exp(-t)[:, None] * div.distance[0] * (1 + 1e-6)).all())


@given(sizes=st.lists(st.integers(1, 4), min_size=2, max_size=4), seed=st.integers(0, 10_000))
def test_composition_bound_dominates_the_true_lognorm(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    j = torch.randn(n, n, generator=g, dtype=torch.float64)
    edges = np.cumsum([0, *sizes])
    blocks = [(f"b{i}", slice(int(edges[i]), int(edges[i + 1]))) for i in range(len(sizes))]
    metrics = []
    for s in sizes:
        r = torch.randn(s, s, generator=g, dtype=torch.float64)
        metrics.append(r @ r.T + 0.3 * torch.eye(s, dtype=torch.float64))
    result = compose(j, blocks=blocks, metrics=metrics)
    big = torch.block_diag(*metrics)
    assert result.bound >= lognorm(j, "2", big) - 1e-10


def test_composition_verdicts():
    # a cascade: block 2 drives block 1 only downstream (J_12 = 0); both blocks contracting
    j = torch.tensor([[-2.0, 0.0, 0.0], [5.0, -1.0, 0.3], [1.0, -0.3, -1.0]], dtype=torch.float64)
    blocks = [("upstream", slice(0, 1)), ("downstream", slice(1, 3))]
    result = compose(j, blocks=blocks)
    # Γ is lower-triangular with diagonal (−2, μ₂(J₂₂) = −1): Hurwitz as well as a cascade
    assert result.cascade and result.hurwitz
    assert result.gamma[0, 1] == 0.0 and result.gamma[1, 0] == pytest.approx(float(torch.linalg.norm(j[1:, :1])))
    assert result.contracting
    # strong two-way coupling: Γ has a positive eigenvalue, no certificate
    coupled = torch.tensor([[-1.0, 4.0], [4.0, -1.0]], dtype=torch.float64)
    verdict = compose(coupled, blocks=[("a", slice(0, 1)), ("b", slice(1, 2))])
    assert not verdict.cascade and not verdict.hurwitz and not verdict.contracting
    assert verdict.bound == pytest.approx(3.0)


def test_stability_experiment_matches_closed_form_least_squares():
    """Linear least squares from θ₀ = 0: θ(t) = (I − e^{−Ht}) θ*, H = XᵀX/n, θ* = H⁻¹Xᵀy/n, in closed form."""
    from flows.contraction import stability_experiment

    g = torch.Generator().manual_seed(0)
    d = 3
    x = torch.randn(400, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3 * torch.randn(400, 1, generator=g,
                                                                                              dtype=torch.float64)
    model = torch.nn.Linear(d, 1, bias=False, dtype=torch.float64)
    torch.nn.init.zeros_(model.weight)
    sizes = [20, 40, 80, 160]
    t = torch.linspace(0, 4, 9, dtype=torch.float64)
    result = stability_experiment(model, "mse", (x, y), sizes, t, rtol=1e-10, atol=1e-12, progress=False)

    order = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    xs, ys = x[order], y[order]

    def closed_form(xx, yy):
        n = len(xx)
        h = xx.T @ xx / n
        star = torch.linalg.solve(h, xx.T @ yy[:, 0] / n)
        return torch.stack([(torch.eye(d, dtype=torch.float64) - torch.linalg.matrix_exp(-h * s)) @ star for s in t]), h

    for n, sup, ingredients in zip(sizes, result.sup_distance, result.ingredients):
        path, h = closed_form(xs[:n], ys[:n])
        swapped = torch.cat([torch.tensor([n]), torch.arange(1, n)])
        other, _ = closed_form(xs[swapped], ys[swapped])
        assert sup == pytest.approx(float((path - other).norm(dim=-1).max()), rel=1e-6)
        assert ingredients["gradient_lipschitz"] == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-8)
    assert result.exponents["distance"] == pytest.approx(-1.0, abs=0.35)  # one sample of n moves θ by O(1/n)
