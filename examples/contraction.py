"""Stability plots of learning flows: contraction rate, eigenvalues and the divergence of nearby trajectories.

    python examples/contraction.py [--quick] [--out figures/contraction.png]

A small tanh MLP on digits is trained by the Euclidean gradient flow and by the layerwise (Pehle–Slotine)
flow from one θ₀. Along each trajectory: the log-norm μ₂(J) of the field's Jacobian (dense, in the 2-norm)
and the largest real part of its eigenvalues; perturbed copies of the Euclidean flow against the bound
exp(∫μ dt)‖δ₀‖ computed on the reference trajectory (exact to first order in δ); and J's spectra at the start
and the end of training.
"""

from __future__ import annotations

import argparse
import sys

import torch
from matplotlib.figure import Figure

import flows
from flows.contraction import analyze, divergence, jacobian
from flows.metrics import Euclidean, Layerwise
from flows.rules import GradientFlow


def run(quick: bool):
    samples, hidden, t_end, points, batch = (120, 6, 4.0, 5, 8) if quick else (200, 8, 30.0, 11, 16)
    x, y = flows.data.digits(samples)
    problem = flows.Problem(flows.data.mlp([64, hidden, 10]), "cross_entropy", (x, y))
    t = torch.linspace(0, t_end, points, dtype=torch.float64)
    fields = {"Euclidean gradient flow": GradientFlow(problem, Euclidean()),
              "Layerwise flow (μ = 0.1)": GradientFlow(problem, Layerwise(problem, mu=0.1, metric_batch=batch))}
    trajectories, reports = {}, {}
    for label, field in fields.items():
        trajectories[label] = flows.simulate(field, problem.theta0, t, rtol=1e-8, atol=1e-10, progress=False)
        reports[label] = analyze(field, trajectories[label])
        r = reports[label]
        print(f"{label:<26} μ₂ from {float(r.mu[0]):+.3g} to {float(r.mu[-1]):+.3g}; max Re λ from "
              f"{float(r.max_real_eig[0]):+.3g} to {float(r.max_real_eig[-1]):+.3g}; contracting on "
              f"{[(round(a, 2), round(b, 2)) for a, b, _ in r.contracting] or 'no interval'}", flush=True)
    euclid = "Euclidean gradient flow"
    deltas = 1e-5 * torch.randn(4, problem.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    div = divergence(fields[euclid], problem.theta0, deltas, t, rtol=1e-10, atol=1e-14)
    spectra = {label: (torch.linalg.eigvals(jacobian(field, trajectories[label].theta[0])),
                       torch.linalg.eigvals(jacobian(field, trajectories[label].theta[-1])))
               for label, field in fields.items()}
    return trajectories, reports, div, spectra, euclid


def figure(trajectories, reports, div, spectra, euclid) -> Figure:
    fig = Figure(figsize=(12.0, 8.4), layout="constrained")
    (ax_rates, ax_names), (ax_div, ax_spec) = fig.subplots(2, 2)
    flows.plot.contraction_rates(reports, ax=ax_rates)
    ax_names.set_axis_off()
    ax_names.text(0.02, 0.95, "μ₂(J) = λ_max((J + Jᵀ)/2): the 2-norm log-norm of the flow's Jacobian.\n"
                  "μ < 0 certifies that nearby trajectories converge (contraction).\n"
                  "max Re λ(J) ≤ μ₂(J); the gap between them is where transient growth\n"
                  "is possible although every eigenvalue is stable.", va="top", fontsize=10)
    flows.plot.divergence_plot(div, reports[euclid].bound, ax=ax_div,
                               title=f"divergence of nearby trajectories ({euclid})")
    flows.plot.spectra({f"{label}, {when}": values for label, pair in spectra.items()
                        for when, values in zip(("start", "end"), pair)}, ax=ax_spec)
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small, fast configuration (used by the tests)")
    parser.add_argument("--out", default="figures/contraction.png", help="where to write the figure")
    args = parser.parse_args(argv)
    results = run(args.quick)
    trajectories, reports, div, _, euclid = results
    excess = float((div.distance / (reports[euclid].bound[:, None] * div.distance[0]) - 1).max())
    print(f"largest excess of the perturbed distances over the bound: {max(excess, 0.0):.2e} (relative)")
    flows.plot.save(figure(*results), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
