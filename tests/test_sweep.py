"""Sweeps on a real Dask LocalCluster with two worker processes (no mocks): results, failures, resume, lost workers."""

import os
import signal

import pytest
import torch

import flows
from flows.sweep import Grid, RunSpec, execute, run, run_path

TINY = {"dataset": "digits", "samples": 48, "hidden": [3], "t_end": 1.0, "points": 3, "metric_batch": 8}
DIVERGES = {"dataset": "teacher_student", "samples": 32, "hidden": [4], "method": "euler", "step_size": 5.0,
            "t_end": 5000.0, "points": 3}  # Euler at 5 ≫ 2/λ_max on a linear output layer: blows up by t ≈ 800


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    from flows.sweep import local_cluster

    with local_cluster(2) as cluster, Client(cluster) as connected:
        yield connected


def _numbers(table):
    keep = [c for c in table.columns if c not in ("wall_time_s", "versions", "error")]
    return table[keep].sort_values("run_id").reset_index(drop=True)


def test_grid_runs_match_serial_runs_bit_for_bit(client, tmp_path):
    grid = Grid(TINY, {"metric": ["euclidean", "layerwise"], "seed": [0, 1], "t_end": [0.5, 1.0]})
    result = run(grid, out=tmp_path, client=client, progress=False)
    assert (result.computed, result.skipped, result.failed) == (8, 0, 0)
    assert len(result.table) == 8 and set(result.table["status"]) == {"ok"}
    for spec in grid.specs():
        serial, row = execute(spec)  # in this process, one torch thread, as on the workers
        stored = flows.Trajectory.load(run_path(tmp_path, spec.run_id))
        assert torch.equal(stored.theta, serial.theta) and torch.equal(stored.t, serial.t)
        assert torch.equal(stored.metrics["test_loss"], serial.metrics["test_loss"])
        table_row = result.table.set_index("run_id").loc[spec.run_id]
        assert table_row["final_loss"] == row["final_loss"] == float(serial.loss[-1])
        assert table_row["test_accuracy"] == float(serial.metrics["test_accuracy"][-1])
    assert (tmp_path / "results.csv").is_file()


def test_a_diverging_run_is_recorded_and_the_others_complete(client, tmp_path):
    grid = Grid(TINY, {"seed": [0, 1]}, runs=(DIVERGES,))
    result = run(grid, out=tmp_path, client=client, progress=False)
    table = result.table.set_index("run_id")
    bad = RunSpec.from_dict({**TINY, **DIVERGES}).run_id
    assert table.loc[bad, "status"] == "diverged" and "non-finite" in table.loc[bad, "error"]
    assert run_path(tmp_path, bad).is_file()  # the partial trajectory up to the last finite state
    assert torch.isfinite(flows.Trajectory.load(run_path(tmp_path, bad)).theta).all()
    others = table.drop(index=bad)
    assert len(others) == 2 and set(others["status"]) == {"ok"} and result.failed == 1


def test_an_interrupted_sweep_resumes_with_only_the_missing_runs(client, tmp_path):
    grid = Grid(TINY, {"seed": [0, 1, 2, 3]})  # Euclidean runs: resuming is the point, not the metric
    seen = []

    def stop_after_two(row):
        seen.append(row["run_id"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(grid, out=tmp_path / "a", client=client, progress=False, on_result=stop_after_two)
    kept = flows.sweep.load(tmp_path / "a")
    assert len(kept) == 2 and set(kept["run_id"]) == set(seen)
    resumed = run(grid, out=tmp_path / "a", client=client, progress=False)
    assert resumed.skipped == 2 and resumed.computed == 4 - 2
    again = run(grid, out=tmp_path / "a", client=client, progress=False)
    assert (again.computed, again.skipped) == (0, 4)
    whole = run(grid, out=tmp_path / "b", client=client, progress=False)
    assert _numbers(resumed.table).equals(_numbers(whole.table))


def test_a_worker_killed_mid_sweep_loses_no_run(client, tmp_path):
    grid = Grid({**TINY, "t_end": 3.0, "points": 4}, {"seed": [0, 1, 2, 3]})
    killed = []

    def kill_a_worker(row):
        if not killed:
            pids = client.run(os.getpid)  # worker address → pid; the nanny starts a new process
            victim = sorted(pids.values())[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    result = run(grid, out=tmp_path, client=client, progress=False, retries=2, on_result=kill_a_worker)
    assert killed and result.computed == 4 and set(result.table["status"]) == {"ok"}
    assert all(run_path(tmp_path, spec.run_id).is_file() for spec in grid.specs())
    client.wait_for_workers(2, timeout=60)


@pytest.mark.parametrize("text, needle", [
    ("[base]\nsamples = 10\n[grid]\nmetrc = ['euclidean']\n", "unknown field\\(s\\) \\['metrc'\\]"),
    ("[base]\nsamples = 'many'\n", "field 'samples' must be int or None"),
    ("[base\nsamples = 10\n", "not a valid TOML sweep file"),
    ("[base]\nrule = 'hebbian'\n", "unknown rule 'hebbian'"),
    ("[grids]\nseed = [0]\n", "unknown table\\(s\\) \\['grids'\\]"),
    ("[grid]\nseed = []\n", "field 'seed' must list at least one value"),
])
def test_a_malformed_sweep_file_names_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle):
        Grid.from_toml(path)


def test_run_ids_are_content_hashes_of_the_config():
    a = RunSpec.from_dict(TINY)
    assert a.run_id == RunSpec.from_dict(dict(reversed(list(TINY.items())))).run_id
    assert a.run_id != RunSpec.from_dict({**TINY, "seed": 1}).run_id
    assert len(Grid(TINY, {"seed": [0, 0, 1]})) == 2  # a repeated config is one run
