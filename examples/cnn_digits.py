"""A small CNN on the 8×8 digit images under five learning rules from one θ₀.

    python examples/cnn_digits.py [--quick] [--out figures/cnn_digits.png]

The network (``flows.data.cnn``): conv 1→16 (3×3, pad 1) → tanh → conv 16→16 (3×3, pad 1, stride 2) → tanh →
Linear(256→10), cross-entropy on scikit-learn's digits, trained by

    the Euclidean gradient flow              θ̇ = −∇L(θ)
    the layerwise flow (Pehle & Slotine)     θ̇ = −G_layerwise(θ)⁻¹∇L(θ)   one exact block per conv / linear module
    the K-FAC flow (KFC for the convolutions, Grosse & Martens 2016; Martens & Grosse 2015 for the head)
    the natural-gradient flow                θ̇ = −(μI + JᵀM_oJ)⁻¹∇L(θ)   the whole Fisher, Woodbury
    feedback alignment (Lillicrap et al.)    a backward pass through fixed random feedback kernels

with the held-out loss recorded at every output time. The curvature metrics use a fixed subsample of the training
digits (``metric_batch``), so every vector field is a deterministic function of θ. The figure shows the loss against
vector-field evaluations and against wall-clock time (what each geometry costs), and the layerwise metric's inner
condition numbers ξ_a = cond(I + K_aK_aᵀ/μ) per block at the end.
"""

from __future__ import annotations

import argparse
import sys

import torch
from matplotlib.figure import Figure

import flows
from flows.metrics import KFAC, Euclidean, Layerwise, NaturalGradient


def run(quick: bool = False, progress: bool = True):
    # quick: 4 channels, 64 digits, a short run (a smoke run for the tests)
    n, channels, t_end, batch, mu = (64, 4, 1.0, 8, 1e-2) if quick else (512, 16, 40.0, 64, 1e-2)
    x, y = flows.data.digits(n, split="train", images=True)
    test = flows.data.digits(n // 2, split="test", images=True)
    problem = flows.Problem(flows.data.cnn(channels, seed=0), "cross_entropy", (x, y), eval_data={"test": test})
    layerwise = Layerwise(problem, mu=mu, metric_batch=batch)
    rules = {
        "Euclidean": flows.rules.GradientFlow(problem, Euclidean()),
        f"Layerwise (μ = {mu:g})": flows.rules.GradientFlow(problem, layerwise),
        f"K-FAC (γ = {mu:g})": flows.rules.GradientFlow(problem, KFAC(problem, damping=mu, metric_batch=batch)),
        f"NaturalGradient (μ = {mu:g})": flows.rules.GradientFlow(
            problem, NaturalGradient(problem, mu=mu, metric_batch=batch // 2)),
        "feedback alignment": flows.rules.FeedbackAlignment(problem, seed=0),
    }
    t = torch.linspace(0.0, t_end, 11 if quick else 41, dtype=torch.float64)
    runs = {}
    for label, rule in rules.items():
        traj = flows.simulate(rule, problem.theta0, t, rtol=1e-5, atol=1e-7, progress=progress)
        runs[label] = traj
        print(f"{label:<26} loss {float(traj.loss[-1]):.4g}  test loss {float(traj.metrics['test_loss'][-1]):.4g}  "
              f"test accuracy {float(traj.metrics['test_accuracy'][-1]):.3f}  nfe {traj.stats['nfe']:>4}  "
              f"wall {traj.stats['wall_time']:.1f} s", flush=True)
    diagnostics = layerwise.diagnostics(runs[f"Layerwise (μ = {mu:g})"].final)
    for row in diagnostics:
        print(f"  layerwise block {row['block']}: n = {row['size']}, d = {row['rows']} ({row['path']}), "
              f"ξ = {row['xi']:.3g}, solve residual {row['residual']:.1e}")
    return runs, diagnostics


def _wall_clock(runs):
    """Copies of the runs whose time axis is wall-clock seconds (evaluations spread evenly over the run's wall
    time, the solver's cost per evaluation being nearly constant for one rule)."""
    out = {}
    for label, traj in runs.items():
        nfe = torch.as_tensor(traj.stats["nfe_at_output"], dtype=torch.float64)
        wall = nfe / max(float(nfe[-1]), 1.0) * traj.stats["wall_time"]
        out[label] = flows.Trajectory(wall, traj.theta, loss=traj.loss, metrics=dict(traj.metrics))
    return out


def figure(runs, diagnostics) -> Figure:
    fig = Figure(figsize=(15.0, 4.4), layout="constrained")
    by_nfe, by_wall, blocks = fig.subplots(1, 3)
    flows.plot.loss_curves(runs, ax=by_nfe, x="nfe")
    by_nfe.set_title("loss against vector-field evaluations")
    flows.plot.loss_curves(_wall_clock(runs), ax=by_wall)
    by_wall.set_xlabel("wall-clock seconds (evaluations × cost per evaluation)")
    by_wall.set_title("loss against wall-clock time")
    flows.plot.layer_diagnostics(diagnostics, ax=blocks)
    blocks.set_title("layerwise metric at t = T: ξ per block")
    fig.suptitle("A CNN on 8×8 digits under five learning rules from one θ₀ (dashed: held-out loss)")
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small, fast configuration (used by the tests)")
    parser.add_argument("--out", default="figures/cnn_digits.png", help="where to write the figure")
    args = parser.parse_args(argv)
    runs, diagnostics = run(quick=args.quick)
    flows.plot.save(figure(runs, diagnostics), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
