"""Exceptions raised by flows.

Each carries what a user needs to keep working: a diverged simulation keeps its trajectory up to the
last finite state, so nothing computed before the blow-up is lost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from flows.trajectory import Trajectory


class FlowDivergedError(RuntimeError):
    """The vector field returned a non-finite value during a solve.

    Attributes:
        t: solver time of the last finite state.
        theta: the last finite state (a tensor of the state's shape).
        trajectory: the partial :class:`flows.Trajectory` recorded up to that state.
        bad_time: the time at which the non-finite value appeared.
    """

    def __init__(
        self,
        message: str,
        *,
        t: float,
        theta: torch.Tensor,
        trajectory: Trajectory,
        bad_time: float,
    ):
        super().__init__(message)
        self.t = t
        self.theta = theta
        self.trajectory = trajectory
        self.bad_time = bad_time


class NotEffectiveError(ValueError):
    """A learning rule does not decrease the loss (angle to −∇L at or above 90°).

    Attributes:
        t: the time at which the rule stopped being effective (None for a single update).
        angle: the angle ψ between the update and −∇L, in degrees.
    """

    def __init__(self, message: str, *, t: float | None = None, angle: float | None = None):
        super().__init__(message)
        self.t = t
        self.angle = angle
