"""Time per natural direction G(θ)⁻¹∇L for the metrics of flows, float64, 2 threads.

    python benchmarks/metrics.py [--quick]

Networks (cross-entropy on the digits, Fisher output metric, μ = 1e-2):
- MLP 64-128-128-10 at batch 32 and MLP 64-256-256-10 at batch 128;
- CNN: conv 1→16 (3×3, pad 1) → tanh → conv 16→16 (3×3, pad 1, stride 2) → tanh → Linear 256→10 on the 8×8 digit
  images, batch 32;
- a one-block transformer on token sequences (length 8, vocabulary 16, width 16, 2 heads, learned positions,
  LayerNorm, MLP 16-32-16, mean pooling, 10 classes), batch 32.

Rows: the plain gradient (the baseline), Layerwise (one sweep, no gradient pass), Layerwise on the generic path only
(``structured=False``, where it differs), K-FAC (KFC for the convolutions, exact blocks where no Kronecker form
exists; one sweep, the exact softmax-Fisher rows as for Layerwise), K-FAC with one sampled-Fisher row per sample
(``output="sampled_fisher"``: Martens & Grosse's Monte-Carlo Fisher, in the network configs only) and
NaturalGradient (Woodbury over the whole network). GradientFlow asks a metric with ``natural_direction`` for it, so
the fused calls are what a flow pays. Each candidate is timed in its own block after its own warm-up
(``_common.time_each``), in five or more passes over all candidates of 13 timed calls each (65 or more per
candidate): min over all of them, and the smallest of the passes' medians, so that a pass in which another process
held the cores does not decide a ratio; the ratios to the gradient from both. The machine's speed drifts by ±15 %
over tens of seconds, longer than a block: five short passes sample each candidate in five phases of that drift,
where two long ones (2 × 31, the earlier protocol) sampled two, and the min of a candidate that ran only in slow
phases decided its ratio. The machine gauge (:class:`MachineGauge`) is read before each config's first pass and
after every pass; a config in which no pass was quiet (the gauge on both sides within 10 % of the quietest reading
so far) gets more passes, up to ten, until one is (:func:`time_config`): the ratios are meant as quiet-machine
figures, and a busy neighbour slows the memory-heavy metrics more than the gradient. The gauge alone decides, never
the times; a config still busy after ten passes is reported as such. Per-pass mins, the gauge readings and which
passes were quiet are kept in the results file. The dense references (BlockDiagonal's dense blocks and the dense
GGN solve) run once per size, and only where they take seconds: MLP 64-32-32-10 at batch 32 and the CNN. Dropped
from earlier versions to keep a full run near five minutes on a quiet Zen 4 host: dense solves at MLP 64-128-128-10
(27 s and 54 s on a quiet machine) and the largest points of both width sweeps (width 2048; dense widths 80 and
96). On a busy Zen 3 host, where every config may get ten passes, a run took 11–22 minutes; on a quiet Intel
Xeon host about four.

Targets (issue 12): Layerwise ≤ 6× the gradient on the CNN and ≤ 4× on MLP 64-128-128-10 at batch 32; K-FAC ≤ 3×
on the CNN. Width sweep at batch 32: fitted exponent of time in N, ≈ 1 for Layerwise against ≈ 3 for dense.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import setup, summarize_passes, time_each, time_passes, write_results  # noqa: E402

import flows  # noqa: E402
from flows.metrics import KFAC, BlockDiagonal, Layerwise, NaturalGradient  # noqa: E402

MU = 1e-2


# --------------------------------------------------------------------------------------------------------
# The networks
# --------------------------------------------------------------------------------------------------------


def mlp_problem(sizes, batch):
    x, y = flows.data.digits()
    return flows.Problem(flows.data.mlp(sizes), "cross_entropy", (x[:batch], y[:batch]))


def cnn_problem(batch, channels=16):
    """``flows.data.cnn``: conv 1→c (3×3, pad 1) → tanh → conv c→c (3×3, pad 1, stride 2) → tanh → Linear(16c → 10)."""
    x, y = flows.data.digits(images=True)
    return flows.Problem(flows.data.cnn(channels, seed=0), "cross_entropy", (x[:batch], y[:batch]))


def transformer_problem(batch, length=8, vocab=16):
    """``flows.data.Transformer`` on ``flows.data.token_sum``: the sum of the tokens modulo 10 (every token matters,
    order does not)."""
    tokens, labels = flows.data.token_sum(batch, length=length, vocab=vocab, seed=1)
    return flows.Problem(flows.data.Transformer(vocab=vocab, length=length, seed=0), "cross_entropy",
                         (tokens, labels))


# --------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------


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


def candidates(problem, theta, *, natural=True, generic=False, sampled=False):
    """The timed calls. Metrics are built outside the timing; each call computes one natural direction."""
    layerwise, kfac = Layerwise(problem, mu=MU), KFAC(problem, damping=MU)
    out = {"gradient": lambda: problem.grad(theta),
           "layerwise": lambda: layerwise.natural_direction(theta)}
    if generic:
        plain = Layerwise(problem, mu=MU, structured=False)
        out["layerwise_generic"] = lambda: plain.natural_direction(theta)
    out["kfac"] = lambda: kfac.natural_direction(theta)
    if sampled:
        kfac_sampled = KFAC(problem, damping=MU, output="sampled_fisher")
        out["kfac_sampled"] = lambda: kfac_sampled.natural_direction(theta)
    if natural:
        natural_gradient = NaturalGradient(problem, mu=MU)
        out["natural_gradient"] = lambda: natural_gradient.solve(theta, problem.grad(theta))
    return out


def working(calls: dict) -> tuple[dict, dict]:
    """The calls that run, and for the others the error they raise (reported, not timed)."""
    ok, failed = {}, {}
    for name, fn in calls.items():
        try:
            fn()
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        else:
            ok[name] = fn
    return ok, failed


ROUNDS = 5  # passes per config
MAX_ROUNDS = 10  # passes per config while none of them has been quiet
QUIET = 1.10  # a pass is quiet when the gauge read on both sides of it is ≤ QUIET × the quietest reading so far


class MachineGauge:
    """The machine's state while a config is timed: the min time (s) of a fixed BLAS-heavy product, the
    Gram of a 288 × 2 304 float64 matrix (the benchmark CNN's largest Layerwise product), 2 threads. ≈ 3.7 ms on
    the Zen 4 host of runs 1–34 when it is quiet, ≈ 5.1 ms on the Zen 3 host of runs 35–37, 2.2–2.4 ms on the
    Intel host of runs 38–42; a neighbour on the shared cores or memory bus slows it, and the memory-heavy metrics
    with it, more than the plain gradient (in one run every pass of MLP 64-128-128-10 ran with the gauge at
    4.3–4.5 ms: the gradient took 0.84 ms against 0.66 ms, Layerwise 3.98 against 2.48 ms, and the ratio read 4.7
    against 3.8). ``quietest`` is the smallest reading of the run so far, the reference for :meth:`quiet`.

    A quiet gauge is necessary, not sufficient: the Gram is bound by the cores' arithmetic and misses a neighbour
    that takes only the shared cache or memory bandwidth. In runs 31–33 every CNN pass had the gauge within 8 % of
    the run's quietest, yet K-FAC on the CNN took 4.19–4.41 ms at a gradient of 1.37–1.41 ms, against 3.43–3.88 ms
    at 1.36–1.37 ms in runs 24–26 and 30 (``benchmarks/results/metrics_runs.md``)."""

    def __init__(self, repeats: int = 15):
        self.product = torch.randn(288, 2304, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        self.repeats = repeats
        self.quietest = float("inf")

    def read(self) -> float:
        k = self.product
        reading = min(once(lambda: k @ k.T) for _ in range(self.repeats + 2))
        self.quietest = min(self.quietest, reading)
        return reading

    def quiet(self, before: float, after: float) -> bool:
        return max(before, after) <= QUIET * self.quietest


def time_config(calls: dict, repeats: int, gauge: MachineGauge) -> tuple[dict, list, list]:
    """``ROUNDS`` passes of :func:`time_each` over all candidates, with the gauge read before the first pass and
    after each; while no pass has been quiet (:meth:`MachineGauge.quiet` on the readings around it), more passes,
    up to ``MAX_ROUNDS``. The ratios are meant as quiet-machine figures, and the min over the passes needs at least
    one pass in which the machine was quiet; whether to go on is decided by the gauge alone, never by the times.
    Returns the summary over all passes (:func:`summarize_passes`), the gauge readings and which passes were
    quiet."""
    readings, passes, quiet = [gauge.read()], [], []
    while len(passes) < ROUNDS or (not any(quiet) and len(passes) < MAX_ROUNDS):
        passes.append(time_each(calls, repeats=repeats))
        readings.append(gauge.read())
        quiet.append(gauge.quiet(readings[-2], readings[-1]))
    return summarize_passes(passes), readings, quiet


def run_config(label, problem, repeats, gauge, *, dense=False, generic=False, natural=True):
    theta = problem.theta0
    calls, failed = working(candidates(problem, theta, natural=natural, generic=generic, sampled=True))
    for name, reason in failed.items():
        print(f"  {name} not timed: {reason}", flush=True)
    timing, readings, quiet = time_config(calls, repeats, gauge)
    if not any(quiet):
        print(f"  host busy throughout {label}: no quiet pass in {len(quiet)} (gauge {fmt(min(readings))}–"
              f"{fmt(max(readings))} ms against the quietest so far, {fmt(gauge.quietest)} ms); its ratios are not "
              "quiet-machine figures", flush=True)
    row = {"network": label, "batch": problem.batch_size, "N": problem.num_params,
           "machine_gauge_s": readings, "quiet_passes": quiet,
           "kfac_forms": KFAC(problem, damping=MU).describe()["forms"],
           "d": problem.batch_size * int(problem.outputs(theta[None])[0].shape[-1]),
           "blocks": [b.name for b in problem.blocks],
           "median_s": {k: v["median_s"] for k, v in timing.items()},
           "min_s": {k: v["min_s"] for k, v in timing.items()},
           "pass_min_s": {k: v["pass_min_s"] for k, v in timing.items()}, "failed": failed}
    for name in timing:
        if name != "gradient":
            row[f"{name}_over_gradient"] = row["median_s"][name] / row["median_s"]["gradient"]
            row[f"{name}_over_gradient_min"] = row["min_s"][name] / row["min_s"]["gradient"]
    row["block_diagonal_dense_s"] = row["dense_ggn_s"] = row["dense_over_layerwise"] = None
    if dense and dense_fits(max(b.size for b in problem.blocks)):
        bd = BlockDiagonal(problem, mu=MU)
        bd.solve(theta, problem.grad(theta))  # warm-up
        row["block_diagonal_dense_s"] = once(lambda: bd.solve(theta, problem.grad(theta)))
    if dense and dense_fits(problem.num_params):
        row["dense_ggn_s"] = once(lambda: dense_ggn_direction(problem, theta))
        row["dense_over_layerwise"] = row["dense_ggn_s"] / row["min_s"]["layerwise"]
    return row


def fit_exponent(ns, ts) -> float:
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def width_sweep(widths, dense_widths, batch, repeats):
    rows = []
    for w in widths:
        problem = mlp_problem([64, w, w, 10], batch)
        timing = time_passes(candidates(problem, problem.theta0, natural=False), repeats, ROUNDS)
        rows.append({"width": w, "N": problem.num_params, **{k: v["min_s"] for k, v in timing.items()}})
    dense_rows = []
    for w in dense_widths:
        problem = mlp_problem([64, w, w, 10], batch)
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


def gauge_summary(row) -> str:
    """The gauge's range over a config (ms) and how many of its passes were quiet."""
    readings, quiet = row["machine_gauge_s"], row["quiet_passes"]
    return f"{fmt(min(readings))}–{fmt(max(readings))} ({sum(quiet)}/{len(quiet)})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    args = parser.parse_args(argv)
    setup(threads=2)
    warnings.filterwarnings("ignore", message="There is a performance drop")  # torch.func's attention fallback
    load_before = os.getloadavg()
    started = time.perf_counter()
    repeats = 5 if args.quick else 13
    if args.quick:
        configs = [("MLP 64-32-32-10", lambda: mlp_problem([64, 32, 32, 10], 8), {"dense": True}),
                   ("CNN 4-4", lambda: cnn_problem(8, channels=4), {"dense": True, "generic": True}),
                   ("transformer", lambda: transformer_problem(8), {"generic": True})]
    else:
        configs = [("MLP 64-32-32-10", lambda: mlp_problem([64, 32, 32, 10], 32), {"dense": True}),
                   ("MLP 64-128-128-10", lambda: mlp_problem([64, 128, 128, 10], 32), {}),
                   ("MLP 64-256-256-10", lambda: mlp_problem([64, 256, 256, 10], 128), {}),
                   ("CNN 16-16", lambda: cnn_problem(32), {"dense": True, "generic": True}),
                   ("transformer", lambda: transformer_problem(32), {"generic": True})]
    rows, gauge = [], MachineGauge()
    for label, make, options in configs:
        print(f"timing {label} …", flush=True)
        rows.append(run_config(label, make(), repeats, gauge, **options))
    widths = [16, 32, 64] if args.quick else [32, 64, 128, 256, 512, 1024]
    dense_widths = [8, 12, 16] if args.quick else [16, 24, 32, 48, 64]
    print("width sweep …", flush=True)
    sweep, dense_sweep, exponents, tail = width_sweep(widths, dense_widths, batch=8 if args.quick else 32,
                                                      repeats=max(3, repeats // 4))
    load_after = os.getloadavg()

    names = ["gradient", "layerwise", "layerwise_generic", "kfac", "kfac_sampled", "natural_gradient"]
    print(f"\ntime per natural direction (ms, min over {ROUNDS}–{MAX_ROUNDS} passes × {repeats} after warm-up, each "
          f"candidate in its own block), float64, {torch.get_num_threads()} threads, μ = {MU}; load average "
          f"{load_before[0]:.1f} → {load_after[0]:.1f}")
    header = f"{'network':<19}{'batch':>6}{'N':>8}{'d':>6}" + "".join(f"{n:>19}" for n in names)
    print(header + f"{'BD dense':>10}{'GGN dense':>11}{'gauge (quiet passes)':>24}")
    for r in rows:
        print(f"{r['network']:<19}{r['batch']:>6}{r['N']:>8}{r['d']:>6}"
              + "".join(f"{fmt(r['min_s'].get(n)):>19}" for n in names)
              + f"{fmt(r['block_diagonal_dense_s']):>10}{fmt(r['dense_ggn_s']):>11}"
              + gauge_summary(r).rjust(24))
    print("\nratio to the gradient, min (median):")
    for r in rows:
        cells = []
        for n in names[1:]:
            cells.append(f"{r[n + '_over_gradient_min']:.1f} ({r[n + '_over_gradient']:.1f})"
                         if n + "_over_gradient" in r else "-")
        print(f"{r['network']:<19}" + "".join(f"{c:>19}" for c in cells))
    print(f"\nwidth sweep at batch {8 if args.quick else 32} (ms, min):")
    print(f"{'width':>6}{'N':>9}{'gradient':>11}{'layerwise':>11}{'kfac':>9}")
    for r in sweep:
        print(f"{r['width']:>6}{r['N']:>9}{fmt(r['gradient']):>11}{fmt(r['layerwise']):>11}{fmt(r['kfac']):>9}")
    for r in dense_sweep:
        print(f"{r['width']:>6}{r['N']:>9}   dense GGN {fmt(r['dense_ggn'])}")
    print("fitted exponent of time in N, all sizes: " + ", ".join(f"{k} {v:.2f}" for k, v in exponents.items()))
    print("fitted exponent of time in N, three largest sizes: " + ", ".join(f"{k} {v:.2f}" for k, v in tail.items()))

    by_name = {r["network"]: r for r in rows}
    targets = {}
    if not args.quick:
        mlp, conv = by_name["MLP 64-128-128-10"], by_name["CNN 16-16"]
        targets = {
            "layerwise_over_gradient_cnn": conv["layerwise_over_gradient_min"], "layerwise_cnn_max": 6.0,
            "layerwise_over_gradient_mlp128_b32": mlp["layerwise_over_gradient_min"], "layerwise_mlp_max": 4.0,
            "kfac_over_gradient_cnn": conv["kfac_over_gradient_min"], "kfac_cnn_max": 3.0,
            "kfac_sampled_over_gradient_cnn": conv.get("kfac_sampled_over_gradient_min"),
            "ratios_are": "min over repeats / min over repeats (medians are in the configs)",
            "quiet_passes": {"mlp128_b32": sum(mlp["quiet_passes"]), "cnn": sum(conv["quiet_passes"])},
        }
        targets["met"] = {"layerwise_cnn": conv["layerwise_over_gradient_min"] <= 6.0,
                          "layerwise_mlp": mlp["layerwise_over_gradient_min"] <= 4.0,
                          "kfac_cnn": conv["kfac_over_gradient_min"] <= 3.0}
        print(f"\ntargets: Layerwise/gradient CNN {conv['layerwise_over_gradient_min']:.2f} (≤ 6), MLP 64-128-128-10 "
              f"b32 {mlp['layerwise_over_gradient_min']:.2f} (≤ 4); K-FAC/gradient CNN "
              f"{conv['kfac_over_gradient_min']:.2f} (≤ 3; sampled Fisher "
              f"{conv.get('kfac_sampled_over_gradient_min', float('nan')):.2f}); machine gauge (ms, quietest "
              f"{fmt(gauge.quietest)}) MLP {gauge_summary(mlp)}, CNN {gauge_summary(conv)}")
    elapsed = time.perf_counter() - started
    path = write_results("metrics", {"quick": args.quick, "mu": MU, "repeats": repeats, "configs": rows,
                                     "width_sweep": sweep, "dense_width_sweep": dense_sweep, "exponents": exponents,
                                     "exponents_largest3": tail, "targets": targets, "elapsed_s": elapsed,
                                     "load_average_before_after": [load_before[0], load_after[0]]})
    print(f"wrote {path} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
