"""Every effective rule is natural gradient descent (MATH.md §4): metric recovery, its condition number, rules."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flows
from flows.natural import (
    angle,
    averaged_gradient,
    canonical_metric,
    discrete_metric,
    kappa_min,
    metric_family,
    min_condition_metric,
    recover,
)
from flows.rules import DirectFeedbackAlignment, FeedbackAlignment, GradientFlow, LinearSystem


def _effective_pair(n, seed, psi=None):
    """A random gradient g and an update v with gᵀv < 0 (at angle ψ to −g when given)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    y_hat = -g / g.norm()
    w = torch.randn(n, generator=gen, dtype=torch.float64)
    w = w - (w @ y_hat) * y_hat
    w = w / w.norm()
    psi = psi if psi is not None else float(torch.rand(1, generator=gen)) * 1.4
    v = 0.7 * (math.cos(psi) * y_hat + math.sin(psi) * w)
    return v, g, psi


@pytest.mark.parametrize("n", [3, 1000, 1_000_000])
def test_min_condition_metric_maps_the_update_to_minus_the_gradient(n):
    v, g, psi = _effective_pair(n, seed=n)
    metric = min_condition_metric(v, g)
    assert torch.allclose(metric.apply(None, v), -g, rtol=1e-10, atol=1e-12)
    assert torch.allclose(metric.solve(None, -g), v, rtol=1e-10, atol=1e-12)
    r = float(g.norm() / v.norm())
    closed = sorted([r * (1 + math.sin(psi)) / math.cos(psi), r * (1 - math.sin(psi)) / math.cos(psi)])
    ev = metric.eigenvalues()
    assert float(ev[0]) == pytest.approx(closed[0], rel=1e-10) and float(ev[-1]) == pytest.approx(closed[1], rel=1e-10)
    assert float(ev[0]) > 0  # SPD
    assert float(ev[1]) == pytest.approx(r / math.cos(psi), rel=1e-10)  # the N − 2 fold eigenvalue
    assert metric.condition() == pytest.approx((1 + math.sin(psi)) / (1 - math.sin(psi)), rel=1e-9)
    if n <= 1000:
        dense = metric.matrix()
        assert torch.allclose(torch.linalg.eigvalsh(dense), ev, rtol=1e-9, atol=1e-9)
        assert torch.allclose(dense @ v, -g, rtol=1e-10, atol=1e-12)


def test_kappa_min_values():
    assert kappa_min(math.radians(30)) == pytest.approx(3.0, rel=1e-12)
    assert kappa_min(math.radians(60)) == pytest.approx(13.928, rel=1e-4)
    assert kappa_min(math.radians(80)) == pytest.approx(130.6, rel=1e-3)
    assert kappa_min(0.0) == 1.0
    psi = torch.tensor([0.2, 0.9], dtype=torch.float64)
    assert torch.allclose(kappa_min(psi), torch.tan(math.pi / 4 + psi / 2) ** 2, rtol=1e-12)


@given(n=st.integers(2, 7), seed=st.integers(0, 10_000), lam=st.floats(0.01, 100.0))
def test_no_admissible_metric_beats_the_minimum_condition_number(n, seed, lam):
    v, g, psi = _effective_pair(n, seed)
    best = min_condition_metric(v, g).condition()
    assert best == pytest.approx(float(kappa_min(psi)), rel=1e-8)
    gen = torch.Generator().manual_seed(seed + 1)
    # a random canonical metric: random rows projected orthogonal to v
    rows = torch.randn(n - 1, n, generator=gen, dtype=torch.float64)
    v_hat = v / v.norm()
    rows = rows - (rows @ v_hat)[:, None] * v_hat
    m = canonical_metric(v, g, rows)
    assert torch.allclose(m @ v, -g, rtol=1e-9, atol=1e-11)
    assert float(torch.linalg.cond(m)) >= best * (1 - 1e-8)
    family = metric_family(v, g, lam)
    assert torch.allclose(family.apply(None, v), -g, rtol=1e-9, atol=1e-11)
    assert family.condition() >= best * (1 - 1e-8)


