"""ModifiedGradientFlow: the field against dense Hessians, and gradient descent's distance from it (O(η²)) and from
the plain gradient flow (O(η)), fitted over four step sizes."""

import numpy as np
import pytest
import torch

import flows
from flows.discrete import GD, NaturalGradientDescent
from flows.metrics import Constant
from flows.rules import GradientFlow, ModifiedGradientFlow
from tests.conftest import squared_diagonal_metric


def small_problem(seed=0):
    """A 2-4-1 tanh MLP with squared error on 16 random points (N = 17): a nonlinear gradient field."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    return flows.Problem(flows.data.mlp([2, 4, 1], seed=seed), "mse", (x, y))


def spd(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64)



def test_the_field_is_minus_grad_of_the_regularised_loss():
    problem = small_problem()
    theta = problem.theta0 + 0.1
    lr = 0.3
    g = torch.func.grad(problem.loss)(theta)
    H = torch.func.hessian(problem.loss)(theta)
    expected = -(g + 0.5 * lr * H @ g)
    assert torch.allclose(ModifiedGradientFlow(problem, lr)(0.0, theta), expected, rtol=1e-12, atol=1e-14)
    # the same as −∇(L + (η/4)‖∇L‖²), by double backward through an independent loss
    regularised = torch.func.grad(lambda th: problem.loss(th) + lr / 4 * (torch.func.grad(problem.loss)(th) ** 2)
                                  .sum())(theta)
    assert torch.allclose(ModifiedGradientFlow(problem, lr)(0.0, theta), -regularised, rtol=1e-12, atol=1e-14)


def test_with_a_constant_metric_the_field_is_the_preconditioned_analogue():
    problem = small_problem()
    theta = problem.theta0 - 0.05
    M = spd(problem.num_params)
    lr = 0.2
    g = torch.func.grad(problem.loss)(theta)
    H = torch.func.hessian(problem.loss)(theta)
    u = torch.linalg.solve(M, g)
    expected = -(u + 0.5 * lr * torch.linalg.solve(M, H @ u))
    frozen = ModifiedGradientFlow(problem, lr, Constant(M))(0.0, theta)
    moving = ModifiedGradientFlow(problem, lr, Constant(M), moving=True)(0.0, theta)
    assert torch.allclose(frozen, expected, rtol=1e-10, atol=1e-13)
    assert torch.allclose(moving, expected, rtol=1e-10, atol=1e-13)


def test_a_moving_metric_adds_the_derivative_of_the_direction():
    problem = small_problem()
    theta = problem.theta0 + 0.2
    lr = 0.2

    def direction(th):  # F(θ) = G(θ)⁻¹∇L(θ), written out
        return torch.func.grad(problem.loss)(th) / (1 + th**2)

    F = direction(theta)
    J = torch.func.jacrev(direction)(theta)
    expected = -(F + 0.5 * lr * J @ F)
    metric = squared_diagonal_metric()
    assert torch.allclose(ModifiedGradientFlow(problem, lr, metric, moving=True)(0.0, theta), expected,
                          rtol=1e-10, atol=1e-13)
    frozen = ModifiedGradientFlow(problem, lr, metric)(0.0, theta)
    H = torch.func.hessian(problem.loss)(theta)
    assert torch.allclose(frozen, -(F + 0.5 * lr * (H @ F) / (1 + theta**2)), rtol=1e-10, atol=1e-13)


def solve(field, problem, T):
    """θ(T) of a flow, integrated with tolerances 1e-10: far below the smallest distance measured (~1e-5)."""
    return flows.simulate(field, problem.theta0, torch.tensor([0.0, T]), rtol=1e-10, atol=1e-10, progress=False,
                          record=False).final


def distances(problem, update, reference, lrs, T):
    """‖θ_K − reference(η)‖ for the update with K = T/η steps of size η."""
    assert all(abs(T / lr - round(T / lr)) < 1e-9 for lr in lrs)
    return [float((flows.iterate(update, problem.theta0, round(T / lr), lr=lr, progress=False, record=False).final
                   - reference(lr)).norm()) for lr in lrs]


def slope(lrs, errors):
    return float(np.polyfit(np.log(lrs), np.log(errors), 1)[0])


LRS = [0.1, 0.05, 0.025, 0.0125]  # each divides T = 1 exactly, so K·η = T


def test_gd_is_first_order_close_to_the_flow_and_second_order_close_to_the_modified_flow():
    problem = small_problem()
    T = 1.0
    flow = solve(GradientFlow(problem), problem, T)
    to_flow = distances(problem, GD(problem), lambda lr: flow, LRS, T)
    to_modified = distances(problem, GD(problem), lambda lr: solve(ModifiedGradientFlow(problem, lr), problem, T),
                            LRS, T)
    assert abs(slope(LRS, to_flow) - 1.0) < 0.25, to_flow
    assert abs(slope(LRS, to_modified) - 2.0) < 0.25, to_modified
    assert all(m < f for m, f in zip(to_modified, to_flow))


def test_preconditioned_gd_is_second_order_close_to_the_preconditioned_modified_flow():
    problem = small_problem()
    metric = Constant(spd(problem.num_params))
    T = 1.0
    update = NaturalGradientDescent(problem, metric)
    flow = solve(GradientFlow(problem, metric), problem, T)
    to_flow = distances(problem, update, lambda lr: flow, LRS, T)
    to_modified = distances(problem, update, lambda lr: solve(ModifiedGradientFlow(problem, lr, metric), problem, T),
                            LRS, T)
    assert abs(slope(LRS, to_flow) - 1.0) < 0.25, to_flow
    assert abs(slope(LRS, to_modified) - 2.0) < 0.25, to_modified


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_lr_is_named(lr):
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got"):
        ModifiedGradientFlow(small_problem(), lr)


def test_describe_names_the_step():
    field = ModifiedGradientFlow(small_problem(), 0.1)
    assert field.describe() == {"name": "ModifiedGradientFlow", "lr": 0.1, "metric": {"name": "Euclidean",
                                                                                       "scale": 1.0},
                                "moving": False}
