"""Structured sweeps of Linear/activation chains (flows.modules.chain) against dense references: the R-operator
Hessian–vector sweep (issue 14) against ``torch.func.jacrev(problem.grad)``, the ensemble's weighted per-sample
gradients (issue 13) against the dense per-sample Jacobian; and the models both leave to autograd."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import flows
from flows.modules import chain_hessian_products, linear_chain

ACTS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "relu": nn.ReLU}


def _data(loss, samples, inputs, outputs, gen):
    x = torch.randn(samples, inputs, generator=gen, dtype=torch.float64)
    if loss == "cross_entropy":
        return x, torch.randint(0, outputs, (samples,), generator=gen)
    return x, torch.randn(samples, outputs, generator=gen, dtype=torch.float64)


def _chain_problem(act, loss, bias, sizes, gen):
    """An nn.Sequential of Linear layers of ``sizes`` with activation ``act`` between them, on 9 random samples."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias, dtype=torch.float64))
        if i < len(sizes) - 2:
            layers.append(ACTS[act]())
    return flows.Problem(nn.Sequential(*layers), loss, _data(loss, 9, sizes[0], sizes[-1], gen))


def _dense_check(problem, theta, vectors, g, products):
    """g = ∇L(θ) and products = ∇²L(θ)·V to 1e-10 relative (in norm, per column), against the dense Jacobian of
    the gradient by torch.func.jacrev — a different route (vmapped reverse over reverse through functional_call)."""
    hessian = torch.func.jacrev(problem.grad)(theta)
    reference = hessian @ vectors
    assert products.shape == reference.shape
    assert float((g - problem.grad(theta)).norm()) <= 1e-10 * float(problem.grad(theta).norm())
    error = (products - reference).reshape(reference.shape[0], -1).norm(dim=0)
    scale = reference.reshape(reference.shape[0], -1).norm(dim=0)
    assert bool((error <= 1e-10 * scale).all()), (error / scale).max()


@settings(max_examples=40, deadline=None)
@given(act=st.sampled_from(sorted(ACTS)), loss=st.sampled_from(["cross_entropy", "mse"]), bias=st.booleans(),
       depth=st.sampled_from([2, 3]), k=st.sampled_from([1, 5]), seed=st.integers(0, 10_000))
def test_chain_products_equal_the_dense_hessian(act, loss, bias, depth, k, seed):
    gen = torch.Generator().manual_seed(seed)
    problem = _chain_problem(act, loss, bias, [4, 5, 6, 3] if depth == 3 else [4, 5, 3], gen)
    theta = problem.theta0 + 0.5 * torch.randn(problem.num_params, generator=gen, dtype=torch.float64)
    vectors = torch.randn(problem.num_params, k, generator=gen, dtype=torch.float64)
    fast = chain_hessian_products(problem, theta, vectors)
    assert fast is not None  # the structured route is taken
    _dense_check(problem, theta, vectors, *fast)
    g, rows = linear_chain(problem).hessian_products(theta, vectors.T.contiguous())  # the sweep itself
    torch.testing.assert_close(fast[1], rows.T, rtol=0, atol=0)  # Problem's route is the sweep, bit for bit
    torch.testing.assert_close(fast[0], g, rtol=0, atol=0)


def test_one_vector_gives_one_product():
    gen = torch.Generator().manual_seed(3)
    problem = flows.Problem(flows.data.mlp([3, 4, 2], seed=3), "cross_entropy", _data("cross_entropy", 7, 3, 2, gen))
    vector = torch.randn(problem.num_params, generator=gen, dtype=torch.float64)
    g, product = chain_hessian_products(problem, problem.theta0, vector)
    assert product.shape == (problem.num_params,)
    _dense_check(problem, problem.theta0, vector[:, None], g, product[:, None])
    with pytest.raises(ValueError, match=r"vectors must have shape \(N,\) or \(N, k\)"):
        chain_hessian_products(problem, problem.theta0, torch.zeros(problem.num_params + 1, dtype=torch.float64))


def test_nested_sequential_with_identity_and_activations_at_both_ends():
    """Glue the sweep must read: a nested Sequential, nn.Identity, flows' own Linear and Activation, an activation
    before the first Linear (its R-input is zero) and one after the last."""
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Sigmoid(), nn.Sequential(flows.modules.Linear(3, 4), flows.modules.Softplus()),
                          nn.Identity(), nn.Linear(4, 2, bias=False, dtype=torch.float64), nn.Tanh())
    problem = flows.Problem(model, "mse", _data("mse", 8, 3, 2, gen))
    theta = problem.theta0 + 0.3 * torch.randn(problem.num_params, generator=gen, dtype=torch.float64)
    vectors = torch.randn(problem.num_params, 4, generator=gen, dtype=torch.float64)
    fast = chain_hessian_products(problem, theta, vectors)
    assert fast is not None
    _dense_check(problem, theta, vectors, *fast)


