"""Time per natural direction G(θ)⁻¹∇L for the metrics of flows, float64, 2 threads.

    python benchmarks/metrics.py [--quick]

Rows: plain gradient (the baseline), Layerwise (fused sweep), K-FAC, NaturalGradient (Woodbury over the whole
network), BlockDiagonal (dense diagonal blocks) and the dense GGN solve, on MLP 64-128-128-10 at batch 32 and
MLP 64-256-256-10 at batch 128 (digits inputs, cross-entropy, Fisher output metric). Dense methods run only
where their matrices fit in memory, once (they take minutes), the others each in its own block after its own
warm-up (min and median; ratios from both)
after warm-up. A width sweep at batch 32 fits the exponent of time in N.

Targets (issue 3): Layerwise ≤ 6× the plain gradient at batch 32; ≥ 100× faster than the dense solve wherever
the dense one fits; fitted exponent ≈ 1 for Layerwise against ≈ 3 for dense.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import setup, time_each, write_results  # noqa: E402

import flows  # noqa: E402
from flows.metrics import KFAC, BlockDiagonal, Layerwise, NaturalGradient  # noqa: E402

MU = 1e-2


def problem_for(sizes, batch):
    x, y = flows.data.digits()
    return flows.Problem(flows.data.mlp(sizes), "cross_entropy", (x[:batch], y[:batch]))


def memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def dense_fits(n: int) -> bool:
    """A dense N × N matrix plus its Cholesky factor in at most 60 % of physical memory."""
    return 2 * n * n * 8 <= 0.6 * memory_bytes()


def once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dense_ggn_direction(problem, theta):
    g = problem.grad(theta)
    dense = NaturalGradient(problem, MU).matrix(theta)
    return torch.cholesky_solve(g[:, None], torch.linalg.cholesky(dense))[:, 0]


def fast_candidates(problem, theta, with_natural=True):
    layerwise, kfac = Layerwise(problem, mu=MU), KFAC(problem, damping=MU)
    out = {
        "gradient": lambda: problem.grad(theta),
        "layerwise": lambda: layerwise.natural_direction(theta),
        "kfac": lambda: kfac.solve(theta, problem.grad(theta)),
    }
    if with_natural:
        natural = NaturalGradient(problem, mu=MU)
        out["natural_gradient"] = lambda: natural.solve(theta, problem.grad(theta))
    return out


def run_config(sizes, batch, repeats, run_dense):
    problem = problem_for(sizes, batch)
    theta = problem.theta0
    d = batch * sizes[-1]
    timing = time_each(fast_candidates(problem, theta), repeats=repeats)
    row = {"sizes": sizes, "batch": batch, "N": problem.num_params, "d": d,
           **{k: v["median_s"] for k, v in timing.items()},
           "min_s": {k: v["min_s"] for k, v in timing.items()}}
    largest_block = max(b.size for b in problem.blocks)
    if run_dense and dense_fits(largest_block):
        bd = BlockDiagonal(problem, mu=MU)
        row["block_diagonal_dense"] = once(lambda: bd.solve(theta, problem.grad(theta)))
    else:
        row["block_diagonal_dense"] = None
    row["dense_ggn"] = once(lambda: dense_ggn_direction(problem, theta)) if (
        run_dense and dense_fits(problem.num_params)) else None
    row["layerwise_over_gradient"] = row["layerwise"] / row["gradient"]  # medians
    row["layerwise_over_gradient_min"] = row["min_s"]["layerwise"] / row["min_s"]["gradient"]
    row["kfac_over_gradient"] = row["kfac"] / row["gradient"]
    row["dense_over_layerwise"] = None if row["dense_ggn"] is None else row["dense_ggn"] / row["layerwise"]
    return row


def fit_exponent(ns, ts) -> float:
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def width_sweep(widths, dense_widths, batch, repeats):
    rows = []
    for w in widths:
        problem = problem_for([64, w, w, 10], batch)
        timing = time_each(fast_candidates(problem, problem.theta0, with_natural=False), repeats=repeats)
        rows.append({"width": w, "N": problem.num_params, **{k: v["median_s"] for k, v in timing.items()}})
    dense_rows = []
    for w in dense_widths:
        problem = problem_for([64, w, w, 10], batch)
        dense_ggn_direction(problem, problem.theta0)  # warm-up at this size
        dense_rows.append({"width": w, "N": problem.num_params,
                           "dense_ggn": min(once(lambda p=problem: dense_ggn_direction(p, p.theta0))
                                            for _ in range(2))})
    exponents, tail = {}, {}
    for name, table in (("gradient", rows), ("layerwise", rows), ("kfac", rows), ("dense_ggn", dense_rows)):
        ns, ts = [r["N"] for r in table], [r[name] for r in table]
        exponents[name] = fit_exponent(ns, ts)
        tail[name] = fit_exponent(ns[-3:], ts[-3:])  # the largest sizes, where compute outweighs fixed overheads
    return rows, dense_rows, exponents, tail


def fmt(value, scale=1e3):
    return "-" if value is None else f"{value * scale:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, no minutes-long dense solves")
    args = parser.parse_args(argv)
    setup(threads=2)
    repeats = 3 if args.quick else 15
    configs = [([64, 32, 32, 10], 8), ([64, 64, 64, 10], 16)] if args.quick else [([64, 128, 128, 10], 32),
                                                                                  ([64, 256, 256, 10], 128)]
    rows = []
    for sizes, batch in configs:
        print(f"timing MLP {'-'.join(map(str, sizes))}, batch {batch} …", flush=True)
        rows.append(run_config(sizes, batch, repeats, run_dense=True))
    widths = [16, 32, 64] if args.quick else [32, 64, 128, 256, 512, 1024, 2048]
    dense_widths = [8, 12, 16] if args.quick else [16, 24, 32, 48, 64, 80, 96]
    print("width sweep …", flush=True)
    sweep, dense_sweep, exponents, tail = width_sweep(widths, dense_widths, batch=32 if not args.quick else 8,
                                                repeats=max(3, repeats // 3))

    names = ["gradient", "layerwise", "kfac", "natural_gradient", "block_diagonal_dense", "dense_ggn"]
    print(f"\ntime per natural direction (ms), float64, {torch.get_num_threads()} threads, μ = {MU}")
    print(f"{'network':<18}{'batch':>6}{'N':>8}{'d':>6}" + "".join(f"{n:>22}" for n in names) + f"{'LW/grad':>9}")
    for r in rows:
        print(f"{'-'.join(map(str, r['sizes'])):<18}{r['batch']:>6}{r['N']:>8}{r['d']:>6}"
              + "".join(f"{fmt(r[n]):>22}" for n in names) + f"{r['layerwise_over_gradient']:>9.2f}")
    print(f"\nwidth sweep at batch {32 if not args.quick else 8} (ms):")
    print(f"{'width':>6}{'N':>9}{'gradient':>11}{'layerwise':>11}{'kfac':>9}")
    for r in sweep:
        print(f"{r['width']:>6}{r['N']:>9}{fmt(r['gradient']):>11}{fmt(r['layerwise']):>11}{fmt(r['kfac']):>9}")
    for r in dense_sweep:
        print(f"{r['width']:>6}{r['N']:>9}   dense GGN {fmt(r['dense_ggn'])}")
    print("fitted exponent of time in N, all sizes: " + ", ".join(f"{k} {v:.2f}" for k, v in exponents.items()))
    print("fitted exponent of time in N, three largest sizes: " + ", ".join(f"{k} {v:.2f}" for k, v in tail.items()))

    first = rows[0]
    dense_ratios = [r["dense_over_layerwise"] for r in rows if r["dense_over_layerwise"] is not None]
    targets = {
        "layerwise_over_gradient_at_batch32": first["layerwise_over_gradient"],
        "layerwise_over_gradient_max": 6.0,
        "dense_over_layerwise_min_measured": min(dense_ratios) if dense_ratios else None,
        "dense_over_layerwise_min": 100.0,
        "layerwise_exponent": exponents["layerwise"],
        "dense_exponent": exponents["dense_ggn"],
        "layerwise_exponent_largest3": tail["layerwise"],
        "dense_exponent_largest3": tail["dense_ggn"],
    }
    targets["met"] = bool(first["layerwise_over_gradient"] <= 6.0 and dense_ratios and min(dense_ratios) >= 100)
    print(f"\nLayerwise / gradient at batch {first['batch']}: {first['layerwise_over_gradient']:.2f} (medians), "
          f"{first['layerwise_over_gradient_min']:.2f} (mins) (target ≤ 6); "
          f"dense / Layerwise: {', '.join(f'{x:.0f}×' for x in dense_ratios) or 'no dense run'} (target ≥ 100×)")
    path = write_results("metrics", {"quick": args.quick, "mu": MU, "configs": rows, "width_sweep": sweep,
                                     "dense_width_sweep": dense_sweep, "exponents": exponents,
                                     "exponents_largest3": tail, "targets": targets})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
