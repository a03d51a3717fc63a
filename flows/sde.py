"""``simulate_sde``: minibatch SGD as a stochastic differential equation, integrated with torchsde.

The stochastic modified equation of SGD with learning rate η and batch size b (Li, Tai & E 2017, 2019; MATH.md §6)

    dθ = −G⁻¹∇L dt + √(η/b) G⁻¹ D dW,      D = [g_1 − ḡ, …, g_n − ḡ]/√n,   Σ = DDᵀ,

has the per-sample gradient covariance Σ(θ) as its diffusion, W an n-dimensional Brownian motion. No square root
of Σ and no N × N matrix is ever formed: the solver only needs the product D·dW, and

    D v = (1/√n) Σ_i v_i (g_i − ḡ) = (1/√n) ∇_θ Σ_i (v_i − v̄) ℓ_i(θ),

a single backward pass with the weights v_i − v̄ on the per-sample losses — the pass that gives ∇L with the
weights 1/n. An Euler–Maruyama step needs only −h∇L + √(η/b)·D ΔW, one backward pass with the weights
−h/n + √(η/b)(v_i − v̄)/√n: the step of the SDE costs what one full-batch gradient costs (per path), memory
O(data · activations), never O(n · N) (benchmarks/stochastic.py). Other drifts take ∇L and D v from one pass with two
cotangents, or the drift from its own field. :meth:`MinibatchNoise.factor` forms D explicitly from
:meth:`flows.Problem.sample_grads` for small problems and tests.

Time is the continuous time of the flow: SGD's step k sits at t = kη, so ``dt=lr`` is one SDE step per SGD step.
An ensemble of P paths runs in one torchsde solve (torchsde's batch dimension), evaluated together
(:meth:`flows.Problem.weighted_gradients`: a structured sweep shared by the paths for a chain of Linear layers and
activations, :func:`torch.func.vmap` over paths for any other model). The Brownian motion is seeded, so a run is
reproducible: for fixed-step Euler–Maruyama its increments are drawn in sequence (:class:`SequentialBrownian`, less
than half the cost of an interval-tree query), for every other method it is a :class:`torchsde.BrownianInterval`.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
import torchsde
from tqdm.auto import tqdm

from flows.errors import FlowDivergedError
from flows.events import as_event
from flows.metrics import Euclidean, Metric
from flows.problem import Problem
from flows.rules import GradientFlow
from flows.simulate import record_measurements
from flows.trajectory import Trajectory, describe, versions

#: torchsde methods by the SDE's noise type. With state-dependent ("general") noise Itô and Stratonovich differ and
#: torchsde's only Itô method for general noise is Euler–Maruyama; with additive noise the two calculi coincide, so
#: every torchsde method applies (the SDE is declared Itô or Stratonovich to suit the method).
ITO_METHODS = {"general": ("euler",), "additive": ("euler", "milstein", "srk")}
STRATONOVICH_METHODS = {"general": (), "additive": ("euler_heun", "heun", "log_ode", "midpoint", "reversible_heun")}
_LEVY_AREA = {"srk": "space-time", "log_ode": "foster"}


def methods(noise_type: str = "general") -> list[str]:
    """The torchsde methods simulate_sde accepts for a noise type (``"general"`` or ``"additive"``)."""
    return sorted(ITO_METHODS[noise_type] + STRATONOVICH_METHODS[noise_type])


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _count(value, name: str, low: int = 1, high: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}{what}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


class MinibatchNoise:
    """Σ(θ) = DDᵀ, the covariance of the per-sample gradients, as the factor D (N × n) applied matrix-free.

        D v = (1/√n) ∇_θ Σ_i (v_i − v̄) ℓ_i(θ) = (1/√n) J_yᵀ[(v_i − v̄) ∂ℓ_i/∂y_i]_i
                                               (one backward pass from the outputs; ∇L from the same pass)

    Args:
        problem: a :class:`flows.Problem` whose loss is the mean of per-sample losses
            (:meth:`flows.Problem.check_sample_losses`; a ValueError otherwise).
        subsample: estimate Σ on a fixed random subset S of m training samples (drawn once with ``seed``), so
            the Brownian motion has m channels instead of n: D_S = c [g_i − ḡ_S]_{i∈S} with
            c² = (n − 1)/(n (m − 1)), which makes E[D_S D_Sᵀ] = Σ over the draw of S (m = n gives D exactly). The
            drift stays the full-batch ∇L.
        seed: the seed of the subset.

    Cost per evaluation: one forward and one backward pass over the training data per path (two cotangents when ∇L
    and D v are wanted apart).
    Reference: Li, Tai & E, "Stochastic modified equations and dynamics of stochastic gradient algorithms" (JMLR 2019).
    """

    noise_type = "general"

    def __init__(self, problem: Problem, *, subsample: int | None = None, seed: int = 0):
        if not isinstance(problem, Problem):
            raise TypeError(f"MinibatchNoise needs a flows.Problem, got {type(problem).__name__}")
        problem.check_sample_losses()
        self.problem = problem
        n = problem.batch_size
        self.seed = seed
        if subsample is None:
            self.indices = None
            self.channels = n
            self._c = 1.0 / math.sqrt(n)
        else:
            m = _count(subsample, "subsample", 2, n, f" (the training data has {n} samples)")
            gen = torch.Generator().manual_seed(int(seed))
            self.indices = torch.randperm(n, generator=gen)[:m].sort().values.to(problem.device)
            self.channels = m
            self._c = math.sqrt((n - 1) / (n * (m - 1)))
        self.subsample = subsample

    # -- explicit factor (small problems, tests) ------------------------------------------------------------------
    def factor(self, theta: torch.Tensor) -> torch.Tensor:
        """D(θ)ᵀ, shape (m, N): row i is c (g_i − ḡ) from :meth:`flows.Problem.sample_grads` (memory m·N)."""
        g = self.problem.sample_grads(theta, self.indices)
        return self._c * (g - g.mean(0))

    def covariance(self, theta: torch.Tensor) -> torch.Tensor:
        """Σ(θ) = DDᵀ, dense N × N (small N only)."""
        f = self.factor(theta)
        return f.T @ f

    # -- the solver's product ----------------------------------------------------------------------------------
    def _noise_weights(self, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Per-sample weights of D v for increments v (P, m): scale·c (v_i − v̄) on the samples of S, zero elsewhere."""
        w = (v - v.mean(-1, keepdim=True)) * (scale * self._c)
        if self.indices is None:
            return w
        return torch.zeros(*v.shape[:-1], self.problem.batch_size, dtype=v.dtype, device=v.device
                           ).index_copy(-1, self.indices, w)

    def gradient_and_product(self, theta: torch.Tensor, v: torch.Tensor, need_gradient: bool = True):
        """(∇L(θ), D(θ) v) for paths θ (P, N) and Brownian increments v (P, m), from one forward and two backward
        passes per path (:meth:`flows.Problem.weighted_gradients` with the weights 1/n and c (v_i − v̄)).

        Returns ∇L as None when ``need_gradient`` is False (a drift that does not use it)."""
        noise = self._noise_weights(v, 1.0)
        if not need_gradient:
            return None, self.problem.weighted_gradients(theta, noise)
        both = torch.stack([torch.full_like(noise, 1.0 / self.problem.batch_size), noise], dim=-2)
        out = self.problem.weighted_gradients(theta, both)
        return out[..., 0, :], out[..., 1, :]

    def euler_increment(self, theta: torch.Tensor, v: torch.Tensor, dt: float, scale: float) -> torch.Tensor:
        """−dt ∇L(θ) + scale · D(θ) v, an Euler–Maruyama step before G⁻¹, from ONE forward and ONE backward pass
        per path: the weights −dt/n + scale·c (v_i − v̄) on the per-sample gradients
        (:meth:`flows.Problem.weighted_gradients`; a third cheaper than ∇L and Dv apart)."""
        return self.problem.weighted_gradients(theta, self._noise_weights(v, scale) - dt / self.problem.batch_size)

    def describe(self) -> dict:
        return {"name": "MinibatchNoise", "subsample": self.subsample, "seed": self.seed, "channels": self.channels}


