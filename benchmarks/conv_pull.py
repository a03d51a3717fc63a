"""The convolution pull (rows through a convolution's input Jacobian) in one piece against in row chunks.

    python benchmarks/conv_pull.py [--quick]

:func:`flows.modules.conv.pull_rows` forms the tap products T = l̃W̃ (k_h·k_w·C_in numbers per output position of
every row) and folds them back onto the input by sub-lattice copies and adds. Beyond ``PULL_WHOLE_BYTES`` of T it
works in chunks of rows whose T is about ``PULL_CHUNK_BYTES``. Per geometry (float64, 2 threads): the pull with T
in one piece ("whole") and in chunks ("chunked"), each in its own block after its own warm-up, in five passes of 7
calls; min and median over all 35, and the ratio chunked / whole from each; which of the two the library's
threshold picks. Then the natural direction of Layerwise and K-FAC on a CNN of two stride-1 convolutions
(conv 1→16 → tanh → conv 16→16 → tanh → Linear 1024→10, 3 × 3, padding 1, on the 8 × 8 digits, batch 32), whose
second convolution pulls 288 rows with a 20 MB T, with the threshold disabled ("whole") and as shipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import setup, time_passes, write_results  # noqa: E402

import flows  # noqa: E402
from flows.metrics import KFAC, Layerwise  # noqa: E402
from flows.modules import conv  # noqa: E402

NEVER = 1 << 62
# (rows, C_in, C_out, input side, kernel, stride, padding)
GEOMETRIES = [(288, 16, 16, 8, 3, 2, 1), (64, 32, 64, 16, 3, 2, 1), (144, 16, 16, 8, 3, 1, 1),
              (128, 8, 8, 16, 3, 1, 1), (288, 16, 16, 8, 3, 1, 1), (32, 64, 64, 16, 3, 1, 1),
              (288, 32, 32, 8, 3, 1, 1)]
QUICK_GEOMETRIES = [(8, 4, 4, 8, 3, 1, 1), (8, 4, 4, 8, 3, 2, 1)]


def with_threshold(whole_bytes: int, chunk_bytes: int, fn):
    def call():
        saved = conv.PULL_WHOLE_BYTES, conv.PULL_CHUNK_BYTES
        conv.PULL_WHOLE_BYTES, conv.PULL_CHUNK_BYTES = whole_bytes, chunk_bytes
        try:
            return fn()
        finally:
            conv.PULL_WHOLE_BYTES, conv.PULL_CHUNK_BYTES = saved
    return call


def pull_geometry(rows, c_in, c_out, side, kernel, stride, padding, rounds, repeats) -> dict:
    g = torch.Generator().manual_seed(0)
    out_side = (side + 2 * padding - (kernel - 1) - 1) // stride + 1
    lhs = torch.randn(rows, c_out, out_side, out_side, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=g, dtype=torch.float64)
    args = ((side, side), (stride, stride), (padding, padding), (1, 1))
    tap_bytes = rows * out_side ** 2 * kernel ** 2 * c_in * 8
    calls = {"whole": with_threshold(NEVER, conv.PULL_CHUNK_BYTES, lambda: conv.pull_rows(lhs, weight, *args)),
             "chunked": with_threshold(0, conv.PULL_CHUNK_BYTES, lambda: conv.pull_rows(lhs, weight, *args))}
    difference = float((calls["whole"]() - calls["chunked"]()).abs().max())
    timing = time_passes(calls, repeats, rounds)
    return {"rows": rows, "channels": [c_in, c_out], "side": side, "kernel": kernel, "stride": stride,
            "tap_mb": tap_bytes / 2 ** 20, "library_chunks": tap_bytes > conv.PULL_WHOLE_BYTES,
            "max_abs_difference": difference, **{f"{k}_min_s": v["min_s"] for k, v in timing.items()},
            **{f"{k}_median_s": v["median_s"] for k, v in timing.items()},
            "chunked_over_whole_min": timing["chunked"]["min_s"] / timing["whole"]["min_s"],
            "chunked_over_whole_median": timing["chunked"]["median_s"] / timing["whole"]["median_s"]}


def stride_one_cnn(batch: int, channels: int):
    x, y = flows.data.digits(images=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.Tanh(), nn.Conv2d(channels, channels, 3, padding=1),
                          nn.Tanh(), nn.Flatten(), nn.Linear(channels * 64, 10)).double()
    return flows.Problem(model, "cross_entropy", (x[:batch], y[:batch]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small geometries, one pass (a smoke run)")
    args = parser.parse_args(argv)
    setup(threads=2)
    rounds, repeats = (1, 2) if args.quick else (5, 7)
    rows = []
    print(f"{'rows':>5} {'C_in→C_out':>11} {'side':>4} {'s':>2} {'T (MB)':>7} {'whole (ms)':>11} {'chunked (ms)':>13} "
          f"{'ratio min (median)':>19}  library")
    for geometry in QUICK_GEOMETRIES if args.quick else GEOMETRIES:
        row = pull_geometry(*geometry, rounds, repeats)
        rows.append(row)
        print(f"{row['rows']:5d} {row['channels'][0]:>5}→{row['channels'][1]:<5} {row['side']:4d} {row['stride']:2d} "
              f"{row['tap_mb']:7.1f} {row['whole_min_s'] * 1e3:11.2f} {row['chunked_min_s'] * 1e3:13.2f} "
              f"{row['chunked_over_whole_min']:11.2f} ({row['chunked_over_whole_median']:.2f})  "
              f"{'chunked' if row['library_chunks'] else 'whole'}", flush=True)
    batch, channels = (4, 4) if args.quick else (32, 16)
    problem = stride_one_cnn(batch, channels)
    theta = problem.theta0
    metrics = {"layerwise": Layerwise(problem, mu=1e-2), "kfac": KFAC(problem, damping=1e-2)}
    calls = {"gradient": lambda: problem.grad(theta)}
    for name, metric in metrics.items():
        calls[f"{name}_whole"] = with_threshold(NEVER, conv.PULL_CHUNK_BYTES,
                                                lambda m=metric: m.natural_direction(theta))
        calls[name] = lambda m=metric: m.natural_direction(theta)
    timing = time_passes(calls, repeats, rounds)
    network = {"network": f"CNN conv 1→{channels} → conv {channels}→{channels} (stride 1) → Linear, batch {batch}",
               **{f"{k}_min_s": v["min_s"] for k, v in timing.items()},
               **{f"{k}_median_s": v["median_s"] for k, v in timing.items()}}
    print("\nstride-1 CNN, natural direction (ms, min / median): " + ", ".join(
        f"{k} {v['min_s'] * 1e3:.2f} / {v['median_s'] * 1e3:.2f}" for k, v in timing.items()))
    for name in metrics:
        network[f"{name}_over_whole_min"] = timing[name]["min_s"] / timing[f"{name}_whole"]["min_s"]
        print(f"{name}: as shipped / T whole {network[f'{name}_over_whole_min']:.2f} (min)")
    path = write_results("conv_pull", {"quick": args.quick, "whole_bytes": conv.PULL_WHOLE_BYTES,
                                       "chunk_bytes": conv.PULL_CHUNK_BYTES, "geometries": rows,
                                       "network": network})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
