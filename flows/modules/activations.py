"""Elementwise activations as modules: A = diag σ'(x), no parameters (MATH.md §2.2: "elementwise activations fold
diag(σ') into the factor rows"). Cost of a factor-row product: O(B·R·width)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# σ' from the activation's output y = σ(x), in the same arithmetic as from x (1 − tanh², sigmoid·(1 − sigmoid));
# softplus' = sigmoid(x) = −expm1(−y), accurate where y is tiny (1 − e^{−y} would cancel)
FROM_OUTPUT: dict[str, Callable] = {
    "tanh": lambda y: 1 - y**2,
    "sigmoid": lambda y: y * (1 - y),
    "softplus": lambda y: -torch.expm1(-y),
    "relu": lambda y: (y > 0).to(y.dtype),
}

ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "tanh": (torch.tanh, lambda x: 1 - torch.tanh(x) ** 2),
    "sigmoid": (torch.sigmoid, lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x))),
    "softplus": (F.softplus, torch.sigmoid),
    "relu": (torch.relu, lambda x: (x > 0).to(x.dtype)),
}

# torch modules and functions that are one of ACTIVATIONS exactly (Softplus only with its default beta/threshold)
TORCH_MODULES = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.Softplus: "softplus"}
TORCH_FUNCTIONS = {torch.tanh: "tanh", torch.sigmoid: "sigmoid", torch.relu: "relu", F.relu: "relu",
                   F.tanh: "tanh", F.sigmoid: "sigmoid"}


class Activation(nn.Module):
    """An elementwise activation σ; its input Jacobian is diag σ'(x). One of ``ACTIVATIONS``."""

    def __init__(self, name: str):
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
        self.name = name

    def forward(self, x):
        return ACTIVATIONS[self.name][0](x)

    def derivative(self, x):
        return ACTIVATIONS[self.name][1](x)

    def extra_repr(self):
        return self.name


def Tanh() -> Activation:  # noqa: N802 - reads like the layer it makes
    return Activation("tanh")


def Sigmoid() -> Activation:  # noqa: N802
    return Activation("sigmoid")


def Softplus() -> Activation:  # noqa: N802
    return Activation("softplus")


def ReLU() -> Activation:  # noqa: N802
    return Activation("relu")


def activation_name(module: nn.Module) -> str | None:
    """The ACTIVATIONS name of a module that computes exactly that activation, else None."""
    if isinstance(module, Activation):
        return module.name
    name = TORCH_MODULES.get(type(module))
    if name == "softplus" and not (module.beta == 1 and module.threshold >= 20):
        return None
    if name == "relu" and module.inplace:
        return None
    return name


class ActivationOps:
    """Rows through an elementwise activation: rows · diag σ'(x), with σ' from the output the forward pass kept
    (``FROM_OUTPUT``), so σ is not evaluated again."""

    structured = True
    uses_output = True  # the sweep passes the node's forward output to pull

    def __init__(self, name: str):
        self.name = name
        self.fn, self.derivative = ACTIVATIONS[name]

    def forward(self, p, ins):
        return self.fn(ins[0])

    def pull(self, p, ins, rows, want, output=None):
        if not want[0]:
            return [None], None
        d = self.derivative(ins[0]) if output is None else FROM_OUTPUT[self.name](output)
        if rows.dim() > 3 and rows.stride(2) == 1 and d.stride(1) != 1:
            # rows with channels innermost (a convolution's pull): σ' in the same layout, so the product streams
            d = d.movedim(1, -1).contiguous().movedim(-1, 1)
        return [rows * d[:, None]], None
