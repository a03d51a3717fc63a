"""The `flows` command: demo and simulate in quick configurations; the table agrees with summary.json."""

import json

import pytest
import torch

import flows
from flows.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "simulate" in out


def test_demo_writes_outputs_and_its_table_matches_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--hidden", "6", "--t-end", "1", "--points", "5",
                 "--metric-batch", "4", "--quiet"])
    assert code == 0
    rules = ["euclidean", "feedback_alignment", "layerwise", "natural"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{r}.npz" for r in rules] + ["action.png", "feedback_alignment_natural.png", "generalisation.png",
                                       "loss.png", "summary.json", "summary.md", "trajectories_pca.png"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["n_train"] == 1347 and summary["data"]["n_test"] == 450
    x_train, y_train = flows.data.digits(split="train")
    x_test, y_test = flows.data.digits(split="test")
    model = flows.data.mlp([64, 6, 10], seed=0)
    param_names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def model_params(theta):
        pieces = torch.split(theta, [s.numel() for s in shapes])
        return {n: p.reshape(s) for n, p, s in zip(param_names, pieces, shapes, strict=True)}

    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("run "))
    names = header.split()
    for row in summary["runs"]:
        line = next(line for line in printed.splitlines() if line.startswith(row["run"] + " "))
        cells = dict(zip(names, line.split()))
        assert float(cells["final_loss"]) == pytest.approx(row["final_loss"], rel=1e-3)
        assert float(cells["accuracy"]) == pytest.approx(row["accuracy"], abs=1e-3)
        assert float(cells["test_loss"]) == pytest.approx(row["test_loss"], rel=1e-3)
        assert float(cells["test_accuracy"]) == pytest.approx(row["test_accuracy"], abs=1e-3)
        assert int(cells["nfe"]) == row["nfe"]
        assert float(cells["action"]) == pytest.approx(row["action"], rel=1e-3)
        assert float(cells["mu_start"]) == pytest.approx(row["mu_start"], rel=1e-2, abs=1e-3)
        traj = flows.Trajectory.load(out / f"{row['run']}.npz")
        assert float(traj.loss[-1]) == row["final_loss"]
        assert traj.stats["nfe"] == row["nfe"]
        # trained on the training split; test loss and accuracy are a forward pass on the held-out split at θ(T)
        out_train = torch.func.functional_call(model, model_params(traj.theta[-1]), (x_train,))
        assert row["accuracy"] == pytest.approx(float((out_train.argmax(1) == y_train).double().mean()), abs=1e-12)
        out_test = torch.func.functional_call(model, model_params(traj.theta[-1]), (x_test,))
        assert row["test_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(out_test, y_test)),
                                                 rel=0, abs=1e-12)
        assert row["test_accuracy"] == pytest.approx(float((out_test.argmax(1) == y_test).double().mean()), abs=1e-12)
        assert torch.equal(traj.metrics["test_loss"][-1], torch.tensor(row["test_loss"], dtype=torch.float64))
        # the action identity S = gap + (L(0) − L(T)) holds for every rule, up to the error of the quadratures
        # integrated inside the solve at rtol 1e-6 (measured: up to 1.1e-6 relative for feedback alignment)
        assert row["action"] == pytest.approx(row["gap"] + row["loss_drop"], rel=1e-5)
    rows = {r["run"]: r for r in summary["runs"]}
    assert rows["euclidean"]["gap"] <= 1e-8 * rows["euclidean"]["loss_drop"]  # Euclidean flow attains the bound
    # the stability row: μ₂ at θ₀ against a dense eigen-solve of sym J (jacrev), and its summary statistics
    problem = flows.Problem(flows.data.mlp([64, 6, 10], seed=0), "cross_entropy", (x_train, y_train))
    jac = torch.func.jacrev(lambda th: -problem.grad(th))(problem.theta0)
    dense_mu = float(torch.linalg.eigvalsh(0.5 * (jac + jac.T))[-1])
    euclid = rows["euclidean"]
    assert euclid["mu_start"] == pytest.approx(dense_mu, rel=1e-3, abs=1e-4)  # Lanczos at tol 1e-4
    for row in summary["runs"]:
        assert row["mu_max"] >= max(row["mu_start"], row["mu_end"]) and 0.0 <= row["contracting"] <= 1.0
    assert rows["feedback_alignment"]["psi_deg"] in printed
    trajs = [flows.Trajectory.load(out / f"{r}.npz") for r in rules]
    assert all(torch.equal(trajs[0].theta[0], tr.theta[0]) for tr in trajs)  # one θ₀
    # the three gradient flows lower the loss (dL/dt = −‖∇L‖²_{G⁻¹}); feedback alignment need not, early on
    assert all(tr.loss[-1] < tr.loss[0] for name, tr in zip(rules, trajs) if name != "feedback_alignment")


