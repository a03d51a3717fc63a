"""Problem.hessian_products and GradientFlow.jacobian_products (issue 14: the tangents of the Lyapunov exponents)
against dense torch.func references and a hand-derived Hessian."""

import pytest
import torch

import flows
from tests.conftest import tanh_mlp


def _classifier(seed=0, samples=12):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 5, generator=gen)
    y = torch.randint(0, 3, (samples,), generator=gen)
    return flows.Problem(tanh_mlp([5, 4, 3], seed=seed), "cross_entropy", (x, y))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_products_equal_the_dense_hessian_times_the_vectors(loss):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, generator=gen)
    y = torch.randint(0, 3, (10,), generator=gen) if loss == "cross_entropy" else torch.randn(10, 3, generator=gen)
    problem = flows.Problem(tanh_mlp([4, 5, 3], seed=1), loss, (x, y))
    theta = problem.theta0 + 0.3 * torch.randn(problem.num_params, generator=gen, dtype=torch.float64)
    vectors = torch.randn(problem.num_params, 4, generator=gen, dtype=torch.float64)
    g, products = problem.hessian_products(theta, vectors)
    hessian = torch.func.hessian(problem.loss)(theta)
    assert products.shape == (problem.num_params, 4)
    torch.testing.assert_close(g, torch.func.jacrev(problem.loss)(theta), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(products, hessian @ vectors, rtol=1e-10, atol=1e-13)
    # one vector of shape (N,) gives one product of shape (N,)
    g1, single = problem.hessian_products(theta, vectors[:, 2])
    assert single.shape == (problem.num_params,)
    torch.testing.assert_close(single, hessian @ vectors[:, 2], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(g1, g, rtol=0, atol=0)


def test_products_through_attention_equal_forward_over_reverse_and_finite_differences():
    """A transformer block (embedding, attention, LayerNorm): the double-backward products against the dense
    forward-over-reverse Jacobian of the gradient and against central differences of the gradient. (jacfwd of
    ``problem.grad``, not ``torch.func.hessian(problem.loss)``: the latter needs flows' composite layer norm to be
    right, tested in tests/test_attention_derivatives.py.)"""
    x, y = flows.data.token_sum(24, length=3, vocab=4)
    problem = flows.Problem(flows.data.Transformer(vocab=4, length=3, width=4, heads=2, hidden=6), "cross_entropy",
                            (x, y))
    gen = torch.Generator().manual_seed(4)
    theta = problem.theta0 + 0.1 * torch.randn(problem.num_params, generator=gen, dtype=torch.float64)
    vectors = torch.randn(problem.num_params, 3, generator=gen, dtype=torch.float64)
    g, products = problem.hessian_products(theta, vectors)
    torch.testing.assert_close(g, problem.grad(theta), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(products, torch.func.jacfwd(problem.grad)(theta) @ vectors, rtol=1e-10, atol=1e-12)
    # central differences along unit vectors u: error ≤ ε²/6·‖∇³L‖ + ‖∇L‖·2⁻⁵²/ε, 1e-11 … 6e-9 over seeds 0–3 at
    # ε = 1e-5; the 1e-7 bound keeps a margin of ≥ 15× and still catches a wrong product (the products are O(0.1–1))
    eps = 1e-5
    units = vectors / vectors.norm(dim=0)
    central = torch.stack([(problem.grad(theta + eps * u) - problem.grad(theta - eps * u)) / (2 * eps)
                           for u in units.T], dim=1)
    torch.testing.assert_close(problem.hessian_products(theta, units)[1], central, rtol=0, atol=1e-7)


def test_a_loss_linear_in_theta_has_zero_products():
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    problem = flows.data.function_problem(lambda th: (a * th).sum(), torch.zeros(3))
    g, products = problem.hessian_products(problem.theta0, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(g, a, rtol=0, atol=0)
    assert products.shape == (3, 3) and bool((products == 0).all())


class _SquareBackward(torch.autograd.Function):
    """(z, g) ↦ 2zg, the backward of z ↦ z², whose own backward runs data-dependent Python (no batching rule can
    follow ``float(…)``), so the Hessian products cannot be batched through it."""

    @staticmethod
    def forward(z, g):
        return 2 * z * g

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, gy):
        z, g = ctx.saved_tensors
        assert float(gy.abs().sum()) >= 0  # a concrete value: fails under a batched backward pass
        return 2 * g * gy, 2 * z * gy


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(z):
        return z * z

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, gy):
        (z,) = ctx.saved_tensors
        return _SquareBackward.apply(z, gy)


class _SquaredLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, x):
        return _Square.apply(x @ self.w)[:, None]


def test_a_model_that_cannot_be_batched_is_swept_once_per_vector():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, generator=gen), torch.randn(6, 1, generator=gen)
    problem = flows.Problem(_SquaredLinear(), "mse", (x, y))
    vectors = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    g, products = problem.hessian_products(problem.theta0, vectors)
    # by hand: L = (1/B) Σ ½(z² − y)², z = xᵀw: ∇L = (1/B) Σ 2z(z² − y) x, ∇²L = (1/B) Σ (6z² − 2y) x xᵀ
    xs, ys, w = x.double(), y.double()[:, 0], problem.theta0
    z = xs @ w
    hessian = ((6 * z**2 - 2 * ys)[:, None, None] * xs[:, :, None] * xs[:, None, :]).mean(0)
    torch.testing.assert_close(g, (2 * z * (z**2 - ys))[:, None].mul(xs).mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(products, hessian @ vectors, rtol=1e-12, atol=1e-13)


def test_bad_shapes_are_refused_by_name():
    problem = _classifier()
    n = problem.num_params
    with pytest.raises(ValueError, match=rf"vectors must have shape \(N,\) or \(N, k\) with N = {n}"):
        problem.hessian_products(problem.theta0, torch.zeros(n + 1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="k ≥ 1"):
        problem.hessian_products(problem.theta0, torch.zeros(n, 0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"takes one θ of shape \(N,\)"):
        problem.hessian_products(torch.stack([problem.theta0] * 2), torch.zeros(n, 1, dtype=torch.float64))


def test_jacobian_products_of_a_scaled_euclidean_flow_equal_its_dense_jacobian():
    problem = _classifier(3)
    field = flows.rules.GradientFlow(problem, flows.metrics.Euclidean(2.5))
    gen = torch.Generator().manual_seed(3)
    theta = problem.theta0 + 0.2 * torch.randn(problem.num_params, generator=gen, dtype=torch.float64)
    vectors = torch.randn(problem.num_params, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor(0.0, dtype=torch.float64)
    values, products = field.jacobian_products(t, theta, vectors)
    jacobian = torch.func.jacrev(lambda th: field(t, th))(theta)  # the field's own dense Jacobian, −∇²L/2.5
    torch.testing.assert_close(values, field(t, theta), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(products, jacobian @ vectors, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(products, -torch.func.hessian(problem.loss)(theta) @ vectors / 2.5, rtol=1e-10,
                               atol=1e-13)


def test_jacobian_products_refuse_a_metric_that_is_not_euclidean():
    problem = _classifier()
    field = flows.rules.GradientFlow(problem, flows.metrics.Diagonal(torch.full((problem.num_params,), 2.0)))
    with pytest.raises(ValueError, match="needs a Euclidean metric.*Diagonal"):
        field.jacobian_products(0.0, problem.theta0, torch.zeros(problem.num_params, 1, dtype=torch.float64))
