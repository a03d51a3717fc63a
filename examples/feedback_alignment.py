"""Feedback alignment is natural gradient descent: loss, angle ψ(t), κ_min(t) and weight alignment.

    python examples/feedback_alignment.py [--quick] [--out figures/feedback_alignment.png]

A student MLP learns a random teacher (regression) by backprop (the Euclidean gradient flow) and by feedback
alignment (Lillicrap et al. 2016), from one θ₀. Along the feedback-alignment trajectory the angle ψ between
its update and −∇L falls below 90° — the rule is effective, hence natural gradient descent for the metric
M_opt of condition number κ_min = (1 + sin ψ)/(1 − sin ψ) — while the output weights W align with the fixed
feedback matrix F.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from matplotlib.figure import Figure

import flows
from flows.natural import recover
from flows.rules import FeedbackAlignment, GradientFlow


def run(quick: bool):
    n, sizes, t_end = (128, (8, 16, 3), 20.0) if quick else (512, (10, 32, 4), 150.0)
    x, y = flows.data.teacher_student(n, (sizes[0], 12, sizes[-1]), seed=0)
    problem = flows.Problem(flows.data.mlp(list(sizes), seed=3), "mse", (x, y))
    t = torch.linspace(0, t_end, 31 if quick else 61, dtype=torch.float64)
    backprop = GradientFlow(problem)
    fa = FeedbackAlignment(problem, seed=7)
    runs = {name: flows.simulate(rule, problem.theta0, t, rtol=1e-7, atol=1e-9, progress=False)
            for name, rule in (("backprop (gradient flow)", backprop), ("feedback alignment", fa))}
    rec = recover(fa, problem, runs["feedback alignment"])
    out = problem.blocks[-1].param_names[0]  # the output layer's weight: its transpose is replaced by F
    feedback = fa.feedback[out.rsplit(".", 1)[0]]
    weights = problem.unflatten(runs["feedback alignment"].theta)[out]
    cos = (weights * feedback).sum((-2, -1)) / (weights.norm(dim=(-2, -1)) * feedback.norm())
    alignment = torch.rad2deg(torch.arccos(cos))
    return runs, rec, alignment


def figure(runs, rec, alignment) -> Figure:
    fig = Figure(figsize=(13.0, 4.2), layout="constrained")
    ax_loss, ax_psi, ax_align = fig.subplots(1, 3)
    flows.plot.loss_curves(runs, ax=ax_loss)
    ax_loss.set_title("student loss")
    flows.plot.natural_angles({"feedback alignment": rec}, ax=ax_psi)
    ax_psi.set_title("FA as natural gradient: ψ(t) and κ_min(t)")
    ax_align.plot(rec.t, alignment, lw=2, color="tab:green", label="∠(W_out, F) during feedback alignment")
    ax_align.axhline(90, color="k", lw=0.8, ls="--", label="90°: unrelated")
    ax_align.set(xlabel="solver time t", ylabel="angle (degrees)", ylim=(0, 100),
                 title="output weights align with F")
    ax_align.legend(fontsize=8)
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small, fast configuration (used by the tests)")
    parser.add_argument("--out", default="figures/feedback_alignment.png", help="where to write the figure")
    args = parser.parse_args(argv)
    runs, rec, alignment = run(args.quick)
    for name, traj in runs.items():
        print(f"{name:<26} loss {float(traj.loss[0]):.4g} → {float(traj.loss[-1]):.4g}  nfe {traj.stats['nfe']}")
    print(f"feedback alignment: ψ {math.degrees(float(rec.psi[0])):.1f}° → {math.degrees(float(rec.psi[-1])):.1f}°, "
          f"κ_min {float(rec.kappa[0]):.3g} → {float(rec.kappa[-1]):.3g}, "
          f"max residual {float(rec.residual.max()):.1e}; "
          f"∠(W, F) {float(alignment[0]):.1f}° → {float(alignment[-1]):.1f}°")
    flows.plot.save(figure(runs, rec, alignment), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
