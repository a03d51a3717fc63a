"""Discrete learning updates for :func:`flows.iterate`: gradient descent / minibatch SGD, heavy-ball momentum, Adam
and natural-gradient descent (MATH.md §6).

An update is a small object with explicit state (the optax pattern). The protocol that :func:`flows.iterate`
relies on, and that a user's own update implements:

    problem                                  the :class:`flows.Problem` it trains
    init(theta0) -> state                    the optimiser state before the first step (any object, may be None)
    step(theta, state, gradient, lr) -> (theta, state)
                                             one step; ``gradient(θ)`` returns the gradient of this step's
                                             minibatch loss L_B at any θ (the full-batch ∇L without batch_size),
                                             ``gradient.indices`` the minibatch (None for the full batch)
    describe() -> dict                       JSON-serialisable description, stored in the trajectory's metadata

``step`` must not modify θ in place (the trajectory keeps references to the recorded states). θ may be a single
vector (N,) or an ensemble (E, N); all members then see the same minibatches.

Minibatches come from :func:`minibatches`: sampling without replacement, one seeded permutation per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from flows.metrics import Euclidean, Metric
from flows.problem import Problem

__all__ = ["Update", "GD", "SGD", "Momentum", "HeavyBallMomentum", "Adam", "NaturalGradientDescent", "Gradient",
           "minibatches"]


def _check_problem(problem) -> Problem:
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a flows.Problem, got {type(problem).__name__}")
    return problem


def _unit_interval(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


class Gradient:
    """The gradient oracle handed to ``Update.step``: ``gradient(θ)`` = ∇L_B(θ) on the current minibatch
    ``indices`` (the full batch when None). Counts its evaluations in ``calls``."""

    __slots__ = ("problem", "indices", "calls")

    def __init__(self, problem: Problem, indices=None):
        self.problem = problem
        self.indices = indices
        self.calls = 0

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.problem.grad(theta, self.indices)

    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_B(θ), ∇L_B(θ)) from one forward and one backward pass."""
        self.calls += 1
        return self.problem.value_and_grad(theta, self.indices)


class Update:
    """Base class of the built-in updates (a user's update only needs the protocol in the module docstring)."""

    problem: Problem
    metric: Metric | None = None

    def init(self, theta0: torch.Tensor):
        return None

    def step(self, theta, state, gradient, lr: float):  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": type(self).__name__}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({fields})"


class GD(Update):
    """Gradient descent θ_{k+1} = θ_k − η ∇L(θ_k); with ``iterate(..., batch_size=b)`` it is minibatch SGD,
    θ_{k+1} = θ_k − η ∇L_{B_k}(θ_k). Read at t_k = kη it follows the gradient flow θ̇ = −∇L to first order in η and
    the modified flow :class:`flows.rules.ModifiedGradientFlow` to second (MATH.md §6). Cost per step: one gradient.
    """

    def __init__(self, problem: Problem):
        self.problem = _check_problem(problem)

    def step(self, theta, state, gradient, lr):
        return theta - lr * gradient(theta), state


SGD = GD  #: minibatch SGD is :class:`GD` run with ``batch_size``


class Momentum(Update):
    """Heavy-ball momentum (Polyak 1964), in PyTorch's form

        v_{k+1} = β v_k + g_k,    θ_{k+1} = θ_k − η v_{k+1},    v_0 = 0,

    which is Polyak's θ_{k+1} = θ_k − η g_k + β (θ_k − θ_{k−1}) (θ_{−1} = θ_0). Read at t = kη, its second-order
    continuous model is ηθ̈ + (1 − β)θ̇ = −∇L — the heavy-ball ODE of :class:`flows.rules.HeavyBall` with friction
    γ = (1 − β)/η and the force scaled by 1/η; as η → 0 at fixed β it follows θ̇ = −∇L/(1 − β) (an effective step
    η/(1 − β)). State: v. Cost per step: one gradient.
    """

    def __init__(self, problem: Problem, beta: float = 0.9):
        self.problem = _check_problem(problem)
        self.beta = _unit_interval(beta, "beta")

    def init(self, theta0):
        return torch.zeros_like(theta0)

    def step(self, theta, velocity, gradient, lr):
        velocity = self.beta * velocity + gradient(theta)
        return theta - lr * velocity, velocity

    def describe(self):
        return {"name": "Momentum", "beta": self.beta}


