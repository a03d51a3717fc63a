"""simulate: analytic flows, solver bookkeeping, events, ensembles, divergence and bad input (MATH.md §1)."""

import math
import warnings

import numpy as np
import pytest
import torch

import flows
from flows.metrics import Constant, Euclidean
from flows.rules import GradientFlow
from flows.simulate import FIXED_GRID_METHODS, methods

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
M = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
THETA0 = torch.tensor([1.0, -1.0], dtype=torch.float64)


def exact_flow(t, theta0=THETA0, a=A, m=M):
    """θ(t) = exp(−M⁻¹A t) θ₀, the closed form of the M-gradient flow of ½θᵀAθ."""
    rate = torch.linalg.solve(m, a)
    return torch.stack([torch.linalg.matrix_exp(-rate * float(s)) @ theta0.to(rate) for s in t])


def quadratic_flow(dtype=torch.float64):
    problem = flows.data.quadratic(A, THETA0, dtype=dtype)
    return problem, GradientFlow(problem, Constant(M))


ADAPTIVE = {  # method: (rtol, atol, error bound). Bound ≈ 100 × rtol (global error accumulates step errors).
    "dopri5": (1e-10, 1e-12, 1e-8),
    "dopri8": (1e-10, 1e-12, 1e-6),  # dopri8's embedded estimate is conservative-looking but loose here
    "bosh3": (1e-7, 1e-9, 1e-4),  # between steps bosh3 reports a low-order interpolant, not a step
    "fehlberg2": (1e-5, 1e-7, 1e-3),
    "adaptive_heun": (1e-5, 1e-7, 1e-3),
    "scipy_solver": (1e-10, 1e-12, 1e-8),
}
ORDERS = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4, "explicit_adams": 3, "implicit_adams": 4,
          "fixed_adams": 4}


def test_every_installed_method_is_covered():
    assert set(methods()) == set(ADAPTIVE) | set(ORDERS)
    assert set(FIXED_GRID_METHODS) == set(ORDERS)


@pytest.mark.parametrize("method", sorted(ADAPTIVE))
def test_adaptive_methods_follow_the_matrix_exponential(method):
    _, field = quadratic_flow()
    rtol, atol, bound = ADAPTIVE[method]
    t = torch.linspace(0, 1.5, 7, dtype=torch.float64)
    traj = flows.simulate(field, THETA0, t, method=method, rtol=rtol, atol=atol, progress=False)
    assert (traj.theta - exact_flow(t)).abs().max() <= bound
    assert traj.stats["nfe"] > 0


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_fixed_grid_methods_converge_at_their_order(method):
    """Global error at t = 1 against the closed form shrinks by 2^p when the step halves."""
    _, field = quadratic_flow()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    options = {"max_order": 4} if "adams" in method else {}  # torchdiffeq's default order 12 is unstable
    errors = []
    for h in (0.05, 0.025):
        traj = flows.simulate(field, THETA0, t, method=method, options={**options, "step_size": h}, progress=False)
        errors.append(float((traj.theta[-1] - exact_flow([1.0])[0]).norm()))
        assert traj.stats["steps"] == round(1.0 / h)  # one callback per grid step
    observed = math.log2(errors[0] / errors[1])
    assert observed == pytest.approx(ORDERS[method], abs=0.35)


def test_float32_flow_at_looser_tolerance():
    problem, field = quadratic_flow(dtype=torch.float32)
    t = torch.linspace(0, 1.5, 4)
    traj = flows.simulate(field, THETA0.float(), t, progress=False)  # defaults (1e-5, 1e-7) for float32
    assert traj.theta.dtype == torch.float32
    assert (traj.theta.double() - exact_flow(t)).abs().max() <= 1e-4


def test_loss_and_gradient_are_recorded_and_loss_decreases():
    problem, field = quadratic_flow()
    t = torch.linspace(0, 2, 9, dtype=torch.float64)
    traj = flows.simulate(field, THETA0, t, rtol=1e-10, atol=1e-12, progress=False)
    exact = exact_flow(t)
    assert torch.allclose(traj.loss, 0.5 * torch.einsum("ti,ij,tj->t", exact, A, exact), rtol=1e-8)
    assert torch.allclose(traj.grad_norm, (exact @ A).norm(dim=-1), rtol=1e-8)
    assert bool((traj.loss[1:] < traj.loss[:-1]).all())  # dL/dt = −‖∇L‖²_{G⁻¹} < 0