def test_an_activation_module_called_twice_is_swept_twice():
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    act = nn.Tanh()
    model = nn.Sequential(nn.Linear(3, 4, dtype=torch.float64), act, nn.Linear(4, 4, dtype=torch.float64), act,
                          nn.Linear(4, 2, dtype=torch.float64))
    problem = flows.Problem(model, "cross_entropy", _data("cross_entropy", 8, 3, 2, gen))
    vectors = torch.randn(problem.num_params, 2, generator=gen, dtype=torch.float64)
    fast = chain_hessian_products(problem, problem.theta0, vectors)
    assert fast is not None
    _dense_check(problem, problem.theta0, vectors, *fast)


def test_the_digits_mlp_takes_the_chain_route():
    x, y = flows.data.digits(24)
    problem = flows.Problem(flows.data.mlp([64, 6, 10]), "cross_entropy", (x, y))
    assert isinstance(linear_chain(problem), flows.modules.LinearChain)
    vectors = torch.randn(problem.num_params, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _dense_check(problem, problem.theta0, vectors, *problem.hessian_products(problem.theta0, vectors))


class _Residual(nn.Sequential):
    def forward(self, x):
        return super().forward(x) + x


def _other_problems():
    """Problems that are not Linear/activation chains with a built-in loss: each must give None, and
    Problem.hessian_products must still be right on it (by its autograd route)."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    x, y = flows.data.digits(10, images=True)
    yield "cnn", flows.Problem(flows.data.cnn(2), "cross_entropy", (x, y))
    tokens, labels = flows.data.token_sum(12, length=3, vocab=4)
    yield "transformer", flows.Problem(flows.data.Transformer(vocab=4, length=3, width=4, heads=2, hidden=6),
                                       "cross_entropy", (tokens, labels))
    data = _data("mse", 6, 3, 3, gen)
    yield "callable loss", flows.Problem(flows.data.mlp([3, 4, 3]), lambda out, t: ((out - t) ** 4).mean(), data)
    yield "custom forward", flows.Problem(_Residual(nn.Linear(3, 3, dtype=torch.float64), nn.Tanh()), "mse", data)
    yield "GELU", flows.Problem(nn.Sequential(nn.Linear(3, 4, dtype=torch.float64), nn.GELU(),
                                              nn.Linear(4, 3, dtype=torch.float64)), "mse", data)
    yield "softplus beta 2", flows.Problem(flows.data.mlp([3, 4, 3], activation=lambda: nn.Softplus(beta=2.0)),
                                           "mse", data)
    shared = nn.Linear(3, 3, dtype=torch.float64)
    yield "shared layer", flows.Problem(nn.Sequential(shared, nn.Tanh(), shared), "mse", data, blocks=["0"])
    x1, t1 = _data("mse", 6, 3, 1, gen)
    yield "mse targets (B,)", flows.Problem(flows.data.mlp([3, 4, 1]), "mse", (x1, t1[:, 0]))


@pytest.mark.parametrize("name,problem", list(_other_problems()), ids=lambda v: v if isinstance(v, str) else "")
def test_other_models_and_losses_keep_the_autograd_route(name, problem):
    assert linear_chain(problem) is None
    gen = torch.Generator().manual_seed(11)
    theta = problem.theta0 + 0.1 * torch.randn(problem.num_params, generator=gen, dtype=torch.float64)
    vectors = torch.randn(problem.num_params, 3, generator=gen, dtype=torch.float64)
    assert chain_hessian_products(problem, theta, vectors) is None
    _dense_check(problem, theta, vectors, *problem.hessian_products(theta, vectors))


# -- weighted sums of per-sample gradients, Σ_i w_i ∇ℓ_i(θ_p) (sweep 2) ----------------------------------------------
def _per_sample_jacobian(problem, theta):
    """(B, N): row i is ∇ℓ_i(θ), ℓ_i the loss of sample i alone, by torch.func.jacrev through the outputs (no
    library sweep, no per-sample vmap)."""
    def losses(th):
        out = problem.outputs(th, problem.inputs)
        return torch.stack([problem.loss_fn(out[i:i + 1], problem.targets[i:i + 1])
                            for i in range(problem.batch_size)])
    return torch.func.jacrev(losses)(theta)


def _weighted_check(problem, thetas, weights, result):
    """result[p, j] = Σ_i w[p, j, i] ∇ℓ_i(θ_p) to 1e-10 relative per row, against the dense per-sample Jacobian."""
    for p in range(thetas.shape[0]):
        reference = weights[p] @ _per_sample_jacobian(problem, thetas[p])
        error = (result[p] - reference).norm(dim=-1)
        assert bool((error <= 1e-10 * reference.norm(dim=-1)).all()), (error / reference.norm(dim=-1)).max()


@settings(max_examples=30, deadline=None)
@given(act=st.sampled_from(sorted(ACTS)), loss=st.sampled_from(["cross_entropy", "mse"]), bias=st.booleans(),
       depth=st.sampled_from([1, 2, 3]), paths=st.sampled_from([1, 3]), k=st.sampled_from([1, 2]),
       seed=st.integers(0, 10_000))
def test_chain_weighted_gradients_equal_the_dense_per_sample_gradients(act, loss, bias, depth, paths, k, seed):
    gen = torch.Generator().manual_seed(seed)
    problem = _chain_problem(act, loss, bias, {1: [4, 3], 2: [4, 5, 3], 3: [4, 5, 6, 3]}[depth], gen)
    thetas = problem.theta0 + 0.5 * torch.randn(paths, problem.num_params, generator=gen, dtype=torch.float64)
    weights = torch.randn(paths, k, 9, generator=gen, dtype=torch.float64)
    result = problem.weighted_gradients(thetas, weights)
    assert result.shape == (paths, k, problem.num_params)
    _weighted_check(problem, thetas, weights, result)
    sweep = linear_chain(problem).weighted_gradients(thetas, weights)  # the structured route is the one taken
    torch.testing.assert_close(result, sweep, rtol=0, atol=0)


def test_weighted_gradients_shapes_uniform_weights_and_glue():
    """Every accepted shape; weights 1/B give ∇L; the glue of the Hessian test (nested Sequential, Identity, flows'
    own modules, activations before the first and after the last Linear layer) on the structured route."""
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    model = nn.Sequential(nn.Sigmoid(), nn.Sequential(flows.modules.Linear(3, 4), flows.modules.Softplus()),
                          nn.Identity(), nn.Linear(4, 2, bias=False, dtype=torch.float64), nn.Tanh())
    problem = flows.Problem(model, "mse", _data("mse", 8, 3, 2, gen))
    assert linear_chain(problem) is not None
    thetas = problem.theta0 + 0.3 * torch.randn(2, problem.num_params, generator=gen, dtype=torch.float64)
    weights = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    both = problem.weighted_gradients(thetas, weights)
    _weighted_check(problem, thetas, weights, both)
    torch.testing.assert_close(problem.weighted_gradients(thetas, weights[:, 0]), both[:, 0], rtol=1e-13, atol=0)
    torch.testing.assert_close(problem.weighted_gradients(thetas[1], weights[1]), both[1], rtol=1e-13, atol=0)
    torch.testing.assert_close(problem.weighted_gradients(thetas[1], weights[1, 2]), both[1, 2], rtol=1e-13, atol=0)
    uniform = torch.full((8,), 1 / 8, dtype=torch.float64)
    torch.testing.assert_close(problem.weighted_gradients(thetas[0], uniform), problem.grad(thetas[0]),
                               rtol=1e-12, atol=1e-15)
    assert problem.weighted_gradients(thetas[:0], weights[:0]).shape == (0, 3, problem.num_params)  # empty: zeros
    assert problem.weighted_gradients(thetas, weights[:, :0]).shape == (2, 0, problem.num_params)
    for bad in (torch.ones(7), torch.ones(3, 8), torch.ones(2, 3, 4, 8)):
        with pytest.raises(ValueError, match=r"weights must have shape \(2, 8\) or \(2, 'k', 8\)"):
            problem.weighted_gradients(thetas, bad)


@pytest.mark.parametrize("name,problem", list(_other_problems()), ids=lambda v: v if isinstance(v, str) else "")
def test_other_models_weighted_gradients_by_the_vmapped_pullback(name, problem):
    gen = torch.Generator().manual_seed(12)
    thetas = problem.theta0 + 0.1 * torch.randn(2, problem.num_params, generator=gen, dtype=torch.float64)
    weights = torch.randn(2, 2, problem.batch_size, generator=gen, dtype=torch.float64)
    if name == "mse targets (B,)":  # (B, 1) outputs against (B,) targets broadcast to B × B: no per-sample losses
        with pytest.raises(ValueError, match="not the mean of per-sample losses"):
            problem.weighted_gradients(thetas, weights)
        return
    _weighted_check(problem, thetas, weights, problem.weighted_gradients(thetas, weights))
    _weighted_check(problem, thetas, weights[:, :1], problem.weighted_gradients(thetas, weights[:, 0])[:, None])
