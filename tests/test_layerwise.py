"""Layerwise metric, modules and costates against dense references (MATH.md §2.2–2.3)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import flows
from flows.metrics import KFAC, BlockDiagonal, Layerwise, NaturalGradient
from flows.modules import Chain, Function, Linear, Parallel, Tanh, costates
from tests.conftest import block_diagonal_part, ce_loss, dense_gauss_newton, mse_loss


def _data(b, n_in, n_out, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n_in, generator=g, dtype=torch.float64)
    if classes:
        return x, torch.randint(0, n_out, (b,), generator=g)
    return x, torch.randn(b, n_out, generator=g, dtype=torch.float64)


def _mlp_problem(sizes, b, loss, seed=0, activation=nn.Tanh):
    model = flows.data.mlp(sizes, seed=seed, activation=activation)
    with torch.no_grad():  # weights well away from the linear regime
        for p in model.parameters():
            p.mul_(2.0)
    return flows.Problem(model, loss, _data(b, sizes[0], sizes[-1], loss == "cross_entropy", seed))


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _reference_solve(problem, mu, loss_fn, v, slices=None):
    dense = dense_gauss_newton(problem, problem.theta0, mu, loss_fn)
    slices = [b.slice for b in problem.blocks] if slices is None else slices
    blocks = block_diagonal_part(dense, slices)
    return torch.linalg.solve(blocks, v), blocks


@pytest.mark.parametrize("loss,output,loss_fn", [("mse", "identity", mse_loss), ("cross_entropy", "fisher", ce_loss),
                                                 ("cross_entropy", "ggn", ce_loss), ("mse", "ggn", mse_loss)])
@pytest.mark.parametrize("seed", [0, 1])
def test_layerwise_equals_dense_diagonal_blocks(loss, output, loss_fn, seed):
    problem = _mlp_problem([5, 9, 8, 4], b=3, loss=loss, seed=seed)  # 3 Linear layers, d = 12
    v = torch.randn(problem.num_params, dtype=torch.float64)
    expected, blocks = _reference_solve(problem, 0.3, loss_fn, v)
    metric = Layerwise(problem, mu=0.3, output=output)
    assert _rel(metric.solve(problem.theta0, v), expected) <= 1e-10
    assert torch.allclose(metric.matrix(problem.theta0), blocks, rtol=1e-12, atol=1e-13)
    assert torch.allclose(metric.apply(problem.theta0, expected), v, rtol=1e-10, atol=1e-12)


def test_sampled_fisher_rows_give_the_matching_block_metric():
    problem = _mlp_problem([4, 6, 5, 3], b=4, loss="cross_entropy")
    metric = Layerwise(problem, mu=0.2, output="sampled_fisher", probes=3, seed=7)
    reference = NaturalGradient(problem, mu=0.2, output="sampled_fisher", probes=3, seed=7)
    blocks = block_diagonal_part(reference.matrix(problem.theta0), [b.slice for b in problem.blocks])
    v = torch.randn(problem.num_params, dtype=torch.float64)
    assert _rel(metric.solve(problem.theta0, v), torch.linalg.solve(blocks, v)) <= 1e-10
    # the r-probe estimate is unbiased: averaged over many seeds it approaches the exact Fisher block
    y = problem.outputs(problem.theta0)
    exact = flows.metrics.output.fisher_rows(y)
    exact_m = exact.transpose(1, 2) @ exact
    mean = sum((r.transpose(1, 2) @ r) for r in (flows.metrics.output.sampled_fisher_rows(y, 50, s)
                                                 for s in range(40))) / 40
    assert torch.allclose(mean, exact_m, atol=0.02)


@given(widths=st.lists(st.integers(1, 5), min_size=3, max_size=4), b=st.integers(1, 4), seed=st.integers(0, 500),
       mu=st.floats(1e-2, 10.0))
def test_primal_dual_structured_and_generic_paths_agree(widths, b, seed, mu):
    problem = _mlp_problem([3, *widths, 2], b=b, loss="cross_entropy", seed=seed)
    v = torch.randn(problem.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    reference = Layerwise(problem, mu=mu, solver="dual").solve(problem.theta0, v)
    for kwargs in ({"solver": "primal"}, {"structured": False}, {"structured": False, "solver": "primal"},
                   {"blocks": problem.blocks}):
        assert _rel(Layerwise(problem, mu=mu, **kwargs).solve(problem.theta0, v), reference) <= 1e-9


def test_fused_sweep_equals_solve_of_the_gradient_and_batches():
    problem = _mlp_problem([4, 6, 5, 3], b=5, loss="cross_entropy")
    metric = Layerwise(problem, mu=0.1)
    g = problem.grad(problem.theta0)
    assert _rel(metric.natural_direction(problem.theta0), metric.solve(problem.theta0, g)) <= 1e-12
    thetas = problem.theta0 + 0.1 * torch.randn(3, problem.num_params, dtype=torch.float64)
    together = metric.natural_direction(thetas)
    for i in range(3):
        assert _rel(together[i], metric.solve(thetas[i], problem.grad(thetas[i]))) <= 1e-12
    field = flows.rules.GradientFlow(problem, metric)
    assert torch.allclose(field(0.0, problem.theta0), -metric.solve(problem.theta0, g), rtol=1e-12)


def test_large_mu_is_the_scaled_gradient_and_the_metric_is_spd():
    problem = _mlp_problem([3, 5, 4, 2], b=4, loss="mse")
    g = problem.grad(problem.theta0)
    assert _rel(Layerwise(problem, mu=1e9).solve(problem.theta0, g), g / 1e9) <= 1e-7
    eig = torch.linalg.eigvalsh(Layerwise(problem, mu=0.05).matrix(problem.theta0))
    assert float(eig[0]) >= 0.05 * (1 - 1e-10)


def test_diagonal_mass_against_dense():
    problem = _mlp_problem([3, 4, 2], b=3, loss="mse")
    names = [b.name for b in problem.blocks]
    first = problem.blocks[0]
    mass = torch.linspace(0.1, 2.0, first.size, dtype=torch.float64)
    metric = Layerwise(problem, mu=0.5, mass={names[0]: mass})
    dense = dense_gauss_newton(problem, problem.theta0, 0.0, mse_loss)
    expected = block_diagonal_part(dense, [b.slice for b in problem.blocks])
    expected[first.slice, first.slice] += torch.diag(mass)
    expected[problem.blocks[1].slice, problem.blocks[1].slice] += 0.5 * torch.eye(problem.blocks[1].size,
                                                                                   dtype=torch.float64)
    v = torch.randn(problem.num_params, dtype=torch.float64)
    for solver in ("dual", "primal"):
        got = Layerwise(problem, mu=0.5, mass={names[0]: mass}, solver=solver).solve(problem.theta0, v)
        assert _rel(got, torch.linalg.solve(expected, v)) <= 1e-10
    assert torch.allclose(metric.matrix(problem.theta0), expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="unknown block 'nope'"):
        Layerwise(problem, mass={"nope": 1.0})


def _cascade_problem():
    """A three-stage saturating cascade (not a network): x → w₀x/(1 + w₁x²) + w₂ per stage, then a 2×2 mixing."""
    def saturate(x, w):
        return w[0] * x / (1 + w[1] * x**2) + w[2]

    def mix(x, w):
        return x @ w.reshape(2, 2).T

    model = Chain(Function(saturate, [1.5, 0.4, 0.1]), Function(mix, [1.0, 0.3, -0.2, 0.8]),
                  Function(saturate, [0.7, 0.9, -0.3]), Function(mix, [0.5, -0.4, 0.6, 1.1]))
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 2, generator=g, dtype=torch.float64) * 2
    return flows.Problem(model, "mse", (x, torch.randn(6, 2, generator=g, dtype=torch.float64)))


def test_function_chain_that_is_not_a_network():
    problem = _cascade_problem()
    assert [b.name for b in problem.blocks] == ["0", "1", "2", "3"]
    v = torch.randn(problem.num_params, dtype=torch.float64)
    expected, _ = _reference_solve(problem, 0.2, mse_loss, v)
    for solver in ("dual", "primal"):
        assert _rel(Layerwise(problem, mu=0.2, solver=solver).solve(problem.theta0, v), expected) <= 1e-10
    cs = costates(problem, problem.theta0)
    assert torch.allclose(torch.cat([c.grad for c in cs]), problem.grad(problem.theta0), rtol=1e-12, atol=1e-15)


def test_parallel_branches_get_their_own_blocks():
    model = Chain(Linear(4, 6), Tanh(), Parallel(Chain(Linear(3, 2), Tanh()), Linear(3, 3), split=[3, 3]), Tanh(),
                  Linear(5, 2))
    problem = flows.Problem(model, "mse", _data(4, 4, 2, False))
    metric = Layerwise(problem, mu=0.3)
    assert [name for name, _, _ in metric.blocks] == ["0", "2.branches.0.0", "2.branches.1", "4"]
    v = torch.randn(problem.num_params, dtype=torch.float64)
    expected, _ = _reference_solve(problem, 0.3, mse_loss, v, [sl for _, sl, _ in metric.blocks])
    assert _rel(metric.solve(problem.theta0, v), expected) <= 1e-10


@pytest.mark.parametrize("activation", [nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ReLU, flows.modules.Softplus])
def test_torch_sequential_converts_with_every_activation(activation):
    """σ' comes from the kept forward output (1 − y², y(1 − y), −expm1(−y), y > 0); against the dense blocks."""
    problem = _mlp_problem([4, 6, 5, 3], b=3, loss="mse", activation=activation)
    v = torch.randn(problem.num_params, dtype=torch.float64)
    expected, _ = _reference_solve(problem, 0.4, mse_loss, v)
    metric = Layerwise(problem, mu=0.4)
    assert _rel(metric.solve(problem.theta0, v), expected) <= 1e-10
    g = problem.grad(problem.theta0)
    assert _rel(metric.natural_direction(problem.theta0), _reference_solve(problem, 0.4, mse_loss, g)[0]) <= 1e-10


