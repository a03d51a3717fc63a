"""Named eval sets: recorded along every simulation, equal to direct forward passes, kept through save/load."""

import pytest
import torch

import flows
from tests.conftest import tanh_mlp


def _problem(**kwargs):
    x, y = flows.data.digits(120)
    return flows.Problem(tanh_mlp([64, 8, 10]), "cross_entropy", (x[:80], y[:80]),
                         eval_data={"test": (x[80:], y[80:]), "probe": (x[:5], y[:5])}, **kwargs)


def test_recorded_eval_metrics_equal_direct_forward_passes(tmp_path):
    problem = _problem()
    field = flows.rules.GradientFlow(problem, flows.metrics.Euclidean())
    traj = flows.simulate(field, problem.theta0, torch.linspace(0, 2, 5), progress=False)
    x, y = problem.eval_data["test"]
    for i, theta in enumerate(traj.theta):
        out = torch.func.functional_call(problem.model, problem.unflatten(theta), (x,))
        direct_loss = torch.nn.functional.cross_entropy(out, y)
        direct_acc = (out.argmax(1) == y).double().mean()
        assert abs(float(traj.metrics["test_loss"][i] - direct_loss)) <= 1e-12
        assert float(traj.metrics["test_accuracy"][i]) == float(direct_acc)
    assert set(traj.metrics) == {"test_loss", "test_accuracy", "probe_loss", "probe_accuracy"}
    assert traj.field is field and traj.problem is problem

    back = flows.Trajectory.load(traj.save(tmp_path / "run.npz"))
    assert set(back.metrics) == set(traj.metrics)
    for key, value in traj.metrics.items():
        assert torch.equal(back.metrics[key], value)
    assert back.field is None and back.problem is None


def test_ensemble_eval_metrics_have_one_column_per_member():
    problem = _problem()
    field = flows.rules.GradientFlow(problem, flows.metrics.Euclidean())
    theta0 = torch.stack([problem.theta0, 0.5 * problem.theta0])
    traj = flows.simulate(field, theta0, torch.linspace(0, 1, 3), method="rk4", options={"step_size": 0.25},
                          progress=False)
    assert traj.metrics["test_loss"].shape == (3, 2)
    single = traj.member(1)
    assert torch.equal(single.metrics["test_loss"], traj.metrics["test_loss"][:, 1])
    assert torch.allclose(single.metrics["test_loss"][-1], problem.evaluate(traj.theta[-1, 1])["test_loss"],
                          rtol=0, atol=1e-12)


@pytest.mark.parametrize("eval_data, needle", [
    ({"test": (torch.zeros(3, 63), torch.zeros(3, dtype=torch.long))}, "'test'"),
    ({"held": (torch.zeros(3, 64), torch.zeros(4, dtype=torch.long))}, "'held'"),
    ({"soft": (torch.zeros(3, 64), torch.zeros(3, 10))}, "'soft'"),
    ([1, 2], "eval_data must map"),
])
def test_bad_eval_data_is_refused_with_the_set_named(eval_data, needle):
    x, y = flows.data.digits(20)
    with pytest.raises((ValueError, TypeError), match=needle):
        flows.Problem(tanh_mlp([64, 4, 10]), "cross_entropy", (x, y), eval_data=eval_data)
