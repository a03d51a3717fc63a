"""Problem: the flat-θ view must reproduce the model's own forward/backward exactly."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flows
from tests.conftest import tanh_mlp


def _data(b, n_in, n_out, classes=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n_in, generator=g, dtype=torch.float64)
    if classes:
        return x, torch.randint(0, n_out, (b,), generator=g)
    return x, torch.randn(b, n_out, generator=g, dtype=torch.float64)


def _autograd_loss_and_grad(model, loss, x, y):
    """Independent reference: the model itself, its own parameters, torch.autograd."""
    model = copy.deepcopy(model).double()
    out = model(x)
    value = loss(out, y)
    grads = torch.autograd.grad(value, list(model.parameters()))
    return value.detach(), torch.cat([g.reshape(-1) for g in grads])


@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4), b=st.integers(1, 7), seed=st.integers(0, 99))
def test_mse_loss_and_grad_match_autograd(sizes, b, seed):
    model = tanh_mlp(sizes, seed)
    x, y = _data(b, sizes[0], sizes[-1], seed=seed)
    problem = flows.Problem(model, "mse", (x, y))
    ref_value, ref_grad = _autograd_loss_and_grad(model, lambda o, t: 0.5 * ((o - t) ** 2).sum() / b, x, y)
    assert torch.allclose(problem.loss(problem.theta0), ref_value, rtol=1e-13, atol=1e-15)
    assert torch.allclose(problem.grad(problem.theta0), ref_grad, rtol=1e-12, atol=1e-14)


def test_mse_is_C_over_2_times_torch_mse():
    x, y = _data(5, 3, 4)
    out = torch.randn(5, 4, dtype=torch.float64)
    assert torch.allclose(flows.problem.mse(out, y), 4 / 2 * torch.nn.MSELoss()(out, y), rtol=1e-14)


def test_cross_entropy_and_callable_loss_match_autograd():
    model = tanh_mlp([4, 5, 3], seed=1)
    x, y = _data(6, 4, 3, classes=True)
    ce = torch.nn.functional.cross_entropy
    for loss in ("cross_entropy", ce):
        problem = flows.Problem(model, loss, (x, y))
        ref_value, ref_grad = _autograd_loss_and_grad(model, ce, x, y)
        assert torch.allclose(problem.loss(problem.theta0), ref_value, rtol=1e-13)
        assert torch.allclose(problem.grad(problem.theta0), ref_grad, rtol=1e-12, atol=1e-14)


def test_ensemble_loss_and_grad_equal_member_by_member():
    model = tanh_mlp([3, 4, 2])
    problem = flows.Problem(model, "mse", _data(5, 3, 2))
    thetas = problem.theta0 + 0.3 * torch.randn(4, problem.num_params, dtype=torch.float64)
    losses, grads = problem.value_and_grad(thetas)
    for i in range(4):
        assert torch.allclose(losses[i], problem.loss(thetas[i]), rtol=1e-13)
        assert torch.allclose(grads[i], problem.grad(thetas[i]), rtol=1e-12, atol=1e-15)
    assert problem.loss(thetas.reshape(2, 2, -1)).shape == (2, 2)


def test_flat_view_blocks_and_model_untouched():
    model = tanh_mlp([3, 4, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    problem = flows.Problem(model, "mse", _data(5, 3, 2))
    assert problem.num_params == 3 * 4 + 4 + 4 * 2 + 2
    assert [b.name for b in problem.blocks] == ["0", "2"]
    assert [(b.start, b.stop) for b in problem.blocks] == [(0, 16), (16, 26)]
    params = problem.unflatten(problem.theta0)
    for name, p in model.named_parameters():
        assert torch.equal(params[name], p.detach())
    assert torch.equal(problem.flatten(params), problem.theta0)
    problem.grad(problem.theta0 + 1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_float32_model_is_evaluated_in_float64():
    model = tanh_mlp([3, 2]).float()
    x, y = _data(4, 3, 2)
    problem = flows.Problem(model, "mse", (x.float(), y.float()))
    assert problem.theta0.dtype == torch.float64 and problem.loss(problem.theta0).dtype == torch.float64


def test_bad_inputs_name_the_sizes():
    model = tanh_mlp([3, 2])
    with pytest.raises(ValueError, match="3 inputs and 4 targets"):
        flows.Problem(model, "mse", (torch.zeros(3, 3), torch.zeros(4, 2)))
    problem = flows.Problem(model, "mse", _data(4, 3, 2))
    with pytest.raises(ValueError, match="length 5 but the problem has 8"):
        problem.loss(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"theta has dtype torch.float32 but the problem's parameters and data are "
                                         r"torch.float64; convert it with theta.to\(torch.float64\)"):
        problem.grad(torch.zeros(8, dtype=torch.float32))
    with pytest.raises(ValueError, match="got a scalar"):
        problem.loss(torch.tensor(0.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        flows.Problem(model, "hinge", _data(4, 3, 2))


@given(b=st.integers(1, 9), c=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_output_gradient_equals_autograd_for_the_built_in_losses(b, c, seed):
    """The closed forms (y − t)/B and (softmax(y) − onehot(t))/B against torch.func.grad of the loss itself, also
    under vmap (they are plain tensor operations) and for a loss given as a callable (which takes autograd)."""
    from flows.problem import cross_entropy, mse, output_gradient

    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(b, c, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, c, (b,), generator=gen)
    targets = torch.randn(b, c, generator=gen, dtype=torch.float64)
    for loss, t in ((mse, targets), (cross_entropy, labels), (cross_entropy, torch.softmax(targets, -1)),
                    (lambda out, tt: (out.sin() * tt).sum() / b, targets)):
        expected = torch.func.grad(lambda out, loss=loss, t=t: loss(out, t))(y)
        torch.testing.assert_close(output_gradient(loss, y, t), expected, rtol=1e-12, atol=1e-14)
    stacked = torch.stack([y, 2 * y])
    batched = torch.func.vmap(lambda out: output_gradient(cross_entropy, out, labels))(stacked)
    for i in range(2):
        expected = torch.func.grad(lambda out: cross_entropy(out, labels))(stacked[i])
        torch.testing.assert_close(batched[i], expected, rtol=1e-12, atol=1e-14)
