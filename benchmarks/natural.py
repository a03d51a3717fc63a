"""The minimum-condition metric at scale: solve M_opt⁻¹ v at N = 10⁷ in O(N) time and memory.

    python benchmarks/natural.py [--quick]

M_opt = (‖y‖²/(yᵀv))(I + ŷŷᵀ − v̂v̂ᵀ) is a scaled identity plus a rank-2 term (MATH.md §4), so construction,
``apply`` and ``solve`` are a handful of passes over N-vectors. Reported: medians over repeats after warm-up,
the residual ‖M_opt v − y‖/‖y‖, and the peak resident memory added, against one N-vector (8N bytes).
Target: solve at N = 10⁷ in ≤ 1 s.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import setup, time_side_by_side, write_results  # noqa: E402

from flows.natural import min_condition_metric  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 10⁵ (a smoke run)")
    args = parser.parse_args(argv)
    setup(threads=2)
    n = 100_000 if args.quick else 10_000_000
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    v = -g + 0.8 * torch.randn(n, generator=gen, dtype=torch.float64)  # an effective update, ψ ≈ 39°
    rhs = torch.randn(n, generator=gen, dtype=torch.float64)
    before = peak_rss_bytes()
    metric = min_condition_metric(v, g)
    x = metric.solve(None, rhs)
    added = peak_rss_bytes() - before
    residual = float(torch.linalg.vector_norm(metric.apply(None, x) - rhs) / torch.linalg.vector_norm(rhs))
    mapped = float(torch.linalg.vector_norm(metric.apply(None, v) + g) / torch.linalg.vector_norm(g))
    timing = time_side_by_side({
        "construct": lambda: min_condition_metric(v, g),
        "solve": lambda: metric.solve(None, rhs),
        "apply": lambda: metric.apply(None, rhs),
    }, repeats=5 if args.quick else 9)
    print(f"N = {n:,}, float64, {torch.get_num_threads()} threads")
    for name, row in timing.items():
        print(f"  {name:<10} median {row['median_s'] * 1e3:9.2f} ms")
    print(f"  residual ‖M x − b‖/‖b‖ = {residual:.1e}; ‖M v + ∇L‖/‖∇L‖ = {mapped:.1e}; "
          f"condition {metric.condition():.4g}")
    print(f"  peak memory added by construction + solve: {added / 2**20:.0f} MiB = {added / (8 * n):.1f} N-vectors")
    met = timing["solve"]["median_s"] <= 1.0
    print(f"target solve ≤ 1 s: {'met' if met else 'NOT met'}")
    path = write_results("natural", {"quick": args.quick, "N": n, **timing, "residual": residual,
                                     "update_residual": mapped, "peak_added_bytes": added,
                                     "peak_added_vectors": added / (8 * n), "target_s": 1.0, "met": met})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
