"""The public contract at its edges: each test reproduces a way a new user tripped over the library (issue 10)."""

import math
import warnings
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import flows
from flows.contraction import lognorm
from flows.simulate import FixedGridWarning
from tests.conftest import tanh_mlp


def _digits_problem(n=40, sizes=(64, 5, 10)):
    x, y = flows.data.digits(n)
    return flows.Problem(tanh_mlp(list(sizes)), "cross_entropy", (x, y))


# -- contract ------------------------------------------------------------------------------------------------


def test_natural_is_reachable_after_import_flows():
    import importlib

    import flows as fresh

    importlib.reload(fresh)
    assert fresh.natural.angle(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, -1.0])) == pytest.approx(math.pi / 4)


def test_action_of_a_simulated_trajectory_needs_nothing_more(tmp_path):
    problem = flows.data.quadratic(torch.diag(torch.tensor([1.0, 4.0])), torch.tensor([1.0, -1.0]))
    metric = flows.metrics.Euclidean()
    traj = flows.simulate(flows.rules.GradientFlow(problem, metric), problem.theta0, torch.linspace(0, 1, 33),
                          rtol=1e-10, atol=1e-12, progress=False)
    report = flows.action.action(traj, metric)
    drop = float(problem.loss(traj.theta[0]) - problem.loss(traj.theta[-1]))
    # on the gradient flow the action equals the loss drop (MATH.md §3)
    assert float(report.total[-1]) == pytest.approx(drop, rel=1e-5)  # Hermite quadrature, h = 1/32
    loaded = flows.Trajectory.load(traj.save(tmp_path / "q.npz"))
    with pytest.raises(ValueError, match="problem="):
        flows.action.action(loaded, metric)
    again = flows.action.action(loaded, metric, field=traj.field)
    assert float(again.total[-1]) == pytest.approx(float(report.total[-1]), rel=1e-12)


def test_lognorm_accepts_numpys_ord_convention():
    a = torch.tensor([[1.0, 2.0], [3.0, -4.0]], dtype=torch.float64)
    assert lognorm(a, 1) == lognorm(a, "1") == 4.0  # MATH.md §5 test vector
    assert lognorm(a, math.inf) == lognorm(a, "inf") == 3.0
    assert lognorm(a, 2) == pytest.approx(float(np.linalg.eigvalsh([[1.0, 2.5], [2.5, -4.0]])[-1]), abs=1e-14)
    with pytest.raises(ValueError, match="Frobenius"):
        lognorm(a, "fro")
    with pytest.raises(ValueError, match="ord=3"):
        lognorm(a, 3)


def test_lognorm_of_a_non_square_matrix_is_a_clear_error():
    with pytest.raises(ValueError, match=r"square matrix J, got shape \(2, 3\)"):
        lognorm(torch.ones(2, 3), 2)


# -- silently wrong or obscure inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("which, data, needle", [
    ("nan inputs", (torch.tensor([[float("nan")] * 64]), torch.tensor([1])), "inputs contain 64 non-finite"),
    ("inf targets", (torch.zeros(2, 64), torch.tensor([[0.0] * 9 + [math.inf]] * 2)), "targets contain 2 non-finite"),
    ("empty", (torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)), "empty"),
])
def test_problem_refuses_non_finite_or_empty_data(which, data, needle):
    loss = "mse" if data[1].is_floating_point() else "cross_entropy"
    with pytest.raises(ValueError, match=needle):
        flows.Problem(tanh_mlp([64, 3, 10]), loss, data)


def test_problem_refuses_a_loss_that_is_not_a_scalar():
    def per_sample(y, t):
        return ((y - t) ** 2).sum(1)

    with pytest.raises(ValueError, match=r"must return a scalar.*\(5,\)"):
        flows.Problem(tanh_mlp([3, 2]), per_sample, (torch.randn(5, 3), torch.randn(5, 2)))


def test_dropout_in_training_mode_is_refused_with_its_name():
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 10)).double()
    x, y = flows.data.digits(30)
    with pytest.raises(ValueError, match=r"2 \(Dropout\).*model\.eval\(\)"):
        flows.Problem(model, "cross_entropy", (x, y))
    model.eval()  # dropout off: the flow is a deterministic vector field
    problem = flows.Problem(model, "cross_entropy", (x, y))
    assert torch.equal(problem.grad(problem.theta0), problem.grad(problem.theta0))