class ConstantNoise:
    """A constant noise covariance Σ = RRᵀ (given as Σ, N × N symmetric positive semi-definite, or as a factor R,
    N × K): the SDE dθ = −G⁻¹∇L dt + √(η/b) G⁻¹R dW. On L = ½θᵀHθ with G = I it is an Ornstein–Uhlenbeck process
    whose stationary covariance solves HC + CH = (η/b)Σ. A covariance is factored once by its eigendecomposition
    (R = V Λ^{1/2}, so a singular Σ is fine)."""

    def __init__(self, cov=None, *, factor=None):
        if (cov is None) == (factor is None):
            raise ValueError("ConstantNoise takes exactly one of cov (Σ, N × N) or factor (R, N × K with Σ = RRᵀ)")
        if cov is not None:
            cov = torch.as_tensor(cov, dtype=torch.float64)
            if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
                raise ValueError(f"cov must be a square N × N matrix, got shape {tuple(cov.shape)}")
            if not bool(torch.isfinite(cov).all()):
                raise ValueError("cov contains non-finite values")
            if not torch.allclose(cov, cov.T, rtol=1e-10, atol=1e-12):
                raise ValueError("cov must be symmetric")
            lam, vec = torch.linalg.eigh(cov)
            if float(lam.min()) < -1e-10 * max(float(lam.abs().max()), 1e-300):
                raise ValueError(f"cov must be positive semi-definite; its smallest eigenvalue is "
                                 f"{float(lam.min()):.3g}")
            factor = vec * lam.clamp_min(0).sqrt()
        factor = torch.as_tensor(factor, dtype=torch.float64)
        if factor.ndim != 2:
            raise ValueError(f"factor must be an N × K matrix, got shape {tuple(factor.shape)}")
        if not bool(torch.isfinite(factor).all()):
            raise ValueError("factor contains non-finite values")
        self.R = factor
        self.channels = int(factor.shape[1])

    def covariance(self, theta=None) -> torch.Tensor:
        return self.R @ self.R.T

    def product(self, v: torch.Tensor) -> torch.Tensor:
        """R v for increments v (P, K)."""
        return v @ self.R.to(v).T

    def describe(self) -> dict:
        return {"name": "ConstantNoise", "N": int(self.R.shape[0]), "channels": self.channels}


