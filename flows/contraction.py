"""Contraction analysis of learning flows (MATH.md §5).

For ẋ = f(t, x) with Jacobian J = ∂f/∂x, the logarithmic norms

    μ₂(J) = λ_max((J + Jᵀ)/2),   μ₁(J) = max_j (J_jj + Σ_{i≠j}|J_ij|),   μ_∞(J) = max_i (J_ii + Σ_{j≠i}|J_ij|)
    μ_{2,M}(J) = λ_max(sym(ΘJΘ⁻¹)) = the largest generalised eigenvalue of (sym(MJ), M),   M = ΘᵀΘ

bound how fast nearby trajectories separate: ‖δx(t)‖_M ≤ exp(∫₀ᵗ μ ds) ‖δx(0)‖_M (Lohmiller & Slotine 1998).
μ < 0 along the way certifies contraction. The largest real part of J's eigenvalues is reported beside μ:
when J is not M-self-adjoint, transient growth is possible although every eigenvalue has negative real part.

Dense Jacobians (torch.func) serve small N; above ``DENSE_LIMIT`` the rate comes from Lanczos (scipy's ``eigsh``
on a LinearOperator built from Jacobian–vector and vector–Jacobian products), so no N × N matrix is formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigs, eigsh
from torch.func import jacrev, jvp, vjp

DENSE_LIMIT = 2500
LOGNORMS = (1, 2, math.inf)


def _f(field, t):
    t = torch.as_tensor(t, dtype=torch.float64)
    return lambda theta: field(t, theta)


def jacobian(field, theta: torch.Tensor, t: float = 0.0, *, dense: bool | None = None, chunk_size: int = 64):
    """J = ∂f/∂θ at (t, θ): a dense (N, N) tensor when ``dense`` (default: N ≤ DENSE_LIMIT), else a
    :class:`JacobianOperator`. Dense cost: N vector–Jacobian products, in chunks of ``chunk_size``."""
    if dense is None:
        dense = theta.numel() <= DENSE_LIMIT
    if not dense:
        return JacobianOperator(field, theta, t)
    return jacrev(_f(field, t), chunk_size=chunk_size)(theta.detach())


class JacobianOperator:
    """J at (t, θ) as a matrix-free operator: ``mv(v)`` = Jv (forward mode), ``rmv(u)`` = Jᵀu (reverse mode).

    Each product costs about one evaluation of the field plus its derivative; the reverse-mode pullback is
    built once and reused.
    """

    def __init__(self, field, theta: torch.Tensor, t: float = 0.0):
        self.fn = _f(field, t)
        self.theta = theta.detach()
        self.shape = (theta.numel(), theta.numel())
        self._pullback = None

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        return jvp(self.fn, (self.theta,), (v,))[1]

    def rmv(self, u: torch.Tensor) -> torch.Tensor:
        if self._pullback is None:
            _, self._pullback = vjp(self.fn, self.theta)
        return self._pullback(u)[0]

    def dense(self) -> torch.Tensor:
        eye = torch.eye(self.shape[0], dtype=self.theta.dtype, device=self.theta.device)
        return torch.stack([self.rmv(e) for e in eye])


def _lognorm_kind(ord) -> str:
    aliases = {1: "1", 2: "2", math.inf: "inf", "1": "1", "2": "2", "inf": "inf"}
    if isinstance(ord, str) and ord.lower() in ("fro", "nuc"):
        raise ValueError(f"ord={ord!r}: the {'Frobenius' if ord.lower() == 'fro' else 'nuclear'} norm is not "
                         "induced by a vector norm, so it has no logarithmic norm; use ord=1, 2 or math.inf")
    try:
        return aliases[ord]
    except (KeyError, TypeError):
        raise ValueError(f"unknown log-norm ord={ord!r}; use numpy's convention 1, 2 or math.inf "
                         "(or the strings '1', '2', 'inf')") from None


def lognorm(J: torch.Tensor, ord=2, metric: torch.Tensor | None = None) -> float:
    """The logarithmic norm μ(J) = lim_{h↓0} (‖I + hJ‖ − 1)/h of a square matrix (MATH.md §5).

    ``ord`` follows numpy's convention for the induced norm: 1 → max_j (J_jj + Σ_{i≠j}|J_ij|), 2 →
    λ_max((J + Jᵀ)/2), ``math.inf`` → max_i (J_ii + Σ_{j≠i}|J_ij|); the strings "1", "2", "inf" are aliases.
    With ``metric`` M (ord 2 only), μ_{2,M}(J) = λ_max(sym(ΘJΘ⁻¹)), M = ΘᵀΘ. Cost O(n³) (one eigen-solve).
    """
    J = torch.as_tensor(J, dtype=torch.float64) if not torch.is_tensor(J) else J
    kind = _lognorm_kind(ord)
    if J.ndim != 2 or J.shape[0] != J.shape[1]:
        raise ValueError(f"lognorm needs a square matrix J, got shape {tuple(J.shape)}")
    if metric is not None:
        if kind != "2":
            raise ValueError(f"a metric-weighted log-norm is defined here for ord=2 only, got ord={ord!r}")
        metric = torch.as_tensor(metric, dtype=J.dtype)
        if metric.shape != J.shape:
            raise ValueError(f"metric must have J's shape {tuple(J.shape)}, got {tuple(metric.shape)}")
        try:
            low = torch.linalg.cholesky(0.5 * (metric + metric.T))
        except RuntimeError:  # torch's LinAlgError
            raise ValueError("metric must be symmetric positive definite (its Cholesky factorisation failed)") from None
        # Θ J Θ⁻¹ with Θ = Lᵀ: Lᵀ J L⁻ᵀ
        weighted = low.T @ torch.linalg.solve_triangular(low, J.T, upper=False).T
        return float(torch.linalg.eigvalsh(0.5 * (weighted + weighted.T))[-1])
    if kind == "2":
        return float(torch.linalg.eigvalsh(0.5 * (J + J.T))[-1])
    off = J.abs() - torch.diag(J.diagonal().abs())
    if kind == "1":
        return float((J.diagonal() + off.sum(0)).max())
    return float((J.diagonal() + off.sum(1)).max())


@dataclass
class Rate:
    """Contraction rate at one state: μ (μ₂ or μ_{2,G}), the largest real part of J's eigenvalues, and how."""

    mu: float
    max_real_eig: float | None
    method: str