def test_batchnorm_in_training_mode_is_refused_with_its_name():
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 10)).double()
    x, y = flows.data.digits(30)
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\)"):
        flows.Problem(model, "cross_entropy", (x, y))
    flows.Problem(model.eval(), "cross_entropy", (x, y))


def test_integer_inputs_get_a_clear_error():
    x, y = flows.data.digits(20)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        flows.Problem(tanh_mlp([64, 4, 10]), "cross_entropy", ((x * 16).long(), y))


def test_integer_token_inputs_to_an_embedding_model_are_fine():
    model = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    tokens = torch.randint(0, 7, (10, 2))
    problem = flows.Problem(model, "mse", (tokens, torch.randn(10, 2, dtype=torch.float64)))
    assert problem.grad(problem.theta0).shape == (problem.num_params,)


def test_cross_entropy_targets_out_of_range_get_a_clear_error():
    x, y = flows.data.digits(20)
    y = y.clone()
    y[3] = 12
    with pytest.raises(ValueError, match=r"class label 12, outside 0…9"):
        flows.Problem(tanh_mlp([64, 4, 10]), "cross_entropy", (x, y))


def test_euler_without_step_size_warns_with_the_step_taken():
    problem = _digits_problem()
    field = flows.rules.GradientFlow(problem)
    with pytest.warns(FixedGridWarning, match="steps of up to 50"):
        flows.simulate(field, problem.theta0, [0.0, 50.0], method="euler", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a step size the grid is the user's: no warning
        traj = flows.simulate(field, problem.theta0, [0.0, 1.0], method="euler", options={"step_size": 0.25},
                              progress=False)
    assert traj.stats["steps"] == 4


def test_stop_event_already_true_at_t0_stops_at_once():
    problem = _digits_problem()
    field = flows.rules.GradientFlow(problem)
    level = float(problem.loss(problem.theta0)) + 1.0  # L(θ₀) is already below it
    traj = flows.simulate(field, problem.theta0, torch.linspace(0, 5, 6), event=flows.events.loss_below(level),
                          progress=False)
    assert traj.stats["stopped_by_event"] and len(traj) == 1
    assert torch.equal(traj.theta[0], problem.theta0) and float(traj.t[0]) == 0.0


def test_trajectory_save_expands_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    traj = flows.Trajectory(torch.linspace(0, 1, 3), torch.zeros(3, 2))
    written = traj.save("~/run.npz")
    assert written == tmp_path / "run.npz" and written.is_file()
    assert not (tmp_path / "~").exists()
    assert torch.equal(flows.Trajectory.load("~/run.npz").theta, traj.theta)


def test_trajectory_load_of_a_truncated_or_foreign_file_names_it(tmp_path):
    good = flows.Trajectory(torch.linspace(0, 1, 3), torch.randn(3, 4)).save(tmp_path / "good.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated.npz' is not a readable flows trajectory"):
        flows.Trajectory.load(truncated)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.arange(3))
    with pytest.raises(ValueError, match="foreign.npz' is not a readable flows trajectory"):
        flows.Trajectory.load(foreign)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, header=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickled.npz' is not a readable flows trajectory"):
        flows.Trajectory.load(pickled)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        flows.Trajectory.load(tmp_path / "missing.npz")
    assert zipfile.is_zipfile(good)


def test_angle_of_a_zero_vector_is_an_error_not_nan():
    with pytest.raises(ValueError, match="grad is the zero vector"):
        flows.natural.angle(torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="update is the zero vector"):
        flows.natural.angle(torch.zeros(3), torch.ones(3))


def test_kappa_min_at_right_angle_is_infinite_and_units_are_explicit():
    assert flows.natural.kappa_min(math.pi / 2) == math.inf
    assert flows.natural.kappa_min(90.0, degrees=True) == math.inf
    assert flows.natural.kappa_min(60.0, degrees=True) == pytest.approx(13.928203230275509, rel=1e-12)  # MATH.md §4
    assert flows.natural.kappa_min(math.radians(30)) == pytest.approx(3.0, rel=1e-12)
    with pytest.raises(ValueError, match="degrees=True"):
        flows.natural.kappa_min(60)  # 60 radians is no angle between a rule and −∇L
    tensor = flows.natural.kappa_min(torch.tensor([0.0, math.pi / 2]))
    assert tensor[0] == 1.0 and math.isinf(tensor[1])
