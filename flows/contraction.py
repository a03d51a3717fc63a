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


def _is_moving(metric, moving: bool | None) -> bool:
    if metric is None:
        if moving:
            raise ValueError("moving=True needs a metric (the 2-norm does not move)")
        return False
    if not (callable(getattr(metric, "apply", None)) and callable(getattr(metric, "solve", None))):
        raise TypeError(f"metric must be a flows metric with apply(θ, v) = G(θ)v and solve(θ, v) = G(θ)⁻¹v, got "
                        f"{type(metric).__name__}")
    return bool(getattr(metric, "depends_on_theta", True)) if moving is None else bool(moving)


def metric_derivative(metric, theta: torch.Tensor, direction: torch.Tensor):
    """v ↦ Ġv = d/dε G(θ + ε·direction) v (with direction = f(θ), the metric's rate of change along the flow).

    A metric with a ``derivative_operator(θ, direction)`` (:meth:`flows.metrics.Layerwise.derivative_operator`:
    Ġ from its factors and their forward-mode derivative, taken once) gives the products itself. Otherwise a
    forward-mode Jacobian–vector product through ``metric.apply``: one extra pass of the metric product per vector,
    no N × N matrix. A metric whose product forward mode cannot differentiate (a custom operation) falls back to the
    central difference [G(θ + h f) − G(θ − h f)]v / 2h with h = ε^{1/3}(1 + ‖θ‖)/‖f‖, error O(h²).
    """
    theta, direction = theta.detach(), direction.detach()
    if callable(getattr(metric, "derivative_operator", None)):
        return metric.derivative_operator(theta, direction)

    def by_jvp(v):
        return jvp(lambda th: metric.apply(th, v), (theta,), (direction,))[1]

    scale = float(torch.linalg.vector_norm(direction))
    h = torch.finfo(theta.dtype).eps ** (1 / 3) * (1 + float(torch.linalg.vector_norm(theta))) / max(scale, 1e-300)

    def by_difference(v):
        return (metric.apply(theta + h * direction, v) - metric.apply(theta - h * direction, v)) / (2 * h)

    probe = torch.zeros_like(theta)
    try:
        by_jvp(probe)
        return by_jvp
    except (RuntimeError, NotImplementedError, TypeError):
        return by_difference


