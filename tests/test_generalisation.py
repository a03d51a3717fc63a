"""Generalisation along runs: held-out sets checked at construction, the gap in stability_experiment against a
closed form, and the train-against-test figures drawing exactly the recorded numbers."""

import numpy as np
import pytest
import torch

import flows
from tests.conftest import tanh_mlp


@pytest.mark.parametrize("data, eval_data, needle", [
    (None, {"test": (torch.zeros(3, 64), torch.tensor([0, 10, 2]))}, r"eval set 'test' has class label 10, outside"),
    (None, {"probe": (torch.zeros(2, 64), torch.tensor([-1, 0]))}, r"eval set 'probe' has class label -1"),
    (None, {"empty": (torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))}, r"eval set 'empty' is empty"),
    ((torch.zeros(4, 64), torch.tensor([0, 1, 2, 12])), None, r"the training data has class label 12"),
    ((torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)), None, r"the training data is empty"),
])
def test_bad_labels_and_empty_sets_are_refused_by_name(data, eval_data, needle):
    if data is None:
        data = flows.data.digits(20)
    with pytest.raises(ValueError, match=needle):
        flows.Problem(tanh_mlp([64, 4, 10]), "cross_entropy", data, eval_data=eval_data)


def test_labels_within_the_output_width_are_accepted():
    x, y = flows.data.digits(40)
    problem = flows.Problem(tanh_mlp([64, 4, 10]), "cross_entropy", (x, y),
                            eval_data={"test": (x[:3], torch.tensor([0, 9, 5]))})
    assert set(problem.evaluate(problem.theta0)) == {"test_loss", "test_accuracy"}


def _closed_form_path(xx, yy, t, d):
    """Linear least squares from θ₀ = 0 under the Euclidean flow: θ(t) = (I − e^{−Ht}) θ*, H = XᵀX/n."""
    n = len(xx)
    h = xx.T @ xx / n
    star = torch.linalg.solve(h, xx.T @ yy[:, 0] / n)
    eye = torch.eye(d, dtype=torch.float64)
    return torch.stack([(eye - torch.linalg.matrix_exp(-h * s)) @ star for s in t])


def _half_mse(xx, yy, path):
    return 0.5 * ((path @ xx.T - yy[:, 0]) ** 2).mean(-1)  # (1/n) Σ ½ r², the library's "mse"


def test_stability_experiment_measures_the_gap_of_the_closed_form_flow():
    from flows.contraction import stability_experiment

    g = torch.Generator().manual_seed(1)
    d, pool = 3, 300
    x = torch.randn(pool, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[0.7], [-1.0], [2.0]], dtype=torch.float64) + 0.5 * torch.randn(pool, 1, generator=g,
                                                                                             dtype=torch.float64)
    model = torch.nn.Linear(d, 1, bias=False, dtype=torch.float64)
    torch.nn.init.zeros_(model.weight)
    sizes, draws, seed = [15, 30, 60], 3, 4
    t = torch.linspace(0, 3, 4, dtype=torch.float64)
    result = stability_experiment(model, "mse", (x, y), sizes, t, seed=seed, draws=draws, rtol=1e-8, atol=1e-10,
                                  progress=False)
    single = stability_experiment(model, "mse", (x, y), sizes, t, seed=seed, rtol=1e-8, atol=1e-10,
                                  progress=False)
    assert result.sup_distance == single.sup_distance  # the sensitivity runs are those of draw 0
    assert single.draws == 1 and result.draws == draws and result.bound_exponent == -0.5

    expected_gaps, expected_train, expected_test = [], [], []
    for n in sizes:
        curves, train_end, test_end = [], [], []
        for k in range(draws):
            order = torch.randperm(pool, generator=torch.Generator().manual_seed(seed + k))
            xs, ys = x[order], y[order]
            path = _closed_form_path(xs[:n], ys[:n], t, d)
            train, test = _half_mse(xs[:n], ys[:n], path), _half_mse(xs[max(sizes) + 1:], ys[max(sizes) + 1:], path)
            curves.append(test - train)
            train_end.append(float(train[-1]))
            test_end.append(float(test[-1]))
        expected_gaps.append(torch.stack(curves).mean(0))
        expected_train.append(np.mean(train_end))
        expected_test.append(np.mean(test_end))
    for i in range(len(sizes)):
        assert result.gap_curves[i] == pytest.approx(expected_gaps[i].tolist(), rel=1e-6, abs=1e-9)
        assert result.train_loss[i] == pytest.approx(expected_train[i], rel=1e-6)
        assert result.test_loss[i] == pytest.approx(expected_test[i], rel=1e-6)
        assert result.gap[i] == pytest.approx(result.test_loss[i] - result.train_loss[i], rel=1e-9, abs=1e-12)
    ends = np.array([float(c[-1]) for c in expected_gaps])
    keep = ends > 0
    assert keep.sum() >= 2  # this pool and seed give a positive mean gap at (at least) two sizes
    slope = np.polyfit(np.log(np.array(sizes, dtype=float)[keep]), np.log(ends[keep]), 1)[0]
    assert result.exponents["gap"] == pytest.approx(slope, rel=1e-5)
    rows = result.rows()
    assert [r["n"] for r in rows] == sizes and rows[0]["gap"] == result.gap[0]
    with pytest.raises(ValueError, match="draws"):
        stability_experiment(model, "mse", (x, y), sizes, t, draws=0)