@given(n=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_every_spd_metric_with_mv_equal_y_has_the_canonical_form(n, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    m = a @ a.T + 0.2 * torch.eye(n, dtype=torch.float64)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    y = m @ v  # yᵀv = vᵀMv > 0: v is natural gradient descent in M for the loss gradient −y
    rest = m - torch.outer(y, y) / (y @ v)
    # M − yyᵀ/(yᵀv) = Σ u_i u_iᵀ with u_i ⊥ v: PSD, v in its kernel, rank N − 1
    assert torch.allclose(rest @ v, torch.zeros(n, dtype=torch.float64), atol=1e-10 * float(m.norm()))
    ev = torch.linalg.eigvalsh(0.5 * (rest + rest.T))
    assert float(ev[0]) == pytest.approx(0.0, abs=1e-10 * float(m.norm()))
    assert bool((ev[1:] > 1e-10 * float(m.norm())).all())
    u = (ev[1:].sqrt()[:, None] * torch.linalg.eigh(0.5 * (rest + rest.T)).eigenvectors[:, 1:].T)
    assert torch.allclose(canonical_metric(v, -y, u), m, rtol=1e-9, atol=1e-9)


def test_ascent_direction_raises_not_effective():
    g = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with pytest.raises(flows.NotEffectiveError, match=r"angle to −∇L 135\.00°") as info:
        min_condition_metric(torch.tensor([1.0, 1.0], dtype=torch.float64), g)
    assert info.value.angle == pytest.approx(135.0)
    assert float(angle(torch.tensor([0.0, 1.0], dtype=torch.float64), g)) == pytest.approx(math.pi / 2)


def test_linear_system_recovered_metric_reproduces_the_flow():
    for a in ([[-1.0, 0.0], [0.0, -3.0]], [[-1.0, 5.0], [0.0, -2.0]]):  # normal and non-normal
        system = LinearSystem(a, x0=[1.0, 1.0])
        A = torch.tensor(a, dtype=torch.float64)
        assert torch.allclose(A.T @ system.P + system.P @ A, -torch.eye(2, dtype=torch.float64), atol=1e-12)
        traj = flows.simulate(system, system.problem.theta0, torch.linspace(0, 3, 13, dtype=torch.float64),
                              rtol=1e-10, atol=1e-12, problem=system.problem, progress=False)
        rec = recover(system, system.problem, traj)
        assert float(rec.residual.max()) <= 1e-10
        # yᵀv = xᵀQx with Q = I: the angle follows from the state alone
        x = traj.theta
        cos = (x * x).sum(-1) / ((2 * x @ system.P).norm(dim=-1) * (x @ A.T).norm(dim=-1))
        assert torch.allclose(torch.cos(rec.psi), cos, rtol=1e-10)


def test_discrete_time_identity_is_exact():
    def quartic(theta):
        return (theta**4).sum() / 4 + theta[0] * theta[1] + 0.5 * (theta**2).sum()

    problem = flows.data.function_problem(quartic, [1.0, -0.5, 0.3])
    theta = problem.theta0
    step = -0.1 * problem.grad(theta) + torch.tensor([0.01, -0.02, 0.0], dtype=torch.float64)
    g_bar = averaged_gradient(problem, theta, step)
    assert float(problem.loss(theta + step) - problem.loss(theta)) == pytest.approx(float(g_bar @ step), abs=1e-14)
    metric = discrete_metric(problem, theta, step)
    assert torch.allclose(metric.solve(None, -g_bar), step, rtol=1e-10, atol=1e-14)


def _mlp_problem(sizes, seed=0):
    x, y = flows.data.digits(40)
    return flows.Problem(flows.data.mlp(sizes, seed=seed), "cross_entropy", (x, y))


def test_feedback_alignment_with_the_true_weights_is_backprop():
    problem = _mlp_problem([64, 12, 8, 10])
    params = problem.unflatten(problem.theta0)
    exact = {"2": params["2.weight"], "4": params["4.weight"]}
    fa = FeedbackAlignment(problem, feedback={**exact, "0": params["0.weight"]})
    assert torch.allclose(fa(0.0, problem.theta0), -problem.grad(problem.theta0), rtol=1e-12, atol=1e-15)
    random_fa = FeedbackAlignment(problem, seed=3)
    direction = random_fa(0.0, problem.theta0)
    g = problem.grad(problem.theta0)
    last = problem.blocks[-1].slice  # the output layer sees the true error: identical to backprop there
    assert torch.allclose(direction[last], -g[last], rtol=1e-12, atol=1e-15)
    assert not torch.allclose(direction, -g)


def test_direct_feedback_alignment_with_one_hidden_layer_and_d_equal_w_is_backprop():
    problem = _mlp_problem([64, 12, 10])
    params = problem.unflatten(problem.theta0)
    dfa = DirectFeedbackAlignment(problem, feedback={"0": params["2.weight"]})
    assert torch.allclose(dfa(0.0, problem.theta0), -problem.grad(problem.theta0), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"feedback for '0' must have shape \(10, 12\)"):
        DirectFeedbackAlignment(problem, feedback={"0": torch.zeros(3, 3)})


def test_windowed_loss_makes_a_transiently_growing_rule_effective():
    """ẋ = Ax with non-normal A raises ‖x‖² at first but lowers it over a window: natural gradient on L_T."""
    import scipy.integrate
    import scipy.linalg

    from flows.natural import windowed_loss

    a = torch.tensor([[-1.0, 10.0], [0.0, -2.0]], dtype=torch.float64)
    problem = flows.data.function_problem(lambda x: (x * x).sum(), [1.0, 1.0])

    def field(t, x):
        return x @ a.T

    T = 3.0
    # closed form: L_T(x) = xᵀWx, W = (1/T)∫₀ᵀ e^{Aᵀs}e^{As} ds (adaptive quadrature, independent of RK4)
    an = a.numpy()
    w = scipy.integrate.quad_vec(lambda s: scipy.linalg.expm(an.T * s) @ scipy.linalg.expm(an * s), 0, T,
                                 epsabs=1e-13, epsrel=1e-13)[0] / T
    x = problem.theta0
    exact = float(x @ torch.as_tensor(w) @ x)
    # RK4 + Simpson are both 4th order: the error falls 16× per halving of h
    coarse, fine = (abs(float(windowed_loss(field, problem, T, steps=s)(x)) - exact) for s in (128, 256))
    assert fine <= 1e-8 * exact and coarse / fine == pytest.approx(16, rel=0.25)
    traj = flows.simulate(field, x, torch.linspace(0, 2, 5, dtype=torch.float64), problem=problem, rtol=1e-10,
                          atol=1e-12, progress=False)
    with pytest.raises(flows.NotEffectiveError) as info:
        recover(field, problem, traj)
    assert info.value.t == 0.0 and info.value.angle > 90
    loose = recover(field, problem, traj, strict=False)
    assert float(loose.psi[0]) > torch.pi / 2 and torch.isnan(loose.kappa[0]) and torch.isnan(loose.residual[0])
    rec = recover(field, problem, traj, window=T, steps=64)
    assert bool((rec.psi < torch.pi / 2).all()) and float(rec.residual.max()) <= 1e-10


def test_mean_of_minibatch_rules_is_the_full_batch_rule():
    from flows.natural import MeanField

    x, y = flows.data.digits(60)
    model = flows.data.mlp([64, 5, 10])
    full = flows.Problem(model, "cross_entropy", (x, y))
    batches = [flows.Problem(model, "cross_entropy", (x[i::3], y[i::3])) for i in range(3)]
    drift = MeanField([GradientFlow(b) for b in batches], problem=full)
    assert torch.allclose(drift(0.0, full.theta0), GradientFlow(full)(0.0, full.theta0), rtol=1e-12, atol=1e-15)


def test_time_dependent_loss_recovery():
    d = torch.tensor([1.0, 4.0], dtype=torch.float64)

    def target(t):
        return torch.stack([torch.sin(t), torch.cos(t)]).to(torch.float64)

    def field(t, theta):  # a preconditioned tracker of the moving minimum of ½‖θ − c(t)‖²
        return -d * (theta - target(torch.as_tensor(t)))

    problem = flows.data.function_problem(lambda th: 0.5 * (th * th).sum(), [2.0, -1.0])
    traj = flows.simulate(field, problem.theta0, torch.linspace(0, 2, 9, dtype=torch.float64), problem=problem,
                          rtol=1e-10, atol=1e-12, progress=False)
    rec = recover(field, problem, traj, grad=lambda t, th: th - target(torch.as_tensor(t)))
    e = traj.theta - torch.stack([target(t) for t in traj.t])
    expected = torch.arccos((d * e * e).sum(-1) / ((d * e).norm(dim=-1) * e.norm(dim=-1)))
    assert torch.allclose(rec.psi, expected, atol=1e-7) and float(rec.residual.max()) <= 1e-12
