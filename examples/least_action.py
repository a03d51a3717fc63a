"""Learning as least action: the action and gap of several rules, and a least-action path on a 2-D landscape.

    python examples/least_action.py [--quick] [--out figures/least_action.png]

Left: cumulative action S(t) (solid) against the bound L(0) − L(t) (dashed) for gradient flows of a digits
MLP under four metrics, all measured in the Euclidean metric. Middle: the gap S − (L(0) − L(t)), zero for the
Euclidean gradient flow and positive for every other rule. Right: on a tilted double-well loss, the
least-action path between the ends of a gradient flow under an anisotropic metric M (found by minimising the
discretised action from the straight line) lies on the flow; ellipses {δ : δᵀMδ = r²} show the geometry.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from matplotlib.figure import Figure

import flows
from flows.action import action, least_action_path
from flows.metrics import KFAC, Constant, Euclidean, Layerwise, NaturalGradient
from flows.rules import GradientFlow


def rules_on_digits(quick: bool, progress: bool = True) -> dict[str, flows.Trajectory]:
    samples, hidden, t_end = (200, 8, 3.0) if quick else (600, 16, 10.0)
    x, y = flows.data.digits(samples)
    problem = flows.Problem(flows.data.mlp([64, hidden, 10]), "cross_entropy", (x, y))
    batch = 16 if quick else 48
    metrics = {
        "Euclidean gradient flow": Euclidean(),
        "Layerwise (μ = 0.05)": Layerwise(problem, mu=0.05, metric_batch=batch),
        "NaturalGradient (μ = 0.05)": NaturalGradient(problem, mu=0.05, metric_batch=batch // 2),
        "K-FAC (γ = 0.05)": KFAC(problem, damping=0.05, metric_batch=batch),
    }
    t = torch.linspace(0, t_end, 41, dtype=torch.float64)
    return {label: flows.simulate(GradientFlow(problem, m), problem.theta0, t, rtol=1e-7, atol=1e-9,
                                  action=Euclidean(), progress=progress)
            for label, m in metrics.items()}


def tilted_double_well(theta):
    x, y = theta[..., 0], theta[..., 1]
    return 0.25 * (x**2 - 1) ** 2 + 0.5 * (y - 0.5 * x) ** 2 + 0.1 * x


def landscape(quick: bool):
    problem = flows.data.function_problem(tilted_double_well, [1.5, -1.0])
    metric = Constant([[1.0, 0.6], [0.6, 1.5]])
    T = 3.0
    flow = flows.simulate(GradientFlow(problem, metric), problem.theta0,
                          torch.linspace(0, T, 201, dtype=torch.float64), rtol=1e-10, atol=1e-12, progress=False)
    path = least_action_path(problem, metric, flow.theta[0], flow.theta[-1], T, nodes=32 if quick else 128)
    return problem, metric, flow, path


def figure(runs, problem, metric, flow, path) -> Figure:
    fig = Figure(figsize=(15.0, 4.6), layout="constrained")
    ax_action, ax_gap, ax_land = fig.subplots(1, 3)
    reports = {label: action(traj) for label, traj in runs.items()}
    flows.plot.action_curves(reports, ax=ax_action)
    ax_action.set_ylabel("cumulative action (Euclidean metric)")
    flows.plot.gap_curves(reports, ax=ax_gap)

    xs, ys = np.meshgrid(np.linspace(-1.6, 1.6, 200), np.linspace(-1.2, 1.6, 200))
    grid = torch.as_tensor(np.stack([xs, ys], -1))
    levels = ax_land.contour(xs, ys, tilted_double_well(grid).numpy(), levels=25, cmap="viridis", linewidths=0.7)
    ax_land.clabel(levels, fontsize=6, fmt="%.2f")
    start, end = flow.theta[0].numpy(), flow.theta[-1].numpy()
    ax_land.plot([start[0], end[0]], [start[1], end[1]], "k:", lw=1.5, label="straight line (initial guess)")
    ax_land.plot(flow.theta[:, 0], flow.theta[:, 1], color="tab:blue", lw=2.5, label="gradient flow under M")
    every = max(1, (len(path.t) - 1) // 32)
    ax_land.plot(path.theta[::every, 0], path.theta[::every, 1], "o", ms=4, color="tab:red",
                 label=f"least-action path (every {every}th of {len(path.t) - 1} nodes)")
    points = flow.theta.numpy()
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    centres = [points[np.searchsorted(arc, s)] for s in np.linspace(0, arc[-1], 6)[1:-1]]  # even in arc length
    flows.plot.metric_ellipses(ax_land, centres, [metric.M.numpy()] * len(centres), size=0.07, color="tab:orange")
    ax_land.set(xlabel="θ₁", ylabel="θ₂", title="least-action path on a tilted double well", aspect="equal")
    ax_land.legend(fontsize=7, loc="upper left")
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small, fast configuration (used by the tests)")
    parser.add_argument("--out", default="figures/least_action.png", help="where to write the figure")
    args = parser.parse_args(argv)
    runs = rules_on_digits(args.quick)
    for label, traj in runs.items():
        summary = action(traj).summary()
        print(f"{label:<28} action {summary['action']:.5g}  loss drop {summary['loss_drop']:.5g}  "
              f"gap {summary['gap']:.3e}  length {summary['length']:.4g}")
    problem, metric, flow, path = landscape(args.quick)
    node_error = float((path.theta - flows.simulate(GradientFlow(problem, metric), flow.theta[0], path.t, rtol=1e-10,
                                                    atol=1e-12, progress=False).theta).abs().max())
    print(f"least-action path: S = {path.action:.6g}, L(0) − L(T) = {path.loss_drop:.6g}, largest node error "
          f"against the flow {node_error:.2e}, {path.iterations} L-BFGS iterations")
    flows.plot.save(figure(runs, problem, metric, flow, path), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