class _NonFinite(Exception):
    def __init__(self, t: float, reason: str):
        super().__init__(reason)
        self.t, self.reason = t, reason


class _CountingBrownian(torchsde.BrownianInterval):
    """A BrownianInterval that counts the increments the solver draws (one per step of a fixed-step method) and
    tells the SDE when the solve proper has begun (torchsde probes the SDE once for shapes before)."""

    def __init__(self, *args, on_call=None, **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "_flows_count", 0)
        object.__setattr__(self, "_flows_on_call", on_call)

    def __call__(self, ta, tb=None, *args, **kwargs):
        if self._flows_on_call is not None:
            self._flows_on_call(ta, tb)
        object.__setattr__(self, "_flows_count", self._flows_count + 1)
        return super().__call__(ta, tb, *args, **kwargs)


class SequentialBrownian(torchsde.BaseBrownian):
    """A Brownian motion W (shape (P, m)) on [t0, t1] for fixed-step solvers, drawn increment by increment.

    A fixed-step method such as Euler–Maruyama asks for the increments over consecutive steps
    [t_0, t_1], [t_1, t_2], … in order. Increments over disjoint intervals are independent Gaussians, so

        W(t_{k+1}) − W(t_k) = √(t_{k+1} − t_k) · z_k,      z_k ~ N(0, I_{P·m}) i.i.d.,

    is exactly Brownian at the queried times, with no interval tree: z_k is the k-th draw of one
    ``torch.Generator`` seeded with ``seed``, so the same seed and the same steps give the same path.
    A query that does not start where the previous one ended (an adaptive solver's rejected step, a method asking
    for sub-intervals or Lévy areas) raises a ValueError: those need :class:`torchsde.BrownianInterval`'s
    Brownian bridge. Cost per increment: P·m normals — 0.5 ms for 16 × 1 797 on the benchmark machine against
    1.2 ms for the same query to a BrownianInterval (benchmarks/stochastic.py).

    Args:
        t0, t1: the time span.
        size: (P, m), paths × Brownian channels.
        dtype, device: of the increments.
        seed: the generator's seed.
        on_call: called as ``on_call(ta, tb)`` at every increment (simulate_sde counts steps with it).
    """

    def __init__(self, t0, t1, size, *, dtype=torch.float64, device=None, seed: int = 0, on_call=None):
        self._t0, self._t1 = float(t0), float(t1)
        if not self._t0 < self._t1:
            raise ValueError(f"SequentialBrownian needs t0 < t1, got t0={self._t0}, t1={self._t1}")
        self._shape = tuple(int(n) for n in size)
        self._dtype = dtype
        self._device = torch.device("cpu") if device is None else torch.device(device)
        self.seed = int(seed)
        self._generator = torch.Generator(device=self._device).manual_seed(self.seed)
        self._at = self._t0
        self._flows_count = 0
        self._flows_on_call = on_call

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if return_U or return_A:
            raise ValueError("SequentialBrownian draws increments only, no Lévy area; use a torchsde.BrownianInterval "
                             "with levy_area_approximation for this method")
        if tb is None:
            raise ValueError("SequentialBrownian answers increment queries bm(ta, tb) only")
        ta, tb = float(ta), float(tb)
        if ta != self._at or not ta < tb <= self._t1:
            raise ValueError(f"SequentialBrownian draws consecutive increments forward in time: the next one starts "
                             f"at t={self._at:.17g} and ends by t1={self._t1:.17g}, got [{ta:.17g}, {tb:.17g}] (an "
                             "adaptive or sub-stepping method needs a torchsde.BrownianInterval)")
        if self._flows_on_call is not None:
            self._flows_on_call(ta, tb)
        self._flows_count += 1
        self._at = tb
        z = torch.randn(self._shape, generator=self._generator, dtype=self._dtype, device=self._device)
        return z.mul_(math.sqrt(tb - ta))

    def __repr__(self):
        return (f"SequentialBrownian(t0={self._t0}, t1={self._t1}, size={self._shape}, dtype={self._dtype}, "
                f"seed={self.seed})")

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._device

    @property
    def shape(self):
        return torch.Size(self._shape)

    @property
    def levy_area_approximation(self):
        return "none"


