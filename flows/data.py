"""Bundled data: scikit-learn's digits (shipped inside the package, no download) and small synthetic sets."""

from __future__ import annotations

import torch
from torch import nn


def digits(n: int | None = None, *, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1 797 8×8 handwritten digits of scikit-learn (bundled), pixels scaled to [0, 1].

    Returns ``(inputs, labels)``: inputs (n, 64) of ``dtype``, integer labels (n,) in 0…9. With ``n``, a
    fixed random subset of n samples drawn with ``seed``.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    inputs = torch.as_tensor(x, dtype=dtype) / 16.0
    labels = torch.as_tensor(y, dtype=torch.long)
    if n is not None:
        if not 1 <= n <= len(labels):
            raise ValueError(f"n must be between 1 and {len(labels)}, got {n}")
        idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
        inputs, labels = inputs[idx], labels[idx]
    return inputs, labels


def mlp(sizes: list[int] | tuple[int, ...], *, activation: type[nn.Module] = nn.Tanh, seed: int = 0,
        dtype=torch.float64) -> nn.Sequential:
    """A fully connected network ``sizes[0] → … → sizes[-1]`` with ``activation`` between layers.

    Weights use torch's default initialisation under a fixed seed, so one seed gives one θ₀.
    """
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive layer widths, got {list(sizes)}")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(int(fan_in), int(fan_out), dtype=dtype))
            if i < len(sizes) - 2:
                layers.append(activation())
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(gen_state)


class ParameterModel(nn.Module):
    """A "model" whose output is its own parameter vector θ (one row per input): turns any loss of θ into a
    :class:`flows.Problem`."""

    def __init__(self, theta0):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta0, dtype=torch.float64).reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(x.shape[0], -1)


def function_problem(loss_of_theta, theta0, *, name: str | None = None, dtype=torch.float64):
    """The problem L(θ) = ``loss_of_theta(θ)`` for any differentiable function of a flat vector (2-D loss
    landscapes, synthetic test functions). ``loss_of_theta`` must be written with torch operations."""
    from flows.problem import Problem

    def loss(output, target):
        return loss_of_theta(output[0])

    loss.__name__ = name or getattr(loss_of_theta, "__name__", "function")
    theta0 = torch.as_tensor(theta0, dtype=torch.float64).reshape(-1)
    return Problem(ParameterModel(theta0), loss, (torch.zeros(1, 1), torch.zeros(1, 1)), dtype=dtype)


def quadratic(A, theta0, *, dtype=torch.float64):
    """The problem L(θ) = ½ θᵀAθ (A symmetric), whose gradient flows have closed forms (MATH.md §1).

    Under a constant metric M the flow is θ(t) = exp(−M⁻¹A t) θ₀.
    """
    A = torch.as_tensor(A, dtype=torch.float64)

    def quadratic_loss(theta):
        return 0.5 * theta @ A.to(theta) @ theta

    return function_problem(quadratic_loss, theta0, dtype=dtype)


def teacher_student(n: int = 512, sizes=(10, 20, 5), *, noise: float = 0.0, seed: int = 0, dtype=torch.float64):
    """Regression data from a random teacher network: inputs x ~ N(0, I), targets = teacher(x) + noise·ε.

    ``sizes`` are the teacher's layer widths (tanh hidden layers). Returns (inputs, targets).
    """
    gen = torch.Generator().manual_seed(seed)
    teacher = mlp(sizes, seed=seed + 1, dtype=dtype)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(2.0)  # a teacher well outside the linear regime
        x = torch.randn(n, sizes[0], generator=gen, dtype=dtype)
        y = teacher(x) + noise * torch.randn(n, sizes[-1], generator=gen, dtype=dtype)
    return x, y