def rate(field, theta: torch.Tensor, metric=None, *, t: float = 0.0, method: str = "auto", eigenvalues: bool = True,
         tol: float = 1e-10, moving: bool | None = None) -> Rate:
    """μ(J) at (t, θ) in the 2-norm, or in the metric G(θ) of ``metric`` (a flows metric), MATH.md §5.

    Frozen metric (``moving=False``): the largest generalised eigenvalue of (sym(GJ), G) = λ_max(sym(ΘJΘ⁻¹)).
    Moving metric (``moving=True``, the default for metrics with ``depends_on_theta``): along ẋ = f(x) the virtual
    displacement obeys d/dt(δxᵀGδx) = δxᵀ(Ġ + JᵀG + GJ)δx with Ġ = DG(θ)[f(θ)], so

        μ = λ_max( ½(Ġ + JᵀG + GJ), G ),          equivalently λ_max(sym F), F = (Θ̇ + ΘJ)Θ⁻¹, G = ΘᵀΘ

    (Lohmiller & Slotine 1998). Freezing G is exact only at equilibria (f = 0 ⇒ Ġ = 0) and for constant metrics.

    ``method``: "dense" (eigen-solves of dense J, G and Ġ, the last by one forward-mode pass through
    ``metric.matrix``), "lanczos" (scipy ``eigsh`` on v ↦ ½(Ġv + Jᵀ(Gv) + G(Jv)) against G, with G and G⁻¹ applied
    by the metric: O(N) memory; cost per Lanczos step one JVP and one VJP of the field plus three metric products),
    or "auto" (dense up to ``DENSE_LIMIT``). With ``eigenvalues`` the largest real part of an eigenvalue of J is
    computed too (dense: all eigenvalues; matrix-free: ARPACK ``eigs``).
    """
    n = theta.numel()
    moving = _is_moving(metric, moving)
    if method == "auto":
        method = "dense" if n <= DENSE_LIMIT else "lanczos"
    if method not in ("dense", "lanczos"):
        raise ValueError(f"unknown method {method!r}; choose 'auto', 'dense' or 'lanczos'")
    th = theta.detach()
    if method == "dense":
        J = jacobian(field, th, t, dense=True)
        if metric is None:
            mu = lognorm(J, 2)
        else:
            G = metric.matrix(th)
            S = 0.5 * (G @ J + J.T @ G)
            if moving:
                f = _f(field, t)(th).detach()
                G_dot = jvp(metric.matrix, (th,), (f,))[1]
                S = S + 0.5 * G_dot
            mu = _generalised_max(0.5 * (S + S.T), G)
        re = float(torch.linalg.eigvals(J).real.max()) if eigenvalues else None
        return Rate(mu, re, "dense")
    op = JacobianOperator(field, theta, t)
    dtype, device = theta.dtype, theta.device
    if metric is None:
        sym = _as_numpy_op(n, lambda v: 0.5 * (op.mv(v) + op.rmv(v)), dtype, device)
        mu = float(eigsh(sym, k=1, which="LA", tol=tol, return_eigenvectors=False)[0])
    else:
        g_dot = metric_derivative(metric, th, _f(field, t)(th).detach()) if moving else None

        def pencil(v):
            out = 0.5 * (metric.apply(th, op.mv(v)) + op.rmv(metric.apply(th, v)))
            return out + 0.5 * g_dot(v) if g_dot is not None else out

        sym = _as_numpy_op(n, pencil, dtype, device)
        g = _as_numpy_op(n, lambda v: metric.apply(th, v), dtype, device)
        g_inv = _as_numpy_op(n, lambda v: metric.solve(th, v), dtype, device)
        mu = float(eigsh(sym, k=1, M=g, Minv=g_inv, which="LA", tol=tol, return_eigenvectors=False)[0])
    re = None
    if eigenvalues:
        jop = _as_numpy_op(n, op.mv, dtype, device)
        re = float(np.max(eigs(jop, k=1, which="LR", tol=1e-8, return_eigenvectors=False).real))
    return Rate(mu, re, "lanczos")


def _generalised_max(S: torch.Tensor, G: torch.Tensor) -> float:
    """λ_max of the symmetric pencil (S, G), G SPD: the largest eigenvalue of L⁻¹SL⁻ᵀ with G = LLᵀ."""
    low = torch.linalg.cholesky(0.5 * (G + G.T))
    half = torch.linalg.solve_triangular(low, S, upper=False)
    whole = torch.linalg.solve_triangular(low, half.T, upper=False)
    return float(torch.linalg.eigvalsh(0.5 * (whole + whole.T))[-1])


# --------------------------------------------------------------------------------------------------------
# Along a trajectory
# --------------------------------------------------------------------------------------------------------


@dataclass
class ContractionReport:
    """μ(t) and max Re λ(t) at the output times, the certificate B(t) = exp(∫₀ᵗ μ ds) (trapezoid rule between
    outputs: ‖δθ(t)‖_G ≤ B(t)‖δθ(0)‖_G for infinitesimal δθ), and the intervals [t_a, t_b] on which μ < 0 with the
    worst (largest) μ on each. For a moving metric ``mu`` is the moving rate and ``mu_frozen`` the frozen one
    (None otherwise), so the difference the Ġ term makes is visible."""

    t: torch.Tensor
    mu: torch.Tensor
    max_real_eig: torch.Tensor
    bound: torch.Tensor
    contracting: list[tuple[float, float, float]]
    metric: str
    mu_frozen: torch.Tensor | None = None

    @property
    def certified(self) -> bool:
        """μ < 0 at every output time."""
        return bool((self.mu < 0).all())

    @property
    def integral(self) -> torch.Tensor:
        """∫₀ᵗ μ ds at the output times (log of the certificate)."""
        return self.bound.log()

    def fraction_contracting(self) -> float:
        """The fraction of the run's duration on which μ < 0 (output intervals with μ < 0 at both ends, plus
        half of those where it changes sign)."""
        neg = (self.mu < 0).to(torch.float64)
        dt = self.t[1:] - self.t[:-1]
        span = float(self.t[-1] - self.t[0])
        if span == 0:
            return float(neg[0])
        return float((0.5 * (neg[1:] + neg[:-1]) * dt).sum()) / span


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