def test_costates_are_backprop():
    problem = _mlp_problem([4, 6, 5, 3], b=5, loss="cross_entropy")
    cs = costates(problem, problem.theta0)
    assert [c.name for c in cs] == ["0", "1", "2", "3", "4"]
    grads = torch.cat([c.grad for c in cs if c.grad is not None])
    assert torch.allclose(grads, problem.grad(problem.theta0), rtol=1e-12, atol=1e-15)
    # λ_a is ∂L/∂x_a: the costate at each module's output equals autograd's gradient w.r.t. that activation
    p = problem.unflatten(problem.theta0.clone().requires_grad_())
    F = torch.nn.functional
    h1 = F.linear(problem.inputs, p["0.weight"], p["0.bias"])
    a1 = torch.tanh(h1)
    h2 = F.linear(a1, p["2.weight"], p["2.bias"])
    a2 = torch.tanh(h2)
    y = F.linear(a2, p["4.weight"], p["4.bias"])
    activations = [h1, a1, h2, a2, y]
    expected = torch.autograd.grad(problem.loss_fn(y, problem.targets), activations)
    for c, e in zip(cs, expected):
        assert torch.allclose(c.costate, e, rtol=1e-12, atol=1e-15)


def test_diagnostics_report_inner_condition_rank_and_residual():
    problem = _mlp_problem([4, 6, 5, 3], b=3, loss="cross_entropy")
    metric = Layerwise(problem, mu=0.1)
    report = metric.diagnostics(problem.theta0)
    factors = metric.block_factors(problem.theta0)
    for row in report:
        k = factors[row["block"]]
        inner = torch.eye(k.shape[0], dtype=torch.float64) + k @ k.T / 0.1
        assert row["xi"] == pytest.approx(float(torch.linalg.cond(inner)), rel=1e-8)
        assert row["rank"] == 3 * 2  # softmax Fisher: C − 1 = 2 independent rows per sample, 3 samples
        assert row["residual"] <= 1e-10 * max(row["update_norm"], 1.0)


