"""Discrete and noisy training beside the gradient flow it approximates, on a digits MLP.

    python examples/sgd_vs_flow.py [--quick] [--out figures/sgd_vs_flow.png]

One θ₀ of a 64-32-10 tanh MLP (cross-entropy on 512 training digits) is trained by

    the gradient flow                  θ̇ = −∇L(θ)                                   (flows.simulate, tight tolerances)
    gradient descent at η = 0.05, 0.2, 0.8   θ_{k+1} = θ_k − η∇L(θ_k)               (flows.iterate, t = kη)
    minibatch SGD (η = 0.2, b = 32)    an ensemble of seeds, sampling without replacement per epoch
    its stochastic modified equation   dθ = −∇L dt + √(η/b) Σ(θ)^{1/2} dW          (flows.simulate_sde, P paths)

(Li, Tai & E 2017/2019: Σ is the covariance of the per-sample gradients; the SDE matches SGD's mean and covariance
to first order in η). The left panel shows every loss on one time axis, the SGD seeds and the SDE paths as a mean
with a min–max band; the right panel the distance ‖θ_GD(t) − θ_flow(t)‖ of gradient descent from the flow, which
grows with η (it is O(η) at fixed t; ``flows.rules.ModifiedGradientFlow`` brings it to O(η²)).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from matplotlib.figure import Figure

import flows
from flows.discrete import GD


def run(quick: bool = False, progress: bool = True):
    samples, hidden, t_end, paths = (128, 16, 2.0, 4) if quick else (512, 32, 20.0, 16)
    x, y = flows.data.digits(samples, split="train")
    problem = flows.Problem(flows.data.mlp([64, hidden, 10], seed=0), "cross_entropy", (x, y))
    fine = 0.05  # the flow is recorded on GD's finest grid, so every GD iterate has its flow point
    t = torch.arange(0.0, t_end + fine / 2, fine, dtype=torch.float64)
    tol = 1e-7 if quick else 1e-9
    flow = flows.simulate(flows.rules.GradientFlow(problem), problem.theta0, t, rtol=tol, atol=tol * 1e-2,
                          progress=progress)
    gd = {}
    for lr in (0.05, 0.2, 0.8):
        gd[lr] = flows.iterate(GD(problem), problem.theta0, round(t_end / lr), lr=lr, progress=progress)
    lr, batch = 0.2, 32
    steps = round(t_end / lr)
    sgd = [flows.iterate(GD(problem), problem.theta0, steps, lr=lr, batch_size=batch, seed=s, progress=False)
           for s in range(paths)]
    sde = flows.simulate_sde(problem, problem.theta0, sgd[0].t, lr=lr, batch_size=batch, paths=paths, seed=0,
                             progress=progress)
    sgd_final = np.array([float(traj.loss[-1]) for traj in sgd])
    sde_final = sde.loss[-1].numpy()
    print(f"gradient flow   final loss {float(flow.loss[-1]):.4f}  (nfe {flow.stats['nfe']})")
    for lr_, traj in gd.items():
        print(f"GD η = {lr_:<5}    final loss {float(traj.loss[-1]):.4f}  distance from the flow at t = {t_end:g}: "
              f"{float(distance(traj, flow, fine)[-1]):.3g}")
    for label, final in ((f"SGD (η = {lr}, b = {batch}), {paths} seeds", sgd_final),
                         (f"SDE, {paths} paths", sde_final)):
        print(f"{label:<32} final loss {final.mean():.4f} ± {final.std(ddof=1):.4f}")
    return flow, gd, sgd, sde


def distance(traj: flows.Trajectory, flow: flows.Trajectory, fine: float) -> torch.Tensor:
    """‖θ(t) − θ_flow(t)‖ at the trajectory's times (each a multiple of the flow's output spacing ``fine``)."""
    index = torch.round(traj.t / fine).long()
    return torch.linalg.vector_norm(traj.theta - flow.theta[index], dim=-1)


def figure(flow, gd, sgd, sde, fine: float = 0.05) -> Figure:
    fig = Figure(figsize=(12.5, 4.6), layout="constrained")
    losses, gaps = fig.subplots(1, 2)
    losses.plot(flow.t.numpy(), flow.loss.numpy(), color="black", lw=2, label="gradient flow")
    for lr, traj in gd.items():
        line, = losses.plot(traj.t.numpy(), traj.loss.numpy(), label=f"GD η = {lr}")
        gaps.plot(traj.t.numpy()[1:], distance(traj, flow, fine).numpy()[1:], color=line.get_color(),
                  label=f"GD η = {lr}")
    sgd_loss = np.stack([traj.loss.numpy() for traj in sgd])
    ts = sgd[0].t.numpy()
    for values, label, colour in ((sgd_loss, f"SGD, {len(sgd)} seeds", "tab:purple"),
                                  (sde.loss.numpy().T, f"SDE, {sde.theta.shape[1]} paths", "tab:olive")):
        losses.plot(ts, values.mean(0), color=colour, label=f"{label} (mean, min–max band)")
        losses.fill_between(ts, values.min(0), values.max(0), color=colour, alpha=0.25)
    losses.set_yscale("log")
    losses.set_xlabel("time t (= kη for the discrete runs)")
    losses.set_ylabel("training loss")
    losses.set_title("gradient flow, GD, SGD and SGD's SDE (η = 0.2, b = 32)")
    losses.legend(fontsize=8)
    gaps.set_yscale("log")
    gaps.set_xlabel("time t")
    gaps.set_ylabel("‖θ_GD(t) − θ_flow(t)‖")
    gaps.set_title("distance of gradient descent from the flow")
    gaps.legend(fontsize=8)
    fig.suptitle("Discrete and stochastic training against the gradient flow: a tanh MLP on digits, one θ₀")
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small, fast configuration (used by the tests)")
    parser.add_argument("--out", default="figures/sgd_vs_flow.png", help="where to write the figure")
    args = parser.parse_args(argv)
    flows.plot.save(figure(*run(quick=args.quick)), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
