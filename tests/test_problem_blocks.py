"""Problem's blocks: shared parameters are refused unless blocks are given; blocks= groups by names and patterns."""

import pytest
import torch
from torch import nn

import flows
from flows.problem import shared_parameters


class Tied(nn.Module):
    """A token model whose output layer reuses the embedding matrix (tied weights)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3, dtype=torch.float64)
        self.mid = nn.Linear(3, 3, dtype=torch.float64)
        self.head = nn.Linear(3, 5, bias=False, dtype=torch.float64)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mid(self.emb(tokens))))


def _tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 5, (4,), generator=g), torch.randint(0, 5, (4,), generator=g)


def test_shared_parameters_are_refused_unless_blocks_are_given():
    model = Tied()
    assert shared_parameters(model) == {"emb.weight": ["emb.weight", "head.weight"]}
    with pytest.raises(ValueError, match=r"shares parameters between modules \(emb.weight = head.weight\)"):
        flows.Problem(model, "cross_entropy", _tokens())
    problem = flows.Problem(model, "cross_entropy", _tokens(), blocks=[["emb", "head"], "mid"])
    assert [(b.name, b.start, b.stop, b.param_names) for b in problem.blocks] == [
        ("emb|head", 0, 15, ("emb.weight",)), ("mid", 15, 27, ("mid.weight", "mid.bias"))]
    # the same module registered under two names is sharing too
    lin = nn.Linear(2, 2)
    assert shared_parameters(nn.Sequential(lin, nn.Tanh(), lin)) == {"0.weight": ["0.weight", "2.weight"],
                                                                     "0.bias": ["0.bias", "2.bias"]}


def test_blocks_by_name_glob_and_mapping():
    model = flows.data.mlp([3, 4, 2])
    data = (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    problem = flows.Problem(model, "mse", data, blocks={"first": "0", "w": "2.weight", "b": "2.b*"})
    assert [(b.name, b.start, b.stop) for b in problem.blocks] == [("first", 0, 16), ("w", 16, 24), ("b", 24, 26)]
    assert [b.name for b in flows.Problem(model, "mse", data, blocks=problem.blocks).blocks] == ["first", "w", "b"]


@pytest.mark.parametrize("spec,message", [
    (["0"], r"parameters \['2.weight', '2.bias'\] belong to no block"),
    (["0", "2", "*"], "matched by two blocks"),
    ({"x": "nope"}, "matches no parameter"),
    (["*.weight", "*.bias"], "is not contiguous in θ"),
    ("0", "must be a non-empty list"),
])
def test_bad_block_specifications_are_named(spec, message):
    model = flows.data.mlp([3, 4, 2])
    data = (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    with pytest.raises((ValueError, TypeError), match=message):
        flows.Problem(model, "mse", data, blocks=spec)
