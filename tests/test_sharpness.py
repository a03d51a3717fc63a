"""flows.contraction.sharpness (Lanczos on Hessian–vector products) against dense eigen-solves, and its plot."""

import numpy as np
import pytest
import scipy.linalg
import torch
from matplotlib.figure import Figure

import flows
from flows.contraction import sharpness
from flows.discrete import GD
from flows.metrics import Constant, Diagonal, NaturalGradient


def small_problem(seed=0):
    """A 3-6-2 tanh MLP, cross-entropy on 30 random points (N = 38): an indefinite Hessian away from the minimum."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (30,), generator=gen)
    return flows.Problem(flows.data.mlp([3, 6, 2], seed=seed), "cross_entropy", (x, y))


def dense_hessian(problem, theta):
    return torch.func.hessian(problem.loss)(theta).numpy()


def test_lanczos_sharpness_equals_the_dense_hessian_spectrum_along_a_run():
    problem = small_problem()
    lr = 0.5
    traj = flows.iterate(GD(problem), problem.theta0, 30, lr=lr, record_every=10, progress=False)
    result = sharpness(None, traj)  # problem and lr from the trajectory
    assert result.lr == lr and result.threshold == pytest.approx(2 / lr) and result.method == "lanczos"
    assert torch.equal(result.t, traj.t)
    for i, theta in enumerate(traj.theta):
        eig = np.linalg.eigvalsh(dense_hessian(problem, theta))
        scale = np.abs(eig).max()
        assert abs(result.sharpness[i].item() - eig[-1]) < 1e-8 * scale
        assert abs(result.lambda_min[i].item() - eig[0]) < 1e-8 * scale
        jac = np.eye(problem.num_params) - lr * dense_hessian(problem, theta)  # the map's Jacobian I − ηH
        assert result.radius[i].item() == pytest.approx(np.abs(np.linalg.eigvals(jac)).max(), rel=1e-8)


@pytest.mark.parametrize("make_metric", ["constant", "diagonal", "natural"])
def test_the_generalised_problem_matches_the_dense_pencil(make_metric):
    problem = small_problem()
    n = problem.num_params
    gen = torch.Generator().manual_seed(3)
    if make_metric == "constant":
        a = torch.randn(n, n, generator=gen, dtype=torch.float64)
        metric = Constant(a @ a.T / n + 0.3 * torch.eye(n, dtype=torch.float64))
    elif make_metric == "diagonal":
        metric = Diagonal(torch.rand(n, generator=gen, dtype=torch.float64) + 0.2)
    else:
        metric = NaturalGradient(problem, mu=0.1)
    theta = problem.theta0 + 0.05
    lr = 0.3
    result = sharpness(problem, theta, metric=metric, lr=lr)
    G = metric.matrix(theta).numpy()
    eig = scipy.linalg.eigh(dense_hessian(problem, theta), 0.5 * (G + G.T), eigvals_only=True)
    scale = np.abs(eig).max()
    assert abs(result.sharpness.item() - eig[-1]) < 1e-8 * scale
    assert abs(result.lambda_min.item() - eig[0]) < 1e-8 * scale
    # the spectral radius of I − ηG⁻¹H, from its dense eigenvalues
    jac = np.eye(n) - lr * np.linalg.solve(G, dense_hessian(problem, theta))
    assert result.radius.item() == pytest.approx(np.abs(np.linalg.eigvals(jac)).max(), rel=1e-7)
    dense = sharpness(problem, theta, metric=metric, lr=lr, method="dense")
    assert dense.sharpness.item() == pytest.approx(eig[-1], rel=1e-10)


def test_on_a_quadratic_the_sharpness_is_the_top_eigenvalue_and_sets_the_edge():
    H = torch.diag(torch.tensor([0.3, 1.0, 2.5, 5.0], dtype=torch.float64))
    problem = flows.data.quadratic(H, torch.ones(4))
    result = sharpness(problem, problem.theta0)
    assert result.sharpness.item() == pytest.approx(5.0, rel=1e-10)
    assert result.lambda_min is None and result.radius is None and result.threshold is None
    # at η = 2/λ_max the radius is exactly 1 (marginal); above it, above 1
    assert sharpness(problem, problem.theta0, lr=0.4).radius.item() == pytest.approx(1.0, rel=1e-10)
    assert sharpness(problem, problem.theta0, lr=0.41).radius.item() == pytest.approx(1.05, rel=1e-10)


def test_every_skips_states_but_keeps_the_last():
    problem = small_problem()
    traj = flows.iterate(GD(problem), problem.theta0, 7, lr=0.1, progress=False, record=False)
    result = sharpness(problem, traj, every=3, smallest=False)
    assert torch.equal(result.t, traj.t[[0, 3, 6, 7]]) and result.lambda_min is None


def test_the_plot_draws_sharpness_and_threshold():
    problem = small_problem()
    runs = {f"η = {lr}": sharpness(problem, flows.iterate(GD(problem), problem.theta0, 4, lr=lr, progress=False,
                                                          record=False)) for lr in (0.2, 0.5)}
    fig = flows.plot.sharpness(runs, radius=True)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    thresholds = sorted(line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--")
    assert thresholds == pytest.approx([4.0, 10.0])
    assert isinstance(flows.plot.sharpness(runs["η = 0.2"]), Figure)


def test_bad_input_is_named():
    problem = small_problem()
    with pytest.raises(ValueError, match="unknown method 'qr'"):
        sharpness(problem, problem.theta0, method="qr")
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got -1\.0"):
        sharpness(problem, problem.theta0, lr=-1.0)
    with pytest.raises(ValueError, match="every must be a positive integer, got 0"):
        sharpness(problem, problem.theta0, every=0)
    with pytest.raises(ValueError, match="38 parameters"):
        sharpness(problem, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs the problem"):
        sharpness(None, problem.theta0)
    ensemble = flows.iterate(GD(problem), torch.stack([problem.theta0] * 2), 2, lr=0.1, progress=False)
    with pytest.raises(ValueError, match="single trajectory"):
        sharpness(problem, ensemble)
    with pytest.raises(TypeError, match="flows metric"):
        sharpness(problem, problem.theta0, metric=object())


def test_a_loss_linear_in_theta_has_zero_sharpness():
    from torch import nn

    model = nn.Linear(5, 1, bias=False, dtype=torch.float64)
    problem = flows.Problem(model, lambda out, target: out.mean(), (torch.eye(5), torch.zeros(5, 1)))
    result = sharpness(problem, problem.theta0, lr=0.1)
    assert result.sharpness.item() == 0.0 and result.lambda_min.item() == 0.0 and result.radius.item() == 1.0
