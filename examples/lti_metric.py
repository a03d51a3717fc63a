"""The metric that makes a stable linear system natural gradient descent on its Lyapunov loss.

    python examples/lti_metric.py [--quick] [--out figures/lti_metric.png]

For ẋ = Ax with AᵀP + PA = −I and L(x) = xᵀPx, every trajectory lowers L, so at every point the update is
natural gradient descent for M_opt (MATH.md §4). For a normal A (left) the update is nearly the steepest
descent of L and M_opt is close to round; for a non-normal A (middle) ψ is larger and M_opt more anisotropic.
Ellipses {δ : δᵀM_opt δ = r²} are drawn along trajectories; the right panel gives ψ(t) and κ_min(t).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from matplotlib.figure import Figure

import flows
from flows.natural import min_condition_metric, recover
from flows.rules import LinearSystem

SYSTEMS = {"normal A": [[-1.0, 0.0], [0.0, -3.0]], "non-normal A": [[-1.0, 6.0], [0.0, -2.0]]}
STARTS = [[1.0, 1.0], [-1.0, 0.6], [0.3, -1.0]]


def run(quick: bool):
    t = torch.linspace(0, 3, 13 if quick else 61, dtype=torch.float64)
    out = {}
    for name, a in SYSTEMS.items():
        system = LinearSystem(a)
        trajs = [flows.simulate(system, torch.tensor(s, dtype=torch.float64), t, rtol=1e-10, atol=1e-12,
                                problem=system.problem, progress=False) for s in STARTS]
        out[name] = (system, trajs, [recover(system, system.problem, tr) for tr in trajs])
    return out


def figure(results) -> Figure:
    fig = Figure(figsize=(14.0, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (name, (system, trajs, _)) in zip(axes[:2], results.items()):

        def recovered(t, x, system=system):
            return min_condition_metric(system(t, x), system.problem.grad(x)).matrix().numpy()

        flows.plot.phase_portrait(system, trajs, ax=ax, metrics=recovered)
        lim = ax.get_xlim()[1]
        fine = np.linspace(-lim, lim, 200)
        fx, fy = np.meshgrid(fine, fine)
        p = system.P.numpy()
        lyapunov = p[0, 0] * fx**2 + 2 * p[0, 1] * fx * fy + p[1, 1] * fy**2
        ax.contour(fx, fy, lyapunov, levels=np.geomspace(lyapunov.max() * 1e-3, lyapunov.max(), 8), colors="0.45",
                   linewidths=0.7, linestyles="dotted")
        ax.plot([], [], color="0.45", lw=0.7, ls="dotted", label="Lyapunov loss xᵀPx")
        ax.legend(fontsize=7, loc="lower left")
        ax.set_title(f"{name} = {system.A.tolist()}")
    flows.plot.natural_angles({name: recs[0] for name, (_, _, recs) in results.items()}, ax=axes[2])
    axes[2].set_title(f"from x₀ = {STARTS[0]}")
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small, fast configuration (used by the tests)")
    parser.add_argument("--out", default="figures/lti_metric.png", help="where to write the figure")
    args = parser.parse_args(argv)
    results = run(args.quick)
    for name, (_, _, recs) in results.items():
        psi = torch.cat([torch.rad2deg(r.psi) for r in recs])
        kappa = torch.cat([r.kappa for r in recs])
        residual = max(float(r.residual.max()) for r in recs)
        print(f"{name:<13} ψ in [{float(psi.min()):.1f}°, {float(psi.max()):.1f}°], κ_min up to "
              f"{float(kappa.max()):.3g}, largest residual ‖Ax + M⁻¹∇L‖/‖Ax‖ = {residual:.1e}")
    flows.plot.save(figure(results), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
