"""``iterate``: run a discrete update (gradient descent, minibatch SGD, momentum, Adam, natural-gradient descent)
and return a :class:`flows.Trajectory`, read on the same time axis as the flows: step k sits at t = k·η (MATH.md §6).

The updates live in :mod:`flows.discrete` (``GD``, ``Momentum``, ``Adam``, ``NaturalGradientDescent``, and the
protocol a user's own update follows). Everything downstream of a trajectory — action, contraction, plots,
natural-gradient recovery — applies to discrete runs unchanged.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings

import torch
from tqdm.auto import tqdm

from flows.discrete import GD, SGD, Adam, Gradient, Momentum, NaturalGradientDescent, minibatches
from flows.errors import FlowDivergedError
from flows.simulate import record_measurements
from flows.trajectory import Trajectory, describe, versions

# the updates, importable from here too (``from flows.iterate import GD``); their home is flows.discrete
__all__ = ["iterate", "GD", "SGD", "Momentum", "Adam", "NaturalGradientDescent"]


def _positive_int(value, name: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
    return int(value)


def _check(update, theta0, steps, lr, batch_size, record_every):
    for method in ("init", "step"):
        if not callable(getattr(update, method, None)):
            raise TypeError(f"update must have init(theta0) and step(theta, state, gradient, lr) (see "
                            f"flows.discrete), got {type(update).__name__} without {method}()")
    problem = getattr(update, "problem", None)
    if problem is None:
        raise TypeError(f"update {type(update).__name__} has no .problem to take gradients of")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    steps = _positive_int(steps, "steps", allow_zero=True)
    record_every = _positive_int(record_every, "record_every")
    if batch_size is not None:
        n = problem.batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must be an integer in 1…{n} (the number of training samples), got "
                             f"{batch_size!r}")
        batch_size = int(batch_size)
    theta0 = torch.as_tensor(theta0)
    if not theta0.is_floating_point():
        raise ValueError(f"theta0 must be a floating tensor, got dtype {theta0.dtype}")
    if theta0.ndim not in (1, 2) or theta0.shape[-1] != problem.num_params:
        raise ValueError(f"theta0 must have shape (N,) or (E, N) with N = {problem.num_params} (the problem's "
                         f"parameters), got {tuple(theta0.shape)}")
    if not bool(torch.isfinite(theta0).all()):
        raise ValueError("theta0 contains non-finite values")
    return problem, theta0.detach(), steps, float(lr), batch_size, record_every


def iterate(
    update,
    theta0,
    steps: int,
    *,
    lr: float,
    batch_size: int | None = None,
    seed: int = 0,
    record_every: int = 1,
    progress: bool = True,
    record: bool = True,
) -> Trajectory:
    """Run ``steps`` steps of a discrete update from θ₀ and return the trajectory at t = k·lr.

    Args:
        update: an update of :mod:`flows.discrete` (``GD(problem)``, ``Momentum``, ``Adam``,
            ``NaturalGradientDescent``) or any object following the protocol described there.
        theta0: the initial parameters, (N,), or (E, N) for an ensemble that shares the minibatch sequence.
        steps: the number of updates K (0 returns θ₀ alone).
        lr: the step size η > 0; step k is placed at time t_k = kη, so runs at different η compare on one axis
            with each other and with :func:`flows.simulate`'s gradient flow.
        batch_size: None for full-batch steps; b for minibatches of b training samples drawn without replacement,
            one permutation per epoch from a ``torch.Generator`` seeded with ``seed``
            (:func:`flows.discrete.minibatches`; the epoch's last batch holds the n mod b leftover samples when b does
            not divide n).
        seed: the minibatch seed (stored in the metadata; the same seed reproduces the run exactly).
        record_every: keep θ every this many steps; the last step is always kept.
        progress: a tqdm bar over steps (silent anyway when stderr is not a terminal).
        record: measure the full-batch L(θ), ‖∇L(θ)‖ and every eval set of the problem at the kept states (one
            full-batch gradient per kept state, as :func:`flows.simulate` does); ``record=False`` leaves them None.

    Returns:
        a :class:`flows.Trajectory` with ``metadata["dynamics"] == "discrete"``, the update's description, lr,
        batch_size, seed, steps and record_every; ``stats``: steps, nfe (gradient evaluations, minibatch or full),
        epochs, wall_time, nfe_at_output.

    Raises:
        FlowDivergedError: θ became non-finite; the error's trajectory holds the kept states up to and including
            the last finite one (``.t``, ``.theta`` name it; ``.bad_time`` the step at which it failed).
        ValueError: lr ≤ 0 or non-finite, steps < 0 or not an integer, batch_size ≤ 0 or larger than the data,
            record_every ≤ 0, a bad θ₀ (each message names the value).

    Cost: ``steps`` updates (one minibatch gradient each for the built-ins) plus, with ``record``, one full-batch
    gradient per kept state; per step the loop adds one finiteness reduction and a few attribute updates.
    """
    problem, theta, steps, lr, batch_size, record_every = _check(update, theta0, steps, lr, batch_size,
                                                                 record_every)
    gradient = Gradient(problem)
    batches = minibatches(problem.batch_size, batch_size, seed, problem.device) if batch_size is not None else None
    state = update.init(theta)
    kept_steps, kept_states, nfe_at_output = [0], [theta], [0]
    pbar = tqdm(total=steps, disable=None if progress else True, desc="iterate", unit="step", leave=False)
    bar = None if pbar.disable else pbar
    tick = max(1, steps // 200)
    start = time.perf_counter()
    k = 0
    try:
        for k in range(1, steps + 1):
            if batches is not None:
                gradient.indices = next(batches)
            new, state = update.step(theta, state, gradient, lr)
            # one reduction is the cheap test (NaN/inf propagate into the sum); an overflowing sum of finite
            # values is told apart by the exact elementwise check, which runs only then
            if not math.isfinite(float(new.sum())) and not bool(torch.isfinite(new).all()):
                raise _diverged(update, problem, kept_steps, kept_states, nfe_at_output, theta, k, lr, gradient,
                                _metadata(update, problem, lr, batch_size, seed, steps, record_every), record)
            theta = new
            if k % record_every == 0 or k == steps:
                kept_steps.append(k)
                kept_states.append(theta)
                nfe_at_output.append(gradient.calls)
            if bar is not None and k % tick == 0:
                bar.update(k - bar.n)
    finally:
        pbar.close()
    wall = time.perf_counter() - start
    t = torch.tensor(kept_steps, dtype=theta.dtype, device=theta.device) * lr
    stats = {"steps": steps, "nfe": gradient.calls, "wall_time": wall, "nfe_at_output": nfe_at_output}
    if batch_size is not None:
        stats["epochs"] = steps / math.ceil(problem.batch_size / batch_size)
    traj = Trajectory(t, torch.stack([s.detach() for s in kept_states]), stats=stats,
                      metadata=_metadata(update, problem, lr, batch_size, seed, steps, record_every),
                      field=update, problem=problem)
    if record:
        record_measurements(traj, problem, traj.theta)
    return traj


def _metadata(update, problem, lr, batch_size, seed, steps, record_every) -> dict:
    meta = {"dynamics": "discrete", "rule": describe(update), "lr": lr, "batch_size": batch_size,
            "seed": int(seed), "steps": steps, "record_every": record_every, "problem": repr(problem),
            "versions": versions()}
    metric = getattr(update, "metric", None)
    if metric is not None:
        meta["metric"] = describe(metric)
    return meta


def _diverged(update, problem, kept_steps, kept_states, nfe_at_output, last, k, lr, gradient, metadata,
              record) -> FlowDivergedError:
    """The error for a non-finite θ at step k: the kept states plus the last finite one (step k − 1)."""
    steps, states, counts = list(kept_steps), list(kept_states), list(nfe_at_output)
    if steps[-1] != k - 1:
        steps.append(k - 1)
        states.append(last)
        counts.append(gradient.calls)
    t = torch.tensor(steps, dtype=last.dtype, device=last.device) * lr
    stats = {"steps": k - 1, "nfe": gradient.calls, "wall_time": float("nan"), "nfe_at_output": counts,
             "diverged_at": k * lr, "diverged_at_step": k}
    traj = Trajectory(t, torch.stack([s.detach() for s in states]), stats=stats, metadata=metadata, field=update,
                      problem=problem)
    if record:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            record_measurements(traj, problem, traj.theta)
    return FlowDivergedError(
        f"θ became non-finite at step {k} (t={k * lr:.6g}); the last finite state is step {k - 1} "
        f"(t={(k - 1) * lr:.6g}; {len(steps)} states kept in .trajectory). Try a smaller lr (gradient descent on a "
        f"quadratic is stable only for lr < 2/λ_max, see flows.contraction.sharpness).",
        t=(k - 1) * lr, theta=last, trajectory=traj, bad_time=k * lr,
    )
