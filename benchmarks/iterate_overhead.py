"""Overhead of flows.iterate over a hand-written minibatch SGD loop.

    python benchmarks/iterate_overhead.py [--quick]

The digits MLP 64-32-10 (float64, cross-entropy, all 1 797 samples), minibatches of 32, 200 steps at η = 0.1. Both
candidates make the same gradient calls in the same order — ``problem.grad(θ, indices)`` on the batches of one
seeded permutation per epoch — and end at the same state (checked to 1e-12):

* hand loop: ``θ ← θ − η·problem.grad(θ, idx)`` over batches cut from ``torch.randperm`` per epoch;
* ``flows.iterate(GD(problem), θ₀, 200, lr=η, batch_size=32, progress=False, record=False)``: the loop alone
  (every state kept, no full-batch measurements);
* for information, ``record=True, record_every=200``: the same plus the full-batch loss, ‖∇L‖ at θ₀ and θ_200
  (two full-batch gradients, each worth ~56 minibatch ones).

Each candidate is timed in its own block after its own warm-up (``_common.time_each``), in ``rounds`` rounds of
blocks (so a change of the machine's load during the run reaches every candidate, not one), min and median over all
its repeats; ratio = iterate / hand loop from the mins and from the medians. Target: ratio ≤ 1.10.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import setup, time_each, write_results  # noqa: E402

import flows  # noqa: E402
from flows.discrete import GD  # noqa: E402

TARGET = 1.10


def hand_sgd(problem, theta0, steps, lr, batch, seed):
    """The loop a user would write: one permutation per epoch from a seeded generator, consecutive batches."""
    gen = torch.Generator().manual_seed(seed)
    theta = theta0.clone()
    k = 0
    while k < steps:
        for idx in torch.randperm(problem.batch_size, generator=gen).split(batch):
            if k == steps:
                break
            theta = theta - lr * problem.grad(theta, idx)
            k += 1
    return theta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (a smoke run)")
    args = parser.parse_args(argv)
    setup(threads=2)
    steps, repeats, rounds = (40, 3, 1) if args.quick else (200, 3, 10)
    lr, batch, seed = 0.1, 32, 0
    x, y = flows.data.digits()
    problem = flows.Problem(flows.data.mlp([64, 32, 10], seed=0), "cross_entropy", (x, y))
    theta0 = problem.theta0

    def hand():
        return hand_sgd(problem, theta0, steps, lr, batch, seed)

    def ours():
        return flows.iterate(GD(problem), theta0, steps, lr=lr, batch_size=batch, seed=seed, progress=False,
                             record=False)

    def ours_recording():
        return flows.iterate(GD(problem), theta0, steps, lr=lr, batch_size=batch, seed=seed, progress=False,
                             record_every=steps)

    difference = float((ours().final - hand()).abs().max())
    assert difference <= 1e-12, f"iterate and the hand loop disagree by {difference}"
    candidates = {"hand_loop": hand, "iterate": ours, "iterate_record_ends": ours_recording}
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, block in time_each(candidates, repeats).items():
            times[name] += block["times_s"]
    timing = {name: {"min_s": min(ts), "median_s": statistics.median(ts), "times_s": ts} for name, ts in times.items()}
    rows = {}
    for name in ("iterate", "iterate_record_ends"):
        rows[name] = {"ratio_min": timing[name]["min_s"] / timing["hand_loop"]["min_s"],
                      "ratio_median": timing[name]["median_s"] / timing["hand_loop"]["median_s"],
                      "overhead_us_per_step": 1e6 * (timing[name]["min_s"] - timing["hand_loop"]["min_s"]) / steps}
    met = rows["iterate"]["ratio_min"] <= TARGET
    print(f"digits MLP 64-32-10 (N = {problem.num_params}), {problem.batch_size} samples, batch {batch}, {steps} SGD "
          f"steps, float64, {torch.get_num_threads()} threads; {rounds} rounds × {repeats} repeats per "
          "candidate, each in its own block")
    print(f"{'candidate':<22}{'min (s)':>10}{'median (s)':>12}{'ratio min':>11}{'ratio med':>11}{'µs/step':>9}")
    for name, t in timing.items():
        r = rows.get(name)
        extra = (f"{r['ratio_min']:>11.3f}{r['ratio_median']:>11.3f}{r['overhead_us_per_step']:>9.1f}" if r
                 else f"{1:>11.3f}{1:>11.3f}{0:>9.1f}")
        print(f"{name:<22}{t['min_s']:>10.4f}{t['median_s']:>12.4f}{extra}")
    print(f"target: iterate / hand loop ≤ {TARGET} (from the mins): {'met' if met else 'NOT met'}; states agree to "
          f"{difference:.1e}")
    path = write_results("iterate_overhead", {
        "quick": args.quick,
        "method": "each candidate in its own block after 2 warm-up calls (time_each), rounds of blocks; min and "
                  "median over rounds × repeats; ratios ours / hand loop",
        "model": "digits MLP 64-32-10, cross-entropy, float64, all 1797 samples",
        "steps": steps, "lr": lr, "batch_size": batch, "repeats": repeats, "rounds": rounds,
        "max_state_difference": difference,
        "timing": timing, "ratios": rows, "target_ratio": TARGET, "target_met": met,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