class _SGDSDE:
    """The SDE object torchsde integrates: drift, diffusion products, counting, finiteness checks, progress."""

    def __init__(self, drift, fused, noise, scale, metric, sde_type, noise_type, t_out, pbar, paths, n):
        self.drift, self.fused, self.noise = drift, fused, noise
        self.scale, self.metric = scale, metric
        self.sde_type, self.noise_type = sde_type, noise_type
        self.pbar = pbar
        self.nfe = 0
        self.probing = False  # torchsde's shape probe before the first Brownian increment
        self.record: list[tuple[float, torch.Tensor]] = []
        self.last: tuple[float, torch.Tensor] | None = None
        self._t_out = [float(x) for x in t_out]
        self._next_out = 0
        self._t0 = self._t_out[0]
        self._bar_tick = (self._t_out[-1] - self._t0) / 200
        self._bar_next = self._t0
        self._minibatch = isinstance(noise, MinibatchNoise)
        self.euler_fused = False  # set by simulate_sde for Euler with the minibatch noise and the drift −G⁻¹∇L
        self._dt = None
        if self.noise_type == "additive":  # G⁻¹R is constant: the full diffusion matrix is cheap
            self.g = self._g_additive
            self.f = self._f
            self.g_prod = self._g_prod
            self.f_and_g = self._f_and_g

    def solve_started(self, ta, tb):
        """Called by the Brownian motion at every increment it draws: the solve proper runs, with step tb − ta."""
        self.probing = False
        self._dt = None if tb is None else float(tb) - float(ta)

    # -- bookkeeping --------------------------------------------------------------------------------------------
    def _keep(self, t: float, y: torch.Tensor) -> None:
        self.last = (t, y)
        out = self._t_out
        while self._next_out < len(out) and t >= out[self._next_out]:
            self.record.append((t, y))
            self._next_out += 1
        if self.pbar is not None and t >= self._bar_next:
            done = t - self._t0
            if done > self.pbar.n:
                self.pbar.update(done - self.pbar.n)
            self._bar_next = t + self._bar_tick

    def _check(self, t: float, value: torch.Tensor, what: str) -> None:
        if not math.isfinite(value.sum().item()) and not bool(torch.isfinite(value).all()):
            raise _NonFinite(t, f"the {what} became non-finite")

    # -- the pieces ---------------------------------------------------------------------------------------------
    def _solve(self, y, v):
        return v if self.metric is None else self.metric.solve(y, v)

    def _drift_and_noise(self, t, y, v):
        if self.probing:  # torchsde's shape check: the solve proper evaluates this state again
            return torch.zeros_like(y), torch.zeros_like(y)
        self.nfe += 1
        tf = float(t)
        if self.euler_fused and self._dt is not None:
            # Euler–Maruyama only needs y + f·dt + g·dW: both from one backward pass, returned as the noise term
            step = self._solve(y, self.noise.euler_increment(y, v, self._dt, self.scale))
            self._check(tf, step, "step (drift and diffusion)")
            self._keep(tf, y)
            return torch.zeros_like(y), step.detach()
        if self._minibatch:
            g, dv = self.noise.gradient_and_product(y, v, need_gradient=self.fused)
            drift = -self._solve(y, g) if self.fused else self.drift(t, y)
        else:
            dv = self.noise.product(v)
            drift = self.drift(t, y)
        self._check(tf, drift, "drift")
        noise = self.scale * self._solve(y, dv)
        self._check(tf, noise, "diffusion")
        self._keep(tf, y)
        return drift.detach(), noise.detach()

    def f_and_g_prod(self, t, y, v):
        return self._drift_and_noise(t, y, v)

    def _f(self, t, y):
        self.nfe += 1
        drift = self.drift(t, y)
        self._check(float(t), drift, "drift")
        self._keep(float(t), y)
        return drift.detach()

    def _g_additive(self, t, y):
        r = self.noise.R.to(y)
        m = self.scale * (r if self.metric is None else self.metric.solve(y[:1], r.T).T)
        return m.expand(y.shape[0], *m.shape)

    def _g_prod(self, t, y, v):
        return self.scale * self._solve(y, self.noise.product(v))

    def _f_and_g(self, t, y):
        return self._f(t, y), self._g_additive(t, y)


