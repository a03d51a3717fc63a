"""Property-based fuzz of the public entry points: Problem construction and simulate arguments.

Every call either succeeds with finite results or raises one of the library's documented errors (ValueError,
TypeError, FlowDivergedError, NotEffectiveError) whose message names the offending argument. No raw IndexError,
RuntimeError or ZeroDivisionError escapes.
"""

import math
import warnings

import torch
from hypothesis import given
from hypothesis import strategies as st

import flows
from tests.conftest import tanh_mlp

DOCUMENTED = (ValueError, TypeError, flows.FlowDivergedError, flows.NotEffectiveError)
IN, OUT = 3, 2


def _check_error(exc, names):
    assert isinstance(exc, DOCUMENTED), f"undocumented {type(exc).__name__}: {exc}"
    if type(exc) is RuntimeError or isinstance(exc, IndexError | ZeroDivisionError):
        raise AssertionError(f"raw {type(exc).__name__} escaped: {exc}")
    message = str(exc).lower()
    assert any(name in message for name in names), f"{message!r} names none of {names}"


@st.composite
def data_sets(draw):
    n = draw(st.integers(0, 6))
    n_targets = draw(st.sampled_from([n, n, n + 1, max(n - 1, 0)]))
    width = draw(st.sampled_from([IN, IN, IN + 1]))
    kind = draw(st.sampled_from(["float64", "float32", "int64"]))
    x = torch.randn(n, width, dtype=torch.float64)
    if kind == "int64":
        x = (x * 3).long()
    else:
        x = x.to(getattr(torch, kind))
        if n and draw(st.booleans()):
            x[draw(st.integers(0, n - 1)), 0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    loss = draw(st.sampled_from(["mse", "cross_entropy"]))
    if loss == "mse":
        y = torch.randn(n_targets, draw(st.sampled_from([OUT, OUT, OUT + 1])), dtype=torch.float64)
        if n_targets and draw(st.booleans()):
            y[0, 0] = math.nan
    else:
        y = torch.randint(-1, OUT + 1, (n_targets,))
    return x, y, loss


@given(data_sets())
def test_problem_construction_succeeds_or_names_the_problem(case):
    x, y, loss = case
    try:
        problem = flows.Problem(tanh_mlp([IN, 4, OUT]), loss, (x, y))
    except Exception as exc:  # noqa: BLE001 - the property is about which exceptions escape
        _check_error(exc, ["inputs", "targets", "data", "label", "loss", "dtype", "batch", "empty", "model"])
        return
    value, grad = problem.value_and_grad(problem.theta0)
    assert math.isfinite(float(value)) and bool(torch.isfinite(grad).all())


@st.composite
def simulate_arguments(draw):
    t = draw(st.sampled_from([
        [0.0, 0.5, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0], [], [0.0, 0.0, 1.0], [0.0, 1.0, 0.5], [0.0, math.nan],
        [[0.0, 1.0]], [0.0, 2.0, 4.0],
    ]))
    method = draw(st.sampled_from(["dopri5", "euler", "rk4", "bosh3", "not-a-method"]))
    options = draw(st.sampled_from([None, {"step_size": 0.25}]))
    theta_shape = draw(st.sampled_from(["ok", "ok", "short", "ensemble", "matrix3", "nan", "int"]))
    # a stiff rate blows explicit fixed steps up (an adaptive solver would crawl through it instead)
    rate = draw(st.sampled_from([1.0, 1.0, 1e6])) if method in ("euler", "rk4") and options else 1.0
    return t, method, options, theta_shape, rate


@given(simulate_arguments())
def test_simulate_arguments_succeed_or_name_the_problem(case):
    t, method, options, theta_shape, rate = case
    problem = flows.data.quadratic(torch.diag(torch.tensor([rate, 1.0])), torch.tensor([1.0, -1.0]))
    field = flows.rules.GradientFlow(problem)
    theta0 = {"ok": problem.theta0, "short": problem.theta0[:1], "ensemble": torch.stack([problem.theta0] * 2),
              "matrix3": torch.zeros(2, 2, 2, dtype=torch.float64),
              "nan": torch.tensor([math.nan, 1.0], dtype=torch.float64),
              "int": torch.tensor([1, 2])}[theta_shape]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traj = flows.simulate(field, theta0, t, method=method, options=options, progress=False)
    except Exception as exc:  # noqa: BLE001
        names = ["theta0", "t ", "t must", "method", "step", "non-finite", "diverge", "underflow", "stiff"]
        _check_error(exc, names)
        if isinstance(exc, flows.FlowDivergedError):  # the partial trajectory is kept and finite
            assert bool(torch.isfinite(exc.trajectory.theta).all())
        return
    assert bool(torch.isfinite(traj.theta).all()) and bool(torch.isfinite(traj.loss).all())
    assert traj.theta.shape[0] == len(traj.t)
