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
    (ax_mu, ax_re), (ax_div, ax_spec) = fig.subplots(2, 2)
    for label, r in reports.items():
        line, = ax_mu.plot(r.t, r.mu, lw=2, label=label)
        ax_re.plot(r.t, r.max_real_eig, lw=2, color=line.get_color(), label=label)
    for ax, what in ((ax_mu, "log-norm μ₂(J)"), (ax_re, "max Re λ(J)")):
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xlabel="solver time t", ylabel=f"{what} (1/time)", yscale="symlog")
        ax.legend(fontsize=8)
    ax_mu.set_title("contraction rate along training (μ < 0: contracting)")
    ax_re.set_title("largest real part of the Jacobian's eigenvalues")
    bound = reports[euclid].bound
    for k in range(div.distance.shape[1]):
        ax_div.plot(div.t, div.distance[:, k], lw=1.5, alpha=0.8, label="‖δθ(t)‖, perturbed copies" if k == 0 else None,
                    color="tab:blue")
        ax_div.plot(div.t, bound * div.distance[0, k], ls="--", lw=1.2, color="tab:red",
                    label="bound exp(∫μ dt)‖δθ(0)‖" if k == 0 else None)
    ax_div.set(xlabel="solver time t", ylabel="distance to the reference trajectory", yscale="log",
               title=f"divergence of nearby trajectories ({euclid})")
    ax_div.legend(fontsize=8)
    markers = {"start": "o", "end": "x"}
    for (label, (first, last)), color in zip(spectra.items(), ("tab:blue", "tab:orange")):
        for name, values in (("start", first), ("end", last)):
            ax_spec.scatter(values.real.numpy(), values.imag.numpy(), s=14, marker=markers[name], color=color,
                            alpha=0.7, label=f"{label}, {name}")
    ax_spec.axvline(0, color="k", lw=0.8)
    ax_spec.set_xscale("symlog", linthresh=1e-3)
    ax_spec.set(xlabel="Re λ(J) (1/time)", ylabel="Im λ(J)", title="Jacobian spectra at the start and the end")
    ax_spec.legend(fontsize=7)
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