def _check_times(t, theta0):
    try:
        t = torch.as_tensor(t, dtype=theta0.dtype, device=theta0.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"t must be a 1-D sequence of output times, got {type(t).__name__}: {exc}") from None
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"t must be a 1-D tensor of at least 2 output times, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"t contains non-finite output times: {t.tolist()}")
    if not bool((t[1:] > t[:-1]).all()):
        raise ValueError(f"t must be strictly increasing (an SDE runs forward in time), got {t.tolist()}")
    return t


def _drift_of(field, metric):
    """(drift field, problem, metric, fused): the drift −G⁻¹∇L of a Problem, or the given field."""
    if isinstance(field, Problem):
        rule = GradientFlow(field, metric)
        return rule, field, rule.metric, True
    if not callable(field):
        raise TypeError(f"field must be a flows.Problem or a callable f(t, theta) with .problem, got "
                        f"{type(field).__name__}")
    problem = getattr(field, "problem", None)
    if not isinstance(problem, Problem):
        raise ValueError("simulate_sde needs the problem: pass a flows.Problem, or a field with a .problem "
                         "(e.g. flows.rules.GradientFlow)")
    if getattr(field, "state_length", None) is not None:
        raise ValueError(f"simulate_sde integrates rules on θ alone; {type(field).__name__} has a larger state")
    field_metric = getattr(field, "metric", None)
    if metric is not None and field_metric is not None and metric is not field_metric:
        raise ValueError("metric= was given with a field that has its own metric; pass one of them")
    metric = field_metric if metric is None else metric
    return field, problem, metric, type(field) is GradientFlow