def test_stats_count_every_field_evaluation():
    _, field = quadratic_flow()
    calls = []

    def counting(t, theta):
        calls.append(float(t))
        return field(t, theta)

    traj = flows.simulate(counting, THETA0, torch.linspace(0, 1, 3, dtype=torch.float64), progress=False)
    assert traj.stats["nfe"] == len(calls)
    assert traj.stats["accepted"] + traj.stats["rejected"] == traj.stats["steps"]
    rk4 = flows.simulate(field, THETA0, torch.linspace(0, 1, 11, dtype=torch.float64), method="rk4",
                         options={"step_size": 0.1}, progress=False)
    assert rk4.stats["nfe"] == 4 * 10 and rk4.stats["accepted"] == 10
    assert rk4.stats["nfe_at_output"] == [4 * k for k in range(11)]  # four stages per step, counted as passed


def test_ensemble_equals_member_by_member_solves():
    problem, field = quadratic_flow()
    starts = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-3.0, 0.1]], dtype=torch.float64)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    fixed = flows.simulate(field, starts, t, method="rk4", options={"step_size": 0.05}, progress=False)
    assert fixed.theta.shape == (5, 3, 2) and fixed.loss.shape == (5, 3)
    adaptive = flows.simulate(field, starts, t, rtol=1e-10, atol=1e-12, progress=False)
    for i in range(3):
        single = flows.simulate(field, starts[i], t, method="rk4", options={"step_size": 0.05}, progress=False)
        assert torch.allclose(fixed.theta[:, i], single.theta, rtol=1e-13, atol=1e-15)
        assert torch.allclose(fixed.member(i).loss, single.loss, rtol=1e-13)
        # adaptive members share one step size, so they agree to the solver tolerance, not bit for bit
        assert (adaptive.theta[:, i] - exact_flow(t, starts[i])).abs().max() <= 1e-8


def test_loss_below_event_stops_at_the_analytic_time():
    problem, field = quadratic_flow()
    level = 0.05
    t = torch.linspace(0, 10, 21, dtype=torch.float64)
    traj = flows.simulate(field, THETA0, t, rtol=1e-10, atol=1e-12, event=flows.events.loss_below(level),
                          progress=False)
    # independent: bisection on the closed-form loss
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        th = exact_flow([mid])[0]
        lo, hi = (mid, hi) if 0.5 * th @ A @ th > level else (lo, mid)
    assert traj.stats["stopped_by_event"]
    assert float(traj.t[-1]) == pytest.approx(hi, abs=1e-6)
    assert float(traj.loss[-1]) == pytest.approx(level, rel=1e-6)
    n_before = int((t < hi).sum())
    assert torch.equal(traj.t[:n_before], t[:n_before])
    assert (traj.theta[:n_before] - exact_flow(t[:n_before])).abs().max() <= 1e-8


def test_event_that_never_fires_runs_to_the_end_with_fixed_grid():
    _, field = quadratic_flow()
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    traj = flows.simulate(field, THETA0, t, method="rk4", options={"step_size": 0.25},
                          event=flows.events.loss_below(-1.0), progress=False)
    assert not traj.stats["stopped_by_event"] and len(traj) == 5
    assert (traj.theta - exact_flow(t)).abs().max() <= 1e-3


def test_divergence_keeps_the_trajectory_up_to_the_last_finite_state():
    def blow_up(t, theta):  # θ̇ = θ², θ(0) = 1: θ = 1/(1 − t), infinite at t = 1
        return theta**2

    t = torch.linspace(0, 3, 31, dtype=torch.float64)
    with pytest.raises(flows.FlowDivergedError) as info:
        flows.simulate(blow_up, torch.ones(1, dtype=torch.float64), t, method="euler",
                       options={"step_size": 0.01}, progress=False)
    err = info.value
    partial = err.trajectory
    assert torch.isfinite(err.theta).all() and torch.isfinite(partial.theta).all()
    assert err.t <= err.bad_time and f"non-finite at t={err.bad_time:.6g}" in str(err)
    assert torch.equal(partial.theta[-1], err.theta)
    # the kept states before the blow-up follow the Euler recursion exactly at their recorded times
    theta, k = torch.tensor(1.0, dtype=torch.float64), 0
    euler = {}
    while k * 0.01 < err.t + 1e-9:
        euler[round(k * 0.01, 6)] = float(theta)
        theta, k = theta + 0.01 * theta**2, k + 1
    for time, state in zip(partial.t.tolist(), partial.theta[:, 0].tolist()):
        assert state == pytest.approx(euler[round(time, 6)], rel=1e-9)  # grid round-off, amplified by θ²