def _field_of(field, traj, what: str):
    field = getattr(traj, "field", None) if field is None else field
    if field is None:
        raise ValueError(f"{what} needs the vector field: this trajectory carries none (it was loaded from a file or "
                         "made outside flows.simulate); pass field=")
    return field


def analyze(field, traj, metric=None, *, method: str = "auto", eigenvalues: bool = True,
            moving: bool | None = None, frozen: bool = True, tol: float = 1e-10) -> ContractionReport:
    """Contraction rates along a (single) trajectory: one :func:`rate` per output time, in the 2-norm or in
    ``metric`` — moving (with Ġ) by default for metrics that depend on θ, in which case the frozen rate is
    reported beside it (``frozen=False`` skips it, halving the cost). ``field=None`` takes the field the
    trajectory remembers (``traj.field``)."""
    field = _field_of(field, traj, "analyze")
    if traj.theta.ndim != 2:
        raise ValueError("analyze takes a single trajectory; use traj.member(i) for an ensemble")
    moving = _is_moving(metric, moving)
    rates = [rate(field, th, metric, t=float(ti), method=method, eigenvalues=eigenvalues, moving=moving, tol=tol)
             for ti, th in zip(traj.t, traj.theta)]
    frozen_mu = None
    if moving and frozen:
        frozen_mu = torch.tensor([rate(field, th, metric, t=float(ti), method=method, eigenvalues=False,
                                       moving=False, tol=tol).mu for ti, th in zip(traj.t, traj.theta)],
                                 dtype=torch.float64)
    mu = torch.tensor([r.mu for r in rates], dtype=torch.float64)
    re = torch.tensor([np.nan if r.max_real_eig is None else r.max_real_eig for r in rates], dtype=torch.float64)
    t = traj.t.to(torch.float64).cpu()
    integral = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(mu, t)])
    name = "2-norm" if metric is None else (metric.describe().get("name") if hasattr(metric, "describe") else "M")
    if moving:
        name += " (moving)"
    return ContractionReport(t, mu, re, integral.exp(), _intervals(t, mu), name, frozen_mu)


@dataclass
class Lyapunov:
    """Finite-time Lyapunov exponents of a run: ``exponents`` (k,), largest first, over [t₀, T]; ``running``
    (T_out, k) the estimates over [t₀, t_i] at each output time (row 0 is NaN); ``trajectory`` the states."""

    t: torch.Tensor
    exponents: torch.Tensor
    running: torch.Tensor
    trajectory: object


class _TangentField:
    """ż = (f(θ), J V): the state θ (N) with k tangent vectors V (N × k), flattened to N(1 + k).

    The k Jacobian–vector products go through one vmapped forward-mode pass (a loop over the columns where the
    field cannot be vmapped): the field and its k directional derivatives in about one evaluation's time per
    column, never forming J. A field with a symmetric Jacobian takes JV = JᵀV by reverse mode instead: from the
    field's own ``jacobian_products(t, θ, V)`` when it has one (:meth:`flows.rules.GradientFlow.jacobian_products`:
    the gradient once by autograd, its graph kept, and the k Hessian products by one batched backward pass), else
    by a vjp of the field vmapped over the columns.
    """

    def __init__(self, field, n: int, k: int):
        self.field, self.n, self.k = field, n, k
        self.state_length = n * (1 + k)
        self.problem = getattr(field, "problem", None)
        self._vmapped = True
        # J = Jᵀ (a Euclidean gradient flow: J = −∇²L): JV by one batched reverse-mode pass over the gradient's graph,
        # ≈ 2.5× cheaper than forward over reverse for an MLP (benchmarks/contraction.py)
        self.symmetric = bool(getattr(field, "symmetric_jacobian", False))
        # a field that gives (f, JV) itself skips the torch.func transforms around the field, whose per-operation
        # overhead dominates at small sizes (≈ 20 % of the augmented evaluation for the digits MLP 64-32-10)
        self.products = getattr(field, "jacobian_products", None) if self.symmetric else None

    def theta_of(self, state):
        return state[..., :self.n]

    def __call__(self, t, state):
        theta, tangents = state[:self.n], state[self.n:].reshape(self.n, self.k)
        if self.products is not None:
            values, products = self.products(t, theta, tangents)
            return torch.cat([values, products.reshape(-1)])
        if self.symmetric:
            with torch.enable_grad():
                values, pull = vjp(lambda th: self.field(t, th), theta)
                products = torch.func.vmap(pull, in_dims=1, out_dims=1)(tangents)[0]
            return torch.cat([values.detach(), products.detach().reshape(-1)])

        def one(v):
            return jvp(lambda th: self.field(t, th), (theta,), (v,))

        if self._vmapped:
            try:
                values, products = torch.func.vmap(one, in_dims=1, out_dims=(None, 1))(tangents)
            except (RuntimeError, ValueError):  # a field with data-dependent Python control flow
                self._vmapped = False
        if not self._vmapped:
            pairs = [one(tangents[:, i]) for i in range(self.k)]
            values, products = pairs[0][0], torch.stack([p[1] for p in pairs], dim=1)
        return torch.cat([values.detach(), products.detach().reshape(-1)])