def _as_numpy_op(n, fn, dtype, device):
    def matvec(x):
        v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=dtype, device=device)
        return fn(v).detach().cpu().numpy()

    return LinearOperator((n, n), matvec=matvec, dtype=np.float64)


def rate(field, theta: torch.Tensor, metric=None, *, t: float = 0.0, method: str = "auto", eigenvalues: bool = True,
         tol: float = 1e-10) -> Rate:
    """μ(J) at (t, θ) in the 2-norm, or in the metric G(θ) = ΘᵀΘ of ``metric`` (a flows metric).

    ``method``: "dense" (eigen-solves of the dense Jacobian), "lanczos" (scipy ``eigsh`` on
    v ↦ ½(J + Jᵀ)v, or on the generalised pencil (sym(GJ), G) with G and G⁻¹ applied by the metric — O(N) memory),
    or "auto" (dense up to ``DENSE_LIMIT``). With ``eigenvalues`` the largest real part of an eigenvalue of J is
    computed too (dense: all eigenvalues; matrix-free: ARPACK ``eigs``, which may converge slowly).
    """
    n = theta.numel()
    if method == "auto":
        method = "dense" if n <= DENSE_LIMIT else "lanczos"
    if method == "dense":
        J = jacobian(field, theta, t, dense=True)
        m = metric.matrix(theta) if metric is not None else None
        mu = lognorm(J, "2", m)
        re = float(torch.linalg.eigvals(J).real.max()) if eigenvalues else None
        return Rate(mu, re, "dense")
    if method != "lanczos":
        raise ValueError(f"unknown method {method!r}; choose 'auto', 'dense' or 'lanczos'")
    op = JacobianOperator(field, theta, t)
    dtype, device = theta.dtype, theta.device
    if metric is None:
        sym = _as_numpy_op(n, lambda v: 0.5 * (op.mv(v) + op.rmv(v)), dtype, device)
        mu = float(eigsh(sym, k=1, which="LA", tol=tol, return_eigenvectors=False)[0])
    else:
        th = theta.detach()
        sym = _as_numpy_op(n, lambda v: 0.5 * (metric.apply(th, op.mv(v)) + op.rmv(metric.apply(th, v))), dtype,
                           device)
        g = _as_numpy_op(n, lambda v: metric.apply(th, v), dtype, device)
        g_inv = _as_numpy_op(n, lambda v: metric.solve(th, v), dtype, device)
        mu = float(eigsh(sym, k=1, M=g, Minv=g_inv, which="LA", tol=tol, return_eigenvectors=False)[0])
    re = None
    if eigenvalues:
        jop = _as_numpy_op(n, op.mv, dtype, device)
        re = float(np.max(eigs(jop, k=1, which="LR", tol=1e-8, return_eigenvectors=False).real))
    return Rate(mu, re, "lanczos")


