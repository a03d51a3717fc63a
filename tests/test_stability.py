"""Stability along runs: contraction in the moving metric, finite-time Lyapunov exponents, certificates (issue 14)."""

import math

import pytest
import torch

import flows
from flows.contraction import analyze, divergence, lyapunov, rate, report
from flows.metrics import Metric
from tests.conftest import squared_diagonal_metric, tanh_mlp


class ExpDiagonal(Metric):
    """M(x) = diag(e^{x}): a metric that moves with the state, with a hand-derivable generalised Jacobian."""

    def solve(self, theta, v):
        return v * torch.exp(-theta)

    def apply(self, theta, v):
        return v * torch.exp(theta)

    def matrix(self, theta):
        return torch.diag(torch.exp(theta))


def _separable(centres):
    """ẋ = −M(x)⁻¹∇L for L = Σ log cosh(x_i − c_i) and M = diag(e^{x})."""
    def field(t, x):
        return -torch.exp(-x) * torch.tanh(x - centres)

    return field


def _closed_form(x, centres, moving):
    # ℓ' = tanh(x − c), ℓ'' = 1 − tanh²; J_ii = e^{−x}(ℓ' − ℓ''), Ṁ_ii = e^{x} f_i = −ℓ'
    # moving: μ = max e^{−x}(½ℓ' − ℓ''); frozen: μ = max e^{−x}(ℓ' − ℓ'')
    d1 = torch.tanh(x - centres)
    d2 = 1 - d1**2
    return float((torch.exp(-x) * ((0.5 if moving else 1.0) * d1 - d2)).max())


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_moving_rate_matches_the_hand_derived_generalised_jacobian(method):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, generator=gen, dtype=torch.float64) * 2
    centres = torch.randn(6, generator=gen, dtype=torch.float64)
    field, metric = _separable(centres), ExpDiagonal()
    moving = rate(field, x, metric, method=method, eigenvalues=False)  # moving is the default for this metric
    frozen = rate(field, x, metric, method=method, eigenvalues=False, moving=False)
    assert moving.mu == pytest.approx(_closed_form(x, centres, True), abs=1e-10)
    assert frozen.mu == pytest.approx(_closed_form(x, centres, False), abs=1e-10)
    assert abs(moving.mu - frozen.mu) > 1e-3  # the Ġ term matters away from equilibrium


def test_moving_and_frozen_rates_agree_at_an_equilibrium():
    centres = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    field, metric = _separable(centres), ExpDiagonal()
    moving = rate(field, centres.clone(), metric, method="dense", eigenvalues=False, moving=True)
    frozen = rate(field, centres.clone(), metric, method="dense", eigenvalues=False, moving=False)
    assert moving.mu == pytest.approx(frozen.mu, abs=1e-14)
    assert moving.mu == pytest.approx(_closed_form(centres, centres, True), abs=1e-12)



