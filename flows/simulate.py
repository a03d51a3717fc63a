"""``simulate``: integrate any vector field with torchdiffeq and return a :class:`flows.Trajectory`.

torchdiffeq's ``method``, ``rtol``, ``atol`` and ``options`` are passed through unchanged, so every solver of
the installed release works as documented there. Around the solver, simulate adds what a study of learning
dynamics needs: counts of field evaluations and of accepted / rejected steps (torchdiffeq's step callbacks),
a progress bar over solver time, stop events, ensembles, and a clear error that keeps the trajectory when the
flow diverges.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
from torchdiffeq import odeint, odeint_event
from tqdm.auto import tqdm

from flows.action import ACTION_TERMS, AugmentedField
from flows.errors import FlowDivergedError
from flows.events import as_event
from flows.trajectory import Trajectory, describe, versions

try:  # the solver table of the installed torchdiffeq release, to list valid methods in errors
    from torchdiffeq._impl.odeint import SOLVERS as _SOLVERS
except ImportError:  # pragma: no cover - a future layout; torchdiffeq then reports bad methods itself
    _SOLVERS = None

#: torchdiffeq's own defaults, used for float64 when rtol/atol are None.
DEFAULT_TOLERANCES = {torch.float64: (1e-7, 1e-9), torch.float32: (1e-5, 1e-7), torch.float16: (1e-2, 1e-3),
                      torch.bfloat16: (1e-2, 1e-3)}
FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams",
                      "fixed_adams")


class FixedGridWarning(UserWarning):
    """A fixed-grid solver was given no step size, so it steps at the output times only."""


def methods() -> list[str]:
    """Names of the solvers of the installed torchdiffeq release."""
    return sorted(_SOLVERS) if _SOLVERS is not None else []


class _NonFinite(Exception):
    def __init__(self, t, y, reason="the vector field became non-finite"):
        super().__init__(reason)
        self.t, self.y, self.reason = t, y, reason


class _MonitoredField:
    """The user's field plus counting, finiteness checks, progress and the record kept for a divergence.

    torchdiffeq calls ``callback_step(t0, y0, dt)`` at the start of every step: y0 is then an accepted state,
    which is what a divergence report keeps (the last one, and the first one past each output time).

    Per evaluation it costs one reduction (the finiteness test) and a few attribute updates; bookkeeping that
    needs solver time as a float (output times passed, the progress bar) runs once per step, and the bar is
    redrawn only when the solve has advanced by another 1/200 of the span (benchmarks/simulate_overhead.py).
    """

    _BAR_TICKS = 200

    def __init__(self, field, t_out: torch.Tensor, pbar, callbacks: set[str]):
        self.field = field
        self.callbacks = callbacks
        self.nfe = 0
        self.steps = 0
        self.accepted = 0
        self.rejected = 0
        self.pbar = pbar
        self._t0 = float(t_out[0])
        self._direction = 1.0 if len(t_out) < 2 or t_out[-1] >= t_out[0] else -1.0
        self._t_out = [float(x) for x in t_out]
        self._next_out = 0
        self._next_t = self._t_out[0]  # the next output time to pass (±inf once all are passed)
        self._bar_tick = abs(self._t_out[-1] - self._t0) / self._BAR_TICKS
        self._bar_next = self._t0
        self.record: list[tuple[float, torch.Tensor]] = []
        self.nfe_at_output: list[int] = []  # evaluations spent before the solver passed each output time
        self.last: tuple[float, torch.Tensor] | None = None
        self._step_callbacks = "callback_step" in callbacks
        if self._step_callbacks:
            self.callback_step = self._on_step
        if "callback_accept_step" in callbacks:
            self.callback_accept_step = self._on_accept
        if "callback_reject_step" in callbacks:
            self.callback_reject_step = self._on_reject

    def _on_step(self, t0, y0, dt):
        self.steps += 1
        self._keep(float(t0), y0)

    def _on_accept(self, t0, y0, dt):
        self.accepted += 1

    def _on_reject(self, t0, y0, dt):
        self.rejected += 1

    def _keep(self, t: float, y: torch.Tensor) -> None:
        self.last = (t, y)
        if (t - self._next_t) * self._direction >= 0:
            out = self._t_out
            while self._next_out < len(out) and (t - out[self._next_out]) * self._direction >= 0:
                self.record.append((t, y))
                self.nfe_at_output.append(self.nfe)
                self._next_out += 1
            self._next_t = out[self._next_out] if self._next_out < len(out) else math.inf * self._direction
        if self.pbar is not None and (t - self._bar_next) * self._direction >= 0:
            done = (t - self._t0) * self._direction
            if done > self.pbar.n:
                self.pbar.update(done - self.pbar.n)
            self._bar_next = t + self._bar_tick * self._direction

    def __call__(self, t, y):
        self.nfe += 1
        dy = self.field(t, y)
        if not isinstance(dy, torch.Tensor) or dy.shape != y.shape:
            shape = tuple(dy.shape) if isinstance(dy, torch.Tensor) else type(dy).__name__
            raise ValueError(f"the field returned {shape} for a state of shape {tuple(y.shape)}")
        # one reduction is the cheap test (NaN/inf propagate into the sum); an overflowing sum of finite
        # values is told apart by the exact elementwise check, which runs only then
        if not math.isfinite(dy.sum().item()) and not bool(torch.isfinite(dy).all()):
            raise _NonFinite(float(t), y)
        if not self._step_callbacks:
            self._keep(float(t), y)
        return dy.detach() if dy.requires_grad else dy


def _check_inputs(theta0, t, method, rtol, atol, problem, field=None):
    theta0 = torch.as_tensor(theta0)
    if not theta0.is_floating_point():
        raise ValueError(f"theta0 must be a floating tensor, got dtype {theta0.dtype}")
    if theta0.ndim not in (1, 2):
        raise ValueError(f"theta0 must have shape (N,) or (E, N), got {tuple(theta0.shape)}")
    state_length = getattr(field, "state_length", None)  # rules whose state is more than θ declare its length
    if state_length is not None:
        if theta0.shape[-1] != state_length:
            raise ValueError(f"theta0 has length {theta0.shape[-1]} but the rule's state has length {state_length}")
    elif problem is not None and theta0.shape[-1] != problem.num_params:
        raise ValueError(
            f"theta0 has length {theta0.shape[-1]} but the problem has {problem.num_params} parameters"
        )
    if not bool(torch.isfinite(theta0).all()):
        raise ValueError("theta0 contains non-finite values")
    if theta0.numel() == 0:
        raise ValueError(f"theta0 is empty (shape {tuple(theta0.shape)})")
    try:
        t = torch.as_tensor(t, dtype=theta0.dtype, device=theta0.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"t must be a 1-D sequence of output times, got {type(t).__name__}: {exc}") from None
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"t must be a 1-D tensor of at least 2 output times, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"t contains non-finite output times: {t.tolist()}")
    steps = t[1:] - t[:-1]
    if not (bool((steps > 0).all()) or bool((steps < 0).all())):
        raise ValueError("t must be strictly increasing or strictly decreasing")
    if _SOLVERS is not None and method not in _SOLVERS:
        raise ValueError(f"unknown method {method!r}; torchdiffeq offers {methods()}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is not None and not (isinstance(tol, int | float) and not isinstance(tol, bool) and math.isfinite(tol)
                                    and tol >= 0):
            raise ValueError(f"{name} must be a finite number ≥ 0, got {tol!r}")
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(theta0.dtype, (1e-7, 1e-9))
    if method not in FIXED_GRID_METHODS and theta0.dtype != torch.float64 and (rtol is not None or atol is not None):
        # the solver asks for |error_i| ≤ atol + rtol·|θ_i|; below ~10 ulp of θ_i that cannot be met
        eps = torch.finfo(theta0.dtype).eps
        r = default_rtol if rtol is None else float(rtol)
        a = default_atol if atol is None else float(atol)
        scale = theta0.detach().abs().max().item()
        if a + r * scale < 10 * eps * scale:
            warnings.warn(
                f"rtol={r:g}, atol={a:g} ask for errors below the resolution of {theta0.dtype} "
                f"(10·eps = {10 * eps:.2g} relative, states up to {scale:.3g}); the solver cannot meet them "
                f"and will take tiny steps",
                stacklevel=3,
            )
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    return theta0, t, rtol, atol


def simulate(
    field,
    theta0,
    t,
    *,
    method: str = "dopri5",
    rtol: float | None = None,
    atol: float | None = None,
    options: dict | None = None,
    event=None,
    progress: bool = True,
    problem=None,
    record: bool = True,
    action=None,
) -> Trajectory:
    """Integrate θ̇ = field(t, θ) from θ(t[0]) = theta0 and report θ at the times ``t``.

    Args:
        field: any callable ``f(t, θ) -> dθ/dt`` (e.g. :class:`flows.rules.GradientFlow`).
        theta0: initial state, shape (N,), or (E, N) for an ensemble of E trajectories in one solve (the
            field must then accept (E, N); adaptive methods share one step size across members).
        t: output times (1-D, strictly monotone).
        method, rtol, atol, options: torchdiffeq's, passed through unchanged. rtol/atol None means
            torchdiffeq's defaults (1e-7, 1e-9) in float64, (1e-5, 1e-7) in float32.
        event: stop condition g(t, θ), e.g. :func:`flows.events.loss_below`; the solve stops at the first
            sign change of any component, located by torchdiffeq's ``odeint_event``. With an event the solve
            advances output interval by output interval (each a fresh torchdiffeq call) so that the states at
            the requested times stay exact.
        progress: show a tqdm bar over solver time (it is silent anyway when stderr is not a terminal).
        problem: the :class:`flows.Problem` for recording loss and gradient norm; defaults to
            ``field.problem`` when the field has one.
        record: evaluate the loss and ‖∇L‖ at the output times (one gradient per output time).
        action: a reference metric G: integrate the action terms of MATH.md §3 (kinetic, potential, gap,
            length) as four extra state components inside the same solve, under the solver's error control;
            they land in ``traj.action`` (see :func:`flows.action.action`). Costs one gradient, one solve and two
            metric products per evaluation on top of the field.

    Returns:
        a :class:`flows.Trajectory`.

    Raises:
        FlowDivergedError: the field became non-finite; the error carries the last finite state and the
            trajectory recorded up to it.
        ValueError: bad θ0, t or method (the message names the values).

    The vector field's output is detached, so no autograd graph grows across steps.
    """
    problem = getattr(field, "problem", None) if problem is None else problem
    # a field whose state is more than θ (momentum, optimiser moments) says how to read θ from it
    observe = getattr(field, "theta_of", None)
    if not callable(field):
        raise TypeError(f"field must be callable f(t, theta) -> dtheta/dt, got {type(field).__name__}")
    if not isinstance(method, str):
        raise TypeError(f"method must be a torchdiffeq method name, got {type(method).__name__}")
    theta0, t, rtol, atol = _check_inputs(theta0, t, method, rtol, atol, problem, field)
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict of torchdiffeq solver options, got {type(options).__name__}")
    step = (options or {}).get("step_size")
    if step is not None and not (isinstance(step, int | float) and not isinstance(step, bool) and math.isfinite(step)
                                 and step > 0):
        raise ValueError(f"options['step_size'] must be a finite number > 0, got {step!r}")
    options = dict(options) if options is not None else None
    bound_event = as_event(event)
    if bound_event is not None and bound_event.needs_problem:
        bound_event = bound_event.bind(problem)
        if observe is not None:
            bound_event = bound_event.reading(observe)

    n = theta0.shape[-1]
    run_field, state0 = field, theta0.detach()
    if action is not None:
        if problem is None:
            raise ValueError("action= needs the problem for ∇L: pass problem= or a field with .problem")
        run_field = AugmentedField(field, problem, action, observe)
        state0 = torch.cat([state0, state0.new_zeros(*state0.shape[:-1], len(ACTION_TERMS))], dim=-1)
        if bound_event is not None:
            bound_event = bound_event.reading(lambda y: y[..., :n])

    grid_given = bool((options or {}).get("step_size")) or "grid_constructor" in (options or {})
    if method in FIXED_GRID_METHODS and not grid_given:
        spacing = (t[1:] - t[:-1]).abs()
        warnings.warn(
            f"method={method!r} without options={{'step_size': h}} steps only at the output times: steps of up to "
            f"{float(spacing.max()):.4g} here (the output spacing), however large. Pass options={{'step_size': h}} "
            f"for the grid you mean (or step_size equal to the spacing to keep this grid and silence this warning).",
            FixedGridWarning, stacklevel=2)

    callbacks = _SOLVERS[method].valid_callbacks() if _SOLVERS is not None else set()
    span = abs(float(t[-1] - t[0]))
    pbar = tqdm(total=span, disable=None if progress else True, desc="simulate", unit="t",
                bar_format="{l_bar}{bar}| t={n:.3g}/{total:.3g} [{elapsed}<{remaining}]", leave=False)
    monitored = _MonitoredField(run_field, t, None if pbar.disable else pbar, callbacks)
    solver = {"method": method, "rtol": rtol, "atol": atol}
    if options is not None:
        solver["options"] = options

    start = time.perf_counter()
    stopped_by_event = False
    try:
        if bound_event is None:
            states = odeint(monitored, state0, t, options=options, **solver_args(solver))
            times = t
        else:
            times, states, stopped_by_event = _solve_with_event(monitored, state0, t, bound_event, solver)
    except _NonFinite as bad:
        raise _diverged(monitored, bad, theta0, field, problem, record, solver) from None
    except AssertionError as exc:  # torchdiffeq's way of reporting a step size that underflowed
        if not str(exc).startswith(("underflow in dt", "max_num_steps exceeded")):
            raise
        last_t = monitored.last[0] if monitored.last is not None else float(t[0])
        reason = _NonFinite(last_t, None, f"the solver's step size underflowed ({exc}); the flow is stiff or "
                                          "blows up in finite time")
        raise _diverged(monitored, reason, theta0, field, problem, record, solver) from exc
    finally:
        pbar.close()
    wall = time.perf_counter() - start

    stats = _stats(monitored, wall, callbacks)
    stats["stopped_by_event"] = stopped_by_event
    counts = monitored.nfe_at_output[:len(times) - 1]
    stats["nfe_at_output"] = counts + [monitored.nfe] * (len(times) - len(counts))
    metadata = _metadata(field, problem, solver, bound_event)
    traj = Trajectory(times.detach(), states[..., :n].detach(), stats=stats, metadata=metadata)
    if action is not None:
        traj.action = states[..., n:].detach()
        metadata["action_metric"] = describe(action)
    traj.field, traj.problem = field, problem
    if record and problem is not None:
        record_measurements(traj, problem, traj.theta if observe is None else observe(traj.theta))
    return traj


def solver_args(solver: dict) -> dict:
    return {"method": solver["method"], "rtol": solver["rtol"], "atol": solver["atol"]}


def _solve_with_event(monitored, theta0, t, event, solver):
    """Advance interval by interval; in the interval where the event changes sign, locate it exactly."""
    options = solver.get("options")
    direction = 1.0 if t[-1] > t[0] else -1.0
    with torch.no_grad():
        value0 = event(t[0], theta0)
        if bool(event.satisfied(value0)):
            return t[:1], theta0[None], True  # already true at t0: the run stops before it starts
        sign0 = torch.sign(value0).reshape(-1)
    times, states = [t[0]], [theta0]
    current = theta0
    for i in range(1, len(t)):
        nxt = odeint(monitored, current, t[i - 1:i + 1], options=options, **solver_args(solver))[-1]
        with torch.no_grad():
            crossed = bool((torch.sign(event(t[i], nxt)).reshape(-1) != sign0).any())
        if not crossed:
            times.append(t[i])
            states.append(nxt)
            current = nxt
            continue
        event_options = options
        if solver["method"] in FIXED_GRID_METHODS and not (options or {}).get("step_size"):
            # torchdiffeq's fixed-grid event search needs a step size; use the output spacing.
            event_options = {**(options or {}), "step_size": abs(float(t[i] - t[i - 1]))}
        t_end = t[i]

        def bounded(tt, y, t_end=t_end):  # the event itself, or the end of this interval
            return torch.cat([event(tt, y).reshape(-1), ((t_end - tt) * direction).reshape(1)])

        t_event, solution = odeint_event(monitored, current, t[i - 1], event_fn=bounded,
                                         reverse_time=direction < 0, options=event_options,
                                         **solver_args(solver))
        times.append(t_event.reshape(()).to(t))
        states.append(solution[-1])
        return torch.stack(times), torch.stack(states), True
    return torch.stack(times), torch.stack(states), False


def record_measurements(traj: Trajectory, problem, theta: torch.Tensor) -> None:
    """Fill ``traj.loss``, ``traj.grad_norm`` and ``traj.metrics`` (every named eval set of the problem) at the
    states ``theta`` (T, [E,] N). Shared by every integrator, so all trajectories carry the same measurements."""
    traj.loss, traj.grad_norm = measure(problem, theta)
    traj.metrics = measure_eval(problem, theta)


def measure_eval(problem, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """:meth:`flows.Problem.evaluate` at every state of a (T, N) or (T, E, N) stack, stacked over T."""
    if not getattr(problem, "eval_data", None):
        return {}
    with torch.no_grad():
        rows = [problem.evaluate(state) for state in theta]
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]} if rows else {}


def measure(problem, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L(θ) and ‖∇L(θ)‖₂ for every state of a (T, N) or (T, E, N) stack: one gradient per state."""
    losses, norms = [], []
    for state in theta:
        value, g = problem.value_and_grad(state)
        losses.append(value.detach())
        norms.append(torch.linalg.vector_norm(g.detach(), dim=-1))
    return torch.stack(losses), torch.stack(norms)


