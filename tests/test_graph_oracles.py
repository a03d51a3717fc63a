"""Layerwise on module graphs against the dense oracle (MATH.md §2.4): for each architecture, Layerwise.solve equals
the dense solve with the exact diagonal blocks of μI + JᵀM_oJ, where J is autograd's dense Jacobian of the outputs
and M_o the output Hessian of the loss — nothing from the library's sweep."""

import pytest
import torch
from conftest import block_diagonal_part, ce_loss, dense_gauss_newton, mse_loss
from torch import nn

import flows
from flows.metrics import Layerwise

F64 = torch.float64


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1, dtype=F64)
        self.conv2 = nn.Conv2d(2, 2, 3, stride=2, dtype=F64)
        self.head = nn.Linear(8, 3, dtype=F64)

    def forward(self, x):
        h = torch.tanh(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        return self.head(h.flatten(1))


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4, dtype=F64)
        self.res = nn.Linear(4, 4, dtype=F64)
        self.out = nn.Linear(4, 3, dtype=F64)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.res(h))
        return self.out(h)


class Concat(nn.Module):
    """Two branches of the same input merged by concatenation."""

    def __init__(self):
        super().__init__()
        self.left = nn.Linear(3, 2, dtype=F64)
        self.right = nn.Sequential(nn.Linear(3, 3, dtype=F64), nn.Sigmoid())
        self.out = nn.Linear(5, 3, dtype=F64)

    def forward(self, x):
        return self.out(torch.cat([torch.tanh(self.left(x)), self.right(x)], dim=-1))


class Normalised(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4, dtype=F64)
        self.norm = nn.LayerNorm(4, dtype=F64)
        self.out = nn.Linear(4, 3, dtype=F64)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(2, 4, dtype=F64)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True, dtype=F64)
        self.out = nn.Linear(4, 3, dtype=F64)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out((h + a).mean(dim=1))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3, dtype=F64)
        self.out = nn.Linear(6, 3, dtype=F64)

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens)).flatten(1))


def _inputs(name, b, g):
    if name == "cnn":
        return torch.randn(b, 1, 5, 5, generator=g, dtype=F64)
    if name == "attention":
        return torch.randn(b, 3, 2, generator=g, dtype=F64)
    if name == "embedding":
        return torch.randint(0, 5, (b, 2), generator=g)
    return torch.randn(b, 3, generator=g, dtype=F64)


MODELS = {"cnn": TwoConv, "residual": ResidualMLP, "concat": Concat, "layernorm": Normalised,
          "attention": Attention, "embedding": Tokens}
BLOCKS = {"cnn": ["conv1", "conv2", "head"], "residual": ["inp", "res", "out"], "concat": ["left", "right.0", "out"],
          "layernorm": ["inp", "norm", "out"], "attention": ["inp", "attn", "attn.out_proj", "out"],
          "embedding": ["emb", "out"]}


def _problem(name, loss, b=3, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name]()
    with torch.no_grad():  # move LayerNorm's affine parameters away from their (1, 0) initial values
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed + 1)
    x = _inputs(name, b, g)
    t = torch.randint(0, 3, (b,), generator=g) if loss == "cross_entropy" else torch.randn(b, 3, generator=g, dtype=F64)
    return flows.Problem(model, loss, (x, t))


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("loss,loss_fn", [("mse", mse_loss), ("cross_entropy", ce_loss)])
def test_layerwise_solve_is_the_dense_solve_with_the_exact_diagonal_blocks(name, loss, loss_fn):
    problem = _problem(name, loss)
    assert [b.name for b in problem.blocks] == BLOCKS[name]
    mu = 0.2
    theta = problem.theta0
    dense = dense_gauss_newton(problem, theta, mu, loss_fn)
    blocks = block_diagonal_part(dense, [b.slice for b in problem.blocks])
    v = torch.randn(problem.num_params, dtype=F64, generator=torch.Generator().manual_seed(7))
    expected = torch.linalg.solve(blocks, v)
    metric = Layerwise(problem, mu=mu)
    assert metric.describe()["blocks"] == BLOCKS[name]
    assert _rel(metric.solve(theta, v), expected) <= 1e-10
    for kwargs in ({"solver": "primal"}, {"solver": "dual"}):
        assert _rel(Layerwise(problem, mu=mu, **kwargs).solve(theta, v), expected) <= 1e-10
    # the full GGN differs: the blocks are not the whole metric (off-diagonal coupling is real)
    assert _rel(torch.linalg.solve(dense, v), expected) > 1e-3
    # the fused sweep (costate riding with the factor rows) is the solve of the gradient
    g = problem.grad(theta)
    assert _rel(metric.natural_direction(theta), torch.linalg.solve(blocks, g)) <= 1e-10
