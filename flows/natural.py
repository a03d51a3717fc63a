"""Every effective learning rule is natural gradient descent (Shoji, Suzuki & Kozachkov 2024; MATH.md §4).

A rule θ̇ = v is effective where it decreases the loss: yᵀv > 0 with y = −∇L. Then SPD metrics M with Mv = y
exist, so v = −M⁻¹∇L. Their canonical form is

    M = y yᵀ/(yᵀv) + Σ_{i=1}^{N−1} u_i u_iᵀ,      u_i linearly independent, u_i ⊥ v,

the one-parameter family M(λ) = y yᵀ/(yᵀv) + λ(I − v̂v̂ᵀ), and the member of smallest condition number, at
λ* = ‖y‖²/(yᵀv),

    M_opt = (‖y‖²/(yᵀv)) (I + ŷŷᵀ − v̂v̂ᵀ),     κ(M_opt) = (1 + sin ψ)/(1 − sin ψ) = tan²(π/4 + ψ/2),

with ψ the angle between v and y. M_opt is a scaled identity plus a rank-2 term, so it is applied and inverted
in O(N) time and memory. Angles are in radians throughout the API (messages also give degrees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from flows.errors import NotEffectiveError
from flows.metrics._base import Metric


def angle(update: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """ψ = arccos(yᵀv/(‖y‖‖v‖)) between the update v and y = −∇L, in radians, over the last dimension.

    Undefined where v = 0 or ∇L = 0 (at a critical point, or for a rule at rest): that raises a ValueError naming
    which vector vanished rather than returning NaN.
    """
    update, grad = torch.as_tensor(update), torch.as_tensor(grad)
    if update.shape != grad.shape:
        raise ValueError(f"update and grad must have the same shape, got {tuple(update.shape)} and "
                         f"{tuple(grad.shape)}")
    y = -grad
    norm_v = torch.linalg.vector_norm(update, dim=-1)
    norm_y = torch.linalg.vector_norm(y, dim=-1)
    for name, norm in (("update", norm_v), ("grad", norm_y)):
        if bool((norm == 0).any()):
            raise ValueError(f"the angle is undefined: {name} is the zero vector"
                             + (f" (at {int((norm == 0).sum())} of {norm.numel()} rows)" if norm.ndim else ""))
    cos = (y * update).sum(-1) / (norm_y * norm_v)
    return torch.arccos(cos.clamp(-1.0, 1.0))


def kappa_min(psi, *, degrees: bool = False) -> torch.Tensor | float:
    """The smallest condition number of a metric that turns an update at angle ψ into natural gradient descent:
    κ_min = (1 + sin ψ)/(1 − sin ψ) (MATH.md §4). ψ in radians, or in degrees with ``degrees=True``; ψ = 90°
    gives +inf (no metric: the update is orthogonal to −∇L). ψ must lie in [0, π/2] (0°…90°).
    """
    limit = 90.0 if degrees else math.pi / 2
    values = psi if torch.is_tensor(psi) else torch.as_tensor(float(psi), dtype=torch.float64)
    if bool(((values < 0) | (values > limit * (1 + 1e-12))).any()) or bool(torch.isnan(values).any()):
        unit = "degrees" if degrees else "radians"
        shown = float(values) if values.ndim == 0 else f"values in [{float(values.min()):g}, {float(values.max()):g}]"
        looks_like_degrees = not degrees and 0 <= float(values.min()) and float(values.max()) <= 90
        hint = " (an angle in degrees? pass degrees=True)" if looks_like_degrees else ""
        raise ValueError(f"psi must lie in [0, {limit:g}] {unit}, got {shown}{hint}")
    radians = torch.deg2rad(values) if degrees else values
    sin = torch.sin(radians)
    # ψ at (or within round-off of) π/2: the limit is +inf, not a division by zero
    kappa = torch.where(sin >= 1 - 1e-15, torch.full_like(sin, math.inf), (1 + sin) / (1 - sin).clamp_min(1e-300))
    return kappa if torch.is_tensor(psi) else float(kappa)


def _check_effective(update, grad, t=None):
    y = -grad
    inner = float((y * update).sum())
    if not inner > 0:
        when = "" if t is None else f" at t={t:.6g}"
        if not (bool(update.any()) and bool(grad.any())):
            which = "the update" if not bool(update.any()) else "∇L"
            raise NotEffectiveError(f"the update does not decrease the loss{when}: {which} is zero, so yᵀv = 0 and "
                                    "no metric makes it natural gradient descent", t=t, angle=None)
        psi = float(angle(update, grad))
        raise NotEffectiveError(
            f"the update does not decrease the loss{when}: yᵀv = {inner:.3g} ≤ 0 (angle to −∇L "
            f"{math.degrees(psi):.2f}° ≥ 90°), so no metric makes it natural gradient descent",
            t=t, angle=math.degrees(psi))
    return y, inner


class LowRankMetric(Metric):
    """M = s·I + U S Uᵀ with U of shape (N, k), k ≪ N (here k ≤ 2), S symmetric (k × k).

    ``apply`` costs O(Nk); ``solve`` uses the Woodbury identity M⁻¹ = (1/s)[I − U(sS⁻¹ + UᵀU)⁻¹Uᵀ], O(Nk + k³);
    ``eigenvalues`` come from a k × k problem in span(U) plus s with multiplicity N − k. No N × N matrix is formed
    unless ``matrix`` is called. The metric is constant in θ (``theta`` arguments are ignored).
    """

    depends_on_theta = False

    def __init__(self, scale: float | torch.Tensor, U: torch.Tensor, S: torch.Tensor):
        self.scale = scale
        self.U = U
        self.S = S

    def apply(self, theta, v):
        return self.scale * v + ((v @ self.U) @ self.S) @ self.U.T

    def solve(self, theta, v):
        inner = self.scale * torch.linalg.inv(self.S) + self.U.T @ self.U
        coeff = torch.linalg.solve(inner, (v @ self.U)[..., None])[..., 0]
        return (v - coeff @ self.U.T) / self.scale

    def matrix(self, theta=None):
        n = self.U.shape[0]
        return self.scale * torch.eye(n, dtype=self.U.dtype, device=self.U.device) + self.U @ self.S @ self.U.T

    def span_eigenvalues(self) -> torch.Tensor:
        """The k eigenvalues on span(U) (the other N − k all equal the scale). Cost O(Nk²)."""
        _, r = torch.linalg.qr(self.U)
        k = r.shape[0]
        return torch.linalg.eigvalsh(self.scale * torch.eye(k, dtype=r.dtype, device=r.device) + r @ self.S @ r.T)

    def eigenvalues(self) -> torch.Tensor:
        """All N eigenvalues, ascending (N − k of them equal to the scale). Memory O(N)."""
        span = self.span_eigenvalues()
        rest = torch.full((self.U.shape[0] - span.numel(),), float(self.scale), dtype=span.dtype, device=span.device)
        return torch.sort(torch.cat([span, rest])).values

    def condition(self) -> float:
        """λ_max/λ_min, from the k span eigenvalues and the scale. Cost O(Nk²), no N-vector of eigenvalues."""
        span = self.span_eigenvalues()
        values = torch.cat([span, span.new_tensor([float(self.scale)])]) if self.U.shape[0] > span.numel() else span
        return float(values.max() / values.min())

    def describe(self):
        return {"name": "LowRankMetric", "scale": float(self.scale), "rank": int(self.U.shape[1])}


def metric_family(update: torch.Tensor, grad: torch.Tensor, lam: float) -> LowRankMetric:
    """M(λ) = y yᵀ/(yᵀv) + λ(I − v̂v̂ᵀ): SPD for every λ > 0 and M(λ)v = y."""
    y, inner = _check_effective(update, grad)
    if not lam > 0:
        raise ValueError(f"lam must be positive, got {lam}")
    v_hat = update / torch.linalg.vector_norm(update)
    U = torch.stack([y, v_hat], dim=1)
    S = torch.diag(torch.tensor([1.0 / inner, -lam], dtype=y.dtype, device=y.device))
    return LowRankMetric(float(lam), U, S)


def min_condition_metric(update: torch.Tensor, grad: torch.Tensor) -> LowRankMetric:
    """M_opt = (‖y‖²/(yᵀv))(I + ŷŷᵀ − v̂v̂ᵀ), the admissible metric of least condition number. O(N).

    Raises NotEffectiveError when yᵀv ≤ 0 (ψ ≥ 90°).
    """
    y, inner = _check_effective(update, grad)
    return metric_family(update, grad, float((y * y).sum()) / inner)


def canonical_metric(update: torch.Tensor, grad: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """The dense canonical metric y yᵀ/(yᵀv) + Σ u_i u_iᵀ (small N).

    ``basis``: N − 1 rows u_i orthogonal to v (default: an orthonormal basis of v⊥). Rows not orthogonal to v
    raise ValueError, since Mv = y needs u_i ⊥ v.
    """
    y, inner = _check_effective(update, grad)
    n = update.numel()
    v_hat = update / torch.linalg.vector_norm(update)
    if basis is None:
        q = torch.linalg.qr(torch.cat([v_hat[:, None], torch.eye(n, dtype=y.dtype)[:, : n - 1]], dim=1))[0]
        basis = q[:, 1:].T
    basis = torch.as_tensor(basis, dtype=y.dtype)
    if basis.shape != (n - 1, n):
        raise ValueError(f"basis must hold N − 1 = {n - 1} rows of length {n}, got shape {tuple(basis.shape)}")
    leak = float((basis @ v_hat).abs().max())
    if leak > 1e-10 * float(basis.abs().max()):
        raise ValueError(f"basis rows must be orthogonal to the update; largest |u_i·v̂| = {leak:.3g}")
    return torch.outer(y, y) / inner + basis.T @ basis


@dataclass
class Recovery:
    """Along a trajectory: the angle ψ(t) (radians), κ_min(t), and the residual ‖v + M_opt⁻¹∇L‖/‖v‖ that checks
    the recovered metric reproduces the rule."""

    t: torch.Tensor
    psi: torch.Tensor
    kappa: torch.Tensor
    residual: torch.Tensor


def recover(field, problem, traj, *, window: float | None = None, grad=None, steps: int = 32,
            strict: bool = True) -> Recovery:
    """Recover M_opt at every output time of ``traj`` for the rule ``field``: one field evaluation and one
    gradient per time. Raises NotEffectiveError (with the time and the angle) where the rule is not effective.

    Args:
        window: use the windowed loss L_T of :func:`windowed_loss` (for rules that improve only over a window T).
        grad: a callable (t, θ) → ∇L(θ, t) for time-dependent losses (the metric is then built pointwise in t).
        steps: RK4 steps of the windowed loss's inner integration.
        strict: raise NotEffectiveError where ψ ≥ 90°; with False, report ψ there and NaN for κ_min and the
            residual (no metric exists).
    """
    if window is not None:
        if grad is not None:
            raise ValueError("give either window= (the windowed loss's gradient) or grad=, not both")
        windowed = windowed_loss(field, problem, window, steps)

        def grad(t, theta):
            return torch.func.grad(windowed)(theta)
    psis, kappas, residuals = [], [], []
    for ti, theta in zip(traj.t, traj.theta):
        v = field(ti, theta)
        g = problem.grad(theta) if grad is None else grad(ti, theta)
        if not (bool(v.any()) and bool(g.any())):  # at rest or at a critical point: ψ is undefined
            if strict:
                _check_effective(v, g, float(ti))
            nan = torch.full((), float("nan"), dtype=g.dtype)
            psis.append(nan)
            kappas.append(nan)
            residuals.append(nan)
            continue
        psi = angle(v, g)
        psis.append(psi)
        if not strict and not float((-g * v).sum()) > 0:
            kappas.append(torch.full_like(psi, float("nan")))
            residuals.append(torch.full_like(psi, float("nan")))
            continue
        _check_effective(v, g, float(ti))  # raises with the time and the angle
        metric = min_condition_metric(v, g)
        kappas.append(kappa_min(psi))
        residuals.append(torch.linalg.vector_norm(v + metric.solve(theta, g)) / torch.linalg.vector_norm(v))
    return Recovery(traj.t, torch.stack(psis), torch.stack(kappas), torch.stack(residuals))


def averaged_gradient(problem, theta: torch.Tensor, step: torch.Tensor, nodes: int = 4) -> torch.Tensor:
    """ḡ = ∫₀¹ ∇L(θ + sΔθ) ds by Gauss–Legendre with ``nodes`` points (exact for polynomial losses of degree
    ≤ 2·nodes), so that L(θ + Δθ) − L(θ) = ḡᵀΔθ."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    return sum(float(wj) / 2 * problem.grad(theta + float((xj + 1) / 2) * step) for xj, wj in zip(x, w))