def test_figures_command_runs_one_example(tmp_path):
    assert main(["figures", "--only", "lti_metric", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "lti_metric.png").stat().st_size > 10_000


def test_simulate_command_saves_a_trajectory(tmp_path, capsys):
    path = tmp_path / "run.npz"
    code = main(["simulate", "--hidden", "6", "--samples", "50", "--method", "rk4", "--step-size", "0.1",
                 "--t-end", "1", "--points", "3", "--output", str(path), "--quiet"])
    assert code == 0 and path.exists()
    traj = flows.Trajectory.load(path)
    assert traj.metadata["solver"]["method"] == "rk4" and traj.stats["nfe"] == 40


def test_simulate_command_reports_bad_values(tmp_path, capsys):
    code = main(["simulate", "--method", "rk5", "--output", str(tmp_path / "x.npz"), "--quiet"])
    assert code == 1
    assert "unknown method 'rk5'" in capsys.readouterr().err


def test_compare_command_ranks_rules_by_their_gap(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--out", str(out), "--hidden", "6", "--samples", "60", "--t-end", "1", "--points", "5",
                 "--metric-batch", "8", "--quiet"])
    assert code == 0
    data = json.loads((out / "compare.json").read_text())
    rows = {r["rule"]: r for r in data["rows"]}
    euclid = rows["gradient flow (Euclidean)"]
    # in the Euclidean reference metric the Euclidean gradient flow attains the bound; the others do not
    assert euclid["gap"] <= 1e-6 * euclid["loss_drop"]
    assert all(r["gap"] > 1e-4 for name, r in rows.items() if name != "gradient flow (Euclidean)")
    assert (out / "compare.md").read_text().startswith("| rule |")
    printed = capsys.readouterr().out
    assert all(name in printed for name in rows)
    # test loss and accuracy per rule, on the 450 held-out digits; the printed table agrees with compare.json
    header = next(line for line in printed.splitlines() if line.startswith("| rule |"))
    names = [c.strip() for c in header.strip("|").split("|")]
    for name, row in rows.items():
        assert 0 < row["test_loss"] < 5 and round(row["test_accuracy"] * 450) == pytest.approx(
            row["test_accuracy"] * 450, abs=1e-9)
        line = next(line for line in printed.splitlines() if line.startswith(f"| {name} |"))
        cells = dict(zip(names, (c.strip() for c in line.strip("|").split("|"))))
        assert float(cells["test_loss"]) == pytest.approx(row["test_loss"], rel=1e-3)
        assert float(cells["test_accuracy"]) == pytest.approx(row["test_accuracy"], abs=1e-3)
        assert float(cells["accuracy"]) == pytest.approx(row["accuracy"], abs=1e-3)
        assert round(row["accuracy"] * 60) == pytest.approx(row["accuracy"] * 60, abs=1e-9)  # on the 60 trained
    # the Euclidean row against a forward pass on the held-out split at θ(T) of the same (deterministic) solve
    problem = flows.cli.digits_problem([6], samples=60)
    traj = flows.simulate(flows.rules.GradientFlow(problem, flows.metrics.Euclidean()), problem.theta0,
                          torch.linspace(0, 1, 5, dtype=torch.float64), rtol=1e-6, atol=1e-8,
                          action=flows.metrics.Euclidean(), progress=False)
    x_test, y_test = flows.data.digits(split="test")
    out_test = problem.outputs(traj.theta[-1], x_test)
    assert euclid["test_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(out_test, y_test)), abs=1e-12)
    assert euclid["test_accuracy"] == pytest.approx(float((out_test.argmax(1) == y_test).double().mean()), abs=1e-12)


def test_simulate_command_runs_discrete_sgd_and_the_sde_ensemble(tmp_path):
    sgd, sde = tmp_path / "sgd.npz", tmp_path / "sde.npz"
    common = ["--hidden", "6", "--samples", "64", "--t-end", "1", "--points", "3", "--quiet"]
    assert main(["simulate", "--rule", "sgd", "--lr", "0.25", "--batch-size", "16", "--seed", "3", *common,
                 "-o", str(sgd)]) == 0
    traj = flows.Trajectory.load(sgd)
    assert traj.metadata["dynamics"] == "discrete"
    assert (traj.metadata["lr"], traj.metadata["batch_size"], traj.metadata["seed"]) == (0.25, 16, 3)
    assert traj.stats["steps"] == 4 and float(traj.t[-1]) == 1.0  # t = k·lr
    assert main(["simulate", "--rule", "sde", "--lr", "0.25", "--batch-size", "16", "--paths", "3", *common,
                 "-o", str(sde)]) == 0
    ensemble = flows.Trajectory.load(sde)
    assert ensemble.metadata["dynamics"] == "sde" and ensemble.theta.shape[:2] == (3, 3)
    assert ensemble.loss.shape == (3, 3)


@pytest.mark.parametrize("flags, message", [
    (["--rule", "sgd"], "--lr must be > 0 for --rule other than flow, got None"),
    (["--rule", "adam", "--lr", "0"], "--lr must be > 0 for --rule other than flow, got 0.0"),
    (["--rule", "sgd", "--lr", "0.1", "--batch-size", "0"], "batch_size"),
    (["--rule", "sde", "--lr", "0.1", "--paths", "0"], "paths must be at least 1, got 0"),
    (["--rule", "sgd", "--lr", "0.1", "--metric", "layerwise"], "--metric layerwise has no effect on --rule sgd"),
])
def test_simulate_command_names_bad_training_flags(tmp_path, capsys, flags, message):
    try:
        code = main(["simulate", *flags, "--hidden", "4", "--samples", "32", "--quiet", "-o", str(tmp_path / "x.npz")])
    except SystemExit as exc:
        code, err = exc.code, str(exc)
    else:
        err = capsys.readouterr().err
    assert code not in (0, None) and message in err