# --------------------------------------------------------------------------------------------------------
# Along a trajectory
# --------------------------------------------------------------------------------------------------------


@dataclass
class ContractionReport:
    """μ(t) and max Re λ(t) at the output times, the bound B(t) = exp(∫₀ᵗ μ ds) (trapezoid rule between
    outputs), and the intervals [t_a, t_b] on which μ < 0 with the worst (largest) μ on each."""

    t: torch.Tensor
    mu: torch.Tensor
    max_real_eig: torch.Tensor
    bound: torch.Tensor
    contracting: list[tuple[float, float, float]]
    metric: str

    @property
    def certified(self) -> bool:
        """μ < 0 at every output time."""
        return bool((self.mu < 0).all())


def _intervals(t, mu):
    out, start = [], None
    for i, mi in enumerate(mu.tolist()):
        if mi < 0 and start is None:
            start = i
        if (mi >= 0 or i == len(t) - 1) and start is not None:
            stop = i if mi < 0 else i - 1
            out.append((t[start].item(), t[stop].item(), float(mu[start:stop + 1].max())))
            start = None
    return out


def analyze(field, traj, metric=None, *, method: str = "auto", eigenvalues: bool = True) -> ContractionReport:
    """Contraction rates along a (single) trajectory: one :func:`rate` per output time."""
    if traj.theta.ndim != 2:
        raise ValueError("analyze takes a single trajectory; use traj.member(i) for an ensemble")
    rates = [rate(field, th, metric, t=float(ti), method=method, eigenvalues=eigenvalues)
             for ti, th in zip(traj.t, traj.theta)]
    mu = torch.tensor([r.mu for r in rates], dtype=torch.float64)
    re = torch.tensor([np.nan if r.max_real_eig is None else r.max_real_eig for r in rates], dtype=torch.float64)
    t = traj.t.to(torch.float64).cpu()
    integral = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(mu, t)])
    name = "2-norm" if metric is None else (metric.describe().get("name") if hasattr(metric, "describe") else "M")
    return ContractionReport(t, mu, re, integral.exp(), _intervals(t, mu), name)


@dataclass
class Divergence:
    """Distances ‖δθ(t)‖_M between a reference trajectory and perturbed copies, shape (T, K)."""

    t: torch.Tensor
    distance: torch.Tensor
    reference: object
    perturbed: object


def divergence(field, theta0: torch.Tensor, delta: torch.Tensor, t, metric=None, **simulate_kwargs) -> Divergence:
    """Simulate θ₀ and θ₀ + δ_k (δ of shape (N,) or (K, N)) in one ensemble solve and return ‖δθ(t)‖_M, the
    metric (if any) evaluated on the reference trajectory. Set it against ``analyze(...).bound · ‖δ₀‖_M``."""
    from flows.simulate import simulate

    delta = delta.reshape(-1, theta0.numel())
    starts = torch.cat([theta0[None], theta0[None] + delta])
    simulate_kwargs.setdefault("progress", False)
    traj = simulate(field, starts, t, **simulate_kwargs)
    ref = traj.theta[:, 0]
    diffs = traj.theta[:, 1:] - ref[:, None]
    if metric is None:
        distance = diffs.norm(dim=-1)
    else:
        distance = torch.stack([torch.sqrt((d * metric.apply(r.expand_as(d), d)).sum(-1).clamp_min(0))
                                for r, d in zip(ref, diffs)])
    return Divergence(traj.t, distance, traj.member(0), traj)