def discrete_metric(problem, theta: torch.Tensor, step: torch.Tensor, nodes: int = 4) -> LowRankMetric:
    """The metric M_k with Δθ_k = −M_k⁻¹ḡ_k for a discrete update that lowers the loss (MATH.md §4)."""
    return min_condition_metric(step, averaged_gradient(problem, theta, step, nodes))


def windowed_loss(field, problem, window: float, steps: int = 32):
    """θ ↦ L_T(θ) = (1/T) ∫₀ᵀ L(φ_s(θ)) ds, φ the flow of the (autonomous) rule, by ``steps`` classical RK4
    steps and Simpson's rule on the loss samples; differentiable in θ (torch.func / autograd).

    Along the rule, dL_T/dt = (L(φ_T(θ)) − L(θ))/T: negative wherever the rule improves the loss over the window,
    even where it raises it momentarily, so the rule is natural gradient descent on L_T. Cost: 4·steps field
    evaluations and steps + 1 losses per call.
    """
    if steps % 2:
        steps += 1  # Simpson's rule needs an even number of intervals
    h = float(window) / steps

    def value(theta):
        t = torch.zeros((), dtype=theta.dtype)
        losses = [problem.loss(theta)]
        x = theta
        for _ in range(steps):
            k1 = field(t, x)
            k2 = field(t + h / 2, x + h / 2 * k1)
            k3 = field(t + h / 2, x + h / 2 * k2)
            k4 = field(t + h, x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            t = t + h
            losses.append(problem.loss(x))
        weights = torch.ones(steps + 1, dtype=theta.dtype)
        weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
        return (weights * torch.stack(losses)).sum() * h / 3 / window

    return value


class MeanField:
    """The drift of a stochastic rule: f̄(t, θ) = (1/K) Σ_k f_k(t, θ) over K draws (minibatches, noise seeds).

    Its effectiveness and metric are those of the mean update (MATH.md §4, stochastic rules).
    """

    def __init__(self, fields, problem=None):
        self.fields = list(fields)
        if not self.fields:
            raise ValueError("MeanField needs at least one field")
        self.problem = problem if problem is not None else getattr(self.fields[0], "problem", None)

    def __call__(self, t, theta):
        return sum(f(t, theta) for f in self.fields) / len(self.fields)

    def describe(self) -> dict:
        return {"name": "MeanField", "draws": len(self.fields)}
