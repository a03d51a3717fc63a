"""The action principle (MATH.md §3): analytic flows, the energy-dissipation identity, least-action paths."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flows
from flows.action import action, compare, discrete_terms, least_action_path, markdown, time_to_reach
from flows.metrics import Constant, Euclidean
from flows.rules import GradientFlow

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
M = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
M_OTHER = torch.tensor([[1.0, -0.3], [-0.3, 0.5]], dtype=torch.float64)
THETA0 = torch.tensor([1.0, -1.0], dtype=torch.float64)
TIGHT = {"rtol": 1e-11, "atol": 1e-13, "progress": False}


def analytic_gap(a, m_rule, m_ref, theta0, T):
    """∫₀ᵀ ½‖θ̇ + M⁻¹Aθ‖²_M dt for θ = exp(−Bt)θ₀, B = M'⁻¹A: with w = (M⁻¹ − M'⁻¹)Aθ the integrand is
    ½θᵀQθ, Q = A(M⁻¹ − M'⁻¹)M(M⁻¹ − M'⁻¹)A, and X = ∫e^{−Bᵀt}Qe^{−Bt}dt solves BᵀX + XB = Q − e^{−BᵀT}Qe^{−BT}."""
    b = torch.linalg.solve(m_rule, a)
    diff = torch.linalg.inv(m_ref) - torch.linalg.inv(m_rule)
    q = a @ diff @ m_ref @ diff @ a
    decay = torch.linalg.matrix_exp(-b * T)
    rhs = q - decay.T @ q @ decay
    n = a.shape[0]
    eye = torch.eye(n, dtype=a.dtype)
    # vec(BᵀX + XB) = (I ⊗ Bᵀ + Bᵀ ⊗ I) vec(X) (column-major vec)
    lhs = torch.kron(eye, b.T) + torch.kron(b.T, eye)
    x = torch.linalg.solve(lhs, rhs.T.reshape(-1)).reshape(n, n).T
    return float(0.5 * theta0 @ x @ theta0)


def test_gradient_flow_attains_the_lower_bound():
    problem = flows.data.quadratic(A, THETA0)
    t = torch.linspace(0, 3, 13, dtype=torch.float64)
    for metric in (Constant(M), Euclidean(2.0)):
        traj = flows.simulate(GradientFlow(problem, metric), THETA0, t, action=metric, **TIGHT)
        report = action(traj)
        drop = report.loss_drop
        assert report.method == "solve"
        assert torch.allclose(report.total[1:], drop[1:], rtol=1e-6)  # S(t) = L(0) − L(t) all along
        assert float(report.gap[-1]) <= 1e-12 * float(drop[-1])
        # kinetic and potential halves are equal on a gradient flow: θ̇ = −G⁻¹∇L
        assert torch.allclose(report.kinetic, report.potential, rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_gap_under_a_mismatched_metric_equals_its_integral(T):
    problem = flows.data.quadratic(A, THETA0)
    field = GradientFlow(problem, Constant(M_OTHER))
    t = torch.linspace(0, T, 9, dtype=torch.float64)
    expected = analytic_gap(A, M_OTHER, M, THETA0, T)
    solved = action(flows.simulate(field, THETA0, t, action=Constant(M), **TIGHT))
    assert float(solved.gap[-1]) == pytest.approx(expected, rel=1e-6)
    assert float(solved.total[-1] - solved.loss_drop[-1]) == pytest.approx(expected, rel=1e-6)
    # quadrature over Hermite dense output of an ordinary trajectory: 4th-order accurate in the output step h,
    # error ≈ (h·λ_max)⁴ relative with λ_max ≈ 8.6 here; h = T/160 keeps it below 1e-6
    plain = flows.simulate(field, THETA0, torch.linspace(0, T, 161, dtype=torch.float64), **TIGHT)
    assert float(action(plain, Constant(M), field=field).gap[-1]) == pytest.approx(expected, rel=1e-6)


def _poly_problem(coeffs):
    c = torch.as_tensor(coeffs, dtype=torch.float64)

    def poly(theta):  # a quartic in 2-D: non-convex for some coefficients
        x, y = theta[0], theta[1]
        return c[0] * x**4 + c[1] * y**4 + c[2] * x**2 * y + c[3] * x * y + c[4] * x**2 + c[5] * y

    return flows.data.function_problem(poly, [0.0, 0.0])


@given(coeffs=st.lists(st.floats(-2, 2), min_size=6, max_size=6), nodes=st.integers(2, 12),
       seed=st.integers(0, 10_000))
def test_discrete_gap_is_nonnegative_and_closes_the_energy_balance(coeffs, nodes, seed):
    problem = _poly_problem(coeffs)
    g = torch.Generator().manual_seed(seed)
    path = torch.randn(nodes + 1, 2, generator=g, dtype=torch.float64)
    times = torch.cumsum(torch.rand(nodes + 1, generator=g, dtype=torch.float64) + 0.05, 0)
    a = torch.randn(2, 2, generator=g, dtype=torch.float64)
    metric = Constant(a @ a.T + 0.1 * torch.eye(2, dtype=torch.float64))
    terms = discrete_terms(path, times, problem, metric, nodes=3)  # 3-point Gauss–Legendre: exact for a quartic
    assert bool((terms[:, 2] >= 0).all())
    drop = problem.loss(path[0]) - problem.loss(path[-1])
    s = terms[:, 0].sum() + terms[:, 1].sum()
    scale = float(s.abs() + terms[:, 2].sum().abs() + drop.abs())
    assert float(s - terms[:, 2].sum() - drop) == pytest.approx(0.0, abs=1e-11 * scale)


def test_least_action_path_recovers_the_gradient_flow_on_an_anisotropic_quadratic():
    a = torch.tensor([[1.0, 0.0], [0.0, 8.0]], dtype=torch.float64)
    problem = flows.data.quadratic(a, [1.5, 1.0])
    T = 1.0
    start = problem.theta0
    end = torch.linalg.matrix_exp(-a * T) @ start
    result = least_action_path(problem, Euclidean(), start, end, T, nodes=64)
    exact = torch.stack([torch.linalg.matrix_exp(-a * float(s)) @ start for s in result.t])
    assert float((result.theta - exact).abs().max()) <= 1e-3
    assert result.action == pytest.approx(result.loss_drop, rel=1e-4)
    assert result.el_residual <= 1e-4  # L-BFGS stops on relative change; the straight line has O(1)
    straight = start + (result.t / T)[:, None] * (end - start)
    straight_action = discrete_terms(straight, result.t, problem, Euclidean(), nodes=1)[:, :2].sum()
    assert result.action < float(straight_action)


def test_least_action_path_on_a_non_convex_loss():
    def tilted_double_well(theta):
        x, y = theta[0], theta[1]
        return 0.25 * (x**2 - 1) ** 2 + 0.5 * (y - 0.5 * x) ** 2 + 0.1 * x

    problem = flows.data.function_problem(tilted_double_well, [0.3, 1.2])
    T = 1.5
    field = GradientFlow(problem, Euclidean())
    flow = flows.simulate(field, problem.theta0, torch.linspace(0, T, 65, dtype=torch.float64), **TIGHT)
    result = least_action_path(problem, Euclidean(), flow.theta[0], flow.theta[-1], T, nodes=64)
    assert torch.allclose(result.t / T, flow.t / T)
    assert float((result.theta - flow.theta).abs().max()) <= 1e-3
    assert result.gap <= 1e-4 * result.loss_drop


def test_digits_mlp_action_matches_its_loss_drop():
    x, y = flows.data.digits(200)
    problem = flows.Problem(flows.data.mlp([64, 8, 10]), "cross_entropy", (x, y))
    metric = Euclidean()
    traj = flows.simulate(GradientFlow(problem, metric), problem.theta0, torch.linspace(0, 5, 11, dtype=torch.float64),
                          rtol=1e-9, atol=1e-11, action=metric, progress=False)
    report = action(traj)
    assert float(report.total[-1]) == pytest.approx(float(report.loss_drop[-1]), rel=1e-5)


def test_compare_rows_and_markdown():
    problem = flows.data.quadratic(A, THETA0)
    t = torch.linspace(0, 2, 21, dtype=torch.float64)
    runs = {label: flows.simulate(GradientFlow(problem, m), THETA0, t, action=Euclidean(), **TIGHT)
            for label, m in (("euclidean", Euclidean()), ("other metric", Constant(M_OTHER)))}
    rows = compare(runs, level=0.1)
    assert [r["rule"] for r in rows] == ["euclidean", "other metric"]
    assert rows[0]["gap"] <= 1e-10 and rows[1]["gap"] > 1e-3
    assert rows[1]["gap"] == pytest.approx(analytic_gap(A, M_OTHER, torch.eye(2, dtype=torch.float64), THETA0, 2.0),
                                           rel=1e-6)
    for r, traj in zip(rows, runs.values()):
        assert r["action"] == pytest.approx(r["gap"] + r["loss_drop"], rel=1e-6)
        # the level is first reached between two outputs that bracket it
        i = int((traj.loss <= 0.1).nonzero()[0])
        assert float(traj.t[i - 1]) < r["time_to_level"] <= float(traj.t[i])
    table = markdown(rows, level=0.1)
    assert table.splitlines()[0].startswith("| rule | action S") and "other metric" in table
    assert time_to_reach(runs["euclidean"], 1e-30) is None


def test_action_round_trips_and_batches(tmp_path):
    problem = flows.data.quadratic(A, THETA0)
    starts = torch.stack([THETA0, 2 * THETA0])
    traj = flows.simulate(GradientFlow(problem, Constant(M)), starts, torch.linspace(0, 1, 5, dtype=torch.float64),
                          action=Constant(M), **TIGHT)
    assert traj.action.shape == (5, 2, 4) and traj.theta.shape == (5, 2, 2)
    # the action is quadratic in θ₀ for a linear flow: doubling θ₀ multiplies it by 4
    assert float(traj.action[-1, 1, 0]) == pytest.approx(4 * float(traj.action[-1, 0, 0]), rel=1e-8)
    back = flows.Trajectory.load(traj.save(tmp_path / "a.npz"))
    assert torch.equal(back.action, traj.action) and back.metadata["action_metric"]["name"] == "Constant"
    with pytest.raises(ValueError, match="needs the problem"):
        flows.simulate(lambda t, th: -th, THETA0, torch.linspace(0, 1, 3), action=Euclidean(), progress=False)
