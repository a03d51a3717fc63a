"""Contraction rates at scale: matrix-free Lanczos on a ≈100 000-parameter MLP, and dense against matrix-free.

    python benchmarks/contraction.py [--quick] [--only lyapunov] [--threads 2]

1. The top eigenvalue of sym(J) for the gradient-flow field of an MLP 64-320-240-10 (N = 100 250) on 256
   digits, matrix-free (scipy eigsh over Jacobian–vector and vector–Jacobian products). Target: ≤ 60 s on
   2 cores.
2. At N ≈ 2 000 (MLP 64-27-10): the dense route (full Jacobian, then an eigen-solve) against Lanczos, time and
   agreement.
3. The moving-metric rate (with Ġ, a forward-mode product of the metric) against the frozen rate, both by Lanczos
   in the Layerwise metric, for the layerwise flow of the N = 100 250 MLP. Target: moving ≤ 2× frozen.
4. The top-5 finite-time Lyapunov exponents over a digits MLP run (64-32-10, N = 2 410, 200 RK4 steps) against the
   plain solve of the same run. Target: ≤ 3×.
Each candidate is timed in its own block after its own warm-up. ``--only lyapunov`` runs section 4 alone (and
writes no results file, so a partial run never replaces the full one); ``--threads`` sets torch's thread count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import setup, time_each, write_results  # noqa: E402

import flows  # noqa: E402
from flows.contraction import lyapunov, rate  # noqa: E402


def digits_flow(sizes, samples):
    x, y = flows.data.digits(samples)
    problem = flows.Problem(flows.data.mlp(sizes), "cross_entropy", (x, y))
    return problem, flows.rules.GradientFlow(problem)


def lyapunov_section(quick: bool) -> dict:
    """4. The top-5 Lyapunov exponents against the plain solve of the same run (min and median ratios)."""
    lproblem, lfield = digits_flow([64, 32, 10], 256)
    steps, horizon = (40, 4.0) if quick else (200, 20.0)
    grid = torch.linspace(0, horizon, 21, dtype=lproblem.dtype)
    options = {"step_size": horizon / steps}
    plain = time_each({"plain": lambda: flows.simulate(lfield, lproblem.theta0, grid, method="rk4",
                                                       options=options, progress=False, record=False)},
                      repeats=3, warmup=1)
    spectrum = {}
    lyap = time_each({"lyapunov": lambda: spectrum.__setitem__("r", lyapunov(
        lfield, lproblem.theta0, grid, k=5, method="rk4", options=options, progress=False))}, repeats=3, warmup=1)
    lyap_ratio = lyap["lyapunov"]["min_s"] / plain["plain"]["min_s"]
    print(f"Lyapunov top-5, N = {lproblem.num_params}, {steps} RK4 steps: plain {plain['plain']['min_s']:.2f} s, "
          f"with 5 tangents {lyap['lyapunov']['min_s']:.2f} s: {lyap_ratio:.2f}× (target ≤ 3); exponents "
          f"{[round(float(e), 4) for e in spectrum['r'].exponents]}", flush=True)
    median_ratio = lyap["lyapunov"]["median_s"] / plain["plain"]["median_s"]
    print(f"  medians: plain {plain['plain']['median_s']:.3f} s, lyapunov {lyap['lyapunov']['median_s']:.3f} s, "
          f"ratio {median_ratio:.2f}×", flush=True)
    return {"N": lproblem.num_params, "steps": steps, "k": 5, "plain": plain["plain"], "lyapunov": lyap["lyapunov"],
            "ratio_min": lyap_ratio, "ratio_median": median_ratio, "target": 3.0, "met": lyap_ratio <= 3.0,
            "exponents": [float(e) for e in spectrum["r"].exponents]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--only", choices=["lyapunov"], default=None,
                        help="run one section alone (no results file is written)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    setup(threads=args.threads)
    if args.only == "lyapunov":
        lyapunov_section(args.quick)
        return 0

    big_sizes = [64, 64, 48, 10] if args.quick else [64, 320, 240, 10]
    problem, field = digits_flow(big_sizes, 64 if args.quick else 256)
    start = time.perf_counter()
    big = rate(field, problem.theta0, method="lanczos", eigenvalues=False)
    big_time = time.perf_counter() - start
    print(f"MLP {'-'.join(map(str, big_sizes))}: N = {problem.num_params}, λ_max(sym J) = {big.mu:.6e} "
          f"by Lanczos in {big_time:.1f} s (target ≤ 60 s)", flush=True)

    small, small_field = digits_flow([64, 27, 10], 256)
    results = {}
    timing = time_each({
        "dense": lambda: results.__setitem__("dense", rate(small_field, small.theta0, method="dense",
                                                           eigenvalues=False)),
        "lanczos": lambda: results.__setitem__("lanczos", rate(small_field, small.theta0, method="lanczos",
                                                               eigenvalues=False)),
    }, repeats=2 if args.quick else 5, warmup=1)
    rel = abs(results["lanczos"].mu - results["dense"].mu) / abs(results["dense"].mu)
    speedup = timing["dense"]["median_s"] / timing["lanczos"]["median_s"]
    print(f"MLP 64-27-10: N = {small.num_params}: dense {timing['dense']['median_s']:.2f} s, Lanczos "
          f"{timing['lanczos']['median_s']:.2f} s (dense/Lanczos {speedup:.1f}×), relative difference {rel:.1e}")
    # 3. moving against frozen, Layerwise metric, same field and state
    moving_sizes = [64, 64, 48, 10] if args.quick else big_sizes
    mproblem, _ = digits_flow(moving_sizes, 64 if args.quick else 256)
    layerwise = flows.metrics.Layerwise(mproblem, mu=1e-2, metric_batch=8)
    mfield = flows.rules.GradientFlow(mproblem, layerwise)
    rates = {}
    frozen_t = time_each({"frozen": lambda: rates.__setitem__("frozen", rate(
        mfield, mproblem.theta0, layerwise, method="lanczos", eigenvalues=False, moving=False, tol=1e-6))},
        repeats=1 if not args.quick else 2, warmup=1)
    moving_t = time_each({"moving": lambda: rates.__setitem__("moving", rate(
        mfield, mproblem.theta0, layerwise, method="lanczos", eigenvalues=False, moving=True, tol=1e-6))},
        repeats=1 if not args.quick else 2, warmup=1)
    moving_ratio = moving_t["moving"]["min_s"] / frozen_t["frozen"]["min_s"]
    print(f"moving-metric rate, N = {mproblem.num_params}, Layerwise: frozen {frozen_t['frozen']['min_s']:.1f} s "
          f"(μ = {rates['frozen'].mu:+.4e}), moving {moving_t['moving']['min_s']:.1f} s "
          f"(μ = {rates['moving'].mu:+.4e}); "
          f"moving/frozen {moving_ratio:.2f} (target ≤ 2)", flush=True)

    lyap_result = lyapunov_section(args.quick)

    path = write_results("contraction", {
        "quick": args.quick,
        "large": {"sizes": big_sizes, "N": problem.num_params, "samples": problem.batch_size, "mu": big.mu,
                  "time_s": big_time, "target_s": 60.0, "met": big_time <= 60.0},
        "n2000": {"N": small.num_params, **timing, "dense_over_lanczos": speedup, "mu_dense": results["dense"].mu,
                  "mu_lanczos": results["lanczos"].mu, "relative_difference": rel},
        "moving_rate": {"N": mproblem.num_params, "metric": "Layerwise(mu=1e-2, metric_batch=8)",
                        "frozen": frozen_t["frozen"], "moving": moving_t["moving"], "mu_frozen": rates["frozen"].mu,
                        "mu_moving": rates["moving"].mu, "moving_over_frozen_min": moving_ratio, "target": 2.0,
                        "met": moving_ratio <= 2.0},
        "lyapunov": lyap_result,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