# --------------------------------------------------------------------------------------------------------
# Composition of modules
# --------------------------------------------------------------------------------------------------------


@dataclass
class Composition:
    """Block gain matrix Γ of a coupled system (Γ_ii = μ(J_ii), Γ_ij = ‖J_ij‖ in the block metrics) and the
    verdicts it supports."""

    gamma: torch.Tensor
    bound: float
    hurwitz: bool
    cascade: bool
    blocks: list[str]

    @property
    def contracting(self) -> bool:
        """Certified by a weighted norm: Γ (Metzler) Hurwitz, or a cascade of contracting blocks."""
        return self.hurwitz or (self.cascade and bool((self.gamma.diagonal() < 0).all()))


def compose(field_or_jacobian, theta: torch.Tensor | None = None, blocks=None, metrics=None, *, t: float = 0.0,
            tol: float = 1e-12) -> Composition:
    """The composite contraction bound of block-partitioned dynamics (MATH.md §5, composition).

    Args:
        field_or_jacobian: a field (its dense Jacobian is taken at (t, θ)) or a dense Jacobian.
        blocks: (name, slice) pairs (``problem.blocks`` works); default: the field's problem's blocks.
        metrics: per block a constant SPD matrix M_i (default identity).

    μ(J) ≤ λ_max(sym Γ) in the block-weighted 2-norm; Γ Hurwitz certifies contraction in a weighted norm;
    a cascade (J_ij = 0 for i < j) of contracting blocks is contracting.
    """
    if callable(field_or_jacobian):
        J = jacobian(field_or_jacobian, theta, t, dense=True)
        if blocks is None:
            blocks = field_or_jacobian.problem.blocks
    else:
        J = torch.as_tensor(field_or_jacobian, dtype=torch.float64)
    pairs = [(getattr(b, "name", None) or b[0], getattr(b, "slice", None) or b[1]) for b in blocks]
    factors = []
    for i, (_, sl) in enumerate(pairs):
        size = sl.stop - sl.start
        m = torch.eye(size, dtype=J.dtype) if metrics is None or metrics[i] is None else torch.as_tensor(
            metrics[i], dtype=J.dtype)
        factors.append(torch.linalg.cholesky(0.5 * (m + m.T)).T)  # Θ_i with M_i = Θ_iᵀΘ_i
    k = len(pairs)
    gamma = torch.zeros(k, k, dtype=J.dtype)
    scale = float(J.abs().max()) if J.numel() else 0.0
    cascade = True
    for i, (_, si) in enumerate(pairs):
        for j, (_, sj) in enumerate(pairs):
            block = factors[i] @ J[si, sj] @ torch.linalg.inv(factors[j])
            if i == j:
                gamma[i, i] = float(torch.linalg.eigvalsh(0.5 * (block + block.T))[-1])
            else:
                gamma[i, j] = float(torch.linalg.matrix_norm(block, ord=2))
                if i < j and float(J[si, sj].abs().max()) > tol * max(scale, 1.0):
                    cascade = False
    bound = float(torch.linalg.eigvalsh(0.5 * (gamma + gamma.T))[-1])
    hurwitz = bool(torch.linalg.eigvals(gamma).real.max() < 0)
    return Composition(gamma, bound, hurwitz, cascade, [name for name, _ in pairs])


# --------------------------------------------------------------------------------------------------------
# Algorithmic stability, measured
# --------------------------------------------------------------------------------------------------------


