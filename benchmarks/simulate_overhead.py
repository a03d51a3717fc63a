"""Overhead of flows.simulate over a hand-written Euler loop, and ensemble throughput.

    python benchmarks/simulate_overhead.py [--quick]

1. Euler on the digits MLP 64-32-32-10 (float64) at batch 256 and at the full batch of 1 797: three candidates
   make the same field calls — a hand-written loop ``θ ← θ + h·f(t, θ)``, bare ``torchdiffeq.odeint`` on the
   field, and ``flows.simulate(method="euler")`` (no recording, no progress bar: the solve alone). Each
   candidate is timed in its own block after its own warm-up (a cheap call interleaved with others runs slower
   than alone), in ``rounds`` rounds of blocks, and min and median over all its repeats are reported. Ratios are
   ours / hand loop from the mins (the least disturbed runs) and from the medians; the per-step overhead in µs
   is (simulate − hand loop) / steps from the mins. Targets: ratio ≤ 1.10 at batch 256, ≤ 1.03 at full batch.
2. An ensemble of E = 64 members in one vmapped solve against 64 separate solves (speed-up reported).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torchdiffeq import odeint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import setup, write_results  # noqa: E402

import flows  # noqa: E402

TARGETS = {"batch 256": 1.10, "full batch": 1.03}


def digits_flow(hidden=(32, 32), samples=None):
    x, y = flows.data.digits(samples)
    problem = flows.Problem(flows.data.mlp([64, *hidden, 10]), "cross_entropy", (x, y))
    return problem, flows.rules.GradientFlow(problem, flows.metrics.Euclidean())


def hand_euler(field, theta0, t_out, h):
    """The loop a user would write: fixed steps of size h, states kept at the output times."""
    theta = theta0.clone()
    steps_per_output = round(float(t_out[1] - t_out[0]) / h)
    states = [theta]
    time_ = float(t_out[0])
    for _ in range(len(t_out) - 1):
        for _ in range(steps_per_output):
            theta = theta + h * field(torch.tensor(time_, dtype=theta.dtype), theta)
            time_ += h
        states.append(theta)
    return torch.stack(states)


def time_block(fn, repeats: int, warmup: int = 2) -> list[float]:
    """``warmup`` untimed calls, then ``repeats`` timed calls of fn alone; seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def time_in_blocks(candidates: dict, repeats: int, rounds: int) -> dict[str, dict]:
    """Each candidate in its own block after its own warm-up; ``rounds`` rounds of blocks, so slow drift of the
    machine's load shows up in every candidate rather than in one."""
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            times[name] += time_block(fn, repeats)
    return {name: {"min_s": min(ts), "median_s": statistics.median(ts), "times_s": ts} for name, ts in times.items()}


