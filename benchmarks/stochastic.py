"""SGD as an SDE: the per-path cost of an ensemble solve of the stochastic modified equation against discrete SGD.

    python benchmarks/stochastic.py [--quick] [--threads T]

Digits MLP 64-32-10 (tanh, cross-entropy, float64) on all 1 797 training samples; learning rate 0.1, batch size 32.

1. Candidates, each timed in its own block after its own warm-up (``time_each``), min and median reported:
   - ``sgd``: 16 separate discrete SGD runs of 200 steps, a hand-written loop θ ← θ − η ∇L_B(θ) with
     ``problem.grad(θ, idx)`` on 32 indices drawn with replacement (seeded) — 3 200 minibatch gradients;
   - ``sde``: ``flows.simulate_sde`` with 16 paths in one torchsde solve, Euler–Maruyama with dt = η (200 steps, one
     drift-and-noise evaluation per step and path — the same 3 200 gradient evaluations), minibatch noise from the
     per-sample gradients of all n samples (Σ(θ) exact), no recording.
   The per-path cost ratio sde / sgd (both run 16 paths) is the headline; target ≤ 2×.
2. What an SDE step costs, per step for all 16 paths: the Euler step −dt∇L + √(η/b)·D dW from one weighted
   backward pass (what simulate_sde runs for Euler), by the structured chain sweep the MLP takes
   (``Problem.weighted_gradients`` → ``LinearChain.weighted_gradients``) and by the vmapped autograd pullback any
   other model takes (the same MLP inside an ``nn.Sequential`` subclass, which the chain reader leaves alone); ∇L and
   D dW apart (two weightings, the route of any other drift) by both routes, and the pullback looped over paths; the
   full-batch gradient alone (``problem.grad``, vmapped over paths: the drift of the deterministic flow); the
   explicit per-sample factor via ``problem.sample_grads`` (memory n × N per path) on a 32-sample subsample, looped
   over paths; SGD's 16 minibatch gradients; and one Brownian increment (16 × 1 797 normals) from a torchsde
   BrownianInterval and from flows' SequentialBrownian, which simulate_sde uses for fixed-step Euler.

Note what is compared: an SDE step evaluates the full-batch drift and noise (n = 1 797 samples per path), an SGD step
a 32-sample gradient, so per sample gradient the SDE does 56× more work; the ratio stays small only because the
ensemble step turns 16 small passes into large matrix products.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchsde

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import setup, time_each, write_results  # noqa: E402

import flows  # noqa: E402
from flows.sde import MinibatchNoise, SequentialBrownian  # noqa: E402

TARGET = 2.0


def sgd_runs(problem, theta0, paths, steps, lr, batch, seed=0):
    """The loop a user would write: ``paths`` independent minibatch SGD runs (batch indices with replacement)."""
    n = problem.batch_size
    finals = []
    for p in range(paths):
        gen = torch.Generator().manual_seed(seed + p)
        theta = theta0.clone()
        for _ in range(steps):
            idx = torch.randint(0, n, (batch,), generator=gen)
            theta = theta - lr * problem.grad(theta, idx)
        finals.append(theta)
    return torch.stack(finals)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 steps, one repeat (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    setup(threads=args.threads)
    paths, lr, batch = 16, 0.1, 32
    steps = 20 if args.quick else 200
    repeats, warmup = (1, 1) if args.quick else (3, 1)
    x, y = flows.data.digits()
    problem = flows.Problem(flows.data.mlp([64, 32, 10]), "cross_entropy", (x, y))
    theta0 = problem.theta0
    t = torch.tensor([0.0, steps * lr], dtype=torch.float64)

    def sde():
        return flows.simulate_sde(problem, theta0, t, lr=lr, batch_size=batch, paths=paths, dt=lr, seed=0,
                                  progress=False, record=False)

    def sgd():
        return sgd_runs(problem, theta0, paths, steps, lr, batch)

    check = sde()
    assert check.stats["nfe"] == steps, check.stats  # one evaluation per step: the same count as SGD's gradients
    sgd_final = sgd()
    # both ensembles move the loss the same way (a sanity check, not a statistical test)
    loss_sde = problem.loss(check.theta[-1]).mean().item()
    loss_sgd = problem.loss(sgd_final).mean().item()

    timing = time_each({"sgd": sgd, "sde": sde}, repeats=repeats, warmup=warmup)
    ratio_min = timing["sde"]["min_s"] / timing["sgd"]["min_s"]
    ratio_median = timing["sde"]["median_s"] / timing["sgd"]["median_s"]

    # the parts of one SDE step, for all paths
    noise = MinibatchNoise(problem)
    gen = torch.Generator().manual_seed(1)
    thetas = theta0 + 0.01 * torch.randn(paths, problem.num_params, generator=gen, dtype=torch.float64)
    v = torch.randn(paths, noise.channels, generator=gen, dtype=torch.float64)
    small = MinibatchNoise(problem, subsample=batch)

    class Opaque(torch.nn.Sequential):  # the same MLP, not read as a chain: the vmapped pullback route
        pass

    opaque = MinibatchNoise(flows.Problem(Opaque(*problem.model), "cross_entropy", (x, y)))
    assert flows.modules.linear_chain(opaque.problem) is None and flows.modules.linear_chain(problem) is not None
    span = 1e6  # both Brownian motions answer consecutive steps of lr from 0 (far from the end of the span)
    clocks = {"interval": 0.0, "sequential": 0.0}
    interval = torchsde.BrownianInterval(t0=0.0, t1=span, size=(paths, noise.channels), dtype=torch.float64,
                                         entropy=0, dt=lr)
    sequential = SequentialBrownian(0.0, span, (paths, noise.channels), seed=0)

    def next_increment(bm, key):
        start = clocks[key]
        clocks[key] = start + lr
        return bm(start, clocks[key])

    parts = time_each({
        "euler_step_chain_sweep": lambda: noise.euler_increment(thetas, v, lr, (lr / batch) ** 0.5),
        "euler_step_vmapped_pullback": lambda: opaque.euler_increment(thetas, v, lr, (lr / batch) ** 0.5),
        "drift_and_noise_chain_sweep": lambda: noise.gradient_and_product(thetas, v),
        "drift_and_noise_vmapped_pullback": lambda: opaque.gradient_and_product(thetas, v),
        "drift_and_noise_pullback_path_loop": lambda: [opaque.gradient_and_product(thetas[i:i + 1], v[i:i + 1])
                                                       for i in range(paths)],
        "full_gradient_only_vmapped": lambda: problem.grad(thetas),
        "explicit_factor_subsample32_path_loop": lambda: [small.factor(th) for th in thetas],
        "sgd_minibatch_gradient_x16": lambda: [problem.grad(th, torch.arange(batch)) for th in thetas],
        "brownian_interval_increment": lambda: next_increment(interval, "interval"),
        "sequential_brownian_increment": lambda: next_increment(sequential, "sequential"),
    }, repeats=3 if args.quick else 7, warmup=1)
    per_step_ms = {name: 1e3 * r["min_s"] for name, r in parts.items()}

    print(f"digits MLP 64-32-10 (N = {problem.num_params}), n = {problem.batch_size}, float64, "
          f"{torch.get_num_threads()} threads; lr {lr}, batch {batch}, {steps} steps, {paths} paths")
    print(f"{'candidate':<8}{'min (s)':>10}{'median (s)':>12}{'per path (ms)':>15}")
    for name in ("sgd", "sde"):
        r = timing[name]
        print(f"{name:<8}{r['min_s']:>10.3f}{r['median_s']:>12.3f}{1e3 * r['min_s'] / paths:>15.1f}")
    print(f"per-path cost SDE / SGD: {ratio_min:.2f}× (mins), {ratio_median:.2f}× (medians); target ≤ {TARGET}× "
          f"{'met' if ratio_min <= TARGET else 'NOT met'}")
    print(f"mean final loss: SDE {loss_sde:.4f}, SGD {loss_sgd:.4f} (from {problem.loss(theta0).item():.4f})")
    print("one step for all 16 paths (min, ms):")
    for name, ms in per_step_ms.items():
        print(f"  {name:<40}{ms:>9.2f}")
    path = write_results("stochastic", {
        "quick": args.quick,
        "method": "each candidate in its own block after its warm-up (time_each); ratios from mins and medians",
        "model": "digits MLP 64-32-10, tanh, cross-entropy, float64, all 1797 samples",
        "lr": lr, "batch_size": batch, "steps": steps, "paths": paths, "repeats": repeats,
        "sde": {"method": "euler", "dt": lr, "noise": "minibatch (all samples)", "nfe": check.stats["nfe"]},
        "timing": timing,
        "per_path_ratio_min": ratio_min, "per_path_ratio_median": ratio_median,
        "target_ratio": TARGET, "target_met": ratio_min <= TARGET,
        "mean_final_loss": {"sde": loss_sde, "sgd": loss_sgd},
        "step_parts_ms_min": per_step_ms, "step_parts": parts,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
