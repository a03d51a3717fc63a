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
    code = main(["demo", "--out", str(out), "--hidden", "8", "--t-end", "2", "--points", "5",
                 "--metric-batch", "4", "--quiet"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["euclidean.npz", "loss.png", "natural.npz", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    printed = capsys.readouterr().out
    for row in summary["runs"]:
        line = next(line for line in printed.splitlines() if line.startswith(row["run"] + " "))
        cells = line.split()
        assert float(cells[1]) == pytest.approx(row["final_loss"], rel=1e-3)
        assert float(cells[2]) == pytest.approx(row["accuracy"], abs=1e-3)
        assert int(cells[4]) == row["nfe"]
        traj = flows.Trajectory.load(out / f"{row['run']}.npz")
        assert float(traj.loss[-1]) == row["final_loss"]
        assert traj.stats["nfe"] == row["nfe"]
    # both flows start from one θ₀ and lower the loss
    e, n = (flows.Trajectory.load(out / f"{k}.npz") for k in ("euclidean", "natural"))
    assert torch.equal(e.theta[0], n.theta[0])
    assert e.loss[-1] < e.loss[0] and n.loss[-1] < n.loss[0]


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
