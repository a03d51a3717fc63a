"""Stop events for :func:`flows.simulate`.

An event is a function ``g(t, θ)`` (a scalar or a tensor); the solve stops at the first time any component of
g changes sign, located by torchdiffeq's ``odeint_event``. Events that need the loss are written against a
problem, which simulate supplies from the field (``field.problem``).
"""

from __future__ import annotations

import torch


class Event:
    """An event g(t, θ); ``needs_problem`` events are bound to a problem by simulate before use."""

    needs_problem = False

    def __init__(self, fn=None, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "event")

    def bind(self, problem) -> Event:
        return self

    def __call__(self, t: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return self.fn(t, theta)

    def describe(self) -> str:
        return self.name


class _LossEvent(Event):
    needs_problem = True

    def __init__(self, level: float, problem=None):
        super().__init__(name=f"loss_below({level:g})")
        self.level = float(level)
        self.problem = problem

    def bind(self, problem) -> Event:
        if problem is None:
            raise ValueError(f"{self.name} needs a field with a .problem (e.g. flows.rules.GradientFlow)")
        return _LossEvent(self.level, problem)

    def __call__(self, t, theta):
        return self.problem.loss(theta) - self.level


def loss_below(level: float) -> Event:
    """Stop when L(θ) falls to ``level`` (for an ensemble: when the first member does)."""
    return _LossEvent(level)


def as_event(event) -> Event | None:
    if event is None or isinstance(event, Event):
        return event
    if callable(event):
        return Event(event)
    raise TypeError(f"event must be callable (t, theta) -> tensor, got {type(event).__name__}")