def lyapunov(field, theta0: torch.Tensor, t, *, k: int = 1, seed: int = 0, progress: bool = True,
             **solver) -> Lyapunov:
    """The k largest finite-time Lyapunov exponents along the run from θ₀ by the QR method (Benettin et al. 1980).

    k tangent vectors δẋ = J(θ(t))δx ride with the state inside one solve (augmented state (θ, V), JVPs only,
    memory O(N·k), so it runs at 10⁵ parameters); at every output time V = QR, log|R_ii| is accumulated and V ← Q.
    λ_i ≈ (1/(T − t₀)) Σ log|R_ii|. For ẋ = Ax they tend to the real parts of A's eigenvalues; for the gradient flow
    of ½θᵀHθ the largest is −λ_min(H). The output times ``t`` set the re-orthonormalisation interval: finer
    grids keep the tangent vectors from collapsing onto the top direction. ``method``, ``rtol``, ``atol`` and
    ``options`` go to torchdiffeq's ``odeint`` unchanged (one solve per output interval).
    """
    from torchdiffeq import odeint
    from tqdm.auto import tqdm

    theta0 = torch.as_tensor(theta0).detach()
    if theta0.ndim != 1:
        raise ValueError(f"lyapunov takes a single state θ₀ of shape (N,), got {tuple(theta0.shape)}")
    n = theta0.numel()
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer between 1 and N = {n}, got {k!r}")
    t = torch.as_tensor(t, dtype=theta0.dtype)
    if t.ndim != 1 or len(t) < 2 or not bool((t[1:] > t[:-1]).all()):
        raise ValueError("t must be an increasing 1-D grid of at least two output times")
    gen = torch.Generator().manual_seed(seed)
    tangents = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=theta0.dtype))[0]
    augmented = _TangentField(field, n, k)
    unknown = set(solver) - {"method", "rtol", "atol", "options"}
    if unknown:
        raise TypeError(f"lyapunov got unexpected keyword argument(s) {sorted(unknown)}; it passes method, rtol, atol "
                        "and options to torchdiffeq")
    logs = torch.zeros(len(t), k, dtype=torch.float64)
    states = [theta0]
    theta = theta0
    for i in tqdm(range(1, len(t)), disable=None if progress else True, desc="lyapunov", leave=False):
        state0 = torch.cat([theta, tangents.reshape(-1)])
        end = odeint(augmented, state0, t[i - 1:i + 1], **solver)[-1]
        if not bool(torch.isfinite(end).all()):
            from flows.errors import FlowDivergedError
            from flows.trajectory import Trajectory

            partial = Trajectory(t[:i], torch.stack(states), field=field, problem=augmented.problem)
            raise FlowDivergedError(f"the flow or its tangent vectors became non-finite between t={float(t[i - 1]):.6g}"
                                    f" and t={float(t[i]):.6g}", t=float(t[i - 1]), theta=theta,
                                    trajectory=partial, bad_time=float(t[i]))
        theta, moved = end[:n], end[n:].reshape(n, k)
        q, r = torch.linalg.qr(moved)
        logs[i] = logs[i - 1] + r.diagonal().abs().log().to(torch.float64)
        tangents = q
        states.append(theta)
    elapsed = (t - t[0]).to(torch.float64)
    running = logs / elapsed[:, None]
    running[0] = float("nan")
    exponents, _ = torch.sort(running[-1], descending=True)
    from flows.trajectory import Trajectory

    traj = Trajectory(t, torch.stack(states), metadata={"lyapunov_k": k}, field=field,
                      problem=getattr(field, "problem", None))
    return Lyapunov(t, exponents, running, traj)


