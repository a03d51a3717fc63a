"""A small 1-D CNN on MNIST-1D under four learning rules from one θ₀: train against test along the runs.

MNIST-1D (Greydanus & Kobak, ICML 2024) is generated offline by the ``mnist1d`` package (4 000 training and
1 000 test sequences of length 40, ten classes; see :func:`flows.data.mnist1d`). The network is
Conv1d(1→8, k=5, s=2) → tanh → Conv1d(8→8, k=3, s=2) → tanh → Linear(64→10), trained under cross-entropy by

    the Euclidean gradient flow            θ̇ = −∇L(θ)
    the layerwise flow (Pehle & Slotine)   θ̇ = −G_layerwise(θ)⁻¹∇L(θ)
    the K-FAC flow (Martens & Grosse)      θ̇ = −G_KFAC(θ)⁻¹∇L(θ)
    feedback alignment (Lillicrap et al.)  backward pass through fixed random feedback matrices

with the test loss and accuracy recorded at every output time (``Problem(eval_data={"test": …})``). The figure
shows training and test loss against vector-field evaluations, the generalisation gap, the test accuracy along
the runs and at the end.

A rule whose construction or simulation raises (for instance a rule that does not support convolutions yet, or
a flow too stiff to finish within the step budget — torchdiffeq's ``max_num_steps``) is not run: the script prints
which rules it could not run and why, and the figure says so too.

    python examples/mnist1d.py [--quick] [--out figures/mnist1d.png]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

import flows

RULE_ERRORS = (ValueError, TypeError, NotImplementedError, flows.FlowDivergedError)


def cnn(seed: int = 0) -> nn.Sequential:
    """The 1-D CNN (898 parameters), float64, torch's default initialisation under ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(1, 8, kernel_size=5, stride=2), nn.Tanh(),   # 40 → 18
        nn.Conv1d(8, 8, kernel_size=3, stride=2), nn.Tanh(),   # 18 → 8
        nn.Flatten(), nn.Linear(64, 10),
    ).double()


def rules(problem: flows.Problem, *, mu: float, metric_batch: int, seed: int) -> dict:
    """Constructors of the four rules (called one by one, so that one failing does not stop the others)."""
    return {
        "Euclidean": lambda: flows.rules.GradientFlow(problem, flows.metrics.Euclidean()),
        f"Layerwise (μ={mu:g})": lambda: flows.rules.GradientFlow(
            problem, flows.metrics.Layerwise(problem, mu=mu, metric_batch=metric_batch, seed=seed)),
        f"K-FAC (γ={mu:g})": lambda: flows.rules.GradientFlow(
            problem, flows.metrics.KFAC(problem, damping=mu, metric_batch=metric_batch, seed=seed)),
        "feedback alignment": lambda: flows.rules.FeedbackAlignment(problem, seed=seed),
    }


def _short_reason(reason: str) -> str:
    if reason.startswith("FlowDivergedError") and "max_num_steps" in reason:
        return "not run: too stiff for\nthe step budget"
    return f"not run: {reason.split(':')[0]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subsample and a short horizon (for the tests)")
    parser.add_argument("--out", default="figures/mnist1d.png")
    args = parser.parse_args()

    if args.quick:
        n_train, n_test, t_end, points, tol, metric_batch, max_steps = 256, 200, 2.0, 5, 1e-4, 32, 150
    else:
        n_train, n_test, t_end, points, tol, metric_batch, max_steps = 4000, 1000, 100.0, 51, 1e-6, 128, 1000
    mu, seed = 1e-2, 0
    x, y = flows.data.mnist1d(split="train", channel=True)
    x_test, y_test = flows.data.mnist1d(split="test", channel=True)
    problem = flows.Problem(cnn(seed), "cross_entropy", (x[:n_train], y[:n_train]),
                            eval_data={"test": (x_test[:n_test], y_test[:n_test])})
    # output times spaced geometrically: the curves are drawn against evaluations on a log axis
    t = torch.cat([torch.zeros(1), torch.logspace(-2, 0, points - 1) * t_end]).to(torch.float64)
    print(f"MNIST-1D: {n_train} training and {n_test} test sequences; {problem}; t ∈ [0, {t_end:g}], "
          f"dopri5 rtol={tol:g} atol={tol * 1e-2:g}, at most {max_steps} steps per rule", flush=True)

    runs, failed = {}, {}
    for label, make in rules(problem, mu=mu, metric_batch=metric_batch, seed=seed).items():
        start = time.perf_counter()
        try:
            field = make()
            runs[label] = flows.simulate(field, problem.theta0, t, rtol=tol, atol=tol * 1e-2,
                                         options={"max_num_steps": max_steps}, progress=not args.quick)
        except RULE_ERRORS as exc:
            failed[label] = f"{type(exc).__name__}: {exc}"
            print(f"  {label}: could not run — {failed[label]}", flush=True)
            continue
        traj = runs[label]
        print(f"  {label:22s} train loss {float(traj.loss[-1]):.4f}  "
              f"test loss {float(traj.metrics['test_loss'][-1]):.4f}  "
              f"test accuracy {float(traj.metrics['test_accuracy'][-1]):.3f}  nfe {traj.stats['nfe']:4d}  "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    if not runs:
        print("no rule could run", file=sys.stderr)
        return 1

    from matplotlib.figure import Figure

    fig = Figure(figsize=(17.0, 4.6), layout="constrained")
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1.2, 1.0, 1.0, 0.8]})
    flows.plot.generalisation(runs, x="nfe", ax=axes[:3])
    for ax in axes[:3]:
        ax.set_xscale("log")
    final = {label: float(traj.metrics["test_accuracy"][-1]) for label, traj in runs.items()}
    colours = [line.get_color() for line in axes[0].lines[:2 * len(runs):2]]
    labels = list(final) + list(failed)
    bars = axes[3].barh(labels, list(final.values()) + [0.0] * len(failed), color=colours + ["gray"] * len(failed))
    axes[3].bar_label(bars, labels=[f"{v:.3f}" for v in final.values()]
                      + [_short_reason(reason) for reason in failed.values()], padding=3)
    axes[3].set(xlim=(0, 1.25), xlabel=f"accuracy on {n_test} held-out sequences", title="test accuracy at t_end")
    axes[3].invert_yaxis()
    fig.suptitle(f"1-D CNN on MNIST-1D ({n_train} training sequences), one θ₀: train (solid) against test (dashed)")
    flows.plot.save(fig, args.out)
    print(f"wrote {args.out}")
    if failed:
        print("rules not run: " + "; ".join(f"{label}: {reason}" for label, reason in failed.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
