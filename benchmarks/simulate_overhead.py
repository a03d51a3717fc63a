"""Overhead of flows.simulate over a hand-written Euler loop, and ensemble throughput.

    python benchmarks/simulate_overhead.py [--quick]

1. Euler on the digits MLP (64-32-10, full batch of 1 797, float64): ``flows.simulate(method="euler")``
   against a loop ``θ ← θ + h·f(t, θ)`` making the same field calls and recording the same loss and
   gradient norm at the output times. Target: median ratio ≤ 1.10.
2. An ensemble of E = 64 members in one vmapped solve against 64 separate solves (speed-up reported).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import setup, time_side_by_side, write_results  # noqa: E402

import flows  # noqa: E402
from flows.simulate import measure  # noqa: E402


def digits_flow(hidden=32, samples=None):
    x, y = flows.data.digits(samples)
    problem = flows.Problem(flows.data.mlp([64, hidden, 10]), "cross_entropy", (x, y))
    return problem, flows.rules.GradientFlow(problem, flows.metrics.Euclidean())


def hand_euler(field, problem, theta0, t_out, h, record=True):
    """The loop a user would write: fixed steps of size h, states kept at the output times."""
    theta = theta0.clone()
    steps_per_output = round(float(t_out[1] - t_out[0]) / h)
    states = [theta]
    time = float(t_out[0])
    for _ in range(len(t_out) - 1):
        for _ in range(steps_per_output):
            theta = theta + h * field(torch.tensor(time, dtype=theta.dtype), theta)
            time += h
        states.append(theta)
    states = torch.stack(states)
    if record:
        return states, *measure(problem, states)
    return states


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (a smoke run)")
    args = parser.parse_args(argv)
    setup(threads=2)
    repeats = 3 if args.quick else 9
    n_steps = 40 if args.quick else 400
    h = 0.05
    problem, field = digits_flow()
    t_out = torch.linspace(0, n_steps * h, 11, dtype=torch.float64)
    theta0 = problem.theta0

    def ours(record=True):
        return flows.simulate(field, theta0, t_out, method="euler", options={"step_size": h}, progress=False,
                              record=record)

    # same computation: identical states (same field calls in the same order)
    traj, ref = ours(), hand_euler(field, problem, theta0, t_out, h)
    max_diff = float((traj.theta - ref[0]).abs().max())
    assert max_diff <= 1e-12, f"simulate and the hand loop disagree by {max_diff}"
    assert traj.stats["nfe"] == n_steps

    rows = {}
    for record in (True, False):
        timing = time_side_by_side({
            "simulate": lambda record=record: ours(record),
            "hand_loop": lambda record=record: hand_euler(field, problem, theta0, t_out, h, record),
        }, repeats=repeats)
        ratio = timing["simulate"]["median_s"] / timing["hand_loop"]["median_s"]
        rows["recorded" if record else "bare"] = {**timing, "ratio": ratio}

    # ensemble throughput
    members = 64
    ens_steps = 10 if args.quick else 40
    t_ens = torch.linspace(0, ens_steps * h, 5, dtype=torch.float64)
    starts = theta0 + 0.05 * torch.randn(members, problem.num_params, dtype=torch.float64,
                                         generator=torch.Generator().manual_seed(0))

    def ensemble():
        return flows.simulate(field, starts, t_ens, method="euler", options={"step_size": h}, progress=False,
                              record=False)

    def separate():
        return [flows.simulate(field, s, t_ens, method="euler", options={"step_size": h}, progress=False,
                               record=False) for s in starts]

    together, apart = ensemble(), separate()
    ens_diff = max(float((together.theta[:, i] - tr.theta).abs().max()) for i, tr in enumerate(apart))
    ens_timing = time_side_by_side({"ensemble_vmapped": ensemble, "separate_solves": separate},
                                   repeats=max(1, repeats // 3))
    speedup = ens_timing["separate_solves"]["median_s"] / ens_timing["ensemble_vmapped"]["median_s"]

    print(f"digits MLP 64-32-10, N = {problem.num_params}, B = {problem.batch_size}, float64, "
          f"{torch.get_num_threads()} threads, Euler h = {h}, {n_steps} steps, 11 outputs, {repeats} repeats")
    print(f"{'case':<28}{'simulate (s)':>14}{'hand loop (s)':>15}{'ratio':>8}")
    for name, row in rows.items():
        print(f"{'euler, ' + name:<28}{row['simulate']['median_s']:>14.4f}{row['hand_loop']['median_s']:>15.4f}"
              f"{row['ratio']:>8.3f}")
    print(f"\nensemble of {members}, {ens_steps} Euler steps: one vmapped solve "
          f"{ens_timing['ensemble_vmapped']['median_s']:.3f} s, separate solves "
          f"{ens_timing['separate_solves']['median_s']:.3f} s, speed-up {speedup:.1f}× "
          f"(max member difference {ens_diff:.1e})")
    target_met = rows["recorded"]["ratio"] <= 1.10
    print(f"target ratio ≤ 1.10: {'met' if target_met else 'NOT met'} ({rows['recorded']['ratio']:.3f})")
    path = write_results("simulate_overhead", {
        "quick": args.quick,
        "problem": {"N": problem.num_params, "batch": problem.batch_size, "hidden": 32},
        "euler": {"step_size": h, "steps": n_steps, "outputs": len(t_out), "repeats": repeats, **rows,
                  "max_state_difference": max_diff},
        "ensemble": {"members": members, "steps": ens_steps, **ens_timing, "speedup": speedup,
                     "max_member_difference": ens_diff},
        "target": {"ratio_max": 1.10, "met": target_met},
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
