"""riemannian-flows: learning as continuous-time dynamics.

    problem (model + loss + data) → rule (vector field) ← metric → simulate (torchdiffeq) → Trajectory

The public API is re-exported here; see the README for a tour.
"""

from flows import action, contraction, data, discrete, events, metrics, modules, natural, plot, rules, sde, sweep
from flows.errors import FlowDivergedError, NotEffectiveError
from flows.iterate import iterate
from flows.problem import Block, Problem
from flows.sde import simulate_sde
from flows.simulate import simulate
from flows.trajectory import Trajectory

__all__ = [
    "action",
    "contraction",
    "Block",
    "FlowDivergedError",
    "NotEffectiveError",
    "Problem",
    "Trajectory",
    "data",
    "discrete",
    "events",
    "iterate",
    "metrics",
    "modules",
    "natural",
    "plot",
    "rules",
    "sde",
    "simulate",
    "simulate_sde",
    "sweep",
]