@dataclass
class StabilityReport:
    """The three kinds of evidence on one time axis: contraction rates (μ, frozen μ, max Re λ), the certificate,
    and the finite-time Lyapunov exponents; ``row`` is the one-line summary (max μ, fraction of time contracting,
    ∫μ dt, top exponents, max Re λ)."""

    contraction: ContractionReport
    lyapunov: Lyapunov | None
    row: dict


def report(field, traj, metric=None, *, k: int = 3, method: str = "auto", eigenvalues: bool = True,
           moving: bool | None = None, tol: float = 1e-10, **solver) -> StabilityReport:
    """A stability report for a run: :func:`analyze` along ``traj`` and :func:`lyapunov` (``k`` exponents, k = 0
    skips them) from its first state over its output times. ``field=None`` uses ``traj.field``."""
    field = _field_of(field, traj, "report")
    contraction = analyze(field, traj, metric, method=method, eigenvalues=eigenvalues, moving=moving, tol=tol)
    exponents = None
    if k:
        exponents = lyapunov(field, traj.theta[0], traj.t, k=min(k, traj.theta.shape[-1]), progress=False, **solver)
    row = {
        "metric": contraction.metric,
        "max_mu": float(contraction.mu.max()),
        "fraction_contracting": contraction.fraction_contracting(),
        "integral_mu": float(contraction.integral[-1]),
        "max_real_eig": float(np.nanmax(contraction.max_real_eig.numpy())) if eigenvalues else None,
        "lyapunov": [float(e) for e in exponents.exponents] if exponents is not None else [],
    }
    return StabilityReport(contraction, exponents, row)


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


def _composition_blocks(blocks, field) -> list[tuple[str, slice]]:
    """(name, slice) pairs from ``blocks``: pairs, :class:`flows.problem.Block` objects, a metric or anything else
    with ``.blocks`` (a :class:`flows.metrics.Layerwise`: the blocks of its module graph), or a module graph
    (``flows.modules.read(model)``: one block per parameter-owning node, placed in θ by the field's problem).
    Default: the blocks of the field's metric when it has them, else the field's problem's blocks."""
    problem = getattr(field, "problem", None)
    if blocks is None:
        metric = getattr(field, "metric", None)
        blocks = getattr(metric, "blocks", None) or getattr(problem, "blocks", None)
        if blocks is None:
            raise ValueError("compose needs blocks: pass (name, slice) pairs, problem.blocks or a module graph")
    elif not isinstance(blocks, (list, tuple)) and hasattr(blocks, "blocks"):
        blocks = blocks.blocks
    if not isinstance(blocks, (list, tuple)) and hasattr(blocks, "nodes"):  # a module graph
        if problem is None:
            raise ValueError("a module graph places its blocks in θ through the field's problem: pass a field, "
                             "or (name, slice) pairs with a Jacobian")
        where = {}
        for block in problem.blocks:
            offset = block.start
            for name, shape in zip(block.param_names, block.shapes):
                where[name] = (offset, offset + shape.numel())
                offset += shape.numel()
        pairs, owner = [], {}
        for node in blocks.nodes:
            names = tuple(getattr(node, "param_names", ()) or ())
            if not names:
                continue
            for name in names:
                if name in owner:
                    raise ValueError(f"parameter {name!r} is used by nodes {owner[name]!r} and {node.name!r} of the "
                                     "module graph; give compose explicit blocks")
                owner[name] = node.name
            spans = [where[n] for n in names]
            if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
                raise ValueError(f"the parameters of node {node.name!r} are not contiguous in θ; give explicit blocks")
            pairs.append((getattr(node, "module", None) or node.name, slice(spans[0][0], spans[-1][1])))
        return sorted(pairs, key=lambda pair: pair[1].start)
    out = []
    for b in blocks:
        if hasattr(b, "slice") and hasattr(b, "name"):
            out.append((b.name, b.slice))
        else:
            out.append((b[0], b[1]))
    return out