def test_adaptive_blow_up_raises_flow_diverged():
    problem, _ = quadratic_flow()

    def field(t, theta):  # finite-time blow-up at t = 1 with a problem attached for recording
        return theta**2

    field.problem = problem
    with pytest.raises(flows.FlowDivergedError) as info:
        flows.simulate(field, torch.ones(2, dtype=torch.float64), torch.linspace(0, 2, 5, dtype=torch.float64),
                       progress=False)
    assert info.value.t == pytest.approx(1.0, abs=1e-4) and "underflowed" in str(info.value)
    partial = info.value.trajectory
    assert torch.isfinite(partial.loss).all() and len(partial) >= 3
    # kept states well before the singularity lie on θ = 1/(1 − t) at their recorded times
    early = partial.t < 0.9
    assert int(early.sum()) >= 2
    assert torch.allclose(partial.theta[early, 0], 1 / (1 - partial.t[early]), rtol=1e-5)


def test_save_load_round_trip_is_exact(tmp_path):
    _, field = quadratic_flow()
    traj = flows.simulate(field, THETA0, torch.linspace(0, 1, 6, dtype=torch.float64), progress=False)
    path = traj.save(tmp_path / "run")
    assert path.name == "run.npz" and [p.name for p in tmp_path.iterdir()] == ["run.npz"]
    back = flows.Trajectory.load(path)
    for name in ("t", "theta", "loss", "grad_norm"):
        assert torch.equal(getattr(back, name), getattr(traj, name))
    assert back.stats == traj.stats
    assert back.metadata == traj.metadata
    assert back.metadata["solver"] == {"method": "dopri5", "rtol": 1e-7, "atol": 1e-9}
    assert back.metadata["metric"] == {"name": "Constant", "size": 2}
    assert "torch" in back.metadata["versions"]


def test_failed_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    _, field = quadratic_flow()
    traj = flows.simulate(field, THETA0, torch.linspace(0, 1, 3, dtype=torch.float64), progress=False)
    path = traj.save(tmp_path / "run.npz")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        traj.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["run.npz"]


def test_bad_inputs_raise_clear_errors():
    problem, field = quadratic_flow()
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="theta0 has length 3 but the problem has 2 parameters"):
        flows.simulate(field, torch.zeros(3, dtype=torch.float64), t)
    with pytest.raises(ValueError, match=r"unknown method 'rk5'; torchdiffeq offers \[.*'dopri5'.*\]"):
        flows.simulate(field, THETA0, t, method="rk5")
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        flows.simulate(field, THETA0, torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="non-finite"):
        flows.simulate(field, torch.tensor([1.0, float("nan")], dtype=torch.float64), t)
    with pytest.raises(ValueError, match=r"returned \(3,\) for a state of shape \(2,\)"):
        flows.simulate(lambda t, th: torch.zeros(3, dtype=torch.float64), THETA0, t, progress=False)
    problem32, field32 = quadratic_flow(dtype=torch.float32)
    with pytest.warns(UserWarning, match="rtol=1e-09, atol=1e-06 ask for errors below the resolution"):
        flows.simulate(field32, THETA0.float(), t.float(), rtol=1e-9, atol=1e-6, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flows.simulate(field32, THETA0.float(), t.float(), rtol=1e-4, atol=1e-6, progress=False)


def test_any_callable_is_a_field_and_time_can_run_backwards():
    rate = torch.linalg.solve(M, A)
    t = torch.linspace(1, 0, 4, dtype=torch.float64)
    start = exact_flow([1.0])[0]
    traj = flows.simulate(lambda s, th: -rate @ th, start, t, rtol=1e-10, atol=1e-12, progress=False)
    assert traj.loss is None
    assert (traj.theta[-1] - THETA0).abs().max() <= 1e-8


def test_euclidean_gradient_flow_on_a_network_decreases_the_loss():
    x, y = flows.data.digits(40)
    problem = flows.Problem(flows.data.mlp([64, 8, 10]), "cross_entropy", (x, y))
    traj = flows.simulate(GradientFlow(problem, Euclidean()), problem.theta0,
                          torch.linspace(0, 5, 6, dtype=torch.float64), progress=False)
    # dL/dt = −‖∇L‖² along the flow: the loss drop matches the integral of the squared gradient norm
    drop = traj.loss[0] - traj.loss[-1]
    fine = flows.simulate(GradientFlow(problem), problem.theta0, torch.linspace(0, 5, 201, dtype=torch.float64),
                          progress=False)
    integral = torch.trapezoid(fine.grad_norm**2, fine.t)
    assert drop > 0 and float(drop) == pytest.approx(float(integral), rel=1e-3)
