"""The action principle of learning (MATH.md §3).

For a path θ(t), t ∈ [0, T], and a metric G:

    S[θ] = ∫ ( ½ θ̇ᵀGθ̇ + ½ ∇LᵀG⁻¹∇L ) dt = ∫ ½‖θ̇ + G⁻¹∇L‖²_G dt + L(θ(0)) − L(θ(T))

so S ≥ L(0) − L(T), with equality exactly on the G-gradient flow (De Giorgi's energy-dissipation principle).
The gap Δ = S − (L(0) − L(T)) measures how far a rule is from steepest descent in the geometry G.

Three ways to measure a trajectory, from most to least accurate:

- ``simulate(..., action=G)`` accumulates the integrands as extra state inside the same solve, under the
  solver's own error control (:class:`ActionIntegrand`);
- ``action(traj, G, field=f)``: Gauss–Legendre quadrature on each output interval over the cubic Hermite
  interpolant of θ, with θ̇ = f(t, θ) at the nodes;
- ``action(traj, G)`` for a bare sequence of states (discrete-time iterates): the discrete action
  Σ_k [½ Δθ_kᵀGΔθ_k/h_k + ½ h_k ḡ_kᵀG⁻¹ḡ_k], G at the segment midpoint and ḡ_k the gradient averaged along the
  segment. With ḡ_k exact, Δθ_kᵀḡ_k = L(θ_{k+1}) − L(θ_k) and the gap is a sum of squares ≥ 0, segment by
  segment (Young's inequality).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from flows.trajectory import Trajectory

ACTION_TERMS = ("kinetic", "potential", "gap", "length")


def _dot(a, b):
    return (a * b).sum(-1)


class ActionIntegrand:
    """The integrands (½θ̇ᵀGθ̇, ½∇LᵀG⁻¹∇L, ½‖θ̇ + G⁻¹∇L‖²_G, ‖θ̇‖_G) at (θ, θ̇).

    Cost: one gradient, one ``metric.solve`` and two ``metric.apply``. The gap is computed from
    w = θ̇ + G⁻¹∇L directly rather than as S-integrand minus dissipation, so it stays accurate when it is tiny.
    """

    def __init__(self, problem, metric):
        self.problem = problem
        self.metric = metric

    def __call__(self, theta: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        g = self.problem.grad(theta)
        natural = self.metric.solve(theta, g)
        kinetic = 0.5 * _dot(velocity, self.metric.apply(theta, velocity))
        potential = 0.5 * _dot(g, natural)
        w = velocity + natural
        gap = 0.5 * _dot(w, self.metric.apply(theta, w))
        length = (2 * kinetic).clamp_min(0).sqrt()
        return torch.stack([kinetic, potential, gap, length], dim=-1)


class AugmentedField:
    """The field on (z, a): ż = f(t, z), ȧ = the action integrands at θ = observe(z), θ̇ = observe(ż).
    Used by ``simulate(action=G)``; ``observe`` reads θ out of a larger state (momentum, moments) and is the
    identity for plain parameter flows."""

    def __init__(self, field, problem, metric, observe=None):
        self.field = field
        self.problem = problem
        self.metric = metric
        self.integrand = ActionIntegrand(problem, metric)
        self.observe = observe

    def __call__(self, t, state):
        z = state[..., :-len(ACTION_TERMS)]
        dz = self.field(t, z)
        if self.observe is None:
            return torch.cat([dz, self.integrand(z, dz)], dim=-1)
        return torch.cat([dz, self.integrand(self.observe(z), self.observe(dz))], dim=-1)


@dataclass
class ActionReport:
    """Cumulative action terms along a trajectory (each of shape (T,) or (T, E), zero at t[0]).

    ``total`` = kinetic + potential = S(t); ``loss_drop`` = L(θ(0)) − L(θ(t)); the identity
    S = gap + loss_drop holds up to the accuracy of ``method``.
    """

    t: torch.Tensor
    kinetic: torch.Tensor
    potential: torch.Tensor
    gap: torch.Tensor
    length: torch.Tensor
    loss: torch.Tensor
    method: str
    metric: dict = field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        return self.kinetic + self.potential

    @property
    def loss_drop(self) -> torch.Tensor:
        return self.loss[0] - self.loss

    def summary(self) -> dict:
        """Final values as floats (ensembles: lists)."""
        def final(x):
            value = x[-1]
            return value.tolist() if value.ndim else float(value)

        return {"action": final(self.total), "kinetic": final(self.kinetic), "potential": final(self.potential),
                "gap": final(self.gap), "loss_drop": final(self.loss_drop), "length": final(self.length),
                "method": self.method}


def _describe(metric) -> dict:
    return metric.describe() if hasattr(metric, "describe") else {"name": repr(metric)}


def _gauss_legendre(nodes: int, like: torch.Tensor):
    x, w = np.polynomial.legendre.leggauss(nodes)
    return (torch.as_tensor((x + 1) / 2, dtype=like.dtype, device=like.device),
            torch.as_tensor(w / 2, dtype=like.dtype, device=like.device))


def _cumulative(per_interval: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(per_interval[:1])
    return torch.cat([zero, per_interval.cumsum(0)])


def _from_accumulated(traj: Trajectory) -> ActionReport:
    acc = traj.action - traj.action[0]
    return ActionReport(traj.t, *(acc[..., i] for i in range(4)), loss=traj.loss, method="solve",
                        metric=traj.metadata.get("action_metric", {}))


def _quadrature(traj: Trajectory, problem, metric, field, nodes: int) -> ActionReport:
    integrand = ActionIntegrand(problem, metric)
    s, w = _gauss_legendre(nodes, traj.theta)
    t, theta = traj.t, traj.theta
    velocity = torch.stack([field(t[i], theta[i]) for i in range(len(t))])
    pieces = []
    for i in range(len(t) - 1):
        h = t[i + 1] - t[i]
        total = 0
        for sj, wj in zip(s, w):
            h00, h10 = 2 * sj**3 - 3 * sj**2 + 1, sj**3 - 2 * sj**2 + sj
            h01, h11 = -2 * sj**3 + 3 * sj**2, sj**3 - sj**2
            point = h00 * theta[i] + h10 * h * velocity[i] + h01 * theta[i + 1] + h11 * h * velocity[i + 1]
            total = total + wj * h * integrand(point, field(t[i] + sj * h, point))
        pieces.append(total)
    acc = _cumulative(torch.stack(pieces))
    return ActionReport(t, *(acc[..., i] for i in range(4)), loss=problem.loss(theta), method="quadrature",
                        metric=_describe(metric))


def discrete_terms(path: torch.Tensor, times: torch.Tensor, problem, metric, nodes: int = 4) -> torch.Tensor:
    """Per-segment discrete action terms (K, [E,] 4) of a path of K + 1 states (MATH.md §3, discrete analogue).

    Segment k: Δ = θ_{k+1} − θ_k, h = t_{k+1} − t_k, G = G(midpoint), ḡ = Σ_j w_j ∇L(θ_k + s_jΔ) (Gauss–Legendre
    with ``nodes`` points; ``nodes=1`` is the midpoint rule). Returns (½ΔᵀGΔ/h, ½hḡᵀG⁻¹ḡ, ½h‖Δ/h + G⁻¹ḡ‖²_G,
    ‖Δ‖_G). Differentiable in ``path``.
    """
    s, w = _gauss_legendre(nodes, path)
    delta = path[1:] - path[:-1]
    h = (times[1:] - times[:-1]).reshape(-1, *([1] * (delta.ndim - 1)))
    mid = 0.5 * (path[1:] + path[:-1])
    avg_grad = sum(wj * problem.grad(path[:-1] + sj * delta) for sj, wj in zip(s, w))
    natural = metric.solve(mid, avg_grad)
    g_delta = metric.apply(mid, delta)
    kinetic = 0.5 * _dot(delta, g_delta) / h[..., 0]
    potential = 0.5 * h[..., 0] * _dot(avg_grad, natural)
    resid = delta / h + natural
    gap = 0.5 * h[..., 0] * _dot(resid, metric.apply(mid, resid))
    length = _dot(delta, g_delta).clamp_min(0).sqrt()
    return torch.stack([kinetic, potential, gap, length], dim=-1)


def _discrete(traj: Trajectory, problem, metric, nodes: int) -> ActionReport:
    acc = _cumulative(discrete_terms(traj.theta, traj.t, problem, metric, nodes))
    return ActionReport(traj.t, *(acc[..., i] for i in range(4)), loss=problem.loss(traj.theta), method="discrete",
                        metric=_describe(metric))


def action(traj: Trajectory, metric=None, *, field=None, problem=None, nodes: int = 4) -> ActionReport:
    """The action of a trajectory and its parts, as cumulative curves over time.

    Args:
        traj: a trajectory; if it was simulated with ``action=metric`` its accumulated integrals are used.
        metric: the reference metric G (default: the one accumulated in the solve).
        field: the rule's vector field (default: the one a simulated trajectory remembers, ``traj.field``); with
            it, trajectories without accumulated integrals are measured by Gauss–Legendre quadrature (``nodes``
            points per output interval) over Hermite dense output. Without it the stored states are treated as
            discrete iterates (the discrete analogue), as they are for trajectories of discrete dynamics.
        problem: the problem for ∇L (default: ``field.problem``, then ``traj.problem``).
    """
    accumulated = traj.action is not None
    if accumulated and (metric is None or _describe(metric) == traj.metadata.get("action_metric")):
        return _from_accumulated(traj)
    if metric is None:
        raise ValueError("no metric given and the trajectory carries no accumulated action (simulate with action=)")
    if field is None and traj.metadata.get("dynamics", "flow") == "flow":
        field = getattr(traj, "field", None)  # a trajectory simulated in this process remembers its field
    problem = next((p for p in (problem, getattr(field, "problem", None), getattr(traj, "problem", None))
                    if p is not None), None)
    if problem is None:
        raise ValueError("action needs the problem to evaluate ∇L, and this trajectory carries none (it was loaded "
                         "from a file, or made outside flows.simulate): pass problem= (or field=)")
    with torch.no_grad():
        if field is not None:
            return _quadrature(traj, problem, metric, field, nodes)
        return _discrete(traj, problem, metric, nodes)


def gap(traj: Trajectory, metric=None, **kwargs) -> torch.Tensor:
    """The excess action Δ(t) = S(t) − (L(0) − L(t)) = ∫½‖θ̇ + G⁻¹∇L‖²_G ≥ 0 (cumulative)."""
    return action(traj, metric, **kwargs).gap


# --------------------------------------------------------------------------------------------------------
# Least-action paths
# --------------------------------------------------------------------------------------------------------


@dataclass
class LeastActionPath:
    """A minimiser of the discretised action with fixed end points.

    ``el_residual`` is max_k ‖∂S/∂θ_k‖/h over interior nodes (the discrete Euler–Lagrange equation, 0 at an
    exact minimiser); ``el_residual_continuous`` is max_k ‖Gθ̈_k − H G⁻¹∇L‖ with θ̈ by central differences
    (constant metrics only, else None).
    """

    t: torch.Tensor
    theta: torch.Tensor
    action: float
    loss_drop: float
    gap: float
    el_residual: float
    el_residual_continuous: float | None
    iterations: int


def least_action_path(problem, metric, start, end, duration: float, nodes: int = 64, *, initial=None,
                      max_iter: int = 5000, tolerance: float = 1e-12, quadrature_nodes: int = 1,
                      constant_metric: bool | None = None) -> LeastActionPath:
    """Minimise the discretised action over paths θ_0 = start, θ_nodes = end in time ``duration``.

    The path has ``nodes`` equal segments; the kinetic term uses finite differences, the potential the gradient
    at segment midpoints (``quadrature_nodes=1``; more nodes average it along the segment). L-BFGS with a
    strong-Wolfe line search moves the interior nodes, starting from the straight line (or ``initial``).
    Cost per iteration: O(nodes) gradients and metric solves, plus one backward pass through them.
    The gradient-flow path joining start and end in time T attains S = L(start) − L(end), so it is the minimiser.
    """
    start = torch.as_tensor(start, dtype=problem.dtype, device=problem.device)
    end = torch.as_tensor(end, dtype=problem.dtype, device=problem.device)
    times = torch.linspace(0.0, float(duration), nodes + 1, dtype=problem.dtype, device=problem.device)
    straight = start + (times[1:-1] / duration)[:, None] * (end - start)
    # Precondition in time: write the interior as the straight line plus a deviation in the sine basis that
    # diagonalises the kinetic term's second difference, scaled so that term becomes ½‖c‖². Its condition
    # number no longer grows like nodes², so L-BFGS needs tens of iterations instead of thousands.
    k = torch.arange(1, nodes, dtype=problem.dtype, device=problem.device)
    basis = (2.0 / nodes) ** 0.5 * torch.sin(torch.pi * k[:, None] * k[None, :] / nodes)  # orthonormal, symmetric
    h = float(duration) / nodes
    scale = (h / (4 * torch.sin(torch.pi * k / (2 * nodes)) ** 2)).sqrt()
    coords0 = torch.zeros(nodes - 1, start.numel(), dtype=problem.dtype, device=problem.device)
    if initial is not None:
        coords0 = (basis @ (torch.as_tensor(initial, dtype=problem.dtype) - straight)) / scale[:, None]
    coords = coords0.detach().clone().requires_grad_(True)

    def interior_of(c):
        return straight + basis @ (scale[:, None] * c)

    def total(inner):
        path = torch.cat([start[None], inner, end[None]])
        terms = discrete_terms(path, times, problem, metric, quadrature_nodes)
        return terms[:, 0].sum() + terms[:, 1].sum()

    optimizer = torch.optim.LBFGS([coords], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance,
                                  tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = total(interior_of(coords))
        value.backward()
        return value

    optimizer.step(closure)
    iterations = optimizer.state[optimizer._params[0]].get("n_iter", 0)
    interior = interior_of(coords).detach().requires_grad_(True)
    value = total(interior)
    (grad_nodes,) = torch.autograd.grad(value, interior)
    value = value.item()
    path = torch.cat([start[None], interior.detach(), end[None]])
    drop = float(problem.loss(start) - problem.loss(end))
    continuous = None
    if constant_metric is None:
        constant_metric = type(metric).__name__ in ("Euclidean", "Diagonal", "Constant")
    if constant_metric:
        inner = path[1:-1]
        accel = (path[2:] - 2 * inner + path[:-2]) / h**2

        def potential(th):
            g = problem.grad(th)
            return 0.5 * _dot(g, metric.solve(th, g))

        force = torch.func.vmap(torch.func.grad(potential))(inner)  # ∇(½∇LᵀG⁻¹∇L) = H G⁻¹∇L
        continuous = float((metric.apply(inner, accel) - force).norm(dim=-1).max())
    return LeastActionPath(times, path, value, drop, value - drop,
                           float(grad_nodes.norm(dim=-1).max()) / h, continuous, int(iterations))


# --------------------------------------------------------------------------------------------------------
# Comparing rules
# --------------------------------------------------------------------------------------------------------


def time_to_reach(traj: Trajectory, level: float) -> float | None:
    """First time the loss falls to ``level``, by linear interpolation of log L between outputs (None: never)."""
    loss = traj.loss.detach().cpu().numpy()
    t = traj.t.detach().cpu().numpy()
    below = np.nonzero(loss <= level)[0]
    if len(below) == 0:
        return None
    i = below[0]
    if i == 0:
        return float(t[0])
    a, b = np.log(loss[i - 1]), np.log(loss[i])
    frac = (a - np.log(level)) / (a - b) if a != b else 1.0
    return float(t[i - 1] + frac * (t[i] - t[i - 1]))


def compare(trajectories: dict[str, Trajectory], metric=None, *, level: float | None = None,
            fields: dict | None = None, problem=None) -> list[dict]:
    """One row per labelled trajectory: rule, action, gap, loss drop, length, final loss, time to ``level``.

    Trajectories simulated with ``action=metric`` are read directly; others are measured with their field from
    ``fields`` (quadrature) or as discrete iterates.
    """
    rows = []
    for label, traj in trajectories.items():
        field_ = (fields or {}).get(label)
        report = action(traj, metric, field=field_, problem=problem if field_ is None else None)
        summary = report.summary()
        rows.append({"rule": label, "action": summary["action"], "gap": summary["gap"],
                     "loss_drop": summary["loss_drop"], "length": summary["length"],
                     "final_loss": float(report.loss[-1]),
                     "time_to_level": None if level is None else time_to_reach(traj, level),
                     "method": summary["method"]})
    return rows


def markdown(rows: list[dict], level: float | None = None) -> str:
    """A markdown table of :func:`compare` rows."""
    head = ["rule", "action S", "gap S − ΔL", "loss drop ΔL", "length", "final loss",
            f"time to L ≤ {level:g}" if level is not None else "time to level"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        reach = "never" if r["time_to_level"] is None else f"{r['time_to_level']:.4g}"
        lines.append(f"| {r['rule']} | {r['action']:.6g} | {r['gap']:.3e} | {r['loss_drop']:.6g} | "
                     f"{r['length']:.4g} | {r['final_loss']:.4g} | {reach} |")
    return "\n".join(lines)