def compose(field_or_jacobian, theta: torch.Tensor | None = None, blocks=None, metrics=None, *, t: float = 0.0,
            tol: float = 1e-12) -> Composition:
    """The composite contraction bound of block-partitioned dynamics (MATH.md §5, composition).

    With the blocks i of a module graph and J = ∂f/∂θ at (t, θ), the block gain matrix is

        Γ_ii = λ_max(sym(Θ_i J_ii Θ_i⁻¹)),     Γ_ij = ‖Θ_i J_ij Θ_j⁻¹‖₂   (i ≠ j),     M_i = Θ_iᵀΘ_i

    where J_ij = ∂f_i/∂θ_j is the actual coupling Jacobian of block i's motion to block j's parameters (through the
    skip connections, branches and consumers of the graph: nothing is assumed to vanish). Then
    μ(J) ≤ λ_max(sym Γ) in the block-weighted norm ‖δθ‖² = Σ_i ‖δθ_i‖²_{M_i}; Γ Hurwitz certifies contraction in a
    weighted norm; a cascade (J_ij = 0 for i < j) of contracting blocks is contracting.
    Cost: one dense Jacobian (N vector–Jacobian products of the field) and k² block norms.

    Args:
        field_or_jacobian: a field (its dense Jacobian is taken at (t, θ)) or a dense Jacobian.
        blocks: the partition — default: the blocks of the field's metric (a :class:`flows.metrics.Layerwise` has
            one per node of its module graph), else the field's problem's blocks; or a module graph
            (``flows.modules.read(model)``), a metric, ``problem.blocks`` or (name, slice) pairs.
        metrics: per block a constant SPD matrix M_i (default identity), or ``"field"``: the diagonal blocks of the
            field's own metric G(θ), so that the certificate is stated in the metric the flow moves in.

    Example: ``compose(GradientFlow(problem, Layerwise(problem)), θ, metrics="field")`` for a residual network
    gives Γ over the same module blocks the layerwise metric inverts.
    """
    if callable(field_or_jacobian):
        J = jacobian(field_or_jacobian, theta, t, dense=True)
    else:
        J = torch.as_tensor(field_or_jacobian, dtype=torch.float64)
    pairs = _composition_blocks(blocks, field_or_jacobian if callable(field_or_jacobian) else None)
    if isinstance(metrics, str):
        metric = getattr(field_or_jacobian, "metric", None)
        if metrics != "field" or metric is None or theta is None:
            raise ValueError(f"metrics must be a list of SPD matrices, or 'field' with a field that has a metric and "
                             f"θ; got {metrics!r}")
        dense = metric.matrix(theta.detach()).to(J.dtype)
        metrics = [dense[sl, sl] for _, sl in pairs]
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


# --------------------------------------------------------------------------------------------------------
# Stability of discrete training: sharpness against 2/η
# --------------------------------------------------------------------------------------------------------


@dataclass
class Sharpness:
    """Curvature along a run against the step size (MATH.md §6; Cohen et al. 2021).

    ``sharpness`` (T,) is λ_max(H) — or λ_max(G⁻¹H), the largest eigenvalue of the pencil Hv = λGv, under a
    metric — at the times ``t``; ``lambda_min`` (T,) the smallest one (computed when ``lr`` is known). With a
    step size η: ``threshold`` = 2/η, and ``radius`` (T,) the spectral radius of the discrete map's Jacobian
    I − ηG⁻¹H, max(|1 − ηλ_min|, |1 − ηλ_max|) (its eigenvalues are 1 − ηλ_i, all real since G⁻¹H is similar to the
    symmetric G^{-1/2}HG^{-1/2}). Gradient descent on a quadratic is stable iff radius < 1, i.e. iff
    0 < ηλ_i < 2 for every i; away from a minimum λ_min < 0 makes the radius exceed 1 along escape directions
    however small η is, so ``sharpness`` against ``threshold`` is the edge-of-stability reading.
    """

    t: torch.Tensor
    sharpness: torch.Tensor
    lambda_min: torch.Tensor | None
    lr: float | None
    threshold: float | None
    radius: torch.Tensor | None
    metric: str
    method: str

    @property
    def ratio(self) -> torch.Tensor | None:
        """η·λ_max / 2: above 1 the top direction of the map is unstable (None without a step size)."""
        return None if self.lr is None else self.sharpness * self.lr / 2


