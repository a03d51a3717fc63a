"""Contraction rates at scale: matrix-free Lanczos on a ≈100 000-parameter MLP, and dense against matrix-free.

    python benchmarks/contraction.py [--quick]

1. The top eigenvalue of sym(J) for the gradient-flow field of an MLP 64-320-240-10 (N = 100 250) on 256
   digits, matrix-free (scipy eigsh over Jacobian–vector and vector–Jacobian products). Target: ≤ 60 s on
   2 cores.
2. At N ≈ 2 000 (MLP 64-27-10): the dense route (full Jacobian, then an eigen-solve) against Lanczos, time and
   agreement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import setup, time_side_by_side, write_results  # noqa: E402

import flows  # noqa: E402
from flows.contraction import rate  # noqa: E402


def digits_flow(sizes, samples):
    x, y = flows.data.digits(samples)
    problem = flows.Problem(flows.data.mlp(sizes), "cross_entropy", (x, y))
    return problem, flows.rules.GradientFlow(problem)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args(argv)
    setup(threads=2)

    big_sizes = [64, 64, 48, 10] if args.quick else [64, 320, 240, 10]
    problem, field = digits_flow(big_sizes, 64 if args.quick else 256)
    start = time.perf_counter()
    big = rate(field, problem.theta0, method="lanczos", eigenvalues=False)
    big_time = time.perf_counter() - start
    print(f"MLP {'-'.join(map(str, big_sizes))}: N = {problem.num_params}, λ_max(sym J) = {big.mu:.6e} "
          f"by Lanczos in {big_time:.1f} s (target ≤ 60 s)", flush=True)

    small, small_field = digits_flow([64, 27, 10], 256)
    results = {}
    timing = time_side_by_side({
        "dense": lambda: results.__setitem__("dense", rate(small_field, small.theta0, method="dense",
                                                           eigenvalues=False)),
        "lanczos": lambda: results.__setitem__("lanczos", rate(small_field, small.theta0, method="lanczos",
                                                               eigenvalues=False)),
    }, repeats=2 if args.quick else 5)
    rel = abs(results["lanczos"].mu - results["dense"].mu) / abs(results["dense"].mu)
    speedup = timing["dense"]["median_s"] / timing["lanczos"]["median_s"]
    print(f"MLP 64-27-10: N = {small.num_params}: dense {timing['dense']['median_s']:.2f} s, Lanczos "
          f"{timing['lanczos']['median_s']:.2f} s (dense/Lanczos {speedup:.1f}×), relative difference {rel:.1e}")
    path = write_results("contraction", {
        "quick": args.quick,
        "large": {"sizes": big_sizes, "N": problem.num_params, "samples": problem.batch_size, "mu": big.mu,
                  "time_s": big_time, "target_s": 60.0, "met": big_time <= 60.0},
        "n2000": {"N": small.num_params, **timing, "dense_over_lanczos": speedup, "mu_dense": results["dense"].mu,
                  "mu_lanczos": results["lanczos"].mu, "relative_difference": rel},
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