@dataclass
class Stability:
    """Sensitivity of a learning flow to replacing one training sample, and its generalisation gap, over sizes n.

    ``sup_distance[i]`` = sup_t ‖θ_S(t) − θ_S'(t)‖ and ``heldout_change[i]`` = sup_t |L_test(θ_S(t)) − L_test(θ_S'(t))|
    at ``sizes[i]``; ``exponents`` are the fitted slopes of their logs against log n (the seed's bound predicts
    O(n^{-1/2}) for its constants). ``ingredients`` lists per n the bound's inputs measured at θ₀: the gradient's
    Lipschitz constant (largest |eigenvalue| of the Hessian, by Lanczos), the mass μ and the largest inner
    condition number ξ of a layerwise metric (None for other metrics).

    The generalisation gap (MATH.md §7) is measured on the same runs: ``gap_curves[i]`` is
    L_test(θ_S(t)) − L_S(θ_S(t)) at every output time, averaged over the ``draws`` independent data sets S of size
    n; ``train_loss[i]``, ``test_loss[i]`` and ``gap[i]`` are the values at the final time. ``exponents["gap"]``
    is the slope of log gap against log n over the sizes where the mean gap is positive (NaN if fewer than two),
    to be read beside ``bound_exponent`` = −1/2, the rate of the seed's bound O(κ²L/(ξμ√n)) (uniform stability ε
    bounds the expected gap, Bousquet & Elisseeff 2002; Hardt, Recht & Singer 2016).
    """

    sizes: list[int]
    sup_distance: list[float]
    heldout_change: list[float]
    exponents: dict
    ingredients: list[dict]
    train_loss: list[float]
    test_loss: list[float]
    gap: list[float]
    gap_curves: list[list[float]]
    t: list[float]
    draws: int = 1
    bound_exponent: float = -0.5

    def rows(self) -> list[dict]:
        """One row per n: sensitivity, held-out change, train and test loss at the end, and the gap."""
        return [{"n": n, "sup_distance": d, "heldout_change": c, "train_loss": tr, "test_loss": te, "gap": g}
                for n, d, c, tr, te, g in zip(self.sizes, self.sup_distance, self.heldout_change, self.train_loss,
                                              self.test_loss, self.gap)]


def hessian_norm(problem, theta: torch.Tensor, tol: float = 1e-8) -> float:
    """max |λ(∇²L(θ))| by Lanczos on Hessian–vector products (forward-over-reverse); O(N) memory."""
    n = theta.numel()

    def hvp(v):
        return jvp(problem.grad, (theta.detach(),), (v,))[1]

    op = _as_numpy_op(n, hvp, theta.dtype, theta.device)
    return float(np.abs(eigsh(op, k=1, which="LM", tol=tol, return_eigenvectors=False)).max())