def _states_of(problem, traj_or_theta):
    """(problem, times (T,), states (T, N)) from a Trajectory, a state (N,) or a stack of states (T, N)."""
    from flows.trajectory import Trajectory

    if isinstance(traj_or_theta, Trajectory):
        problem = traj_or_theta.problem if problem is None else problem
        if traj_or_theta.theta.ndim != 2:
            raise ValueError("sharpness takes a single trajectory; use traj.member(i) for an ensemble")
        observe = getattr(traj_or_theta.field, "theta_of", None)
        states = traj_or_theta.theta if observe is None else observe(traj_or_theta.theta)
        times = traj_or_theta.t
    elif isinstance(traj_or_theta, torch.Tensor):
        states = traj_or_theta[None] if traj_or_theta.ndim == 1 else traj_or_theta
        if states.ndim != 2:
            raise ValueError(f"θ must have shape (N,) or (T, N), got {tuple(traj_or_theta.shape)}")
        times = torch.arange(len(states), dtype=torch.float64)
    else:
        raise TypeError(f"sharpness needs a flows.Trajectory or a tensor of states, got {type(traj_or_theta).__name__}")
    if problem is None:
        raise ValueError("sharpness needs the problem: pass problem= (this trajectory carries none)")
    if states.shape[-1] != problem.num_params:
        raise ValueError(f"the states have length {states.shape[-1]} but the problem has {problem.num_params} "
                         "parameters")
    return problem, times, states


def _hessian_product(problem, theta: torch.Tensor):
    """v ↦ ∇²L(θ)v by double backward: the gradient's graph is built once (create_graph) and every product is one
    backward pass through it (about 2.5× faster here than forward-over-reverse, which redoes the gradient each time)."""
    with torch.enable_grad():
        th = theta.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(problem.loss(th), th, create_graph=True)
    if not g.requires_grad:  # a loss linear in θ: H = 0
        return None

    def product(v):
        with torch.enable_grad():
            return torch.autograd.grad(g, th, v, retain_graph=True)[0].detach()

    return product


def _pencil_extremes(problem, theta, metric, method: str, tol: float, both: bool) -> tuple[float, float | None]:
    """(λ_max, λ_min or None) of H(θ), or of the pencil (H, G(θ)) under a metric."""
    n = theta.numel()
    th = theta.detach()
    if method == "dense":
        hessian = torch.func.hessian(problem.loss)(th)
        hessian = 0.5 * (hessian + hessian.T)
        if metric is None:
            values = torch.linalg.eigvalsh(hessian)
        else:
            low = torch.linalg.cholesky(0.5 * (metric.matrix(th) + metric.matrix(th).T))
            half = torch.linalg.solve_triangular(low, hessian, upper=False)
            whole = torch.linalg.solve_triangular(low, half.T, upper=False)
            values = torch.linalg.eigvalsh(0.5 * (whole + whole.T))
        return float(values[-1]), float(values[0]) if both else None

    product = _hessian_product(problem, th)
    if product is None:  # H = 0 (a loss linear in θ): every eigenvalue is 0, and ARPACK cannot start from H·v = 0
        return 0.0, 0.0 if both else None
    dtype, device = th.dtype, th.device
    op = _as_numpy_op(n, product, dtype, device)
    extra = {}
    if metric is not None:
        extra = {"M": _as_numpy_op(n, lambda v: metric.apply(th, v), dtype, device),
                 "Minv": _as_numpy_op(n, lambda v: metric.solve(th, v), dtype, device)}
    # a fixed start vector makes the Lanczos run (and so the last digits of its result) reproducible
    v0 = np.random.default_rng(0).standard_normal(n)
    if both:  # one Lanczos run for both ends of the spectrum
        values = eigsh(op, k=2, which="BE", tol=tol, v0=v0, return_eigenvectors=False, **extra)
        return float(values.max()), float(values.min())
    return float(eigsh(op, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False, **extra)[0]), None


