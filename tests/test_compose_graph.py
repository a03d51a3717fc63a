"""flows.contraction.compose over the blocks of a module graph, against a dense computation from scratch."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev

import flows
from flows.contraction import compose, lognorm
from flows.metrics import Euclidean, Layerwise
from flows.rules import GradientFlow


class Residual(nn.Module):
    """y = b(x + tanh(a(x))): a skip connection around the first layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3, dtype=torch.float64)
        self.b = nn.Linear(3, 2, dtype=torch.float64)

    def forward(self, x):
        return self.b(x + torch.tanh(self.a(x)))


def _residual_problem():
    torch.manual_seed(4)
    model = Residual()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    return flows.Problem(model, "mse", (x, torch.randn(6, 2, generator=g, dtype=torch.float64)))


def _dense_gamma(J, slices, thetas):
    """Γ from its definition, with Θ_i the given block factors (M_i = Θ_iᵀΘ_i)."""
    k = len(slices)
    gamma = torch.zeros(k, k, dtype=torch.float64)
    for i, si in enumerate(slices):
        for j, sj in enumerate(slices):
            block = thetas[i] @ J[si, sj] @ torch.linalg.inv(thetas[j])
            gamma[i, j] = (torch.linalg.eigvalsh(0.5 * (block + block.T))[-1] if i == j
                           else torch.linalg.svdvals(block)[0])
    return gamma


def test_compose_of_a_residual_net_from_its_module_graph_matches_a_dense_computation():
    problem = _residual_problem()
    theta = problem.theta0
    names = [n for n, _ in problem.model.named_parameters()]
    shapes = [p.shape for _, p in problem.model.named_parameters()]

    def loss(th):  # the training loss written out, independent of the library's Problem
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = th[offset:offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        y = functional_call(problem.model, params, (problem.inputs,))
        return 0.5 * ((y - problem.targets) ** 2).sum() / y.shape[0]

    J = jacrev(lambda th: -grad(loss)(th))(theta)  # Jacobian of the Euclidean gradient flow
    slices = [slice(0, 12), slice(12, 20)]  # a.weight, a.bias | b.weight, b.bias
    expected = _dense_gamma(J, slices, [torch.eye(12, dtype=torch.float64), torch.eye(8, dtype=torch.float64)])
    field = GradientFlow(problem, Euclidean())
    graph = flows.modules.read(problem.model)
    for blocks in (None, graph):
        result = compose(field, theta, blocks=blocks)
        assert result.blocks == ["a", "b"]
        assert torch.allclose(result.gamma, expected, rtol=1e-9, atol=1e-12)
        # the skip connection couples both ways: not a cascade, and the bound holds for μ₂(J)
        assert not result.cascade
        assert result.bound >= float(lognorm(J, 2)) - 1e-10
    assert result.gamma[0, 1] > 0 and result.gamma[1, 0] > 0


def test_compose_in_the_layerwise_metric_of_the_flow_bounds_its_lognorm():
    problem = _residual_problem()
    theta = problem.theta0
    metric = Layerwise(problem, mu=0.3)
    field = GradientFlow(problem, metric)
    result = compose(field, theta, metrics="field")
    assert result.blocks == [name for name, *_ in metric.blocks]
    J = jacrev(lambda th: field(0.0, th))(theta)
    G = metric.matrix(theta)
    slices = [slice(0, 12), slice(12, 20)]
    thetas = [torch.linalg.cholesky(G[sl, sl]).T for sl in slices]
    assert torch.allclose(result.gamma, _dense_gamma(J, slices, thetas), rtol=1e-8, atol=1e-10)
    # μ_{2,M}(J) ≤ λ_max(sym Γ) with M = blockdiag(G_a), the composition theorem (MATH.md §5)
    theta_full = torch.block_diag(*thetas)
    weighted = theta_full @ J @ torch.linalg.inv(theta_full)
    assert float(torch.linalg.eigvalsh(0.5 * (weighted + weighted.T))[-1]) <= result.bound + 1e-10


def test_compose_refuses_unknown_metric_names():
    problem = _residual_problem()
    with pytest.raises(ValueError, match="metrics must be"):
        compose(GradientFlow(problem, Euclidean()), problem.theta0, metrics="natural")