def test_block_diagonal_reference_and_kfac():
    problem = _mlp_problem([4, 6, 5, 3], b=4, loss="cross_entropy")
    v = torch.randn(problem.num_params, dtype=torch.float64)
    assert _rel(BlockDiagonal(problem, mu=0.2).solve(problem.theta0, v),
                Layerwise(problem, mu=0.2).solve(problem.theta0, v)) <= 1e-10
    kfac = KFAC(problem, damping=1e-2)
    assert _rel(kfac.solve(problem.theta0, v), torch.linalg.solve(kfac.matrix(problem.theta0), v)) <= 1e-10
    # with one sample the Kronecker factorisation is exact: K-FAC → the exact blocks as damping → 0
    single = flows.Problem(problem.model, "cross_entropy", (problem.inputs[:1], problem.targets[:1]))
    exact = BlockDiagonal(single, mu=1e-20).matrix(single.theta0)
    assert torch.allclose(KFAC(single, damping=1e-20).matrix(single.theta0), exact, atol=1e-8)


def test_module_retraction_keeps_a_sphere_parameter_on_its_manifold():
    from flows.modules import retraction, sphere_retract

    def rotate(x, w):  # a unit vector w parameterises a projection stage
        return (x @ w)[:, None] * w[None, :]

    w0 = torch.tensor([0.6, 0.8], dtype=torch.float64)
    model = Chain(Function(rotate, w0, retract=sphere_retract), Linear(2, 1))
    problem = flows.Problem(model, "mse", _data(5, 2, 1, False))
    step = -0.3 * problem.grad(problem.theta0)
    moved = retraction(problem)(problem.theta0, step)
    assert float(moved[:2].norm()) == pytest.approx(1.0, rel=1e-14)  # the sphere block stays on the sphere
    assert torch.equal(moved[2:], problem.theta0[2:] + step[2:])  # the Linear block moves in flat space