def sharpness(problem, traj_or_theta, *, metric=None, lr: float | None = None, method: str = "lanczos",
              tol: float = 1e-10, smallest: bool | None = None, every: int = 1, progress: bool = False) -> Sharpness:
    """The sharpness λ_max(∇²L) — or λ_max(G⁻¹∇²L) under ``metric`` — along a run, against 2/η (MATH.md §6).

    Args:
        problem: the :class:`flows.Problem` (None: the trajectory's own).
        traj_or_theta: a single :class:`flows.Trajectory` (from :func:`flows.iterate` or :func:`flows.simulate`),
            one state θ (N,) or a stack (T, N) (times 0, 1, …).
        metric: a flows metric G: the generalised symmetric eigenproblem Hv = λGv, whose eigenvalues are those of
            G⁻¹H; the stability threshold of θ ← θ − ηG⁻¹∇L (Euclidean when None).
        lr: the step size η for 2/η and the spectral radius of I − ηG⁻¹H; default the trajectory's ``metadata["lr"]``
            (set by :func:`flows.iterate`).
        method: "lanczos" (scipy's ARPACK ``eigsh`` on a LinearOperator of Hessian–vector products, by double
            backward through the gradient's graph built once per state, with ``M`` = G and ``Minv`` = G⁻¹ applied by
            the metric: O(N) vectors plus one autograd graph, no N × N matrix), or "dense" (``torch.func.hessian``
            and a dense eigen-solve, small N).
            Lanczos needs N ≥ 3 (ARPACK's k < N); smaller problems are solved densely.
        tol: ARPACK's relative tolerance on the eigenvalues.
        smallest: also compute λ_min (needed for the radius; one Lanczos run for both ends, ``which="BE"``);
            default: when a step size is known.
        every: evaluate at every ``every``-th state only (the last is always included).

    Cost per state: one gradient with its graph kept, then one Lanczos run of typically 20–60 Hessian–vector
    products (each one backward pass through that graph), plus as many metric products and solves under a metric.
    """
    from tqdm.auto import tqdm

    from flows.trajectory import Trajectory

    if method not in ("lanczos", "dense"):
        raise ValueError(f"unknown method {method!r}; choose 'lanczos' or 'dense'")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    _is_moving(metric, False)  # checks that a metric has apply and solve
    if lr is None and isinstance(traj_or_theta, Trajectory):
        lr = traj_or_theta.metadata.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr)
                           or lr <= 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    problem, times, states = _states_of(problem, traj_or_theta)
    picked = list(range(0, len(states), every))
    if picked[-1] != len(states) - 1:
        picked.append(len(states) - 1)
    both = lr is not None if smallest is None else bool(smallest)
    run = "dense" if method == "dense" or problem.num_params < 3 else "lanczos"
    tops, bottoms = [], []
    for i in tqdm(picked, disable=None if progress else True, desc="sharpness", leave=False):
        top, bottom = _pencil_extremes(problem, states[i], metric, run, tol, both)
        tops.append(top)
        bottoms.append(bottom)
    top = torch.tensor(tops, dtype=torch.float64)
    bottom = torch.tensor(bottoms, dtype=torch.float64) if both else None
    radius = None
    if lr is not None and bottom is not None:
        radius = torch.maximum((1 - lr * bottom).abs(), (1 - lr * top).abs())
    name = "Euclidean" if metric is None else (metric.describe().get("name") if hasattr(metric, "describe")
                                               else type(metric).__name__)
    return Sharpness(times[picked].to(torch.float64).cpu(), top, bottom, None if lr is None else float(lr),
                     None if lr is None else 2.0 / float(lr), radius, name, run)