HeavyBallMomentum = Momentum


class Adam(Update):
    """Adam (Kingma & Ba 2015, Algorithm 1), with bias correction:

        m_k = β₁ m_{k−1} + (1 − β₁) g_k,    s_k = β₂ s_{k−1} + (1 − β₂) g_k²,    m_0 = s_0 = 0,
        m̂_k = m_k / (1 − β₁ᵏ),   ŝ_k = s_k / (1 − β₂ᵏ),   θ_k = θ_{k−1} − η m̂_k / (√ŝ_k + ε),

    k = 1, 2, … counting steps. State: (m, s, k). Cost per step: one gradient and O(N) elementwise work. The
    continuous-time counterpart is :class:`flows.rules.AdamFlow`.
    """

    def __init__(self, problem: Problem, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.problem = _check_problem(problem)
        self.beta1 = _unit_interval(beta1, "beta1")
        self.beta2 = _unit_interval(beta2, "beta2")
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not (0 <= eps < math.inf):
            raise ValueError(f"eps must be a finite number ≥ 0, got {eps!r}")
        self.eps = float(eps)

    def init(self, theta0):
        return torch.zeros_like(theta0), torch.zeros_like(theta0), 0

    def step(self, theta, state, gradient, lr):
        m, s, k = state
        g = gradient(theta)
        k += 1
        m = self.beta1 * m + (1 - self.beta1) * g
        s = self.beta2 * s + (1 - self.beta2) * g * g
        m_hat = m / (1 - self.beta1**k)
        s_hat = s / (1 - self.beta2**k)
        return theta - lr * m_hat / (s_hat.sqrt() + self.eps), (m, s, k)

    def describe(self):
        return {"name": "Adam", "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}


class NaturalGradientDescent(Update):
    """Natural-gradient (preconditioned) descent θ_{k+1} = θ_k − η G(θ_k)⁻¹ g_k under any :mod:`flows.metrics`
    metric, through ``metric.solve``; g_k the (minibatch) gradient. With :class:`flows.metrics.Euclidean` it is
    :class:`GD`. Stable on a quadratic iff η < 2/λ_max(G⁻¹H) (see :func:`flows.contraction.sharpness`). Cost per
    step: one gradient and one metric solve (a curvature metric built on a fixed ``metric_batch`` keeps that batch;
    only the gradient is a minibatch one).
    """

    def __init__(self, problem: Problem, metric: Metric | None = None):
        self.problem = _check_problem(problem)
        self.metric = Euclidean() if metric is None else metric
        if not callable(getattr(self.metric, "solve", None)):
            raise TypeError(f"metric must be a flows metric with solve(θ, v) = G(θ)⁻¹v, got "
                            f"{type(self.metric).__name__}")

    def step(self, theta, state, gradient, lr):
        return theta - lr * self.metric.solve(theta, gradient(theta)), state

    def describe(self):
        describe = getattr(self.metric, "describe", None)
        return {"name": "NaturalGradientDescent",
                "metric": describe() if callable(describe) else type(self.metric).__name__}


def minibatches(num_samples: int, batch_size: int, seed: int = 0, device=None) -> Iterator[torch.Tensor]:
    """Endless minibatch index tensors: sampling without replacement, epoch by epoch.

    Each epoch draws one permutation of 0…n−1 from a ``torch.Generator`` seeded with ``seed`` (one generator for the
    whole run, so epoch e's permutation is the e-th draw) and cuts it into consecutive batches of ``batch_size``;
    when b does not divide n, the epoch's last batch holds the n mod b remaining samples, so every epoch visits
    every sample exactly once (an epoch is ⌈n/b⌉ steps). The same seed gives the same sequence.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= num_samples:
        raise ValueError(f"batch_size must be an integer in 1…{num_samples} (the number of samples), got "
                         f"{batch_size!r}")
    generator = torch.Generator().manual_seed(int(seed))
    while True:
        order = torch.randperm(num_samples, generator=generator)
        if device is not None:
            order = order.to(device)
        yield from order.split(batch_size)