def stability_experiment(model, loss, data, sizes, t, *, metric=None, heldout=None, seed: int = 0, draws: int = 1,
                         progress: bool = True, **simulate_kwargs) -> Stability:
    """Train one flow on data sets S, S' of size n that differ in one sample, for each n in ``sizes``, and
    measure the generalisation gap L_test(θ_S(t)) − L_S(θ_S(t)) along the same runs (MATH.md §5, §7).

    Args:
        model, loss: as for :class:`flows.Problem`; every run starts from the model's θ₀.
        data: a pool (inputs, targets), shuffled with ``seed``; S = the first n samples, S' = S with its first
            sample replaced by sample n. Samples after max(sizes) + 1 form the held-out set unless ``heldout``
            is given.
        t: output times of each simulation.
        metric: a function problem → metric (default Euclidean gradient flow).
        draws: independent data sets S per n for the gap (draw k shuffles the pool with ``seed + k``; draw 0 is
            the S of the sensitivity runs). The gap of one draw is noisy (its spread is of the order of the
            sampling error of the training loss, ~ n^{-1/2}); its mean over draws estimates the expected gap.

    The test loss is recorded by the simulation itself (``Problem(eval_data={"test": held-out})``). Cost per n:
    (1 + draws) simulations and one Lanczos run on Hessian–vector products.
    """
    from flows.metrics import Euclidean
    from flows.problem import Problem
    from flows.rules import GradientFlow
    from flows.simulate import simulate

    if int(draws) < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    pool_inputs, pool_targets = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    largest = max(sizes)
    if len(pool_inputs) < largest + 2 and heldout is None:
        raise ValueError(f"the pool has {len(pool_inputs)} samples; sizes up to {largest} need at least {largest + 2} "
                         "(S, the replacement, and a held-out set)")

    def shuffled(k):
        order = torch.randperm(len(pool_inputs), generator=torch.Generator().manual_seed(seed + k))
        inputs, targets = pool_inputs[order], pool_targets[order]
        return inputs, targets, heldout if heldout is not None else (inputs[largest + 1:], targets[largest + 1:])

    make_metric = metric if metric is not None else (lambda problem: Euclidean())
    simulate_kwargs.setdefault("progress", False)
    distances, changes, ingredients, gap_curves, train_ends, test_ends = [], [], [], [], [], []
    pools = [shuffled(k) for k in range(int(draws))]
    inputs, targets, test = pools[0]
    for n in sizes:
        swapped = torch.cat([torch.tensor([n]), torch.arange(1, n)])
        problem = Problem(model, loss, (inputs[:n], targets[:n]), eval_data={"test": test})
        other = Problem(model, loss, (inputs[swapped], targets[swapped]), eval_data={"test": test})
        metric_s, metric_o = make_metric(problem), make_metric(other)
        run_s = simulate(GradientFlow(problem, metric_s), problem.theta0, t, **simulate_kwargs)
        run_o = simulate(GradientFlow(other, metric_o), problem.theta0, t, **simulate_kwargs)
        distances.append(float((run_s.theta - run_o.theta).norm(dim=-1).max()))
        changes.append(float((run_s.metrics["test_loss"] - run_o.metrics["test_loss"]).abs().max()))
        runs = [run_s]
        for k_inputs, k_targets, k_test in pools[1:]:
            drawn = Problem(model, loss, (k_inputs[:n], k_targets[:n]), eval_data={"test": k_test})
            runs.append(simulate(GradientFlow(drawn, make_metric(drawn)), drawn.theta0, t, **simulate_kwargs))
        gap_curves.append(torch.stack([run.metrics["test_loss"] - run.loss for run in runs]).mean(0))
        xi = None
        if hasattr(metric_s, "diagnostics"):
            xi = max(row["xi"] for row in metric_s.diagnostics(problem.theta0))
        ingredients.append({"n": n, "gradient_lipschitz": hessian_norm(problem, problem.theta0),
                            "mu": getattr(metric_s, "mu", None), "xi": xi})
        train_ends.append(float(torch.stack([run.loss[-1] for run in runs]).mean()))
        test_ends.append(float(torch.stack([run.metrics["test_loss"][-1] for run in runs]).mean()))
        if progress:
            print(f"  n = {n}: sup‖Δθ‖ = {distances[-1]:.3e}, held-out change {changes[-1]:.3e}, "
                  f"gap L_test − L_train = {float(gap_curves[-1][-1]):+.3e}", flush=True)
    logn = np.log(np.asarray(sizes, dtype=float))
    gaps = np.array([float(curve[-1]) for curve in gap_curves])
    positive = gaps > 0
    gap_exponent = float(np.polyfit(logn[positive], np.log(gaps[positive]), 1)[0]) if positive.sum() >= 2 \
        else float("nan")
    exponents = {"distance": float(np.polyfit(logn, np.log(distances), 1)[0]),
                 "heldout": float(np.polyfit(logn, np.log(np.maximum(changes, 1e-300)), 1)[0]),
                 "gap": gap_exponent}
    if progress:
        print(f"  fitted exponents of n: sup‖Δθ‖ {exponents['distance']:+.2f}, held-out change "
              f"{exponents['heldout']:+.2f}, gap {exponents['gap']:+.2f}; the bound's rate is −0.50", flush=True)
    return Stability(list(sizes), distances, changes, exponents, ingredients,
                     train_loss=train_ends, test_loss=test_ends, gap=gaps.tolist(),
                     gap_curves=[curve.tolist() for curve in gap_curves],
                     t=torch.as_tensor(t).tolist(), draws=int(draws))
