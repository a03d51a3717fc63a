"""A one-block transformer learning to add up its tokens, under the Euclidean and the Layerwise flow, with the
stability of each run.

    python examples/transformer.py [--quick] [--out figures/transformer.png]

The model (``flows.data.Transformer``: embedding, learned positions, two-head attention, two LayerNorms, an MLP
and residual connections; width 16) reads three tokens from 0…3 and names their sum, one of ten classes
(``flows.data.token_sum(length=3, vocab=4)``: the sum is at most 9, so "mod 10" never wraps; the task needs every
position, in any order). It is read as a module graph: the layerwise metric has one block per module (the
embedding, the positions, each LayerNorm, the attention's input and output projections, the MLP's two layers and the
head), each G_a the exact diagonal block of μI + JᵀM_oJ (MATH.md §2.2–2.4). Both flows start from one θ₀ and record
the held-out loss as they go (a fresh test draw).

Stability (``flows.contraction.report``): along each run, the contraction rate μ₂(t) = λ_max(sym J) of the flow's
Jacobian by matrix-free Lanczos and the certificate exp(∫μ dt); for the Euclidean flow also the top finite-time
Lyapunov exponent. Left out, for cost: the layerwise flow's rate in its own metric G(θ) (≈ 90 s per point at this
size: every Lanczos step applies and inverts G) and its Lyapunov exponent (forward-mode products through the
attention block's generic sweep).
"""

from __future__ import annotations

import argparse
import sys

import torch
from matplotlib.figure import Figure

import flows
from flows.metrics import Euclidean, Layerwise


def run(quick: bool = False, progress: bool = True):
    # Both flows' rates are measured in the Euclidean norm, μ₂(J) = λ_max(sym J) by Lanczos (≈ 5 s per point here).
    # The layerwise flow in its own metric G(θ) — the pencil (sym(GJ), G), which applies and inverts G at every
    # Lanczos step — takes ≈ 90 s per point at this size, and its tangent dynamics for a Lyapunov exponent go through
    # forward-mode products of the attention block's generic sweep; both are left out. The Euclidean flow's top
    # Lyapunov exponent is computed (its J = −∇²L is symmetric: reverse mode). quick: a narrow model on short
    # sequences and the Euclidean flow's report only (a smoke run for the tests).
    if quick:
        task, model = dict(length=3, vocab=4), dict(vocab=4, length=3, width=8, hidden=16)
        n, t_end, batch, points, outputs = 32, 1.0, 8, 2, 6
    else:
        task, model = dict(length=3, vocab=4), dict(vocab=4, length=3, width=16, hidden=32)
        n, t_end, batch, points, outputs = 256, 20.0, 32, 5, 21
    tokens, labels = flows.data.token_sum(n, **task)
    test = flows.data.token_sum(n, split="test", **task)
    problem = flows.Problem(flows.data.Transformer(**model, seed=0), "cross_entropy", (tokens, labels),
                            eval_data={"test": test})
    rules = {
        "Euclidean": flows.rules.GradientFlow(problem, Euclidean()),
        "Layerwise (μ = 1)": flows.rules.GradientFlow(problem, Layerwise(problem, mu=1.0, metric_batch=batch)),
    }
    t = torch.linspace(0.0, t_end, outputs, dtype=torch.float64)
    runs, reports = {}, {}
    for label, rule in rules.items():
        traj = flows.simulate(rule, problem.theta0, t, rtol=1e-5, atol=1e-7, progress=progress)
        runs[label] = traj
        layerwise = isinstance(rule.metric, Layerwise)
        if quick and layerwise:
            print(f"{label:<18} loss {float(traj.loss[-1]):.4g}  (stability report in the full run only)")
            continue
        picks = torch.linspace(0, len(traj) - 1, points).round().long().unique()
        coarse = flows.Trajectory(traj.t[picks], traj.theta[picks], field=rule, problem=problem)
        reports[label] = flows.contraction.report(rule, coarse, None, k=0 if layerwise else 1, method="lanczos",
                                                  eigenvalues=False, tol=1e-4, rtol=1e-5, atol=1e-7)
        row = reports[label].row
        print(f"{label:<18} loss {float(traj.loss[-1]):.4g}  test loss {float(traj.metrics['test_loss'][-1]):.4g}  "
              f"test accuracy {float(traj.metrics['test_accuracy'][-1]):.3f}  nfe {traj.stats['nfe']}  "
              f"max μ {row['max_mu']:.3g}  ∫μ dt {row['integral_mu']:.3g}  λ₁ "
              f"{row['lyapunov'][0] if row['lyapunov'] else float('nan'):.3g}", flush=True)
    blocks = rules["Layerwise (μ = 1)"].metric.describe()["blocks"]
    print(f"layerwise blocks ({len(blocks)}): {', '.join(blocks)}")
    return runs, reports


def figure(runs, reports) -> Figure:
    fig = Figure(figsize=(15.0, 4.4), layout="constrained")
    losses, rates, lyap = fig.subplots(1, 3)
    flows.plot.loss_curves(runs, ax=losses)
    losses.set_title("training (solid) and held-out (dashed) loss")
    for label, report in reports.items():
        c = report.contraction
        line, = rates.plot(c.t.numpy(), c.mu.numpy(), marker="o", label=f"{label}: μ ({c.metric})")
        if c.mu_frozen is not None:
            rates.plot(c.t.numpy(), c.mu_frozen.numpy(), ls="--", color=line.get_color(), label=f"{label}: frozen G")
        ex = report.lyapunov
        if ex is None:
            continue
        lyap.plot(ex.t.numpy()[1:], ex.running.numpy()[1:, 0], color=line.get_color(), label=label)
    rates.axhline(0.0, color="gray", lw=0.8)
    rates.set_xlabel("solver time t")
    rates.set_ylabel("contraction rate μ₂(t) = λ_max(sym J)")
    rates.set_title("μ(t) along the run (μ < 0: contracting)")
    rates.legend(fontsize=8)
    lyap.axhline(0.0, color="gray", lw=0.8)
    lyap.set_xlabel("solver time t")
    lyap.set_ylabel("top finite-time Lyapunov exponent")
    lyap.set_title("running λ₁(t) from θ₀")
    lyap.legend(fontsize=8)
    fig.suptitle("A one-block transformer (embedding, attention, LayerNorm, MLP, residuals) adding three tokens")
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small, fast configuration (used by the tests)")
    parser.add_argument("--out", default="figures/transformer.png", help="where to write the figure")
    args = parser.parse_args(argv)
    runs, reports = run(quick=args.quick)
    flows.plot.save(figure(runs, reports), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