# -- the direction from the coefficients of the output gradient in the factor rows ----------------------------------
def _no_gradient_pass(monkeypatch):
    """Make every structured block gradient raise: a direction computed anyway came from K_aᵀc."""
    from flows.modules import conv, linear

    def refuse(*args, **kwargs):
        raise AssertionError("a block gradient was computed")

    monkeypatch.setattr(linear.LinearOps, "vjp_param", refuse)
    monkeypatch.setattr(conv.ConvOps, "vjp_param", refuse)


@pytest.mark.parametrize("loss,loss_fn", [("mse", mse_loss), ("cross_entropy", ce_loss)])
def test_direction_from_row_coefficients_needs_no_gradient_and_is_the_dense_solve(loss, loss_fn, monkeypatch):
    problem = _mlp_problem([5, 9, 8, 4], b=6, loss=loss)
    g = problem.grad(problem.theta0)
    expected, _ = _reference_solve(problem, 0.05, loss_fn, g)
    _no_gradient_pass(monkeypatch)
    for solver in ("dual", "primal"):
        metric = Layerwise(problem, mu=0.05, solver=solver)
        assert _rel(metric.natural_direction(problem.theta0), expected) <= 1e-10
    grouped = Layerwise(problem, mu=0.05, blocks=[["0.*", "2.*"], ["4.*"]])  # collected, not direct, blocks
    slices = [b.slice for b in problem.group_blocks([["0.*", "2.*"], ["4.*"]])]
    assert _rel(grouped.natural_direction(problem.theta0), _reference_solve(problem, 0.05, loss_fn, g, slices)[0]) \
        <= 1e-10


def test_gradient_outside_the_rows_span_falls_back_to_the_costate(monkeypatch):
    problem = _mlp_problem([4, 6, 5, 3], b=4, loss="cross_entropy")
    metric = Layerwise(problem, mu=0.2, output="sampled_fisher", probes=2, seed=3)
    g = problem.grad(problem.theta0)
    assert _rel(metric.natural_direction(problem.theta0), metric.solve(problem.theta0, g)) <= 1e-12
    _no_gradient_pass(monkeypatch)
    with pytest.raises(AssertionError, match="block gradient"):
        metric.natural_direction(problem.theta0)


def _confidently_wrong_problem(scale=2000.0):
    """Cross-entropy where a sample's probability of its true class underflows to 0, so c ∝ 1/√p is not finite."""
    sizes = [4, 6, 3]
    x, _ = _data(5, sizes[0], sizes[-1], True)
    problem = flows.Problem(flows.data.mlp(sizes, seed=0), "cross_entropy", (x, torch.zeros(5, dtype=torch.long)))
    theta = problem.theta0.clone()
    theta[problem.blocks[-1].slice] *= scale
    assert float(torch.softmax(problem.outputs(theta), -1)[:, 0].min()) == 0.0
    return problem, theta