def _stats(monitored: _MonitoredField, wall: float, callbacks: set[str]) -> dict:
    stats = {"nfe": monitored.nfe, "wall_time": wall}
    if "callback_step" in callbacks:
        stats["steps"] = monitored.steps
    if "callback_accept_step" in callbacks:
        stats["accepted"] = monitored.accepted
        stats["rejected"] = monitored.rejected
    elif "callback_step" in callbacks:  # fixed-grid solvers accept every step
        stats["accepted"], stats["rejected"] = monitored.steps, 0
    return stats


def _metadata(field, problem, solver, event) -> dict:
    meta = {
        "dynamics": "flow",
        "rule": describe(field),
        "solver": {k: (v if k != "options" else {kk: describe(vv) if callable(vv) else vv
                                                  for kk, vv in v.items()}) for k, v in solver.items()},
        "versions": versions("torchdiffeq"),
    }
    metric = getattr(field, "metric", None)
    if metric is not None:
        meta["metric"] = describe(metric)
    if problem is not None:
        meta["problem"] = repr(problem)
    if event is not None:
        meta["event"] = event.describe() if hasattr(event, "describe") else repr(event)
    return meta


def _diverged(monitored, bad: _NonFinite, theta0, field, problem, record, solver) -> FlowDivergedError:
    kept = list(monitored.record)
    if monitored.last is not None and (not kept or kept[-1][0] != monitored.last[0]):
        kept.append(monitored.last)
    if not kept:
        kept = [(float(bad.t), theta0)]
    dtype, device = theta0.dtype, theta0.device
    times = torch.tensor([k[0] for k in kept], dtype=dtype, device=device)
    states = torch.stack([k[1].detach() for k in kept])[..., :theta0.shape[-1]]  # drop action accumulators
    stats = _stats(monitored, float("nan"), monitored.callbacks)
    stats["diverged_at"] = bad.t
    traj = Trajectory(times, states, stats=stats, metadata=_metadata(field, problem, solver, None),
                      field=field, problem=problem)
    observe = getattr(field, "theta_of", None)
    if record and problem is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            record_measurements(traj, problem, traj.theta if observe is None else observe(traj.theta))
    last_t = float(times[-1])
    return FlowDivergedError(
        f"{bad.reason} at t={bad.t:.6g}; the last finite state is at t={last_t:.6g} "
        f"({len(kept)} states kept in .trajectory). Try a smaller step, a larger damping, or a lower rate.",
        t=last_t, theta=states[-1], trajectory=traj, bad_time=bad.t,
    )