def simulate_sde(
    field,
    theta0,
    t,
    *,
    lr: float,
    batch_size: int,
    paths: int = 1,
    metric: Metric | None = None,
    noise="minibatch",
    subsample: int | None = None,
    method: str = "euler",
    dt: float | None = None,
    adaptive: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-4,
    options: dict | None = None,
    seed: int = 0,
    bm=None,
    event=None,
    progress: bool = True,
    record: bool = True,
) -> Trajectory:
    """Integrate SGD's stochastic modified equation dθ = f(θ) dt + √(lr/b) G⁻¹ D dW for P paths in one torchsde solve.

    The drift f is −G⁻¹∇L (a Problem, with ``metric``) or any field with a ``.problem`` (its metric, if it has one,
    also shapes the noise); D is the minibatch-noise factor (:class:`MinibatchNoise`, Σ = DDᵀ the per-sample gradient
    covariance, on all training samples or a fixed ``subsample``) or a :class:`ConstantNoise`.

    Args:
        field: a :class:`flows.Problem` (drift −G⁻¹∇L), or a field f(t, θ) with ``.problem`` accepting (P, N) states
            (e.g. :class:`flows.rules.GradientFlow`).
        theta0: the initial state (N,), shared by all paths, or (P, N), one per path.
        t: output times, strictly increasing. t = kη is SGD's step k.
        lr, batch_size: η and b of the SGD run the SDE models (noise scale √(η/b)); 1 ≤ b ≤ n for the minibatch
            noise (b samples are drawn from n), b ≥ 1 for a constant one.
        paths: P, the number of sample paths (torchsde's batch dimension; one solve for all).
        metric: G for a Problem's drift and for the noise (default Euclidean).
        noise: ``"minibatch"`` (default), a :class:`MinibatchNoise` or :class:`ConstantNoise`, or a covariance Σ
            (an N × N tensor, for ConstantNoise(Σ)).
        subsample: for the minibatch noise, estimate Σ on a fixed subset of this many training samples (seeded).
        method, dt, adaptive, rtol, atol, options: torchsde's, passed to ``sdeint`` unchanged (dt defaults to lr:
            one step per SGD step). The valid methods depend on the noise: :func:`methods`. Between steps torchsde
            interpolates linearly, so choose dt dividing the output spacing.
        seed: seed of the Brownian motion (:class:`SequentialBrownian` for fixed-step Euler, a
            :class:`torchsde.BrownianInterval` otherwise) and of the subsample:
            same seed, same paths.
        bm: a torchsde Brownian motion of shape (P, channels) to use instead (e.g. with ``halfway_tree=True`` for one
            Brownian path shared across step sizes); ``seed`` is then unused.
        event: a stop condition g(t, θ) (e.g. :func:`flows.events.loss_below`); the solve advances output interval by
            output interval and stops at the first output time at which any component (any path) has changed sign
            — a rough path has no root to locate more finely.
        progress: a tqdm bar over solver time (silent when stderr is not a terminal).
        record: measure the loss, ‖∇L‖ and the eval sets at the output times for every path.

    Returns:
        a :class:`flows.Trajectory` with theta (T, P, N), loss and grad_norm (T, P); stats ``nfe`` (drift and
        diffusion evaluations), ``increments`` (Brownian
        increments drawn: the steps of a fixed-step method), ``wall_time``, ``stopped_by_event``; metadata with
        ``dynamics: "sde"``, lr, batch_size, paths, seed, method and the solver settings.

    Raises:
        FlowDivergedError: a path became non-finite; carries the trajectory (all paths) up to the last finite state.
        ValueError / TypeError: bad input, named (lr ≤ 0, b outside 1…n, paths ≤ 0, a method torchsde lacks for
            this noise, a problem without per-sample losses, …).

    Cost per step (Euler, drift −G⁻¹∇L, minibatch noise): one forward and one backward pass over the training data per
    path — the cost of a full-batch gradient — one metric solve per path, and a Brownian increment of P × n normals.
    Memory never holds an N × n matrix. The P paths are evaluated together (:meth:`flows.Problem.weighted_gradients`;
    on the digits MLP even its vmapped route is 1.3× faster than a loop over paths, benchmarks/stochastic.py).
    """
    lr = _positive(lr, "lr")
    drift, problem, metric, fused = _drift_of(field, metric)
    n_data = problem.batch_size
    minibatch = not isinstance(noise, ConstantNoise | torch.Tensor | list | tuple)  # b ≤ n only if b samples are drawn
    batch_size = _count(batch_size, "batch_size", 1, n_data if minibatch else None,
                        f" (the training data has {n_data} samples)")
    paths = _count(paths, "paths", 1)
    if metric is not None and not isinstance(metric, Metric):
        raise TypeError(f"metric must be a flows.metrics.Metric, got {type(metric).__name__}")
    if isinstance(metric, Euclidean) and metric.scale == 1.0:
        metric = None  # G = I: skip the solves
    if not isinstance(method, str):
        raise TypeError(f"method must be a torchsde method name, got {type(method).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__} {seed!r}")

    # noise model
    if isinstance(noise, str):
        if noise != "minibatch":
            raise ValueError(f"unknown noise {noise!r}; use 'minibatch', a MinibatchNoise, a ConstantNoise or an "
                             "N × N covariance")
        noise = MinibatchNoise(problem, subsample=subsample, seed=seed)
    elif isinstance(noise, MinibatchNoise | ConstantNoise):
        if subsample is not None:
            raise ValueError("subsample= applies to noise='minibatch'; a noise object carries its own")
    else:
        if subsample is not None:
            raise ValueError("subsample= applies to noise='minibatch', not to a constant covariance")
        noise = ConstantNoise(noise)
    if isinstance(noise, MinibatchNoise) and noise.problem is not problem:
        raise ValueError("the MinibatchNoise was built on a different problem than the drift's")
    n = problem.num_params
    if isinstance(noise, ConstantNoise) and noise.R.shape[0] != n:
        raise ValueError(f"the constant noise acts on vectors of length {noise.R.shape[0]}, the problem has {n} "
                         "parameters")
    noise_type = "additive" if isinstance(noise, ConstantNoise) and (metric is None or not metric.depends_on_theta) \
        else "general"
    valid = methods(noise_type)
    if method not in valid:
        kind = "state-dependent (general, Itô) noise" if noise_type == "general" else "additive noise"
        raise ValueError(f"unknown or unsuitable method {method!r} for {kind}; torchsde offers {valid} for it")
    sde_type = "ito" if method in ITO_METHODS[noise_type] else "stratonovich"

    # initial states and times
    theta0 = torch.as_tensor(theta0)
    if not theta0.is_floating_point():
        raise ValueError(f"theta0 must be a floating tensor, got dtype {theta0.dtype}")
    if theta0.ndim == 1:
        theta0 = theta0.expand(paths, -1)
    elif theta0.ndim != 2 or theta0.shape[0] != paths:
        raise ValueError(f"theta0 must have shape (N,) or (paths, N) = ({paths}, N), got {tuple(theta0.shape)}")
    if theta0.shape[-1] != n:
        raise ValueError(f"theta0 has length {theta0.shape[-1]} but the problem has {n} parameters")
    if not bool(torch.isfinite(theta0).all()):
        raise ValueError("theta0 contains non-finite values")
    theta0 = theta0.detach().to(device=problem.device, dtype=problem.dtype).clone().contiguous()  # in the problem dtype
    t = _check_times(t, theta0)
    dt = lr if dt is None else _positive(dt, "dt")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict of torchsde solver options, got {type(options).__name__}")
    bound_event = as_event(event)
    if bound_event is not None and bound_event.needs_problem:
        bound_event = bound_event.bind(problem)

    channels = noise.channels
    pbar = tqdm(total=float(t[-1] - t[0]), disable=None if progress else True, desc="simulate_sde", unit="t",
                bar_format="{l_bar}{bar}| t={n:.3g}/{total:.3g} [{elapsed}<{remaining}]", leave=False)
    sde = _SGDSDE(drift, fused, noise, math.sqrt(lr / batch_size), metric, sde_type, noise_type, t,
                  None if pbar.disable else pbar, paths, n)
    own_bm = bm is None
    if own_bm and method == "euler" and not adaptive:  # consecutive fixed steps: increments drawn in sequence
        bm = SequentialBrownian(t[0], t[-1], (paths, channels), dtype=theta0.dtype, device=theta0.device, seed=seed,
                                on_call=sde.solve_started)
    elif own_bm:
        bm = _CountingBrownian(t0=float(t[0]), t1=float(t[-1]), size=(paths, channels), dtype=theta0.dtype,
                               device=theta0.device, entropy=seed, dt=dt,
                               levy_area_approximation=_LEVY_AREA.get(method, "none"), on_call=sde.solve_started)
    if own_bm:
        sde.euler_fused = method == "euler" and fused and isinstance(noise, MinibatchNoise)
    elif tuple(bm.shape) != (paths, channels):
        raise ValueError(f"bm must have shape (paths, channels) = ({paths}, {channels}), got {tuple(bm.shape)}")
    solver = {"method": method, "dt": dt, "adaptive": bool(adaptive), "rtol": rtol, "atol": atol,
              "options": options}
    run_solver = dict(solver)
    steps = float(t[-1] - t[0]) / dt
    if not adaptive and abs(steps - round(steps)) <= 1e-9 * max(steps, 1.0):
        # torchsde steps while curr_t < t_end with curr_t a running sum of dt, which k · dt's rounding can leave a
        # few ulp short of t_end: one more evaluation for a step of ~1e-17. dt enlarged by a few ulp per step
        # (relative 4·eps·k, below any meaningful change) makes k steps reach t_end; torchsde clips the last.
        run_solver["dt"] = dt * (1 + 4 * torch.finfo(theta0.dtype).eps * max(round(steps), 1))

    def solve(y0, ts):
        sde.probing = noise_type == "general" and own_bm
        with torch.random.fork_rng(devices=[]):  # torchsde's shape probe draws from the global generator
            return torchsde.sdeint(sde, y0, ts, bm=bm, **run_solver)

    metadata = _metadata(field, drift, problem, noise, metric, lr, batch_size, paths, seed if own_bm else None, solver,
                         sde_type,
                         noise_type, bound_event, bm)
    start = time.perf_counter()
    stopped = False
    try:
        if bound_event is None:
            times, states = t, solve(theta0, t)
        else:
            times, states, stopped = _solve_with_event(solve, theta0, t, bound_event)
        finite = torch.isfinite(states).reshape(len(times), -1).all(-1)
        if not bool(finite.all()):  # the last step overflowed with no further evaluation to see it
            first = int((~finite).nonzero()[0])
            sde.record = [(float(times[i]), states[i]) for i in range(first)]
            sde.last = None
            raise _NonFinite(float(times[first]), "a path became non-finite")
    except _NonFinite as exc:
        raise _diverged(sde, exc, theta0, drift, problem, record, metadata) from None
    finally:
        pbar.close()
    wall = time.perf_counter() - start

    stats = {"nfe": sde.nfe, "increments": getattr(bm, "_flows_count", None), "wall_time": wall,
             "stopped_by_event": stopped}
    traj = Trajectory(times.detach(), states.detach(), stats=stats, metadata=metadata)
    traj.field, traj.problem = drift, problem
    if record:
        record_measurements(traj, problem, traj.theta)
    return traj


