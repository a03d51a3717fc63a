"""Rules beyond gradient descent: momentum and a continuous Adam against closed forms and hand formulas."""

import pytest
import torch

import flows
from flows.action import action
from flows.metrics import Constant, Euclidean
from flows.natural import recover
from flows.rules import AdamFlow, GradientFlow, HeavyBall

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
M = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
THETA0 = torch.tensor([1.0, -1.0], dtype=torch.float64)
TIGHT = {"rtol": 1e-11, "atol": 1e-13, "progress": False}


def test_heavy_ball_on_a_quadratic_is_the_matrix_exponential():
    problem = flows.data.quadratic(A, THETA0)
    rule = HeavyBall(problem, friction=0.7, metric=Constant(M))
    t = torch.linspace(0, 4, 9, dtype=torch.float64)
    traj = flows.simulate(rule, rule.initial_state(), t, **TIGHT)
    # z' = [[0, I], [−M⁻¹A, −γI]] z
    n = 2
    block = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
    block[:n, n:] = torch.eye(n, dtype=torch.float64)
    block[n:, :n] = -torch.linalg.solve(M, A)
    block[n:, n:] = -0.7 * torch.eye(n, dtype=torch.float64)
    z0 = torch.cat([THETA0, torch.zeros(n, dtype=torch.float64)])
    exact = torch.stack([torch.linalg.matrix_exp(block * float(s)) @ z0 for s in t])
    assert (traj.theta - exact).abs().max() <= 1e-8
    theta = rule.theta_of(traj.theta)
    assert torch.allclose(traj.loss, 0.5 * torch.einsum("ti,ij,tj->t", theta, A, theta), rtol=1e-12)


def test_momentum_has_a_positive_gap_and_is_natural_gradient_on_its_energy():
    problem = flows.data.quadratic(A, THETA0)
    rule = HeavyBall(problem, friction=1.5)
    t = torch.linspace(0, 3, 61, dtype=torch.float64)
    traj = flows.simulate(rule, rule.initial_state(), t, action=Euclidean(), **TIGHT)
    report = action(traj)
    assert float(report.gap[-1]) > 1e-2  # momentum is not steepest descent in the Euclidean metric
    assert float(report.total[-1]) == pytest.approx(float(report.gap[-1] + report.loss_drop[-1]), rel=1e-8)
    # the same gap from the discrete action of the θ path on a fine grid (an independent route)
    fine_t = torch.linspace(0, 3, 3001, dtype=torch.float64)
    fine = flows.simulate(rule, rule.initial_state(), fine_t, record=False, **TIGHT)
    states = rule.theta_of(fine.theta)
    discrete = action(flows.Trajectory(fine_t, states), Euclidean(), problem=problem)
    assert float(discrete.gap[-1]) == pytest.approx(float(report.gap[-1]), rel=1e-4)
    # with a small cross term the energy decreases strictly, and the recovered metric reproduces ż
    energy = rule.energy_problem(cross=0.05)
    rec = recover(rule, energy, flows.Trajectory(t[1:], traj.theta[1:]))
    assert float(rec.residual.max()) <= 1e-10 and bool((rec.psi < torch.pi / 2).all())


def test_adam_flow_field_and_training():
    x, y = flows.data.digits(60)
    problem = flows.Problem(flows.data.mlp([64, 6, 10]), "cross_entropy", (x, y))
    rule = AdamFlow(problem, beta1=0.8, beta2=0.99, eps=1e-8)
    z0 = rule.initial_state()
    n = problem.num_params
    g = problem.grad(problem.theta0)
    dz = rule(0.0, z0 + torch.cat([torch.zeros(n), 0.1 * g, torch.zeros(n)]).to(z0))
    m, s = 1.1 * g, g * g
    assert torch.allclose(dz[:n], -m / (s.sqrt() + 1e-8), rtol=1e-12)
    assert torch.allclose(dz[n:2 * n], 0.2 * (g - m), rtol=1e-12, atol=1e-18)
    assert torch.allclose(dz[2 * n:], torch.zeros(n, dtype=torch.float64), atol=1e-18)
    traj = flows.simulate(rule, z0, torch.linspace(0, 5, 6, dtype=torch.float64), rtol=1e-6, atol=1e-8,
                          progress=False)
    assert traj.loss.shape == (6,) and float(traj.loss[-1]) < 0.5 * float(traj.loss[0])
    with pytest.raises(ValueError, match="beta2 must lie in"):
        AdamFlow(problem, beta2=1.0)


def test_state_length_is_checked_through_theta_of():
    problem = flows.data.quadratic(A, THETA0)
    rule = HeavyBall(problem)
    with pytest.raises(ValueError, match="theta0 has length 6 but the rule's state has length 4"):
        flows.simulate(rule, torch.zeros(6, dtype=torch.float64), torch.linspace(0, 1, 3), progress=False)
    traj = flows.simulate(rule, rule.initial_state(), torch.linspace(0, 10, 11, dtype=torch.float64),
                          event=flows.events.loss_below(0.05), **TIGHT)
    assert traj.stats["stopped_by_event"] and float(traj.loss[-1]) == pytest.approx(0.05, rel=1e-6)
    # momentum from rest equals gradient flow to first order: same initial direction
    gf = GradientFlow(problem)(0.0, THETA0)
    assert torch.allclose(rule(0.0, rule.initial_state())[2:], gf, rtol=1e-14)