def test_underflowed_probability_falls_back_to_the_costate(monkeypatch):
    problem, theta = _confidently_wrong_problem()
    metric = Layerwise(problem, mu=0.1)
    expected = metric.solve(theta, problem.grad(theta))
    assert bool(torch.isfinite(expected).all())
    assert _rel(metric.natural_direction(theta), expected) <= 1e-10
    _no_gradient_pass(monkeypatch)  # the costate route computes block gradients: proof that it was taken
    with pytest.raises(AssertionError, match="block gradient"):
        metric.natural_direction(theta)
    assert _rel(metric.natural_direction(problem.theta0), metric.solve(problem.theta0, problem.grad(problem.theta0))) \
        <= 1e-10  # at θ₀ no probability underflows: the coefficient route


def test_coefficients_that_need_cancellation_are_refused():
    from flows.metrics.output import coefficients_reproduce
    rows = torch.tensor([[[1.0, 0.0], [1.0, 1e-8]]], dtype=torch.float64)  # (B, R, C) = (1, 2, 2)
    lam = torch.tensor([[0.0, 1e-8]], dtype=torch.float64)
    assert not bool(coefficients_reproduce(rows, torch.tensor([[-1.0, 1.0]], dtype=torch.float64), lam))
    assert bool(coefficients_reproduce(rows, torch.tensor([[-1.0, 1.0]], dtype=torch.float64), lam, limit=1e9))
    plain = torch.tensor([[[1.0, 0.0], [0.0, 1e-8]]], dtype=torch.float64)
    assert bool(coefficients_reproduce(plain, torch.tensor([[0.0, 1.0]], dtype=torch.float64), lam))
    assert not bool(coefficients_reproduce(plain, torch.tensor([[0.0, 1.1]], dtype=torch.float64), lam))


def test_ensemble_with_one_amplified_member_uses_the_costate_for_all():
    problem, bad = _confidently_wrong_problem()
    metric = Layerwise(problem, mu=0.1)
    thetas = torch.stack([problem.theta0, bad, problem.theta0 + 0.05])
    together = metric.natural_direction(thetas)
    for i in range(3):
        assert _rel(together[i], metric.solve(thetas[i], problem.grad(thetas[i]))) <= 1e-10


@given(b=st.integers(1, 5), c=st.integers(2, 6), seed=st.integers(0, 10_000), soft=st.booleans())
def test_fisher_coefficients_reproduce_the_cross_entropy_gradient(b, c, seed, soft):
    from flows.metrics.output import coefficients_reproduce, fisher_rows, gradient_coefficients
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(b, c, generator=g, dtype=torch.float64)
    t = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64), -1) if soft else \
        torch.nn.functional.one_hot(torch.randint(0, c, (b,), generator=g), c).double()
    lam = torch.func.grad(lambda y: -(t * torch.log_softmax(y, -1)).sum() / b)(logits)  # autograd, not the library
    coef = gradient_coefficients("fisher", logits, lam)
    rows = fisher_rows(logits)
    assert torch.allclose(torch.einsum("br,brk->bk", coef, rows), lam, rtol=0, atol=1e-12 * float(lam.abs().max()))
    assert bool(coefficients_reproduce(rows, coef, lam))
    shifted = lam + 0.1 / b  # no longer sums to zero over the classes: outside the rows' span
    assert not bool(coefficients_reproduce(rows, gradient_coefficients("fisher", logits, shifted), shifted))


@given(b=st.integers(1, 4), c=st.integers(2, 7), seed=st.integers(0, 10_000))
def test_reduced_fisher_rows_factor_the_softmax_fisher_exactly(b, c, seed):
    from flows.metrics.output import reduced_fisher_rows
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(b, c, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    fisher = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / b
    rows = reduced_fisher_rows(logits)
    assert rows.shape == (b, c - 1, c)
    assert torch.allclose(rows.transpose(1, 2) @ rows, fisher, rtol=0, atol=1e-14)
    t = torch.randint(0, c, (b,), generator=g)
    lam = (p - torch.nn.functional.one_hot(t, c).double()) / b
    rows_, coef = reduced_fisher_rows(logits, lam)
    assert torch.equal(rows_, rows)
    assert torch.allclose(torch.einsum("br,brk->bk", coef, rows), lam, rtol=0, atol=1e-13)