def overhead_case(label, problem, field, steps, h, repeats, rounds):
    t_out = torch.linspace(0, steps * h, 11, dtype=torch.float64)
    theta0 = problem.theta0

    def ours():
        return flows.simulate(field, theta0, t_out, method="euler", options={"step_size": h}, progress=False,
                              record=False)

    def bare():
        return odeint(field, theta0, t_out, method="euler", options={"step_size": h})

    def hand():
        return hand_euler(field, theta0, t_out, h)

    # the same computation: identical states from the same field calls in the same order
    traj, ref, plain = ours(), hand(), bare()
    max_diff = max(float((traj.theta - ref).abs().max()), float((plain - ref).abs().max()))
    assert max_diff <= 1e-12, f"{label}: simulate, odeint and the hand loop disagree by {max_diff}"
    assert traj.stats["nfe"] == steps
    gradient = time_in_blocks({"gradient": lambda: problem.grad(theta0)}, repeats=max(10, repeats), rounds=1)
    timing = time_in_blocks({"hand_loop": hand, "odeint": bare, "simulate": ours}, repeats, rounds)
    row = {"batch": problem.batch_size, "N": problem.num_params, "steps": steps, "max_state_difference": max_diff,
           "gradient_ms_min": 1e3 * gradient["gradient"]["min_s"], **timing}
    for name in ("odeint", "simulate"):
        row[f"{name}_ratio_min"] = timing[name]["min_s"] / timing["hand_loop"]["min_s"]
        row[f"{name}_ratio_median"] = timing[name]["median_s"] / timing["hand_loop"]["median_s"]
        row[f"{name}_overhead_us_per_step"] = 1e6 * (timing[name]["min_s"] - timing["hand_loop"]["min_s"]) / steps
    row["target_ratio"] = TARGETS[label]
    row["target_met"] = row["simulate_ratio_min"] <= TARGETS[label]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (a smoke run)")
    args = parser.parse_args(argv)
    setup(threads=2)
    repeats, rounds = (3, 1) if args.quick else (7, 2)
    h = 0.05
    rows = {}
    for label, samples, steps in (("batch 256", 256, 40 if args.quick else 400),
                                  ("full batch", None, 20 if args.quick else 200)):
        problem, field = digits_flow(samples=samples)
        rows[label] = overhead_case(label, problem, field, steps, h, repeats, rounds)

    # ensemble throughput
    problem, field = digits_flow(samples=256)
    members = 64
    ens_steps = 10 if args.quick else 40
    t_ens = torch.linspace(0, ens_steps * h, 5, dtype=torch.float64)
    starts = problem.theta0 + 0.05 * torch.randn(members, problem.num_params, dtype=torch.float64,
                                                 generator=torch.Generator().manual_seed(0))

    def ensemble():
        return flows.simulate(field, starts, t_ens, method="euler", options={"step_size": h}, progress=False,
                              record=False)

    def separate():
        return [flows.simulate(field, s, t_ens, method="euler", options={"step_size": h}, progress=False,
                               record=False) for s in starts]

    together, apart = ensemble(), separate()
    ens_diff = max(float((together.theta[:, i] - tr.theta).abs().max()) for i, tr in enumerate(apart))
    ens_timing = time_in_blocks({"ensemble_vmapped": ensemble, "separate_solves": separate},
                                repeats=max(1, repeats // 3), rounds=1)
    speedup = ens_timing["separate_solves"]["min_s"] / ens_timing["ensemble_vmapped"]["min_s"]

    print(f"digits MLP 64-32-32-10, float64, {torch.get_num_threads()} threads, Euler h = {h}, {repeats} repeats × "
          f"{rounds} rounds per candidate, each in its own block after its own warm-up")
    head = (f"{'case':<12}{'N':>6}{'steps':>7}{'grad ms':>9}{'hand min/med (s)':>19}{'odeint ratio':>14}"
            f"{'simulate min/med (s)':>23}{'ratio min':>11}{'ratio med':>11}{'µs/step':>9}{'target':>8}")
    print(head)
    for label, r in rows.items():
        print(f"{label:<12}{r['N']:>6}{r['steps']:>7}{r['gradient_ms_min']:>9.3f}"
              f"{r['hand_loop']['min_s']:>10.3f}/{r['hand_loop']['median_s']:<8.3f}{r['odeint_ratio_min']:>14.3f}"
              f"{r['simulate']['min_s']:>12.3f}/{r['simulate']['median_s']:<10.3f}{r['simulate_ratio_min']:>11.3f}"
              f"{r['simulate_ratio_median']:>11.3f}{r['simulate_overhead_us_per_step']:>9.1f}"
              f"{'met' if r['target_met'] else 'NOT met':>8}")
    print(f"\nensemble of {members}, {ens_steps} Euler steps: one vmapped solve "
          f"{ens_timing['ensemble_vmapped']['min_s']:.3f} s, separate solves "
          f"{ens_timing['separate_solves']['min_s']:.3f} s (mins), speed-up {speedup:.1f}× "
          f"(max member difference {ens_diff:.1e})")
    path = write_results("simulate_overhead", {
        "quick": args.quick,
        "method": "each candidate in its own block after 2 warm-up calls; min and median over repeats × rounds; "
                  "ratios ours / hand loop; overhead per step from the mins",
        "model": "digits MLP 64-32-32-10, cross-entropy, float64",
        "step_size": h, "repeats": repeats, "rounds": rounds,
        "euler": rows,
        "ensemble": {"members": members, "steps": ens_steps, **ens_timing, "speedup_from_min": speedup,
                     "max_member_difference": ens_diff},
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