def test_matrix_free_and_dense_moving_rates_agree_at_two_thousand_parameters():
    x, y = flows.data.digits(20)
    problem = flows.Problem(tanh_mlp([64, 30, 2]), "cross_entropy", (x, y % 2))
    assert 2000 <= problem.num_params <= 2100
    field = flows.rules.GradientFlow(problem, squared_diagonal_metric())
    dense = rate(field, problem.theta0, field.metric, method="dense", eigenvalues=False)
    lanczos = rate(field, problem.theta0, field.metric, method="lanczos", eigenvalues=False, tol=1e-12)
    assert lanczos.mu == pytest.approx(dense.mu, rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("a, exact", [
    (torch.diag(torch.tensor([-0.5, -1.0, -2.0])), [-0.5, -1.0, -2.0]),          # normal
    (torch.tensor([[-1.0, 8.0, 0.0], [0.0, -2.0, 5.0], [0.0, 0.0, -3.0]]), [-1.0, -2.0, -3.0]),  # non-normal
])
def test_qr_exponents_of_a_linear_system_converge_to_the_real_parts_of_its_eigenvalues(a, exact):
    a = a.to(torch.float64)

    def field(t, x):
        return a @ x

    theta0 = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    errors = []
    for horizon in (5.0, 40.0):
        # against rtol 1e-10 the errors (at T = 40: 0.0101 normal, 0.0589 non-normal) move by < 2e-7; 1/4–1/3 the time
        result = lyapunov(field, theta0, torch.linspace(0, horizon, int(horizon) + 1), k=3, rtol=1e-7,
                          atol=1e-9, progress=False)
        errors.append(float((result.exponents - torch.tensor(exact, dtype=torch.float64)).abs().max()))
    # finite-time exponents carry an O(1/T) transient (larger for the non-normal A); it shrinks with T
    assert errors[1] < errors[0] and errors[1] < 0.1
    assert errors[1] * 40.0 < 4.0  # i.e. O(1/T) with a constant of a few units


def test_top_exponent_of_a_quadratic_gradient_flow_is_minus_the_smallest_curvature():
    h = torch.diag(torch.tensor([1.0, 3.0, 0.4], dtype=torch.float64))
    problem = flows.data.quadratic(h, torch.tensor([1.0, 1.0, 1.0]))
    field = flows.rules.GradientFlow(problem)
    result = lyapunov(field, problem.theta0, torch.linspace(0, 20, 21), k=1, rtol=1e-6, atol=1e-9, progress=False)
    # the flow is linear, θ(t) = e^{−Ht}θ₀, so the exponent is exact up to the start-up of the random tangent
    assert float(result.exponents[0]) == pytest.approx(-0.4, abs=0.05)
    long = lyapunov(field, problem.theta0, torch.linspace(0, 80, 81), k=1, rtol=1e-6, atol=1e-9, progress=False)
    assert abs(float(long.exponents[0]) + 0.4) < abs(float(result.exponents[0]) + 0.4) + 1e-12


def test_the_certificate_bounds_the_separation_of_perturbed_copies_along_a_layerwise_flow():
    x, y = flows.data.digits(20)
    problem = flows.Problem(tanh_mlp([64, 3, 10]), "cross_entropy", (x, y))
    metric = flows.metrics.Layerwise(problem, mu=0.5)
    field = flows.rules.GradientFlow(problem, metric)
    t = torch.linspace(0, 1.0, 6, dtype=torch.float64)
    traj = flows.simulate(field, problem.theta0, t, rtol=1e-9, atol=1e-11, progress=False)
    result = analyze(None, traj, metric, eigenvalues=False, frozen=False)  # the field comes from the trajectory
    assert "moving" in result.metric
    gen = torch.Generator().manual_seed(1)
    delta = 1e-6 * torch.randn(3, problem.num_params, generator=gen, dtype=torch.float64)
    div = divergence(field, problem.theta0, delta, t, metric, rtol=1e-10, atol=1e-13)
    start = div.distance[0]
    ratio = div.distance / start  # ‖δθ(t)‖_G(θ(t)) / ‖δθ(0)‖_G(θ(0))
    # first order in δ (1e-6) and the trapezoid rule on a grid of 5 intervals: allow 1e-3 relative
    assert bool((ratio <= result.bound[:, None] * (1 + 1e-3)).all())


def test_report_row_and_bad_inputs():
    problem = flows.data.quadratic(torch.diag(torch.tensor([1.0, 2.0])), torch.tensor([1.0, -1.0]))
    field = flows.rules.GradientFlow(problem)
    traj = flows.simulate(field, problem.theta0, torch.linspace(0, 30, 31), progress=False)
    result = report(None, traj, k=2, rtol=1e-8, atol=1e-10)
    assert result.row["max_mu"] == pytest.approx(-1.0, abs=1e-10)  # J = −H: μ₂ = −λ_min(H)
    assert result.row["fraction_contracting"] == 1.0
    assert result.row["integral_mu"] == pytest.approx(-30.0, abs=1e-8)
    assert result.row["lyapunov"] == pytest.approx([-1.0, -2.0], abs=0.1)  # O(1/T) start-up at T = 30
    with pytest.raises(ValueError, match="k must be an integer between 1 and N = 2"):
        lyapunov(field, problem.theta0, torch.linspace(0, 1, 3), k=3)
    loaded = flows.Trajectory(traj.t, traj.theta)
    with pytest.raises(ValueError, match="needs the vector field"):
        analyze(None, loaded)
    with pytest.raises(TypeError, match="must be a flows metric"):
        rate(field, problem.theta0, metric=torch.eye(2))
    assert math.isfinite(result.row["max_real_eig"])


def test_tangents_of_a_euclidean_gradient_flow_by_reverse_mode_equal_forward_mode():
    """J = −∇²L is symmetric, so lyapunov takes JV by reverse mode; a field that does not declare the symmetry goes
    through forward mode. Both must give the same exponents (dense reference: the Hessian from torch.func)."""
    x, y = flows.data.digits(30)
    problem = flows.Problem(tanh_mlp([64, 4, 10]), "cross_entropy", (x, y))
    field = flows.rules.GradientFlow(problem)
    assert field.symmetric_jacobian

    def undeclared(t, theta):  # the same field, without the attribute
        return field(t, theta)

    undeclared.problem = problem
    t = torch.linspace(0, 2.0, 5, dtype=torch.float64)
    fast = lyapunov(field, problem.theta0, t, k=3, rtol=1e-9, atol=1e-11, progress=False)
    slow = lyapunov(undeclared, problem.theta0, t, k=3, rtol=1e-9, atol=1e-11, progress=False)
    torch.testing.assert_close(fast.exponents, slow.exponents, rtol=1e-7, atol=1e-9)
    # and one tangent product against the dense Hessian
    from flows.contraction import _TangentField  # noqa: PLC2701 (the test inspects the augmented field)

    v = torch.randn(problem.num_params, 2, dtype=torch.float64)
    state = torch.cat([problem.theta0, v.reshape(-1)])
    out = _TangentField(field, problem.num_params, 2)(0.0, state)
    hessian = torch.func.hessian(problem.loss)(problem.theta0)
    torch.testing.assert_close(out[problem.num_params:].reshape(-1, 2), -hessian @ v, rtol=1e-9, atol=1e-11)


def test_lyapunov_through_jacobian_products_equals_the_vmapped_reverse_mode_path():
    """GradientFlow gives (f, JV) itself (autograd, one batched double-backward pass); a field that only declares
    J symmetric takes JV by a torch.func vjp vmapped over the tangents. The two compute the same products, so the
    runs agree to rounding; one augmented evaluation is checked against the dense Hessian too."""
    from flows.contraction import _TangentField  # noqa: PLC2701 (the test inspects the augmented field)

    x, y = flows.data.digits(40)
    problem = flows.Problem(tanh_mlp([64, 5, 10]), "cross_entropy", (x, y))
    field = flows.rules.GradientFlow(problem)

    class Declared:  # the same field: J symmetric declared, no jacobian_products
        symmetric_jacobian = True

        def __init__(self):
            self.problem = problem

        def __call__(self, t, theta):
            return field(t, theta)

    t = torch.linspace(0, 3.0, 7, dtype=torch.float64)
    options = {"step_size": 0.05}
    fast = lyapunov(field, problem.theta0, t, k=4, method="rk4", options=options, progress=False)
    slow = lyapunov(Declared(), problem.theta0, t, k=4, method="rk4", options=options, progress=False)
    torch.testing.assert_close(fast.running[1:], slow.running[1:], rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(fast.trajectory.theta, slow.trajectory.theta, rtol=1e-12, atol=1e-14)
    augmented = _TangentField(field, problem.num_params, 4)
    assert augmented.products is not None and _TangentField(Declared(), problem.num_params, 4).products is None
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(problem.num_params, 4, generator=gen, dtype=torch.float64)
    theta = fast.trajectory.theta[-1]
    out = augmented(torch.tensor(0.0, dtype=torch.float64), torch.cat([theta, v.reshape(-1)]))
    hessian = torch.func.hessian(problem.loss)(theta)
    torch.testing.assert_close(out[:problem.num_params], -torch.func.jacrev(problem.loss)(theta), rtol=1e-12,
                               atol=1e-15)
    torch.testing.assert_close(out[problem.num_params:].reshape(-1, 4), -hessian @ v, rtol=1e-10, atol=1e-13)


def test_layerwise_metric_derivative_equals_forward_mode_through_its_dense_matrix():
    """Ġv from the factors and their forward-mode derivative (taken once) against d/dε G(θ + εf)v of the dense
    block-diagonal matrix; and the matrix-free moving rate, which uses it, against the dense moving rate."""
    x, y = flows.data.digits(12)
    problem = flows.Problem(tanh_mlp([64, 6, 5, 10]), "cross_entropy", (x, y))
    metric = flows.metrics.Layerwise(problem, mu=0.05)
    field = flows.rules.GradientFlow(problem, metric)
    theta = problem.theta0
    f = field(0.0, theta).detach()
    g_dot = torch.func.jvp(metric.matrix, (theta,), (f,))[1]
    gen = torch.Generator().manual_seed(4)
    product = metric.derivative_operator(theta, f)
    for _ in range(3):
        v = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
        torch.testing.assert_close(product(v), g_dot @ v, rtol=1e-10, atol=1e-12 * float(g_dot.abs().max()))
    dense = rate(field, theta, metric, method="dense", eigenvalues=False)
    lanczos = rate(field, theta, metric, method="lanczos", eigenvalues=False, tol=1e-12)
    assert lanczos.mu == pytest.approx(dense.mu, rel=1e-8, abs=1e-10)
