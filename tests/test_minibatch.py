"""Problem's minibatch and per-sample evaluations against the model's own autograd, one sample at a time."""

import copy

import pytest
import torch
import torch.nn.functional as F

import flows
from tests.conftest import tanh_mlp


def _problem(loss="cross_entropy", b=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (b,), generator=g) if loss == "cross_entropy" else torch.randn(b, 3, generator=g,
                                                                                          dtype=torch.float64)
    return flows.Problem(tanh_mlp([4, 5, 3], seed=seed), loss, (x, y))


def _autograd_grad(problem, x, y):
    """Reference: the model's own parameters and torch.autograd on the given samples."""
    model = copy.deepcopy(problem.model).double()
    loss = F.cross_entropy if problem.loss_name == "cross_entropy" else problem.loss_fn
    value = loss(model(x), y)
    grads = torch.autograd.grad(value, list(model.parameters()))
    return value.detach(), torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_minibatch_loss_and_grad_match_autograd_on_the_subset(loss):
    problem = _problem(loss)
    idx = torch.tensor([7, 0, 3, 3, 11])
    ref_value, ref_grad = _autograd_grad(problem, problem.inputs[idx], problem.targets[idx])
    value, g = problem.value_and_grad(problem.theta0, idx)
    torch.testing.assert_close(value, ref_value, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(g, ref_grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(problem.loss(problem.theta0, idx.tolist()), ref_value, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(problem.grad(problem.theta0, idx), ref_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_sample_grads_are_one_sample_autograd_gradients_and_average_to_the_gradient(loss):
    problem = _problem(loss)
    theta = problem.theta0 + 0.1 * torch.randn(problem.num_params, dtype=torch.float64)
    problem.model.load_state_dict({k: v for k, v in problem.unflatten(theta).items()})
    rows = problem.sample_grads(theta)
    assert rows.shape == (problem.batch_size, problem.num_params)
    for i in range(problem.batch_size):
        _, ref = _autograd_grad(problem, problem.inputs[i:i + 1], problem.targets[i:i + 1])
        torch.testing.assert_close(rows[i], ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rows.mean(0), problem.grad(theta), rtol=1e-12, atol=1e-14)
    losses = problem.sample_losses(theta, [2, 5])
    torch.testing.assert_close(losses.mean(), problem.loss(theta, [2, 5]), rtol=1e-13, atol=1e-14)


def test_a_summed_loss_has_no_per_sample_losses():
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)

    def summed(out, target):
        return ((out - target) ** 2).sum()

    problem = flows.Problem(tanh_mlp([4, 5, 3]), summed, (x, y))
    with pytest.raises(ValueError, match="not the mean of per-sample losses"):
        problem.sample_grads(problem.theta0)


@pytest.mark.parametrize("indices, message", [
    ([12], r"sample index 12 is outside 0…11"),
    ([-1], r"sample index -1"),
    ([], "indices is empty"),
])
def test_bad_indices_are_named(indices, message):
    problem = _problem()
    with pytest.raises(ValueError, match=message):
        problem.grad(problem.theta0, indices)


def test_float_indices_are_refused():
    problem = _problem()
    with pytest.raises(TypeError, match="integer sample indices"):
        problem.loss(problem.theta0, torch.tensor([0.0, 1.0]))