def _solve_with_event(solve, theta0, t, event):
    """Advance output interval by output interval; stop at the first output time where the event changed sign."""
    with torch.no_grad():
        value0 = event(t[0], theta0)
        if bool(event.satisfied(value0)):
            return t[:1], theta0[None], True
        sign0 = torch.sign(value0).reshape(-1)
    times, states, current = [t[0]], [theta0], theta0
    for i in range(1, len(t)):
        current = solve(current, t[i - 1:i + 1])[-1]
        times.append(t[i])
        states.append(current)
        with torch.no_grad():
            value = event(t[i], current)
        if bool((torch.sign(value).reshape(-1) != sign0).any()) or bool(event.satisfied(value)):
            return torch.stack(times), torch.stack(states), True
    return torch.stack(times), torch.stack(states), False




def _metadata(field, drift, problem, noise, metric, lr, batch_size, paths, seed, solver, sde_type, noise_type,
              event, bm) -> dict:
    return {
        "dynamics": "sde",
        "rule": describe(drift),
        "noise": describe(noise),
        "metric": describe(metric if metric is not None else Euclidean()),
        "lr": lr,
        "batch_size": batch_size,
        "paths": paths,
        "seed": seed,
        "method": solver["method"],
        "solver": {k: v for k, v in solver.items() if k != "options"} | {"options": solver["options"] or {}},
        "sde_type": sde_type,
        "noise_type": noise_type,
        "problem": repr(problem),
        **({"event": event.describe() if hasattr(event, "describe") else repr(event)} if event is not None else {}),
        "versions": versions("torchsde"),
    }


def _diverged(sde: _SGDSDE, bad: _NonFinite, theta0, drift, problem, record, metadata) -> FlowDivergedError:
    kept = list(sde.record)
    if sde.last is not None and (not kept or kept[-1][0] != sde.last[0]):
        kept.append(sde.last)
    if not kept:
        kept = [(float(bad.t), theta0)]
    times = torch.tensor([k[0] for k in kept], dtype=theta0.dtype, device=theta0.device)
    states = torch.stack([k[1].detach() for k in kept])
    traj = Trajectory(times, states, stats={"nfe": sde.nfe, "diverged_at": bad.t}, metadata=dict(metadata),
                      field=drift, problem=problem)
    if record:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            record_measurements(traj, problem, traj.theta)
    last_t = float(times[-1])
    return FlowDivergedError(
        f"{bad.reason} at t={bad.t:.6g}; the last finite state is at t={last_t:.6g} ({len(kept)} states of all "
        f"{states.shape[1]} paths kept in .trajectory). Try a smaller lr or step dt.",
        t=last_t, theta=states[-1], trajectory=traj, bad_time=bad.t,
    )
