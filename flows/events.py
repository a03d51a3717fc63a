"""Stop events for :func:`flows.simulate`.

An event is a function ``g(t, θ)`` (a scalar or a tensor); the solve stops at the first time any component of
g changes sign, located by torchdiffeq's ``odeint_event``. Events that need the loss are written against a
problem, which simulate supplies from the field (``field.problem``).
"""

from __future__ import annotations

import torch


class Event:
    """An event g(t, θ); ``needs_problem`` events are bound to a problem by simulate before use.

    A run whose initial state already satisfies the event (:meth:`satisfied`) stops at t0 with one state.
    """

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

    def reading(self, transform) -> Event:
        """The same event evaluated on ``transform(state)`` (θ read out of a larger solver state)."""
        wrapped = Event(lambda t, state: self(t, transform(state)), name=self.describe())
        wrapped.satisfied = self.satisfied
        return wrapped

    def satisfied(self, value: torch.Tensor) -> torch.Tensor:
        """Whether the event holds already (then a run starting there stops at once): some component of g is
        exactly zero. Events with a direction (such as :func:`loss_below`) hold on one side of zero."""
        return (torch.as_tensor(value) == 0).any()


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

    def satisfied(self, value):
        return (torch.as_tensor(value) <= 0).any()


def loss_below(level: float) -> Event:
    """Stop when L(θ) falls to ``level`` (for an ensemble: when the first member does)."""
    return _LossEvent(level)


def as_event(event) -> Event | None:
    if event is None or isinstance(event, Event):
        return event
    if callable(event):
        return Event(event)
    raise TypeError(f"event must be callable (t, theta) -> tensor, got {type(event).__name__}")