def _digits_runs():
    x, y = flows.data.digits(split="train", n=150)
    x_test, y_test = flows.data.digits(split="test", n=60)
    problem = flows.Problem(tanh_mlp([64, 6, 10]), "cross_entropy", (x, y), eval_data={"test": (x_test, y_test)})
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    runs = {name: flows.simulate(flows.rules.GradientFlow(problem, metric), problem.theta0, t, method="rk4",
                                 options={"step_size": 0.25}, progress=False)
            for name, metric in [("euclidean", flows.metrics.Euclidean()),
                                 ("diagonal", flows.metrics.Diagonal(torch.full((problem.num_params,), 2.0)))]}
    return problem, runs


def test_generalisation_figure_draws_the_recorded_losses_gap_and_accuracy(tmp_path):
    problem, runs = _digits_runs()
    fig = flows.plot.generalisation(runs)
    loss_ax, gap_ax, acc_ax = fig.axes
    x_test, y_test = problem.eval_data["test"]
    for i, traj in enumerate(runs.values()):
        direct = torch.stack([torch.nn.functional.cross_entropy(problem.outputs(th, x_test), y_test)
                              for th in traj.theta])
        assert torch.allclose(traj.metrics["test_loss"], direct, rtol=0, atol=1e-12)
        train_line, test_line = loss_ax.lines[2 * i], loss_ax.lines[2 * i + 1]
        assert np.array_equal(train_line.get_ydata(), traj.loss.numpy())
        assert np.allclose(test_line.get_ydata(), direct.numpy(), rtol=0, atol=1e-12)
        assert test_line.get_linestyle() == "--" and test_line.get_color() == train_line.get_color()
        assert np.allclose(gap_ax.lines[i].get_ydata(), (direct - traj.loss).numpy(), rtol=0, atol=1e-12)
        # accuracy: the held-out one recorded, the training one by a forward pass of the problem in memory
        test_acc = (problem.outputs(traj.theta, x_test).argmax(-1) == y_test).double().mean(-1)
        train_acc = (problem.outputs(traj.theta).argmax(-1) == problem.targets).double().mean(-1)
        assert np.array_equal(acc_ax.lines[2 * i].get_ydata(), test_acc.numpy())
        assert np.array_equal(acc_ax.lines[2 * i + 1].get_ydata(), train_acc.numpy())
    # after save/load the figure still draws (no training accuracy without the problem), evaluations on x
    loaded = {name: flows.Trajectory.load(traj.save(tmp_path / f"{name}.npz")) for name, traj in runs.items()}
    fig = flows.plot.generalisation(loaded, x="nfe")
    assert len(fig.axes[2].lines) == len(loaded) + 2  # one test-accuracy line per run + two legend proxies
    assert list(fig.axes[0].lines[0].get_xdata()) == runs["euclidean"].stats["nfe_at_output"]


def test_loss_curves_add_dashed_test_curves_and_generalisation_refuses_runs_without_them():
    problem, runs = _digits_runs()
    fig = flows.plot.loss_curves(runs)
    dashed = [line for line in fig.axes[0].lines if line.get_linestyle() == "--" and len(line.get_ydata())]
    assert len(dashed) == 2
    assert np.array_equal(dashed[0].get_ydata(), runs["euclidean"].metrics["test_loss"].numpy())
    assert not [line for line in flows.plot.loss_curves(runs, test=None).axes[0].lines
                if line.get_linestyle() == "--"]
    plain = flows.Problem(tanh_mlp([64, 6, 10]), "cross_entropy", flows.data.digits(40))
    bare = flows.simulate(flows.rules.GradientFlow(plain, flows.metrics.Euclidean()), plain.theta0,
                          torch.linspace(0, 1, 3, dtype=torch.float64), progress=False)
    assert len(flows.plot.loss_curves({"bare": bare}).axes[0].lines) == 1
    with pytest.raises(ValueError, match="'bare' has no recorded loss on the eval set 'test'"):
        flows.plot.generalisation({"bare": bare})
    with pytest.raises(ValueError, match="x must be"):
        flows.plot.loss_curves(runs, x="steps")
